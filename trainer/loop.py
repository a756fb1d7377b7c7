"""The data-parallel training loop: one process per rank, DDP with or without a ringcomm hook.

``train(cfg, rank, world_size, device)`` runs on every rank after
``init_process_group``; ``launch.py`` calls it (spawned or under torchrun).
Per step, on every rank::

    x, y = next batch of this rank's shard       (DistributedSampler, set_epoch)
    loss = cross_entropy(ddp(x), y)
    loss.backward()     # buckets are averaged as they fill: built-in all-reduce (--algo ddp)
                        # or ringcomm on the hook's comm thread (--algo ring|ps|naive|...)
    optimizer.step(); scheduler.step()

Nothing on that path waits for the device or the network beyond what DDP
itself does: the loss and accuracy are summed into tensors and read (``.item()``)
only on logging steps and at the end of an epoch.

Each epoch ends with an evaluation on the test split (sharded over the ranks,
the confusion matrix summed with one all-reduce), a history entry and a
checkpoint written atomically by rank 0. ``--resume`` restores model,
optimizer, scheduler, epoch, step and every rank's RNG states, and continues
mid-epoch if the run stopped there, skipping the batches already seen in that
epoch; ``trainer/checkpoint.py`` holds the format and why the resumed run is
bitwise the uninterrupted one.

Stopping early, with something to resume from. A run stops mid-epoch at
``max_steps``; at the first step after ``time_limit`` seconds; or at the first
step after ``request_stop`` (the launcher calls it on Ctrl-C). Either way it
ends that epoch early as ``max_steps`` does (evaluation, a history entry marked
not complete), writes the checkpoint and ``metrics.json``, and returns. The
ranks must stop at the same step, so after every step they agree whether any
of them was asked to: one all-reduce of one integer, on the CPU (a few tens of
microseconds beside a step of tens of milliseconds). ``checkpoint_every``
also writes the checkpoint every that many steps, mid-epoch.

``train`` is the outline, one named step a line: set up the data; build the
model, DDP and the comm hook; the optimiser and schedule; restore; then per
epoch ``_train_epoch`` (the steps), ``_end_epoch`` (reduce, evaluate, history)
and ``checkpoint.save``; finally ``metrics.json``, then the trace. The comm hook
is touched in three small functions only (``_attach_comm_hook``, ``_comm_record``, and
``_build_optimizer``, which registers ZeRO's hook);
its comm thread belongs to ringcomm, which the launcher shuts down before it
destroys the process group (``ringcomm.tools.spawn.finish``).

The optimizer. ``--optimizer sgd``: SGD with momentum 0.9 and weight decay
5e-4; ``adamw``: torch's AdamW with its defaults. ``--zero 1|2`` shards its
state over the ranks (``trainer/zero.py``): the comm hook then reduce-scatters
each bucket of gradients as backward fills it, the optimizer's step steps this
rank's block and queues the all-gathers of the parameters, and the next
forward waits, module by module, for its own.

The learning rate, for either optimizer. With
``scale_lr`` the peak rate is ``lr × world_size`` (the linear scaling rule,
Goyal et al. 2017: the global batch grows with the world), reached by a linear
warmup over ``warmup_epochs``. After warmup, ``cosine`` decays to 0 at the last
step; ``multistep`` is MultiStepLR's rule ×0.1 at 50 % and 75 % of the steps;
``constant`` keeps it. All three are one ``LambdaLR`` stepped per step, so the
scheduler's state is one integer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

import ringcomm
from ringcomm.runtime import trace
from ringcomm.tools.machine import machine_info

from . import checkpoint
from . import zero as zero_opt
from .checkpoint import CHECKPOINT_NAME, Progress, atomic_write
from .compress import CompressState, check_compress, compress_hook
from .data import load_dataset, resolve_dataset
from .hooks import RingcommState, broadcast_module, broadcast_tensors, ringcomm_hook, zero_hook
from .models import build_model, count_parameters
from .names import METRICS_NAME, SCHEDULE_NAMES

__all__ = [
    "TrainConfig",
    "train",
    "lr_factor",
    "request_stop",
    "SCHEDULES",
    "OPTIMIZERS",
    "STOP_REASONS",
    "CHECKPOINT_NAME",
    "METRICS_NAME",
]

#: --optimizer: SGD with momentum and weight decay (the module docstring), or AdamW with torch's defaults.
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = SCHEDULE_NAMES  # one list of each, which launch.py reads without torch (names.py)

#: Why a run stopped before its last step, in the order of precedence when ranks differ (the last wins).
STOP_REASONS = ("time-limit", "interrupted")

# Set by request_stop (from a signal handler, so nothing but an assignment); read after every step.
_stop_requested: str | None = None


def request_stop(reason: str = "interrupted") -> None:
    """Ask the run in this process to stop after its current step, write its checkpoint and return.

    Safe to call from a signal handler. ``reason`` is one of ``STOP_REASONS``.
    """
    global _stop_requested
    if reason not in STOP_REASONS:
        raise ValueError(f"unknown stop reason {reason!r}; expected one of {', '.join(STOP_REASONS)}")
    _stop_requested = reason


@dataclass
class TrainConfig:
    """Everything one run needs; ``launch.py`` fills it from the command line (same names)."""

    algo: str = "ring"  # "ddp" (built-in all-reduce) or a key of ringcomm.api.ALGOS
    transport: str = "torch"  # ringcomm transport for the hook: one of ringcomm.transport_names()
    comm_options: dict[str, Any] = field(default_factory=dict)  # extra all_reduce options (ps_shards=2)
    comm_timeout: float | None = None  # seconds per bucket all-reduce; None: ringcomm's default
    compress: str = "none"  # none|bf16|fp16|powersgd:R|topk:F (trainer/compress.py)
    compress_warmup: int = 10  # PowerSGD's uncompressed warm-up steps
    model: str = "simplecnn"
    dataset: str = "auto"
    data_dir: str | None = None
    download: bool = False  # CIFAR-10 only, when online
    synthetic_size: int = 10_000  # training images of --dataset synthetic (test: a fifth)
    batch_size: int = 32  # per worker
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4  # sgd's; adamw keeps torch's default (0.01)
    optimizer: str = "sgd"  # one of OPTIMIZERS
    zero: int = 0  # 0: every rank holds the whole optimizer state; 1, 2: ZeRO stage (trainer/zero.py)
    scale_lr: bool = False
    warmup_epochs: float = 0.0
    schedule: str = "cosine"
    epochs: int = 1
    max_steps: int | None = None
    eval_batches: int | None = None  # per rank; None: the whole test split
    eval_batch_size: int = 500
    workers: int = 0  # DataLoader workers per rank
    seed: int = 0
    out: str = "runs/latest"
    resume: str | None = None  # a checkpoint path
    log_every: int = 20
    checkpoint_every: int | None = None  # steps between checkpoints, besides each epoch's end; None: no more
    time_limit: float | None = None  # seconds from the start of train(): stop at the next step, checkpoint
    trace: str | None = None  # Chrome trace file (launch.py --trace); None: off
    trace_steps: int = 20  # steps traced from the start of the run


def lr_factor(
    step: int, *, total_steps: int, warmup_steps: int, schedule: str, start_factor: float = 0.0
) -> float:
    """The multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Linear warmup from ``start_factor`` over ``warmup_steps``, then ``schedule``
    over the remaining steps (see the module docstring).
    """
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if schedule == "multistep":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")


class _SkipFirst(Sampler[int]):
    """The indices of ``base`` for this epoch, without the first ``skip`` (to resume mid-epoch)."""

    def __init__(self, base: DistributedSampler, skip: int = 0) -> None:
        self.base = base
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        indices = list(self.base)  # DistributedSampler: this epoch's shard, from (seed, epoch)
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


class _Printer:
    """print on rank 0 only, flushed (the launcher's output is a pipe when spawned or logged)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, *args: Any) -> None:
        if self.rank == 0:
            print(*args, flush=True)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int, max_batches: int | None
) -> tuple[float, torch.Tensor]:
    """Loss and confusion matrix (rows: true class, columns: predicted) over all ranks' test shards."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes**2).view(
            num_classes, num_classes
        )
    dist.all_reduce(confusion)
    dist.all_reduce(loss_sum)
    model.train()
    total = int(confusion.sum())
    return float(loss_sum) / max(total, 1), confusion.cpu()


# --- the DDP comm hook ----------------------------------------------------------------------------
# The only code in the loop that uses trainer/hooks.py and ringcomm's counters: keep every call into
# them in these two functions, so that a change of that API touches them and nothing else.


def _attach_comm_hook(cfg: TrainConfig, ddp: DDP, device: torch.device) -> _CommCounters | None:
    """Register ringcomm's comm hook on ``ddp`` for ``cfg.algo``; None for ``--algo ddp`` (DDP's own).

    Collective (the hook sets its transport up): every rank, in the same order, before training.
    """
    if cfg.algo == "ddp":
        check_compress(cfg.compress, cfg.algo)  # refused in one line: DDP's own all-reduce
        return None
    if cfg.compress != "none":
        compress = CompressState(
            cfg.compress, ddp.module, cfg.algo, cfg.transport, device=device, timeout=cfg.comm_timeout,
            options=cfg.comm_options, warmup_steps=cfg.compress_warmup,
        )
        ddp.register_comm_hook(compress, compress_hook)
        return _CommCounters(ringcomm.comm_stats(), compress)
    state = RingcommState(
        cfg.algo, cfg.transport, device=device, timeout=cfg.comm_timeout, options=cfg.comm_options
    )
    if not cfg.zero:  # --zero: the ZeroOptimizer is the hook's state; _build_optimizer registers it
        ddp.register_comm_hook(state, ringcomm_hook)
    return _CommCounters(ringcomm.comm_stats())


@dataclass
class _CommCounters:
    """ringcomm's cumulative counters (``ringcomm.comm_stats()``) as they stood at the last step."""

    last: ringcomm.CommStats
    compress: CompressState | None = None  # --compress's state (saved beside the checkpoint)


