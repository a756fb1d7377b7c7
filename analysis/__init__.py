"""Experiments and analysis: measured speedup, efficiency, bandwidth, comm vs compute, accuracy.

    python -m analysis.sweep --quick --out results/quick   # run the experiments (--dry-run to see them)
    python -m analysis.report results/quick                # REPORT.md + figures/ from what was measured

One concept per module:

``sweep``     the plan (``build_plan``) and the runner: launch.py and ringcomm.bench as subprocesses
``fit``       alpha-beta fits per algorithm (counts read off ``ringcomm.cost``) and Amdahl fits
``plots``     the figures (matplotlib, Agg, PNG); each skips with a note when its data is missing
``timeline``  a Chrome trace (``launch.py --trace``) as a per-rank Gantt chart
``report``    loads a results folder and writes ``REPORT.md``, ``figures/`` and ``analysis.json``

Everything here reports measurements on the machine at hand, never projections.
Submodules are imported on use (``from analysis import report``) so that importing the
package does not pull in matplotlib.
"""

__all__ = ["fit", "plots", "report", "sweep", "timeline"]
