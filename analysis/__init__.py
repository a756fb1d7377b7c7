"""Experiments and analysis: measured speedup, efficiency, bandwidth, comm vs compute, accuracy.

    python -m analysis.sweep --quick --out results/quick   # run the experiments (--dry-run to see them)
    python -m analysis.report results/quick                # REPORT.md + figures/ from what was measured

One concept per module:

``sweep``     the plan (``build_plan``) and the runner: launch.py and ringcomm.bench as subprocesses
``results``   a results folder: its files' schema, and loading them
``tables``    the report's numbers: speedup, comm share, batch sweeps ... (pure, no formatting)
``fit``       alpha-beta fits per algorithm (counts read off ``ringcomm.cost``) and Amdahl fits
``plots``     the figures (matplotlib, Agg, PNG); each skips with a note when its data is missing
``timeline``  a Chrome trace (``launch.py --trace``) as a per-rank Gantt chart
``report``    renders it all: ``REPORT.md``, ``figures/`` and ``analysis.json``
``reliability`` the fault-injection table from ``tests/test_faults.py``'s records

Everything here reports measurements on the machine at hand, never projections.
Submodules are imported on use (``from analysis import report``) so that importing the
package does not pull in matplotlib.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = [
    "CliParser",
    "CliHelpFormatter",
    "fit",
    "plots",
    "reliability",
    "report",
    "results",
    "sweep",
    "tables",
    "timeline",
]


class CliHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default shown, once: not None or False (such an option's help says what its absence
    does), and not after a help text that already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class CliParser(argparse.ArgumentParser):
    """The commands' argparse: a mistake is one line on stderr and status 2 (the usage is --help's);
    the description's ``literal`` markup is dropped."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        if isinstance(kwargs.get("description"), str):
            kwargs["description"] = kwargs["description"].replace("``", "")  # type: ignore[union-attr]
        kwargs.setdefault("formatter_class", CliHelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (--help lists the options)\n")