def _comm_record(comm: _CommCounters | None, step: int) -> dict[str, Any]:
    """The record of step ``step`` (1-based): ``{"step": step}``, with ringcomm's work in the step.

    ``comm_time_s`` (seconds in all-reduce, summed over the buckets), ``bytes`` and
    ``recv_bytes`` (this rank's) and ``buckets``. Call it once per step, after
    ``backward()`` returned (DDP has then waited for every bucket).
    """
    if comm is None:
        return {"step": step}
    now = ringcomm.comm_stats()
    done, comm.last = now - comm.last, now
    return {
        "step": step,
        "comm_time_s": done.seconds,
        "bytes": done.sent_bytes,
        "recv_bytes": done.recv_bytes,
        "buckets": done.calls,
    }


# --- set-up ---------------------------------------------------------------------------------------


@dataclass
class _Data:
    """This rank's data and the step plan it implies (the plan is the same on every rank)."""

    name: str  # the dataset --dataset resolved to
    reason: str  # why that one
    classes: list[str]
    train: Dataset
    sampler: DistributedSampler  # this rank's shard of the training split, reshuffled each epoch
    test_loader: DataLoader  # this rank's shard of the test split, disjoint from the others'
    steps_per_epoch: int
    total_steps: int  # epochs × steps_per_epoch, capped by max_steps


