"""``algo="auto"``: the cost model picks the algorithm for each call, in the open.

Each algorithm's time is modelled as ``messages * alpha + bytes * beta`` with
its own counts (``cost.COSTS``) and its own alpha and beta for the transport
in use, fitted to measurements: the fit absorbs what the counts leave out (the
pipelined ring overlaps copies with transfers, rd reduces whole vectors)::

    predicted[a] = COSTS[a].time(P, M, alpha[transport][a], beta[transport][a])
    auto picks the a with the smallest predicted time (ties: the order of CANDIDATES)

So small messages go to the algorithms with the fewest rounds (rd, rhd, ps),
large ones to those with the fewest bytes per rank and the best overlap (the
ring), and the crossover is wherever the fitted lines cross.

**Where alpha and beta come from**: a fit written by ``python -m
ringcomm.bench --tune`` (a small JSON file at ``tune_path()``:
``RINGCOMM_TUNE_FILE``, else ``~/.cache/ringcomm/tune.json``); without one,
``DEFAULT_FITS`` below, measured on the machine this project is developed on.
**The choice is the same on every rank**: rank 0 reads its file and hands the
text to the others through the store (``session.tuning``); all ranks then
compute the same pick from the same numbers.

**Keyed by transport and device.** ``transport="torch"`` is Gloo for CPU
tensors and NCCL for CUDA tensors: two different links, so a fit is kept per
(transport, device); a tune file names them ``"torch"`` (CPU, what ``bench
--tune`` measures) and ``"torch:cuda"``. A CUDA call never uses a CPU fit:
without a CUDA one it uses ``MODEL_DEFAULT`` (one nominal alpha and beta for
every candidate, so the counts alone decide) and says so. A transport without
any fit does the same.

**Across world sizes.** alpha and beta are a per-message and a per-byte cost
of the link, and ``cost.COSTS`` says how many of each a call at P puts on its
critical path, so a fit tuned at one P carries to another through the counts:
auto uses the fit of the nearest tuned P (ties: the smaller) and says so.
Beyond the largest tuned P it extrapolates only the candidates whose messages
go between pairs of ranks (ring, rhd, rd) and leaves out the central ones
(``CENTRAL``: naive and ps, whose root receives from every other rank at once):
a fit at P = 4 saw a 3-way incast and says nothing of a 63-way one. ``explain``
says when P is outside the tuned range and what was left out; tune at the P you
run (``bench --tune --world-size P``) to let auto weigh them there.

**Nodes of several ranks.** Where the world has n > 1 nodes of g > 1 ranks each (as
``algorithms/hier.py`` groups them: torchrun's ``GROUP_RANK``, else the host), ``hier`` is
weighed too, its time ``cost.HIER``'s: shared memory's ring fit inside the node plus the
cross-node pick's fit across (``_predict_hier``). Elsewhere it is not: with one node it is
shared memory alone, with one rank per node the inner algorithm alone.

``explain(numel, dtype, transport, world_size, device)`` answers "what would
auto pick for this call, and why", with every candidate's predicted time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cost import COLLECTIVE_COSTS as COSTS_OF_COLLECTIVES
from .cost import COSTS, HIER
from .transports.base import transport_kind

__all__ = [
    "CANDIDATES",
    "CENTRAL",
    "DEFAULT_FITS",
    "HIER_NAME",
    "MODEL_DEFAULT",
    "Choice",
    "Fits",
    "Lookup",
    "choose",
    "choose_collective",
    "explain",
    "fits_key",
    "parse_fits",
    "tune_path",
]

#: What auto chooses among, in the order that breaks ties (each with its default options).
CANDIDATES = ("rd", "rhd", "ring", "ps", "naive")

#: The two-level all-reduce: weighed beside ``CANDIDATES`` only where the world has more than one node
#: with more than one rank (``choose``'s ``nodes``); not a candidate of ``bench --tune`` (its time is
#: the sum of two fitted links', ``cost.HIER``).
HIER_NAME = "hier"

#: Candidates whose critical path runs through one rank that hears from all P-1 others (ps with
#: its default one shard, naive): not extrapolated beyond the largest tuned world size.
CENTRAL = frozenset({"ps", "naive"})

#: (alpha s, beta s/B) for every candidate where nothing was measured (CUDA without a tune file, a
#: transport without a fit): a nominal link of 20 µs per message and 10 GB/s, not a measurement.
#: The same for every algorithm, so the pick follows the counts of ``cost.COSTS`` alone.
MODEL_DEFAULT: tuple[float, float] = (20e-6, 1e-10)

#: Device types a fit can be keyed by (``tensor.device.type``).
DEVICES = ("cpu", "cuda")

DEFAULTS_SOURCE = "defaults (ringcomm/auto.py)"

#: The cost model each candidate's time follows (ring_simple and ring share the ring's counts).
COST_OF = {"ring": "ring", "ring_simple": "ring", "rd": "rd", "rhd": "rhd", "ps": "ps", "naive": "naive"}

#: Fitted (alpha seconds, beta seconds per byte) per transport, world size and algorithm, used
#: without a tune file (the nearest world size), all on CPU (a key is ``fits_key(transport,
#: device)``: the bare transport name for CPU). Measured on the project's machine (2 cores, so
#: 4 ranks oversubscribe it) with ``python -m ringcomm.bench --tune --world-size 2`` and ``4``,
#: sizes 4 KiB to 64 MiB, --reps 7 (analysis/measured/auto/tune.json, where ps at P = 4 was
#: refitted from the same rows once its model counted the server's 2(P-1) messages); see the
#: README, "Choosing the algorithm".
DEFAULT_FITS: dict[str, dict[int, dict[str, tuple[float, float]]]] = {
    "torch": {
        2: {
            "rd": (1.24e-03, 1.21e-09),
            "rhd": (8.78e-04, 1.10e-09),
            "ring": (6.40e-04, 1.04e-09),
            "ps": (5.20e-04, 5.71e-10),
            "naive": (4.18e-04, 5.62e-10),
        },
        4: {
            "rd": (1.66e-03, 1.78e-09),
            "rhd": (1.51e-03, 1.28e-09),
            "ring": (9.91e-04, 1.22e-09),
            "ps": (2.60e-04, 4.34e-10),
            "naive": (2.60e-04, 4.78e-10),
        },
    },
    "zmq": {
        2: {
            "rd": (3.94e-04, 1.07e-09),
            "rhd": (2.15e-04, 9.48e-10),
            "ring": (2.07e-04, 8.78e-10),
            "ps": (2.12e-04, 5.75e-10),
            "naive": (1.92e-04, 5.05e-10),
        },
        4: {
            "rd": (7.78e-04, 1.82e-09),
            "rhd": (5.85e-04, 1.61e-09),
            "ring": (5.18e-04, 1.46e-09),
            "ps": (2.71e-04, 5.41e-10),
            "naive": (2.21e-04, 5.74e-10),
        },
    },
    "shm": {
        2: {
            "rd": (6.52e-05, 6.07e-10),
            "rhd": (5.14e-05, 3.12e-10),
            "ring": (5.40e-05, 3.09e-10),
            "ps": (4.26e-05, 3.20e-10),
            "naive": (3.67e-05, 3.12e-10),
        },
        4: {
            "rd": (3.82e-04, 1.24e-09),
            "rhd": (2.52e-04, 7.69e-10),
            "ring": (2.15e-04, 7.09e-10),
            "ps": (1.35e-04, 2.69e-10),
            "naive": (1.22e-04, 2.52e-10),
        },
    },
}


def tune_path() -> Path:
    """Where ``bench --tune`` writes and auto reads the fit: RINGCOMM_TUNE_FILE or ~/.cache/ringcomm/tune.json."""
    env = os.environ.get("RINGCOMM_TUNE_FILE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ringcomm" / "tune.json"


def fits_key(transport: str, device: str = "cpu") -> str:
    """The key of ``transport``'s fits for tensors on ``device`` (a device type): ``"torch"`` on CPU,
    ``"torch:cuda"`` on CUDA (Gloo and NCCL are different links)."""
    return transport if device == "cpu" else f"{transport}:{device}"


def _split_key(key: str) -> tuple[str, str]:
    """``(transport, device)`` of a fits key; ValueError for a device auto does not know."""
    transport, _, device = key.partition(":")
    device = device or "cpu"
    if not transport or device not in DEVICES:
        raise ValueError(f"fits key {key!r}: expected a transport, or transport:device with device in {DEVICES}")
    return transport, device


def _label(transport: str, device: str) -> str:
    return f"{transport} on {device}"


def _ranges(tuned: list[int]) -> str:
    return f"P={tuned[0]}" if len(tuned) == 1 else f"P={tuned[0]}..{tuned[-1]}"


@dataclass(frozen=True)
class Lookup:
    """The fits one call uses, and what they are.

    Attributes:
        table: ``{algo: (alpha_s, beta_s_per_byte)}``.
        source: where they came from, for whom, at which P, in words.
        tuned: the world sizes the fits were tuned at (empty: ``MODEL_DEFAULT``, nothing measured).
        beyond: the call's P is above the largest tuned one (``CENTRAL`` candidates are left out).
        notes: what the answer should say besides (P outside the tuned range, what was left out).
    """

    table: dict[str, tuple[float, float]]
    source: str
    tuned: tuple[int, ...] = ()
    beyond: bool = False
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Fits:
    """alpha and beta per (transport and device, world size, algorithm), and where they came from.

    Attributes:
        by_world: ``{fits_key: {world_size: {algo: (alpha_s, beta_s_per_byte)}}}`` from a tune file.
        source: the file they came from, or ``DEFAULTS_SOURCE`` (with why, when a file was named).
    """

    by_world: Mapping[str, Mapping[int, Mapping[str, tuple[float, float]]]] = field(default_factory=dict)
    source: str = DEFAULTS_SOURCE

    def for_call(self, transport: str, world_size: int, device: str = "cpu") -> Lookup:
        """The fits to use for ``transport`` on ``device`` at ``world_size``, and what they are.

        This object's own fits for that key, else ``DEFAULT_FITS``' (CPU only), else
        ``MODEL_DEFAULT`` for every candidate: a CUDA call never borrows a CPU fit.
        """
        key, label = fits_key(transport, device), _label(transport, device)
        tuned_fits = self.by_world.get(key)
        origin = self.source
        from_file = not origin.startswith(DEFAULTS_SOURCE)
        if not tuned_fits:
            if from_file:  # a tune file without this key
                origin = f"{DEFAULTS_SOURCE}: {origin} has no fit for {label}"
            tuned_fits = DEFAULT_FITS.get(key)
        if not tuned_fits:
            alpha, beta = MODEL_DEFAULT
            searched = f"{self.source} or ringcomm/auto.py" if from_file else origin
            source = (
                f"model defaults: no fit for {label} in {searched}; nominal alpha {alpha * 1e6:.0f} µs and "
                f"beta {beta * 1e9:.2f} ns/B for every candidate, so the counts alone decide"
            )
            return Lookup({a: (alpha, beta) for a in CANDIDATES}, source)
        tuned = sorted(tuned_fits)
        nearest = min(tuned, key=lambda p: (abs(p - world_size), p))
        source = f"{origin}, {label} tuned at P={nearest}"
        notes: list[str] = []
        beyond = world_size > tuned[-1]
        if beyond:
            left_out = sorted(CENTRAL & set(tuned_fits[nearest]))
            notes.append(
                f"P={world_size} is outside the tuned range {_ranges(tuned)}: the model's counts carry "
                f"the fit of P={nearest} over (alpha and beta are per message and per byte)"
                + (f"; {' and '.join(left_out)} left out (their root's incast was measured at "
                   f"P<={tuned[-1]} only)" if left_out else "")
            )  # fmt: skip
        elif world_size < tuned[0]:
            notes.append(f"P={world_size} is outside the tuned range {_ranges(tuned)}: the fit of P={nearest} carried over")
        elif nearest != world_size:
            notes.append(f"P={world_size} was not tuned: the fit of the nearest tuned P={nearest} ({_ranges(tuned)})")
        return Lookup(dict(tuned_fits[nearest]), source, tuple(tuned), beyond, tuple(notes))


def parse_fits(text: str, source: str) -> Fits:
    """The fits in a tune file's ``text`` (JSON); ValueError naming what is wrong."""
    try:
        doc = json.loads(text)
        raw = doc["fits"]
        by_world: dict[str, dict[int, dict[str, tuple[float, float]]]] = {}
        for key, worlds in raw.items():
            canonical = fits_key(*_split_key(str(key)))  # "torch:cpu" is "torch"
            for p, algos in worlds.items():
                if int(p) < 2:
                    raise ValueError(f"{key}: world size {p} (a fit needs P >= 2)")
                entries = {}
                for algo, fit in algos.items():
                    alpha, beta = float(fit["alpha_s"]), float(fit["beta_s_per_byte"])
                    if algo in COST_OF and math.isfinite(alpha) and math.isfinite(beta) and alpha >= 0 and beta >= 0:
                        entries[algo] = (alpha, beta)
                if entries:
                    by_world.setdefault(canonical, {})[int(p)] = entries
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{source}: not a ringcomm tune file ({type(exc).__name__}: {exc})") from None
    return Fits(by_world, source)


