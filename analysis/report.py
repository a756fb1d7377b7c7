"""``python -m analysis.report RESULTS_DIR``: ``REPORT.md``, figures and ``analysis.json`` from a sweep.

    python -m analysis.sweep --quick --out results/quick
    python -m analysis.report results/quick        # -> results/quick/REPORT.md, figures/*.png

This module only renders: ``analysis.results`` reads the folder (and documents its
files), ``analysis.tables`` computes the numbers (and defines speedup, efficiency,
comm share and "vs gloo"), ``analysis.fit`` fits the models, ``analysis.plots``
draws. Here they become Markdown sections, figure links and ``analysis.json`` (the
fits and tables in machine-readable form). Anything missing leaves a note, not an error.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ringcomm import cost

from . import CliParser
from .markdown import fmt as _fmt
from .markdown import human_bytes
from .markdown import table as _table
from .results import Results, load_results, per_class, series

if TYPE_CHECKING:
    from .fit import AlphaBetaFit, AmdahlFit

__all__ = ["build_report", "main"]


# --------------------------------------------------------------------------- formatting


# --------------------------------------------------------------------------- sections


def _bench_section(table: list[dict]) -> str:
    if not table:
        return "_No benchmark rows found._"
    rows = [
        [
            r["world_size"],
            f"{human_bytes(r['size_bytes'])} ({r['size_bytes']})",
            r["algo"],
            r.get("transport", ""),
            _fmt(r["time_us"], ".1f"),
            _fmt(r.get("busbw_gbs"), ".3f"),
            r.get("wrong", ""),
            f"{r['vs_gloo']:.2f}x" if r["vs_gloo"] else "–",
        ]
        for r in table
    ]
    return (
        _table(["P", "size (B)", "algo", "transport", "time (µs)", "busbw (GB/s)", "#wrong", "vs gloo"], rows)
        + "\n\n_vs gloo = gloo's time / this time, gloo timed in the same world (same file): "
        "above 1x is faster than gloo._"
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


def _ps_ring_section(table: list[dict]) -> str:
    if not table:
        return "_No parameter-server and ring rows at the same world size and size._"
    rows = [
        [
            t["algo"],
            t["world_size"],
            human_bytes(t["size_bytes"]),
            _fmt(t["measured"], ".2f"),
            _fmt(t["predicted"], ".2f"),
        ]
        for t in table
    ]
    return (
        _table(["ps variant", "P", "size", "measured t_ps / t_ring", "model t_ps / t_ring"], rows)
        + "\n\n_Model: the ring's fitted α and β (same transport) put into both cost formulas, so the "
        "column tests the formulas' structure, not a second fit. Ring and ps may come from different "
        "worlds (bench groups) of the same size on the same machine._"
    )


#: Rows of "Two-level all-reduce" in this order: the algorithm, then what it is weighed against.
_ALGO_ORDER = {"hier": 0, "ring": 1, "gloo": 2}


def _two_level_section(entries: list[dict]) -> str:
    """The two-level all-reduce against the flat ring and Gloo, per nodes x ranks per node."""
    rows = [
        [
            f"{e['nodes']} × {e['ranks_per_node']}",
            e["placement"],
            human_bytes(e["size_bytes"]),
            e["algo"],
            f"{e['time_s'] * 1e3:.0f} ({e['min_s'] * 1e3:.0f}–{e['max_s'] * 1e3:.0f})",
            e["runs"],
            _fmt(e["model_s"] * 1e3 if e["model_s"] is not None else None, ".0f"),
            _fmt(e["vs_hier"], ".2f"),
            _fmt(e["model_vs_hier"], ".2f"),
        ]
        for e in sorted(entries, key=lambda e: (e["nodes"] * e["ranks_per_node"], e["nodes"], e["size_bytes"],
                                                 _ALGO_ORDER.get(e["algo"], 3), e["algo"], e["placement"]))  # fmt: skip
    ]
    links = ", ".join(sorted({e["link"] for e in entries}))
    return (
        _table(
            ["nodes × ranks", "placement", "size", "algo", "time (ms): median (range)", "runs", "model (ms)",
             "/ hier, same world", "/ hier, model"],  # fmt: skip
            rows,
        )
        + f"\n\n_n nodes of g ranks on an emulated cluster ({links} links, `analysis.cluster --ranks-per-node "
        "--placement`). Time: the median over the runs (bench files) of each run's median sample, slowest "
        "rank. / hier: time over hier's in the same world, median over the runs. Model: `cost.HIER` for "
        "hier (shared memory inside the node, 2(n−1)/n·M through each node's link), and for the flat ring "
        "(and Gloo, which runs one) 2(N−1)·α plus `cost.flat_ring_link_bytes` through the link: 2(N−1)/N·M "
        "with a node's ranks neighbours on the ring (contiguous), g times that when every hop leaves its "
        "node (interleaved). β from the link rate (1448 data bytes per 1514-byte frame); α and the shared "
        "memory fit are the shipped ones (`auto.DEFAULT_FITS`). See docs/two-level.md._\n\n"
        + "| algorithm | messages on the critical path | bytes on the critical path | time | busiest link |\n"
        + "|---|---|---|---|---|\n"
        + cost.HIER.markdown_row()
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
            _fmt(t["final_test_accuracy"], ".2%"),  # as launch.py prints it
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
                human_bytes(u["bench_size_bytes"]) if u["bench_size_bytes"] else "–",
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
    ]
    if res.manifest:
        lines.append(
            f"- sweep preset: {res.manifest.get('preset', '?')}, started {res.manifest.get('started', '?')}, "
            f"took {_fmt(res.manifest.get('seconds'), '.0f')} s"
        )
    else:
        lines.append("- runs made by hand (no sweep.json): each run's own command and settings are in its metrics.json")
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
    # numpy and matplotlib on use: `python -m analysis.report --help` answers without them
    from . import cluster_report, plots, tables
    from .fit import fit_rows
    from .timeline import render_trace
    from .zero_report import section as zero_section

    res = load_results(root)
    root = res.root
    figs = root / "figures"
    notes: list[str] = []
    # Worlds of multi-rank nodes go to "Two-level all-reduce" alone: the fits and tables below take a
    # world size P as the whole story, and there one P has two placements with twice the link's bytes.
    layouts = _multi_rank_layouts(res)
    bench_rows = [r for r in res.bench_rows if r["_source"] not in layouts]
    two_level = tables.two_level_entries(res.bench_rows, layouts)
    fits = fit_rows(bench_rows)
    bench = tables.bench_table(bench_rows)
    ratios = tables.ps_vs_ring(bench_rows, fits)
    training = tables.training_table(res.runs)
    amdahl = tables.amdahl_by_series(training)
    comm, util = tables.comm_entries(res.runs, bench_rows)
    batch = tables.batch_entries(res.runs)
    large = tables.large_entries(res.runs)
    ref = tables.reference_run(res.runs)
    ref_title = f"({series(ref)}, P={ref.get('world_size')})" if ref else ""
    classes, per_class_acc = (per_class(ref) if ref else None) or (None, None)

    figures = {
        "busbw": plots.plot_busbw(bench_rows, fits, figs / "busbw_vs_size.png", notes),
        "time_vs_p": plots.plot_time_vs_world(bench_rows, fits, figs / "time_vs_world_size.png", notes=notes),
        "two_level": plots.plot_two_level(two_level, figs / "two_level.png", notes) if two_level else None,
        "speedup": plots.plot_speedup(training, amdahl, figs / "speedup_efficiency.png", notes),
        "comm": plots.plot_comm_compute(comm, figs / "comm_vs_compute.png", notes),
        "util": plots.plot_bandwidth_utilisation(util, figs / "bandwidth_utilisation.png", notes),
        "curves": plots.plot_training_curves(tables.curves(res.runs), figs / "training_curves.png", notes),
        "per_class": plots.plot_per_class(
            per_class_acc, figs / "per_class_accuracy.png", ref_title, notes, classes=classes
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

    compress = compression_entries(res.runs)
    compress_model = compression_model(compress)
    if compress:  # a results folder with no --compress runs has no section (nor a note that says so)
        figures["compression"] = plot_compression(compress, compress_model, figs / "compression_vs_link.png", notes)
    closs = compression_loss_entries(res.runs)
    closs_summary = compression_loss_summary(closs)
    if closs:
        figures["compression_loss"] = plot_compression_loss(closs, figs / "compression_loss.png", notes)

    zero_md, zero = zero_section(res, figs, notes, _steady)  # ("", {}) without --zero runs: no section

    cluster_md, cluster = ("", {})
    if cluster_report.cluster_link(res):
        cluster_md, cluster = cluster_report.section(res, figs, notes)

    cpus = res.machine.get("cpus", "?")
    parts = [
        "# ringcomm: measured results",
        f"**These are measurements on this machine ({cpus}-core CPU; every rank is a process and the "
        "ranks share the cores), not projections.** Speedups and bandwidths below were timed, not derived "
        "from assumed overheads; on a machine with a core (or a GPU) per rank and a real network they will "
        "differ. The cost-model columns are fits to these measurements and are labelled as such.",
        "## Machine\n\n" + _machine_section(res),
        "## Collective benchmark\n\n"
        + _bench_section(bench)
        + ("\n\n_Worlds of several ranks per node: in \"Two-level all-reduce\" below._" if two_level else ""),
        fig(
            "busbw",
            "Bus bandwidth vs message size; dashed: fitted alpha-beta model (fit error in the legend)",
        ),
        "## Alpha-beta fits\n\n" + _fit_section(fits),
        fig("time_vs_p", "Time per all-reduce vs world size, measured points and model lines"),
        "### Parameter server vs ring: model against measurement\n\n" + _ps_ring_section(ratios),
        *(["## On an emulated cluster\n\n" + cluster_md] if cluster_md else []),
        *(
            [
                "## Two-level all-reduce\n\n" + _two_level_section(two_level),
                fig("two_level", "Time per all-reduce against nodes × ranks per node: measured (points), model (dashes)"),
            ]
            if two_level
            else []
        ),
        "## Training: throughput, speedup, efficiency\n\n" + _training_section(training, amdahl),
        fig("speedup", "Training speedup and efficiency vs world size, with Amdahl fits"),
        "## Communication vs computation\n\n" + _comm_section(comm, util),
        fig("comm", "Mean compute and communication time per step"),
        fig("util", "Bandwidth reached in training vs the benchmark's"),
        "## Accuracy\n\n" + fig("curves", "Training loss and accuracy per epoch"),
        fig("per_class", f"Per-class test accuracy {ref_title}"),
        fig("confusion", f"Confusion matrix {ref_title}"),
        *(["## Compression"] if compress or closs else []),
        *(
            [
                _compression_section(compress, compress_model),
                fig("compression", "Time per step against link rate per --compress method, with the model's crossover"),
            ]
            if compress
            else []
        ),
        *(
            [
                _compression_loss_section(closs, closs_summary),
                fig("compression_loss", "Train loss against step and against wall-clock time per --compress method"),
            ]
            if closs
            else []
        ),
        *(["## Sharded optimizer (ZeRO)\n\n" + zero_md] if zero_md else []),
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
        "training": training,
        "bench": bench,
        "ps_vs_ring": ratios,
        "cluster": cluster,
        "two_level": two_level,
        "comm": comm,
        "utilisation": util,
        "compression": {"runs": compress, "model": compress_model, "loss": closs_summary},
        "zero": zero,
        "batch_sweep": batch,
        "large_batch": [{k: v for k, v in e.items() if k != "history"} for e in large],
        "figures": {k: (v.relative_to(root).as_posix() if v else None) for k, v in figures.items()},
        "notes": notes,
    }
    (root / "analysis.json").write_text(json.dumps(summary, indent=1, default=str))
    return report


# --------------------------------------------------------------------------- compression

#: The --compress methods in the order the report lists them; "none" is the baseline of the ratios.
_METHOD_ORDER = ("none", "bf16", "fp16", "powersgd", "topk")


def _method_key(method: str) -> tuple[int, str]:
    kind = method.partition(":")[0]
    return (_METHOD_ORDER.index(kind) if kind in _METHOD_ORDER else len(_METHOD_ORDER), method)


def _link_bits(link: str | None) -> float | None:
    """``"100mbit"`` -> 1e8 bits per second; None (one host, no link) stays None."""
    from .cluster import parse_rate

    return None if link is None else parse_rate(link)


def _steady(m: Mapping) -> dict:
    """Mean step time (s) and bytes sent per step by rank 0 after PowerSGD's warm-up, the same steps
    for every method (``compress_warmup``, default 10: steps 11 on), so the methods are compared
    at their steady state and the one-host and link runs over the same steps."""
    warmup = int((m.get("config") or {}).get("compress_warmup", 10))
    recs = [r for r in m.get("step_records") or [] if isinstance(r, Mapping) and r.get("step", 0) > max(1, warmup)]

    def mean(key: str) -> float | None:
        vals = [float(r[key]) for r in recs if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {"step_time_s": mean("step_time_s"), "bytes": mean("bytes"), "steps": len(recs)}


def _cost_bytes(method: str, model: str, p: int) -> float | None:
    """Bytes one rank sends per step for ``method`` by ``cost.py``'s formulas (ring all-reduce: 2(P−1)/P
    of the payload; top-k's ring all_gather: (P−1) blocks of its k entries), or None."""
    from ringcomm.compress import parse_compress
    from ringcomm.compress.powersgd import PowerSGD
    from ringcomm.compress.topk import TopK
    from trainer.models import build_model

    try:
        kind, arg = parse_compress(method)
        shapes = [tuple(t.shape) for t in build_model(model).parameters()]
    except (ValueError, KeyError):
        return None
    numel = sum(math.prod(sh) for sh in shapes)
    ring = 2 * (p - 1) / p
    if kind == "none":
        return ring * 4 * numel
    if kind in ("bf16", "fp16"):
        return ring * cost.wire_bytes(4 * numel, 4, 2)
    if kind == "powersgd":
        psgd = PowerSGD(int(arg))  # type: ignore[arg-type]
        mats = [(sh[0], math.prod(sh[1:])) for sh in shapes if psgd.compresses(sh)]
        plain = numel - sum(n * m for n, m in mats)
        return ring * 4 * (cost.powersgd_elements(mats, int(arg)) + plain)  # type: ignore[arg-type]
    if kind == "topk":  # one budget ⌈F·ΣN⌉ over the matrices, gathered; vectors and energies all-reduced
        mats = [math.prod(sh) for sh in shapes if TopK.sparsifies(sh)]
        plain = numel - sum(mats) + len(mats)
        return cost.topk_bytes_sent(sum(mats), float(arg), p) + ring * 4 * plain  # type: ignore[arg-type]
    return None