def _set_up_data(cfg: TrainConfig, rank: int, world_size: int, say: _Printer) -> _Data:
    """Load the dataset (the first output line says which and why) and shard it over the ranks."""
    name, root, reason = resolve_dataset(cfg.dataset, cfg.data_dir)
    say(f"dataset: {name} ({reason})")
    if name == "cifar10" and cfg.download:  # rank 0 downloads, the others then read its files
        if rank == 0:
            load_dataset(name, root, download=True)
        dist.barrier()
    data = load_dataset(
        name, root, reason=reason, synthetic_size=(cfg.synthetic_size, cfg.synthetic_size // 5)
    )
    sampler = DistributedSampler(data.train, world_size, rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{name}: {len(sampler)} training images per rank, fewer than --batch-size {cfg.batch_size}"
        )
    test_loader = DataLoader(
        Subset(data.test, range(rank, len(data.test), world_size)),  # disjoint shards, no padding
        batch_size=cfg.eval_batch_size,
        num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed),  # not the global RNG: see _Run.loader_seeds
    )
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    return _Data(name, reason, data.classes, data.train, sampler, test_loader, steps_per_epoch, total_steps)


def _build_model(cfg: TrainConfig, device: torch.device, flats: list[Any] | None = None) -> tuple[nn.Module, DDP]:
    """The model on ``device``, rank 0's initial weights on every rank, and its DDP wrapper.

    With ``--zero`` the parameters are first moved into padded flat buffers (``zero.flatten_parameters``,
    appended to ``flats``), before DDP keeps them.

    With ``--algo ddp`` DDP's constructor broadcasts rank 0's weights through the process group;
    with any of ringcomm's algorithms it skips that (``init_sync=False``) and ringcomm's own broadcast
    does it, so no tensor of a ring run goes through Gloo's collectives (docs/training.md lists the
    process-group calls that remain, and why). Collective: every rank, in the same order.
    """
    torch.manual_seed(cfg.seed)  # the same weights on every rank already; the broadcast makes sure
    model = build_model(cfg.model).to(device)
    ours = cfg.algo != "ddp"
    if ours:
        broadcast_module(model, 0, transport=cfg.transport, timeout=cfg.comm_timeout)
    if cfg.zero:
        if flats is None:
            raise ValueError("_build_model: --zero needs a list to return the flat parameter buffers in")
        flats += zero_opt.flatten_parameters(
            model.parameters(), dist.get_world_size(), dist.get_rank(), bucket_bytes=zero_opt.BUCKET_BYTES
        )
    # --zero: p.grad views DDP's buckets, which hold every gradient anyway (not another copy: trainer/zero.py)
    ddp = DDP(
        model, device_ids=[device.index] if device.type == "cuda" else None, init_sync=not ours,
        gradient_as_bucket_view=bool(cfg.zero),
    )
    return model, ddp


