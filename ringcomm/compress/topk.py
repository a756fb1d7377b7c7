r"""Top-k sparsification with error feedback: each rank sends its k largest entries, all gathered.

Not linear (the sum of two ranks' top-k is not the top-k of their sum), so it cannot ride an
all-reduce: each rank gathers every rank's (values, indices) with ``ringcomm.all_gather`` and sums
them locally, the same way on every rank (rank order), so every rank holds the same average::

    g  <- g + e                          error feedback
    i  =  top-k of |g|  (k = ⌈F·N⌉)      this rank's k entries: values g[i], indices i
    all_gather(values), all_gather(i)    P·k of each, in rank order
    out = Σ_ranks scatter(values at i) / P
    e  <- g − scatter(g[i] at i)         what this rank did not send, kept for the next step

**Bytes** (``cost.topk_bytes_sent``): a ring all_gather sends (P−1)·k·(4 + 4) bytes per rank (float32
values, int32 indices) against the ring all-reduce's 2(P−1)/P·4N: a ratio of P·k·8/(8N) = P·F.
At P = 4 and F = 0.01, 4 %. A parameter server cannot gather: ``algo="ps"`` is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["TopK"]

#: ``all_gather(output, input)``: ringcomm.all_gather with the run's algorithm and transport bound.
AllGather = Callable[[torch.Tensor, torch.Tensor], Any]


class TopK:
    """Top-``fraction`` sparsification with error feedback, per gradient bucket.

    Args:
        fraction: F, the share of each bucket's entries sent (``topk:F``), 0 < F <= 1.
    """

    def __init__(self, fraction: float) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"topk fraction={fraction!r}: expected a number in (0, 1]")
        self.fraction = float(fraction)
        self.error: dict[int, torch.Tensor] = {}  # first parameter's index of the bucket -> e

    def k(self, numel: int) -> int:
        """Entries sent of a bucket of ``numel``: ⌈F·N⌉, at least 1."""
        return max(1, min(numel, math.ceil(self.fraction * numel)))

    def reduce(self, flat: torch.Tensor, key: int, all_gather: AllGather, world: int) -> None:
        """Average ``flat`` (one bucket, float32, keyed by ``key``) in place, sending k entries per rank."""
        e = self.error.get(key)
        if e is not None and e.numel() == flat.numel():
            flat.add_(e)
        k = self.k(flat.numel())
        index = flat.abs().topk(k, sorted=False).indices.sort().values  # sorted: a deterministic payload
        values = flat[index].contiguous()
        idx32 = index.to(torch.int32)
        all_values = torch.empty(world * k, dtype=flat.dtype, device=flat.device)
        all_index = torch.empty(world * k, dtype=torch.int32, device=flat.device)
        all_gather(all_values, values)
        all_gather(all_index, idx32)
        residual = flat.clone()
        residual[index] = 0
        self.error[key] = residual
        flat.zero_()
        for r in range(world):  # rank order: the same sum on every rank
            flat.index_add_(0, all_index[r * k : (r + 1) * k].long(), all_values[r * k : (r + 1) * k])
        flat.div_(world)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "topk", "fraction": self.fraction, "error": {i: t.clone() for i, t in self.error.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; ValueError if it is another compressor's."""
        if state.get("kind") != "topk" or state.get("fraction") != self.fraction:
            raise ValueError(
                f"checkpoint's compressor state is {state.get('kind')!r} {state.get('fraction')!r}; "
                f"this run compresses with topk {self.fraction}"
            )
        self.error = {int(i): t.clone() for i, t in state["error"].items()}
