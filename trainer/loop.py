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
mid-epoch if the run stopped there (``--max-steps``), skipping the batches
already seen in that epoch.

The learning rate. SGD with momentum 0.9 and weight decay 5e-4. With
``scale_lr`` the peak rate is ``lr × world_size`` (the linear scaling rule,
Goyal et al. 2017: the global batch grows with the world), reached by a linear
warmup over ``warmup_epochs``. After warmup, ``cosine`` decays to 0 at the last
step; ``multistep`` is MultiStepLR's rule ×0.1 at 50 % and 75 % of the steps;
``constant`` keeps it. All three are one ``LambdaLR`` stepped per step, so the
scheduler's state is one integer.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from ringcomm import trace

from .data import load_dataset, resolve_dataset
from .hooks import RingcommState, ringcomm_hook
from .models import build_model, count_parameters

__all__ = ["TrainConfig", "train", "lr_factor", "SCHEDULES", "CHECKPOINT_NAME", "METRICS_NAME"]

SCHEDULES = ("cosine", "multistep", "constant")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"


@dataclass
class TrainConfig:
    """Everything one run needs; ``launch.py`` fills it from the command line (same names)."""

    algo: str = "ring"  # "ddp" (built-in all-reduce) or a key of ringcomm.api.ALGOS
    transport: str = "torch"  # ringcomm transport for the hook: "torch" or "zmq"
    comm_options: dict[str, Any] = field(default_factory=dict)  # extra all_reduce options (ps_shards=2)
    comm_timeout: float | None = None  # seconds per bucket all-reduce; None: ringcomm's default
    model: str = "simplecnn"
    dataset: str = "auto"
    data_dir: str | None = None
    download: bool = False  # CIFAR-10 only, when online
    synthetic_size: int = 10_000  # training images of --dataset synthetic (test: a fifth)
    batch_size: int = 32  # per worker
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
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


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)`` then rename: a reader sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


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


