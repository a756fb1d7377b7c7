"""The report's numbers, computed from loaded results: pure functions of rows and runs, no formatting.

Each function takes bench rows and training runs as ``analysis.results.load_results`` gives
them and returns plain dicts (the same go to ``analysis.json``); ``analysis.report`` renders
them as Markdown and ``analysis.plots`` draws them.

Definitions. Speedup S(P) = throughput(P) / throughput(1) in images per second
with a fixed per-worker batch (weak scaling: the global batch grows with P);
the P = 1 baseline is the same algorithm and transport, else the same
algorithm, else ddp. Efficiency = S / P. Comm share = comm_time_s /
train_time_s. "vs gloo" = gloo's time / the algorithm's time in the same
world (above 1: faster than gloo).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence

from ringcomm.names import AlgoSpec

from .fit import AlphaBetaFit, AmdahlFit, cost_name, fit_amdahl, karp_flatt, predict_time
from .results import per_worker_batch, run_config, series, train_size

__all__ = [
    "bench_table",
    "ps_vs_ring",
    "step_stats",
    "training_table",
    "amdahl_by_series",
    "comm_entries",
    "batch_entries",
    "large_entries",
    "reference_run",
    "curves",
    "two_level_model",
    "two_level_entries",
]


def _train_runs(runs: Sequence[Mapping]) -> list[Mapping]:
    return [m for m in runs if m.get("_kind", "train") == "train"]


def _world_size(m: Mapping) -> int:
    return int(m.get("world_size", 0) or 0)


def _share(part: object, whole: object) -> float | None:
    return float(part) / float(whole) if part is not None and whole else None


def bench_table(rows: Sequence[Mapping]) -> list[dict]:
    """Bench rows sorted by P, size and file (gloo first), with ``vs_gloo`` and without ``samples_us``.

    ``vs_gloo`` is gloo's time over the row's, gloo timed in the same world (the same file)
    at the same size; None when that world has no gloo row.
    """
    gloo = {(r["_source"], r["size_bytes"]): r["time_us"] for r in rows if r["algo"] == "gloo"}
    out = []
    for r in sorted(
        rows, key=lambda r: (r["world_size"], r["size_bytes"], r["_source"], r["algo"] != "gloo", r["algo"])
    ):
        g = gloo.get((r["_source"], r["size_bytes"]))
        ratio = g / r["time_us"] if g and r["time_us"] else None
        out.append({**{k: v for k, v in r.items() if k != "samples_us"}, "vs_gloo": ratio})
    return out


def ps_vs_ring(rows: Sequence[Mapping], fits: Mapping[str, AlphaBetaFit]) -> list[dict]:
    """Parameter-server time over ring time at each P and size, measured and as the model predicts.

    ``measured`` is the ratio of median times; ``predicted`` puts the ring's fitted alpha and
    beta (same transport) into both cost formulas, so it tests the formulas' structure, not a
    second fit. None where there is no ring fit or the model does not apply (k > P).
    """
    med: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for r in rows:
        med[(r["algo"], int(r["world_size"]), int(r["size_bytes"]))].append(float(r["time_us"]))
    out = []
    for (label, p, size), times in sorted(med.items()):
        parsed = AlgoSpec.parse(label)
        if parsed.algo != "ps":
            continue
        ring_label = AlgoSpec.parse("ring", parsed.transport).label
        ring_times = med.get((ring_label, p, size))
        if not ring_times:
            continue
        measured = statistics.median(times) / statistics.median(ring_times)
        predicted = None
        fit = fits.get(ring_label)
        if fit is not None:
            t_ring = fit.predict(p, size)
            try:
                t_ps = predict_time(label, p, size, fit.alpha_s, fit.beta_s_per_byte)
            except ValueError:  # more shards than ranks
                t_ps = math.nan
            predicted = t_ps / t_ring if t_ring > 0 and not math.isnan(t_ps) else None
        out.append(
            {"algo": label, "world_size": p, "size_bytes": size, "measured": measured, "predicted": predicted}
        )
    return out


def step_stats(m: Mapping, skip_first: bool = True) -> dict:
    """Mean per-step step time, comm time (seconds) and bytes of a run.

    From ``step_records`` when present (the first step is left out when there are
    more than two: it carries set-up and warm-up), else from the run totals
    ``comm_time_s`` and ``train_time_s`` over ``steps``.

    Returns:
        ``{"step_time_s", "comm_time_s", "bytes", "buckets", "source"}`` (bytes: sent by the
        rank); values may be None (ddp has no comm time: its all-reduce is built in).
    """
    log = [s for s in m.get("step_records") or [] if isinstance(s, Mapping)]
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
            "source": "step_records",
        }
    steps, train, comm = m.get("steps"), m.get("train_time_s"), m.get("comm_time_s")
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
        karp_flatt, comm_share, final_train_loss, final_test_accuracy, name, baseline``.
    """
    train = _train_runs(runs)
    base: dict[str, float] = {}
    for m in train:
        if _world_size(m) == 1 and m.get("throughput_img_s"):
            base.setdefault(series(m), float(m["throughput_img_s"]))
            base.setdefault("algo:" + str(m.get("algo")), float(m["throughput_img_s"]))

    def baseline(m: Mapping) -> tuple[str | None, float | None]:
        for key in (series(m), "algo:" + str(m.get("algo")), "ddp", "algo:ddp"):
            if key in base:
                return key, base[key]
        return next(iter(base.items()), (None, None))

    rows = []
    for m in train:
        p = _world_size(m)
        thr = m.get("throughput_img_s")
        base_key, b = baseline(m)
        s = float(thr) / b if thr and b else math.nan
        rows.append(
            {
                "series": series(m),
                "algo": m.get("algo"),
                "transport": m.get("transport"),
                "world_size": p,
                "global_batch_size": m.get("global_batch_size"),
                "steps": m.get("steps"),
                "throughput_img_s": float(thr) if thr else None,
                "speedup": s,
                "efficiency": s / p if p else math.nan,
                "karp_flatt": karp_flatt(p, s) if not math.isnan(s) else math.nan,
                "comm_share": _share(m.get("comm_time_s"), m.get("train_time_s")),
                "final_train_loss": m.get("final_train_loss"),
                "final_test_accuracy": m.get("final_test_accuracy"),
                "name": m.get("_name"),
                "baseline": (base_key or "").removeprefix("algo:") or None,
            }
        )
    return sorted(rows, key=lambda r: (r["series"], r["world_size"]))


