"""Train a model data-parallel, averaging gradients with ringcomm's ring (or PS, naive, built-in DDP).

This docstring is the launch manual.

One machine, no torchrun (CPU, Gloo): launch.py spawns the workers itself, on a
free port, and stops them all if one dies::

    python launch.py --algo ring --world-size 4          # the default run, see below
    python launch.py --algo ddp  --world-size 4          # same run, built-in DDP all-reduce
    python launch.py --algo ps --comm-option ps_shards=2 --world-size 4
    python launch.py --algo ring --transport zmq --world-size 4
    python launch.py --model resnet18 --dataset cifar10 --data-dir data --epochs 30 \\
        --batch-size 128 --scale-lr --warmup-epochs 2 --eval-batches 0

The default run (``--algo ring --world-size 4``) needs no network and takes a
few minutes on a 2-core CPU: model ``simplecnn`` (1.1 M parameters), dataset
``auto`` (CIFAR-10 if ``data/cifar-10-batches-py`` exists, else Debian's
Fashion-MNIST, else a synthetic set), 32 images per worker, 1 epoch capped at
``--max-steps 150`` steps, evaluation on 10 test batches of 500 per rank.

torchrun, one node (e.g. 8 GPUs; NCCL, one process per GPU): torchrun starts
the processes and launch.py spawns nothing (it sees TORCHELASTIC_RUN_ID, or
LOCAL_RANK and WORLD_SIZE)::

    torchrun --standalone --nproc-per-node 8 launch.py --algo ring --model resnet50 \\
        --dataset cifar10 --data-dir data --epochs 90 --scale-lr --warmup-epochs 5

torchrun, two nodes (run on both; node 0's address is the rendezvous)::

    # node 0                                    # node 1
    torchrun --nnodes 2 --node-rank 0 \\         torchrun --nnodes 2 --node-rank 1 \\
      --nproc-per-node 8 \\                        --nproc-per-node 8 \\
      --rdzv-backend c10d \\                       --rdzv-backend c10d \\
      --rdzv-endpoint node0:29500 \\               --rdzv-endpoint node0:29500 \\
      launch.py --algo ring ...                   launch.py --algo ring ...

    With --transport zmq, also export RINGCOMM_ZMQ_HOST=<this node's address>
    on each node, so peers connect to an address they can reach.

Output (rank 0): the dataset line first (which and why), a line every
``--log-every`` steps (step, loss, images/s, share of the time spent in the
hook's all-reduce), one line per epoch, a summary. ``--out DIR`` (default
``runs/<algo>-w<world size>``) receives ``metrics.json`` (see
``trainer/loop.py``) and ``checkpoint.pt`` (see ``trainer/checkpoint.py``),
written atomically after each epoch; ``--resume`` continues from it. Exit
status: 0 on success; 1 if a worker failed (the message names the rank) or
the run cannot start (one line on stderr, before any worker starts:
``--device cuda`` without a GPU, no checkpoint to resume from, a bad
``--comm-option``); 2 for arguments argparse rejects; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import ast
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ringcomm import ALGOS, transport_names
from ringcomm.torch_transport import backend_for
from ringcomm.world import WorldError, finish, run_world
from trainer.checkpoint import CHECKPOINT_NAME
from trainer.data import DATASETS
from trainer.loop import METRICS_NAME, SCHEDULES, TrainConfig, train
from trainer.models import MODELS

# Defaults chosen so that `python launch.py --algo ring --world-size 4` is a few minutes on 2 CPU cores.
DEFAULT_MAX_STEPS = 150
DEFAULT_EVAL_BATCHES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring for examples."""
    p = argparse.ArgumentParser(
        description="Data-parallel training with ringcomm gradient all-reduce (see the docstring of launch.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("communication")
    g.add_argument(
        "--algo",
        default="ring",
        choices=["ddp", *ALGOS],
        help="ddp: built-in all-reduce; else ringcomm's hook",
    )
    g.add_argument("--transport", default="torch", choices=transport_names(), help="ringcomm transport")
    g.add_argument(
        "--comm-option", action="append", default=[], metavar="KEY=VALUE", help="all_reduce option"
    )
    g.add_argument("--comm-timeout", type=float, default=None, help="seconds per bucket all-reduce")
    g.add_argument(
        "--backend", choices=["gloo", "nccl"], default=None, help="default: nccl on cuda, gloo on cpu"
    )
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--world-size", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="simplecnn", choices=list(MODELS))
    g.add_argument("--dataset", default="auto", choices=list(DATASETS))
    g.add_argument(
        "--data-dir", default=None, help="CIFAR-10 (cifar-10-batches-py) or Fashion-MNIST idx files"
    )
    g.add_argument(
        "--download", action="store_true", help="CIFAR-10: download into --data-dir (needs network)"
    )
    g.add_argument(
        "--synthetic-size",
        type=int,
        default=10_000,
        help="training images of --dataset synthetic (test: 1/5)",
    )
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=32, help="per worker")
    g.add_argument("--lr", type=float, default=0.05, help="peak learning rate (before --scale-lr)")
    g.add_argument("--scale-lr", action="store_true", help="multiply --lr by the world size (linear scaling)")
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--schedule", default="cosine", choices=list(SCHEDULES))
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument(
        "--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="stop after this many steps; 0: no cap"
    )
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("evaluation, output")
    g.add_argument(
        "--eval-batches", type=int, default=DEFAULT_EVAL_BATCHES, help="test batches per rank; 0: all"
    )
    g.add_argument("--eval-batch-size", type=int, default=500)
    g.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
    g.add_argument("--out", default=None, help="output folder; default runs/<algo>-w<world size>")
    g.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help=f"continue from CHECKPOINT (default: OUT/{CHECKPOINT_NAME})",
    )
    g.add_argument(
        "--time-limit", type=float, default=None, help="seconds before the spawned world is stopped"
    )
    g.add_argument(
        "--trace",
        metavar="FILE",
        help="write a Chrome trace (chrome://tracing, ui.perfetto.dev): per rank forward, backward, "
        "each bucket's all-reduce and each ring message, for the first --trace-steps steps",
    )
    g.add_argument("--trace-steps", type=int, default=20, help="steps to trace (with --trace)")
    args = p.parse_args(argv)
    if args.world_size < 1:
        p.error("--world-size must be at least 1")
    return args


