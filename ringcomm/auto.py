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
``RINGCOMM_TUNE_FILE``, else ``~/.cache/ringcomm/tune.json``), for the world
size it was tuned at (or the nearest one tuned); without one, ``DEFAULT_FITS``
below, measured on the machine this project is developed on. **The choice is
the same on every rank**: rank 0 reads its file and hands the text to the
others through the store (``session.tuning``); all ranks then compute the same
pick from the same numbers.

``explain(numel, dtype, transport, world_size)`` answers "what would auto pick
for this call, and why", with every candidate's predicted time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cost import COSTS

__all__ = ["CANDIDATES", "DEFAULT_FITS", "Choice", "Fits", "choose", "explain", "parse_fits", "tune_path"]

#: What auto chooses among, in the order that breaks ties (each with its default options).
CANDIDATES = ("rd", "rhd", "ring", "ps", "naive")

#: The cost model each candidate's time follows (ring_simple and ring share the ring's counts).
COST_OF = {"ring": "ring", "ring_simple": "ring", "rd": "rd", "rhd": "rhd", "ps": "ps", "naive": "naive"}

#: Fitted (alpha seconds, beta seconds per byte) per transport, world size and algorithm, used
#: without a tune file (the nearest world size). Measured on the project's machine (2 cores, so
#: 4 ranks oversubscribe it) with ``python -m ringcomm.bench --tune --world-size 2`` and ``4``,
#: sizes 4 KiB to 64 MiB, --reps 7 (analysis/measured/auto/tune.json); see the README, "Choosing the algorithm".
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
            "ps": (7.80e-04, 4.34e-10),
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
            "ps": (8.13e-04, 5.41e-10),
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
            "ps": (4.04e-04, 2.69e-10),
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


@dataclass(frozen=True)
class Fits:
    """alpha and beta per (transport, world size, algorithm), and where they came from.

    Attributes:
        by_world: ``{transport: {world_size: {algo: (alpha_s, beta_s_per_byte)}}}`` from a tune file.
        source: the file they came from, or "defaults (ringcomm/auto.py)".
    """

    by_world: Mapping[str, Mapping[int, Mapping[str, tuple[float, float]]]] = field(default_factory=dict)
    source: str = "defaults (ringcomm/auto.py)"

    def for_call(self, transport: str, world_size: int) -> tuple[dict[str, tuple[float, float]], str]:
        """The fits to use for ``transport`` at ``world_size``, and a phrase saying which they are."""
        tuned, source = self.by_world.get(transport), self.source
        if not tuned:
            tuned, source = DEFAULT_FITS.get(transport, DEFAULT_FITS["torch"]), "defaults (ringcomm/auto.py)"
        nearest = min(tuned, key=lambda p: (abs(p - world_size), p))
        where = f"{source}, tuned at P={nearest}" + ("" if nearest == world_size else f" (P={world_size} asked)")
        return dict(tuned[nearest]), where


def parse_fits(text: str, source: str) -> Fits:
    """The fits in a tune file's ``text`` (JSON); ValueError naming what is wrong."""
    try:
        doc = json.loads(text)
        raw = doc["fits"]
        by_world: dict[str, dict[int, dict[str, tuple[float, float]]]] = {}
        for transport, worlds in raw.items():
            for p, algos in worlds.items():
                entries = {}
                for algo, fit in algos.items():
                    alpha, beta = float(fit["alpha_s"]), float(fit["beta_s_per_byte"])
                    if algo in COST_OF and math.isfinite(alpha) and math.isfinite(beta) and alpha >= 0 and beta >= 0:
                        entries[algo] = (alpha, beta)
                if entries:
                    by_world.setdefault(str(transport), {})[int(p)] = entries
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{source}: not a ringcomm tune file ({type(exc).__name__}: {exc})") from None
    return Fits(by_world, source)


@dataclass(frozen=True)
class Choice:
    """What auto picks for one call, and why.

    Attributes:
        algo: the algorithm chosen.
        predicted_s: predicted seconds of every candidate (the chosen one is the smallest).
        source: where the alpha and beta came from.
        nbytes, world_size, transport: the call.
    """

    algo: str
    predicted_s: dict[str, float]
    source: str
    nbytes: int
    world_size: int
    transport: str

    @property
    def reason(self) -> str:
        order = sorted(self.predicted_s.items(), key=lambda kv: kv[1])
        runner_up = f"; next {order[1][0]} {order[1][1] * 1e6:.0f} µs" if len(order) > 1 else ""
        return (
            f"{self.algo}: predicted {self.predicted_s[self.algo] * 1e6:.0f} µs for {self.nbytes} B over "
            f"{self.world_size} ranks on {self.transport}{runner_up} ({self.source})"
        )

    def __str__(self) -> str:
        lines = [f"auto picks {self.reason}"]
        for algo, seconds in sorted(self.predicted_s.items(), key=lambda kv: kv[1]):
            mark = "*" if algo == self.algo else " "
            lines.append(f"  {mark} {algo:<6} {seconds * 1e6:12.1f} µs")
        return "\n".join(lines)


def choose(fits: Fits, transport: str, world_size: int, nbytes: int) -> Choice:
    """The candidate with the smallest predicted time for ``nbytes`` over ``world_size`` ranks."""
    table, source = fits.for_call(transport, world_size)
    predicted = {}
    for algo in CANDIDATES:
        if algo in table and COST_OF.get(algo) in COSTS:
            alpha, beta = table[algo]
            predicted[algo] = COSTS[COST_OF[algo]].time(world_size, nbytes, alpha, beta)
    if not predicted:  # nothing fitted for this transport: the ring is never a bad answer
        return Choice("ring", {"ring": float("nan")}, source, nbytes, world_size, transport)
    best = min(predicted, key=lambda a: (predicted[a], CANDIDATES.index(a)))
    return Choice(best, predicted, source, nbytes, world_size, transport)


def load_local() -> Fits:
    """This process's tune file, or the defaults (with a warning naming a file that cannot be read)."""
    path = tune_path()
    if not path.is_file():
        return Fits()
    try:
        return parse_fits(path.read_text(), str(path))
    except (OSError, ValueError) as exc:
        import sys

        print(f"ringcomm: {exc}; auto uses its defaults", file=sys.stderr, flush=True)
        return Fits()


def explain(
    numel: int, dtype: torch.dtype = torch.float32, transport: str = "torch", world_size: int | None = None
) -> Choice:
    """What ``algo="auto"`` would pick for ``numel`` elements of ``dtype`` on ``transport``, and why.

    In a running world it uses the fit every rank uses (rank 0's); outside one, this
    process's tune file (or the defaults), and ``world_size`` must be given.
    """
    import torch.distributed as dist

    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if dist.is_initialized():
        from . import session

        fits = session.current().tuning()
        world_size = world_size or dist.get_world_size()
    else:
        if world_size is None:
            raise ValueError("explain() outside a process group needs world_size")
        fits = load_local()
    return choose(fits, transport, world_size, nbytes)


def placeholder(*args: Any, **kwargs: Any) -> None:
    """auto is resolved by ``ringcomm.all_reduce`` before it runs (it needs the world's fit)."""
    raise RuntimeError("algo='auto' is resolved by ringcomm.all_reduce; use auto.choose() to pick an algorithm")