def _peak_lr(cfg: TrainConfig, world_size: int) -> float:
    """The learning rate after warmup: ``lr``, times the world size with ``scale_lr``."""
    return cfg.lr * (world_size if cfg.scale_lr else 1)


def _build_optimizer(
    cfg: TrainConfig, ddp: DDP, world_size: int, data: _Data, flats: list[Any]
) -> tuple[Any, torch.optim.lr_scheduler.LambdaLR]:
    """``--optimizer`` (over the whole model, or with ``--zero`` over this rank's shard) and the schedule.

    SGD with momentum and weight decay, or AdamW with torch's defaults (betas, eps, weight decay
    0.01); either way the per-step schedule of ``lr_factor`` on ``--lr``. With ``--zero`` the
    scheduler drives the inner optimizer, whose ``param_groups`` the ZeroOptimizer shows.
    """

    def make(params: Any) -> torch.optim.Optimizer:
        lr = _peak_lr(cfg, world_size)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr)
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")

    if cfg.zero:
        optimizer: Any = zero_opt.ZeroOptimizer(
            flats, make, stage=cfg.zero, algo=cfg.algo, transport=cfg.transport, timeout=cfg.comm_timeout,
            module=ddp.module,
        )
        ddp.register_comm_hook(optimizer, zero_hook)  # reduce-scatters each bucket during backward
        inner = optimizer.inner
    else:
        optimizer = inner = make(ddp.parameters())
    schedule = functools.partial(
        lr_factor,
        total_steps=data.total_steps,
        warmup_steps=round(cfg.warmup_epochs * data.steps_per_epoch),
        schedule=cfg.schedule,
        start_factor=1.0 / world_size if cfg.scale_lr else 0.0,
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(inner, schedule)


def _banner(run: _Run) -> str:
    """The line that says what this run trains, with what, for how long."""
    cfg, world_size = run.cfg, run.world_size
    return (
        f"train: {cfg.model} ({count_parameters(run.model):,d} params) | algo {cfg.algo}"
        f"{'' if cfg.algo == 'ddp' else ' over ' + cfg.transport} | world {world_size} on {run.device.type} | "
        f"batch {cfg.batch_size}/worker = {cfg.batch_size * world_size} global | "
        f"{run.data.steps_per_epoch} steps/epoch, {run.data.total_steps} steps | "
        f"lr {_peak_lr(cfg, world_size):g} {cfg.schedule} | {cfg.optimizer}"
        f"{f' | ZeRO-{cfg.zero}' if cfg.zero else ''}"
    )


@dataclass
class _Run:
    """What the epochs need, set up once by ``train``."""

    cfg: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    say: _Printer
    data: _Data
    model: nn.Module  # the bare model: evaluation, BatchNorm buffers, checkpoints
    ddp: DDP  # the same model, wrapped: the training steps
    comm: _CommCounters | None  # None: DDP's built-in all-reduce
    optimizer: Any  # a torch optimizer, or with --zero a zero.ZeroOptimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    # Every DataLoader iterator draws a seed for its workers; from a generator of its own, not from
    # the global RNG, so that the augmentation stream (the global RNG with workers=0, checkpointed)
    # is the same whether or not a run was interrupted and resumed.
    loader_seeds: torch.Generator = field(init=False)
    trace_until: int | None = None  # tracing stops after this step (set by _start_trace); None: off
    started: float = field(
        default_factory=time.monotonic
    )  # when train() began: --time-limit counts from here
    stopped: str | None = None  # a STOP_REASONS entry once the ranks agreed to stop early
    control: Any = None  # the process group the stop flag is reduced over (CPU); None: the default group
    memory: list[Any] = field(default_factory=list)  # per rank: (optimizer state bytes, peak RSS bytes)

    def __post_init__(self) -> None:
        self.loader_seeds = torch.Generator().manual_seed(self.cfg.seed + self.rank)


def _restore(run: _Run) -> Progress:
    """Continue from the checkpoint ``--resume`` names: weights, optimizer, schedule, RNG, position."""
    assert run.cfg.resume is not None
    progress = checkpoint.restore(
        run.cfg.resume,
        run.cfg,
        run.model,
        run.optimizer,
        run.scheduler,
        rank=run.rank,
        world_size=run.world_size,
        device=run.device,
        say=run.say,
        total_steps=run.data.total_steps,
    )
    _restore_compressor(run)
    why = checkpoint.nothing_left(
        progress.step, progress.epoch, epochs=run.cfg.epochs, max_steps=run.data.total_steps
    )
    if why is not None:  # launch.py says so before starting; this is for other callers and odd plans
        raise ValueError(f"--resume {run.cfg.resume}: nothing left to train: {why}")
    return progress


def _save(run: _Run, progress: Progress) -> None:
    """Write the checkpoint of ``progress`` (collective; rank 0 writes)."""
    path = Path(run.cfg.out) / CHECKPOINT_NAME
    checkpoint.save(
        path, run.cfg, run.model, run.optimizer, run.scheduler, progress, total_steps=run.data.total_steps
    )
    compressor = run.comm.compress.compressor if run.comm is not None and run.comm.compress else None
    if compressor is not None:  # per rank (error feedback is each rank's own): one file each, beside it
        state = compressor.state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path.parent / _compressor_file(run.rank), lambda f: torch.save(state, f))
        dist.barrier()  # every rank's file is there before anyone reports the checkpoint written


