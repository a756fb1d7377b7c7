r"""Recursive halving, then recursive doubling: Rabenseifner's all-reduce, for any P.

The ring moves the fewest bytes but takes 2(P-1) steps, one neighbour at a
time. Rabenseifner's algorithm moves the same bytes in 2·log2(P) steps by
pairing ranks across the bits of their numbers: at distance d (a power of two)
the partner of rank r is ``r XOR d``::

        d = 2                          d = 1
    rank0 <-----------> rank2      rank0 <---> rank1
    rank1 <-----------> rank3      rank2 <---> rank3

The flat tensor is cut into P chunks c0..c3 (``chunks.chunk_bounds``). A rank
works on a *block*, a run of chunks, which is one contiguous slice of the
tensor. Phase 1, **recursive halving** (a reduce-scatter), d = P/2, ..., 2, 1:
each rank sends its partner the half of its block that the partner keeps,
and receives the partner's copy of the half it keeps, reducing it into its own
(a *reduce* message, ``transport.recv_reduce``). Blocks halve each step; after
log2(P) steps rank r holds chunk r fully reduced. Phase 2, **recursive
doubling** (an all-gather), d = 1, 2, ..., P/2: each rank sends its fully
reduced block to its partner and receives the partner's, so blocks double
back to the whole tensor. The block each rank works on (partial reductions
while halving, final values while doubling)::

                          halving                       doubling
           start          after d = 2    after d = 1    after d = 1    after d = 2
    rank 0 [c0 c1 c2 c3]  [c0 c1]        [c0]           [c0 c1]        [c0 c1 c2 c3]
    rank 1 [c0 c1 c2 c3]  [c0 c1]           [c1]        [c0 c1]        [c0 c1 c2 c3]
    rank 2 [c0 c1 c2 c3]        [c2 c3]        [c2]           [c2 c3]  [c0 c1 c2 c3]
    rank 3 [c0 c1 c2 c3]        [c2 c3]           [c3]        [c2 c3]  [c0 c1 c2 c3]

Who sends which chunks, P = 4 (``c2c3 -> 2`` = the rank sends its chunks 2
and 3 to rank 2)::

                     halving (reduced there)     doubling (copied there)
    distance d          2           1              1           2
    rank 0 sends    c2c3 -> 2    c1 -> 1        c0 -> 1    c0c1 -> 2
    rank 1 sends    c2c3 -> 3    c0 -> 0        c1 -> 0    c0c1 -> 3
    rank 2 sends    c0c1 -> 0    c3 -> 3        c2 -> 3    c2c3 -> 0
    rank 3 sends    c0c1 -> 1    c2 -> 2        c3 -> 2    c2c3 -> 1
    rank r owns c_r fully reduced after halving.

**Any P** (``fold.py``): P = P' + e with P' the largest power of two <= P.
Each extra rank P' + j first hands its whole vector x to rank j, which reduces
it into its own; ranks 0..P'-1 run the above with P' chunks; then rank j sends
the result y back. P = 6 (P' = 4, chunks c0..c3 of M/4 each, M = the tensor)::

                   fold-in      halving                 doubling                fold-out
    distance d                    2          1            1          2
    rank 0         <- x4 (M)   c2c3 -> 2  c1 -> 1      c0 -> 1  c0c1 -> 2      y -> 4 (M)
    rank 1         <- x5 (M)   c2c3 -> 3  c0 -> 0      c1 -> 0  c0c1 -> 3      y -> 5 (M)
    rank 2              .      c0c1 -> 0  c3 -> 3      c2 -> 3  c2c3 -> 0         .
    rank 3              .      c0c1 -> 1  c2 -> 2      c3 -> 2  c2c3 -> 1         .
    rank 4         x4 -> 0 (M)   (idle until the fold-out)                     <- y (M)
    rank 5         x5 -> 1 (M)                                                 <- y (M)

Cost (``cost.COSTS["rhd"]``, with the other algorithms' in ``cost.py``): P a
power of two: 2·log2(P) messages per rank and M/2 + M/4 + ... + M/P =
(P-1)/P·M bytes per phase, the ring's 2(P-1)/P·M in all, in log2(P) times fewer
steps. Otherwise a fold partner also takes M in and sends M back: 2·log2(P') + 2
messages and 2(P'-1)/P'·M + 2M bytes on its chain, the critical path.

**The two phases on their own** are ``ringcomm.reduce_scatter(algo="rhd")``
(``rhd_reduce_scatter``: recursive halving) and ``ringcomm.all_gather(algo="rd")``
(``rd_all_gather``: recursive doubling). Their blocks need no mapping: the
tables above already end (halving) and start (doubling) with rank r holding
chunk r, which is block r of torch's convention, since the P blocks are equal
and in rank order. Both need P a power of two and refuse any other P before a
byte moves (the fold hands an extra rank's whole vector to a partner, but in a
reduce-scatter an extra rank must own a block, and in an all-gather contribute
one, which the core's chunk arithmetic has no place for); ``auto`` then picks the
ring. Each is half the all-reduce: log2(P) messages, (P-1)/P·M bytes.

**Why all ranks agree bitwise.** As in the ring, every value is computed on
one rank only and then copied: in halving, each partial reduction of a block is
made by the one rank that keeps the block and by no other (its partner drops
that half), so chunk c's final value is made on rank c alone; doubling and the
fold-out only copy it. Which operand comes first in a reduce, and how a
transport splits it (shared memory reduces fragment by fragment), can change
the bits of a max of +0.0 and -0.0, but not whether ranks agree: there is
nothing to agree with. ``avg`` sums, then rank c divides chunk c by P once
(``ops.finalize``), before the doubling copies it.
"""

from __future__ import annotations

import torch

