"""Train a model data-parallel, averaging gradients with ringcomm's ring (or PS, naive, built-in DDP).

This docstring is the launch manual.

One machine, no torchrun (CPU, Gloo): launch.py starts the workers itself, on a
free port, and stops them all if one dies. They fork from one server process that
imported torch and the trainer once (about 2 s of CPU saved per worker on a small
machine); ``RINGCOMM_START=spawn`` starts each as a new interpreter instead::

    python launch.py --algo ring --world-size 4          # the default run, see below
    python launch.py --algo ddp  --world-size 4          # same run, built-in DDP all-reduce
    python launch.py --algo ps --comm-option ps_shards=2 --world-size 4
    python launch.py --algo ring --world-size 4 --time-limit 600 --checkpoint-every 50
    python launch.py --algo ring --world-size 4 --resume --max-steps 300   # the same run, on to 300
    python launch.py --algo ring --transport zmq --world-size 4
    python launch.py --algo ring --zero 1 --optimizer adamw       # 1/P of the optimizer state per rank
    python launch.py --algo ring --compress powersgd:2 --compress-warmup 10   # or bf16, fp16, topk:0.01
    python launch.py --algo hier --world-size 4 --comm-option hier_ranks_per_node=2   # two-level all-reduce
    python launch.py --model resnet18 --dataset cifar10 --data-dir data --epochs 30 \\
        --batch-size 128 --scale-lr --warmup-epochs 2 --eval-batches 0

The default run (``--algo ring --world-size 4``) needs no network and takes
about a minute on a 2-core CPU: model ``simplecnn`` (1.1 M parameters), dataset
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
hook's all-reduce, learning rate), one line per epoch, a summary. ``--out DIR``
(default ``runs/ALGO-TRANSPORT-wP``, ``runs/ddp-wP`` for ``--algo ddp``)
receives ``metrics.json`` (see ``trainer/loop.py``) and ``checkpoint.pt``
(see ``trainer/checkpoint.py``), written atomically after each epoch, every
``--checkpoint-every`` steps, and when the run stops early; ``--resume``
continues from it.

Stopping early. Ctrl-C (SIGINT to the launcher) asks the workers to stop
after their current step: they write the checkpoint and ``metrics.json`` and
the launcher exits 130; a second Ctrl-C stops them at once (a SIGINT within a second of the
first is the same one: ``timeout -s INT`` and batch schedulers signal the launcher and its group
together), and says whether a checkpoint was saved. ``--time-limit S``
does the same after S seconds of training and exits 124 (as ``timeout`` does);
if the world has not ended ``TIME_LIMIT_GRACE_S`` later, it is stopped. Under
torchrun, torchrun decides how workers stop: use ``--checkpoint-every``.

Mistakes are said before any work starts, in one line on stderr that names
the option (``launch.py: --data-dir /wrong/path: no such folder``): argparse's
own (a bad number, an unknown choice) exit 2 and come before torch is even
imported; the launcher's checks exit 1: an option the chosen ``--algo``
ignores or refuses (every ``--comm-option`` of ``--algo ddp``), an explicit
``--data-dir`` or ``--dataset`` that cannot be served (``--dataset auto``
with ``--data-dir`` reads from that folder or fails, never falls back to
synthetic data), a failed ``--download``, ``--device cuda`` without a GPU, a
checkpoint that is missing, of another model, or has nothing left to train.

Exit status: 0 on success; 1 if a worker failed (the message says which rank
failed first and why, then what the others did) or the run cannot start; 2
for arguments argparse rejects; 124 when ``--time-limit`` stopped the run;
130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import ast
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ringcomm.names import ALGO_NAMES, TRANSPORT_NAMES, AlgoSpec

# The names argparse offers, from the torch-free lists the registries are built from (one source:
# ringcomm/names.py and trainer/names.py), and the one parser of every command (ringcomm/tools/cli.py).
from ringcomm.tools.cli import DEFAULT_WORLD_SIZE, at_least, non_negative, positive, seconds, unwritable
from ringcomm.tools.cli import parser as make_parser
from trainer.names import CHECKPOINT_NAME, DATASET_NAMES, METRICS_NAME, MODEL_NAMES, SCHEDULE_NAMES

# Nothing above imports torch: argparse's errors and --help come at once. torch, ringcomm and the
# trainer (1.5 s and more to import) are imported by the functions that need them, after parsing.
if TYPE_CHECKING:
    import torch

    from trainer.loop import TrainConfig

# Defaults chosen so that `python launch.py --algo ring --world-size 4` is about a minute on 2 CPU cores.
DEFAULT_MAX_STEPS = 150
DEFAULT_EVAL_BATCHES = 10
#: Seconds a world gets past --time-limit to stop at a step, evaluate and write its checkpoint.
TIME_LIMIT_GRACE_S = 120.0
#: Exit statuses besides 0, 1 and argparse's 2 (see the module docstring).
EXIT_TIME_LIMIT = 124
EXIT_INTERRUPTED = 130


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring for examples. Imports no torch."""
    p = make_parser(
        "launch.py", "Data-parallel training with ringcomm gradient all-reduce (see the docstring of launch.py)."
    )
    g = p.add_argument_group("communication")
    g.add_argument(
        "--algo",
        default="ring",
        choices=_AlgoChoices(["ddp", *ALGO_NAMES]),
        help="ddp: built-in all-reduce; else ringcomm's hook; the bench's labels work too: ps:2 is "
        "--algo ps --comm-option ps_shards=2, ps+overlap is ps_overlap=True",
    )
    g.add_argument("--transport", default="torch", choices=TRANSPORT_NAMES, help="ringcomm transport")
    g.add_argument(
        "--comm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the --algo, e.g. ps_shards=2; repeat for more (default: the algorithm's own)",
    )
    g.add_argument(
        "--compress",
        default="none",
        metavar="none|bf16|fp16|powersgd:R|topk:F",
        help="gradient compression (trainer/compress.py): bf16/fp16 on the wire, PowerSGD rank R, "
        "top-k fraction F (default: none)",
    )
    g.add_argument(
        "--compress-warmup",
        type=at_least(0),
        default=None,
        metavar="N",
        help="with --compress powersgd:R or topk:F: the first N steps average uncompressed (default: 10)",
    )
    g.add_argument(
        "--comm-timeout",
        type=seconds,
        default=None,
        help="seconds per bucket all-reduce (default: ringcomm's)",
    )
    g.add_argument(
        "--backend",
        choices=["gloo", "nccl"],
        default=None,
        help="torch.distributed backend (default: nccl on cuda, gloo on cpu)",
    )
    g.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if there is a GPU"
    )
    g.add_argument(
        "--world-size",
        type=at_least(1),
        default=DEFAULT_WORLD_SIZE,
        help="processes to spawn (ignored under torchrun)",
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="simplecnn", choices=MODEL_NAMES, help="see trainer/models.py")
    g.add_argument(
        "--dataset",
        default="auto",
        choices=DATASET_NAMES,
        help="auto: cifar10 if its files are there, else fashion-mnist, else synthetic",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="folder with cifar-10-batches-py or the Fashion-MNIST idx files (default: data, then "
        "Debian's Fashion-MNIST)",
    )
    g.add_argument(
        "--download", action="store_true", help="CIFAR-10: download into --data-dir (needs network)"
    )
    g.add_argument(
        "--synthetic-size",
        type=at_least(1),
        default=10_000,
        help="training images of --dataset synthetic (test: 1/5)",
    )
    g.add_argument("--workers", type=at_least(0), default=0, help="DataLoader worker processes per rank")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=at_least(1), default=32, help="images per worker per step")
    g.add_argument("--lr", type=positive, default=0.05, help="peak learning rate (before --scale-lr)")
    g.add_argument("--scale-lr", action="store_true", help="multiply --lr by the world size (linear scaling)")
    g.add_argument(
        "--warmup-epochs", type=non_negative, default=0.0, help="linear warmup to the peak rate, in epochs"
    )
    g.add_argument("--schedule", default="cosine", choices=SCHEDULE_NAMES, help="after warmup, per step")
    g.add_argument(
        "--optimizer",
        default="sgd",
        choices=["sgd", "adamw"],
        help="sgd: momentum 0.9, weight decay 5e-4; adamw: torch's defaults; either on the same schedule",
    )
    g.add_argument(
        "--zero",
        type=int,
        default=0,
        choices=[0, 1, 2],
        help="shard the optimizer state over the ranks (ZeRO-1), and the gradient after its reduce-scatter (2)",
    )
    g.add_argument("--epochs", type=at_least(1), default=1, help="passes over the training set")
    g.add_argument(
        "--max-steps",
        type=at_least(0),
        default=DEFAULT_MAX_STEPS,
        help="stop after this many steps in all; 0: no cap",
    )
    g.add_argument("--seed", type=int, default=0, help="weights, data order and augmentation")
    g = p.add_argument_group("evaluation, output")
    g.add_argument(
        "--eval-batches",
        type=at_least(0),
        default=DEFAULT_EVAL_BATCHES,
        help="test batches per rank; 0: all",
    )
    g.add_argument("--eval-batch-size", type=at_least(1), default=500, help="test images per batch")
    g.add_argument("--log-every", type=at_least(1), default=20, help="steps between progress lines")
    g.add_argument(
        "--out",
        default=None,
        help="output folder (default: runs/ALGO-TRANSPORT-wP, e.g. runs/ring-torch-w4; runs/ddp-wP for ddp)",
    )
    g.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help=f"continue from CHECKPOINT (--resume alone: OUT/{CHECKPOINT_NAME})",
    )
    g.add_argument(
        "--checkpoint-every",
        type=at_least(1),
        default=None,
        metavar="N",
        help="also write the checkpoint every N steps (default: at each epoch's end and when the run stops)",
    )
    g.add_argument(
        "--time-limit",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="stop at the first step after this many seconds of training, write the checkpoint, exit "
        f"{EXIT_TIME_LIMIT} (default: no limit)",
    )
    g.add_argument(
        "--trace",
        metavar="FILE",
        help="write a Chrome trace (chrome://tracing, ui.perfetto.dev): per rank forward, backward, "
        "each bucket's all-reduce and each ring message, for the first --trace-steps steps (default: none)",
    )
    g.add_argument("--trace-steps", type=at_least(1), default=20, help="steps to trace (with --trace)")
    args = p.parse_args(argv)
    if args.algo not in ("ddp", *ALGO_NAMES):  # a bench label (ps:2, ps+overlap): its options, spelled out
        spec = AlgoSpec.parse(args.algo)
        args.algo = spec.algo
        args.comm_option = [f"{k}={v}" for k, v in spec.options.items()] + args.comm_option
    # Every output is checked before any work: a mistyped path used to fail after training, with a
    # traceback, and lose metrics.json with it.
    world_size = int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.world_size
    for flag, path, folder in (("--out", out_dir(args, world_size), True), ("--trace", args.trace, False)):
        why = path and unwritable(path, folder=folder)
        if why:
            p.error(f"{flag} {path}: {why}")
    return args