def amdahl_by_series(table: Sequence[Mapping]) -> dict[str, AmdahlFit]:
    """An Amdahl fit per series of ``training_table`` rows that have a speedup (and a point with P > 1)."""
    by_series: dict[str, list[Mapping]] = defaultdict(list)
    for t in table:
        if not math.isnan(t["speedup"]):
            by_series[t["series"]].append(t)
    fits = {}
    for s, ts in by_series.items():
        a = fit_amdahl([t["world_size"] for t in ts], [t["speedup"] for t in ts])
        if a is not None:
            fits[s] = a
    return fits


def comm_entries(runs: Sequence[Mapping], bench_rows: Sequence[Mapping]) -> tuple[list[dict], list[dict]]:
    """Per-run comm vs compute and bandwidth utilisation entries for the plots and tables.

    ``bytes`` in a step record is what this rank *sent* in the step (the transport's
    counter, ``trainer/hooks.py``), summed over DDP's buckets. For the ring that is
    2(P-1)/P * M, so bytes / comm_time is the ring's busbw directly, and we compare it with
    the benchmark's busbw for the same algorithm and P. The benchmark size compared with is
    the nearest to one bucket's tensor: M_bucket ~= bytes / buckets / (sent per byte of tensor:
    2(P-1)/P for ring and gloo, 1 for a parameter-server worker or a naive non-root).
    """
    comm, util = [], []
    for m in _train_runs(runs):
        p = _world_size(m)
        label = f"{series(m)} P={p}"
        st = step_stats(m)
        if st["step_time_s"]:
            comm.append({"label": label, **st})
        if p > 1 and st["bytes"] and st["comm_time_s"]:
            train_bw = st["bytes"] / st["comm_time_s"] / 1e9
            bench_label = "gloo" if m.get("algo") == "ddp" else series(m)
            sent_per_byte = 2 * (p - 1) / p if cost_name(bench_label) == "ring" else 1.0
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


