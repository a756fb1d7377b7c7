r"""Top-k sparsification with error feedback: each rank sends its k largest entries, all gathered.

Not linear (the sum of two ranks' top-k is not the top-k of their sum), so it cannot ride an
all-reduce: each rank gathers every rank's (values, indices) with ``ringcomm.all_gather`` and sums
them locally, the same way on every rank (rank order), so every rank holds the same average.
Per gradient g of a parameter (N entries), the parameters of a bucket sent together::

    g  <- g + e                          error feedback
    i  =  top-k of |g|  (k = ⌈F·N⌉)      this rank's k entries: values g[i], indices i
    all_gather(values), all_gather(i)    P·k of each, in rank order (one pair of calls a bucket)
    out = Σ_ranks scatter(values at i) / P
    e  <- g − scatter(g[i] at i)         what this rank did not send, kept for the next step

Why per parameter, not per bucket: DDP's first step runs with one bucket layout and rebuilds it
after (simplecnn: one bucket of 13 parameters, then two), and a run resumed from a checkpoint starts
again with the first. Chosen and kept per parameter, the entries sent, the sums (element by
element, in rank order) and the error feedback do not depend on the layout, so a resumed run
continues the uninterrupted one bit for bit. (Per bucket, the resumed run's first step dropped the
saved error feedback and the next step added a stale one.)

**Warm-up.** The first ``warmup_steps`` steps are averaged uncompressed, with an all-reduce, as
PowerSGD's are (and as Deep Gradient Compression, Lin et al. 2018, ramps its sparsity up over the
first epochs): the gradients change fastest then, and the residuals that error feedback piles up
while 1 % of each parameter goes out come back in bursts. Without it, from the same seed and 60 steps,
the loss rose from 1.6 at step 6 to 3.8 at step 13 (docs/compression.md).

**Bytes** (``cost.topk_bytes_sent``, per parameter): a ring all_gather sends (P−1)·k·(4 + 4) bytes per
rank (float32 values, int32 indices) against the ring all-reduce's 2(P−1)/P·4N: a ratio of
P·k·8/(8N) = P·F (k rounded up per parameter: at most one entry more each). At P = 4 and F = 0.01,
4 %. A parameter server cannot gather: ``algo="ps"`` is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["TopK"]

#: ``all_gather(output, input)``: ringcomm.all_gather with the run's algorithm and transport bound.
AllGather = Callable[[torch.Tensor, torch.Tensor], Any]
#: ``all_reduce(tensor, op)`` in place (the warm-up's): ringcomm.all_reduce with the run's algorithm bound.
AllReduce = Callable[[torch.Tensor, str], Any]


class TopK:
    """Top-``fraction`` sparsification with error feedback, per parameter (sent a bucket at a time).

    Args:
        fraction: F, the share of each parameter's entries sent (``topk:F``), 0 < F <= 1.
        warmup_steps: steps averaged uncompressed (an all-reduce) before the sparsification starts.
    """

    def __init__(self, fraction: float, *, warmup_steps: int = 10) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"topk fraction={fraction!r}: expected a number in (0, 1]")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"topk warmup_steps={warmup_steps!r}: expected an integer >= 0")
        self.fraction = float(fraction)
        self.warmup_steps = warmup_steps
        self.step = 0  # steps completed (``end_step``)
        self.error: dict[int, torch.Tensor] = {}  # parameter index -> e (its gradient's entries, flattened)

    def k(self, numel: int) -> int:
        """Entries sent of a gradient of ``numel`` entries: ⌈F·N⌉, at least 1."""
        return max(1, min(numel, math.ceil(self.fraction * numel)))

    def reduce(
        self,
        flat: torch.Tensor,
        params: Sequence[tuple[int, torch.Size]],
        all_gather: AllGather,
        world: int,
        all_reduce: AllReduce | None = None,
    ) -> None:
        """Average ``flat`` (the float32 gradients of ``params``, (index, shape) each, back to back) in place,
        sending k = ⌈F·N⌉ entries of each parameter's N; during the warm-up, all of them with ``all_reduce``."""
        if self.step < self.warmup_steps:
            if all_reduce is None:
                raise ValueError(f"top-k is in its {self.warmup_steps}-step warm-up: it needs all_reduce")
            all_reduce(flat, "avg")
            return
        chosen: list[torch.Tensor] = []  # per parameter: its entries sent, as positions in flat
        offset = 0
        for index, shape in params:
            numel = shape.numel()
            g = flat[offset : offset + numel]
            e = self.error.get(index)
            if e is not None and e.numel() == numel:
                g.add_(e)
            top = g.abs().topk(self.k(numel), sorted=False).indices.sort().values  # sorted: deterministic
            residual = g.clone()
            residual[top] = 0
            self.error[index] = residual
            chosen.append(top + offset)
            offset += numel
        index = torch.cat(chosen) if chosen else torch.empty(0, dtype=torch.long, device=flat.device)
        k = index.numel()  # the same on every rank: the same bucket layout everywhere
        values = flat[index].contiguous()
        idx32 = index.to(torch.int32)
        all_values = torch.empty(world * k, dtype=flat.dtype, device=flat.device)
        all_index = torch.empty(world * k, dtype=torch.int32, device=flat.device)
        all_gather(all_values, values)
        all_gather(all_index, idx32)
        flat.zero_()
        for r in range(world):  # rank order: the same sum on every rank
            flat.index_add_(0, all_index[r * k : (r + 1) * k].long(), all_values[r * k : (r + 1) * k])
        flat.div_(world)

    def end_step(self) -> None:
        """Count one training step (the warm-up's clock)."""
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        """The step and the error feedback per parameter index: what a resumed run needs to continue bit for bit."""
        return {
            "kind": "topk",
            "fraction": self.fraction,
            "per": "parameter",
            "step": self.step,
            "error": {i: t.clone() for i, t in self.error.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; ValueError if it is another compressor's."""
        if state.get("kind") != "topk" or state.get("fraction") != self.fraction:
            raise ValueError(
                f"checkpoint's compressor state is {state.get('kind')!r} {state.get('fraction')!r}; "
                f"this run compresses with topk {self.fraction}"
            )
        if state.get("per") != "parameter":  # earlier files: per bucket, keyed by its first parameter
            raise ValueError(
                "checkpoint's top-k error feedback is per bucket (written before it was kept per "
                "parameter); it cannot be continued exactly: start the run again"
            )
        # written before top-k had a warm-up: it compressed from its first step, so it is past any
        self.step = int(state.get("step", self.warmup_steps))
        self.error = {int(i): t.clone() for i, t in state["error"].items()}
