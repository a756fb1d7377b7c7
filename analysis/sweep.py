"""``python -m analysis.sweep``: run the training and benchmark experiments into one results folder.

    python -m analysis.sweep --quick --dry-run          # print the plan, run nothing
    python -m analysis.sweep --quick --out results/quick # about 11 minutes on a 2-core CPU
    python -m analysis.sweep --full --out results/full   # real hardware; an hour or more
    python -m analysis.report results/quick              # then: tables, figures, REPORT.md
    python -m analysis.sweep --hier --out results/hier   # root: two-level all-reduce on multi-rank nodes
    python -m analysis.sweep --zero --out results/zero   # ZeRO memory and step time (its cluster part: root)

What runs (each a subprocess with its own timeout; a run that fails or times
out is recorded in ``sweep.json`` and the sweep goes on). Each run leads a
process group of its own; a run that times out, or is cut short by Ctrl-C, is
stopped with everything it started (launch.py's ranks, the bench's world):
SIGTERM to the group, ``KILL_GRACE_S`` seconds, then SIGKILL, so no stray rank
competes with the runs that follow.

``train``       ``launch.py`` for each algorithm (ddp; ring and ps over the torch
                and zmq transports) at each world size, fixed model, data and
                steps -> ``train/<name>/metrics.json``. Speedup and efficiency
                come from these. At P = 1 the transport carries nothing, so only
                the torch transport runs there (ring at P = 1 is a valid no-op).
``bench``       ``python -m ringcomm.bench`` over sizes x world sizes x algorithms
                -> ``bench/<name>.json``. One world per transport and group of
                algorithms, each with gloo as the in-world reference, so one
                algorithm that is broken or missing loses only its own group.
``batch``       time per epoch against per-worker batch size (32 ... 2048).
``largebatch``  a small-batch reference and a large batch with and without linear
                learning-rate scaling (LR x large/small batch) plus warmup; accuracies
                are compared.
``trace``       one short run with ``--trace trace.json`` for the timeline figure.
``compress``    ``launch.py --compress METHOD`` for each method at each link rate, one world size
                (``Preset.compress_*``; a link of None: the ranks on this host, no link limit)
                -> ``compress/<name>/metrics.json``. The ``compression`` preset (``--compression``,
                root) is this alone: time per step against link rate, per method.
``zero``        ``launch.py --zero STAGE --optimizer OPT`` (ring over torch) for each stage at each
                world size on this host, then at each link of an emulated cluster, one rank per node
                (``Preset.zero_*``) -> ``zero/<name>/metrics.json``. The ``zero`` preset (``--zero``)
                is this alone: the report's "Sharded optimizer (ZeRO)" section.
``compress_loss`` ``launch.py --compress METHOD --seed S`` for each method and each of
                ``Preset.compress_seeds``, on this host -> ``compress_loss/<name>/metrics.json``, whose
                step records hold the loss and time of every step. The ``compression_loss`` preset
                (``--compression-loss``, no root) is this alone: the learning goals of issue 24.

The ``cluster`` preset (``--cluster``, needs root) runs the benchmark and the
training inside ``python -m analysis.cluster``: one node per rank, each behind
its own rate-limited link (``Preset.cluster_link``), so ring against parameter
server is measured as on real machines. In its algorithm lists ``ps:P`` is a
parameter server with one shard per rank (P, the world size of the run).

The ``hier`` preset (``--hier``, needs root) benchmarks the two-level all-reduce
(``docs/two-level.md``) on clusters of multi-rank nodes: for each nodes x ranks
per node in ``Preset.node_shapes`` and each placement (``contiguous``,
``interleaved``), one world times Gloo's all_reduce, the flat ring and ``hier``
(``analysis.cluster --ranks-per-node G --placement PLACEMENT``). The report's
section "Two-level all-reduce" sets them beside ``cost.HIER`` and
``cost.flat_ring_link_bytes``.

``sweep.json`` records the preset, the machine, the environment and, for
every run, the exact command, its wall time, return code and status.
Child output goes to ``logs/<name>.log``.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO

from ringcomm.tools.cli import unwritable
from ringcomm.tools.machine import machine_info

from . import CliParser

__all__ = ["Preset", "PRESETS", "Run", "build_plan", "run_plan", "main", "REPO_ROOT", "KILL_GRACE_S", "stop_group"]

#: The repository root: launch.py lives here and every command runs here.
REPO_ROOT = Path(__file__).resolve().parents[1]

KINDS = ("train", "bench", "batch", "largebatch", "trace", "compress", "compress_loss", "zero")

#: Seconds a stopped run's processes get between SIGTERM and SIGKILL: launch.py uses them to
#: stop its ranks and flush its log.
KILL_GRACE_S = 10.0


@dataclass(frozen=True)
class Preset:
    """Everything a sweep varies. Sizes are ``ringcomm.bench`` size strings (powers of 1024)."""

    # training: algorithm x transport x world size, everything else fixed
    train_algos: tuple[tuple[str, str], ...]
    train_world_sizes: tuple[int, ...]
    model: str
    dataset: str
    batch_size: int  # per worker
    epochs: int
    max_steps: int | None  # None: full epochs (passed as --max-steps 0)
    lr: float
    seed: int
    train_timeout_s: float
    # collective benchmark
    bench_world_sizes: tuple[int, ...]
    bench_sizes: tuple[str, ...]
    bench_groups: tuple[tuple[str, tuple[str, ...]], ...]  # (transport, algos); gloo is added to each
    bench_reps: int
    bench_sample_s: float
    bench_timeout_s: float
    # batch-size sweep (per-worker batch sizes) at one world size
    batch_sizes: tuple[int, ...]
    batch_world_size: int
    batch_max_steps: int | None
    # large batch: reference batch, large batch, with/without --scale-lr + warmup
    large_world_size: int
    large_small_batch: int
    large_batch: int
    large_epochs: int
    large_warmup_epochs: float
    large_max_steps: int | None
    env: dict = field(default_factory=dict)
    # the kinds of run this preset has (the others are left out of its plan)
    kinds: tuple[str, ...] = KINDS
    # None: ranks are processes of this host. A tc rate ("500mbit"): every bench and training run
    # goes through analysis.cluster, one node per rank, each NIC shaped to this rate both ways.
    cluster_link: str | None = None
    bench_warmup: int | None = None  # None: ringcomm.bench's default
    # compression: --compress METHOD x link at one world size, ring over torch; a link of None runs
    # the ranks on this host (no link limit: what the compression itself costs)
    compress_methods: tuple[str, ...] = ()
    compress_links: tuple[str | None, ...] = ()
    compress_world_size: int = 4
    compress_extra: tuple[str, ...] = ()  # more launch.py options for every compression run
    # compression's learning cost (kind compress_loss): each of compress_methods from each of these seeds
    # (launch.py --seed), on this host, max_steps steps; the report reads the loss in each step record
    compress_seeds: tuple[int, ...] = ()
    # (nodes, ranks per node) of the cluster's bench worlds, each run once per placement (analysis.cluster
    # --ranks-per-node, --placement); empty: one rank per node, one world per bench_world_sizes entry.
    node_shapes: tuple[tuple[int, int], ...] = ()
    placements: tuple[str, ...] = ("contiguous", "interleaved")
    # ZeRO (issue 23): --zero STAGE x world size on this host, ring over torch, --optimizer zero_optimizer
    # (P = 1 runs --zero 0 alone: the unsharded reference; a shard of 1 is the whole state); then the
    # zero_cluster_stages at each of zero_links, zero_cluster_world_size nodes of one rank each.
    zero_stages: tuple[int, ...] = ()
    zero_world_sizes: tuple[int, ...] = ()
    zero_optimizer: str = "sgd"
    zero_links: tuple[str, ...] = ()
    zero_cluster_world_size: int = 4
    zero_cluster_stages: tuple[int, ...] = ()
    zero_extra: tuple[str, ...] = ()  # more launch.py options for every zero run


_TRAIN_ALGOS = (
    ("ddp", "torch"),
    ("ring", "torch"),
    ("ring", "zmq"),
    ("ring", "shm"),
    ("ps", "torch"),
    ("ps", "zmq"),
    ("ps", "shm"),
)

PRESETS: dict[str, Preset] = {
    # About 11 minutes on 2 shared CPU cores: few steps, few sizes; ranks oversubscribe at P=4.
    "quick": Preset(
        train_algos=_TRAIN_ALGOS,
        train_world_sizes=(1, 2, 4),
        model="simplecnn",
        dataset="synthetic",
        batch_size=32,
        epochs=1,
        max_steps=20,
        lr=0.05,
        seed=0,
        train_timeout_s=240,
        bench_world_sizes=(2, 4),
        bench_sizes=("64K", "1M", "4M"),
        bench_groups=(
            ("torch", ("ring", "naive", "ps", "ps:2", "auto")),
            ("zmq", ("ring", "ps")),
            ("shm", ("ring", "ps", "auto")),
        ),
        bench_reps=5,
        bench_sample_s=0.01,
        bench_timeout_s=300,
        batch_sizes=(32, 256, 2048),
        batch_world_size=2,
        batch_max_steps=4,
        large_world_size=2,
        large_small_batch=32,
        large_batch=512,
        large_epochs=2,
        large_warmup_epochs=1,
        large_max_steps=10,
        env={"OMP_NUM_THREADS": "1"},
    ),
    # Real hardware: more sizes, world sizes up to 8, full epochs.
    "full": Preset(
        train_algos=(*_TRAIN_ALGOS, ("naive", "torch")),
        train_world_sizes=(1, 2, 4, 8),
        model="simplecnn",
        dataset="synthetic",
        batch_size=64,
        epochs=5,
        max_steps=None,
        lr=0.05,
        seed=0,
        train_timeout_s=3600,
        bench_world_sizes=(2, 4, 8),
        bench_sizes=("4K", "64K", "256K", "1M", "4M", "16M", "64M"),
        bench_groups=(
            ("torch", ("ring", "ring_simple", "naive")),
            ("torch", ("ps", "ps:2", "ps:4")),
            ("zmq", ("ring", "ps", "ps:2")),
            ("shm", ("ring", "ring_simple", "ps", "ps:2")),
            ("torch", ("rd", "rhd", "auto")),
            ("shm", ("rd", "rhd", "auto")),
        ),
        bench_reps=15,
        bench_sample_s=0.05,
        bench_timeout_s=1800,
        batch_sizes=(32, 64, 128, 256, 512, 1024, 2048),
        batch_world_size=4,
        batch_max_steps=None,
        large_world_size=4,
        large_small_batch=32,
        large_batch=1024,
        large_epochs=10,
        large_warmup_epochs=2,
        large_max_steps=None,
        env={"OMP_NUM_THREADS": "1"},
    ),
    # Ranks on an emulated cluster (python -m analysis.cluster; root). 500 Mbit/s NICs: slow enough
    # that 8 nodes on 2 cores stay bound by their links, not their cores (the run prints how many
    # cores were busy), and that a step of the 4.6 MB simplecnn spends real time communicating.
    "cluster": Preset(
        train_algos=(("ddp", "torch"), ("ring", "torch"), ("ps", "torch")),
        train_world_sizes=(1, 2, 4, 8),  # P = 1: one node's compute, the baseline of scaling efficiency
        model="simplecnn",
        dataset="synthetic",
        batch_size=32,
        epochs=1,
        max_steps=20,
        lr=0.05,
        seed=0,
        train_timeout_s=600,
        bench_world_sizes=(2, 4, 8),
        bench_sizes=("1M", "4M", "16M", "64M"),
        bench_groups=(
            ("torch", ("ring", "ring_simple", "auto")),
            ("torch", ("ring", "ps", "ps+overlap", "ps:P", "naive")),  # ring again: ratios in one world
        ),
        # 5 samples: a sharded server's all-to-all loses packets where 7 flows meet one link, and a
        # sample with a loss-recovery stall is slow; the median of 5 rides over one or two of them.
        bench_reps=5,
        bench_sample_s=0.0,
        bench_timeout_s=900,
        bench_warmup=1,
        batch_sizes=(),
        batch_world_size=2,
        batch_max_steps=None,
        large_world_size=2,
        large_small_batch=32,
        large_batch=32,
        large_epochs=1,
        large_warmup_epochs=0,
        large_max_steps=None,
        env={"OMP_NUM_THREADS": "1"},
        kinds=("bench", "train"),
        cluster_link="500mbit",
    ),
}


# The two-level all-reduce on clusters of multi-rank nodes (root; about 15 minutes on 2 busy cores):
# hier against the flat ring, whose cost depends on which ranks share a node, and Gloo's. 16 MiB
# is the goal size; 4 MiB shows where the network's alpha starts to count.
PRESETS["hier"] = replace(
    PRESETS["cluster"],
    kinds=("bench",),
    train_algos=(),
    train_world_sizes=(),
    bench_world_sizes=(),
    bench_sizes=("4M", "16M"),
    bench_groups=(("torch", ("ring", "hier")),),
    bench_warmup=2,
    node_shapes=((2, 2), (4, 2), (2, 4)),
)

# Compression against link rate (issue 24): 4 nodes, simplecnn, ring over torch, 25 steps, as the
# issue measured the uncompressed ring at 100 Mbit/s. The links run in this order so that a sweep
# cut short has the goal's rate and the one-host cost first; the report sorts them.
PRESETS["compression"] = replace(
    PRESETS["cluster"],
    kinds=("compress",),
    cluster_link=None,
    max_steps=25,
    compress_methods=("none", "bf16", "powersgd:2", "topk:0.01"),
    compress_links=("100mbit", None, "1000mbit", "50mbit", "250mbit"),
    compress_world_size=4,
    compress_extra=("--eval-batches", "4", "--log-every", "5"),
)

# The sharded optimizer (issue 23): memory per rank against P for --zero 0/1/2 and step time beside it,
# then the cluster goal (--zero 1 within 10 % of ring's images/s at 4 nodes over 100 Mbit/s).
# AdamW, whose two moments make the saving twice SGD's; simplecnn (1.1 M parameters, 9 MB of moments)
# keeps a run short on 2 cores: --model resnet18 (44.7 MB of weights) shows it in the peak RSS as well.
# About 15 minutes on 2 busy cores: 7 one-host runs of 20 steps (about 8 minutes; a run of 12 steps at
# P = 2 took 60 to 100 s at load 13 to 21), then 3 on the cluster (root; 115 s for 3 steps, most of it
# the cluster's set-up and link test).
PRESETS["zero"] = replace(
    PRESETS["cluster"],
    kinds=("zero",),
    cluster_link=None,
    max_steps=20,
    lr=1e-3,  # AdamW's usual rate; SGD's 0.05 would diverge
    zero_stages=(0, 1, 2),
    zero_world_sizes=(1, 2, 4),
    zero_optimizer="adamw",
    zero_links=("100mbit",),
    zero_cluster_world_size=4,
    zero_cluster_stages=(0, 1, 2),
    zero_extra=("--eval-batches", "4", "--log-every", "5"),
)

# The learning cost of compression (issue 24's goal: final train loss after 60 steps within 2 % of
# uncompressed for bf16, 10 % for powersgd:2, 15 % for topk:0.01): the same world, model and data on
# this host (the loss does not depend on the link), 60 steps, three seeds, since one seed's difference
# of a few per cent is within what another seed moves the loss by. About 25 minutes on 2 busy cores.
# The rate is uncompressed training's best of 0.01, 0.02 and 0.05 over these 60 steps (measured:
# docs/compression.md), not launch.py's default 0.05: at 0.05 the loss jumps to 3.6-6.0 in the first
# steps, and a run that rounds differently (bf16) lands anywhere within ±10 % of none's.
PRESETS["compression_loss"] = replace(
    PRESETS["compression"],
    kinds=("compress_loss",),
    max_steps=60,
    lr=0.01,
    compress_links=(),
    compress_seeds=(0, 1, 2),
    compress_extra=("--eval-batches", "4", "--log-every", "10"),
)


@dataclass
class Run:
    """One command of the plan.

    Attributes:
        name: unique, file-name safe; names the output and the log.
        kind: one of ``KINDS`` (``train``, ``bench``, ``batch``, ``largebatch``, ``trace``, ``compress``,
            ``zero``).
        argv: the command, ready for ``subprocess.run`` (run in ``REPO_ROOT``).
        output: the file the command is expected to write (relative to the results folder).
        timeout_s: seconds before the run is stopped and recorded as timed out.
        meta: what the run varies (algo, transport, world size, batch, ...), for the report.
    """

    name: str
    kind: str
    argv: list[str]
    output: str
    timeout_s: float
    meta: dict = field(default_factory=dict)

    @property
    def command(self) -> str:
        """The command as one shell-quoted line."""
        return shlex.join(self.argv)


def _launch_argv(
    python: str,
    out_dir: Path,
    *,
    algo: str,
    transport: str,
    world_size: int,
    preset: Preset,
    batch_size: int,
    epochs: int,
    max_steps: int | None,
    lr: float,
    extra: tuple[str, ...] = (),
) -> list[str]:
    argv = [
        python,
        "launch.py",
        "--algo",
        algo,
        "--transport",
        transport,
        "--world-size",
        str(world_size),
        "--model",
        preset.model,
        "--dataset",
        preset.dataset,
        "--batch-size",
        str(batch_size),
        "--epochs",
        str(epochs),
        "--lr",
        f"{lr:g}",
        "--seed",
        str(preset.seed),
        "--out",
        str(out_dir),
    ]
    argv += ["--max-steps", str(max_steps or 0)]  # launch.py: 0 = no cap (its default caps at 150)
    return argv + list(extra)


def _on_cluster(
    python: str,
    preset: Preset,
    world_size: int,
    argv: list[str],
    per_node: int = 1,
    placement: str = "contiguous",
    link: str | None = None,
) -> list[str]:
    """``argv`` as it runs: unchanged on this host, else once per rank of an emulated cluster of
    ``world_size // per_node`` nodes, ``per_node`` ranks each, placed by ``placement``.

    On a cluster the command is one rank (torchrun's variables say which), so a bench
    gets no ``--world-size``: the cluster's ranks are its world. ``link``: the rate, if
    not the preset's ``cluster_link``.
    """
    link = link or preset.cluster_link
    if link is None:
        return argv
    if argv[1:3] == ["-m", "ringcomm.bench"]:
        at = argv.index("--world-size")
        argv = argv[:at] + argv[at + 2 :]
    layout = [] if per_node == 1 else ["--ranks-per-node", str(per_node), "--placement", placement]
    return [python, "-m", "analysis.cluster", "--nodes", str(world_size // per_node), *layout,
            "--link", link, "--", *argv]  # fmt: skip


def _algos_at(algos: tuple[str, ...], world_size: int) -> tuple[str, ...]:
    """``algos`` with ``ps:P`` spelled for this world size (one shard per rank), and without a ``ps:K``
    this world cannot take (K > P: the bench refuses it, as it should, before starting a world)."""
    spelled = (f"ps:{world_size}" if a == "ps:P" else a for a in algos)
    return tuple(a for a in spelled if not (a.startswith("ps:") and int(a.split(":")[1].split("@")[0]) > world_size))


def build_plan(preset: str | Preset, out: str | Path = "results", python: str | None = None) -> list[Run]:
    """The list of commands a sweep runs, in order, without running anything.

    Args:
        preset: ``"quick"``, ``"full"`` or a ``Preset``.
        out: the results folder; outputs are placed under it.
        python: interpreter for the children (default: this one).

    Returns:
        Runs in execution order: benchmark first (cheap, and the fits need it),
        then training, batch-size sweep, large batch, trace.
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    py = python or sys.executable
    out = Path(out)
    runs: list[Run] = []

    # Multi-rank nodes: a world per (nodes, ranks per node, placement). The meta names the layout, not
    # "cluster_link": the report's one-rank-per-node cluster section fits alpha against P, which these
    # worlds (two placements of one P) would muddle; "Two-level all-reduce" reads them instead.
    shapes = [(n, g, pl) for n, g in p.node_shapes for pl in p.placements] if "bench" in p.kinds else []
    for nodes, per_node, placement in shapes:
        ws = nodes * per_node
        for i, (transport, algos) in enumerate(p.bench_groups):
            name = f"bench_n{nodes}g{per_node}_{placement}_{transport}_{i}"
            output = f"bench/{name}.json"
            argv = [py, "-m", "ringcomm.bench", "--world-size", str(ws), "--sizes", ",".join(p.bench_sizes),
                    "--algos", ",".join(("gloo", *_algos_at(algos, ws))), "--transport", transport,
                    "--reps", str(p.bench_reps), "--sample-s", f"{p.bench_sample_s:g}",
                    "--timeout", f"{p.bench_timeout_s:g}", "--json", str(out / output)]  # fmt: skip
            if p.bench_warmup is not None:
                argv += ["--warmup", str(p.bench_warmup)]
            meta = {"world_size": ws, "nodes": nodes, "ranks_per_node": per_node, "placement": placement,
                    "link": p.cluster_link, "transport": transport, "algos": list(algos)}  # fmt: skip
            argv = _on_cluster(py, p, ws, argv, per_node, placement)
            runs.append(Run(name, "bench", argv, output, p.bench_timeout_s + 30, meta))

    for ws in p.bench_world_sizes if "bench" in p.kinds else ():
        for i, (transport, algos) in enumerate(p.bench_groups):
            algos = _algos_at(algos, ws)
            name = f"bench_p{ws}_{transport}_{i}"
            output = f"bench/{name}.json"
            argv = [
                py,
                "-m",
                "ringcomm.bench",
                "--world-size",
                str(ws),
                "--sizes",
                ",".join(p.bench_sizes),
                "--algos",
                ",".join(("gloo", *algos)),
                "--transport",
                transport,
                "--reps",
                str(p.bench_reps),
                "--sample-s",
                f"{p.bench_sample_s:g}",
                "--timeout",
                f"{p.bench_timeout_s:g}",
                "--json",
                str(out / output),
            ]
            if p.bench_warmup is not None:
                argv += ["--warmup", str(p.bench_warmup)]
            meta = {"world_size": ws, "transport": transport, "algos": list(algos)}
            if p.cluster_link:
                meta["cluster_link"] = p.cluster_link
            argv = _on_cluster(py, p, ws, argv)
            runs.append(Run(name, "bench", argv, output, p.bench_timeout_s + 30, meta))

    for ws in p.train_world_sizes if "train" in p.kinds else ():
        for algo, transport in p.train_algos:
            if ws == 1 and (transport != "torch" or (p.cluster_link and algo != p.train_algos[0][0])):
                continue  # nothing travels at P=1: another run would repeat the first one's compute
            name = f"train_{algo}_{transport}_p{ws}"
            argv = _launch_argv(
                py,
                out / "train" / name,
                algo=algo,
                transport=transport,
                world_size=ws,
                preset=p,
                batch_size=p.batch_size,
                epochs=p.epochs,
                max_steps=p.max_steps,
                lr=p.lr,
            )
            meta = {"algo": algo, "transport": transport, "world_size": ws, "batch_size": p.batch_size}
            if p.cluster_link:
                meta["cluster_link"] = p.cluster_link
            argv = _on_cluster(py, p, ws, argv)
            runs.append(Run(name, "train", argv, f"train/{name}/metrics.json", p.train_timeout_s, meta))

    ws = p.compress_world_size
    for link in p.compress_links if "compress" in p.kinds else ():
        for method in p.compress_methods:
            name = f"compress_{method.replace(':', '')}_{link or 'host'}_p{ws}"
            argv = _ring_argv(py, out / "compress" / name, p, ws, ("--compress", method, *p.compress_extra))
            # "link", not "cluster_link": the report's cluster section is for the ring/ps study
            meta = {"compress": method, "link": link, "algo": "ring", "transport": "torch", "world_size": ws,
                    "batch_size": p.batch_size}  # fmt: skip
            argv = _on_cluster(py, p, ws, argv, link=link) if link else argv
            runs.append(Run(name, "compress", argv, f"compress/{name}/metrics.json", p.train_timeout_s, meta))

    runs += _zero_runs(p, out, py) if "zero" in p.kinds else []
    # seeds outside, methods inside: a sweep cut short still has every method from its first seeds
    for seed in p.compress_seeds if "compress_loss" in p.kinds else ():
        for method in p.compress_methods:
            name = f"loss_{method.replace(':', '')}_s{seed}_p{ws}"
            argv = _ring_argv(py, out / "compress_loss" / name, replace(p, seed=seed), ws, ("--compress", method, *p.compress_extra))
            meta = {"compress": method, "seed": seed, "algo": "ring", "transport": "torch", "world_size": ws,
                    "batch_size": p.batch_size, "max_steps": p.max_steps}  # fmt: skip
            runs.append(Run(name, "compress_loss", argv, f"compress_loss/{name}/metrics.json", p.train_timeout_s, meta))

    if p.cluster_link is not None:
        return runs  # batch, large batch and trace are one-host studies

    for bs in p.batch_sizes if "batch" in p.kinds else ():
        name = f"batch_b{bs}_p{p.batch_world_size}"
        argv = _launch_argv(
            py,
            out / "batch" / name,
            algo="ring",
            transport="torch",
            world_size=p.batch_world_size,
            preset=p,
            batch_size=bs,
            epochs=1,
            max_steps=p.batch_max_steps,
            lr=p.lr,
        )
        meta = {"algo": "ring", "transport": "torch", "world_size": p.batch_world_size, "batch_size": bs}
        runs.append(Run(name, "batch", argv, f"batch/{name}/metrics.json", p.train_timeout_s, meta))

    # Linear scaling rule (Goyal et al. 2017): k times the batch, k times the learning rate, with
    # a warmup. k is taken against the small-batch reference at the same P, so the LR is passed
    # explicitly: launch.py's --scale-lr multiplies by the world size, i.e. scales against one
    # worker at the same per-worker batch, which is not the comparison made here.
    ws = p.large_world_size
    k = p.large_batch / p.large_small_batch
    variants = (
        ("small", p.large_small_batch, p.lr, ()),
        ("large", p.large_batch, p.lr, ()),
        ("large_scaled", p.large_batch, p.lr * k, ("--warmup-epochs", f"{p.large_warmup_epochs:g}")),
    )
    for tag, bs, lr, extra in variants if "largebatch" in p.kinds else ():
        name = f"largebatch_{tag}_b{bs}_p{ws}"
        argv = _launch_argv(
            py,
            out / "largebatch" / name,
            algo="ring",
            transport="torch",
            world_size=ws,
            preset=p,
            batch_size=bs,
            epochs=p.large_epochs,
            max_steps=p.large_max_steps,
            lr=lr,
            extra=extra,
        )
        meta = {
            "variant": tag,
            "algo": "ring",
            "transport": "torch",
            "world_size": ws,
            "batch_size": bs,
            "scale_lr": bool(extra),
            "lr_factor": k if extra else 1.0,
            "warmup_epochs": p.large_warmup_epochs if extra else 0,
            "lr": lr,
            "base_lr": p.lr,
        }
        runs.append(Run(name, "largebatch", argv, f"largebatch/{name}/metrics.json", p.train_timeout_s, meta))

    if "trace" not in p.kinds:
        return runs
    name = "trace_ring_torch_p2"
    argv = _launch_argv(
        py,
        out / "trace_run",
        algo="ring",
        transport="torch",
        world_size=2,
        preset=p,
        batch_size=p.batch_size,
        epochs=1,
        max_steps=5,
        lr=p.lr,
        extra=("--trace", str(out / "trace.json")),
    )
    runs.append(Run(name, "trace", argv, "trace.json", p.train_timeout_s, {"world_size": 2}))
    return runs


def _ring_argv(py: str, folder: Path, p: Preset, ws: int, extra: tuple[str, ...]) -> list[str]:
    """launch.py's command for a ring-over-torch run of ``ws`` ranks with the preset's training settings
    and ``extra`` options (the compression and ZeRO studies), writing to ``folder``."""
    return _launch_argv(
        py, folder, algo="ring", transport="torch", world_size=ws, preset=p, batch_size=p.batch_size,
        epochs=p.epochs, max_steps=p.max_steps, lr=p.lr, extra=extra,
    )  # fmt: skip


def _zero_runs(p: Preset, out: Path, py: str) -> list[Run]:
    """``launch.py --zero STAGE`` runs: each stage at each world size on this host (P = 1: --zero 0 only),
    then each cluster stage at each link, in that order, so that a sweep without root (the cluster
    refuses in one line, the runs are recorded as failed) still has the whole one-host part."""
    grid = [(stage, ws, None) for ws in p.zero_world_sizes for stage in p.zero_stages if ws > 1 or stage == 0]
    nodes = p.zero_cluster_world_size
    grid += [(stage, nodes, link) for link in p.zero_links for stage in p.zero_cluster_stages]
    runs = []
    for stage, ws, link in grid:
        name = f"zero_z{stage}_{link or 'host'}_p{ws}"
        argv = _ring_argv(
            py, out / "zero" / name, p, ws, ("--zero", str(stage), "--optimizer", p.zero_optimizer, *p.zero_extra)
        )
        # "link", not "cluster_link": the report's cluster section is for the ring/ps study
        meta = {"zero": stage, "optimizer": p.zero_optimizer, "link": link, "algo": "ring",
                "transport": "torch", "world_size": ws, "batch_size": p.batch_size, "model": p.model}  # fmt: skip
        argv = _on_cluster(py, p, ws, argv, link=link) if link else argv
        runs.append(Run(name, "zero", argv, f"zero/{name}/metrics.json", p.train_timeout_s, meta))
    return runs


def _group_alive(pgid: int) -> bool:
    """True while any process of group ``pgid`` exists (a zombie not yet reaped counts)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed its user: it exists
        return True
    return True


def stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """Stop ``proc`` and every process it started: SIGTERM to the group, ``grace_s``, then SIGKILL.

    ``proc`` leads its own process group (``start_new_session``), which its children
    (launch.py's ranks, the bench's world) inherit, so one signal reaches them all,
    including ranks that outlive a launcher that exits first.
    """
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, else its zombie keeps the group "alive"
            if not _group_alive(pgid):
                break
            time.sleep(0.05)
    finally:  # a second Ctrl-C cuts the grace period short, not the kill
        try:
            os.killpg(pgid, signal.SIGKILL)  # whatever ignored SIGTERM or is still cleaning up
        except ProcessLookupError:
            pass
        proc.wait()


def _run_child(argv: list[str], log: IO[str], env: dict, timeout_s: float, grace_s: float) -> int:
    """Run ``argv`` in ``REPO_ROOT`` in a session of its own, output to ``log``; return its exit code.

    ``subprocess.run(timeout=)`` would SIGKILL only the child: launch.py could not clean up
    and the ranks it spawned would keep running, skewing every later measurement. So the
    child leads a new session and group, and on timeout (``subprocess.TimeoutExpired`` is
    raised) or Ctrl-C (``KeyboardInterrupt``) the whole group is stopped before re-raising;
    when the child exits by itself, whatever it left running in its group is killed.
    A new session also keeps the terminal's Ctrl-C from reaching the children directly:
    the sweep alone decides how they stop.
    """
    # Hold a Ctrl-C that lands while the child starts: raised inside Popen() it would lose the
    # child's pid, the only handle on its group. It is re-raised below, once there is a group to stop.
    held: list[int] = []
    # Python handlers can be set in the main thread only, and only over a handler Python knows.
    previous = (
        signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    )
    if previous is not None:
        signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    try:
        if held:
            signal.raise_signal(signal.SIGINT)  # to whatever handler was there: KeyboardInterrupt by default
        rc = proc.wait(timeout=timeout_s)
    except BaseException:
        stop_group(proc, grace_s)
        raise
    # The run is over, however it ended; anything it left running (a rank a crashed launcher
    # never joined) would only compete with the next run.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return rc


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_plan(
    runs: list[Run],
    out: str | Path,
    preset_name: str,
    env: dict | None = None,
    resume: bool = False,
    kill_grace_s: float = KILL_GRACE_S,
) -> dict:
    """Run ``runs`` one after another, recording each in ``out/sweep.json`` as it finishes.

    Args:
        runs: from ``build_plan``.
        out: results folder (created).
        preset_name: recorded in the manifest.
        env: extra environment variables for the children (e.g. ``OMP_NUM_THREADS=1``).
        resume: skip runs whose output file already exists (status ``"kept"``).
        kill_grace_s: seconds between SIGTERM and SIGKILL when a run is stopped.

    Returns:
        The manifest written to ``sweep.json``.

    Raises:
        KeyboardInterrupt: on Ctrl-C, after the running command's process group is stopped
            and the run recorded as ``"interrupted"``.
    """
    out = Path(out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **(env or {})}
    manifest = {
        "preset": preset_name,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "finished": None,
        "machine": machine_info(),
        "env": dict(env or {}),
        "cwd": str(REPO_ROOT),
        "runs": [],
    }
    t_sweep = time.monotonic()

    def save() -> None:
        (out / "sweep.json").write_text(json.dumps(manifest, indent=1))

    for i, run in enumerate(runs, 1):
        record = {**asdict(run), "command": run.command, "status": None, "rc": None, "seconds": None}
        target = out / run.output
        print(f"[{i}/{len(runs)}] {run.name}: ", end="", flush=True)
        if resume and target.exists():
            record["status"] = "kept"
            if (out / "logs" / f"{run.name}.log").exists():  # the log of the run that wrote it
                record["log"] = f"logs/{run.name}.log"
            print("kept (output exists)")
            manifest["runs"].append(record)
            save()
            continue
        if "launch.py" in run.argv and not (REPO_ROOT / "launch.py").exists():
            record.update(status="failed", error="launch.py not found in the repository root")
            print("failed: launch.py not found")
            manifest["runs"].append(record)
            save()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        log = out / "logs" / f"{run.name}.log"
        t0 = time.monotonic()
        try:
            with open(log, "w") as f:
                f.write(f"$ {run.command}\n")
                f.flush()
                rc = _run_child(run.argv, f, child_env, run.timeout_s, kill_grace_s)
            status = "ok" if rc == 0 and target.exists() else "failed"
            error = (
                None if status == "ok" else (f"rc={rc}" + ("" if target.exists() else f"; no {run.output}"))
            )
        except subprocess.TimeoutExpired:
            rc, status, error = None, "timeout", f"stopped after {run.timeout_s:g} s"
        except OSError as exc:
            rc, status, error = None, "failed", f"could not start: {exc}"
        except KeyboardInterrupt:
            record.update(status="interrupted", seconds=round(time.monotonic() - t0, 2), error="Ctrl-C")
            manifest["runs"].append(record)
            save()
            print("interrupted", flush=True)
            raise
        seconds = time.monotonic() - t0
        record.update(
            status=status, rc=rc, seconds=round(seconds, 2), error=error, log=f"logs/{run.name}.log"
        )
        if status != "ok":
            record["log_tail"] = _tail(log)
        print(f"{status} ({seconds:.1f} s){'' if status == 'ok' else ': ' + str(error)}", flush=True)
        manifest["runs"].append(record)
        save()

    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest["seconds"] = round(time.monotonic() - t_sweep, 2)
    save()
    failed = [r["name"] for r in manifest["runs"] if r["status"] not in ("ok", "kept")]
    print(f"# sweep done in {manifest['seconds']:.0f} s: {len(runs) - len(failed)} ok, {len(failed)} not ok")
    if failed:
        print("# not ok: " + ", ".join(failed))
    return manifest


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 (failed runs are recorded, not fatal)."""
    parser = CliParser(prog="python -m analysis.sweep", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quick", action="store_const", const="quick", dest="preset", help="about 11 minutes on 2 cores (default)"
    )
    group.add_argument("--full", action="store_const", const="full", dest="preset", help="real hardware")
    group.add_argument(
        "--hier",
        action="store_const",
        const="hier",
        dest="preset",
        help="two-level all-reduce on an emulated cluster of multi-rank nodes (root; about 15 minutes)",
    )
    group.add_argument(
        "--cluster",
        action="store_const",
        const="cluster",
        dest="preset",
        help=f"on an emulated cluster of {PRESETS['cluster'].cluster_link} links (root; about 30 minutes)",
    )
    group.add_argument(
        "--compression",
        action="store_const",
        const="compression",
        dest="preset",
        help="--compress methods against link rate, 4 nodes (root; about 30 minutes)",
    )
    group.add_argument(
        "--zero",
        action="store_const",
        const="zero",
        dest="preset",
        help="--zero 0/1/2 with AdamW: memory per rank and step time at P = 1, 2, 4 on this host (about "
        "8 minutes), then ring against --zero 1/2 on 4 nodes of 100 Mbit/s (root; about 7 more)",
    )
    group.add_argument(
        "--compression-loss",
        action="store_const",
        const="compression_loss",
        dest="preset",
        help="train loss per step of each --compress method, 3 seeds, 4 ranks on this host (about 25 minutes)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the model of every training run, instead of the preset's (e.g. --zero --model resnet18)",
    )
    parser.add_argument("--out", default=None, help="results folder (default results/<preset>)")
    parser.add_argument(
        "--only", default=",".join(KINDS), help=f"comma list of kinds to run: {','.join(KINDS)}"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--resume", action="store_true", help="skip runs whose output already exists")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the children")
    args = parser.parse_args(argv)
    preset_name = args.preset or "quick"
    out = Path(args.out or f"results/{preset_name}")
    kinds = {k for k in args.only.split(",") if k}
    unknown = kinds - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {','.join(KINDS)}")
    why = unwritable(str(out), folder=True)
    if why:
        parser.error(f"--out {out}: {why}")
    preset = PRESETS[preset_name] if args.model is None else replace(PRESETS[preset_name], model=args.model)
    runs = [r for r in build_plan(preset, out.resolve(), args.python) if r.kind in kinds]
    if args.dry_run:
        print(f"# {len(runs)} runs, preset {preset_name}, env {PRESETS[preset_name].env}, cwd {REPO_ROOT}")
        for r in runs:
            print(f"[{r.kind}] timeout {r.timeout_s:g}s  {r.command}")
        return 0
    run_plan(runs, out, preset_name, env=PRESETS[preset_name].env, resume=args.resume)
    print(f"# next: python -m analysis.report {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
