"""Render a Chrome trace (``launch.py --trace FILE``) as a Gantt chart, one row per rank.

The trace is the Chrome/Perfetto JSON format: either a list of events or an
object with ``"traceEvents"``. We read complete events (``ph: "X"``, with
``ts`` and ``dur`` in microseconds) and begin/end pairs (``ph: "B"`` then
``"E"`` on the same pid and tid, matched as a stack). ``pid`` is the rank;
``tid`` separates streams within a rank (e.g. compute and a comm thread), so
each (rank, tid) gets its own lane. Bars are coloured by ``cat`` (else
``name``), so compute, all-reduce and optimiser steps read at a glance.

From the command line (``--out`` defaults to the trace's name with ``.png``)::

    python launch.py --algo ring --world-size 2 --trace trace.json
    python -m analysis.timeline trace.json --out timeline.png

From Python::

    >>> from analysis.timeline import render_trace
    >>> render_trace("results/quick/trace.json", "results/quick/figures/timeline.png")
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from ringcomm.tools.cli import unwritable

from . import CliParser

__all__ = ["Span", "load_events", "thread_names", "trace_spans", "render_trace", "main"]

#: (pid, tid, name, category, start_us, duration_us)
Span = tuple[int, int, str, str, float, float]


def load_events(trace: str | Path | Mapping | Sequence[Mapping]) -> list[dict]:
    """Events from a trace file path, a ``{"traceEvents": [...]}`` object or a list of events."""
    if isinstance(trace, (str, Path)):
        trace = json.loads(Path(trace).read_text())
    if isinstance(trace, Mapping):
        trace = trace.get("traceEvents", [])
    return [dict(e) for e in trace if isinstance(e, Mapping)]


def _int(v: object) -> int:
    try:
        return int(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return hash(v) % 10_000


def thread_names(events: Sequence[Mapping]) -> dict[tuple[int, int], str]:
    """Lane names from ``thread_name`` metadata events: (pid, tid) -> name."""
    return {
        (_int(e.get("pid", 0)), _int(e.get("tid", 0))): str(e.get("args", {}).get("name", ""))
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }


def trace_spans(events: Sequence[Mapping]) -> list[Span]:
    """Complete spans from ``X`` events and matched ``B``/``E`` pairs (unmatched ones are dropped).

    Returns:
        ``(pid, tid, name, cat, start_us, dur_us)`` sorted by pid, tid and start.
    """
    spans: list[Span] = []
    open_: dict[tuple[int, int], list[Mapping]] = defaultdict(list)
    for e in sorted(events, key=lambda e: float(e.get("ts", 0.0))):
        ph = e.get("ph")
        key = (_int(e.get("pid", 0)), _int(e.get("tid", 0)))
        name = str(e.get("name", "?"))
        cat = str(e.get("cat") or name)
        if ph == "X":
            spans.append((*key, name, cat, float(e.get("ts", 0.0)), float(e.get("dur", 0.0))))
        elif ph == "B":
            open_[key].append(e)
        elif ph == "E" and open_[key]:
            b = open_[key].pop()
            start = float(b.get("ts", 0.0))
            bname = str(b.get("name", name))
            spans.append((*key, bname, str(b.get("cat") or bname), start, float(e.get("ts", start)) - start))
    return sorted(spans, key=lambda s: (s[0], s[1], s[4]))


def render_trace(
    trace: str | Path | Mapping | Sequence[Mapping],
    path: str | Path,
    title: str = "Timeline per rank",
    max_lanes: int = 32,
    notes: list[str] | None = None,
) -> Path | None:
    """Draw a Gantt chart (``broken_barh``), a lane per (rank, thread), time in ms from the first event.

    Args:
        trace: a trace file path, a loaded trace object or a list of events.
        path: PNG to write.
        title: figure title.
        max_lanes: lanes beyond this many are left out (noted in the title).
        notes: where to record why nothing was drawn.

    Returns:
        ``path``, or None (with a note) when the trace is missing, unreadable or has no spans.
    """
    # matplotlib on use, through plots (which chooses the Agg backend before pyplot is imported):
    # `python -m analysis.timeline --help` answers without it
    from . import plots

    plt, _save = plots.plt, plots._save

    try:
        events = load_events(trace)
        spans = trace_spans(events)
    except (OSError, ValueError) as exc:
        if notes is not None:
            notes.append(f"{Path(path).name}: skipped, trace unreadable ({exc})")
        return None
    if not spans:
        if notes is not None:
            notes.append(f"{Path(path).name}: skipped, trace has no complete spans")
        return None
    t0 = min(s[4] for s in spans)
    lanes = sorted({(s[0], s[1]) for s in spans})
    dropped = len(lanes) - max_lanes
    lanes = lanes[:max_lanes]
    lane_of = {lane: i for i, lane in enumerate(lanes)}
    cats = sorted({s[3] for s in spans})
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {c: cycle[i % len(cycle)] for i, c in enumerate(cats)}
    per_lane_cat: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    for pid, tid, _name, cat, start, dur in spans:
        if (pid, tid) in lane_of:
            per_lane_cat[(lane_of[(pid, tid)], cat)].append(((start - t0) / 1e3, max(dur, 0.0) / 1e3))
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.45 * len(lanes)))
    for (lane, cat), bars in per_lane_cat.items():
        ax.broken_barh(bars, (lane - 0.4, 0.8), facecolors=colour[cat], edgecolor="none")
    names = thread_names(events)
    labels = [f"rank {pid} / {names.get((pid, tid), tid)}" for pid, tid in lanes]
    ax.set_yticks(range(len(lanes)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("time since first event (ms)")
    ax.set_title(title + (f" ({dropped} lanes not shown)" if dropped > 0 else ""), fontsize=9, loc="left")
    ax.legend(
        handles=[plt.Rectangle((0, 0), 1, 1, color=colour[c]) for c in cats],
        labels=cats,
        fontsize=7,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),  # above the axes, clear of the bars
        ncol=min(6, len(cats)),
        frameon=False,
    )
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


def main(argv: Sequence[str] | None = None) -> int:
    """Render a trace file to PNG; one line on stderr and status 1 if there is nothing to draw."""
    parser = CliParser(
        prog="python -m analysis.timeline",
        description="Render a Chrome trace (launch.py --trace FILE) as a per-rank Gantt chart (PNG).",
    )
    parser.add_argument("trace", metavar="TRACE.json", help="the file launch.py --trace wrote")
    parser.add_argument("--out", metavar="PNG", help="the figure to write (default: TRACE with .png)")
    parser.add_argument("--title", default="Timeline per rank", help="the figure's title")
    parser.add_argument("--max-lanes", type=int, default=32, help="lanes (rank, thread) drawn at most")
    args = parser.parse_args(argv)
    if args.max_lanes < 1:
        parser.error(f"--max-lanes must be at least 1, got {args.max_lanes}")
    out = Path(args.out) if args.out else Path(args.trace).with_suffix(".png")
    why = unwritable(str(out))
    if why:
        parser.error(f"--out {out}: {why}")
    notes: list[str] = []
    written = render_trace(args.trace, out, title=args.title, max_lanes=args.max_lanes, notes=notes)
    if written is None:
        why = notes[-1].split(": skipped, ", 1)[-1] if notes else "nothing to draw"
        print(f"{parser.prog}: {args.trace}: {why}; nothing written", file=sys.stderr)
        return 1
    print(f"# wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
