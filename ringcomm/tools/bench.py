"""python -m ringcomm.bench: time ringcomm's collectives against Gloo's, nccl-tests style.

    python -m ringcomm.bench --world-size 4 --sizes 64K,1M,16M,64M --algos gloo,ring,naive
    python -m ringcomm.bench --world-size 4 --algos gloo,ring,ps,ps:4 --json bench.json
    python -m ringcomm.bench --world-size 2 --transport zmq --algos gloo,ring,ps
    python -m ringcomm.bench --world-size 4 --algos gloo,ring@shm,ring_simple@shm,ps@shm
    python -m ringcomm.bench --world-size 4 --algos gloo,auto,rd,ring           # what auto picks, and its cost
    python -m ringcomm.bench --world-size 4 --tune   # fit auto's alpha and beta; writes auto.tune_path()
    torchrun --nproc-per-node 4 -m ringcomm.bench --json bench.json   # torchrun's world; no --world-size
    python -m ringcomm.bench --collective all_gather --world-size 2 --algos gloo,ring@shm,rd@shm
    python -m ringcomm.bench --collective broadcast --algos gloo,ring,tree,auto

``--collective`` picks what is timed (default ``all_reduce``): ``all_gather``,
``reduce_scatter`` or ``broadcast``, against Gloo's own ``dist.all_gather_into_tensor``,
``dist.reduce_scatter_tensor`` and ``dist.broadcast`` (src 0), labelled ``gloo`` as
all_reduce's ``dist.all_reduce`` is. ``--sizes`` are bytes per rank: the tensor of
all_reduce and broadcast, all_gather's input, reduce_scatter's output block (so
all_gather's output and reduce_scatter's input are P times as large).

Algorithms: ``gloo`` (the built-in collective), any name in ``ringcomm.ALGOS`` (for all_reduce;
the other collectives' names are ``names.COLLECTIVE_ALGO_NAMES``)
(``ring``, ``ring_simple``, ``rhd``, ``rd``, ``naive``, ``ps``, ``auto``), ``ps:K`` for a parameter server
sharded K ways, and a ``@zmq`` / ``@shm`` / ``@torch`` suffix to pick the
transport of one entry (``--transport`` sets the default).

Method: every algorithm is timed in the same world, interleaved (gloo, ring,
..., ring, ..., gloo, ...: one sample of each per round, the order rotated each
round) so that a noisy machine slows all of them alike. One
sample is a block of back-to-back calls after a barrier and one untimed call
(which lines the ranks up: they leave a barrier up to a scheduler slice apart,
and that skew, carried by the first timed call, weighed more in the few-call
samples of a slow algorithm than in the many-call ones of a fast one), divided by
the number of calls; a rank's sample is the slowest rank's (max over ranks). The table
shows the median sample. ``#wrong`` counts elements (max over ranks) that
differ from gloo's result on the same integer-valued input.

Columns (nccl-tests): size in bytes per rank, count in elements per rank, time in
microseconds, algbw = M / time and busbw = algbw * 2(P-1)/P for all_reduce, (P-1)/P for
all_gather and reduce_scatter, 1 for broadcast (``cost.busbw``), both in GB/s (1e9 B/s),
M being the whole tensor in bytes (P times the size for all_gather and reduce_scatter);
For ``auto`` rows a line under the table says which algorithm auto took at that
size, with its predicted and measured time.

``--tune`` times every candidate of ``algo="auto"`` (``auto.CANDIDATES``) on every
transport of ``--transports`` at ``--sizes``, fits each one's alpha and beta to its
cost model (``cost.fit_nonnegative``) and writes them, with the machine and the
world size, to ``auto.tune_path()`` (``RINGCOMM_TUNE_FILE`` or
``~/.cache/ringcomm/tune.json``), printing the path and the crossovers it implies.

``busbw/memcpy`` puts busbw beside one core's copy bandwidth at the same size,
measured by rank 0 in every round of the same run (``memcpy_gbs``): a byte that
crosses shared memory is copied once by its sender and once by its receiver, so
that is the physical limit of a transport that moves bytes by copying them.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..algorithms.checks import check_options
from ..cost import algbw, busbw
from ..names import (
    ALGO_NAMES,
    COLLECTIVE_ALGO_NAMES,
    DTYPE_BYTES,
    DTYPE_NAMES,
    TRANSPORT_NAMES,
    AlgoSpec,
    parse_size,
)
from . import cli
from .machine import machine_info

# torch (over a second to import) is imported by the functions that time, after the command line
# is parsed: --help and a mistake answer at once. AlgoSpec, parse_size and machine_info live in
# torch-free modules (names.py, machine.py) and are offered here too, where they were first.
if TYPE_CHECKING:
    import torch

#: Ranks spawned without --world-size: launch.py's and the demo's default too.
DEFAULT_WORLD_SIZE = cli.DEFAULT_WORLD_SIZE

__all__ = ["main", "parse_size", "AlgoSpec", "BenchRow", "machine_info"]


@dataclass
class BenchRow:
    size_bytes: int  # per rank (--sizes): all_gather's input, reduce_scatter's output block
    count: int  # elements per rank
    dtype: str
    algo: str
    transport: str
    world_size: int
    time_us: float
    algbw_gbs: float
    busbw_gbs: float
    wrong: int
    samples_us: list
    memcpy_gbs: float  # one core's copy bandwidth at this size, measured in the same run (rank 0)
    collective: str = "all_reduce"
    total_bytes: int = 0  # M, the whole tensor: size_bytes, or P * size_bytes for all_gather and reduce_scatter


def memcpy_gbs(nbytes: int, seconds: float = 0.005) -> float:
    """One core's memory copy bandwidth at ``nbytes`` (GB/s, 1e9 B/s): ``dst.copy_(src)``, repeated.

    The physical limit a shared-memory transport works against: each byte it moves
    is copied by its sender and copied (or reduced) by its receiver.
    """
    import torch

    src = torch.ones(max(nbytes, 64), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch both: first-use page faults are not bandwidth
    calls, elapsed = 0, 0.0
    t0 = time.perf_counter()
    while elapsed < seconds:
        dst.copy_(src)
        calls += 1
        elapsed = time.perf_counter() - t0
    return src.numel() * calls / elapsed / 1e9


#: The collectives the bench times, with Gloo's own (``gloo``) for each.
COLLECTIVES = tuple(COLLECTIVE_ALGO_NAMES)

#: (collective, algo) that need P a power of two (``algorithms.collectives.POWER_OF_TWO_ONLY``,
#: known here without torch): refused at other world sizes before a worker starts.
_POWER_OF_TWO_ONLY = {("reduce_scatter", "rhd"), ("all_gather", "rd")}


@dataclass
class Buffers:
    """One algorithm's tensors for one collective: what it reads (``input``) and writes (``output``).

    all_reduce and broadcast work in place (``input is output``); all_gather's output and
    reduce_scatter's input are P blocks of ``count`` elements.
    """

    collective: str
    output: torch.Tensor
    input: torch.Tensor

    @classmethod
    def make(cls, collective: str, count: int, dtype: torch.dtype, world_size: int) -> Buffers:
        """Zeroed buffers of ``count`` elements per rank."""
        import torch

        if collective == "all_gather":
            return cls(collective, torch.zeros(world_size * count, dtype=dtype), torch.zeros(count, dtype=dtype))
        if collective == "reduce_scatter":
            return cls(collective, torch.zeros(count, dtype=dtype), torch.zeros(world_size * count, dtype=dtype))
        t = torch.zeros(count, dtype=dtype)
        return cls(collective, t, t)

    @property
    def count(self) -> int:
        """Elements per rank (``--sizes``): all_gather's input, the others' output."""
        return (self.input if self.collective == "all_gather" else self.output).numel()

    @property
    def total_bytes(self) -> int:
        """M, the whole tensor in bytes: the larger of the two (nccl-tests' algbw divides it by the time)."""
        return max(self.output.numel(), self.input.numel()) * self.output.element_size()


def _run_once(spec: AlgoSpec, bufs: Buffers) -> None:
    """One call of ``bufs.collective``: Gloo's built-in for ``gloo``, else ringcomm's ``spec``."""
    import torch.distributed as dist

    import ringcomm

    out, inp, collective = bufs.output, bufs.input, bufs.collective
    if spec.algo == "gloo":
        if collective == "all_reduce":
            dist.all_reduce(out)
        elif collective == "all_gather":
            dist.all_gather_into_tensor(out, inp)
        elif collective == "reduce_scatter":
            dist.reduce_scatter_tensor(out, inp)
        else:
            dist.broadcast(out, src=0)
        return
    options = dict(algo=spec.algo, transport=spec.transport, **spec.options)
    if collective == "all_reduce":
        ringcomm.all_reduce(out, **options)
    elif collective == "all_gather":
        ringcomm.all_gather(out, inp, **options)
    elif collective == "reduce_scatter":
        ringcomm.reduce_scatter(out, inp, **options)
    else:
        ringcomm.broadcast(out, src=0, **options)


def _count_wrong(spec: AlgoSpec, bufs: Buffers, rank: int) -> int:
    """Elements of ``spec``'s result that differ from gloo's on the same integer-valued input."""
    import torch
    import torch.distributed as dist

    g = torch.Generator().manual_seed(1234 + rank)  # every rank its own numbers (broadcast: src's win)
    x = torch.randint(-8, 9, bufs.input.shape, generator=g).to(bufs.input.dtype)
    results = []
    for who in (AlgoSpec("gloo", "gloo", "torch"), spec):
        trial = Buffers.make(bufs.collective, bufs.count, x.dtype, dist.get_world_size())
        trial.input.copy_(x)
        _run_once(who, trial)
        results.append(trial.output)
    expected, got = results
    tol = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 0.0
    wrong = int(((got.double() - expected.double()).abs() > tol).sum())
    verdict = torch.tensor([wrong], dtype=torch.int64)
    dist.all_reduce(verdict, op=dist.ReduceOp.MAX)
    return int(verdict)


def _bench_rank(rank: int, world_size: int, cfg: dict) -> list[dict] | None:
    # the parent (or torchrun) stops the world on Ctrl-C (cli.ctrl_c_stops_the_world): no rank's traceback
    cli.ignore_ctrl_c()
    import torch
    import torch.distributed as dist

    import ringcomm

    dtype = getattr(torch, cfg["dtype"])  # a DTYPE_NAMES name
    collective = cfg.get("collective", "all_reduce")
    specs = [AlgoSpec.parse(a, cfg["transport"]) for a in cfg["algos"]]
    for transport in sorted({s.transport for s in specs}):
        ringcomm.init(transport, "cpu")  # collective set-up outside the timed region
    rows = []
    for size in cfg["sizes"]:
        count = max(1, size // torch.tensor([], dtype=dtype).element_size())
        bufs = {s.label: Buffers.make(collective, count, dtype, world_size) for s in specs}
        wrong = {s.label: (0 if s.algo == "gloo" else _count_wrong(s, bufs[s.label], rank)) for s in specs}
        # Warm up, and pick calls per sample so each sample lasts about cfg["sample_s"].
        calls = {}
        for s in specs:
            for _ in range(cfg["warmup"]):
                _run_once(s, bufs[s.label])
            dist.barrier()
            t0 = time.perf_counter()
            _run_once(s, bufs[s.label])
            est = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(est, op=dist.ReduceOp.MAX)
            calls[s.label] = max(1, min(200, int(cfg["sample_s"] / max(float(est), 1e-6))))
        samples: dict[str, list[float]] = {s.label: [] for s in specs}
        copies: list[float] = []
        for rep in range(cfg["reps"]):
            # interleaved: every algorithm once per round, the order rotated each round so that
            # none always runs right after the same one (what Gloo leaves behind slows the next)
            for s in specs[rep % len(specs) :] + specs[: rep % len(specs)]:
                n = calls[s.label]
                dist.barrier()
                # Ranks leave a barrier at different times (on a busy machine, up to a scheduler
                # slice apart); one untimed call lines them up, so that the first timed call does
                # not carry that skew (a sample of few calls would, more than one of many).
                _run_once(s, bufs[s.label])
                t0 = time.perf_counter()
                for _ in range(n):
                    _run_once(s, bufs[s.label])
                samples[s.label].append((time.perf_counter() - t0) / n)
            dist.barrier()  # and the copy bandwidth, by rank 0 alone while the others wait
            if rank == 0:
                copies.append(memcpy_gbs(count * bufs[specs[0].label].output.element_size()))
        copy_gbs = statistics.median(copies) if copies else float("nan")
        for s in specs:
            t = torch.tensor(samples[s.label], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a sample lasts as long as its slowest rank
            per_call = [float(v) for v in t]
            med = statistics.median(per_call)
            nbytes = count * torch.tensor([], dtype=dtype).element_size()
            total = bufs[s.label].total_bytes  # M: what nccl-tests' algbw divides by the time
            rows.append(
                asdict(
                    BenchRow(
                        size_bytes=nbytes,
                        count=count,
                        dtype=cfg["dtype"],
                        algo=s.label,
                        transport=s.transport,
                        world_size=world_size,
                        time_us=med * 1e6,
                        algbw_gbs=algbw(total, med),
                        busbw_gbs=busbw(world_size, total, med, collective),
                        wrong=wrong[s.label],
                        samples_us=[v * 1e6 for v in per_call],
                        memcpy_gbs=copy_gbs,
                        collective=collective,
                        total_bytes=total,
                    )
                )
            )
        for row in rows[-len(specs) :]:
            spec = next(s for s in specs if s.label == row["algo"])
            if spec.algo == "auto":  # what it took, and what the model promised (the world's fit)
                from .. import auto
                from ..runtime import session

                fits = session.current().tuning()
                if collective == "all_reduce":  # with the world's nodes, as the api asked (hier weighed)
                    from ..algorithms.hier import node_shape

                    nodes = node_shape(session.current(), time.monotonic() + 60.0)  # cached by the call: no message
                    choice = auto.choose(fits, spec.transport, world_size, row["size_bytes"], nodes=nodes)
                else:  # its cost row, for M, the whole tensor (as the api asks)
                    choice = auto.choose_collective(fits, collective, spec.transport, world_size, row["total_bytes"])
                row.update(choice=choice.algo, predicted_us=choice.predicted_s[choice.algo] * 1e6)
        if rank == 0 and cfg["progress"]:
            _print_rows(rows[-len(specs) :], header=size == cfg["sizes"][0], file=sys.stdout)
            sys.stdout.flush()
    return rows if rank == 0 else None


def _print_rows(rows: list[dict], header: bool, file=sys.stdout) -> None:
    if header:
        print(
            f"{'#  size(B)':>12} {'count':>10} {'type':>8} {'algo':>14} {'transport':>9} "
            f"{'time(us)':>10} {'algbw':>7} {'busbw':>7} {'#wrong':>6} {'vs gloo':>7} {'busbw/memcpy':>12}",
            file=file,
        )
        print(f"{'#':>12} {'':>10} {'':>8} {'':>14} {'':>9} {'':>10} {'(GB/s)':>7} {'(GB/s)':>7}", file=file)
    gloo = next((r for r in rows if r["algo"] == "gloo"), None)
    if rows:
        print(f"# memcpy, one core, {rows[0]['size_bytes']} B: {rows[0]['memcpy_gbs']:.2f} GB/s", file=file)
    for r in rows:
        ratio = f"{gloo['time_us'] / r['time_us']:.2f}x" if gloo else "-"
        print(
            f"{r['size_bytes']:>12} {r['count']:>10} {r['dtype']:>8} {r['algo']:>14} {r['transport']:>9} "
            f"{r['time_us']:>10.1f} {r['algbw_gbs']:>7.3f} {r['busbw_gbs']:>7.3f} {r['wrong']:>6} {ratio:>7} "
            f"{r['busbw_gbs'] / r['memcpy_gbs']:>11.1%}",
            file=file,
        )
    for r in rows:
        if "choice" in r:
            print(
                f"# {r['algo']} took {r['choice']}: predicted {r['predicted_us']:.1f} us, measured {r['time_us']:.1f} us",
                file=file,
            )
    note = untuned_note(rows)
    if note and note not in _SAID:
        _SAID.add(note)  # once per run, not once per size
        print(note, file=file)


#: How far (either way) a measured time may be from auto's prediction before the host is said untuned.
UNTUNED_RATIO = 5.0
_SAID: set[str] = set()


def untuned_note(rows: list[dict]) -> str | None:
    """One line when an ``auto`` row's measured time is over ``UNTUNED_RATIO`` times off its prediction.

    The prediction comes from the tune file's alpha and beta (or the defaults): that far off,
    they describe another machine (or none), and ``--tune`` fits this one's.
    """
    for r in rows:
        predicted, measured = r.get("predicted_us"), r["time_us"]
        if predicted and measured and max(measured / predicted, predicted / measured) > UNTUNED_RATIO:
            return (
                f"# auto's cost model is {measured / predicted:.3g}x off on this host (predicted {predicted:.0f} us, "
                f"measured {measured:.0f} us): it looks untuned; run python -m ringcomm.bench --tune"
            )
    return None


def _check_algo(text: str, default_transport: str, collective: str = "all_reduce") -> AlgoSpec:
    """``text`` parsed (``AlgoSpec.parse``), its algorithm (one of ``collective``'s) and transport known;
    ValueError saying what is not."""
    spec = AlgoSpec.parse(text, default_transport)
    names = ["gloo", *COLLECTIVE_ALGO_NAMES[collective]]
    if spec.algo not in names:
        near = difflib.get_close_matches(spec.algo, names, n=1)
        hint = f"; did you mean {near[0]}?" if near else ""
        of = "" if collective == "all_reduce" else f" for {collective}"
        raise ValueError(
            f"algorithm {text!r}: unknown {spec.algo!r}{of}; expected one of {', '.join(names)}{hint}"
        )
    if collective != "all_reduce" and (spec.shards is not None or spec.overlap):
        raise ValueError(f"algorithm {text!r}: ':K' and '+overlap' are the parameter server's (all_reduce only)")
    if spec.transport not in TRANSPORT_NAMES:
        raise ValueError(
            f"algorithm {text!r}: unknown transport {spec.transport!r}; "
            f"expected one of {', '.join(TRANSPORT_NAMES)}"
        )
    return spec


class _Default(str):
    """A default value, told apart from the same text given on the command line (``--tune`` refuses those)."""


def _under_torchrun() -> bool:
    """Whether torchrun started this process as one rank of its world."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[int], list[str]]:
    """The command line, every value checked: (args, sizes in bytes, --algos entries). Exits 2 on a mistake."""
    parser = cli.parser("python -m ringcomm.bench", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--world-size", type=int, default=None, help=f"ranks to spawn (default: {DEFAULT_WORLD_SIZE}; under torchrun, torchrun's)"
    )
    parser.add_argument(
        "--collective",
        default="all_reduce",
        choices=COLLECTIVES,
        help="what to time, against Gloo's own (all_gather_into_tensor, reduce_scatter_tensor, broadcast from 0)",
    )
    parser.add_argument(
        "--sizes",
        default="64K,1M,16M,64M",
        help="comma list of sizes in bytes per rank (all_gather: its input; reduce_scatter: its output block), "
        "K/M/G are powers of 1024",
    )
    parser.add_argument(
        "--algos",
        default=_Default("gloo,ring,naive"),
        help="comma list of NAME[+overlap][:K][@TRANSPORT], e.g. gloo,ring,ring_simple,ps,ps:2,ps+overlap,ring@zmq "
        "(other collectives: gloo,ring and rd for all_gather, rhd for reduce_scatter, tree for broadcast)",
    )
    parser.add_argument(
        "--transport", default=_Default("torch"), choices=TRANSPORT_NAMES, help="default transport"
    )
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="element type")
    parser.add_argument("--reps", type=int, default=15, help="samples per algorithm and size (median shown)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per algorithm and size")
    parser.add_argument(
        "--sample-s", type=float, default=0.02, help="target seconds per sample (0: one call per sample)"
    )
    parser.add_argument(  # launch.py's name for the same limit; --timeout, its first name here, still works
        "--time-limit",
        "--timeout",
        dest="timeout",
        metavar="SECONDS",
        type=float,
        default=1800,
        help="seconds before the whole run is stopped (also --timeout)",
    )
    parser.add_argument(
        "--json", metavar="FILE", help="also write rows and the machine to FILE (default: no file)"
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="time auto's candidates on --transports at --sizes, fit alpha and beta, write the tune file",
    )
    parser.add_argument(
        "--transports", default=_Default("torch,zmq,shm"), help="with --tune: the transports to fit (comma list)"
    )
    args = parser.parse_args(argv)
    if args.world_size is not None and args.world_size < 1:
        parser.error(f"--world-size must be at least 1, got {args.world_size}")
    if _under_torchrun() and args.world_size not in (None, int(os.environ["WORLD_SIZE"])):
        parser.error(
            f"--world-size {args.world_size} but torchrun started {os.environ['WORLD_SIZE']} ranks; "
            "leave --world-size out under torchrun"
        )
    for flag, value, low in (("--reps", args.reps, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            parser.error(f"{flag} must be at least {low}, got {value}")
    if not 0 <= args.sample_s < float("inf"):  # 0: one call per sample (the cluster preset's, for slow calls)
        parser.error(f"--sample-s must be 0 or more seconds, got {args.sample_s}")
    if not 0 < args.timeout < float("inf"):
        parser.error(f"--time-limit must be a positive number of seconds, got {args.timeout}")
    why = args.json and cli.unwritable(args.json)
    if why:
        parser.error(f"--json {args.json}: {why}")
    if not _under_torchrun():
        from .spawn import start_method

        try:
            start_method()
        except ValueError as exc:  # not an option: one line, status 1, as launch.py says it
            raise SystemExit(f"{parser.prog}: {exc}") from None
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = [t for t in transports if t not in TRANSPORT_NAMES]
    if unknown or not transports:
        parser.error(
            f"--transports {args.transports}: {'unknown ' + ', '.join(unknown) if unknown else 'the list is empty'}; "
            f"expected some of {', '.join(TRANSPORT_NAMES)}"
        )
    if not args.tune and not isinstance(args.transports, _Default):
        parser.error(
            f"--transports {args.transports}: only --tune reads it; a run's transport is --transport, "
            "or an @TRANSPORT suffix in --algos (e.g. ring@zmq)"
        )
    if args.tune:
        if args.collective != "all_reduce":
            parser.error(f"--collective {args.collective}: --tune fits all_reduce's algorithms only")
        for flag, value in (("--algos", args.algos), ("--transport", args.transport)):
            if not isinstance(value, _Default):
                parser.error(
                    f"{flag} {value}: --tune times auto's own candidates on --transports; leave {flag} out"
                )
        if args.sizes == parser.get_default("sizes"):
            args.sizes = "4K,64K,1M,4M,16M"

    sizes = []
    for text in [t for t in args.sizes.split(",") if t.strip()]:
        try:
            size = parse_size(text)
        except ValueError:
            parser.error(f"--sizes: {text!r} is not a size; expected bytes, e.g. 4096, 64K, 1M, 1.5G")
        if size < 1:
            parser.error(f"--sizes: {text!r}: a size must be at least 1 byte")
        width = DTYPE_BYTES[args.dtype]
        if size % width:  # the rows would silently time another size
            near = sorted({max(width, size - size % width), size - size % width + width})
            parser.error(
                f"--sizes: {text!r} is {size} B, not a whole number of {args.dtype} elements ({width} B each); "
                f"e.g. {' or '.join(map(str, near))}"
            )
        sizes.append(size)
    if args.tune:  # every check passed: only now import auto (and torch) for its candidates
        from .. import auto

        args.algos = ",".join(f"{a}@{t}" for t in transports for a in auto.CANDIDATES if a in ALGO_NAMES)
    world_size = p = _world_size(args)
    power_of_two = p & (p - 1) == 0
    if args.collective != "all_reduce" and isinstance(args.algos, _Default):  # gloo and every algorithm that runs at P
        args.algos = "gloo," + ",".join(
            a for a in COLLECTIVE_ALGO_NAMES[args.collective]
            if a != "auto" and (power_of_two or (args.collective, a) not in _POWER_OF_TWO_ONLY)
        )  # fmt: skip
    algos = [a for a in args.algos.split(",") if a]
    if not sizes or not algos:
        parser.error(f"{'--sizes' if not sizes else '--algos'}: the list is empty")
    for a in algos:  # refuse a bad label or option here, not inside every rank of a spawned world
        try:
            spec = _check_algo(a, args.transport, args.collective)
            check_options(spec.options, world_size)
        except ValueError as exc:
            parser.error(f"--algos {a}: {exc}" if not str(exc).startswith("algorithm") else f"--algos: {exc}")
        if not power_of_two and (args.collective, spec.algo) in _POWER_OF_TWO_ONLY:
            parser.error(f"--algos: {args.collective} algo {spec.algo!r} needs a power-of-two world size, not {p}")
    return args, sizes, algos


def _world_size(args: argparse.Namespace) -> int:
    """The world the run will have: torchrun's, else ``--world-size``, else ``DEFAULT_WORLD_SIZE``."""
    if _under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    return DEFAULT_WORLD_SIZE if args.world_size is None else args.world_size


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse and check the command line, then time the algorithms in a spawned world or torchrun's."""
    args, sizes, algos = _parse_args(argv)
    if _under_torchrun():  # torchrun decides how its workers stop
        return _main(args, sizes, algos)
    from .spawn import forked_ranks

    preload = ("torch", "torch.distributed", "ringcomm", "ringcomm.api", "ringcomm.tools.bench")
    with forked_ranks(preload), cli.ctrl_c_stops_the_world("python -m ringcomm.bench"):  # one torch import
        return _main(args, sizes, algos)


def _main(args: argparse.Namespace, sizes: list[int], algos: list[str]) -> list[dict]:
    import torch
    import torch.distributed as dist

    cfg = dict(
        collective=args.collective,
        sizes=sizes,
        algos=algos,
        transport=args.transport,
        dtype=args.dtype,
        reps=args.reps,
        warmup=args.warmup,
        sample_s=args.sample_s,
        progress=True,
    )
    world_size = _world_size(args)
    header = (
        f"# ringcomm.bench: {args.collective} world_size={world_size} dtype={args.dtype} reps={args.reps} "
        f"(median of per-call time, slowest rank) torch={torch.__version__} cpus={os.cpu_count()}"
    )
    if _under_torchrun():
        dist.init_process_group("gloo")
        torch.set_num_threads(1)
        if dist.get_rank() == 0:
            print(header)
        rows = _bench_rank(dist.get_rank(), dist.get_world_size(), cfg)
        dist.destroy_process_group()
    else:
        print(header)
        from .spawn import run_world

        rows = run_world(_bench_rank, world_size, (cfg,), timeout=args.timeout)[0]
    if rows is not None and args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # checked creatable before the run
        with open(args.json, "w") as f:
            doc = {"machine": machine_info(), "collective": args.collective, "world_size": world_size, "rows": rows}
            json.dump(doc, f, indent=1)
        print(f"# wrote {args.json}")
    if rows and args.tune:
        write_tune(rows, world_size)
    return rows or []


def tune_fits(rows: list[dict], world_size: int) -> dict[str, dict[str, dict[str, float]]]:
    """alpha and beta per transport and algorithm, fitted to bench ``rows`` with each one's cost model."""
    from .. import auto
    from ..cost import COSTS, fit_nonnegative

    fits: dict[str, dict[str, dict[str, float]]] = {}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        spec = AlgoSpec.parse(r["algo"])
        if spec.algo in auto.COST_OF:
            groups.setdefault((r["transport"], spec.algo), []).append(r)
    for (transport, algo), group in sorted(groups.items()):
        model = COSTS[auto.COST_OF[algo]]
        counts = [model.critical_path(world_size, r["size_bytes"]) for r in group]
        seconds = [r["time_us"] / 1e6 for r in group]
        alpha, beta, constrained = fit_nonnegative([c[0] for c in counts], [c[1] for c in counts], seconds)
        predicted = [m * alpha + b * beta for m, b in counts]
        errors = sorted(abs(p - s) / s for p, s in zip(predicted, seconds))
        fits.setdefault(transport, {})[algo] = {
            "alpha_s": alpha,
            "beta_s_per_byte": beta,
            "points": len(group),
            "median_rel_err": errors[len(errors) // 2],
            "constrained": constrained,
        }
    return fits


def write_tune(rows: list[dict], world_size: int) -> str:
    """Fit ``rows``, merge into the tune file (other world sizes kept), print and return its path."""
    from .. import auto

    path = auto.tune_path()
    doc: dict = {"version": 1, "fits": {}}
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
            doc.setdefault("fits", {})
        except ValueError:
            print(f"# {path} was not JSON; starting it afresh")
            doc = {"version": 1, "fits": {}}
    fits = tune_fits(rows, world_size)
    for transport, algos in fits.items():
        doc["fits"].setdefault(transport, {})[str(world_size)] = algos
    doc["machine"] = machine_info()
    doc["made"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    print(f"# tune: wrote {path} (P={world_size}); RINGCOMM_TUNE_FILE points elsewhere")
    for transport, algos in fits.items():
        print(f"#   {transport}: " + ", ".join(
            f"{a} alpha {f['alpha_s'] * 1e6:.0f} us beta {f['beta_s_per_byte'] * 1e9:.2f} ns/B (err {f['median_rel_err']:.0%})"
            for a, f in algos.items()
        ))  # fmt: skip
        fitted = auto.parse_fits(json.dumps({"fits": {transport: {str(world_size): algos}}}), str(path))
        picks = [
            (size, auto.choose(fitted, transport, world_size, size).algo)
            for size in (4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20)
        ]
        print(f"#   {transport}: auto would pick " + ", ".join(f"{s >> 10} KiB: {a}" for s, a in picks))
    return str(path)


if __name__ == "__main__":
    main()
