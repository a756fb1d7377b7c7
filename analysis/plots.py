"""Figures for the report (matplotlib, Agg backend, PNG).

Every function takes plain data (bench rows, fits, small dicts built by
``analysis.tables``) and an output path, and returns the path it wrote, or
``None`` when the data it needs is missing; then it appends the reason to
``notes`` (if given) and writes nothing. No function raises on missing or
partial data: an experiment that failed leaves a gap, not a crash.

Units: sizes in bytes, times in seconds unless a label says otherwise,
bandwidths in GB/s (1e9 bytes per second).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from ringcomm.cost import busbw  # noqa: E402

from .fit import AlphaBetaFit, AmdahlFit, amdahl_speedup  # noqa: E402
from .markdown import human_bytes  # noqa: E402  (offered here too, where it was first)

__all__ = [
    "plot_busbw",
    "plot_time_vs_world",
    "plot_speedup",
    "plot_comm_compute",
    "plot_bandwidth_utilisation",
    "plot_training_curves",
    "plot_per_class",
    "plot_confusion",
    "plot_batch_sweep",
    "plot_large_batch",
    "plot_two_level",
    "human_bytes",
]

Notes = list[str] | None


def _skip(notes: Notes, path: Path | str, why: str) -> None:
    if notes is not None:
        notes.append(f"{Path(path).name}: skipped, {why}")


def _save(fig: plt.Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _colours(labels: Sequence[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}


def _fit_note(fit: AlphaBetaFit | None) -> str:
    if fit is None:
        return "no fit"
    return (
        f"a={fit.alpha_s * 1e6:.0f}us, 1/b={fit.bandwidth_gbs:.2f}GB/s, "
        f"err med {fit.median_rel_err:.0%} max {fit.max_rel_err:.0%}"
    )


def plot_busbw(
    rows: Sequence[Mapping], fits: Mapping[str, AlphaBetaFit], path: Path | str, notes: Notes = None
) -> Path | None:
    """Bus bandwidth against message size, one panel per world size, one line per algorithm.

    Points are measured (``busbw_gbs`` of bench rows); dashed lines are the fitted
    alpha-beta model of the same algorithm turned into busbw. The legend carries
    each fit's alpha, 1/beta and median/max relative error. ``auto`` rows carry
    the algorithm auto took (``choice``): each of its points is labelled with it,
    and a dotted line marks each size range where auto's pick changes.
    """
    rows = [r for r in rows if int(r.get("world_size", 0)) > 1 and r.get("time_us", 0) > 0]
    if not rows:
        _skip(notes, path, "no bench rows with world size > 1")
        return None
    world_sizes = sorted({int(r["world_size"]) for r in rows})
    labels = sorted({r["algo"] for r in rows})
    colour = _colours(labels)
    fig, axes = plt.subplots(1, len(world_sizes), figsize=(5.2 * len(world_sizes), 4.4), squeeze=False)
    for ax, ws in zip(axes[0], world_sizes):
        for label in labels:
            pts = sorted(
                (r["size_bytes"], r["busbw_gbs"])
                for r in rows
                if r["world_size"] == ws and r["algo"] == label
            )
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, ys, "o-", color=colour[label], label=label, ms=4, lw=1)
            fit = fits.get(label)
            if fit is not None:
                grid = np.geomspace(min(xs), max(xs), 40)
                model = [busbw(ws, m, fit.predict(ws, m)) for m in grid]
                ax.plot(grid, model, "--", color=colour[label], lw=1, alpha=0.8)
        _mark_auto(ax, [r for r in rows if r["world_size"] == ws and "choice" in r])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("busbw (GB/s)")
        ax.set_title(f"P = {ws}  (points measured, dashed = alpha-beta fit)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    handles = [
        plt.Line2D([], [], color=colour[label], marker="o", label=f"{label}: {_fit_note(fits.get(label))}")
        for label in labels
    ]
    fig.legend(handles=handles, loc="lower center", fontsize=7, ncol=2, frameon=False)
    fig.subplots_adjust(bottom=0.1 + 0.035 * math.ceil(len(labels) / 2))
    fig.suptitle("All-reduce bus bandwidth vs message size (measured on this machine)", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0.04 + 0.04 * math.ceil(len(labels) / 2), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mark_auto(ax: Any, auto_rows: Sequence[Mapping]) -> None:
    """Label auto's points with the algorithm it took; a dotted line between sizes where that changes."""
    for label in sorted({r["algo"] for r in auto_rows}):
        pts = sorted((r["size_bytes"], r["busbw_gbs"], r["choice"]) for r in auto_rows if r["algo"] == label)
        for x, y, choice in pts:
            ax.annotate(choice, (x, y), textcoords="offset points", xytext=(0, 6), fontsize=6, ha="center")
        for (x0, _, a), (x1, _, b) in zip(pts, pts[1:]):
            if a != b:  # the crossover lies between these two sizes: draw it at their geometric mean
                mid = math.sqrt(x0 * x1)
                ax.axvline(mid, ls=":", lw=1, color="grey")
                ax.annotate(f"{label}: {a} -> {b}", (mid, 0.98), xycoords=("data", "axes fraction"),
                            fontsize=6, rotation=90, va="top", ha="right")  # fmt: skip