def batch_entries(runs: Sequence[Mapping]) -> list[dict]:
    """Time per epoch, throughput and comm share per batch-size sweep run (kind ``batch``).

    ``epoch_time_s`` is measured when the run finished its epochs; a run capped by
    --max-steps (history says an epoch is not complete) is extrapolated: training-set
    size / throughput.
    """
    out = []
    for m in runs:
        if m.get("_kind") != "batch":
            continue
        hist = m.get("history") or []
        times = [h["epoch_time_s"] for h in hist if h.get("epoch_time_s")]
        measured = statistics.fmean(times) if times else None
        thr, size = m.get("throughput_img_s"), train_size(m)
        capped = any(h.get("complete") is False for h in hist)
        extrapolated = float(size) / float(thr) if size and thr and (capped or not hist) else None
        out.append(
            {
                "batch_size": per_worker_batch(m),
                "world_size": m.get("world_size"),
                "global_batch_size": m.get("global_batch_size"),
                "steps": m.get("steps"),
                "epoch_time_s": extrapolated or measured,
                "epoch_time_measured_s": measured,
                "throughput_img_s": float(thr) if thr else None,
                "comm_share": _share(m.get("comm_time_s"), m.get("train_time_s")),
            }
        )
    return sorted(out, key=lambda e: e["batch_size"] or 0)


_LARGE_ORDER = {"small": 0, "large": 1, "large_scaled": 2}
_LARGE_TITLES = {
    "small": "small batch",
    "large": "large batch, same LR",
    "large_scaled": "large batch, scaled LR + warmup",
}


def large_entries(runs: Sequence[Mapping]) -> list[dict]:
    """The large-batch runs (kind ``largebatch``): small reference, large, large with scaled LR + warmup.

    The variant, LR scaling and warmup come from the sweep's meta (the sweep passes the
    scaled LR explicitly), else from the run's config.
    """
    out = []
    for m in runs:
        if m.get("_kind") != "largebatch":
            continue
        meta, cfg = m.get("_meta") or {}, run_config(m)
        scaled = bool(meta.get("scale_lr", cfg.get("scale_lr", False)))
        variant = meta.get("variant") or ("large_scaled" if scaled else "run")
        bs = per_worker_batch(m)
        out.append(
            {
                "label": f"{_LARGE_TITLES.get(variant, variant)} (b={bs}/worker)",
                "variant": variant,
                "batch_size": bs,
                "global_batch_size": m.get("global_batch_size"),
                "lr": m.get("peak_lr") or meta.get("lr"),
                "scale_lr": scaled,
                "warmup_epochs": meta.get("warmup_epochs", cfg.get("warmup_epochs", 0)),
                "test_acc": m.get("final_test_accuracy"),
                "final_train_loss": m.get("final_train_loss"),
                "history": m.get("history") or [],
            }
        )
    return sorted(out, key=lambda e: (_LARGE_ORDER.get(e["variant"], 9), e["batch_size"] or 0))


def reference_run(runs: Sequence[Mapping]) -> Mapping | None:
    """The run whose per-class accuracy and confusion matrix are shown: the largest-P ring run if any."""

    def has_classes(m: Mapping) -> bool:
        return bool(m.get("per_class_accuracy") or m.get("confusion_matrix"))

    cands = [m for m in _train_runs(runs) if has_classes(m)] or [m for m in runs if has_classes(m)]
    if not cands:
        return None
    return max(cands, key=lambda m: (m.get("algo") == "ring", series(m) == "ring", _world_size(m)))


def curves(runs: Sequence[Mapping]) -> list[tuple[str, list[dict]]]:
    """``(label, history)`` of the training runs at the largest P, and of ddp at P = 1 for reference."""
    train = _train_runs(runs)
    max_p = max([_world_size(m) for m in train] + [0])
    return [
        (f"{series(m)} P={m.get('world_size')}", m.get("history") or [])
        for m in sorted(train, key=lambda m: (series(m), _world_size(m)))
        if _world_size(m) == max_p or (series(m) == "ddp" and _world_size(m) == 1)
    ]


