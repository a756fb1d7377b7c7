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
before DDP wraps the model) are cut into buckets (``bucket_bytes`` each, about;
grouped from the last parameter back, as DDP groups its own, so the first
bucket backward finishes is the last one) and each bucket is copied into a flat
buffer of its own; the parameters become views of it
(``p.data = flat[offset:offset+n]``), so the model reads the all-gathered values
in place. A buffer is padded with zeros to a multiple of P,
``padded = ceil(numel / P) * P``, and cut into P contiguous blocks of
``padded / P`` elements: block r, ``[r*n, (r+1)*n)``, is rank r's. Rank r's
shard is block r of every bucket. That is how uneven sizes work: the
collectives need equal blocks (``input.numel() == P * output.numel()``), and
the padding (fewer than P elements a bucket, at its end, so inside the last
ranks' blocks) is a parameter that is 0, whose gradient is 0, which SGD (weight
decay of 0 is 0) and AdamW (a zero moment gives a zero update) leave at 0.
``shard_bounds`` is the rule, and tests/test_zero.py proves it partitions the
parameters exactly.

One step, on every rank (B buckets, M floats in all)::

    forward                    each module first waits for its bucket's all-gather of the last step
    backward()                 DDP hands its buckets to the comm hook (trainer/hooks.py's zero_hook) as they
                               fill; the hook copies their gradients into the ZeRO buckets' gradient buffers,
                               and as soon as a ZeRO bucket is whole queues its reduce-scatter (mean) on
                               ringcomm's comm thread: block r of bucket b -> shard_grad[b]   (M/P floats in all)
                               [--zero 2: that bucket's gradient buffer is freed when its reduce-scatter is done]
    (DDP waits for the hook's futures at the end of backward: every reduce-scatter is done)
    inner.step()               torch's SGD/AdamW over the B shard parameters (M/P floats + their state)
    all_gather_async(b)        for every bucket, in model order: returns at once; the next forward waits

What overlaps. The reduce-scatter of a bucket runs on the comm thread while
backward computes the earlier layers' gradients, as the ring hook's all-reduce
does; what backward cannot hide is the last bucket's. The all-gathers run
while the loop reads the loss, loads the next batch and runs the first layers
of the next forward: a module waits only for its own bucket, and the buckets
are gathered in the order forward uses them. Reading the weights any other
way (a checkpoint, ``state_dict``) must first call ``wait_params``.

What ``--zero 2`` frees, and what it cannot. Stage 1 keeps one gradient buffer
per bucket for the run (M floats, padded), as plain data parallelism keeps its
gradients. Stage 2 allocates a bucket's gradient buffer when the bucket's first
gradient arrives in backward and drops it as soon as the bucket's
reduce-scatter is done, so at most the buckets in flight are held, and after
backward only the M/P-float block of the reduced gradient. What neither stage
can drop are DDP's own buckets: DDP copies every gradient into its bucket
buffers (M floats, for the life of the wrapper) before it calls the hook. With
``gradient_as_bucket_view`` (the loop sets it for ``--zero``) each ``p.grad`` is
a view of those buckets, not another M floats. So a rank holds, besides the
weights, M floats of DDP's buckets under either stage, plus M under stage 1
(its gradient buffers): stage 2's peak is about M floats lower.

The algorithms. The collectives have their own algorithms (``ring``, ``rhd``
/ ``rd``, ``auto``). ``--algo ring`` and ``ring_simple`` use the ring's,
``--algo rhd`` recursive halving and doubling (P a power of two), and every
other all-reduce algorithm (``ps``, ``naive``, ``rd``, ``tree``...) has no
reduce-scatter of its own, so it uses ``auto`` (the cost model picks per call):
``collective_algos`` says which.
"""

from __future__ import annotations

import functools
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import ringcomm

__all__ = [
    "BUCKET_BYTES",
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
# About how many bytes of parameters one ZeRO bucket holds (the loop's choice): small enough that
# backward finishes a bucket, and its reduce-scatter starts, while earlier layers still compute;
# large enough that a collective's fixed cost (2(P-1) message latencies) stays small beside its bytes.
BUCKET_BYTES = 4 * 2**20


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
    """One bucket of parameters (one dtype and device) as one padded flat buffer, and this rank's block of it."""

    params: list[nn.Parameter]  # in model order; each a view of ``buffer``
    numel: int  # elements of the parameters, without padding
    buffer: torch.Tensor  # padded_numel(numel, P) elements; the model's parameters view it
    lo: int  # this rank's block: buffer[lo:hi]
    hi: int
    shard: nn.Parameter  # a copy of buffer[lo:hi], which the inner optimizer steps


def _buckets(params: list[nn.Parameter], bucket_bytes: int | None) -> list[list[nn.Parameter]]:
    """``params`` cut into runs of about ``bucket_bytes``, in model order; None: one run.

    Grouped from the last parameter back, as DDP groups its own buckets: backward produces the last
    layers' gradients first, so the last bucket is whole first. A bucket closes once it holds
    ``bucket_bytes`` or more (a larger parameter is a bucket of its own, with whatever came before it).
    """
    if bucket_bytes is None or not params:
        return [params] if params else []
    if bucket_bytes <= 0:
        raise ValueError(f"ZeRO bucket_bytes {bucket_bytes}; need a positive number of bytes or None")
    runs: list[list[nn.Parameter]] = []
    run: list[nn.Parameter] = []
    size = 0
    for p in reversed(params):
        run.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            runs.append(run[::-1])
            run, size = [], 0
    if run:
        runs.append(run[::-1])
    return runs[::-1]


def flatten_parameters(
    params: Iterable[nn.Parameter], world_size: int, rank: int, bucket_bytes: int | None = None
) -> list[_Flat]:
    """Move ``params`` into padded flat buffers, one per bucket of one (dtype, device); each becomes a view.

    Call it before DDP wraps the model (DDP keeps the parameter objects, which stay the same; only
    their storage moves). ``bucket_bytes``: about how many bytes of parameters a bucket holds (None:
    one bucket per dtype and device). Returns the buffers in model order (dtype by dtype, in the
    order they first appear).
    """
    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            groups.setdefault((p.dtype, p.device), []).append(p)
    flats = []
    with torch.no_grad():
        for (dtype, device), group in groups.items():
            for ps in _buckets(group, bucket_bytes):
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
    """Steps this rank's block of every bucket with ``inner``; the rest arrive by all-gather.

    Quacks like the torch optimizer the loop used before (``step``, ``zero_grad``,
    ``param_groups``, ``state_dict``, ``load_state_dict``); build the LR scheduler on
    ``self.inner`` (``param_groups`` is its list, so the rates are shared). It is also the
    state of the DDP comm hook ``trainer.hooks.zero_hook``, which must be registered: the
    reduce-scatters are issued there, during backward (module docstring).

    Args:
        flats: ``flatten_parameters``'s buffers (the model's parameters already view them).
        make_inner: builds the torch optimizer over a list of parameters (the shards, one per buffer).
        stage: 1 (state sharded) or 2 (gradient too, after its reduce-scatter).
        algo: the training ``--algo``; ``collective_algos`` maps it to the collectives'.
        transport, timeout: as the comm hook's.
        module: the model whose parameters ``flats`` hold: each of its modules then waits, before its
            forward, for the all-gather of its own parameters only. None: ``step`` waits for every
            all-gather before it returns.
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
        module: nn.Module | None = None,
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(f"ZeroOptimizer: stage {stage}; expected 1 or 2")
        self.flats = flats
        self.stage = stage
        self.rs_algo, self.ag_algo = collective_algos(algo)
        self.transport = transport
        self.timeout = timeout
        self.inner: torch.optim.Optimizer = make_inner([f.shard for f in flats])
        # where each parameter's gradient goes: (bucket, offset in its buffer)
        self._where: dict[int, tuple[int, int]] = {}
        for i, f in enumerate(flats):
            offset = 0
            for p in f.params:
                self._where[id(p)] = (i, offset)
                offset += p.numel()
        # per bucket, in this backward: parameters still to come, the gradient buffer, the reduce-scatter
        self._left = [len(f.params) for f in flats]
        self._grads: list[torch.Tensor | None] = [None] * len(flats)  # stage 1: kept; stage 2: while filling
        self._shard_grads = [torch.zeros_like(f.shard) for f in flats]  # block r of the mean gradient
        self._reduced: list[torch.futures.Future | None] = [None] * len(flats)
        self._gathered: list[torch.futures.Future | None] = [None] * len(flats)  # the last step's all-gathers
        self._wait_in_forward = module is not None
        if module is not None:
            self._hook_forward(module)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every gradient: the model's and the shards'."""
        for f in self.flats:
            for p in f.params:
                p.grad = None
            f.shard.grad = None

    # --- backward: the comm hook's half ---------------------------------------------------------

    @torch.no_grad()
    def reduce_scatter_bucket(self, bucket: Any) -> torch.futures.Future:
        """Take DDP's ``bucket`` (a ``dist.GradBucket``); queue the reduce-scatter of each ZeRO bucket it completes.

        Called by ``trainer.hooks.zero_hook`` in DDP's bucket order, which is the same on every rank, so
        the reduce-scatters are queued in the same order everywhere. Returns a future of ``bucket``'s
        buffer, left as it was, that completes when those reduce-scatters have (DDP waits for it at the
        end of backward, so a failed one raises from ``backward()``).
        """
        issued = []
        for p, grad in zip(bucket.parameters(), bucket.gradients()):
            where = self._where.get(id(p))
            if where is None:
                raise ValueError(
                    f"ZeRO comm hook: DDP's bucket {bucket.index()} holds a parameter of shape {tuple(p.shape)} "
                    "that flatten_parameters did not see (build the ZeroOptimizer over the model DDP wraps)"
                )
            i, offset = where
            flat_grad = self._grads[i]
            if flat_grad is None:
                flat_grad = torch.empty_like(self.flats[i].buffer)
                flat_grad[self.flats[i].numel :].zero_()  # the padding's gradient is 0
                self._grads[i] = flat_grad
            flat_grad[offset : offset + p.numel()].copy_(grad.reshape(-1))
            self._left[i] -= 1
            if self._left[i] == 0:  # bucket i is whole: its reduce-scatter goes now
                self._left[i] = len(self.flats[i].params)
                self._reduced[i] = ringcomm.reduce_scatter_async(
                    self._shard_grads[i], flat_grad, "avg",
                    algo=self.rs_algo, transport=self.transport, timeout=self.timeout,
                )
                issued.append(self._reduced[i])
                if self.stage == 2:  # the queued call holds the buffer until it has run, then it is freed
                    self._grads[i] = None
        buffer = bucket.buffer()
        if not issued:
            done: torch.futures.Future = torch.futures.Future()
            done.set_result(buffer)
            return done

        def after(all_done: torch.futures.Future) -> torch.Tensor:
            for fut in all_done.value():
                fut.value()  # raises a failed reduce-scatter's error
            return buffer

        return torch.futures.collect_all(issued).then(after)

    # --- the step and the all-gathers -------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Step this rank's block of every bucket, then queue the all-gathers of the parameters.

        Collective: every rank, once per training step, after ``backward()`` (whose comm hook queued
        the reduce-scatters; DDP waited for them).
        """
        self.wait_params()  # the shards are the last all-gathers' inputs: they must be done
        for i, f in enumerate(self.flats):
            fut = self._reduced[i]
            if fut is None:
                raise RuntimeError(
                    f"ZeroOptimizer.step: bucket {i} ({f.numel} elements) was not reduce-scattered since the last "
                    "step: register trainer.hooks.zero_hook on the DDP model and call backward() first"
                )
            fut.wait()
            self._reduced[i] = None
            f.shard.grad = self._shard_grads[i]
        self.inner.step()
        for i, f in enumerate(self.flats):  # model order: the order forward needs them
            self._gathered[i] = ringcomm.all_gather_async(
                f.buffer, f.shard.detach(), algo=self.ag_algo, transport=self.transport, timeout=self.timeout
            )
        if not self._wait_in_forward:
            self.wait_params()

    def wait_params(self) -> None:
        """Wait for every all-gather still in flight: the model's weights are then this step's everywhere.

        Raises the collective's error if one failed. Cheap when none is pending.
        """
        for i in range(len(self.flats)):
            self._wait_gather(i)

    def _wait_gather(self, i: int) -> None:
        fut = self._gathered[i]
        if fut is not None:
            self._gathered[i] = None
            fut.wait()

    def _hook_forward(self, module: nn.Module) -> None:
        """Before each submodule's forward, wait for the all-gathers of the buckets holding its own parameters."""
        bucket_of = {id(p): i for i, f in enumerate(self.flats) for p in f.params}
        for sub in module.modules():
            mine = sorted({bucket_of[id(p)] for p in sub.parameters(recurse=False) if id(p) in bucket_of})
            if mine:
                sub.register_forward_pre_hook(functools.partial(self._wait_before_forward, mine))

    def _wait_before_forward(self, buckets: list[int], _module: nn.Module, _args: Any) -> None:
        for i in buckets:
            self._wait_gather(i)

    # --- checkpoints: rank 0 gathers (trainer/checkpoint.py says why) -------------------------------

    def gathered_state_dict(self, keep: bool | None = None) -> dict[str, Any]:
        """The inner optimizer's state with every per-element tensor gathered to its full length.

        Collective (ringcomm.all_gather per state tensor). The tensors are trimmed to the parameters'
        ``numel`` (no padding), so the result does not depend on P; scalars (AdamW's ``step``) are
        the same on every rank and kept as they are.

        ``keep``: whether this rank keeps the gathered tensors; None: rank 0 only, the rank that
        writes the checkpoint (``trainer/checkpoint.py``). A rank that does not keep them gets None
        in their place and drops each one as soon as it is gathered, so a checkpoint does not raise
        its peak memory by the whole optimizer state (2M floats for AdamW).
        """
        if keep is None:
            keep = not dist.is_initialized() or dist.get_rank() == 0
        self.wait_params()  # the caller reads the weights next (checkpoint.save)
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
                    entry[key] = full[: f.numel].clone() if keep else None
                    del full
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
        self.wait_params()
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