from ..ops import finalize
from ..transports.base import Transport, exchange, recv, recv_reduce, send
from .buffers import ScratchPool
from .chunks import chunk_bounds
from .fold import core_size, fold_in, fold_out
from .tags import Tag

__all__ = [
    "rhd_all_reduce",
    "rhd_reduce_scatter",
    "rd_all_gather",
    "recursive_halving",
    "recursive_doubling",
    "block",
    "require_power_of_two",
]


def block(chunks: list[tuple[int, int]], first: int, count: int) -> tuple[int, int]:
    """``(start, numel)`` of the ``count`` chunks from chunk ``first`` on: one contiguous slice."""
    start = chunks[first][0]
    last_start, last_numel = chunks[first + count - 1]
    return start, last_start + last_numel - start


def recursive_halving(
    flat: torch.Tensor, chunks: list[tuple[int, int]], op: str, transport: Transport, deadline: float
) -> None:
    """log2(P') steps (P' = ``len(chunks)``, a power of two); afterwards rank r holds chunk r reduced."""
    rank, core = transport.rank, len(chunks)
    d = core // 2
    while d >= 1:
        partner = rank ^ d
        # At distance d, send the d chunks from (partner - partner mod d) on, which the partner keeps,
        # and reduce the partner's copy of the d chunks from (rank - rank mod d) on, which we keep.
        send_start, send_n = block(chunks, partner - partner % d, d)
        keep_start, keep_n = block(chunks, rank - rank % d, d)
        exchange(
            transport,
            [
                recv_reduce(flat[keep_start : keep_start + keep_n], partner, Tag.RHD_HALVING, op),
                send(flat[send_start : send_start + send_n], partner, Tag.RHD_HALVING),
            ],
            deadline,
        )
        d //= 2


def recursive_doubling(
    flat: torch.Tensor, chunks: list[tuple[int, int]], transport: Transport, deadline: float
) -> None:
    """log2(P') steps that double each rank's fully reduced block until it is the whole tensor."""
    rank, core = transport.rank, len(chunks)
    d = 1
    while d < core:
        partner = rank ^ d
        # At distance d, send our d reduced chunks from (rank - rank mod d) on and receive the
        # partner's d chunks from (partner - partner mod d) on, stored as they are.
        send_start, send_n = block(chunks, rank - rank % d, d)
        recv_start, recv_n = block(chunks, partner - partner % d, d)
        exchange(
            transport,
            [
                recv(flat[recv_start : recv_start + recv_n], partner, Tag.RHD_DOUBLING),
                send(flat[send_start : send_start + send_n], partner, Tag.RHD_DOUBLING),
            ],
            deadline,
        )
        d *= 2


def rhd_all_reduce(
    flat: torch.Tensor, op: str, transport: Transport, deadline: float, scratch: ScratchPool
) -> None:
    """All-reduce the contiguous 1-D tensor ``flat`` in place: recursive halving, then doubling.

    Args:
        flat: contiguous 1-D tensor, this rank's contribution; holds the result after.
        op: ``"sum"``, ``"avg"``, ``"max"`` or ``"min"``.
        transport: the wire.
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
        scratch: unused (a transport stages what it cannot reduce in place itself).

    Example::

        >>> ringcomm.all_reduce(grad, op="avg", algo="rhd")
    """
    rank, p = transport.rank, transport.world_size
    if flat.numel() == 0 or p == 1:
        return  # nothing to move; avg over one rank divides by 1
    core = core_size(p)
    fold_in(flat, op, transport, deadline)
    if rank < core:
        chunks = chunk_bounds(flat.numel(), core)
        recursive_halving(flat, chunks, op, transport, deadline)
        start, n = chunks[rank]
        finalize(flat[start : start + n], op, p)  # only chunk r's owner divides (avg), by all P ranks
        recursive_doubling(flat, chunks, transport, deadline)
    fold_out(flat, transport, deadline)


def require_power_of_two(what: str, world_size: int) -> None:
    """ValueError, in one line, unless ``world_size`` is a power of two (the halving and doubling alone need it)."""
    if world_size != core_size(world_size):
        raise ValueError(
            f"{what} needs a power-of-two world size, this one has {world_size} ranks; "
            "use algo='ring' or algo='auto' (which picks the ring there)"
        )


def rhd_reduce_scatter(
    output: torch.Tensor, work: torch.Tensor, op: str, transport: Transport, deadline: float
) -> None:
    """Recursive halving alone: ``output`` (n elements) <- block ``rank`` of the reduction of every ``work``.

    Args:
        output: contiguous 1-D, n elements; this rank's block of the result after.
        work: contiguous 1-D, P * n elements: a copy of this rank's input (reduced into).
        op: ``"sum"``, ``"avg"``, ``"max"`` or ``"min"``.
        transport: the wire; P must be a power of two (``require_power_of_two``).
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
    """
    rank, p = transport.rank, transport.world_size
    require_power_of_two("reduce_scatter algo='rhd'", p)
    chunks = chunk_bounds(work.numel(), p)  # P equal chunks in rank order: chunk r is block r
    recursive_halving(work, chunks, op, transport, deadline)
    start, n = chunks[rank]
    mine = work[start : start + n]
    finalize(mine, op, p)  # avg: the owner divides once
    output.copy_(mine)


def rd_all_gather(output: torch.Tensor, transport: Transport, deadline: float) -> None:
    """Recursive doubling alone: ``output`` holds this rank's input in block ``rank``; after, all blocks.

    Args:
        output: contiguous 1-D, P * n elements, block ``rank`` already filled.
        transport: the wire; P must be a power of two (``require_power_of_two``).
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
    """
    p = transport.world_size
    require_power_of_two("all_gather algo='rd'", p)
    recursive_doubling(output, chunk_bounds(output.numel(), p), transport, deadline)