def plot_time_vs_world(
    rows: Sequence[Mapping],
    fits: Mapping[str, AlphaBetaFit],
    path: Path | str,
    size_bytes: int | None = None,
    notes: Notes = None,
) -> Path | None:
    """Time per all-reduce against world size at one message size, with model predictions.

    Args:
        size_bytes: the message size to show; default the largest size measured
            at more than one world size (else the largest).
    """
    rows = [r for r in rows if r.get("time_us", 0) > 0]
    if not rows:
        _skip(notes, path, "no bench rows")
        return None
    if size_bytes is None:
        by_size: dict[int, set] = defaultdict(set)
        for r in rows:
            by_size[int(r["size_bytes"])].add(int(r["world_size"]))
        multi = [s for s, w in by_size.items() if len(w) > 1]
        size_bytes = max(multi or by_size)
    rows = [r for r in rows if int(r["size_bytes"]) == size_bytes]
    labels = sorted({r["algo"] for r in rows})
    colour = _colours(labels)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label in labels:
        pts: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            if r["algo"] == label:
                pts[int(r["world_size"])].append(r["time_us"] / 1e3)
        ws = sorted(pts)
        ax.plot(
            ws, [float(np.median(pts[w])) for w in ws], "o", color=colour[label], label=f"{label} measured"
        )
        fit = fits.get(label)
        if fit is not None:
            grid = list(range(2, max(max(ws), 2) + 1))
            ax.plot(grid, [fit.predict(p, size_bytes) * 1e3 for p in grid], "--", color=colour[label], lw=1)
    ax.set_xlabel("world size P (processes)")
    ax.set_ylabel("time per all-reduce (ms)")
    ax.set_title(
        f"All-reduce of {human_bytes(size_bytes)}B: measured (points) vs alpha-beta model (dashed)",
        fontsize=9,
    )
    ax.set_xticks(sorted({int(r["world_size"]) for r in rows}))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_speedup(
    table: Sequence[Mapping], amdahl: Mapping[str, AmdahlFit], path: Path | str, notes: Notes = None
) -> Path | None:
    """Training speedup and parallel efficiency against world size, one line per algorithm.

    Args:
        table: rows ``{"series", "world_size", "speedup", "efficiency"}``
            (speedup = throughput(P) / throughput(1), efficiency = speedup / P).
        amdahl: series -> fitted parallel fraction, drawn as a dotted curve.
    """
    table = [t for t in table if t.get("speedup") is not None and not math.isnan(t["speedup"])]
    if not table:
        _skip(notes, path, "no training runs with a P=1 baseline")
        return None
    series = sorted({t["series"] for t in table})
    colour = _colours(series)
    max_p = max(int(t["world_size"]) for t in table)
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    ps = np.arange(1, max_p + 1)
    ax_s.plot(ps, ps, ":", color="grey", label="ideal (S = P)")
    for s in series:
        pts = sorted((int(t["world_size"]), t["speedup"], t["efficiency"]) for t in table if t["series"] == s)
        ax_s.plot([p for p, *_ in pts], [v for _, v, _ in pts], "o-", color=colour[s], label=s)
        ax_e.plot([p for p, *_ in pts], [e for *_, e in pts], "o-", color=colour[s], label=s)
        fit = amdahl.get(s)
        if fit is not None:
            grid = np.linspace(1, max_p, 50)
            curve = [amdahl_speedup(p, fit.f) if (1 - fit.f) + fit.f / p > 0 else np.nan for p in grid]
            ax_s.plot(grid, curve, "--", color=colour[s], lw=1, alpha=0.7, label=f"{s} Amdahl f={fit.f:.2f}")
    ax_s.set_xlabel("world size P")
    ax_s.set_ylabel("speedup (throughput / throughput at P=1)")
    ax_s.set_title("Measured training speedup with Amdahl fit", fontsize=9)
    ax_e.axhline(1.0, ls=":", color="grey")
    ax_e.set_xlabel("world size P")
    ax_e.set_ylabel("efficiency (speedup / P)")
    ax_e.set_title("Parallel efficiency", fontsize=9)
    for ax in (ax_s, ax_e):
        ax.set_xticks(sorted({int(t["world_size"]) for t in table}))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_comm_compute(entries: Sequence[Mapping], path: Path | str, notes: Notes = None) -> Path | None:
    """Stacked bars per run: mean compute and communication milliseconds per training step.

    Args:
        entries: ``{"label", "step_time_s", "comm_time_s"}``, per-step means;
            compute = step - comm (floored at 0).
    """
    entries = [e for e in entries if e.get("step_time_s")]
    if not entries:
        _skip(notes, path, "no per-step timings (steps_log or comm_time_s/train_time_s)")
        return None
    labels = [e["label"] for e in entries]
    comm = np.array([e.get("comm_time_s") or 0.0 for e in entries]) * 1e3
    step = np.array([e["step_time_s"] for e in entries]) * 1e3
    compute = np.maximum(step - comm, 0.0)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(entries) + 2), 4.4))
    x = np.arange(len(entries))
    ax.bar(x, compute, label="compute (step - comm)", color="#4c72b0")
    ax.bar(x, comm, bottom=compute, label="communication", color="#dd8452")
    for xi, c, s in zip(x, comm, step):
        if s > 0:
            ax.text(xi, s, f"{c / s:.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("ms per step (mean)")
    ax.set_title(
        "Compute vs communication per training step (comm share on top; comm may overlap compute)", fontsize=9
    )
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_bandwidth_utilisation(
    entries: Sequence[Mapping], path: Path | str, notes: Notes = None
) -> Path | None:
    """Bus bandwidth reached inside training against the benchmark's, per run.

    Args:
        entries: ``{"label", "train_busbw_gbs", "bench_busbw_gbs"}``; the latter may be None.
    """
    entries = [e for e in entries if e.get("train_busbw_gbs")]
    if not entries:
        _skip(notes, path, "no runs with bytes and comm time per step")
        return None
    x = np.arange(len(entries))
    train = [e["train_busbw_gbs"] for e in entries]
    bench = [e.get("bench_busbw_gbs") or 0.0 for e in entries]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(entries) + 2), 4.4))
    ax.bar(x - 0.2, train, 0.4, label="in training: bytes sent / comm time", color="#55a868")
    ax.bar(x + 0.2, bench, 0.4, label="benchmark busbw (same algo, P, nearest size)", color="#8172b2")
    for xi, t, b in zip(x, train, bench):
        if b:
            ax.text(xi, max(t, b), f"{t / b:.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [e["label"] for e in entries], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("GB/s")
    ax.set_title("Bandwidth utilisation: training vs benchmark busbw (ratio on top)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_training_curves(
    runs: Sequence[tuple[str, Sequence[Mapping]]], path: Path | str, notes: Notes = None
) -> Path | None:
    """Loss and accuracy against epoch for each run.

    Args:
        runs: ``(label, history)``, history entries as in metrics.json
            (``epoch``, ``train_loss``, ``train_accuracy``, ``test_accuracy``).
    """
    runs = [(label, h) for label, h in runs if h]
    if not runs:
        _skip(notes, path, "no per-epoch history")
        return None
    colour = _colours([label for label, _ in runs])
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    for label, hist in runs:
        epochs = [h.get("epoch", i + 1) for i, h in enumerate(hist)]
        if any(h.get("train_loss") is not None for h in hist):
            ax_l.plot(
                epochs,
                [h.get("train_loss", np.nan) for h in hist],
                "o-",
                color=colour[label],
                label=label,
                ms=3,
            )
        if any(h.get("test_accuracy") is not None for h in hist):
            ax_a.plot(
                epochs,
                [h.get("test_accuracy", np.nan) for h in hist],
                "o-",
                color=colour[label],
                label=f"{label} test",
                ms=3,
            )
        if any(h.get("train_accuracy") is not None for h in hist):
            ax_a.plot(epochs, [h.get("train_accuracy", np.nan) for h in hist], ":", color=colour[label], lw=1)
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("training loss")
    ax_l.set_title("Training loss", fontsize=9)
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel("accuracy (test solid, train dotted)")
    ax_a.set_title("Accuracy", fontsize=9)
    for ax in (ax_l, ax_a):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, path)


