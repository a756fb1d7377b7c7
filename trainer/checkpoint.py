"""Checkpoints of a training run: what one holds, how it is written, how a run resumes from it.

``trainer/loop.py`` calls ``save`` at the end of every epoch, when a run stops
mid-epoch (``--max-steps``, ``--time-limit``, Ctrl-C), every ``--checkpoint-every``
steps, and ``restore`` for ``--resume``. A
checkpoint is one ``torch.save`` file, a dict with these keys (tests and tools
read them; keep old files loadable when adding one)::

    model_name      the --model it was trained as; resuming as another model is refused
    model           model.state_dict() of rank 0 (DDP keeps every rank's weights equal)
    optimizer       optimizer.state_dict() (SGD's momentum, AdamW's moments); --zero: gathered, see below
    scheduler       scheduler.state_dict() (a LambdaLR: in effect one step counter)
    step            optimizer steps taken so far
    epoch           the epoch to run next, or to finish if batch_in_epoch > 0
    batch_in_epoch  batches of that epoch already trained on (0 at an epoch boundary)
    batch_size      per worker, as trained; see "Exact resume" below
    history         one entry per finished or stopped epoch, as in metrics.json
    step_records    one record per step, as in metrics.json
    train_time_s    seconds spent in training steps so far (evaluation not counted)
    images_seen     training images consumed so far, all ranks together
    rng             one dict per rank: its torch, numpy and python RNG states (and cuda's)
    config          the run's TrainConfig as a dict, for the reader (resume uses the command line,
                    whose --optimizer, --compress and --compress-warmup must be the saved ones)
    total_steps     the step the run's schedule ended at (absent in older files)
    zero            the run's --zero stage, 0 when not sharded (absent in older files: 0)

ZeRO runs (``--zero 1|2``, ``trainer/zero.py``): rank 0 gathers. Each rank
holds 1/P of the optimizer state; ``save`` all-gathers every state tensor
(``ZeroOptimizer.gathered_state_dict``) and rank 0 writes it, trimmed of the
padding, under ``optimizer`` as one flat tensor per state key and ZeRO bucket
(``zero.BUCKET_BYTES``; a checkpoint of another bucketing is refused, naming both). Why gather
rather than a file per rank: the checkpoint stays one file written atomically
(a file per rank would need a commit protocol so that a crash between the P
renames never leaves shards of two different steps), the RNG states are
gathered the same way already, and the gathered state does not depend on P.
The cost is a transient full copy of the state on every rank during the save
(the all-gather's output) and on rank 0 in the file. ``restore`` gives each
rank its block back and copies its shard of the weights from the loaded model:
the resumed run is bitwise the uninterrupted one. A ``--zero`` checkpoint
resumed without ``--zero`` (or the reverse), or with another ``--optimizer``,
is refused in one line (``mismatch``); stages 1 and 2 hold the same state and
resume each other.

Exact resume. A resumed run replays, bit for bit, the steps the uninterrupted
run would have taken: the weights, the optimizer and the schedule come back,
each rank gets back the RNG state it had (its data augmentation continues the
same stream), and the loop skips the ``batch_in_epoch`` batches of the epoch's
shard it has already trained on (the shard order is a function of the seed and
the epoch). The RNG states fit only the same world size and batch size; with
others the run goes on with fresh streams and says so.

The schedule on resume. The learning rate is a function of the step and of
the run's total (``trainer/loop.py``), and the total is this run's: raise
``--max-steps`` or ``--epochs`` on resume and, from the first resumed step on,
the rate is the one a run planned for the new total would have there (a cosine
that had decayed to 0 at the old end goes back up to where the new plan is,
then decays to the new end). ``restore`` says so when the total changed.

Atomic writes. Rank 0 writes to a temporary file in the same folder, flushes it
to disk and renames it over the old checkpoint: a reader (or a run resumed
after a crash at any moment) sees the previous checkpoint or the new one, never
half of one.
"""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import names
from .zero import ZeroOptimizer

if TYPE_CHECKING:  # loop.py imports this module; the config is only needed for its field names
    from .loop import TrainConfig

__all__ = [
    "CHECKPOINT_NAME",
    "Progress",
    "atomic_write",
    "rng_state",
    "set_rng_state",
    "save",
    "load",
    "restore",
    "nothing_left",
    "mismatch",
]

CHECKPOINT_NAME = names.CHECKPOINT_NAME  # launch.py reads it without torch

#: The keys of the format (see the module docstring); ``load`` refuses a file without one of them.
KEYS = (
    "model_name",
    "model",
    "optimizer",
    "scheduler",
    "step",
    "epoch",
    "batch_in_epoch",
    "batch_size",
    "history",
    "step_records",
    "train_time_s",
    "images_seen",
    "rng",
    "config",
)
#: Keys added since, absent from older files (which still load): see the module docstring.
OPTIONAL_KEYS = ("total_steps", "zero")


