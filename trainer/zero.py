"""A sharded optimizer (ZeRO stage 1 and 2) on ringcomm's reduce_scatter and all_gather.

Plain data parallelism keeps P full copies of the optimizer state (SGD's
momentum: one float per parameter; AdamW's two moments: two). ZeRO
(Rajbhandari et al., 2020) gives each rank 1/P of it: rank r owns one block of
the parameters, keeps the optimizer state of that block only and steps it
alone. The communication is an all-reduce taken apart::

    all-reduce(grad)   =   reduce-scatter(grad)       then   all-gather(...)
    plain DDP:             (both halves on the gradient, inside backward)
    ZeRO:                  reduce-scatter(grad) -> rank r steps block r -> all-gather(params)

so the bytes on the wire are the ring all-reduce's, 2(P-1)/P * M per rank (see
``ringcomm/cost.py``), and the optimizer state per rank is 1/P of it.

The layout. The model's parameters (after rank 0's weights were broadcast,
before DDP wraps the model) are copied into one flat buffer per dtype (all
float32 here) and become views of it (``p.data = flat[offset:offset+n]``),
so the model reads the all-gathered values in place. The buffer is padded with
zeros to a multiple of P, ``padded = ceil(numel / P) * P``, and cut into P
contiguous blocks of ``padded / P`` elements: block r, ``[r*n, (r+1)*n)``, is
rank r's. That is how uneven sizes work: the collectives need equal blocks
(``input.numel() == P * output.numel()``), and the padding (fewer than P
elements, all at the end, so inside the last ranks' blocks) is a parameter
that is 0, whose gradient is 0, which SGD (weight decay of 0 is 0) and AdamW
(a zero moment gives a zero update) leave at 0. ``shard_bounds`` is the rule,
and tests/test_zero.py proves it partitions the parameters exactly.

One step, on every rank::

    backward()                 DDP's buckets fill; the comm hook (trainer/hooks.py's local_grad_hook) returns each
                               bucket as it is: no communication inside backward
    flat_grad = cat(p.grad)    this rank's own gradient, padded             (M floats)
    reduce_scatter(avg)        -> shard_grad: block r of the mean gradient   (M/P floats)
    [--zero 2: drop p.grad and flat_grad: only shard_grad is left]
    inner.step()               torch's SGD/AdamW over one flat shard parameter (M/P floats + its state)
    all_gather(flat, shard)    every rank's updated block into the buffer the model views

What overlaps and what does not. Nothing of the optimizer's communication
overlaps computation in this design: backward runs with no communication, and
the reduce-scatter, the step and the all-gather run one after the other after
it, on the training thread (blocking calls). Plain ring training instead
overlaps each bucket's all-reduce with the rest of backward, so ZeRO here pays
the whole communication time on the critical path; the next steps would be a
reduce-scatter per bucket inside the hook (buckets do not line up with the
blocks, so it needs a per-bucket layout) and an all-gather waited for in a
forward pre-hook of the next step (it would overlap the next batch's loading).

What ``--zero 2`` frees, and what it cannot. After the reduce-scatter, the
gradients outside this rank's block are dropped: every ``p.grad`` is set to
None and the padded flat gradient is released, so between the reduce-scatter
and the next backward the rank holds its M/P block of the gradient, not M.
DDP's own buffers still hold a full gradient: its buckets (``M`` floats, the
gradients are copied into them in backward, then back into ``p.grad``) live for
the life of the DDP wrapper. So during backward a rank holds ``p.grad`` plus
DDP's buckets (2M) under either stage; stage 2 lowers the memory between
steps, and the peak (``ru_maxrss``) only where something else is allocated
between the reduce-scatter and the next backward. A stage 2 that lowers the
peak needs DDP out of the gradient path (``gradient_as_bucket_view`` and a
hook that reduce-scatters per bucket).

The algorithms. The collectives have their own algorithms (``ring``, ``rhd``
/ ``rd``, ``auto``). ``--algo ring`` and ``ring_simple`` use the ring's,
``--algo rhd`` recursive halving and doubling (P a power of two), and every
other all-reduce algorithm (``ps``, ``naive``, ``rd``, ``tree``...) has no
reduce-scatter of its own, so it uses ``auto`` (the cost model picks per call):
``collective_algos`` says which.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import ringcomm

__all__ = [
    "STAGES",
    "ZeroOptimizer",
    "collective_algos",
    "flatten_parameters",
    "optimizer_state_bytes",
    "padded_numel",
    "peak_memory_bytes",
    "shard_bounds",
]

STAGES = (0, 1, 2)  # --zero: 0 off, 1 optimizer state sharded, 2 also the gradient after its reduce-scatter


def padded_numel(numel: int, world_size: int) -> int:
    """``numel`` rounded up to a multiple of ``world_size`` (elements): the flat buffer's length."""
    if numel < 0 or world_size < 1:
        raise ValueError(f"padded_numel: numel {numel} and world size {world_size}; need numel >= 0, P >= 1")
    return -(-numel // world_size) * world_size


def shard_bounds(numel: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s block of a flat buffer of ``numel`` elements: ``[lo, hi)`` in the padded buffer.

    Every block is ``padded_numel(numel, P) / P`` elements; ``hi`` may pass ``numel`` (padding) on the
    last ranks, by fewer than P elements in all.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_bounds: rank {rank} outside a world of {world_size}")
    n = padded_numel(numel, world_size) // world_size
    return rank * n, (rank + 1) * n


def collective_algos(algo: str) -> tuple[str, str]:
    """The (reduce_scatter, all_gather) algorithms ZeRO uses for the training ``--algo`` (module docstring)."""
    if algo in ("ring", "ring_simple"):
        return "ring", "ring"
    if algo == "rhd":
        return "rhd", "rd"
    return "auto", "auto"


@dataclass
class _Flat:
    """The parameters of one dtype and device as one padded flat buffer, and this rank's block of it."""

    params: list[nn.Parameter]  # in model order; each a view of ``buffer``
    numel: int  # elements of the parameters, without padding
    buffer: torch.Tensor  # padded_numel(numel, P) elements; the model's parameters view it
    lo: int  # this rank's block: buffer[lo:hi]
    hi: int
    shard: nn.Parameter  # a copy of buffer[lo:hi], which the inner optimizer steps


def flatten_parameters(params: Iterable[nn.Parameter], world_size: int, rank: int) -> list[_Flat]:
    """Move ``params`` into one padded flat buffer per (dtype, device); each becomes a view of it.

    Call it before DDP wraps the model (DDP keeps the parameter objects, which stay the same; only
    their storage moves). Returns the buffers, in the order their dtypes first appear.
    """
    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            groups.setdefault((p.dtype, p.device), []).append(p)
    flats = []
    with torch.no_grad():
        for (dtype, device), ps in groups.items():
            numel = sum(p.numel() for p in ps)
            buffer = torch.zeros(padded_numel(numel, world_size), dtype=dtype, device=device)
            offset = 0
            for p in ps:
                buffer[offset : offset + p.numel()].copy_(p.reshape(-1))
                p.data = buffer[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            lo, hi = shard_bounds(numel, world_size, rank)
            flats.append(_Flat(ps, numel, buffer, lo, hi, nn.Parameter(buffer[lo:hi].clone())))
    return flats


class ZeroOptimizer:
    """Steps this rank's block of the parameters with ``inner``; the rest arrive by all-gather.

    Quacks like the torch optimizer the loop used before (``step``, ``zero_grad``,
    ``param_groups``, ``state_dict``, ``load_state_dict``); build the LR scheduler on
    ``self.inner`` (``param_groups`` is its list, so the rates are shared).

    Args:
        flats: ``flatten_parameters``'s buffers (the model's parameters already view them).
        make_inner: builds the torch optimizer over a list of parameters (the shards, one per buffer).
        stage: 1 (state sharded) or 2 (gradient too, after its reduce-scatter).
        algo: the training ``--algo``; ``collective_algos`` maps it to the collectives'.
        transport, timeout: as the comm hook's.
    """

    def __init__(
        self,
        flats: list[_Flat],
        make_inner: Any,
        *,
        stage: int,
        algo: str = "ring",
        transport: str = "torch",
        timeout: float | None = None,
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(f"ZeroOptimizer: stage {stage}; expected 1 or 2")
        self.flats = flats
        self.stage = stage
        self.rs_algo, self.ag_algo = collective_algos(algo)
        self.transport = transport
        self.timeout = timeout
        self.inner: torch.optim.Optimizer = make_inner([f.shard for f in flats])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every gradient: the model's and the shards'."""
        for f in self.flats:
            for p in f.params:
                p.grad = None
            f.shard.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Reduce-scatter the gradients, step this rank's block, all-gather the parameters (module docstring).

        Collective: every rank, once per training step, after ``backward()``.
        """
        for f in self.flats:
            flat_grad = torch.zeros_like(f.buffer)  # the padding's gradient is 0
            offset = 0
            for p in f.params:
                if p.grad is not None:  # an unused parameter's gradient is 0
                    flat_grad[offset : offset + p.numel()].copy_(p.grad.reshape(-1))
                offset += p.numel()
            shard_grad = torch.empty_like(f.shard)
            ringcomm.reduce_scatter(
                shard_grad, flat_grad, "avg", algo=self.rs_algo, transport=self.transport, timeout=self.timeout
            )
            if self.stage == 2:  # keep only this rank's block of the gradient
                del flat_grad
                for p in f.params:
                    p.grad = None
            f.shard.grad = shard_grad
        self.inner.step()
        for f in self.flats:
            ringcomm.all_gather(
                f.buffer, f.shard.detach(), algo=self.ag_algo, transport=self.transport, timeout=self.timeout
            )

    # --- checkpoints: rank 0 gathers (trainer/checkpoint.py says why) -------------------------------

    def gathered_state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state with every per-element tensor gathered to its full length.

        Collective (ringcomm.all_gather per state tensor). The tensors are trimmed to the parameters'
        ``numel`` (no padding), so the result does not depend on P; scalars (AdamW's ``step``) are
        the same on every rank and kept as they are.
        """
        sd = self.inner.state_dict()
        state: dict[int, dict[str, Any]] = {}
        for i, f in enumerate(self.flats):
            entry: dict[str, Any] = {}
            for key, value in sorted(sd["state"].get(i, {}).items()):
                if torch.is_tensor(value) and value.numel() == f.shard.numel() and value.dim() == 1:
                    full = torch.empty_like(f.buffer, dtype=value.dtype)
                    ringcomm.all_gather(
                        full, value.contiguous(), algo=self.ag_algo, transport=self.transport, timeout=self.timeout
                    )
                    entry[key] = full[: f.numel].clone()
                else:
                    entry[key] = value
            state[i] = entry
        return {"state": state, "param_groups": sd["param_groups"], "numels": [f.numel for f in self.flats]}

    def state_dict(self) -> dict[str, Any]:
        """This rank's own state (not gathered): for callers that keep shards themselves."""
        return self.inner.state_dict()

    def load_gathered_state_dict(self, sd: dict[str, Any]) -> None:
        """Take this rank's block of ``gathered_state_dict``'s result (from any world size)."""
        numels = [f.numel for f in self.flats]
        if sd.get("numels") != numels:
            raise ValueError(f"ZeRO optimizer state for parameter buffers of {sd.get('numels')} elements, not {numels}")
        state: dict[int, dict[str, Any]] = {}
        for i, f in enumerate(self.flats):
            entry: dict[str, Any] = {}
            for key, value in sd["state"].get(i, {}).items():
                if torch.is_tensor(value) and value.dim() == 1 and value.numel() == f.numel:
                    padded = torch.zeros(f.buffer.numel(), dtype=value.dtype, device=f.buffer.device)
                    padded[: f.numel].copy_(value)
                    entry[key] = padded[f.lo : f.hi].clone()
                else:
                    entry[key] = value
            state[i] = entry
        self.inner.load_state_dict({"state": state, "param_groups": sd["param_groups"]})

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.inner.load_state_dict(sd)

    @torch.no_grad()
    def sync_shards(self) -> None:
        """Copy each shard back from the flat buffer (after the model's weights were loaded into it)."""
        for f in self.flats:
            f.shard.copy_(f.buffer[f.lo : f.hi])


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer state this rank holds (its tensors: momentum, moments, step counters)."""
    inner = optimizer.inner if isinstance(optimizer, ZeroOptimizer) else optimizer
    total = 0
    for entry in inner.state.values():
        for value in entry.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def peak_memory_bytes() -> int:
    """The process's peak resident set (``ru_maxrss``), in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
