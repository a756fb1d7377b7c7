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

from ringcomm.tools.cli import HelpFormatter, Parser

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


# The one parser and help formatter of every command (ringcomm/tools/cli.py), under the names the
# analysis has always used.
CliHelpFormatter = HelpFormatter
CliParser = Parser
