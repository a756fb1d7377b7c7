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
all, nearly independent of P (the time model is ``cost.COSTS["ring"]``, in ``cost.py`` with the others).

Every element is reduced in exactly one place (its owner) and then copied, so
all ranks end with bitwise identical bytes regardless of float rounding.

**The two phases on their own** are ``ringcomm.reduce_scatter`` and
``ringcomm.all_gather`` with ``algo="ring"`` (``ring_reduce_scatter``,
``ring_all_gather`` below). torch's convention wants rank r to end with block r,
while scatter-reduce leaves rank r owning c(r+1). So both hand the phases the
blocks rotated by one, ``chunks[j] = block (j - 1)``: rank r then owns
``chunks[r + 1]`` = block r, and the table above holds with ``cj`` read as
block j-1. For reduce_scatter, P = 4 (``b3`` = the rank sends its block 3)::

    step             0    1    2
    rank 0 sends    b3   b2   b1      rank r owns b_r fully reduced after step P-2
    rank 1 sends    b0   b3   b2
    rank 2 sends    b1   b0   b3
    rank 3 sends    b2   b1   b0

and all_gather, where rank r starts with b_r (its input) and forwards what it got::

    step             0    1    2
    rank 0 sends    b0   b3   b2
    rank 1 sends    b1   b0   b3
    rank 2 sends    b2   b1   b0
    rank 3 sends    b3   b2   b1

Each is half the all-reduce: P-1 messages of M/P bytes per rank, (P-1)/P * M
bytes (M = the whole tensor: reduce_scatter's input, all_gather's output);
``cost.COLLECTIVE_COSTS``.
``ring_pipelined.py`` is the faster variant, checked against this one.
"""

from __future__ import annotations

import torch

from ..ops import finalize
from ..transports.base import Transport, exchange, recv, recv_reduce, send
from .buffers import ScratchPool
from .chunks import chunk_bounds
from .tags import Tag

__all__ = ["ring_all_reduce", "ring_all_gather", "ring_reduce_scatter", "scatter_reduce", "all_gather"]


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


def _rotated_blocks(flat: torch.Tensor, p: int) -> list[torch.Tensor]:
    """``flat``'s P equal blocks as the phases' chunks, rotated by one: ``chunks[j]`` = block (j - 1).

    scatter-reduce leaves rank r owning ``chunks[r + 1]``, which is then block r, as torch's
    reduce_scatter_tensor and all_gather_into_tensor want (the table in the module docstring).
    """
    n = flat.numel() // p
    blocks = [flat[i * n : (i + 1) * n] for i in range(p)]
    return blocks[-1:] + blocks[:-1]


def ring_reduce_scatter(
    output: torch.Tensor, work: torch.Tensor, op: str, transport: Transport, deadline: float
) -> None:
    """Phase 1 alone: ``output`` (n elements) <- block ``rank`` of the reduction of every rank's ``work``.

    Args:
        output: contiguous 1-D, n elements; this rank's block of the result after.
        work: contiguous 1-D, P * n elements: a copy of this rank's input (it is reduced into, so
            the caller's input stays as it was).
        op: ``"sum"``, ``"avg"``, ``"max"`` or ``"min"``.
        transport: the wire.
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
    """
    rank, p = transport.rank, transport.world_size
    chunks = _rotated_blocks(work, p)
    scatter_reduce(chunks, op, transport, deadline)
    mine = chunks[(rank + 1) % p]  # = block rank
    finalize(mine, op, p)  # avg: the owner divides once
    output.copy_(mine)


def ring_all_gather(output: torch.Tensor, transport: Transport, deadline: float) -> None:
    """Phase 2 alone: ``output`` (P * n elements) holds this rank's input in block ``rank``; after, all blocks.

    Args:
        output: contiguous 1-D, P * n elements, block ``rank`` already filled with this rank's input.
        transport: the wire.
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
    """
    all_gather(_rotated_blocks(output, transport.world_size), transport, deadline)