def _compressor_file(rank: int) -> str:
    return f"compressor-rank{rank}.pt"


def _restore_compressor(run: _Run) -> None:
    """PowerSGD's Q and error feedback, or top-k's, as the checkpointed run left them (this rank's file)."""
    compressor = run.comm.compress.compressor if run.comm is not None and run.comm.compress else None
    if compressor is None:
        return
    assert run.cfg.resume is not None
    where = Path(run.cfg.resume).parent / _compressor_file(run.rank)
    if not where.exists():
        raise ValueError(
            f"--resume {run.cfg.resume} with --compress {run.cfg.compress}: no {where.name} beside it "
            f"(checkpointed without compression, or by a world of other size)"
        )
    compressor.load_state_dict(torch.load(where, map_location="cpu", weights_only=True))


def _agree_to_stop(run: _Run) -> str | None:
    """Whether any rank was asked to stop (``request_stop``, ``time_limit``): the same answer on every rank.

    Collective: one all-reduce (max) of one integer, after every step.
    """
    reason = _stop_requested
    limit = run.cfg.time_limit
    if reason is None and limit is not None and time.monotonic() - run.started >= limit:
        reason = "time-limit"
    flag = torch.tensor([0 if reason is None else 1 + STOP_REASONS.index(reason)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=run.control)
    return None if int(flag) == 0 else STOP_REASONS[int(flag) - 1]


def _start_trace(run: _Run, progress: Progress) -> trace.Tracer | None:
    """With --trace, record the next ``trace_steps`` steps (``trace.span`` is a no-op otherwise)."""
    if not run.cfg.trace:
        return None
    run.trace_until = progress.step + run.cfg.trace_steps
    return trace.enable(run.rank)


# --- an epoch -------------------------------------------------------------------------------------


@dataclass
class _EpochSums:
    """One epoch's training sums on this rank, kept on the device: read once, at its end."""

    loss_sum: torch.Tensor  # float64: the per-sample cross-entropy, summed
    correct: torch.Tensor  # int64: samples classified right
    seen: int = 0  # samples
    time_s: float = 0.0  # seconds in the epoch's steps, batch loading included


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on the batch ``(x, y)``; returns the loss and logits, not read from the device.

    ``trace.span`` does nothing unless --trace is on (and then only for the first --trace-steps).
    """
    with trace.span("forward", "compute", step=step):
        logits = run.ddp(x)
        loss = nn.functional.cross_entropy(logits, y)
    run.optimizer.zero_grad(set_to_none=True)
    with trace.span("backward", "compute", step=step):
        loss.backward()  # DDP has waited for every bucket's future when this returns
    with trace.span("optimizer", "compute", step=step):
        run.optimizer.step()
    run.scheduler.step()
    return loss, logits


def _train_epoch(run: _Run, progress: Progress) -> _EpochSums:
    """Train on epoch ``progress.epoch`` from batch ``progress.batch_in_epoch`` to its end or the last step.

    Advances ``progress`` (step, batch_in_epoch, step_records) step by step and
    prints a line every ``log_every`` steps: images/s and the share of the time
    in the hook's all-reduce, over the steps since the previous line. Ends
    early, with ``run.stopped`` set, when the ranks agree to stop; writes the
    checkpoint every ``checkpoint_every`` steps.
    """
    cfg, data, device = run.cfg, run.data, run.device
    data.sampler.set_epoch(progress.epoch)
    loader = DataLoader(
        data.train,
        batch_size=cfg.batch_size,
        sampler=_SkipFirst(data.sampler, progress.batch_in_epoch * cfg.batch_size),
        drop_last=True,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        generator=run.loader_seeds,
    )
    run.ddp.train()
    sums = _EpochSums(
        torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int64, device=device)
    )
    start = window_start = last = time.perf_counter()
    window_comm_s, window_steps = 0.0, 0
    # each step's loss, read when the loop reads anyway (a log line, a checkpoint, the epoch's end):
    # a .item() every step would wait for a GPU every step
    unread: list[tuple[dict, torch.Tensor]] = []

    def read_losses() -> None:
        if unread:
            for (rec, _), value in zip(unread, torch.stack([t for _, t in unread]).tolist()):
                rec["loss"] = value  # this rank's batch: the loss curves of analysis.report plot rank 0's
            unread.clear()

    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr = run.optimizer.param_groups[0]["lr"]  # the rate this step uses
        loss, logits = _train_step(run, x, y, progress.step)
        progress.step += 1
        progress.batch_in_epoch += 1
        if progress.step == run.trace_until:
            trace.disable()
        sums.seen += y.numel()
        sums.loss_sum += loss.detach() * y.numel()
        sums.correct += (logits.detach().argmax(1) == y).sum()

        now = time.perf_counter()
        record = _comm_record(run.comm, progress.step)
        record["step_time_s"] = now - last  # includes loading this batch
        record["lr"] = lr
        unread.append((record, loss.detach()))
        last = now
        progress.step_records.append(record)
        window_comm_s += record.get("comm_time_s", 0.0)
        window_steps += 1
        if progress.step % cfg.log_every == 0 or progress.step == data.total_steps:
            read_losses()
            elapsed = now - window_start
            comm = "comm n/a (built-in)" if run.comm is None else f"comm {window_comm_s / elapsed:4.0%}"
            run.say(
                f"step {progress.step:6d}/{data.total_steps} | epoch {progress.epoch} | "
                f"loss {loss.item():.4f} | "
                f"{window_steps * cfg.batch_size * run.world_size / elapsed:8.1f} img/s | {comm} | "
                f"lr {run.scheduler.get_last_lr()[0]:.4g}"
            )
            window_start, window_comm_s, window_steps = now, 0.0, 0
        if progress.step >= data.total_steps:
            break
        run.stopped = _agree_to_stop(run)
        if run.stopped is not None:
            break
        every = cfg.checkpoint_every
        if every and progress.step % every == 0 and progress.batch_in_epoch < data.steps_per_epoch:
            # mid-epoch (an epoch's end has its own): the epoch's time and images so far count
            read_losses()
            _save(
                run,
                dataclasses.replace(
                    progress,
                    train_time_s=progress.train_time_s + time.perf_counter() - start,
                    images_seen=progress.images_seen + sums.seen * run.world_size,
                ),
            )
    read_losses()
    sums.time_s = time.perf_counter() - start
    return sums


def _end_epoch(run: _Run, progress: Progress, sums: _EpochSums) -> torch.Tensor:
    """Sum the epoch's train statistics over the ranks, evaluate, add the history entry and print it.

    Moves ``progress`` to the next epoch if this one is complete (not stopped
    mid-way by ``max_steps``). Returns the test confusion matrix (on the CPU).
    """
    cfg, device = run.cfg, run.device
    progress.train_time_s += sums.time_s
    progress.images_seen += sums.seen * run.world_size
    complete = progress.batch_in_epoch >= run.data.steps_per_epoch

    totals = torch.stack(
        [sums.loss_sum, sums.correct.double(), torch.tensor(float(sums.seen), device=device)]
    )
    dist.all_reduce(totals)
    # BatchNorm statistics: evaluate rank 0's on every rank (through ringcomm, but for --algo ddp)
    if cfg.algo == "ddp":
        for buf in run.model.buffers():
            dist.broadcast(buf, 0)
    else:
        broadcast_tensors(list(run.model.buffers()), 0, transport=cfg.transport, timeout=cfg.comm_timeout)
    test_loss, confusion = evaluate(
        run.model, run.data.test_loader, device, len(run.data.classes), cfg.eval_batches
    )
    entry: dict[str, Any] = {"epoch": progress.epoch, "step": progress.step, "complete": complete}
    entry["train_steps"] = sums.seen // run.cfg.batch_size  # the steps train_loss is the mean over
    entry["train_loss"] = float(totals[0]) / max(float(totals[2]), 1.0)
    entry["train_accuracy"] = float(totals[1]) / max(float(totals[2]), 1.0)
    entry["test_loss"] = test_loss
    entry["test_accuracy"] = float(confusion.diag().sum()) / max(int(confusion.sum()), 1)
    entry["epoch_time_s"] = sums.time_s
    progress.history.append(entry)
    run.say(
        f"epoch {progress.epoch} {'done' if complete else 'stopped'} at step {progress.step} | "
        f"train, mean over its steps: loss {entry['train_loss']:.4f} acc {entry['train_accuracy']:.2%} | "
        f"test loss {test_loss:.4f} acc {entry['test_accuracy']:.2%} | {sums.time_s:.1f} s"
    )
    if complete:
        progress.epoch += 1
        progress.batch_in_epoch = 0
    return confusion


# --- after training -------------------------------------------------------------------------------


def _merge_trace(run: _Run, tracer: trace.Tracer) -> None:
    """Each rank writes its trace events; rank 0 joins them into the --trace file. Collective.

    Called after metrics.json and the checkpoint are written: a trace that cannot be written
    (its folder removed or full since launch.py checked it) is said in one line on stderr and
    loses nothing else. Every rank reaches the barrier whatever its own write did.
    """
    path = run.cfg.trace
    assert path is not None
    failed: str | None = None
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # launch.py checked it can be made
        tracer.dump(f"{path}.rank{run.rank}")
    except OSError as exc:
        failed = f"{type(exc).__name__}: {exc}"
    dist.barrier()
    if run.rank == 0 and failed is None:
        parts = [f"{path}.rank{r}" for r in range(run.world_size)]
        try:
            trace.merge([p for p in parts if os.path.exists(p)], path)  # other hosts' stay there
            for p in parts:
                if os.path.exists(p):
                    os.remove(p)
        except OSError as exc:
            failed = f"{type(exc).__name__}: {exc}"
        else:
            run.say(f"trace: {path} ({len(tracer.events)} events on rank 0; open in ui.perfetto.dev)")
    if failed is not None:
        saved = f"{Path(run.cfg.out) / METRICS_NAME} and the checkpoint are saved" if run.rank == 0 else ""
        print(
            f"rank {run.rank}: --trace {path}: not written ({failed})" + (f"; {saved}" if saved else ""),
            file=sys.stderr,
            flush=True,
        )


def _metrics(run: _Run, progress: Progress, confusion: torch.Tensor) -> dict[str, Any]:
    """The content of metrics.json (analysis/ reads it: add keys, do not rename them)."""
    cfg, history = run.cfg, progress.history
    train_time_s = progress.train_time_s
    comm_time = None if run.comm is None else sum(r.get("comm_time_s", 0.0) for r in progress.step_records)
    per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
    return {
        "algo": cfg.algo,
        "transport": None if cfg.algo == "ddp" else cfg.transport,
        "backend": dist.get_backend(),
        "device": run.device.type,
        "world_size": run.world_size,
        "model": cfg.model,
        "parameters": count_parameters(run.model),
        "dataset": run.data.name,
        "dataset_reason": run.data.reason,
        "machine": machine_info(),
        "steps": progress.step,
        "epochs_completed": progress.epoch,
        "batch_size_per_worker": cfg.batch_size,
        "global_batch_size": cfg.batch_size * run.world_size,
        "peak_lr": _peak_lr(cfg, run.world_size),
        "schedule": cfg.schedule,
        "optimizer": cfg.optimizer,
        "zero": cfg.zero,
        # this rank's (0) optimizer state (momentum, moments, step counters) and peak resident set (ru_maxrss)
        "optimizer_state_bytes": run.memory[0][0],
        "peak_memory_bytes": run.memory[0][1],
        "optimizer_state_bytes_per_rank": [m[0] for m in run.memory],
        "peak_memory_bytes_per_rank": [m[1] for m in run.memory],
        "train_time_s": train_time_s,
        "throughput_img_s": progress.images_seen / train_time_s if train_time_s > 0 else None,
        "comm_time_s": comm_time,
        "comm_share": None if comm_time is None or train_time_s == 0 else comm_time / train_time_s,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "final_test_accuracy": history[-1]["test_accuracy"] if history else None,
        "history": history,
        "classes": run.data.classes,
        "per_class_accuracy": dict(zip(run.data.classes, per_class.tolist())),
        "confusion_matrix": confusion.tolist(),
        "step_records": progress.step_records,
        "checkpoint": str(Path(cfg.out) / CHECKPOINT_NAME),
        "resumed_from": cfg.resume,
        "stopped": run.stopped,  # None: ran to its last step; else a STOP_REASONS entry
        "config": asdict(cfg),
    }


def _write_metrics(run: _Run, progress: Progress, confusion: torch.Tensor) -> dict[str, Any]:
    """Write ``out/metrics.json`` atomically; returns what it wrote."""
    metrics = _metrics(run, progress, confusion)
    out = Path(run.cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / METRICS_NAME, lambda f: f.write(json.dumps(metrics, indent=1).encode()))
    return metrics


# --- the outline ----------------------------------------------------------------------------------


def train(cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> dict[str, Any] | None:
    """Train on this rank; returns the metrics dict on rank 0 (also written to ``out/metrics.json``).

    Collective: every rank of the default process group calls it with the same ``cfg``.
    """
    global _stop_requested
    started = time.monotonic()
    say = _Printer(rank)
    data = _set_up_data(cfg, rank, world_size, say)
    if cfg.zero and cfg.algo == "ddp":
        raise ValueError("--zero needs one of ringcomm's algorithms (its reduce-scatter), not --algo ddp")
    flats: list[Any] = []
    model, ddp = _build_model(cfg, device, flats)
    comm = _attach_comm_hook(cfg, ddp, device)
    try:
        torch.manual_seed(cfg.seed + 1 + rank)  # from here on the augmentation draws differ per rank
        optimizer, scheduler = _build_optimizer(cfg, ddp, world_size, data, flats)
        run = _Run(cfg, rank, world_size, device, say, data, model, ddp, comm, optimizer, scheduler)
        run.started = started
        # the stop flag is a CPU tensor: reduce it over Gloo (a group of its own when the default is NCCL)
        run.control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        progress = _restore(run) if cfg.resume else Progress()
        say(_banner(run))
        tracer = _start_trace(run, progress)
        confusion = torch.zeros(len(data.classes), len(data.classes), dtype=torch.int64)  # if no epoch runs
        while progress.epoch < cfg.epochs and progress.step < data.total_steps and run.stopped is None:
            sums = _train_epoch(run, progress)
            confusion = _end_epoch(run, progress, sums)
            _save(run, progress)
    finally:
        trace.disable()
        _stop_requested = None  # a request belongs to the run it stopped

    # metrics.json first, then the trace: an artifact that fails to write never loses the others
    memory = [None] * world_size  # every rank's (optimizer state, peak resident set), in bytes
    dist.all_gather_object(
        memory, (zero_opt.optimizer_state_bytes(run.optimizer), zero_opt.peak_memory_bytes()), group=run.control
    )
    run.memory = memory
    metrics = _write_metrics(run, progress, confusion) if rank == 0 else None
    if tracer is not None:
        _merge_trace(run, tracer)
    return metrics
