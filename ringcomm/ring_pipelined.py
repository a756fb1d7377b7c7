r"""Pipelined ring all-reduce: the ring of ``ring.py``, cut into segments that overlap.

Same chunks, same who-sends-what table, same bytes on the wire as ``ring.py``;
the difference is *when* things happen. ``ring.py`` finishes a whole step (send
chunk, receive chunk, reduce it) before starting the next, so the wire idles
while a rank reduces, and the CPU idles while bytes travel.

Here each chunk is cut into segments of at most ``segment_bytes`` (4 MiB by
default; Gloo's own chunked ring keeps about two 1 MiB segments in flight, but
on a 2-core machine running 4 ranks each message costs ~0.2 ms of scheduling,
and 4 MiB measured best: 35.6 ms against 39.0 ms for 1 MiB and 57.9 ms for
256 KiB at 16 MiB, 4 ranks).
Rank r's k-th message of a phase is segment s of step i (k = i*S + s), and a
segment can be forwarded as soon as it is reduced, without waiting for the
rest of its chunk::

    scatter-reduce, one rank, S = 3 segments per chunk:
      recv  [s0 s1 s2 | s0 s1 s2 | ...]   receives posted ``window`` ahead
      reduce    s0 s1 s2 | s0 s1 s2        into this rank's copy of the chunk
      send        s0 s1 s2 | s0 s1 s2      right away, to the right neighbour

Python round trips per message: one ``irecv``, one ``isend`` and one ``wait`` on
the receive; the sends are waited once at the end of each phase. Scratch: a
window of ``window`` receive slots of one segment each, taken from the pool.

Cost model: as ``ring.py``, 2(P-1)/P * M bytes per rank; the number of messages
becomes 2(P-1) * S with S = ceil(chunk_bytes / segment_bytes), and transfer
overlaps reduction.
"""

from __future__ import annotations

import torch

from .buffers import ScratchPool
from .chunks import chunk_bounds
from .ops import finalize, reduce_into
from .transport import Pending, Transport

__all__ = ["pipelined_ring_all_reduce", "DEFAULT_SEGMENT_BYTES", "DEFAULT_WINDOW"]

DEFAULT_SEGMENT_BYTES = 4 << 20
DEFAULT_WINDOW = 2

_TAG_SCATTER_REDUCE = 0
_TAG_ALL_GATHER = 1


def _segments(chunk: torch.Tensor, seg_elems: int) -> list[torch.Tensor]:
    return [chunk[i : i + seg_elems] for i in range(0, chunk.numel(), seg_elems)]


def _step_messages(
    chunks: list[torch.Tensor], rank: int, p: int, seg_elems: int, offset: int
) -> list[list[torch.Tensor]]:
    """Segments handled at each of the P-1 steps: step i touches chunk (rank - i + offset)."""
    return [_segments(chunks[(rank - i + offset) % p], seg_elems) for i in range(p - 1)]


def pipelined_scatter_reduce(
    chunks: list[torch.Tensor],
    op: str,
    transport: Transport,
    deadline: float,
    slots: list[torch.Tensor],
    seg_elems: int,
) -> None:
    """As ``ring.scatter_reduce``, with segments forwarded as soon as they are reduced."""
    rank, p = transport.rank, transport.world_size
    left, right = (rank - 1) % p, (rank + 1) % p
    # Step i sends chunk (rank - i) and receives chunk (rank - i - 1), as in ring.py.
    sends = _step_messages(chunks, rank, p, seg_elems, 0)
    # (step, segment) of every receive, in arrival order: step-major, then segment
    recvs = [
        (i, seg) for i, step in enumerate(_step_messages(chunks, rank, p, seg_elems, -1)) for seg in step
    ]
    window = len(slots)

    def post_recv(k: int) -> Pending:
        return transport.irecv(slots[k % window][: recvs[k][1].numel()], left, _TAG_SCATTER_REDUCE)

    posted = [post_recv(k) for k in range(min(window, len(recvs)))]
    sent = [transport.isend(seg, right, _TAG_SCATTER_REDUCE) for seg in sends[0]]
    for k, (step, target) in enumerate(recvs):
        transport.wait(posted[k], deadline)
        reduce_into(target, slots[k % window][: target.numel()], op)
        if k + window < len(recvs):  # slot k % window is free again
            posted.append(post_recv(k + window))
        if step < p - 2:  # reduced at step i, forwarded at step i + 1
            sent.append(transport.isend(target, right, _TAG_SCATTER_REDUCE))
    for pending in sent:
        transport.wait(pending, deadline)


def pipelined_all_gather(
    chunks: list[torch.Tensor], transport: Transport, deadline: float, seg_elems: int
) -> None:
    """As ``ring.all_gather``: segments land in place and are forwarded on arrival."""
    rank, p = transport.rank, transport.world_size
    left, right = (rank - 1) % p, (rank + 1) % p
    # Step i sends chunk (rank + 1 - i) and receives chunk (rank - i), as in ring.py.
    first_sends = _segments(chunks[(rank + 1) % p], seg_elems)
    recv_steps = _step_messages(chunks, rank, p, seg_elems, 0)
    posted = [
        (i, transport.irecv(seg, left, _TAG_ALL_GATHER), seg)
        for i, step in enumerate(recv_steps)
        for seg in step
    ]
    sent = [transport.isend(seg, right, _TAG_ALL_GATHER) for seg in first_sends]
    for step, pending, seg in posted:
        transport.wait(pending, deadline)
        if step < p - 2:
            sent.append(transport.isend(seg, right, _TAG_ALL_GATHER))
    for pending in sent:
        transport.wait(pending, deadline)


def pipelined_ring_all_reduce(
    flat: torch.Tensor,
    op: str,
    transport: Transport,
    deadline: float,
    scratch: ScratchPool,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    window: int = DEFAULT_WINDOW,
) -> None:
    """All-reduce ``flat`` in place; same contract as ``ring.ring_all_reduce``.

    Args:
        segment_bytes: largest message, in bytes.
        window: receive slots (segments in flight toward this rank) in scatter-reduce.
    """
    p = transport.world_size
    chunks = [flat[s : s + n] for s, n in chunk_bounds(flat.numel(), p)]
    if flat.numel() == 0 or p == 1:  # nothing to exchange
        return
    seg_elems = max(1, min(chunks[0].numel(), segment_bytes // flat.element_size()))
    slot_count = max(1, window)
    pool = scratch.get(seg_elems * slot_count, like=flat)
    slots = [pool[i * seg_elems : (i + 1) * seg_elems] for i in range(slot_count)]
    pipelined_scatter_reduce(chunks, op, transport, deadline, slots, seg_elems)
    finalize(chunks[(transport.rank + 1) % p], op, p)
    pipelined_all_gather(chunks, transport, deadline, seg_elems)