def _option_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def config_from_args(args: argparse.Namespace, world_size: int) -> TrainConfig:
    """The TrainConfig for these arguments (``world_size``: the actual one, for the default --out)."""
    options = {}
    for item in args.comm_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"launch.py: --comm-option expects KEY=VALUE, got {item!r}")
        options[key] = _option_value(value)
    name = args.algo if args.algo == "ddp" else f"{args.algo}-{args.transport}"
    out = args.out or str(Path("runs") / f"{name}-w{world_size}")
    resume = None
    if args.resume is not None:
        resume = args.resume or str(Path(out) / CHECKPOINT_NAME)
        if not Path(resume).is_file():
            raise SystemExit(f"launch.py: --resume: no checkpoint at {resume}")
    return TrainConfig(
        algo=args.algo,
        transport=args.transport,
        comm_options=options,
        comm_timeout=args.comm_timeout,
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        download=args.download,
        synthetic_size=args.synthetic_size,
        batch_size=args.batch_size,
        lr=args.lr,
        scale_lr=args.scale_lr,
        warmup_epochs=args.warmup_epochs,
        schedule=args.schedule,
        epochs=args.epochs,
        max_steps=args.max_steps or None,
        eval_batches=args.eval_batches or None,
        eval_batch_size=args.eval_batch_size,
        workers=args.workers,
        seed=args.seed,
        out=out,
        resume=resume,
        log_every=args.log_every,
        trace=args.trace,
        trace_steps=args.trace_steps,
    )


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher that sets its variables) started this process."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or ("LOCAL_RANK" in env and "WORLD_SIZE" in env)


def device_kind(flag: str) -> str:
    """``cpu`` or ``cuda`` for ``--device``; exits with a one-line message if ``cuda`` has no device.

    Checked here, in the launcher, before any worker starts: a worker would
    otherwise fail inside the process group's set-up (NCCL) or when choosing
    its device, and the launcher would report that as a dead rank.
    """
    if flag == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if flag == "cuda" and torch.cuda.device_count() == 0:
        raise SystemExit(
            "launch.py: --device cuda: no CUDA device is available (torch.cuda.device_count() is 0); "
            "use --device cpu or auto"
        )
    return flag


def _device_for(kind: str, local_rank: int) -> torch.device:
    """This worker's device: CUDA devices are dealt out by local rank (``device_kind`` checked there is one)."""
    if kind == "cuda":
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def summary(metrics: dict[str, Any]) -> str:
    """The closing lines rank 0 prints."""
    comm = (
        "n/a (built-in DDP)"
        if metrics["comm_time_s"] is None
        else f"{metrics['comm_time_s']:.1f} s ({metrics['comm_share']:.0%} of training)"
    )
    lines = [
        f"done: {metrics['algo']} x{metrics['world_size']} | {metrics['model']} on {metrics['dataset']} | "
        f"{metrics['steps']} steps, global batch {metrics['global_batch_size']}",
        f"  train {metrics['train_time_s']:.1f} s, {metrics['throughput_img_s']:.1f} img/s | comm {comm}",
        f"  final train loss {metrics['final_train_loss']:.4f} | test accuracy {metrics['final_test_accuracy']:.2%}",
        f"  wrote {Path(metrics['checkpoint']).parent / METRICS_NAME} and {metrics['checkpoint']}",
    ]
    return "\n".join(lines)


def _spawned_rank(rank: int, world_size: int, cfg: TrainConfig, kind: str) -> dict[str, Any] | None:
    """What each spawned process runs (``run_world`` has initialised the process group)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    metrics = train(cfg, rank, world_size, _device_for(kind, rank))
    if metrics is not None:
        print(summary(metrics), flush=True)
    return None  # rank 0 wrote metrics.json; nothing large goes back through the queue


def _torchrun_main(args: argparse.Namespace, kind: str, backend: str) -> int:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(kind, local_rank)
    dist.init_process_group(backend, device_id=device if kind == "cuda" else None)
    ok = False
    try:
        cfg = config_from_args(args, dist.get_world_size())
        metrics = train(cfg, dist.get_rank(), dist.get_world_size(), device)
        if metrics is not None:
            print(summary(metrics), flush=True)
        ok = True
    finally:
        finish(ok)  # ringcomm's comm thread first, then the group (ringcomm/world.py)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse, then train under torchrun's processes or in a world spawned here."""
    args = parse_args(argv)
    kind = device_kind(args.device)
    backend = args.backend or backend_for(kind)
    if under_torchrun():
        return _torchrun_main(args, kind, backend)

    cfg = config_from_args(args, args.world_size)
    # SIGTERM to the launcher: unwind through run_world, which stops and joins every worker.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        run_world(
            _spawned_rank,
            args.world_size,
            (cfg, kind),
            timeout=args.time_limit or float("inf"),
            backend=backend,
        )
    except WorldError as exc:
        print(f"launch.py: {exc}", file=sys.stderr, flush=True)
        print("launch.py: stopped the other workers; exiting with status 1", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("launch.py: interrupted; workers stopped", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