@dataclass(frozen=True)
class Choice:
    """What auto picks for one call, and why.

    Attributes:
        algo: the algorithm chosen.
        predicted_s: predicted seconds of every candidate weighed (the chosen one is the smallest).
        source: where the alpha and beta came from.
        nbytes, world_size, transport: the call.
        device: the device type of the call's tensor (its fits are that device's).
        notes: what else the answer says (P outside the tuned range, candidates left out).
    """

    algo: str
    predicted_s: dict[str, float]
    source: str
    nbytes: int
    world_size: int
    transport: str
    device: str = "cpu"
    notes: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        order = sorted(self.predicted_s.items(), key=lambda kv: kv[1])
        runner_up = f"; next {order[1][0]} {order[1][1] * 1e6:.0f} µs" if len(order) > 1 else ""
        on = self.transport if self.device == "cpu" else _label(self.transport, self.device)
        return (
            f"{self.algo}: predicted {self.predicted_s[self.algo] * 1e6:.0f} µs for {self.nbytes} B over "
            f"{self.world_size} ranks on {on}{runner_up} ({self.source})"
        )

    def __str__(self) -> str:
        lines = [f"auto picks {self.reason}"]
        lines += [f"  note: {note}" for note in self.notes]
        for algo, seconds in sorted(self.predicted_s.items(), key=lambda kv: kv[1]):
            mark = "*" if algo == self.algo else " "
            lines.append(f"  {mark} {algo:<6} {seconds * 1e6:12.1f} µs")
        return "\n".join(lines)