class _AlgoChoices(tuple):
    """``--algo``'s choices (listed in --help and errors), which also hold the bench's labels of them.

    ``ps:2`` and ``ps+overlap`` (``names.AlgoSpec``) name an algorithm with options; a transport
    suffix (``ring@zmq``) does not belong here (that is ``--transport``).
    """

    def __contains__(self, text: object) -> bool:
        if tuple.__contains__(self, text):
            return True
        if not isinstance(text, str) or "@" in text:
            return False
        try:
            return AlgoSpec.parse(text).algo in ALGO_NAMES
        except ValueError:
            return False


def _refuse(message: str) -> NoReturn:
    """The launcher's one line for a run it will not start (exit status 1)."""
    raise SystemExit(f"launch.py: {message}")


def _option_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def comm_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--comm-option KEY=VALUE ...`` as a dict; refuses options that ``--algo ddp`` would ignore.

    Their names and values are checked against the algorithm by ``check_run``, which needs ringcomm.
    """
    options = {}
    for item in args.comm_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _refuse(f"--comm-option expects KEY=VALUE, got {item!r}")
        options[key] = _option_value(value)
    if args.algo == "ddp":  # DDP's own all-reduce: ringcomm's settings would be silently ignored
        for flag, given in (
            ("--comm-option " + " ".join(args.comm_option), options),
            (f"--comm-timeout {args.comm_timeout:g}" if args.comm_timeout else "", args.comm_timeout),
            (f"--transport {args.transport}", args.transport != "torch"),
        ):
            if given:
                _refuse(
                    f"{flag}: --algo ddp uses DDP's built-in all-reduce, which takes no ringcomm settings"
                )
    return options


def check_compress_arg(args: argparse.Namespace) -> None:
    """``--compress``: a known value, and refused in one line with ``--algo ddp``, ``--algo ps`` (top-k), ``--zero``.

    ``--compress-warmup`` is refused with any other ``--compress`` than PowerSGD and top-k (argparse refuses a negative N).
    """
    from ringcomm.compress import parse_compress

    try:
        kind, _ = parse_compress(args.compress)
    except ValueError as exc:
        _refuse(str(exc))
    warmup = getattr(args, "compress_warmup", None)
    if warmup is not None and kind not in ("powersgd", "topk"):  # the others have no warm-up: N would change nothing
        _refuse(f"--compress-warmup {warmup}: only --compress powersgd:R and topk:F have uncompressed warm-up steps")
    if kind == "none":
        return
    if args.algo == "ddp":
        _refuse(f"--compress {args.compress}: --algo ddp uses DDP's built-in all-reduce; compression is ringcomm's")
    if kind == "topk" and args.algo == "ps":
        _refuse(f"--compress {args.compress}: top-k gathers every rank's entries (all_gather); --algo ps cannot")
    if args.zero:
        _refuse(f"--compress {args.compress}: --zero shards the gradients itself (reduce_scatter); not with compression")


def out_dir(args: argparse.Namespace, world_size: int) -> str:
    """``--out``, or its default for this run."""
    name = args.algo if args.algo == "ddp" else f"{args.algo}-{args.transport}"
    return args.out or str(Path("runs") / f"{name}-w{world_size}")


def resume_path(args: argparse.Namespace, world_size: int) -> str | None:
    """The checkpoint ``--resume`` names (alone: the one in the run's folder), refused if it is not a file."""
    if args.resume is None:
        return None
    path = args.resume or str(Path(out_dir(args, world_size)) / CHECKPOINT_NAME)
    if not Path(path).is_file():
        _refuse(f"--resume: no checkpoint at {path}")
    return path


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """The launcher's checks that need no torch (one line, exit status 1): they come first."""
    comm_options(args)
    if args.zero and args.algo == "ddp":
        _refuse(f"--zero {args.zero} needs one of ringcomm's algorithms (its reduce-scatter), not --algo ddp")
    check_compress_arg(args)
    if args.data_dir and not args.download and not Path(args.data_dir).is_dir():
        _refuse(f"--data-dir {args.data_dir}: no such folder")
    resume_path(args, world_size)


def config_from_args(args: argparse.Namespace, world_size: int) -> TrainConfig:
    """The TrainConfig for these arguments (``world_size``: the actual one, for the default --out)."""
    from trainer.loop import TrainConfig

    return TrainConfig(
        algo=args.algo,
        transport=args.transport,
        comm_options=comm_options(args),
        comm_timeout=args.comm_timeout,
        compress=args.compress,
        **({} if args.compress_warmup is None else {"compress_warmup": args.compress_warmup}),
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
        optimizer=args.optimizer,
        zero=args.zero,
        epochs=args.epochs,
        max_steps=args.max_steps or None,
        eval_batches=args.eval_batches or None,
        eval_batch_size=args.eval_batch_size,
        workers=args.workers,
        seed=args.seed,
        out=out_dir(args, world_size),
        resume=resume_path(args, world_size),
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        time_limit=args.time_limit,
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
    import torch

    if flag == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if flag == "cuda" and torch.cuda.device_count() == 0:
        _refuse(
            "--device cuda: no CUDA device is available (torch.cuda.device_count() is 0); "
            "use --device cpu or auto"
        )
    return flag


def check_run(cfg: TrainConfig, args: argparse.Namespace, kind: str, backend: str, world_size: int) -> None:
    """Everything that can be known wrong before a worker starts, each said in one line (exit 1).

    The backend for the device; the transport for the device and the options for
    the algorithm (``ringcomm.api.validate``, as the comm hook will); the dataset
    (``trainer.data.check_source``); the checkpoint to resume from: readable, of
    this model, with steps left to train.
    """
    if backend == "nccl" and kind != "cuda":
        _refuse(f"--backend nccl needs CUDA devices; this run is on {kind} (use --backend gloo)")
    if cfg.algo != "ddp":
        from ringcomm.api import validate

        try:
            validate(cfg.algo, cfg.transport, kind, {}, world_size)
        except ValueError as exc:
            _refuse(f"--transport {cfg.transport} --device {args.device}: {exc}")
        try:
            validate(cfg.algo, cfg.transport, kind, cfg.comm_options, world_size)
        except ValueError as exc:
            given = " ".join(args.comm_option)
            said = str(exc)
            _refuse(f"--comm-option {said}" if said.startswith(given) else f"--comm-option {given}: {said}")
    from trainer.data import DataSourceError, check_source

    try:
        check_source(cfg.dataset, cfg.data_dir, cfg.download)
    except DataSourceError as exc:
        _refuse(str(exc))
    if cfg.resume is not None:
        from trainer import checkpoint

        try:
            ckpt = checkpoint.load(cfg.resume)
        except ValueError as exc:
            _refuse(f"--resume {exc}")
        if ckpt["model_name"] != cfg.model:
            _refuse(
                f"--resume {cfg.resume}: the checkpoint is of --model {ckpt['model_name']}, not {cfg.model}"
            )
        why = checkpoint.mismatch(ckpt, cfg)
        if why is not None:
            _refuse(f"--resume {cfg.resume}: {why}")
        why = checkpoint.nothing_left(ckpt["step"], ckpt["epoch"], epochs=cfg.epochs, max_steps=cfg.max_steps)
        if why is not None:
            _refuse(f"--resume {cfg.resume}: nothing left to train: {why}")


def _device_for(kind: str, local_rank: int) -> torch.device:
    """This worker's device: CUDA devices are dealt out by local rank (``device_kind`` checked there is one)."""
    import torch

    if kind == "cuda":
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def summary(metrics: dict[str, Any]) -> str:
    """The closing lines rank 0 prints: what was trained, how fast, the last epoch's numbers, the files."""
    comm = (
        "n/a (built-in DDP)"
        if metrics["comm_time_s"] is None
        else f"{metrics['comm_time_s']:.1f} s ({metrics['comm_share']:.0%} of training)"
    )
    last = metrics["history"][-1]
    part = "complete" if last["complete"] else "partial"
    steps = last.get("train_steps")
    over = f" over steps {last['step'] - steps + 1}-{last['step']}" if steps else ""
    before = [h for h in metrics["history"][:-1] if h["epoch"] == last["epoch"]]
    if steps and before:  # the epoch began in the run this one resumed: its mean covers this run's steps
        over += f" (since the resume at step {before[-1]['step']})"
    tested = sum(map(sum, metrics["confusion_matrix"]))
    stopped = {"interrupted": "stopped early (Ctrl-C):", "time-limit": "stopped early (--time-limit):"}.get(
        metrics.get("stopped"), "done:"
    )
    out = Path(metrics["checkpoint"]).parent
    lines = [
        f"{stopped} {metrics['algo']} x{metrics['world_size']} | {metrics['model']} on {metrics['dataset']} | "
        f"{metrics['steps']} steps, global batch {metrics['global_batch_size']}",
        f"  train {metrics['train_time_s']:.1f} s, {metrics['throughput_img_s']:.1f} img/s | comm {comm}",
        f"  epoch {last['epoch']} ({part}, to step {last['step']}): mean train loss {last['train_loss']:.4f}{over} "
        f"| test accuracy {last['test_accuracy']:.2%} on {tested} test images",
        f"  wrote {out / METRICS_NAME} and {metrics['checkpoint']} (step {metrics['steps']})",
    ]
    if metrics.get("stopped"):
        lines.append(f"  to continue: the same command with --resume {metrics['checkpoint']}")
    return "\n".join(lines)


def _spawned_rank(rank: int, world_size: int, cfg: TrainConfig, kind: str) -> str | None:
    """What each spawned process runs (``run_world`` has initialised the process group).

    Returns, on rank 0, why the run stopped early (``trainer.loop.STOP_REASONS``) or None.
    """
    import torch

    from trainer.loop import request_stop, train

    # Ctrl-C reaches every worker (the terminal signals the whole group, the launcher forwards it):
    # each one finishes its step; the ranks agree to stop and write the checkpoint (trainer/loop.py).
    signal.signal(signal.SIGINT, lambda signum, frame: request_stop("interrupted"))
    # started with SIGINT held (ringcomm.tools.cli.sigint_held_by_children): one that came meanwhile acts now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    metrics = train(cfg, rank, world_size, _device_for(kind, rank))
    if metrics is None:
        return None
    print(summary(metrics), flush=True)
    return metrics["stopped"]  # rank 0 wrote metrics.json; nothing large goes back through the queue


def _torchrun_main(args: argparse.Namespace, kind: str, backend: str) -> int:
    import torch.distributed as dist

    from ringcomm.tools.spawn import finish
    from trainer.loop import request_stop, train

    world_size = int(os.environ["WORLD_SIZE"])
    cfg = config_from_args(args, world_size)
    check_run(cfg, args, kind, backend, world_size)
    signal.signal(signal.SIGINT, lambda signum, frame: request_stop("interrupted"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device_for(kind, local_rank)
    dist.init_process_group(backend, device_id=device if kind == "cuda" else None)
    ok = False
    stopped = None
    try:
        metrics = train(cfg, dist.get_rank(), dist.get_world_size(), device)
        if metrics is not None:
            print(summary(metrics), flush=True)
            stopped = metrics["stopped"]
        ok = True
    finally:
        finish(ok)  # ringcomm's comm thread first, then the group (ringcomm/tools/spawn.py)
    return {None: 0, "time-limit": EXIT_TIME_LIMIT, "interrupted": EXIT_INTERRUPTED}[stopped]


#: Seconds within which SIGINTs to the launcher count as one Ctrl-C: ``timeout -s INT`` and batch
#: schedulers signal the launcher and its whole group at once, so it receives the same stop twice.
CTRL_C_TOGETHER_S = 1.0


class _CtrlC:
    """The launcher's SIGINT handler: the first asks the workers to stop after their step, a later one now.

    A SIGINT within ``CTRL_C_TOGETHER_S`` of the first is the same request delivered twice, not a
    second Ctrl-C (a person's second press comes later than that).
    """

    def __init__(self) -> None:
        self.first_at: float | None = None

    @property
    def seen(self) -> bool:
        return self.first_at is not None

    def __call__(self, signum: int, frame: Any) -> None:
        import multiprocessing
        import time

        now = time.monotonic()
        if self.first_at is not None:
            if now - self.first_at < CTRL_C_TOGETHER_S:
                return  # the same stop, sent to the launcher and to its group
            raise KeyboardInterrupt  # run_world stops and joins the workers on its way out
        self.first_at = now
        print(
            "launch.py: interrupted: the workers stop after their current step and write the checkpoint "
            "(Ctrl-C again: stop them now, without one)",
            file=sys.stderr,
            flush=True,
        )
        for child in multiprocessing.active_children():  # also when SIGINT was sent to the launcher alone
            try:
                os.kill(child.pid, signal.SIGINT)
            except (ProcessLookupError, TypeError):  # exited meanwhile
                pass


def _saved(out: str, since: float) -> str:
    """What a run stopped at once left in ``out``: whether it wrote a checkpoint (``since``: its start, epoch s)."""
    import time

    path = Path(out) / CHECKPOINT_NAME
    if not path.is_file():
        return f"nothing was saved (no {CHECKPOINT_NAME} in {out})"
    written = path.stat().st_mtime
    if written < since:
        return f"nothing new was saved; {path} is from before this run"
    return f"the last checkpoint this run saved, {time.time() - written:.0f} s ago, is {path} (--resume continues it)"


def main(argv: list[str] | None = None) -> int:
    """Parse, check, then train under torchrun's processes or in a world spawned here."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the workers started: importing torch, checking the data
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the same stop, sent to the group too, may follow
        print("launch.py: interrupted before training started; nothing was saved", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    check_args(args, int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.world_size)

    from ringcomm.transports.torch import backend_for

    kind = device_kind(args.device)
    backend = args.backend or backend_for(kind)
    if under_torchrun():
        return _torchrun_main(args, kind, backend)

    from ringcomm.tools.spawn import WorldError, run_world, start_method, stop_forkserver, use_forkserver

    try:
        start = start_method()
    except ValueError as exc:
        _refuse(str(exc))
    cfg = config_from_args(args, args.world_size)
    check_run(cfg, args, kind, backend, args.world_size)
    if cfg.download:  # here, once, so that a failure is one line before any worker starts
        from trainer.data import DataSourceError, download_cifar10

        try:
            download_cifar10(cfg.data_dir or "data")
        except DataSourceError as exc:
            _refuse(str(exc))
        cfg.download = False

    # SIGTERM to the launcher: unwind through run_world, which stops and joins every worker.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    ctrl_c = _CtrlC()
    signal.signal(signal.SIGINT, ctrl_c)
    import time

    started_at = time.time()
    limit = float("inf") if cfg.time_limit is None else cfg.time_limit + TIME_LIMIT_GRACE_S
    if start == "forkserver":  # every check passed: the workers fork from a server that imported these once
        use_forkserver(("torch", "torch.distributed", "ringcomm", "ringcomm.api", "trainer.loop"))
    from ringcomm.tools.cli import sigint_held_by_children

    try:
        with sigint_held_by_children():  # a worker still starting acts on Ctrl-C once it can stop cleanly
            stopped = run_world(_spawned_rank, args.world_size, (cfg, kind), timeout=limit, backend=backend)[0]
    except WorldError as exc:
        if exc.traceback:
            print(f"launch.py: rank {exc.rank}'s traceback:\n{exc.traceback.rstrip()}", file=sys.stderr)
        print(f"launch.py: {exc.summary}", file=sys.stderr, flush=True)
        if ctrl_c.seen:
            print(f"launch.py: interrupted; the workers ended early: {_saved(cfg.out, started_at)}", file=sys.stderr)
            return EXIT_INTERRUPTED
        print("launch.py: stopped the other workers; exiting with status 1", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(
            f"launch.py: interrupted again: the workers are stopped now; {_saved(cfg.out, started_at)}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    finally:
        stop_forkserver()  # its workers are joined: the server ends now, not a moment after us
    return {None: 0, "time-limit": EXIT_TIME_LIMIT, "interrupted": EXIT_INTERRUPTED}[stopped]


if __name__ == "__main__":
    sys.exit(main())
