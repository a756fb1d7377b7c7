r"""Fitting measured numbers to models: alpha-beta per algorithm, Amdahl per training run.

Alpha-beta. A benchmark row gives the median seconds ``t`` of one all-reduce of
``M`` bytes over ``P`` ranks. Each algorithm puts a known number of messages
and bytes on its critical path: the counts of its entry in
``ringcomm.cost.COSTS`` (the cost table, ``ringcomm.cost.markdown_table()``).
So ``t ~= messages * alpha + bytes * beta`` is linear in (alpha, beta), and one
least-squares fit per algorithm and transport gives the latency alpha (seconds)
and the inverse bandwidth beta (seconds per byte). The counts are never
restated here: change a formula in ``cost.py``, or add an algorithm there, and
the fit follows.

A bench label (``ps:2@zmq``, parsed by ``ringcomm.tools.bench.AlgoSpec``) is fitted
with its algorithm's entry, except that gloo and ring_simple are fitted as the
ring: gloo's CPU all-reduce is ring-based for the sizes we measure, and
treating it so puts its alpha and beta on the same footing as ours.

Amdahl. A run whose parallel fraction is ``f`` has speedup
``S(P) = 1 / ((1 - f) + f / P)``; ``1/S - 1 = f (1/P - 1)`` is linear in ``f``
through the origin, so least squares gives ``f = sum(x y) / sum(x^2)`` with
``x = 1/P - 1``, ``y = 1/S - 1``. A measured slowdown (S < 1) gives ``f < 0``:
Amdahl's law cannot describe it (the ranks contend for the cores), and we say
so rather than clamp it away.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ringcomm import cost
from ringcomm.names import AlgoSpec

__all__ = [
    "AlphaBetaFit",
    "AmdahlFit",
    "cost_name",
    "model_for",
    "comm_counts",
    "predict_time",
    "fit_rows",
    "fit_algo",
    "amdahl_speedup",
    "fit_amdahl",
    "karp_flatt",
]

TimeModel = Callable[[int, float, float, float], float]


#: Bench labels fitted with another algorithm's cost: gloo's CPU all-reduce is ring-based at the
#: sizes we measure, and ring_simple is the ring without its pipelining.
_COSTS_AS = {"gloo": "ring", "ring_simple": "ring"}


def cost_name(label: str) -> str:
    """The algorithm whose cost model fits a bench label: ``"ps:2@zmq"`` -> ``"ps"``, ``"gloo"`` -> ``"ring"``,
    ``"ps+overlap:4"`` -> ``"ps_overlap"``."""
    spec = AlgoSpec.parse(label)
    if spec.overlap:
        return "ps_overlap"
    return _COSTS_AS.get(spec.algo, spec.algo)


def _cost_entry(label: str) -> tuple[cost.AlgoCost, int]:
    """The ``cost.COSTS`` entry for a bench label, and the shards (k) it runs with."""
    entry = cost.COSTS.get(cost_name(label))
    if entry is None:
        known = ", ".join(["gloo", "ring_simple", *cost.COSTS])
        raise ValueError(f"no cost model for algorithm {label!r}; ringcomm.cost.COSTS models {known}")
    return entry, AlgoSpec.parse(label).shards or 1


def model_for(label: str) -> TimeModel:
    """The alpha-beta time model ``f(P, M, alpha, beta) -> seconds`` for a bench label."""
    entry, shards = _cost_entry(label)
    return lambda p, m, a, b: entry.time(p, m, a, b, shards=shards)


def comm_counts(label: str, p: int, nbytes: float) -> tuple[float, float]:
    """Messages and bytes on the critical path of one all-reduce of ``nbytes`` over ``p`` ranks."""
    entry, shards = _cost_entry(label)
    return entry.critical_path(p, nbytes, shards)


def predict_time(label: str, p: int, nbytes: float, alpha: float, beta: float) -> float:
    """Model seconds for ``label`` (alpha in seconds, beta in seconds per byte)."""
    return float(model_for(label)(p, nbytes, alpha, beta))


@dataclass
class AlphaBetaFit:
    """One algorithm's fitted latency and inverse bandwidth, and how well the line fits.

    Attributes:
        algo: bench label (``ring``, ``ps:2``, ``ring@zmq``).
        transport: ``torch`` or ``zmq``.
        alpha_s: seconds per message.
        beta_s_per_byte: seconds per byte.
        points: bench rows used (world size > 1).
        median_rel_err, max_rel_err: ``|model - measured| / measured`` over those rows.
        constrained: True when the free fit gave a negative coefficient and it was pinned to 0.
    """

    algo: str
    transport: str
    alpha_s: float
    beta_s_per_byte: float
    points: int
    median_rel_err: float
    max_rel_err: float
    constrained: bool = False

    @property
    def bandwidth_gbs(self) -> float:
        """1 / beta in GB/s (1e9 bytes per second); inf when beta is 0."""
        return 1.0 / self.beta_s_per_byte / 1e9 if self.beta_s_per_byte > 0 else math.inf

    def predict(self, p: int, nbytes: float) -> float:
        """Model seconds for one all-reduce of ``nbytes`` over ``p`` ranks; nan where the model
        does not apply (e.g. ``ps:4`` at P = 2)."""
        try:
            return predict_time(self.algo, p, nbytes, self.alpha_s, self.beta_s_per_byte)
        except ValueError:
            return math.nan

    def as_dict(self) -> dict:
        """JSON-friendly form, with the bandwidth added."""
        return {**asdict(self), "bandwidth_gbs": self.bandwidth_gbs}


def fit_algo(
    label: str, world_sizes: Sequence[int], nbytes: Sequence[float], seconds: Sequence[float]
) -> AlphaBetaFit | None:
    """Fit alpha and beta for one algorithm from its measurements.

    Args:
        label: bench label; picks the model and so the message and byte counts.
        world_sizes: P of each measurement. Rows with P <= 1 carry no communication and are skipped.
        nbytes: all-reduced tensor bytes M of each measurement.
        seconds: measured seconds per all-reduce.

    Returns:
        The fit, or None when fewer than two usable points are left. Uses
        ``cost.fit_nonnegative`` (relative least squares, neither coefficient below 0).
    """
    keep, counts = [], []
    for p, m, s in zip(world_sizes, nbytes, seconds):
        if p <= 1 or s <= 0:
            continue
        try:
            counts.append(comm_counts(label, p, m))
        except ValueError:  # the model rejects this point (more shards than ranks)
            continue
        keep.append((p, m, s))
    if len(keep) < 2:
        return None
    msgs = np.array([c[0] for c in counts])
    byts = np.array([c[1] for c in counts])
    t = np.array([s for *_, s in keep], dtype=float)
    if np.linalg.matrix_rank(np.stack([msgs / t, byts / t], axis=1)) < 2:
        # e.g. one size at one world size repeated: alpha and beta cannot be told apart
        return None
    alpha, beta, constrained = cost.fit_nonnegative(msgs, byts, t)
    pred = msgs * alpha + byts * beta
    rel = np.abs(pred - t) / t
    return AlphaBetaFit(
        algo=label,
        transport=AlgoSpec.parse(label).transport,
        alpha_s=float(alpha),
        beta_s_per_byte=float(beta),
        points=len(keep),
        median_rel_err=float(np.median(rel)),
        max_rel_err=float(rel.max()),
        constrained=constrained,
    )


def fit_rows(rows: Iterable[dict]) -> dict[str, AlphaBetaFit]:
    """Fit every algorithm found in bench rows (``ringcomm.bench --json`` ``rows``).

    Rows are grouped by their ``algo`` label (which carries the transport, e.g.
    ``ring@zmq``), pooling world sizes and sizes. Labels with too few points or
    no model are left out.

    Returns:
        label -> fit.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["algo"]].append(row)
    fits = {}
    for label, group in sorted(groups.items()):
        try:
            model_for(label)
        except ValueError:
            continue
        fit = fit_algo(
            label,
            [int(r["world_size"]) for r in group],
            [float(r["size_bytes"]) for r in group],
            [float(r["time_us"]) * 1e-6 for r in group],
        )
        if fit is not None:
            fits[label] = fit
    return fits


