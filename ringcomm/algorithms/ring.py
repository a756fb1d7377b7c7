r"""Ring all-reduce: scatter-reduce, then all-gather. The readable version.

P ranks stand in a ring; each talks only to its two neighbours::

            send to right ->
        +-------+       +-------+
        | rank0 | ----> | rank1 |
        +-------+       +-------+
            ^               |
            |               v
        +-------+       +-------+
        | rank3 | <---- | rank2 |
        +-------+       +-------+

    left  = (rank - 1) mod P      (we receive from left)
    right = (rank + 1) mod P      (we send to right)

The flat tensor is cut into P chunks c0..c3 (``chunks.chunk_bounds``; sizes
differ by at most one element). Phase 1, **scatter-reduce**, P-1 steps: at step
i rank r sends chunk (r - i) and receives chunk (r - i - 1), which it reduces
into its own copy (a *reduce* message, ``transport.recv_reduce``: the transport
reduces as it receives). After P-1 steps rank r holds chunk (r + 1) fully reduced.
Phase 2, **all-gather**, P-1 steps: at step i rank r sends chunk (r + 1 - i)
(fully reduced) and receives chunk (r - i), which it stores as is.

Who sends which chunk, P = 4 (``c2`` = rank sends its chunk 2 to the right)::

                    scatter-reduce          all-gather
    step             0    1    2          0    1    2
    rank 0 sends    c0   c3   c2         c1   c0   c3
    rank 1 sends    c1   c0   c3         c2   c1   c0
    rank 2 sends    c2   c1   c0         c3   c2   c1
    rank 3 sends    c3   c2   c1         c0   c3   c2
    rank r owns c(r+1) fully reduced after scatter-reduce.

Cost: 2(P-1) messages of about M/P bytes per rank, so 2(P-1)/P * M bytes in
all, nearly independent of P (the time model is ``cost.ring_time``, in ``cost.py`` with the others).

Every element is reduced in exactly one place (its owner) and then copied, so
all ranks end with bitwise identical bytes regardless of float rounding.
``ring_pipelined.py`` is the faster variant, checked against this one.
"""

from __future__ import annotations

import torch

from ..ops import finalize
from ..transports.base import Transport, exchange, recv, recv_reduce, send
from .buffers import ScratchPool
from .chunks import chunk_bounds
from .tags import Tag

__all__ = ["ring_all_reduce", "scatter_reduce", "all_gather"]


def scatter_reduce(chunks: list[torch.Tensor], op: str, transport: Transport, deadline: float) -> None:
    """P-1 steps; afterwards ``chunks[(rank + 1) % P]`` holds the reduction of all ranks."""
    rank, p = transport.rank, transport.world_size
    left, right = (rank - 1) % p, (rank + 1) % p
    for step in range(p - 1):
        # At step i, send chunk (rank - i) and receive chunk (rank - i - 1), reducing it into ours.
        send_chunk = chunks[(rank - step) % p]
        recv_chunk = chunks[(rank - step - 1) % p]
        # One post: the send and the receive travel together (empty chunks: no message at all).
        exchange(
            transport,
            [recv_reduce(recv_chunk, left, Tag.RING, op), send(send_chunk, right, Tag.RING)],
            deadline,
        )


def all_gather(chunks: list[torch.Tensor], transport: Transport, deadline: float) -> None:
    """P-1 steps that pass each fully reduced chunk once around the ring."""
    rank, p = transport.rank, transport.world_size
    left, right = (rank - 1) % p, (rank + 1) % p
    for step in range(p - 1):
        # At step i, send chunk (rank + 1 - i) and receive chunk (rank - i) in place.
        send_chunk = chunks[(rank + 1 - step) % p]
        recv_chunk = chunks[(rank - step) % p]
        exchange(transport, [recv(recv_chunk, left, Tag.RING), send(send_chunk, right, Tag.RING)], deadline)


def ring_all_reduce(
    flat: torch.Tensor, op: str, transport: Transport, deadline: float, scratch: ScratchPool
) -> None:
    """All-reduce the contiguous 1-D tensor ``flat`` in place over ``transport``.

    Args:
        flat: contiguous 1-D tensor, this rank's contribution; holds the result after.
        op: ``"sum"``, ``"avg"``, ``"max"`` or ``"min"``.
        transport: the wire.
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
        scratch: unused (a transport stages what it cannot reduce in place itself).
    """
    p = transport.world_size
    chunks = [flat[start : start + n] for start, n in chunk_bounds(flat.numel(), p)]
    scatter_reduce(chunks, op, transport, deadline)
    finalize(chunks[(transport.rank + 1) % p], op, p)  # only the owner divides (avg)
    all_gather(chunks, transport, deadline)
