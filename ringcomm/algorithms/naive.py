r"""Naive all-reduce: gather everything to rank 0, reduce there, send the result back.

The baseline a student writes first::

          rank1   rank2   rank3
             \      |      /        1. every rank sends its whole tensor to rank 0
              v     v     v
               +---------+
               |  rank 0 |          2. rank 0 reduces, in rank order
               +---------+
              /     |     \         3. rank 0 sends the result to every rank
             v      v      v
          rank1   rank2   rank3

Rank 0's link carries (P-1)*M bytes in and (P-1)*M out, in 2(P-1) messages done
one after another on rank 0's side, against the ring's 2(P-1)/P * M: the root's
link is the bottleneck and it grows with P (the time model is
``cost.COSTS["naive"]``, in ``cost.py`` with the others). Reducing in rank order (not arrival order) makes the result
reproducible; every rank gets rank 0's bytes, so all ranks agree bitwise.
"""

from __future__ import annotations

import torch

from ..ops import finalize
from ..transports.base import Transport, exchange, recv, recv_reduce, send
from .buffers import ScratchPool
from .tags import Tag

__all__ = ["naive_all_reduce", "ROOT"]

ROOT = 0


def naive_all_reduce(
    flat: torch.Tensor, op: str, transport: Transport, deadline: float, scratch: ScratchPool
) -> None:
    """All-reduce ``flat`` in place through rank 0 (which reduces each peer's tensor as it receives it)."""
    rank, p = transport.rank, transport.world_size
    if flat.numel() == 0:
        return
    if rank == ROOT:
        for peer in range(1, p):  # gather and reduce in rank order
            exchange(transport, [recv_reduce(flat, peer, Tag.NAIVE, op)], deadline)
        finalize(flat, op, p)
        exchange(transport, [send(flat, peer, Tag.NAIVE) for peer in range(1, p)], deadline)  # broadcast
    else:
        # The send must finish before the result lands in the same tensor.
        exchange(transport, [send(flat, ROOT, Tag.NAIVE)], deadline)
        exchange(transport, [recv(flat, ROOT, Tag.NAIVE)], deadline)
