r"""Binomial-tree broadcast: ceil(log2 P) rounds of whole-tensor messages. For small tensors.

Number the ranks relative to the root, v = (rank - src) mod P. In round k
(distance d = 2^k) every rank that already has the data (v < d) sends it to
v + d, if there is such a rank; so the number of ranks holding it doubles each
round, and after ceil(log2 P) rounds all of them do::

    src=0         d = 1          d = 2
               rank0 -> rank1   rank0 -> rank2
                                rank1 -> rank3

    parent of v = v - 2^floor(log2 v)      (v receives once, in the round d = 2^floor(log2 v))
    children    = v + d for each later round's d, while v + d < P

Who sends to whom, P = 4, src = 0 (``-> 2`` = the rank sends the whole tensor to rank 2)::

    round (d)        0 (1)    1 (2)
    rank 0 sends     -> 1     -> 2
    rank 1 sends       .      -> 3      (received from 0 in round 0)
    rank 2 sends       .        .       (received from 0 in round 1)
    rank 3 sends       .        .       (received from 1 in round 1)

With src = s the same table holds for the relative numbers v, rank = (v + s) mod P.

Cost (``cost.COLLECTIVE_COSTS``): ceil(log2 P) messages of M bytes on the
critical path, ceil(log2 P)·(α + M·β): the fewest latencies, but the root
sends M in every round, so a large tensor goes better down the pipelined chain
(``chain.py``).

Every rank ends with the root's bytes: nothing is computed, only copied.
"""

from __future__ import annotations

import torch

from ..transports.base import Transport, exchange, recv, send
from .tags import Tag

__all__ = ["tree_broadcast"]


def tree_broadcast(flat: torch.Tensor, src: int, transport: Transport, deadline: float) -> None:
    """Broadcast ``flat`` (contiguous, 1-D) from rank ``src`` to every rank, in place.

    Args:
        flat: the root's data on ``src``; on the others, overwritten with it.
        src: the root's rank.
        transport: the wire.
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
    """
    rank, p = transport.rank, transport.world_size
    v = (rank - src) % p
    d = 1
    while d < p:
        # In the round at distance d, ranks v < d send to v + d; ranks d <= v < 2d receive from v - d.
        if v < d and v + d < p:
            exchange(transport, [send(flat, (v + d + src) % p, Tag.TREE)], deadline)
        elif d <= v < 2 * d:
            exchange(transport, [recv(flat, (v - d + src) % p, Tag.TREE)], deadline)
        d *= 2
