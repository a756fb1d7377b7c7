r"""Top-k sparsification with error feedback: each rank sends its k largest entries, all gathered.

Not linear (the sum of two ranks' top-k is not the top-k of their sum), so it cannot ride an
all-reduce: each rank gathers every rank's (values, indices) with ``ringcomm.all_gather`` and sums
them locally, the same way on every rank (rank order), so every rank holds the same average.
Per gradient g of a matrix or kernel (N entries), the parameters of a bucket sent together::

    g  <- g + e                          error feedback
    i  =  top-k of |g|  (k: see below)   this rank's k entries: values g[i], indices i
    all_gather(values), all_gather(i)    P·k of each, in rank order (one pair of calls a bucket)
    out = Σ_ranks scatter(values at i) / P
    e  <- g − scatter(g[i] at i)         what this rank did not send, kept for the next step

Why per parameter, not per bucket: DDP's first step runs with one bucket layout and rebuilds it
after (simplecnn: one bucket of 13 parameters, then two), and a run resumed from a checkpoint starts
again with the first. Chosen and kept per parameter, the entries sent, the sums (element by
element, in rank order) and the error feedback do not depend on the layout, so a resumed run
continues the uninterrupted one bit for bit. (Per bucket, the resumed run's first step dropped the
saved error feedback and the next step added a stale one.)

**One budget for the model, shared by energy.** With ``sizes`` (every sparsified parameter's entry
count, as the training hook passes), a step sends k = ⌈F·Σ N⌉ entries in all, not ⌈F·N⌉ of each
parameter: parameter i gets its share of the last step's gradient energy,

    k_i = ⌈F·ΣN · E_i / Σ_j E_j⌉  (at least 1, at most N_i),   E_i = mean over ranks of |g_i + e_i|²

which comes close to one top-k over the whole model (a fixed 1 % of every parameter starved the
layers with the largest gradients: docs/compression.md) and yet does not depend on the bucket layout:
E is last step's (the warm-up's last average, then each step's), the same on every rank (averaged in
the vectors' all-reduce, a few floats a bucket), and saved with the error feedback.

**Vectors are averaged whole.** Biases and BatchNorm's scale and shift (simplecnn: 586 of 1,143,466
entries) go in one all-reduce, as PowerSGD leaves them: 1 % of a 64-entry vector is one entry a step,
and these few entries set the scale of whole layers. Only matrices and convolution kernels are
sparsified (``sparsifies``).

**Warm-up.** The first ``warmup_steps`` steps are averaged uncompressed, with an all-reduce, as
PowerSGD's are (and as Deep Gradient Compression, Lin et al. 2018, ramps its sparsity up over the
first epochs): the gradients change fastest then, and the residuals that error feedback piles up
while 1 % of each parameter goes out come back in bursts. Without it, from the same seed and 60 steps,
the loss rose from 1.6 at step 6 to 3.8 at step 13 (docs/compression.md).

**Bytes** (``cost.topk_bytes_sent``, per sparsified parameter): a ring all_gather sends (P−1)·k·(4 + 4)
bytes per rank (float32 values, int32 indices) against the ring all-reduce's 2(P−1)/P·4N: a ratio of
P·k·8/(8N) = P·F (k rounded up per parameter: at most one entry more each). At P = 4 and F = 0.01,
4 %, plus the all-reduce of the vectors and of one energy per matrix. A parameter server cannot
gather: ``algo="ps"`` is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
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

    def __init__(self, fraction: float, *, warmup_steps: int = 10, sizes: Mapping[int, int] | None = None) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"topk fraction={fraction!r}: expected a number in (0, 1]")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"topk warmup_steps={warmup_steps!r}: expected an integer >= 0")
        self.fraction = float(fraction)
        self.warmup_steps = warmup_steps
        self.step = 0  # steps completed (``end_step``)
        self.error: dict[int, torch.Tensor] = {}  # parameter index -> e (its gradient's entries, flattened)
        # the model's sparsified parameters, index -> entries: the one budget ⌈F·ΣN⌉ (None: ⌈F·N⌉ each)
        self.sizes = dict(sizes) if sizes is not None else None
        self.energy: dict[int, float] = {}  # parameter index -> E_i of the last completed step
        self._energy_now: dict[int, float] = {}  # this step's, becoming ``energy`` at ``end_step``

    @staticmethod
    def sparsifies(shape: Sequence[int]) -> bool:
        """Whether a gradient of ``shape`` is sent as its top k: matrices and kernels, not vectors."""
        return len(shape) >= 2

    def k(self, numel: int, index: int | None = None) -> int:
        """Entries sent of parameter ``index``'s gradient of ``numel`` entries: its share of the model's
        budget by last step's energy (with ``sizes``, once a step has been averaged), else ⌈F·N⌉; at least 1."""
        total = sum(self.energy[i] for i in sorted(self.energy))  # a fixed order: the same bits everywhere
        if self.sizes is None or index not in self.energy or not total > 0:
            return max(1, min(numel, math.ceil(self.fraction * numel)))
        budget = self.fraction * sum(self.sizes.values())
        return max(1, min(numel, math.ceil(budget * self.energy[index] / total)))

    def reduce(
        self,
        flat: torch.Tensor,
        params: Sequence[tuple[int, torch.Size]],
        all_gather: AllGather,
        world: int,
        all_reduce: AllReduce | None = None,
    ) -> None:
        """Average ``flat`` (the float32 gradients of ``params``, (index, shape) each, back to back) in place,
        sending k entries of each matrix (``k``) and every vector whole (``all_reduce``); during the
        warm-up, everything with ``all_reduce``."""
        warm = self.step < self.warmup_steps
        views = _views(flat, params)
        plain = [v for _, shape, _, v in views if not self.sparsifies(shape)]
        mats = [(index, offset, g) for index, shape, offset, g in views if self.sparsifies(shape)]
        shares = self.sizes is not None and bool(mats)  # the matrices' energies travel too
        if not warm:
            for index, _, g in mats:  # error feedback first: the energy is that of what may be sent
                e = self.error.get(index)
                if e is not None and e.numel() == g.numel():
                    g.add_(e)
        if warm or plain or shares:
            if all_reduce is None:
                why = (
                    f"in its {self.warmup_steps}-step warm-up" if warm
                    else "averaging vectors whole" if plain else "sharing its budget by energy"
                )
                raise ValueError(f"top-k is {why}: it needs all_reduce")
            if warm:
                all_reduce(flat, "avg")
                if shares and self.step == self.warmup_steps - 1:  # the first compressed step's shares
                    for index, _, g in mats:
                        self._energy_now[index] = float(g.pow(2).sum())
                return
            # one all-reduce, first on every rank (then the gathers): the vectors, and each matrix's |g + e|²
            energy = [torch.stack([g.pow(2).sum() for _, _, g in mats])] if shares else []
            joined = torch.cat([*plain, *energy])
            all_reduce(joined, "avg")
            start = 0
            for v in plain:
                v.copy_(joined[start : start + v.numel()])
                start += v.numel()
            if shares:
                for (index, _, _), e_i in zip(mats, joined[start:].tolist()):
                    self._energy_now[index] = e_i
        chosen: list[torch.Tensor] = []  # per sparsified parameter: its entries sent, as positions in flat
        for index, offset, g in mats:
            top = g.abs().topk(self.k(g.numel(), index), sorted=False).indices.sort().values  # sorted: deterministic
            residual = g.clone()
            residual[top] = 0
            self.error[index] = residual
            chosen.append(top + offset)
        if not chosen:
            return
        index = torch.cat(chosen)
        k = index.numel()  # the same on every rank: the same bucket layout everywhere
        values = flat[index].contiguous()
        idx32 = index.to(torch.int32)
        all_values = torch.empty(world * k, dtype=flat.dtype, device=flat.device)
        all_index = torch.empty(world * k, dtype=torch.int32, device=flat.device)
        all_gather(all_values, values)
        all_gather(all_index, idx32)
        summed = torch.zeros_like(flat)
        for r in range(world):  # rank order: the same sum on every rank
            summed.index_add_(0, all_index[r * k : (r + 1) * k].long(), all_values[r * k : (r + 1) * k])
        for _, offset, g in mats:  # the matrices' averages; the vectors keep theirs
            g.copy_(summed[offset : offset + g.numel()]).div_(world)

    def end_step(self) -> None:
        """Count one training step (the warm-up's clock); this step's energies become the shares' basis."""
        self.step += 1
        if self._energy_now:
            self.energy, self._energy_now = self._energy_now, {}

    def state_dict(self) -> dict[str, Any]:
        """The step and the error feedback per parameter index: what a resumed run needs to continue bit for bit."""
        return {
            "kind": "topk",
            "fraction": self.fraction,
            "per": "parameter",
            "step": self.step,
            "error": {i: t.clone() for i, t in self.error.items()},
            "energy": dict(self.energy),
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
        self.energy = {int(i): float(e) for i, e in state.get("energy", {}).items()}  # older files: none yet


def _views(
    flat: torch.Tensor, params: Sequence[tuple[int, torch.Size]]
) -> list[tuple[int, torch.Size, int, torch.Tensor]]:
    """(index, shape, offset in ``flat``, its slice of ``flat``) per parameter, back to back."""
    out, offset = [], 0
    for index, shape in params:
        out.append((index, shape, offset, flat[offset : offset + shape.numel()]))
        offset += shape.numel()
    return out