@dataclass
class Progress:
    """Where a run stands: everything a checkpoint holds besides the weights, optimizer, schedule and RNG."""

    step: int = 0
    epoch: int = 0  # the epoch to run next, or to finish if batch_in_epoch > 0
    batch_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    step_records: list[dict[str, Any]] = field(default_factory=list)
    train_time_s: float = 0.0  # seconds
    images_seen: int = 0  # all ranks together


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch (CPU), numpy, python, and every CUDA device's if there is one."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back the states ``rng_state`` returned (CUDA's only where there is a device to take them)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``write(binary_file)``, so that readers see the old file or the new, never half.

    The bytes go to a temporary file next to ``path``, are flushed to disk
    (a rename of unflushed data can leave an empty file after a power cut),
    and the file is renamed over ``path``. If ``write`` raises, ``path`` is
    untouched and the temporary file is removed.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save(
    path: Path,
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | ZeroOptimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
    *,
    total_steps: int | None = None,
) -> None:
    """Write the checkpoint of the run as it stands to ``path`` (see the module docstring).

    ``total_steps``: where the run's schedule ends, recorded so that a resumed run can say it changed.

    Collective: every rank of the default group calls it (each contributes its
    RNG state, and with ``--zero`` its block of the optimizer state); rank 0 alone
    writes, atomically, creating the folder if needed.
    """
    rngs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    sharded = isinstance(optimizer, ZeroOptimizer)
    optimizer_state = optimizer.gathered_state_dict() if sharded else None  # collective
    if dist.get_rank() != 0:
        return
    ckpt = {
        "model_name": cfg.model,
        "model": model.state_dict(),
        "optimizer": optimizer_state if sharded else optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": progress.step,
        "epoch": progress.epoch,
        "batch_in_epoch": progress.batch_in_epoch,
        "batch_size": cfg.batch_size,
        "history": progress.history,
        "step_records": progress.step_records,
        "train_time_s": progress.train_time_s,
        "images_seen": progress.images_seen,
        "rng": rngs,
        "config": asdict(cfg),
        "total_steps": total_steps,
        "zero": optimizer.stage if sharded else 0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(ckpt, f))