def compression_entries(runs: list[dict]) -> list[dict]:
    """One entry per ``compress`` run: method, link, steady step time and bytes, img/s, loss, accuracy."""
    out = []
    for m in runs:
        if m.get("_kind") != "compress":
            continue
        meta = m.get("_meta") or {}
        method = meta.get("compress") or (m.get("config") or {}).get("compress", "none")
        steady = _steady(m)
        batch = m.get("global_batch_size")
        out.append(
            {
                "method": method,
                "link": meta.get("link"),
                "link_bits": _link_bits(meta.get("link")),
                "world_size": m.get("world_size"),
                "model": m.get("model"),
                "step_time_s": steady["step_time_s"],
                "bytes": steady["bytes"],
                "steady_steps": steady["steps"],
                "img_s": batch / steady["step_time_s"] if batch and steady["step_time_s"] else None,
                "run_img_s": m.get("throughput_img_s"),
                "final_train_loss": m.get("final_train_loss"),
                "test_accuracy": m.get("final_test_accuracy"),
            }
        )
    return sorted(out, key=lambda e: (e["link_bits"] is None, e["link_bits"] or 0, _method_key(e["method"])))


def compression_model(entries: list[dict]) -> dict[str, dict]:
    """The alpha-beta model of each method's step time on a link, and where it stops paying.

    Per method m: t(m, B) = t_host(m) + S_m·β(B), t_host the one-host step time (compute, the
    compressor's own work and the loopback transfer), S_m the bytes rank 0 sends per step (measured)
    and β(B) = 8/(B·1448/1514) seconds per byte (the link's rate, framing included; no α: the
    emulated links add no delay, the per-message cost is software's and in t_host). Compression
    pays while t(m, B) < t(none, B); the crossover is the rate where they meet:
    B* = 8/PAYLOAD · (S_none − S_m) / (t_host(m) − t_host(none)); None where t_host(m) <= t_host(none)
    (the model says it pays at every rate).
    """
    from .cluster_report import PAYLOAD

    host = {e["method"]: e for e in entries if e["link"] is None and e["step_time_s"] and e["bytes"] is not None}
    base = host.get("none")
    out: dict[str, dict] = {}
    for method, e in host.items():
        model: dict = {"t_host_s": e["step_time_s"], "bytes": e["bytes"], "crossover_bits": None}
        model["cost_bytes"] = _cost_bytes(method, e.get("model") or "simplecnn", int(e.get("world_size") or 4))
        if base is not None and method != "none":
            extra_s = e["step_time_s"] - base["step_time_s"]
            saved = base["bytes"] - e["bytes"]
            if extra_s > 0 and saved > 0:
                model["crossover_bits"] = 8 / PAYLOAD * saved / extra_s
        out[method] = model
    return out