def train(cfg: TrainConfig, rank: int, world_size: int, device: torch.device) -> dict[str, Any] | None:
    """Train on this rank; returns the metrics dict on rank 0 (also written to ``out/metrics.json``)."""
    say = _Printer(rank)
    out = Path(cfg.out)

    # --- data: the first line says which dataset and why ---
    name, root, reason = resolve_dataset(cfg.dataset, cfg.data_dir)
    say(f"dataset: {name} ({reason})")
    if name == "cifar10" and cfg.download:  # rank 0 downloads, the others then read its files
        if rank == 0:
            load_dataset(name, root, download=True)
        dist.barrier()
    data = load_dataset(
        name, root, reason=reason, synthetic_size=(cfg.synthetic_size, cfg.synthetic_size // 5)
    )
    num_classes = len(data.classes)
    train_sampler = DistributedSampler(data.train, world_size, rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = len(train_sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{name}: {len(train_sampler)} training images per rank, fewer than --batch-size {cfg.batch_size}"
        )
    test_loader = DataLoader(
        Subset(data.test, range(rank, len(data.test), world_size)),  # disjoint shards, no padding
        batch_size=cfg.eval_batch_size,
        num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed),  # see loader_seeds below
    )
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    # --- model, DDP, the hook ---
    torch.manual_seed(cfg.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = build_model(cfg.model).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    state: RingcommState | None = None
    if cfg.algo != "ddp":
        state = RingcommState(
            cfg.algo, cfg.transport, device=device, timeout=cfg.comm_timeout, options=cfg.comm_options
        )
        ddp.register_comm_hook(state, ringcomm_hook)
    torch.manual_seed(cfg.seed + 1 + rank)  # augmentation draws differ per rank

    # --- optimiser and schedule ---
    peak_lr = cfg.lr * (world_size if cfg.scale_lr else 1)
    optimizer = torch.optim.SGD(
        ddp.parameters(), lr=peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        functools.partial(
            lr_factor,
            total_steps=total_steps,
            warmup_steps=warmup_steps,
            schedule=cfg.schedule,
            start_factor=1.0 / world_size if cfg.scale_lr else 0.0,
        ),
    )

    # --- resume ---
    step, epoch, skip_batches = 0, 0, 0
    history: list[dict[str, Any]] = []
    step_records: list[dict[str, Any]] = []
    train_time_s, images_seen = 0.0, 0
    if cfg.resume:
        ckpt = torch.load(cfg.resume, map_location=device, weights_only=False)
        if ckpt["model_name"] != cfg.model:
            raise ValueError(
                f"--resume {cfg.resume}: checkpoint is of model {ckpt['model_name']!r}, not {cfg.model!r}"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, epoch, skip_batches = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        history, step_records = ckpt["history"], ckpt["step_records"]
        train_time_s, images_seen = ckpt["train_time_s"], ckpt["images_seen"]
        if len(ckpt["rng"]) == world_size and ckpt["batch_size"] == cfg.batch_size:
            _set_rng_state(ckpt["rng"][rank])
        else:
            say(
                f"resume: checkpoint from world size {len(ckpt['rng'])}, batch {ckpt['batch_size']}; "
                "continuing with fresh RNG streams (the data order is not the one the old run would have seen)"
            )
        say(f"resume: {cfg.resume} at step {step}, epoch {epoch}, batch {skip_batches} of that epoch")

    say(
        f"train: {cfg.model} ({count_parameters(model):,d} params) | algo {cfg.algo}"
        f"{'' if cfg.algo == 'ddp' else ' over ' + cfg.transport} | world {world_size} on {device.type} | "
        f"batch {cfg.batch_size}/worker = {cfg.batch_size * world_size} global | "
        f"{steps_per_epoch} steps/epoch, {total_steps} steps | lr {peak_lr:g} {cfg.schedule}"
    )

    global_batch = cfg.batch_size * world_size
    start_step = step
    tracer = trace.enable(rank) if cfg.trace else None  # off: every trace.span is a no-op
    # Every DataLoader iterator draws a seed for its workers; from a generator of its own, not
    # from the global RNG, so that the augmentation stream (the global RNG with num_workers=0,
    # checkpointed) is the same whether or not a run was interrupted and resumed.
    loader_seeds = torch.Generator().manual_seed(cfg.seed + rank)
    # For tests of the launcher: RINGCOMM_TEST_DIE="RANK:STEP" makes that rank exit abruptly after
    # that step, as a crashed or killed worker would, leaving its peers blocked in communication.
    die_rank, _, die_step = os.environ.get("RINGCOMM_TEST_DIE", "-1:-1").partition(":")
    die_at = int(die_step) if int(die_rank) == rank else -1
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    try:
        while epoch < cfg.epochs and step < total_steps:
            train_sampler.set_epoch(epoch)
            loader = DataLoader(
                data.train,
                batch_size=cfg.batch_size,
                sampler=_SkipFirst(train_sampler, skip_batches * cfg.batch_size),
                drop_last=True,
                num_workers=cfg.workers,
                pin_memory=device.type == "cuda",
                generator=loader_seeds,
            )
            batch_in_epoch = skip_batches
            skip_batches = 0
            ddp.train()
            # per-sample loss and hits summed on the device; read once per epoch (no sync per step)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            epoch_start = window_start = last = time.perf_counter()
            window_comm, window_steps = 0.0, 0
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # trace.span does nothing unless --trace is on (and only for the first --trace-steps)
                with trace.span("forward", "compute", step=step):
                    logits = ddp(x)
                    loss = nn.functional.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                with trace.span("backward", "compute", step=step):
                    loss.backward()  # DDP has waited for every bucket's future when this returns
                with trace.span("optimizer", "compute", step=step):
                    optimizer.step()
                scheduler.step()
                step += 1
                if tracer is not None and step == start_step + cfg.trace_steps:
                    trace.disable()
                batch_in_epoch += 1
                seen += y.numel()
                loss_sum += loss.detach() * y.numel()
                correct += (logits.detach().argmax(1) == y).sum()

                now = time.perf_counter()
                record = state.mark_step(step) if state is not None else {"step": step}
                record["step_time_s"] = now - last  # includes loading this batch
                last = now
                step_records.append(record)
                window_comm += record.get("comm_time_s", 0.0)
                window_steps += 1
                if step % cfg.log_every == 0 or step == total_steps:
                    elapsed = now - window_start
                    comm = "comm n/a (built-in)" if state is None else f"comm {window_comm / elapsed:4.0%}"
                    say(
                        f"step {step:6d}/{total_steps} | epoch {epoch} | loss {loss.item():.4f} | "
                        f"{window_steps * global_batch / elapsed:8.1f} img/s | {comm} | "
                        f"lr {scheduler.get_last_lr()[0]:.4g}"
                    )
                    window_start, window_comm, window_steps = now, 0.0, 0
                if step == die_at:
                    os._exit(17)
                if step >= total_steps:
                    break
            epoch_time = time.perf_counter() - epoch_start
            train_time_s += epoch_time
            images_seen += seen * world_size
            complete = batch_in_epoch >= steps_per_epoch

            # --- end of epoch (or of the steps): reduce the train stats, evaluate, checkpoint ---
            totals = torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=device)])
            dist.all_reduce(totals)
            for buf in model.buffers():  # BatchNorm statistics: evaluate rank 0's on every rank
                dist.broadcast(buf, 0)
            test_loss, confusion = evaluate(model, test_loader, device, num_classes, cfg.eval_batches)
            entry: dict[str, Any] = {"epoch": epoch, "step": step, "complete": complete}
            entry["train_loss"] = float(totals[0]) / max(float(totals[2]), 1.0)
            entry["train_accuracy"] = float(totals[1]) / max(float(totals[2]), 1.0)
            entry["test_loss"] = test_loss
            entry["test_accuracy"] = float(confusion.diag().sum()) / max(int(confusion.sum()), 1)
            entry["epoch_time_s"] = epoch_time
            history.append(entry)
            say(
                f"epoch {epoch} {'done' if complete else 'stopped'} at step {step} | "
                f"train loss {entry['train_loss']:.4f} acc {entry['train_accuracy']:.2%} | "
                f"test loss {test_loss:.4f} acc {entry['test_accuracy']:.2%} | {epoch_time:.1f} s"
            )
            if complete:
                epoch += 1
                batch_in_epoch = 0

            rngs = [None] * world_size
            dist.all_gather_object(rngs, _rng_state())
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                ckpt = {
                    "model_name": cfg.model,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": step,
                    "epoch": epoch,  # the epoch to run next (or to finish, if batch_in_epoch > 0)
                    "batch_in_epoch": batch_in_epoch,
                    "batch_size": cfg.batch_size,
                    "history": history,
                    "step_records": step_records,
                    "train_time_s": train_time_s,
                    "images_seen": images_seen,
                    "rng": rngs,
                    "config": asdict(cfg),
                }
                _atomic_write(out / CHECKPOINT_NAME, lambda p, c=ckpt: torch.save(c, p))
    finally:
        if state is not None:
            state.close()
        trace.disable()

    if tracer is not None:  # each rank writes its events; rank 0 joins them into cfg.trace
        part = f"{cfg.trace}.rank{rank}"
        tracer.dump(part)
        dist.barrier()
        if rank == 0:
            parts = [f"{cfg.trace}.rank{r}" for r in range(world_size)]
            trace.merge([p for p in parts if os.path.exists(p)], cfg.trace)  # other hosts' stay there
            for p in parts:
                if os.path.exists(p):
                    os.remove(p)
            say(f"trace: {cfg.trace} ({len(tracer.events)} events on rank 0; open in ui.perfetto.dev)")

    if rank != 0:
        return None
    comm_time = None if state is None else sum(r.get("comm_time_s", 0.0) for r in step_records)
    per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1).double()
    metrics: dict[str, Any] = {
        "algo": cfg.algo,
        "transport": None if cfg.algo == "ddp" else cfg.transport,
        "backend": dist.get_backend(),
        "device": device.type,
        "world_size": world_size,
        "model": cfg.model,
        "parameters": count_parameters(model),
        "dataset": name,
        "dataset_reason": reason,
        "steps": step,
        "epochs_completed": epoch,
        "batch_size_per_worker": cfg.batch_size,
        "global_batch_size": global_batch,
        "peak_lr": peak_lr,
        "schedule": cfg.schedule,
        "train_time_s": train_time_s,
        "throughput_img_s": images_seen / train_time_s if train_time_s > 0 else None,
        "comm_time_s": comm_time,
        "comm_share": None if comm_time is None or train_time_s == 0 else comm_time / train_time_s,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "final_test_accuracy": history[-1]["test_accuracy"] if history else None,
        "history": history,
        "classes": data.classes,
        "per_class_accuracy": dict(zip(data.classes, per_class.tolist())),
        "confusion_matrix": confusion.tolist(),
        "step_records": step_records,
        "checkpoint": str(out / CHECKPOINT_NAME),
        "resumed_from": cfg.resume,
        "config": asdict(cfg),
    }
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / METRICS_NAME, lambda p: p.write_text(json.dumps(metrics, indent=1)))
    return metrics