def _check_count(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


def choose(
    fits: Fits,
    transport: str,
    world_size: int,
    nbytes: int,
    device: str = "cpu",
    nodes: tuple[int, int] | None = None,
) -> Choice:
    """The candidate with the smallest predicted time for ``nbytes`` over ``world_size`` ranks.

    ``device`` is the tensor's device type: its fits are that device's (``Fits.for_call``).
    ``nodes`` is ``(n, g)``, the world's n nodes of g ranks as ``hier`` groups them
    (``algorithms.hier.node_shape``), or None where unknown: ``hier`` is weighed beside
    ``CANDIDATES`` only when n > 1 and g > 1, on CPU (``_predict_hier``).

    Raises:
        ValueError: ``world_size`` below 1, ``nbytes`` below 0, or ``nodes`` that are not
            ``world_size`` ranks.
    """
    _check_count("world_size", world_size, 1)
    _check_count("nbytes", nbytes, 0)
    if nodes is not None:
        n, g = (_check_count(label, v, 1) for label, v in zip(("nodes", "ranks per node"), nodes))
        if n * g != world_size:
            raise ValueError(f"nodes={nodes!r}: {n} nodes of {g} ranks are not the {world_size} ranks of the world")
    if world_size == 1:  # nothing travels: every candidate returns at once, whatever any fit says
        zero = {algo: 0.0 for algo in CANDIDATES}
        why = "one rank: nothing travels, every candidate takes 0 s; no fit consulted"
        return Choice(CANDIDATES[0], zero, why, nbytes, 1, transport, device)
    look = fits.for_call(transport, world_size, device)
    predicted = {}
    for algo in CANDIDATES:
        if algo in look.table and COST_OF.get(algo) in COSTS and not (look.beyond and algo in CENTRAL):
            alpha, beta = look.table[algo]
            predicted[algo] = COSTS[COST_OF[algo]].time(world_size, nbytes, alpha, beta)
    notes = look.notes
    if nodes is not None and nodes[0] > 1 and nodes[1] > 1:
        if device == "cpu":
            seconds, how = _predict_hier(fits, transport, nodes, nbytes, device)
            predicted[HIER_NAME] = seconds
            notes += (how,)
        else:
            notes += (f"{HIER_NAME} left out: its cross-node phase runs on CPU tensors only",)
    if not predicted:  # nothing fitted that may be used here: the ring is never a bad answer
        return Choice("ring", {"ring": float("nan")}, look.source, nbytes, world_size, transport, device, notes)
    order = (*CANDIDATES, HIER_NAME)
    best = min(predicted, key=lambda a: (predicted[a], order.index(a)))
    return Choice(best, predicted, look.source, nbytes, world_size, transport, device, notes)


def _predict_hier(
    fits: Fits, transport: str, nodes: tuple[int, int], nbytes: int, device: str
) -> tuple[float, str]:
    """Predicted seconds of ``hier`` with its default options, and how they were made, in words.

    ``cost.HIER``: phases 1 and 3 are the ring's two halves on shared memory among the node's g
    ranks (the ``shm`` fit of the ring at P = g); phase 2 is what ``hier_inner="auto"`` runs across
    the n nodes (this function's own pick at P = n for the M/g bytes each cross group holds), timed
    at (n, M) with that algorithm's fit, since the g cross groups share the node's one link.
    """
    n, g = nodes
    node_fit = fits.for_call("shm", g, device).table.get("ring", MODEL_DEFAULT)
    inner = choose(fits, transport, n, nbytes // g, device).algo
    net_fit = fits.for_call(transport, n, device).table.get(inner, MODEL_DEFAULT)
    seconds = HIER.time(n, g, nbytes, node_fit, net_fit, inner=COST_OF[inner])
    how = (
        f"{HIER_NAME}: {n} nodes × {g} ranks; shm's ring fit at P={g} inside the node, {inner} across "
        f"the {n} nodes on {transport}'s fit at P={n} (cost.HIER)"
    )
    return seconds, how


def choose_collective(
    fits: Fits, collective: str, transport: str, world_size: int, nbytes: int, device: str = "cpu"
) -> Choice:
    """What ``algo="auto"`` runs for a reduce_scatter, all_gather or broadcast of ``nbytes`` (M, the whole
    tensor), from ``cost.COLLECTIVE_COSTS``.

    No collective has a fit of its own yet: each row borrows the all_reduce fit named in its ``fit``
    (alpha per message, beta per byte of the same kind of message), and says so in ``source``. An
    algorithm that needs P a power of two is left out at any other P.
    """
    _check_count("world_size", world_size, 1)
    _check_count("nbytes", nbytes, 0)
    rows = [c for (coll, _), c in COSTS_OF_COLLECTIVES.items() if coll == collective]
    if not rows:
        raise ValueError(f"no cost rows for collective {collective!r}")
    usable = [c for c in rows if not (c.power_of_two and world_size & (world_size - 1))]
    if world_size == 1:
        zero = {c.algo: 0.0 for c in usable}
        return Choice(usable[0].algo, zero, "one rank: nothing travels", nbytes, 1, transport, device)
    look = fits.for_call(transport, world_size, device)
    predicted = {}
    for c in usable:
        alpha, beta = look.table.get(c.fit, MODEL_DEFAULT)
        predicted[c.algo] = c.time(world_size, nbytes, alpha, beta)
    best = min(predicted, key=lambda a: (predicted[a], [c.algo for c in usable].index(a)))
    source = f"all_reduce's fits per message and byte ({look.source}); no {collective} fit of its own"
    return Choice(best, predicted, source, nbytes, world_size, transport, device, look.notes)


def load_local() -> Fits:
    """This process's tune file, or the defaults, with a warning on stderr (and in ``source``) when
    ``RINGCOMM_TUNE_FILE`` names a file that does not exist or cannot be read."""
    import sys

    path = tune_path()
    if not path.is_file():
        named = os.environ.get("RINGCOMM_TUNE_FILE")
        if not named:
            return Fits()  # no tune run yet: the defaults, as documented
        what = "is not a file" if path.exists() else "does not exist"
        note = f"RINGCOMM_TUNE_FILE={named} {what}"
        print(f"ringcomm: {note}; auto uses its defaults", file=sys.stderr, flush=True)
        return Fits(source=f"{DEFAULTS_SOURCE}: {note}")
    try:
        return parse_fits(path.read_text(), str(path))
    except (OSError, ValueError) as exc:
        print(f"ringcomm: {exc}; auto uses its defaults", file=sys.stderr, flush=True)
        return Fits(source=f"{DEFAULTS_SOURCE}: {path} could not be used")


def _dtype(dtype: object) -> torch.dtype:
    """``dtype`` as a torch.dtype: a torch.dtype, or its name (``"float32"``, ``"torch.float32"``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(found, torch.dtype):
            return found
    raise ValueError(f"dtype={dtype!r} is not a torch dtype; pass e.g. torch.float32 or 'float32'")


def explain(
    numel: int,
    dtype: torch.dtype | str = torch.float32,
    transport: str = "torch",
    world_size: int | None = None,
    device: str | torch.device = "cpu",
    world_fits: Callable[[], tuple[Fits, int]] | None = None,
    nodes: tuple[int, int] | None = None,
) -> Choice:
    """What ``algo="auto"`` would pick for ``numel`` elements of ``dtype`` on ``transport``, and why.

    In a running world (``world_fits``, which ``ringcomm.explain_auto`` passes: the world's fit,
    rank 0's, and its size) it uses the fit every rank uses; outside one, this process's tune
    file (or the defaults), and ``world_size`` must be given. ``device``
    is where the tensor would live (``"cuda"``: torch's NCCL, with CUDA fits only). ``nodes``,
``(n, g)``: the world's n nodes of g ranks, to weigh ``hier`` as ``choose`` does.

    Raises:
        ValueError: what ``all_reduce`` would refuse (an unknown transport, a device it
            cannot carry), a dtype that is not one, or a negative ``numel``.
    """
    _check_count("numel", numel, 0)
    if world_size is not None:
        _check_count("world_size", world_size, 1)
    size = _dtype(dtype).itemsize
    try:
        kind = transport_kind(transport)
    except ValueError as exc:
        if isinstance(transport, str) and transport.lower() in ("nccl", "gloo"):
            raise ValueError(
                f"{exc}: Gloo and NCCL are the torch transport's backends; pass transport='torch' "
                "with device='cpu' (Gloo) or device='cuda' (NCCL)"
            ) from None
        raise
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device: {exc}") from None
    kind.validate_device(dev)
    if world_fits is not None:  # in a running world: its fit (rank 0's) and its size
        fits, size_of_world = world_fits()
        world_size = world_size or size_of_world
    else:
        if world_size is None:
            raise ValueError("explain() outside a process group needs world_size")
        fits = load_local()
    return choose(fits, kind.name, world_size, numel * size, dev.type, nodes)