def plot_per_class(
    per_class: Sequence[float] | None,
    path: Path | str,
    title: str = "",
    notes: Notes = None,
    classes: Sequence[str] | None = None,
) -> Path | None:
    """Bar chart of test accuracy per class (fractions in [0, 1] or percentages), named by ``classes``."""
    if not per_class:
        _skip(notes, path, "no per_class_accuracy")
        return None
    values = np.asarray(per_class, dtype=float)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.bar(np.arange(len(values)), values, color="#4c72b0")
    ax.axhline(float(np.mean(values)), ls="--", color="grey", lw=1, label=f"mean {np.mean(values):.3g}")
    names = list(classes) if classes and len(classes) == len(values) else [str(i) for i in range(len(values))]
    ax.set_xticks(np.arange(len(values)), names, rotation=30 if max(map(len, names)) > 3 else 0, fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Per-class test accuracy {title}".strip(), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_confusion(
    matrix: Sequence[Sequence[float]] | None, path: Path | str, title: str = "", notes: Notes = None
) -> Path | None:
    """Confusion-matrix heatmap: rows are true classes, columns predicted, cells annotated with counts."""
    if not matrix or not len(matrix[0]):
        _skip(notes, path, "no confusion_matrix")
        return None
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    im = ax.imshow(m, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    top = m.max() if m.size else 0
    for (i, j), v in np.ndenumerate(m):
        ax.text(
            j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color="white" if v > top / 2 else "black"
        )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    ax.set_title(f"Confusion matrix {title}".strip(), fontsize=9)
    return _save(fig, path)


def plot_batch_sweep(entries: Sequence[Mapping], path: Path | str, notes: Notes = None) -> Path | None:
    """Time per epoch (left axis) and throughput (right axis) against per-worker batch size.

    Args:
        entries: ``{"batch_size", "epoch_time_s", "throughput_img_s"}``, either value may be None.
    """
    entries = sorted(
        (e for e in entries if e.get("epoch_time_s") or e.get("throughput_img_s")),
        key=lambda e: e["batch_size"],
    )
    if not entries:
        _skip(notes, path, "no batch-size sweep runs")
        return None
    bs = [e["batch_size"] for e in entries]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    epoch = [e.get("epoch_time_s") or np.nan for e in entries]
    ax.plot(bs, epoch, "o-", color="#4c72b0", label="time per epoch (s)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_xlabel("per-worker batch size")
    ax.set_ylabel("time per epoch (s)", color="#4c72b0")
    ax2 = ax.twinx()
    ax2.plot(bs, [e.get("throughput_img_s") or np.nan for e in entries], "s--", color="#dd8452")
    ax2.set_ylabel("throughput (images/s)", color="#dd8452")
    ws = entries[0].get("world_size")
    ax.set_title(
        f"Batch-size sweep{f' at P = {ws}' if ws else ''}: larger batches amortise communication", fontsize=9
    )
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_large_batch(entries: Sequence[Mapping], path: Path | str, notes: Notes = None) -> Path | None:
    """Final test accuracy of the small-batch reference and the large batch without/with LR scaling.

    Args:
        entries: ``{"label", "test_acc", "history"}``; history entries as in metrics.json
            (``epoch``, ``test_accuracy``), optional: drawn as curves on the right.
    """
    entries = [e for e in entries if e.get("test_acc") is not None]
    if not entries:
        _skip(notes, path, "no large-batch runs")
        return None
    fig, (ax_b, ax_c) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    colour = _colours([e["label"] for e in entries])
    x = np.arange(len(entries))
    ax_b.bar(x, [e["test_acc"] for e in entries], color=[colour[e["label"]] for e in entries])
    for xi, e in zip(x, entries):
        ax_b.text(xi, e["test_acc"], f"{e['test_acc']:.3g}", ha="center", va="bottom", fontsize=8)
    ax_b.set_xticks(x, [e["label"] for e in entries], rotation=20, ha="right", fontsize=7)
    ax_b.set_ylabel("final test accuracy")
    ax_b.set_title("Large batch: accuracy with and without linear LR scaling + warmup", fontsize=9)
    ax_b.grid(True, axis="y", alpha=0.3)
    drew = False
    for e in entries:
        hist = e.get("history") or []
        if hist and any(h.get("test_accuracy") is not None for h in hist):
            drew = True
            ax_c.plot(
                [h.get("epoch", i + 1) for i, h in enumerate(hist)],
                [h.get("test_accuracy", np.nan) for h in hist],
                "o-",
                color=colour[e["label"]],
                label=e["label"],
                ms=3,
            )
    ax_c.set_xlabel("epoch")
    ax_c.set_ylabel("test accuracy")
    ax_c.set_title("Test accuracy per epoch", fontsize=9)
    ax_c.grid(True, alpha=0.3)
    if drew:
        ax_c.legend(fontsize=7)
    return _save(fig, path)


def plot_two_level(entries: Sequence[Mapping], path: Path | str, notes: Notes = None) -> Path | None:
    """Time per all-reduce against nodes × ranks per node (``tables.two_level_entries``), at the largest
    size measured: one mark per algorithm and placement, its model a dash of the same colour."""
    if not entries:
        _skip(notes, path, "no worlds of several ranks per node")
        return None
    size = max(int(e["size_bytes"]) for e in entries)
    entries = [e for e in entries if int(e["size_bytes"]) == size]
    # x: the layouts in order of world size, then nodes (2 x 4 before 4 x 2: same N, fewer links)
    layouts = sorted({(e["nodes"], e["ranks_per_node"]) for e in entries}, key=lambda s: (s[0] * s[1], s[0]))
    x_of = {s: i for i, s in enumerate(layouts)}
    # hier takes the same path under either placement: one series; the flat ones split by placement
    def label(e: Mapping) -> str:
        return str(e["algo"]) if e["algo"] == "hier" else f"{e['algo']} {e['placement']}"

    labels = sorted({label(e) for e in entries}, key=lambda s: (s != "hier", s))
    colour = _colours(labels)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    width = 0.8 / max(len(labels), 1)
    for i, lab in enumerate(labels):
        mine = [e for e in entries if label(e) == lab]
        xs = [x_of[(e["nodes"], e["ranks_per_node"])] - 0.4 + (i + 0.5) * width for e in mine]
        ax.plot(xs, [e["time_s"] * 1e3 for e in mine], "o", color=colour[lab], label=lab)
        for x, e in zip(xs, mine):
            if e["model_s"] is not None:
                ax.plot([x - width / 2, x + width / 2], [e["model_s"] * 1e3] * 2, "-", color=colour[lab], lw=2, alpha=0.6)
    ax.set_xticks(range(len(layouts)), [f"{n} × {g}" for n, g in layouts])
    ax.set_xlabel("nodes × ranks per node")
    ax.set_ylabel("time per all-reduce (ms)")
    ax.set_ylim(bottom=0)
    link = ", ".join(sorted({str(e["link"]) for e in entries}))
    ax.set_title(f"All-reduce of {human_bytes(size)}B, {link} links: measured (points), model (dashes)", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