def _model_time(model: Mapping, bits: float) -> float:
    from .cluster_report import beta_for

    return model["t_host_s"] + model["bytes"] * beta_for(bits)


def _measured_crossover(entries: list[dict], method: str) -> str:
    """Between which measured link rates ``method`` stops beating none (from its step times)."""
    by_link = {}
    for e in entries:
        if e["link_bits"] is not None and e["step_time_s"]:
            by_link.setdefault(e["link_bits"], {})[e["method"]] = e["step_time_s"]
    pays = [(b, t[method] < t["none"]) for b, t in sorted(by_link.items()) if method in t and "none" in t]
    if not pays:
        return "–"
    if all(p for _, p in pays):
        return f"pays at every rate measured (up to {pays[-1][0] / 1e6:g} Mbit/s)"
    if not any(p for _, p in pays):
        return f"pays at no rate measured (from {pays[0][0] / 1e6:g} Mbit/s)"
    for (b0, p0), (b1, p1) in zip(pays, pays[1:]):
        if p0 and not p1:
            return f"between {b0 / 1e6:g} and {b1 / 1e6:g} Mbit/s"
    return "mixed: " + ", ".join(f"{b / 1e6:g} {'pays' if p else 'no'}" for b, p in pays)


def plot_compression(entries: list[dict], model: Mapping[str, Mapping], path: Path, notes: list[str]) -> Path | None:
    """Time per step against link rate per method (points: measured; dashed: the model), crossovers marked."""
    linked = [e for e in entries if e["link_bits"] and e["step_time_s"]]
    if not linked:
        notes.append(f"{path.name}: skipped, no compression run on a link")
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rates = sorted({e["link_bits"] for e in linked})
    lo, hi = rates[0] / 1.5, rates[-1] * 1.5
    grid = [lo * (hi / lo) ** (i / 99) for i in range(100)]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, method in enumerate(sorted({e["method"] for e in linked}, key=_method_key)):
        colour = f"C{i}"
        pts = sorted((e["link_bits"], e["step_time_s"]) for e in linked if e["method"] == method)
        ax.plot([b / 1e6 for b, _ in pts], [t * 1e3 for _, t in pts], "o-", color=colour, label=f"{method} measured")
        if method in model:
            ax.plot([b / 1e6 for b in grid], [_model_time(model[method], b) * 1e3 for b in grid], "--",
                    color=colour, alpha=0.7, label=f"{method} model")  # fmt: skip
            crossing = model[method].get("crossover_bits")
            if crossing and lo < crossing < hi:
                ax.axvline(crossing / 1e6, color=colour, linestyle=":", alpha=0.8)
        host = model.get(method, {}).get("t_host_s")
        if host:
            ax.axhline(host * 1e3, color=colour, linewidth=0.6, alpha=0.4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate (Mbit/s, each node's NIC, both ways)")
    ax.set_ylabel("time per step (ms, steady state)")
    ax.set_title("Time per step against link rate: measured (points), model (dashed), crossover (dotted)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    from . import plots

    return plots._save(fig, path)


def _compression_section(entries: list[dict], model: Mapping[str, Mapping]) -> str:
    if not entries:
        return "_No compression runs (`python -m analysis.sweep --compression`)._"
    base = {e["link"]: e["step_time_s"] for e in entries if e["method"] == "none"}
    rows = []
    for e in entries:
        none_t = base.get(e["link"])
        speed = none_t / e["step_time_s"] if none_t and e["step_time_s"] else None
        rows.append(
            [
                "one host" if e["link"] is None else f"{e['link_bits'] / 1e6:g} Mbit/s",
                e["method"],
                _fmt(e["step_time_s"] and e["step_time_s"] * 1e3, ".0f"),
                _fmt(e["img_s"], ".1f"),
                _fmt(speed, ".2f"),
                _fmt(e["run_img_s"], ".1f"),
                human_bytes(e["bytes"]) if e["bytes"] is not None else "–",
                _fmt(e["final_train_loss"], ".3f"),
                _fmt(e["test_accuracy"] and e["test_accuracy"] * 100, ".1f"),
            ]
        )
    text = (
        "Each `--compress` method, ring over torch, one rank per node, at each link rate and on one host "
        "(no link limit). Step time and images/s are the steady state: steps after PowerSGD's uncompressed "
        "warm-up (the same steps for every method); the whole run's images/s, warm-up included, beside "
        "them. Bytes: sent per step by rank 0, measured.\n\n"
        + _table(
            ["link", "method", "ms/step", "img/s", "× none", "img/s (whole run)", "bytes/step",
             "train loss", "test acc. %"],  # fmt: skip
            rows,
        )
    )
    if model:
        mrows = []
        for method in sorted(model, key=_method_key):
            mo = model[method]
            crossing = mo.get("crossover_bits")
            said = (
                "–" if method == "none"
                else f"{crossing / 1e6:.0f} Mbit/s" if crossing
                else "none: pays at every rate"
            )  # fmt: skip
            mrows.append(
                [
                    method,
                    _fmt(mo["t_host_s"] * 1e3, ".0f"),
                    human_bytes(mo["bytes"]),
                    human_bytes(mo["cost_bytes"]) if mo.get("cost_bytes") else "–",
                    said,
                    "–" if method == "none" else _measured_crossover(entries, method),
                ]
            )
        text += (
            "\n\nThe alpha-beta model (`analysis.report.compression_model`): t(m, B) = t_host(m) + S_m·β(B), "
            "β(B) = 8/(B·1448/1514) s per byte, S_m the measured bytes; compression stops paying above the "
            "rate B* where its extra compute (t_host(m) − t_host(none)) equals the transfer it saves. "
            "`cost.py`'s bytes beside the measured ones.\n\n"
            + _table(
                ["method", "t_host ms", "bytes (measured)", "bytes (cost.py)", "crossover B* (model)",
                 "crossover (measured)"],  # fmt: skip
                mrows,
            )
        )
    return text


# --------------------------------------------------------------------------- compression: learning cost

#: Issue 24's goals per method: (final train loss at most this much above none's, as a fraction;
#: bytes per step at most this multiple of none's, at 4 ranks).
_LOSS_GOALS: dict[str, tuple[float, float]] = {"bf16": (0.02, 0.55), "powersgd:2": (0.10, 0.15), "topk:0.01": (0.15, 0.10)}

#: "Final" train loss: the mean of the last this many steps' loss on rank 0. One step's loss is one rank's
#: batch of 32 images, and from step to step it moves by more than the 2 % the bf16 goal allows; the
#: last 10 steps (320 images) run at the cosine schedule's smallest rates, where the weights barely move,
#: so their mean is the end of training measured on ten times the images.
FINAL_WINDOW = 10


def compression_loss_entries(runs: list[dict]) -> list[dict]:
    """One entry per ``compress_loss`` run (``python -m analysis.sweep --compression-loss``) whose step
    records hold the loss: method, seed, and per step (rank 0's) the loss and the wall-clock seconds
    since training began (the sum of the step times), the final loss (``FINAL_WINDOW``) and the steady
    bytes per step (after PowerSGD's warm-up, as in the link study: ``_steady``)."""
    out = []
    for m in runs:
        if m.get("_kind") != "compress_loss":
            continue
        recs = [r for r in m.get("step_records") or [] if isinstance(r, Mapping) and r.get("loss") is not None]
        if not recs:
            continue  # metrics.json from before step records kept the loss: nothing to plot
        meta = m.get("_meta") or {}
        cfg = m.get("config") or {}
        elapsed, clock = 0.0, []
        for r in recs:
            elapsed += float(r.get("step_time_s") or 0.0)
            clock.append(elapsed)
        losses = [float(r["loss"]) for r in recs]
        tail = losses[-FINAL_WINDOW:]
        out.append(
            {
                "method": meta.get("compress") or cfg.get("compress", "none"),
                "seed": meta.get("seed", cfg.get("seed")),
                "steps": [int(r["step"]) for r in recs],
                "loss": losses,
                "time_s": clock,
                "final_loss": sum(tail) / len(tail),
                "final_window": len(tail),
                "bytes": _steady(m)["bytes"],
                "test_accuracy": m.get("final_test_accuracy"),
            }
        )
    return sorted(out, key=lambda e: (_method_key(e["method"]), str(e["seed"])))


def compression_loss_summary(entries: list[dict]) -> dict[str, dict]:
    """Per method: final loss per seed and its ratio to none's from the same seed; the mean over seeds
    and its ratio to none's mean; bytes per step over none's; the goals and whether they are met.

    A goal on the loss is met when the mean ratio is at most 1 + goal: the goal guards against learning
    worse, and a compressed run that ends below none's loses nothing. Ratios need none's run from the
    same seed (per seed) or from at least one seed (mean); missing ones are None.
    """
    by_method: dict[str, dict] = {}
    for e in entries:
        by_method.setdefault(e["method"], {})[e["seed"]] = e
    none = by_method.get("none", {})

    def mean(vals: list[float]) -> float | None:
        return sum(vals) / len(vals) if vals else None

    none_loss = mean([e["final_loss"] for e in none.values()])
    none_bytes = mean([e["bytes"] for e in none.values() if e["bytes"] is not None])
    out: dict[str, dict] = {}
    for method in sorted(by_method, key=_method_key):
        seeds = by_method[method]
        loss = mean([e["final_loss"] for e in seeds.values()])
        accuracy = mean([e["test_accuracy"] for e in seeds.values() if e["test_accuracy"] is not None])
        sent = mean([e["bytes"] for e in seeds.values() if e["bytes"] is not None])
        per_seed = {
            s: {
                "final_loss": e["final_loss"],
                "ratio": e["final_loss"] / none[s]["final_loss"] if s in none and none[s]["final_loss"] else None,
            }
            for s, e in sorted(seeds.items(), key=lambda kv: str(kv[0]))
        }
        ratio = loss / none_loss if loss is not None and none_loss else None
        bytes_ratio = sent / none_bytes if sent is not None and none_bytes else None
        loss_goal, bytes_goal = _LOSS_GOALS.get(method, (None, None))
        out[method] = {
            "seeds": per_seed,
            "final_loss": loss,
            "ratio": ratio,
            "test_accuracy": accuracy,
            "bytes": sent,
            "bytes_ratio": bytes_ratio,
            "loss_goal": loss_goal,
            "bytes_goal": bytes_goal,
            "loss_met": None if loss_goal is None or ratio is None else ratio <= 1 + loss_goal,
            "bytes_met": None if bytes_goal is None or bytes_ratio is None else bytes_ratio <= bytes_goal,
        }
    return out


def _mean_curve(xs: list[list[float]], ys: list[list[float]]) -> tuple[list[float], list[float]]:
    """Point by point over the steps every run has, the mean over runs of x and of y."""
    n = min(len(y) for y in ys)
    return [sum(x[i] for x in xs) / len(xs) for i in range(n)], [sum(y[i] for y in ys) / len(ys) for i in range(n)]


def plot_compression_loss(entries: list[dict], path: Path, notes: list[str]) -> Path | None:
    """Train loss (rank 0's, per step) against step and against wall-clock seconds, one colour per method:
    the mean over seeds thick, each seed thin."""
    if not entries:
        notes.append(f"{path.name}: skipped, no compress_loss run with per-step loss")
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_time) = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    for i, method in enumerate(sorted({e["method"] for e in entries}, key=_method_key)):
        runs = [e for e in entries if e["method"] == method]
        colour = f"C{i}"
        for e in runs:
            ax_step.plot(e["steps"], e["loss"], color=colour, linewidth=0.5, alpha=0.35)
            ax_time.plot(e["time_s"], e["loss"], color=colour, linewidth=0.5, alpha=0.35)
        steps, mean_loss = _mean_curve([e["steps"] for e in runs], [e["loss"] for e in runs])
        clock, _ = _mean_curve([e["time_s"] for e in runs], [e["loss"] for e in runs])
        label = f"{method} (mean of {len(runs)} seed{'s' if len(runs) != 1 else ''})"
        ax_step.plot(steps, mean_loss, color=colour, linewidth=1.8, label=label)
        ax_time.plot(clock, mean_loss, color=colour, linewidth=1.8, label=label)
    last = max(e["steps"][-1] for e in entries)
    window = min(e["final_window"] for e in entries)
    ax_step.axvspan(last - window + 0.5, last + 0.5, color="grey", alpha=0.12, label=f"final loss: mean of these {window} steps")
    ax_step.set_yscale("log")  # the first steps' loss is several times the last ones'
    ax_step.set_xlabel("step")
    ax_time.set_xlabel("wall-clock seconds of training (sum of step times, mean over seeds)")
    ax_step.set_ylabel("train loss, rank 0's batch")
    ax_step.set_title("Train loss against step (thin: each seed)", fontsize=9)
    ax_time.set_title("Train loss against wall-clock time", fontsize=9)
    for ax in (ax_step, ax_time):
        ax.grid(True, alpha=0.3)
    ax_step.legend(fontsize=8)
    from . import plots

    return plots._save(fig, path)


def _compression_loss_section(entries: list[dict], summary: Mapping[str, Mapping]) -> str:
    """The learning cost: per method, final train loss per seed and mean over none's, bytes over none's,
    against issue 24's goals."""
    seeds = sorted({e["seed"] for e in entries}, key=str)
    steps = sorted({len(e["steps"]) for e in entries})
    window = min(e["final_window"] for e in entries)

    def pct(ratio: float | None) -> str:
        return "–" if ratio is None else f"{(ratio - 1) * 100:+.1f} %"

    def verdict(met: bool | None, goal: str) -> str:
        return "–" if met is None else f"{goal}: {'met' if met else 'NOT met'}"

    rows = []
    for method, s in summary.items():
        rows.append(
            [
                method,
                *[pct(s["seeds"].get(seed, {}).get("ratio")) if method != "none" else
                  _fmt(s["seeds"].get(seed, {}).get("final_loss"), ".4f") for seed in seeds],  # fmt: skip
                _fmt(s["final_loss"], ".4f"),
                "–" if method == "none" else pct(s["ratio"]),
                verdict(s["loss_met"], f"≤ +{s['loss_goal'] * 100:g} %" if s["loss_goal"] is not None else ""),
                _fmt(s["bytes_ratio"], ".3f") + "×" if s["bytes_ratio"] is not None else "–",
                verdict(s["bytes_met"], f"≤ {s['bytes_goal']:g}×" if s["bytes_goal"] is not None else ""),
                _fmt(s["test_accuracy"] and s["test_accuracy"] * 100, ".1f"),
            ]
        )
    return (
        f"The learning cost: each method from seeds {', '.join(str(s) for s in seeds)}, "
        f"{'/'.join(str(n) for n in steps)} steps, 4 ranks on one host "
        "(`python -m analysis.sweep --compression-loss`). **Final train loss** is the mean of the last "
        f"{window} steps' loss on rank 0: one step's loss is one rank's batch of 32 images and moves from "
        "step to step by more than the goals' few per cent; the last steps run at the cosine schedule's "
        "smallest rates, so their mean measures the end of training on ten times the images. Per seed: "
        "none's final loss, and each method's relative to none's from the same seed; mean: the mean over "
        "seeds relative to none's mean. A loss goal is met when the mean is at most the goal above none's "
        "(ending lower loses nothing). Bytes: sent per step by rank 0 after PowerSGD's warm-up, over "
        "none's. Test accuracy: the same test images for every run, a second view of where training ended. "
        "The right panel's seconds are rank 0's step times summed: on shared cores they show the "
        "machine's load as much as what a method costs (the link study above times the methods).\n\n"
        + _table(
            ["method", *[f"seed {s}" for s in seeds], "final loss (mean)", "vs none (mean)", "loss goal",
             "bytes/step vs none", "bytes goal", "test acc. % (mean)"],  # fmt: skip
            rows,
        )
    )


def _multi_rank_layouts(res: Results) -> dict[str, tuple[int, int, str, str]]:
    """``_source`` -> (nodes, ranks per node, placement, link) of every bench file run on an emulated
    cluster with more than one rank per node, from the file's ``machine["cluster"]`` (what the cluster
    tool told its ranks; a sweep's files and hand runs such as analysis/measured/hier/ alike)."""
    from .cluster import parse_label

    out = {}
    for source in sorted({r["_source"] for r in res.bench_rows}):
        try:
            machine = json.loads((res.root / source).read_text()).get("machine") or {}
        except (OSError, ValueError, AttributeError):
            continue
        layout = parse_label(str(machine.get("cluster") or ""))
        if layout is not None and layout[1] > 1:
            out[source] = layout
    return out


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
        "time per epoch = training-set size / throughput, the size being the run's synthetic_size for "
        "the synthetic dataset, 50,000 images for CIFAR-10 and 60,000 for Fashion-MNIST. Runs that "
        "finished their epoch show the measured time._"
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
            _fmt(e["test_acc"], ".2%"),
        ]
        for e in large
    ]
    return _table(
        ["run", "global batch", "peak lr", "linear LR scaling", "warmup epochs", "final loss", "test acc"],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = CliParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results folder written by python -m analysis.sweep")
    args = parser.parse_args(argv)
    root = Path(args.results)
    if root.is_file() and root.suffix == ".json":  # one bench --json file: benchtable renders those
        parser.error(
            f"{root} is a file, not a results folder; for a ringcomm.bench --json file, "
            f"run python -m analysis.benchtable {root}"
        )
    if not root.is_dir():
        parser.error(f"{root} is not a folder; run python -m analysis.sweep --out {root} first")
    found = load_results(root)
    if not found.bench_rows and not found.runs:  # else a REPORT.md of "?" and empty tables
        parser.error(
            f"{root}: nothing to report (no bench --json file, no metrics.json); run analysis.sweep first"
        )
    report = build_report(root)
    print(f"# wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
