r"""Fold a world of any size into a power of two, and the result back out: for ``rhd.py`` and ``rd.py``.

Recursive halving and recursive doubling pair rank r with rank r XOR d, which
needs a power of two of ranks. For any other P, write P = P' + e with P' the
largest power of two <= P and e < P' *extra* ranks. Each extra rank P' + j
hands its whole vector to its *partner* j, which reduces it into its own
(**fold-in**); ranks 0..P'-1, the *core*, run the power-of-two algorithm with
their own rank numbers; then each partner sends the result back to its extra
rank (**fold-out**). P = 6 (P' = 4, e = 2)::

           fold-in                                   fold-out
    rank4 ---- x4 ---->  rank0 \                  rank0 ---- y ---->  rank4
    rank5 ---- x5 ---->  rank1  |  core: the       rank1 ---- y ---->  rank5
                         rank2  |  power-of-two
                         rank3 /   algorithm

The extra ranks idle in between. A partner's link carries M more bytes each
way (M = the tensor, in bytes) and its chain two more messages; ``cost.py``
counts both in the ``rhd`` and ``rd`` rows.

The extra rank's vector is reduced once, at its partner, before the core
starts; the result it receives is its partner's bytes. So the fold changes
nothing about why the core's ranks agree bitwise: the extras get a copy.
"""

from __future__ import annotations

import torch

from ..transports.base import Transport, exchange, recv, recv_reduce, send
from .chunks import core_size
from .tags import Tag

__all__ = ["core_size", "fold_partner", "fold_in", "fold_out"]


def fold_partner(rank: int, world_size: int) -> int | None:
    """The rank that ``rank`` folds with: P' + j <-> j for each extra rank P' + j; None for the others."""
    core = core_size(world_size)
    if rank >= core:
        return rank - core  # an extra rank: its partner in the core
    if rank + core < world_size:
        return rank + core  # a core rank with an extra rank to serve
    return None


def fold_in(flat: torch.Tensor, op: str, transport: Transport, deadline: float) -> None:
    """An extra rank sends ``flat`` to its partner, which reduces it into its own (``flat op x_extra``)."""
    rank, p = transport.rank, transport.world_size
    partner = fold_partner(rank, p)
    if partner is None:
        return
    if rank >= core_size(p):
        exchange(transport, [send(flat, partner, Tag.FOLD)], deadline)
    else:
        exchange(transport, [recv_reduce(flat, partner, Tag.FOLD, op)], deadline)


def fold_out(flat: torch.Tensor, transport: Transport, deadline: float) -> None:
    """A partner sends its result ``flat`` back to its extra rank, which stores it as is."""
    rank, p = transport.rank, transport.world_size
    partner = fold_partner(rank, p)
    if partner is None:
        return
    if rank >= core_size(p):
        exchange(transport, [recv(flat, partner, Tag.FOLD)], deadline)
    else:
        exchange(transport, [send(flat, partner, Tag.FOLD)], deadline)