def load(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The checkpoint at ``path``, its tensors on ``device``.

    It holds numpy and python RNG states, which only a full unpickler reads,
    so ``torch.load`` runs with ``weights_only=False``: load only checkpoints
    you wrote (a local file named on the command line, never one from the network).

    Raises:
        ValueError: the file is not a checkpoint of this format (names the missing keys), or not
            one torch can read at all.
    """
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, ImportError, AttributeError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"{path}: not a trainer checkpoint (torch.load: {why}); "
            f"--resume expects the {CHECKPOINT_NAME} that launch.py writes"
        ) from exc
    if not isinstance(ckpt, dict):
        problem = f"it holds a {type(ckpt).__name__}, not a dict"
    else:
        missing = [key for key in KEYS if key not in ckpt]
        problem = f"missing {', '.join(missing)}" if missing else ""
    if problem:
        raise ValueError(
            f"{path}: not a trainer checkpoint ({problem}); "
            f"--resume expects the {CHECKPOINT_NAME} that launch.py writes"
        )
    return ckpt


def restore(
    path: str | Path,
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | ZeroOptimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    say: Callable[[str], None],
    total_steps: int | None = None,
) -> Progress:
    """Load the checkpoint at ``path`` into the model, optimizer, scheduler and this rank's RNGs.

    Args:
        path: the checkpoint file.
        cfg: this run's config; its ``model`` must be the checkpoint's.
        model: the bare model (not the DDP wrapper), built as the checkpoint's was.
        optimizer, scheduler: built for ``model`` as in the checkpointed run.
        rank, world_size: this process's; the RNG states are restored only if the
            world size and the batch size are the checkpoint's.
        device: where the loaded tensors go.
        say: prints a line (on rank 0): where the run resumes, and whether the RNG streams are fresh.
        total_steps: where this run's schedule ends; if the checkpoint's ended elsewhere, ``say`` tells.

    Returns:
        The progress to continue from.

    Raises:
        ValueError: not a checkpoint, or one of another model.
    """
    ckpt = load(path, device)
    if ckpt["model_name"] != cfg.model:
        raise ValueError(f"--resume {path}: checkpoint is of model {ckpt['model_name']!r}, not {cfg.model!r}")
    why = mismatch(ckpt, cfg)
    if why is not None:
        raise ValueError(f"--resume {path}: {why}")
    model.load_state_dict(ckpt["model"])  # in place: with --zero, into the flat buffers the parameters view
    if isinstance(optimizer, ZeroOptimizer):
        optimizer.load_gathered_state_dict(ckpt["optimizer"])
        optimizer.sync_shards()  # this rank's block of the weights just loaded
    else:
        optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    # The optimizer comes back with the rate of the old schedule at this step; the next step must
    # use this run's schedule (its total may differ): set the rate from the scheduler's rule now.
    old_lr = optimizer.param_groups[0]["lr"]
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        step = scheduler.last_epoch
        for group, base, rule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * rule(step)
    progress = Progress(
        step=ckpt["step"],
        epoch=ckpt["epoch"],
        batch_in_epoch=ckpt["batch_in_epoch"],
        history=ckpt["history"],
        step_records=ckpt["step_records"],
        train_time_s=ckpt["train_time_s"],
        images_seen=ckpt["images_seen"],
    )
    if len(ckpt["rng"]) == world_size and ckpt["batch_size"] == cfg.batch_size:
        set_rng_state(ckpt["rng"][rank])
    else:
        say(
            f"resume: checkpoint from world size {len(ckpt['rng'])}, batch {ckpt['batch_size']}; "
            "continuing with fresh RNG streams (the data order is not the one the old run would have seen)"
        )
    say(
        f"resume: {path} at step {progress.step}, epoch {progress.epoch}, "
        f"batch {progress.batch_in_epoch} of that epoch"
    )
    old_total = ckpt.get("total_steps")
    if total_steps is not None and old_total is not None and old_total != total_steps:
        say(
            f"resume: the schedule now ends at step {total_steps}, not {old_total}: from step "
            f"{progress.step} the learning rate follows the new plan, {optimizer.param_groups[0]['lr']:.4g} "
            f"(the old plan had it at {old_lr:.4g})"
        )
    return progress


def mismatch(ckpt: dict[str, Any], cfg: TrainConfig) -> str | None:
    """Why this run cannot continue ``ckpt``'s optimizer or compressor (its ``--zero``, ``--optimizer``,
    ``--compress`` or ``--compress-warmup``); None if it can."""
    old_zero = ckpt.get("zero", 0)
    new_zero = getattr(cfg, "zero", 0)
    if bool(old_zero) != bool(new_zero):
        said = f"--zero {old_zero}" if old_zero else "no --zero"
        want = "--zero 1 or 2" if old_zero else "no --zero"
        return (
            f"the checkpoint was written with {said} (optimizer state "
            f"{'sharded' if old_zero else 'whole'}); resume it with {want}"
        )
    old_opt = (ckpt.get("config") or {}).get("optimizer", "sgd")  # a checkpoint may hold no config
    new_opt = getattr(cfg, "optimizer", "sgd")
    if old_opt != new_opt:
        return f"the checkpoint holds --optimizer {old_opt}'s state, not {new_opt}'s; resume with --optimizer {old_opt}"
    return _compress_mismatch(ckpt.get("config") or {}, cfg)


#: TrainConfig's compression fields in checkpoints written before they existed.
_COMPRESS_DEFAULTS = {"compress": "none", "compress_warmup": 10}


def _compress_mismatch(old: dict[str, Any], cfg: TrainConfig) -> str | None:
    """Why this run cannot continue a run compressed as ``old`` (its saved config); None if it can.

    PowerSGD and top-k keep state (Q, error feedback) that only the same compressor can continue,
    and their warm-up length decides which steps compress: a resumed run with another would not
    replay the steps the checkpointed run would have taken.
    """
    was = old.get("compress", _COMPRESS_DEFAULTS["compress"])
    now = getattr(cfg, "compress", _COMPRESS_DEFAULTS["compress"])
    stateful = ("powersgd", "topk")
    if was != now and (was.startswith(stateful) or now.startswith(stateful)):
        return f"the checkpoint was written with --compress {was}, this run has --compress {now}; resume with --compress {was}"
    if now.startswith(stateful):
        was_warm = old.get("compress_warmup", _COMPRESS_DEFAULTS["compress_warmup"])
        now_warm = getattr(cfg, "compress_warmup", _COMPRESS_DEFAULTS["compress_warmup"])
        if was_warm != now_warm:
            return (
                f"the checkpoint's {now.split(':')[0]} averaged its first {was_warm} steps uncompressed, this run's "
                f"--compress-warmup is {now_warm}; resume with --compress-warmup {was_warm}"
            )
    return None


def nothing_left(step: int, epoch: int, *, epochs: int, max_steps: int | None) -> str | None:
    """Why a run resumed at ``step`` (with ``epoch`` next to run or finish) would train nothing; None if not."""
    if max_steps is not None and step >= max_steps:
        return (
            f"the checkpoint is at step {step} and --max-steps is {max_steps}; "
            "raise --max-steps (0: no cap) to train on"
        )
    if epoch >= epochs:
        done = f"{epoch} epoch{'s' if epoch != 1 else ''}"
        return f"the checkpoint has finished {done} and --epochs is {epochs}; raise --epochs to train on"
    return None
