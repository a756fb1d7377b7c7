r"""PowerSGD (Vogels et al., NeurIPS 2019): each gradient matrix sent as two thin factors, P and Q.

A gradient of shape (n, ...) is viewed as an n×m matrix M (m the product of the other dimensions).
With rank r, one step of power iteration, warm-started from the last step's Q::

    M  <- M + e                      error feedback: what earlier steps failed to send
    P  =  M·Q            (n×r)       all_reduce(P, sum)       <- linear: any ringcomm algorithm
    P  <- orthonormalise(P)          the same on every rank (same summed P)
    Q  =  Mᵀ·P           (m×r)       all_reduce(Q, sum)
    M̂  =  P·Qᵀ / world              the average's rank-r approximation, on every rank
    e  <- M − M̂                      kept for the next step (this rank's own)

Q is kept between steps (the warm start: one iteration per step is enough once Q tracks M's top
subspace), seeded alike on every rank at first. A matrix is compressed only when it gains: when
(n+m)·r·``min_gain`` <= n·m; vectors (biases, BatchNorm) and small matrices are averaged as they
are, in one all-reduce. ``min_gain`` is 5 (PyTorch's ``powerSGD_hook`` compresses from 2): a matrix
whose factors are more than a fifth of it is one whose rank is not much above r, and r of its few
directions lose much of it for a saving the link never sees. Simplecnn's classifier (10×128) sends
276 of its 1,280 entries at rank 2, 0.09 % of the model's bytes saved; averaged whole instead, the
loss after 60 steps fell from 11.9 % to 7.4 % above uncompressed training's (docs/compression.md).
The first ``warmup_steps`` steps send everything uncompressed (the gradients
change fast early on, and DDP rebuilds its buckets after the first step).

**Bytes** (``cost.powersgd_elements``): Σ (n+m)·r elements per compressed matrix, plus the
uncompressed elements, each all-reduced: for a ring, 2(P−1)/P·4 bytes per element per rank.

State (Q and e) is kept per parameter, by its index among the model's parameters, so it is the
same whatever the bucket layout, and ``state_dict``/``load_state_dict`` carry it through a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["PowerSGD", "orthonormalise"]

#: ``all_reduce(tensor, op)`` in place: ringcomm.all_reduce with the run's algorithm and transport bound.
AllReduce = Callable[[torch.Tensor, str], Any]


def orthonormalise(p: torch.Tensor) -> None:
    """Make the columns of ``p`` (n×r) orthonormal in place: Gram-Schmidt, in float32.

    Deterministic arithmetic (the same bits on every rank that holds the same ``p``); a column
    that is (numerically) zero stays zero instead of becoming NaN.
    """
    for i in range(p.shape[1]):
        col = p[:, i]
        if i:
            prev = p[:, :i]
            col -= prev @ (prev.T @ col)
        norm = torch.linalg.vector_norm(col)
        col /= norm if norm > 1e-12 else 1.0


class PowerSGD:
    """Rank-``rank`` PowerSGD with error feedback and warm start, over any linear all-reduce.

    Args:
        rank: r, the factors' width (``powersgd:R``).
        warmup_steps: steps averaged uncompressed before compression starts.
        min_gain: compress a matrix only if n·m >= min_gain·(n+m)·r.
        seed: Q's first values (the same on every rank).
    """

    def __init__(self, rank: int, *, warmup_steps: int = 10, min_gain: float = 5.0, seed: int = 0) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"powersgd rank={rank!r}: expected an integer >= 1")
        self.rank, self.warmup_steps, self.min_gain, self.seed = rank, warmup_steps, min_gain, seed
        self.step = 0  # steps completed (``end_step``)
        self.q: dict[int, torch.Tensor] = {}  # parameter index -> Q (m×r)
        self.error: dict[int, torch.Tensor] = {}  # parameter index -> e (the gradient's shape, flattened)

    def compresses(self, shape: Sequence[int]) -> bool:
        """Whether a gradient of ``shape`` is sent as factors (once the warm-up is over)."""
        if len(shape) < 2:
            return False
        n = int(shape[0])
        m = int(torch.Size(shape[1:]).numel())
        return n * m >= self.min_gain * (n + m) * self.rank

    def reduce(
        self, flat: torch.Tensor, params: Sequence[tuple[int, torch.Size]], all_reduce: AllReduce, world: int
    ) -> None:
        """Average ``flat`` (the gradients of ``params``, (index, shape) each, back to back) in place."""
        if self.step < self.warmup_steps:
            all_reduce(flat, "avg")
            return
        plain: list[torch.Tensor] = []
        mats: list[tuple[int, torch.Tensor]] = []  # (parameter index, n×m view into flat)
        offset = 0
        for index, shape in params:
            numel = shape.numel()
            view = flat[offset : offset + numel]
            offset += numel
            if self.compresses(shape):
                mats.append((index, view.view(shape[0], -1)))
            else:
                plain.append(view)
        if plain:  # one all-reduce for every tensor too small to gain
            joined = torch.cat(plain)
            all_reduce(joined, "avg")
            start = 0
            for v in plain:
                v.copy_(joined[start : start + v.numel()])
                start += v.numel()
        if not mats:
            return
        r = self.rank
        for index, m in mats:
            e = self.error.get(index)
            if e is not None and e.numel() == m.numel():
                m.add_(e.view_as(m))
            if index not in self.q or self.q[index].shape != (m.shape[1], r):
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
                self.q[index] = torch.randn(m.shape[1], r, generator=g).to(m.device, m.dtype)
        ps = torch.cat([(m @ self.q[i]).view(-1) for i, m in mats])
        all_reduce(ps, "sum")
        start = 0
        p_of: list[torch.Tensor] = []
        for _, m in mats:
            p = ps[start : start + m.shape[0] * r].view(m.shape[0], r)
            start += m.shape[0] * r
            orthonormalise(p)
            p_of.append(p)
        qs = torch.cat([(m.T @ p).view(-1) for (_, m), p in zip(mats, p_of)])
        all_reduce(qs, "sum")
        start = 0
        for (index, m), p in zip(mats, p_of):
            q = qs[start : start + m.shape[1] * r].view(m.shape[1], r)
            start += m.shape[1] * r
            approx = (p @ q.T).div_(world)
            self.error[index] = (m - approx).reshape(-1).clone()  # this rank's input minus what was sent
            self.q[index] = q.clone()  # the warm start of the next step (the same on every rank)
            m.copy_(approx)

    def end_step(self) -> None:
        """Count one training step (the warm-up's clock)."""
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit: step, Q and e per parameter."""
        return {
            "kind": "powersgd",
            "rank": self.rank,
            "step": self.step,
            "q": {i: t.clone() for i, t in self.q.items()},
            "error": {i: t.clone() for i, t in self.error.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; ValueError if it is another compressor's or rank's."""
        if state.get("kind") != "powersgd" or state.get("rank") != self.rank:
            raise ValueError(
                f"checkpoint's compressor state is {state.get('kind')!r} rank {state.get('rank')!r}; "
                f"this run compresses with powersgd rank {self.rank}"
            )
        self.step = int(state["step"])
        self.q = {int(i): t.clone() for i, t in state["q"].items()}
        self.error = {int(i): t.clone() for i, t in state["error"].items()}