def amdahl_speedup(p: float, f: float) -> float:
    """Amdahl's speedup on ``p`` workers for parallel fraction ``f``: 1 / ((1 - f) + f / p)."""
    return 1.0 / ((1.0 - f) + f / p)


@dataclass
class AmdahlFit:
    """Parallel fraction fitted to measured speedups.

    Attributes:
        f: parallel fraction (1 = perfectly parallel; < 0 means slower than one worker).
        rmse: root-mean-square error of the fitted speedup against the measured one.
        points: measurements with P > 1 that were used.
    """

    f: float
    rmse: float
    points: int

    @property
    def max_speedup(self) -> float:
        """The asymptotic speedup 1 / (1 - f) (inf when f >= 1)."""
        return math.inf if self.f >= 1 else 1.0 / (1.0 - self.f)


def fit_amdahl(world_sizes: Sequence[float], speedups: Sequence[float]) -> AmdahlFit | None:
    """Least squares on ``1/S = (1 - f) + f / P`` for ``f``.

    Args:
        world_sizes: P of each measurement (P = 1 points carry no information and are ignored).
        speedups: measured S(P) = throughput(P) / throughput(1).

    Returns:
        The fit, or None without a usable point with P > 1.
    """
    pts = [(float(p), float(s)) for p, s in zip(world_sizes, speedups) if p > 1 and s > 0]
    if not pts:
        return None
    x = np.array([1.0 / p - 1.0 for p, _ in pts])
    y = np.array([1.0 / s - 1.0 for _, s in pts])
    f = float((x @ y) / (x @ x))
    model = np.array([amdahl_speedup(p, f) if (1 - f) + f / p > 0 else math.inf for p, _ in pts])
    rmse = float(np.sqrt(np.mean((model - np.array([s for _, s in pts])) ** 2)))
    return AmdahlFit(f=f, rmse=rmse, points=len(pts))


def karp_flatt(p: float, speedup: float) -> float:
    """Karp-Flatt experimentally determined serial fraction e = (1/S - 1/P) / (1 - 1/P); nan at P=1."""
    if p <= 1 or speedup <= 0:
        return math.nan
    return (1.0 / speedup - 1.0 / p) / (1.0 - 1.0 / p)
