r"""Pipelined chain broadcast: the tensor flows src -> src+1 -> ... in segments. For large tensors.

The ranks stand in a chain that starts at the root ``src`` and follows the ring's
order (``ring.py``); each receives from its ``left`` and forwards to its ``right``,
and the last one forwards nothing::

    src=0:   rank0 ----> rank1 ----> rank2 ----> rank3
             (root)                              (end)

    q     = (rank - src) mod P     (the rank's place in the chain; the root is 0)
    left  = (rank - 1) mod P       (we receive from left, unless we are the root)
    right = (rank + 1) mod P       (we send to right, unless we are the end, q = P-1)

The tensor is cut into S segments s0..s(S-1) of at most ``segment_bytes``
(``chunks.segment_count``, ``chunk_bounds``). At step t the rank at place q
receives segment t - q + 1 and sends segment t - q, so while a rank forwards
one segment it already receives the next: every link is busy at once. Who sends
which segment, P = 4, src = 0, S = 3 (``s1`` = the rank sends segment 1 to its right)::

    step            0    1    2    3    4
    rank 0 sends   s0   s1   s2    .    .
    rank 1 sends    .   s0   s1   s2    .
    rank 2 sends    .    .   s0   s1   s2
    rank 3 sends    .    .    .    .    .     (the end: it only receives, s0 s1 s2 at steps 2 3 4)

Cost (``cost.COLLECTIVE_COSTS``): P + S - 2 steps of M/S bytes each, so
(P + S - 2)·(α + M/S·β): about M·β for S >> P (the bandwidth term no longer
grows with P), at the price of S + P - 2 latencies. One segment (S = 1) is the
plain chain, (P-1)·(α + M·β); ``tree.py`` is the one for small tensors.

Every rank ends with the root's bytes: nothing is computed, only copied.
"""

from __future__ import annotations

import torch

from ..transports.base import Message, Transport, exchange, recv, send
from .chunks import CHAIN_SEGMENT_BYTES, chunk_bounds, segment_count
from .tags import Tag

__all__ = ["chain_broadcast"]


def chain_broadcast(
    flat: torch.Tensor, src: int, transport: Transport, deadline: float, *, segment_bytes: int = CHAIN_SEGMENT_BYTES
) -> None:
    """Broadcast ``flat`` (contiguous, 1-D) from rank ``src`` to every rank, in place.

    Args:
        flat: the root's data on ``src``; on the others, overwritten with it.
        src: the root's rank.
        transport: the wire.
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
        segment_bytes: the largest segment, in bytes (one element at least).
    """
    rank, p = transport.rank, transport.world_size
    if p == 1:
        return
    q = (rank - src) % p
    left, right = (rank - 1) % p, (rank + 1) % p
    segments = [flat[start : start + n] for start, n in chunk_bounds(flat.numel(), segment_count(
        flat.numel(), flat.element_size(), segment_bytes))]
    s = len(segments)
    for t in range(s + p - 2):
        # At step t, receive segment (t - q + 1) from the left and send segment (t - q) to the right.
        messages: list[Message] = []
        if q >= 1 and 0 <= t - q + 1 < s:
            messages.append(recv(segments[t - q + 1], left, Tag.CHAIN))
        if q <= p - 2 and 0 <= t - q < s:
            messages.append(send(segments[t - q], right, Tag.CHAIN))
        exchange(transport, messages, deadline)