# --------------------------------------------------------------------------- two-level all-reduce


def two_level_model(nodes: int, per_node: int, nbytes: float, beta_link: float) -> dict[str, float]:
    """Predicted seconds on ``nodes`` nodes of ``per_node`` ranks, each node one link of ``beta_link``
    seconds per byte: ``"hier"`` (``cost.HIER``: shared memory's ring fit inside the node, the torch
    ring's alpha across) and the flat ring of N ranks per placement (``"ring contiguous"``, ``"ring
    interleaved"``: 2(N−1)·alpha + ``cost.flat_ring_link_bytes``·beta_link). Alphas are the shipped
    fits (``ringcomm.auto.DEFAULT_FITS``) at the nearest world size; they add a few per cent."""
    from ringcomm import cost
    from ringcomm.auto import DEFAULT_FITS  # imports torch: only when this section has rows

    def fit(transport: str, p: int) -> tuple[float, float]:
        fits = DEFAULT_FITS[transport]
        return fits[min(fits, key=lambda q: (abs(q - p), q))]["ring"]

    world = nodes * per_node
    out = {"hier": cost.HIER.time(nodes, per_node, nbytes, fit("shm", per_node), (fit("torch", nodes)[0], beta_link))}
    for placement in cost.PLACEMENTS:
        link_bytes = cost.flat_ring_link_bytes(nodes, per_node, nbytes, placement)
        out[f"ring {placement}"] = 2 * (world - 1) * fit("torch", world)[0] + link_bytes * beta_link
    return out


def two_level_entries(rows: Sequence[Mapping], layouts: Mapping[str, tuple[int, int, str, str]]) -> list[dict]:
    """Bench rows of worlds on multi-rank nodes, per (nodes, ranks per node, placement, size, algo),
    beside the model (``two_level_model``).

    Args:
        rows: bench rows (``_source`` names the file, one world each).
        layouts: ``_source`` -> (nodes, ranks per node, placement, link), as
            ``analysis.cluster.parse_label`` reads the file's ``machine["cluster"]``; files not in it
            (one host, one rank per node) are left out.

    Returns:
        One dict per group: ``time_s`` (median over the files of each file's median sample), ``min_s``,
        ``max_s``, ``runs`` (files), ``vs_hier`` (median over the files of time / hier's time in the same
        file, None without hier there), ``model_s`` (None where the algorithm has no model here: gloo is
        modelled as the flat ring it runs) and ``model_vs_hier``. Wrong rows are left out.
    """
    from .cluster import beta_for, parse_rate

    hier = {(r["_source"], r["size_bytes"]): float(r["time_us"]) for r in rows if r["algo"] == "hier" and not r.get("wrong")}
    groups: dict[tuple[int, int, str, int, str, str], list[tuple[float, float | None]]] = defaultdict(list)
    for r in rows:
        layout = layouts.get(r["_source"])
        if layout is None or r.get("wrong") or r.get("time_us") is None:
            continue
        nodes, per_node, placement, link = layout
        t = float(r["time_us"])
        h = hier.get((r["_source"], r["size_bytes"]))
        groups[(nodes, per_node, placement, int(r["size_bytes"]), str(r["algo"]), link)].append((t / 1e6, t / h if h else None))
    out = []
    models: dict[tuple[int, int, int, str], dict[str, float]] = {}
    for (nodes, per_node, placement, size, algo, link), seen in sorted(groups.items()):
        key = (nodes, per_node, size, link)
        if key not in models:
            models[key] = two_level_model(nodes, per_node, size, beta_for(parse_rate(link)))
        model = models[key]
        name = "hier" if algo == "hier" else f"ring {placement}" if algo in ("ring", "gloo") else None
        times = [t for t, _ in seen]
        ratios = [q for _, q in seen if q is not None]
        out.append(
            {
                "nodes": nodes,
                "ranks_per_node": per_node,
                "placement": placement,
                "size_bytes": size,
                "algo": algo,
                "link": link,
                "time_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "runs": len(times),
                "vs_hier": statistics.median(ratios) if ratios else None,
                "model_s": model[name] if name else None,
                "model_vs_hier": model[name] / model["hier"] if name else None,
            }
        )
    return out
