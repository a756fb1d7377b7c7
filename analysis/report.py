"""``python -m analysis.report RESULTS_DIR``: tables, figures and ``REPORT.md`` from a sweep's results.

    python -m analysis.sweep --quick --out results/quick
    python -m analysis.report results/quick        # -> results/quick/REPORT.md, figures/*.png

Reads what ``analysis.sweep`` left in RESULTS_DIR, wherever it lies below it:

* bench JSON (``ringcomm.bench --json``: ``{"machine", "world_size", "rows": [...]}``),
* ``metrics.json`` of each ``launch.py`` run (kind from ``sweep.json`` or its folder:
  ``train/``, ``batch/``, ``largebatch/``),
* ``sweep.json`` (commands, times, failures) and ``trace.json`` (timeline), if present.

Writes ``REPORT.md``, ``figures/*.png`` and ``analysis.json`` (the fits and
tables in machine-readable form). Anything missing leaves a note, not an error.

Definitions. Speedup S(P) = throughput(P) / throughput(1) in images per second
with a fixed per-worker batch (weak scaling: the global batch grows with P);
the P = 1 baseline is the same algorithm and transport, else the same
algorithm, else ddp. Efficiency = S / P. Comm share = comm_time_s /
train_time_s. "vs gloo" = gloo's time / the algorithm's time in the same
world (above 1: faster than gloo).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ringcomm import cost
from ringcomm.bench import AlgoSpec

from . import plots
from .fit import (
    AlphaBetaFit,
    AmdahlFit,
    cost_name,
    fit_amdahl,
    fit_rows,
    karp_flatt,
    predict_time,
)
from .timeline import render_trace

__all__ = [
    "KNOWN_TRAIN_SIZES",
    "Results",
    "load_results",
    "normalise_metrics",
    "training_table",
    "step_stats",
    "build_report",
    "main",
]

#: metrics.json may name a field differently than the contract; first match wins.
_ALIASES = {
    "steps_log": ("steps_log", "step_records", "step_log", "comm_log"),
    "train_time_s": ("train_time_s", "train_seconds", "wall_time_s"),
    "throughput_img_s": ("throughput_img_s", "throughput", "images_per_s"),
    "comm_time_s": ("comm_time_s", "comm_seconds"),
    "final_test_accuracy": ("final_test_accuracy", "test_accuracy", "final_test_acc"),
    "final_train_loss": ("final_train_loss", "train_loss", "final_loss"),
    "train_size": ("train_size", "num_train", "train_samples", "dataset_size"),
    "batch_size": ("batch_size", "batch_size_per_worker"),
}
_HISTORY_ALIASES = {
    "loss": ("loss", "train_loss"),
    "train_acc": ("train_acc", "train_accuracy"),
    "test_acc": ("test_acc", "test_accuracy"),
}
#: Training-set sizes (images) of the datasets trainer/data.py knows, used to turn throughput
#: into time per epoch when a run is capped by --max-steps and metrics.json does not say.
KNOWN_TRAIN_SIZES = {"synthetic": 10_000, "cifar10": 50_000, "fashion-mnist": 60_000}


def _get(m: Mapping, key: str, default: object = None) -> object:
    for k in _ALIASES.get(key, (key,)):
        v = m.get(k)
        if v is not None and not (key == "steps_log" and not isinstance(v, list)):
            return v
    return default


def normalise_metrics(m: Mapping) -> dict:
    """A launch.py ``metrics.json`` in the contract's key names, whatever names it used.

    Adds (never removes): ``steps_log`` (from ``step_records``), ``history`` entries with
    ``loss``/``train_acc``/``test_acc`` (from ``train_loss``/``train_accuracy``/``test_accuracy``),
    ``per_class_accuracy`` as a list in class order (from a ``{class: accuracy}`` dict; the
    names go to ``classes``), ``batch_size`` per worker, ``scale_lr``/``warmup_epochs``/``lr``
    from ``config`` when only it has them, and ``train_size`` for known datasets.
    """
    out = dict(m)
    for key in ("steps_log", "train_time_s", "throughput_img_s", "comm_time_s", "batch_size"):
        v = _get(m, key)
        if v is not None:
            out[key] = v
    hist = []
    for h in m.get("history") or []:
        h = dict(h)
        for key, names in _HISTORY_ALIASES.items():
            if h.get(key) is None:
                h[key] = next((h[n] for n in names if h.get(n) is not None), None)
        hist.append(h)
    out["history"] = hist
    pca = m.get("per_class_accuracy")
    if isinstance(pca, Mapping):
        out["classes"] = list(m.get("classes") or pca.keys())
        out["per_class_accuracy"] = [float(pca[c]) for c in out["classes"] if c in pca]
    cfg = m.get("config") if isinstance(m.get("config"), Mapping) else {}
    for key in ("scale_lr", "warmup_epochs", "lr", "max_steps"):
        if out.get(key) is None and cfg.get(key) is not None:
            out[key] = cfg[key]
    if _get(m, "train_size") is None and str(m.get("dataset")) in KNOWN_TRAIN_SIZES:
        out["train_size"] = KNOWN_TRAIN_SIZES[str(m.get("dataset"))]
        out["train_size_assumed"] = True
    return out


@dataclass
class Results:
    """Everything found in a results folder.

    Attributes:
        root: the folder.
        bench_rows: bench rows, each with ``_source`` (the file, relative to root).
        machine: machine description (from sweep.json, else a bench file).
        runs: metrics.json contents, each with ``_name``, ``_kind`` and ``_meta``.
        manifest: sweep.json, or None.
        trace: trace.json path, or None.
    """

    root: Path
    bench_rows: list[dict] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    manifest: dict | None = None
    trace: Path | None = None


def load_results(root: str | Path) -> Results:
    """Read bench JSON, metrics.json, sweep.json and trace.json found below ``root``."""
    root = Path(root)
    res = Results(root=root)
    sweep = root / "sweep.json"
    if sweep.exists():
        res.manifest = json.loads(sweep.read_text())
        res.machine = dict(res.manifest.get("machine") or {})
    by_output = {}
    for r in (res.manifest or {}).get("runs", []):
        by_output[str(r.get("output"))] = r
    for path in sorted(root.rglob("*.json")):
        rel = path.relative_to(root).as_posix()
        if path.name in ("sweep.json", "analysis.json", "trace.json"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            for row in data["rows"]:
                res.bench_rows.append({**row, "_source": rel})
            if not res.machine and isinstance(data.get("machine"), dict):
                res.machine = dict(data["machine"])
        elif path.name == "metrics.json" and isinstance(data, dict):
            run = by_output.get(rel, {})
            top = rel.split("/")[0]
            kind = run.get("kind") or top  # a folder of its own (trace_run, ...) is not a training run
            res.runs.append(
                {
                    **normalise_metrics(data),
                    "_name": run.get("name") or path.parent.name,
                    "_kind": kind,
                    "_meta": run.get("meta", {}),
                }
            )
    trace = root / "trace.json"
    res.trace = trace if trace.exists() else None
    return res


def _series(m: Mapping) -> str:
    """Training series label in bench style: ``ddp``, ``ring``, ``ring@zmq``, ``ps``, ``ps@zmq``."""
    algo = str(m.get("algo", "?"))
    transport = str(m.get("transport") or "torch")
    return algo if algo == "ddp" or transport == "torch" else f"{algo}@{transport}"


def _per_worker_batch(m: Mapping) -> int | None:
    meta = m.get("_meta") or {}
    if meta.get("batch_size"):
        return int(meta["batch_size"])
    if m.get("batch_size"):
        return int(m["batch_size"])
    g, p = m.get("global_batch_size"), m.get("world_size")
    return int(g) // int(p) if g and p else None


def step_stats(m: Mapping, skip_first: bool = True) -> dict:
    """Mean per-step step time, comm time (seconds) and bytes of a run.

    From ``steps_log`` when present (the first step is left out when there are
    more than two: it carries set-up and warm-up), else from the run totals
    ``comm_time_s`` and ``train_time_s`` over ``steps``.

    Returns:
        ``{"step_time_s", "comm_time_s", "bytes", "buckets", "source"}`` (bytes: sent by the
        rank); values may be None.
    """
    log = _get(m, "steps_log") or []
    log = [s for s in log if isinstance(s, Mapping)]
    if log:
        if skip_first and len(log) > 2:
            log = log[1:]

        def mean(key: str) -> float | None:
            vals = [float(s[key]) for s in log if s.get(key) is not None]
            return statistics.fmean(vals) if vals else None

        return {
            "step_time_s": mean("step_time_s"),
            "comm_time_s": mean("comm_time_s"),
            "bytes": mean("bytes"),
            "buckets": mean("buckets"),
            "source": "steps_log",
        }
    steps = m.get("steps")
    train, comm = _get(m, "train_time_s"), _get(m, "comm_time_s")
    if steps and train:
        return {
            "step_time_s": float(train) / int(steps),
            "comm_time_s": float(comm) / int(steps) if comm is not None else None,
            "bytes": None,
            "buckets": None,
            "source": "totals",
        }
    return {"step_time_s": None, "comm_time_s": None, "bytes": None, "buckets": None, "source": None}


def training_table(runs: Sequence[Mapping]) -> list[dict]:
    """Throughput, speedup, efficiency, comm share and accuracy per training run (kind ``train``).

    Returns:
        Rows sorted by series and world size with keys ``series, algo, transport,
        world_size, global_batch_size, steps, throughput_img_s, speedup, efficiency,
        karp_flatt, comm_share, final_train_loss, final_test_accuracy, name``.
    """
    train = [m for m in runs if m.get("_kind", "train") == "train"]
    base: dict[str, float] = {}
    for m in train:
        if int(m.get("world_size", 0)) == 1 and _get(m, "throughput_img_s"):
            base.setdefault(_series(m), float(_get(m, "throughput_img_s")))
            base.setdefault("algo:" + str(m.get("algo")), float(_get(m, "throughput_img_s")))

    def baseline(m: Mapping) -> tuple[str | None, float | None]:
        for key in (_series(m), "algo:" + str(m.get("algo")), "ddp", "algo:ddp"):
            if key in base:
                return key, base[key]
        return next(iter(base.items()), (None, None))

    rows = []
    for m in train:
        p = int(m.get("world_size", 0) or 0)
        thr = _get(m, "throughput_img_s")
        base_key, b = baseline(m)
        s = float(thr) / b if thr and b else math.nan
        train_t, comm_t = _get(m, "train_time_s"), _get(m, "comm_time_s")
        rows.append(
            {
                "series": _series(m),
                "algo": m.get("algo"),
                "transport": m.get("transport"),
                "world_size": p,
                "global_batch_size": m.get("global_batch_size"),
                "steps": m.get("steps"),
                "throughput_img_s": float(thr) if thr else None,
                "speedup": s,
                "efficiency": s / p if p else math.nan,
                "karp_flatt": karp_flatt(p, s) if not math.isnan(s) else math.nan,
                "comm_share": float(comm_t) / float(train_t) if comm_t is not None and train_t else None,
                "final_train_loss": _get(m, "final_train_loss"),
                "final_test_accuracy": _get(m, "final_test_accuracy"),
                "name": m.get("_name"),
                "baseline": (base_key or "").removeprefix("algo:") or None,
            }
        )
    return sorted(rows, key=lambda r: (r["series"], r["world_size"]))


# --------------------------------------------------------------------------- formatting


def _fmt(v: object, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    if isinstance(v, int) and not isinstance(v, bool) and spec == ".3g":
        return str(v)  # counts (batch sizes, steps) print whole
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- sections


def _bench_section(rows: list[dict]) -> tuple[str, list[dict]]:
    if not rows:
        return "_No benchmark rows found._", []
    gloo = {(r["_source"], r["size_bytes"]): r["time_us"] for r in rows if r["algo"] == "gloo"}
    out_rows, table = [], []
    for r in sorted(
        rows, key=lambda r: (r["world_size"], r["size_bytes"], r["_source"], r["algo"] != "gloo", r["algo"])
    ):
        g = gloo.get((r["_source"], r["size_bytes"]))
        ratio = g / r["time_us"] if g and r["time_us"] else None
        table.append({**{k: v for k, v in r.items() if k != "samples_us"}, "vs_gloo": ratio})
        out_rows.append(
            [
                r["world_size"],
                f"{plots.human_bytes(r['size_bytes'])} ({r['size_bytes']})",
                r["algo"],
                r.get("transport", ""),
                _fmt(r["time_us"], ".1f"),
                _fmt(r.get("busbw_gbs"), ".3f"),
                r.get("wrong", ""),
                f"{ratio:.2f}x" if ratio else "–",
            ]
        )
    text = _table(
        ["P", "size (B)", "algo", "transport", "time (µs)", "busbw (GB/s)", "#wrong", "vs gloo"], out_rows
    )
    return (
        text + "\n\n_vs gloo = gloo's time / this time, gloo timed in the same world (same file): "
        "above 1x is faster than gloo._",
        table,
    )


def _fit_section(fits: Mapping[str, AlphaBetaFit]) -> str:
    if not fits:
        return "_Not enough benchmark points (need two sizes or world sizes above 1 per algorithm) to fit._"
    rows = [
        [
            label,
            f.transport,
            _fmt(f.alpha_s * 1e6, ".1f"),
            _fmt(f.beta_s_per_byte * 1e9, ".4f"),
            _fmt(f.bandwidth_gbs, ".3f"),
            f.points,
            f"{f.median_rel_err:.1%}",
            f"{f.max_rel_err:.1%}",
            "; ".join(
                n
                for n in (
                    "pinned: a coefficient was negative, set to 0" if f.constrained else "",
                    "exact by construction: 2 points, 2 unknowns"
                    if f.points <= 2 and not f.constrained
                    else "",
                )
                if n
            ),
        ]
        for label, f in sorted(fits.items())
    ]
    return (
        _table(
            [
                "algo",
                "transport",
                "α (µs)",
                "β (ns/B)",
                "1/β (GB/s)",
                "points",
                "median rel err",
                "max rel err",
                "note",
            ],
            rows,
        )
        + "\n\n_Fitted on t ≈ messages·α + bytes·β, relative least squares, with each algorithm's "
        "critical-path counts from the cost model (`ringcomm/cost.py`, below); gloo and ring_simple are "
        "fitted as the ring. The error columns are the fit's residuals on its own points; with few points "
        "they flatter it._\n\n" + cost.markdown_table()
    )


def _ps_ring_section(rows: list[dict], fits: Mapping[str, AlphaBetaFit]) -> tuple[str, list[dict]]:
    med: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for r in rows:
        med[(r["algo"], int(r["world_size"]), int(r["size_bytes"]))].append(float(r["time_us"]))
    out, table = [], []
    for (label, p, size), times in sorted(med.items()):
        parsed = AlgoSpec.parse(label)
        if parsed.algo != "ps":
            continue
        ring_label = "ring" if parsed.transport == "torch" else f"ring@{parsed.transport}"
        ring_times = med.get((ring_label, p, size))
        fit = fits.get(ring_label)
        if not ring_times:
            continue
        measured = statistics.median(times) / statistics.median(ring_times)
        predicted = None
        if fit is not None:
            t_ring = fit.predict(p, size)
            try:
                t_ps = predict_time(label, p, size, fit.alpha_s, fit.beta_s_per_byte)
            except ValueError:  # e.g. more shards than ranks
                t_ps = math.nan
            predicted = t_ps / t_ring if t_ring > 0 and not math.isnan(t_ps) else None
        table.append(
            {"algo": label, "world_size": p, "size_bytes": size, "measured": measured, "predicted": predicted}
        )
        out.append([label, p, plots.human_bytes(size), _fmt(measured, ".2f"), _fmt(predicted, ".2f")])
    if not out:
        return "_No parameter-server and ring rows at the same world size and size._", []
    return (
        _table(["ps variant", "P", "size", "measured t_ps / t_ring", "model t_ps / t_ring"], out)
        + "\n\n_Model: the ring's fitted α and β (same transport) put into both cost formulas, so the "
        "column tests the formulas' structure, not a second fit. Ring and ps may come from different "
        "worlds (bench groups) of the same size on the same machine._",
        table,
    )


def _training_section(table: list[dict], amdahl: Mapping[str, AmdahlFit]) -> str:
    if not table:
        return "_No training runs (metrics.json under train/) found._"
    rows = [
        [
            t["series"],
            t["world_size"],
            _fmt(t["global_batch_size"]),
            _fmt(t["steps"]),
            _fmt(t["throughput_img_s"], ".1f"),
            _fmt(t["speedup"], ".2f"),
            _fmt(t["efficiency"], ".2f"),
            _fmt(t["comm_share"], ".1%"),
            _fmt(t["final_train_loss"], ".4f"),
            _fmt(t["final_test_accuracy"], ".4f"),
            _fmt(t["baseline"]),
        ]
        for t in table
    ]
    text = _table(
        [
            "algo",
            "P",
            "global batch",
            "steps",
            "img/s",
            "speedup",
            "efficiency",
            "comm share",
            "final loss",
            "test acc",
            "P=1 baseline",
        ],
        rows,
    )
    if amdahl:
        arow = [
            [
                s,
                _fmt(a.f, ".3f"),
                _fmt(a.max_speedup, ".2f"),
                _fmt(a.rmse, ".3f"),
                a.points,
                (
                    "slower than P=1: contention, Amdahl does not apply"
                    if a.f < 0
                    else "superlinear (S > P): distrust the P=1 baseline (load, warm-up), not the fit"
                    if a.f > 1
                    else ""
                ),
            ]
            for s, a in sorted(amdahl.items())
        ]
        text += "\n\nAmdahl fit (least squares on 1/S = (1−f) + f/P):\n\n" + _table(
            ["algo", "parallel fraction f", "max speedup 1/(1−f)", "rmse", "points", "note"], arow
        )
    return text


def _comm_entries(runs: Sequence[Mapping], bench_rows: Sequence[Mapping]) -> tuple[list[dict], list[dict]]:
    """Per-run comm vs compute and bandwidth utilisation entries for the plots and tables.

    ``bytes`` in a steps_log record is what this rank *sent* in the step (the transport's
    counter, ``trainer/hooks.py``), summed over DDP's buckets. For the ring that is
    2(P-1)/P * M, so bytes / comm_time is the ring's busbw directly, and we compare it with
    the benchmark's busbw for the same algorithm and P. The benchmark size compared with is
    the nearest to one bucket's tensor: M_bucket ~= bytes / buckets / (sent per byte of tensor:
    2(P-1)/P for ring and gloo, 1 for a parameter-server worker or a naive non-root).
    """
    comm, util = [], []
    for m in runs:
        if m.get("_kind", "train") != "train":
            continue
        p = int(m.get("world_size", 0) or 0)
        label = f"{_series(m)} P={p}"
        st = step_stats(m)
        if st["step_time_s"]:
            comm.append({"label": label, **st})
        if p > 1 and st["bytes"] and st["comm_time_s"]:
            train_bw = st["bytes"] / st["comm_time_s"] / 1e9
            bench_label = "gloo" if m.get("algo") == "ddp" else _series(m)
            ring_like = cost_name(bench_label) == "ring"
            sent_per_byte = 2 * (p - 1) / p if ring_like else 1.0
            bucket_bytes = st["bytes"] / max(1.0, st.get("buckets") or 1.0) / sent_per_byte
            cands = [r for r in bench_rows if r["algo"] == bench_label and int(r["world_size"]) == p]
            bench_bw, bench_size = None, None
            if cands:
                near = min(cands, key=lambda r: abs(math.log(r["size_bytes"] / bucket_bytes)))
                bench_bw, bench_size = near["busbw_gbs"], near["size_bytes"]
            util.append(
                {
                    "label": label,
                    "bytes": st["bytes"],
                    "bucket_tensor_bytes": bucket_bytes,
                    "train_busbw_gbs": train_bw,
                    "bench_busbw_gbs": bench_bw,
                    "bench_size_bytes": bench_size,
                    "bench_algo": bench_label,
                }
            )
    return comm, util


def _comm_section(comm: list[dict], util: list[dict]) -> str:
    if not comm:
        return "_No per-step timings in the training runs._"
    rows = [
        [
            c["label"],
            _fmt(c["step_time_s"] * 1e3, ".2f"),
            _fmt(c["comm_time_s"] * 1e3 if c["comm_time_s"] is not None else None, ".2f"),
            _fmt(c["comm_time_s"] / c["step_time_s"] if c["comm_time_s"] is not None else None, ".1%"),
            _fmt(c["bytes"], ".0f"),
            c["source"],
        ]
        for c in comm
    ]
    text = _table(["run", "step (ms)", "comm (ms)", "comm share", "bytes sent/step", "from"], rows)
    text += (
        "\n\n_Comm time is time inside all-reduce, summed over DDP's buckets. The hook runs on its own "
        "thread while backward continues, so comm and compute can overlap: the comm share is an upper "
        "bound on the communication the step waited for, and compute = step − comm a lower bound._"
    )
    if util:
        urows = [
            [
                u["label"],
                _fmt(u["train_busbw_gbs"], ".3f"),
                u["bench_algo"],
                plots.human_bytes(u["bench_size_bytes"]) if u["bench_size_bytes"] else "–",
                _fmt(u["bench_busbw_gbs"], ".3f"),
                _fmt(u["train_busbw_gbs"] / u["bench_busbw_gbs"] if u["bench_busbw_gbs"] else None, ".0%"),
            ]
            for u in util
        ]
        text += (
            "\n\nBandwidth utilisation: bytes this rank sent per step over its comm time per step "
            "(for the ring that is busbw), against the benchmark's busbw for the same algorithm and P at the "
            "size nearest one DDP bucket (ddp is compared with gloo):\n\n"
            + _table(
                [
                    "run",
                    "training bytes/comm (GB/s)",
                    "bench algo",
                    "bench size",
                    "bench busbw (GB/s)",
                    "utilisation",
                ],
                urows,
            )
        )
    return text


def _batch_entries(runs: Sequence[Mapping]) -> list[dict]:
    out = []
    for m in runs:
        if m.get("_kind") != "batch":
            continue
        hist = m.get("history") or []
        measured = statistics.fmean([h["epoch_time_s"] for h in hist if h.get("epoch_time_s")] or [math.nan])
        thr = _get(m, "throughput_img_s")
        size = _get(m, "train_size")
        # A run that finished its epoch(s) was timed for real; a capped one is extrapolated.
        capped = any(h.get("complete") is False for h in hist)
        extrapolated = float(size) / float(thr) if size and thr and (capped or not hist) else None
        out.append(
            {
                "batch_size": _per_worker_batch(m),
                "world_size": m.get("world_size"),
                "global_batch_size": m.get("global_batch_size"),
                "steps": m.get("steps"),
                "epoch_time_s": extrapolated
                if extrapolated
                else (None if math.isnan(measured) else measured),
                "epoch_time_measured_s": None if math.isnan(measured) else measured,
                "throughput_img_s": float(thr) if thr else None,
                "comm_share": (
                    float(_get(m, "comm_time_s")) / float(_get(m, "train_time_s"))
                    if _get(m, "comm_time_s") is not None and _get(m, "train_time_s")
                    else None
                ),
            }
        )
    return sorted(out, key=lambda e: e["batch_size"] or 0)


def _large_entries(runs: Sequence[Mapping]) -> list[dict]:
    order = {"small": 0, "large": 1, "large_scaled": 2}
    out = []
    for m in runs:
        if m.get("_kind") != "largebatch":
            continue
        meta = m.get("_meta") or {}
        scaled = bool(meta.get("scale_lr", m.get("scale_lr", False)))
        variant = meta.get("variant") or ("large_scaled" if scaled else "run")
        bs = _per_worker_batch(m)
        pretty = {
            "small": "small batch",
            "large": "large batch, same LR",
            "large_scaled": "large batch, scaled LR + warmup",
        }
        out.append(
            {
                "label": f"{pretty.get(variant, variant)} (b={bs}/worker)",
                "variant": variant,
                "batch_size": bs,
                "global_batch_size": m.get("global_batch_size"),
                "lr": m.get("peak_lr") or meta.get("lr") or m.get("lr"),
                "scale_lr": scaled,
                "warmup_epochs": meta.get("warmup_epochs", m.get("warmup_epochs", 0)),
                "test_acc": _get(m, "final_test_accuracy"),
                "final_train_loss": _get(m, "final_train_loss"),
                "history": m.get("history") or [],
            }
        )
    return sorted(out, key=lambda e: (order.get(e["variant"], 9), e["batch_size"] or 0))


def _reference_run(runs: Sequence[Mapping]) -> Mapping | None:
    """The run whose per-class accuracy and confusion matrix are shown: the largest-P ring run if any."""
    cands = [
        m
        for m in runs
        if m.get("_kind", "train") == "train" and (m.get("per_class_accuracy") or m.get("confusion_matrix"))
    ]
    if not cands:
        cands = [m for m in runs if m.get("per_class_accuracy") or m.get("confusion_matrix")]
    if not cands:
        return None
    return max(
        cands, key=lambda m: (m.get("algo") == "ring", _series(m) == "ring", int(m.get("world_size", 0) or 0))
    )


def _machine_section(res: Results) -> str:
    mc = res.machine
    cpus = mc.get("cpus", "?")
    backends = sorted({str(m.get("backend")) for m in res.runs if m.get("backend")}) or ["gloo (CPU)"]
    transports = sorted(
        {str(m.get("transport")) for m in res.runs if m.get("transport")}
        | {str(r.get("transport")) for r in res.bench_rows if r.get("transport")}
    )
    max_p = max(
        [int(m.get("world_size", 0) or 0) for m in res.runs]
        + [int(r["world_size"]) for r in res.bench_rows]
        + [0]
    )
    env = (res.manifest or {}).get("env") or {}
    lines = [
        f"- CPU cores: **{cpus}** ({mc.get('processor', '?')}), platform {mc.get('platform', '?')}",
        f"- Python {mc.get('python', '?')}, torch {mc.get('torch', '?')}",
        f"- torch.distributed backend: {', '.join(backends)}; ringcomm transports measured: {', '.join(transports) or '–'}",
        f"- environment for the runs: {', '.join(f'{k}={v}' for k, v in env.items()) or '(inherited)'}",
        f"- sweep preset: {(res.manifest or {}).get('preset', '?')}, started {(res.manifest or {}).get('started', '?')}, "
        f"took {_fmt((res.manifest or {}).get('seconds'), '.0f')} s",
    ]
    if isinstance(cpus, int) and max_p > cpus:
        lines.append(
            f"- world sizes up to {max_p} on {cpus} cores: ranks are processes that share (oversubscribe) the "
            "cores, so compute slows as P grows and speedups are bounded by the core count, not by the algorithm"
        )
    return "\n".join(lines)


def _commands_section(manifest: Mapping | None) -> str:
    if not manifest:
        return "_No sweep.json: the commands that produced these files are not recorded._"
    runs = manifest.get("runs", [])
    rows = [[r.get("name"), r.get("kind"), r.get("status"), _fmt(r.get("seconds"), ".1f")] for r in runs]
    text = _table(["run", "kind", "status", "seconds"], rows)
    bad = [r for r in runs if r.get("status") not in ("ok", "kept")]
    if bad:
        text += "\n\nRuns that did not succeed (recorded, not fatal):\n\n" + "\n".join(
            f"- `{r.get('name')}`: {r.get('status')}: {r.get('error') or ''} (log: {r.get('log', '–')})"
            for r in bad
        )
    env = manifest.get("env") or {}
    prefix = " ".join(f"{k}={v}" for k, v in env.items())
    cmds = "\n".join(f"{prefix + ' ' if prefix else ''}{r.get('command')}" for r in runs)
    return text + f"\n\nExact commands (run in `{manifest.get('cwd', '.')}`):\n\n```\n{cmds}\n```"


def build_report(root: str | Path) -> Path:
    """Write ``REPORT.md``, ``figures/*.png`` and ``analysis.json`` into ``root``; return the report path."""
    res = load_results(root)
    root = res.root
    figs = root / "figures"
    notes: list[str] = []
    fits = fit_rows(res.bench_rows)
    table = training_table(res.runs)
    by_series: dict[str, list[dict]] = defaultdict(list)
    for t in table:
        if not math.isnan(t["speedup"]):
            by_series[t["series"]].append(t)
    amdahl = {}
    for s, ts in by_series.items():
        a = fit_amdahl([t["world_size"] for t in ts], [t["speedup"] for t in ts])
        if a is not None:
            amdahl[s] = a
    comm, util = _comm_entries(res.runs, res.bench_rows)
    batch = _batch_entries(res.runs)
    large = _large_entries(res.runs)
    ref = _reference_run(res.runs)
    ref_title = f"({_series(ref)}, P={ref.get('world_size')})" if ref else ""
    train_runs = [m for m in res.runs if m.get("_kind", "train") == "train"]
    max_p = max([int(m.get("world_size", 0) or 0) for m in train_runs] + [0])
    curves = [
        (f"{_series(m)} P={m.get('world_size')}", m.get("history") or [])
        for m in sorted(train_runs, key=lambda m: (_series(m), int(m.get("world_size", 0) or 0)))
        if int(m.get("world_size", 0) or 0) == max_p
        or (_series(m) == "ddp" and int(m.get("world_size", 0) or 0) == 1)
    ]

    figures = {
        "busbw": plots.plot_busbw(res.bench_rows, fits, figs / "busbw_vs_size.png", notes),
        "time_vs_p": plots.plot_time_vs_world(
            res.bench_rows, fits, figs / "time_vs_world_size.png", notes=notes
        ),
        "speedup": plots.plot_speedup(table, amdahl, figs / "speedup_efficiency.png", notes),
        "comm": plots.plot_comm_compute(comm, figs / "comm_vs_compute.png", notes),
        "util": plots.plot_bandwidth_utilisation(util, figs / "bandwidth_utilisation.png", notes),
        "curves": plots.plot_training_curves(curves, figs / "training_curves.png", notes),
        "per_class": plots.plot_per_class(
            ref.get("per_class_accuracy") if ref else None,
            figs / "per_class_accuracy.png",
            ref_title,
            notes,
            classes=ref.get("classes") if ref else None,
        ),
        "confusion": plots.plot_confusion(
            ref.get("confusion_matrix") if ref else None, figs / "confusion_matrix.png", ref_title, notes
        ),
        "batch": plots.plot_batch_sweep(batch, figs / "batch_size_sweep.png", notes),
        "large": plots.plot_large_batch(large, figs / "large_batch.png", notes),
        "timeline": render_trace(res.trace, figs / "timeline.png", notes=notes) if res.trace else None,
    }
    if res.trace is None:
        notes.append("timeline.png: skipped, no trace.json in the results folder")

    def fig(key: str, caption: str) -> str:
        p = figures.get(key)
        return (
            f"![{caption}]({p.relative_to(root).as_posix()})\n\n_{caption}_"
            if p
            else f"_(figure skipped: {caption})_"
        )

    bench_text, bench_table = _bench_section(res.bench_rows)
    ratio_text, ratio_table = _ps_ring_section(res.bench_rows, fits)
    cpus = res.machine.get("cpus", "?")
    parts = [
        "# ringcomm: measured results",
        f"**These are measurements on this machine ({cpus}-core CPU; every rank is a process and the "
        "ranks share the cores), not projections.** Speedups and bandwidths below were timed, not derived "
        "from assumed overheads; on a machine with a core (or a GPU) per rank and a real network they will "
        "differ. The cost-model columns are fits to these measurements and are labelled as such.",
        "## Machine\n\n" + _machine_section(res),
        "## Collective benchmark\n\n" + bench_text,
        fig(
            "busbw",
            "Bus bandwidth vs message size; dashed: fitted alpha-beta model (fit error in the legend)",
        ),
        "## Alpha-beta fits\n\n" + _fit_section(fits),
        fig("time_vs_p", "Time per all-reduce vs world size, measured points and model lines"),
        "### Parameter server vs ring: model against measurement\n\n" + ratio_text,
        "## Training: throughput, speedup, efficiency\n\n" + _training_section(table, amdahl),
        fig("speedup", "Training speedup and efficiency vs world size, with Amdahl fits"),
        "## Communication vs computation\n\n" + _comm_section(comm, util),
        fig("comm", "Mean compute and communication time per step"),
        fig("util", "Bandwidth reached in training vs the benchmark's"),
        "## Accuracy\n\n" + fig("curves", "Training loss and accuracy per epoch"),
        fig("per_class", f"Per-class test accuracy {ref_title}"),
        fig("confusion", f"Confusion matrix {ref_title}"),
        "## Batch-size sweep\n\n" + _batch_section(batch),
        fig("batch", "Time per epoch and throughput vs per-worker batch size"),
        "## Large batch: linear LR scaling and warmup\n\n" + _large_section(large),
        fig("large", "Final test accuracy: small batch, large batch, large batch with scaled LR + warmup"),
        "## Timeline\n\n" + fig("timeline", "Per-rank timeline from trace.json"),
        "## How these numbers were produced\n\n" + _commands_section(res.manifest),
    ]
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes))
    report = root / "REPORT.md"
    report.write_text("\n\n".join(parts) + "\n")
    summary = {
        "machine": res.machine,
        "fits": {k: f.as_dict() for k, f in fits.items()},
        "amdahl": {k: {"f": a.f, "rmse": a.rmse, "points": a.points} for k, a in amdahl.items()},
        "training": table,
        "bench": bench_table,
        "ps_vs_ring": ratio_table,
        "comm": comm,
        "utilisation": util,
        "batch_sweep": batch,
        "large_batch": [{k: v for k, v in e.items() if k != "history"} for e in large],
        "figures": {k: (v.relative_to(root).as_posix() if v else None) for k, v in figures.items()},
        "notes": notes,
    }
    (root / "analysis.json").write_text(json.dumps(summary, indent=1, default=str))
    return report


def _batch_section(batch: list[dict]) -> str:
    if not batch:
        return "_No batch-size sweep runs found._"
    rows = [
        [
            e["batch_size"],
            _fmt(e["global_batch_size"]),
            _fmt(e["steps"]),
            _fmt(e["epoch_time_measured_s"], ".2f"),
            _fmt(e["epoch_time_s"], ".2f"),
            _fmt(e["throughput_img_s"], ".1f"),
            _fmt(e["comm_share"], ".1%"),
        ]
        for e in batch
    ]
    return (
        _table(
            [
                "batch/worker",
                "global batch",
                "steps",
                "epoch time measured (s)",
                "time per epoch (s)",
                "img/s",
                "comm share",
            ],
            rows,
        )
        + "\n\n_Runs capped by --max-steps (history says the epoch is not complete) are extrapolated: "
        "time per epoch = training-set size / throughput, the size taken from metrics.json or, for the "
        "datasets trainer/data.py knows, its default (synthetic 10,000, CIFAR-10 50,000, Fashion-MNIST "
        "60,000 images). Runs that finished their epoch show the measured time._"
    )


def _large_section(large: list[dict]) -> str:
    if not large:
        return "_No large-batch runs found._"
    rows = [
        [
            e["label"],
            _fmt(e["global_batch_size"]),
            _fmt(e["lr"]),
            "yes" if e["scale_lr"] else "no",
            _fmt(e["warmup_epochs"]),
            _fmt(e["final_train_loss"], ".4f"),
            _fmt(e["test_acc"], ".4f"),
        ]
        for e in large
    ]
    return _table(
        ["run", "global batch", "peak lr", "linear LR scaling", "warmup epochs", "final loss", "test acc"],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results folder written by python -m analysis.sweep")
    args = parser.parse_args(argv)
    root = Path(args.results)
    if not root.is_dir():
        parser.error(f"{root} is not a folder; run python -m analysis.sweep --out {root} first")
    report = build_report(root)
    print(f"# wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
