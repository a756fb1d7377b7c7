"""The report's section "On an emulated cluster": ring against parameter server, link-bound.

``python -m analysis.sweep --cluster`` runs every rank in its own network namespace behind a
rate-limited full-duplex link (``analysis.cluster``). There the time of an all-reduce is set by
the busiest link, as on real machines, and the alpha-beta model can be checked term by term:

    beta  = 8 / (RATE * 1448/1514) seconds per byte of payload (RATE in bit/s: the link, not a
            fit; a 1514-byte Ethernet frame of TCP carries 1448 bytes of data)
    alpha = fitted per algorithm, by least squares on the relative error of
            messages * alpha + bytes * beta  against the measured time

With beta pinned to the link, the model's prediction for t_ps / t_ring is the ratio of the bytes
on the busiest link: P for the sequential server (its link carries (P-1)*M in, then (P-1)*M out,
against the ring's 2(P-1)/P*M), P/2 for the overlapped one (in and out at once), and about 1 for
a server sharded P ways. This module builds the section's tables and figures from a results
folder; ``analysis.report`` calls it when the sweep ran on a cluster.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ringcomm.names import AlgoSpec

from .cluster import PAYLOAD, beta_for  # noqa: F401  (PAYLOAD: the tests read it here too)
from .fit import comm_counts, predict_time
from .markdown import fmt as _fmt
from .markdown import table as _table
from .results import Results, series
from .tables import step_stats

__all__ = ["FIXED_SIZE", "cluster_link", "link_bits_per_s", "section"]

#: The size the time-against-P figure and the ratio table are drawn at (the issue's goal size).
FIXED_SIZE = 16 << 20



_CORES_RE = re.compile(r"cores busy on average during the run: ([0-9.]+) of (\d+)")
_LINK_RE = re.compile(r"link test: .*?: (\d+) Mbit/s")


def cluster_link(res: Results) -> str | None:
    """The link rate the sweep ran its cluster on (``"500mbit"``), or None for a one-host sweep."""
    for run in (res.manifest or {}).get("runs", []):
        link = (run.get("meta") or {}).get("cluster_link")
        if link:
            return str(link)
    for run in res.runs:
        link = (run.get("_meta") or {}).get("cluster_link")
        if link:
            return str(link)
    return None


def link_bits_per_s(link: str) -> float:
    """``"500mbit"`` -> 5e8 (tc's units: kbit, mbit, gbit; decimal)."""
    from .cluster import parse_rate  # the tool's own parser, so the report reads the rate as tc did

    return float(parse_rate(link))


# --------------------------------------------------------------------------- numbers


def _series(label: str, p: int) -> str:
    """A bench label as one series across P: ``ps:4`` at P = 4 is ``ps:P`` (one shard per rank)."""
    return "ps:P" if label == f"ps:{p}" else label


def _concrete(label: str, p: int) -> str:
    """The bench label of series ``label`` at world size ``p`` (``ps:P`` -> ``ps:4``)."""
    return f"ps:{p}" if label == "ps:P" else label


def _times(rows: Sequence[Mapping]) -> dict[tuple[str, int, int], float]:
    """Median time in seconds per (series, P, size) over every bench file that measured it."""
    seen: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    for r in rows:
        if r.get("wrong") or r.get("time_us") is None:
            continue
        p = int(r["world_size"])
        seen[(_series(str(r["algo"]), p), p, int(r["size_bytes"]))].append(float(r["time_us"]) / 1e6)
    return {k: statistics.median(v) for k, v in seen.items()}


def _predict(label: str, p: int, nbytes: float, alpha: float, beta: float) -> float:
    return predict_time(_concrete(label, p), p, nbytes, alpha, beta)


def _counts(label: str, p: int, nbytes: float) -> tuple[float, float]:
    return comm_counts(_concrete(label, p), p, nbytes)


def _modelled(label: str) -> bool:
    try:
        spec = AlgoSpec.parse(_concrete(label, 2))
    except ValueError:
        return False
    return spec.algo in ("ring", "ring_simple", "ps", "naive", "rhd", "rd")


def fit_alpha(times: Mapping[tuple[str, int, int], float], label: str, beta: float) -> float | None:
    """Alpha (seconds per message, >= 0) for series ``label`` with beta fixed: least squares on the
    relative error, so that a 1 MiB point counts as much as a 64 MiB one."""
    num = den = 0.0
    for (lab, p, size), t in times.items():
        if lab != label or p < 2 or t <= 0:
            continue
        try:
            messages, path_bytes = _counts(label, p, size)
        except ValueError:
            continue
        num += (messages / t) * (t - path_bytes * beta) / t
        den += (messages / t) ** 2
    return max(0.0, num / den) if den else None


def _cores(res: Results) -> dict[tuple[str, int], list[tuple[float, int, int | None]]]:
    """Per (sweep kind, P): (cores busy on average, cores, link test Mbit/s) of each run, from its log."""
    out: dict[tuple[str, int], list[tuple[float, int, int | None]]] = defaultdict(list)
    for run in (res.manifest or {}).get("runs", []):
        log = res.root / str(run.get("log") or "")
        if not run.get("log") or not log.is_file():
            continue
        text = log.read_text(errors="replace")
        busy = _CORES_RE.findall(text)
        link = _LINK_RE.search(text)
        p = int((run.get("meta") or {}).get("world_size") or 0)
        if busy:
            entry = (float(busy[-1][0]), int(busy[-1][1]), int(link.group(1)) if link else None)
            out[(str(run.get("kind")), p)].append(entry)
            out[(str(run.get("name")), -1)].append(entry)  # and by run name
    return out


# --------------------------------------------------------------------------- figures


def _plot_time_vs_p(
    times: Mapping[tuple[str, int, int], float],
    alphas: Mapping[str, float | None],
    beta: float,
    path: Path,
    title: str,
) -> Path | None:
    from . import plots  # matplotlib loads only when a figure is drawn

    plt = plots.plt
    labels = sorted({lab for (lab, _, size) in times if size == FIXED_SIZE})
    if not labels:
        return None
    colours = plots._colours(labels)
    markers = "osv^DxP*"  # naive and ps take the same time: different marks keep both visible
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, label in enumerate(labels):
        pts = sorted((p, t) for (lab, p, size), t in times.items() if lab == label and size == FIXED_SIZE)
        ax.plot(
            [p for p, _ in pts],
            [t * 1e3 for _, t in pts],
            markers[i % len(markers)],
            color=colours[label],
            label=label,
            ms=9 - i % 3 * 2,
            mfc="none" if i % 2 else colours[label],
        )
        alpha = alphas.get(label)
        if alpha is None or not pts:
            continue
        ps = [p for p in range(2, max(p for p, _ in pts) + 1)]
        model = [_predict(label, p, FIXED_SIZE, alpha, beta) * 1e3 for p in ps]
        ax.plot(ps, model, "--", color=colours[label], alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("world size P (nodes, one rank each)")
    ax.set_ylabel(f"time per all-reduce of {FIXED_SIZE >> 20} MiB (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return plots._save(fig, path)


def _plot_training(train: Sequence[Mapping], path: Path, title: str) -> Path | None:
    from . import plots

    plt = plots.plt
    by_series: dict[str, list[Mapping]] = defaultdict(list)
    for e in train:
        by_series[e["series"]].append(e)
    if not by_series:
        return None
    colours = plots._colours(sorted(by_series))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, entries in sorted(by_series.items()):
        entries = sorted(entries, key=lambda e: e["world_size"])
        xs = [e["world_size"] for e in entries]
        left.plot(xs, [e["throughput_img_s"] for e in entries], "o-", color=colours[name], label=name)
        right.plot(xs, [e["efficiency"] or math.nan for e in entries], "o-", color=colours[name], label=name)
    left.set_xlabel("world size P")
    left.set_ylabel("images / s (all nodes)")
    right.set_xlabel("world size P")
    right.set_ylabel("scaling efficiency (against min(P, cores) x one node)")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return plots._save(fig, path)


# --------------------------------------------------------------------------- the section


def section(res: Results, figs: Path, notes: list[str]) -> tuple[str, dict[str, Any]]:
    """The Markdown of "On an emulated cluster" and its numbers (for analysis.json)."""
    link = cluster_link(res)
    if link is None:
        return "_Not run on an emulated cluster (python -m analysis.sweep --cluster)._", {}
    rate = link_bits_per_s(link)
    beta = beta_for(rate)
    link_gbs = rate / 8 / 1e9
    times = _times(res.bench_rows)
    labels = sorted({lab for (lab, _, _) in times})
    alphas = {lab: fit_alpha(times, lab, beta) if _modelled(lab) else None for lab in labels}
    worlds = sorted({p for (_, p, _) in times})
    cores = _cores(res)
    summary: dict[str, Any] = {
        "link": link,
        "rate_bits_per_s": rate,
        "beta_s_per_byte": beta,
        "alpha_s": alphas,
    }
    parts = [
        f"Every rank ran in a network namespace of its own (one node per rank, one process per node) "
        f"behind a full-duplex link of **{link}** ({link_gbs * 1e3:.1f} MB/s each way), all links on one "
        "bridge: `python -m analysis.sweep --cluster` runs each benchmark and training command through "
        "`python -m analysis.cluster`. The model lines take **beta from the link** "
        f"(8 / (rate × 1448/1514) = {beta * 1e9:.2f} ns per byte: a 1514-byte frame carries 1448 bytes "
        "of data) and fit only **alpha**, per algorithm, on the relative error over every size and P."
    ]

    # --- link-bound: bus bandwidth against the link, and the cores
    if "ring" in labels:
        rows = []
        for p in worlds:
            t = times.get(("ring", p, FIXED_SIZE))
            bus = None if t is None else (2 * (p - 1) / p * FIXED_SIZE / t) / 1e9
            runs = cores.get(("bench", p), [])
            busy = max((c[0] for c in runs), default=None)
            ncores = runs[0][1] if runs else None
            mbit = [c[2] for c in runs if c[2]]
            rows.append(
                [
                    p,
                    _fmt(None if t is None else t * 1e3, ".0f"),
                    _fmt(bus, ".4f"),
                    _fmt(None if bus is None else bus / link_gbs, ".0%"),
                    f"{busy:.2f} of {ncores}" if busy is not None else "?",
                    f"{min(mbit)}" if mbit else "?",
                ]
            )
            summary.setdefault("ring_busbw_fraction", {})[p] = None if bus is None else bus / link_gbs
        parts.append(
            f"### Link-bound, not core-bound\n\nThe link rate ({link}) is chosen so that the links, not "
            "this host's cores, set the time: every byte a node sends is copied through the kernel of the "
            "one host, so a faster link makes 8 nodes on 2 cores bound by their CPU. Evidence: ring at "
            f"{FIXED_SIZE >> 20} MiB, its bus bandwidth against the link, the cores the benchmark kept "
            "busy on average (the busier of its runs at that P; under 2 means some were idle), and the "
            "link test's TCP rate node 0 -> node P-1 before the run.\n\n"
            + _table(
                ["P", "ring (ms)", "bus bandwidth (GB/s)", "of the link", "cores busy", "link test (Mbit/s)"],
                rows,
            )
            + f"\n\n_TCP over Ethernet carries at most {PAYLOAD:.1%} of a link's rate as data (1448 bytes "
            "of each 1514-byte frame): that is the ceiling of the fraction above._"
        )

    # --- time against P, with the model
    rows = []
    for lab in labels:
        a = alphas.get(lab)
        for p in worlds:
            t = times.get((lab, p, FIXED_SIZE))
            if t is None:
                continue
            model = _predict(lab, p, FIXED_SIZE, a, beta) if a is not None else None
            rows.append(
                [
                    lab,
                    p,
                    _fmt(t * 1e3, ".0f"),
                    _fmt(None if model is None else model * 1e3, ".0f"),
                    _fmt(None if model is None else (t - model) / model, "+.0%"),
                    _fmt(None if a is None else a * 1e3, ".2f"),
                ]
            )
    fig = _plot_time_vs_p(
        times,
        alphas,
        beta,
        figs / "cluster_time_vs_p.png",
        f"{FIXED_SIZE >> 20} MiB float32 on {link} links: measured (points), model (dashed)",
    )
    if fig is None:
        notes.append("cluster_time_vs_p.png: skipped, no cluster bench rows at the fixed size")
    parts.append(
        f"### Time against P at {FIXED_SIZE >> 20} MiB\n\n"
        + (
            f"![time against P on the cluster]({fig.relative_to(res.root).as_posix()})\n\n"
            "_Points: measured medians; dashed: alpha-beta model, beta from the link, alpha fitted per "
            "algorithm over every size and P. gloo and auto have no line: gloo's algorithm is its own, "
            "auto is whichever it picked._\n\n"
            if fig
            else ""
        )
        + _table(
            ["algorithm", "P", "measured (ms)", "model (ms)", "measured vs model", "alpha fitted (ms)"], rows
        )
    )

    # --- t_ps / t_ring, measured against the model
    rows = []
    ratios: dict[str, dict[int, dict[str, float | None]]] = defaultdict(dict)
    for lab in labels:
        spec = AlgoSpec.parse(_concrete(lab, 2))
        if spec.algo not in ("ps", "naive") or "ring" not in labels:
            continue
        for p in worlds:
            t, ring = times.get((lab, p, FIXED_SIZE)), times.get(("ring", p, FIXED_SIZE))
            if t is None or ring is None:
                continue
            try:
                bytes_ps = _counts(lab, p, FIXED_SIZE)[1]
            except ValueError:
                continue
            bytes_ring = comm_counts("ring", p, FIXED_SIZE)[1]
            model = bytes_ps / bytes_ring  # beta-terms only: what the links predict
            measured = t / ring
            ratios[lab][p] = {"measured": measured, "model": model, "error": measured / model - 1}
            rows.append(
                [lab, p, _fmt(measured, ".2f"), _fmt(model, ".2f"), _fmt(measured / model - 1, "+.0%")]
            )
    summary["ps_over_ring"] = ratios
    overlap_rows = []
    for p in worlds:
        seq, ovl = times.get(("ps", p, FIXED_SIZE)), times.get(("ps+overlap", p, FIXED_SIZE))
        if seq and ovl:
            overlap_rows.append([p, _fmt(seq * 1e3, ".0f"), _fmt(ovl * 1e3, ".0f"), _fmt(ovl / seq, ".2f")])
            summary.setdefault("overlap_over_sequential", {})[p] = ovl / seq
    parts.append(
        "### Parameter server against ring: measured against the model\n\n"
        "The model's ratio is the bytes on the busiest link, ps over ring: P for the sequential server "
        "(push, then pull), P/2 for the overlapped one (`ps+overlap`: the server pulls segment s back "
        "while segment s+1 is pushed, as BytePS does), 1 for a server sharded P ways (`ps:P`: every "
        "rank serves 1/P of the tensor, so every link carries what the ring's does), 2(P−1)/(2(P−1)/P) "
        "= P for naive (gather to rank 0, broadcast back).\n\n"
        + (
            _table(["algorithm", "P", "t / t_ring measured", "model", "measured vs model"], rows)
            if rows
            else "_No ps and ring rows at the fixed size._"
        )
        + (
            "\n\nOverlapped against sequential server (model: 0.5):\n\n"
            + _table(["P", "ps (ms)", "ps+overlap (ms)", "overlap / sequential"], overlap_rows)
            if overlap_rows
            else ""
        )
    )

    # --- training
    train = _training(res, alphas, beta)
    for e in train:
        busy = cores.get((e["name"], -1))
        e["cores_busy"] = busy[0][0] if busy else None
    summary["training"] = train
    fig = _plot_training(train, figs / "cluster_training.png", f"Training over {link} links")
    if fig is None:
        notes.append("cluster_training.png: skipped, no training runs on the cluster")
    rows = [
        [
            e["series"],
            e["world_size"],
            _fmt(e["throughput_img_s"], ".1f"),
            _fmt(e["step_time_s"] * 1e3 if e["step_time_s"] else None, ".0f"),
            _fmt(e["comm_s"] * 1e3 if e["comm_s"] is not None else None, ".0f"),
            _fmt(e["comm_model_s"] * 1e3 if e["comm_model_s"] is not None else None, ".0f"),
            _fmt(e["vs_ddp"], ".2f"),
            _fmt(e["vs_ddp_model"], ".2f"),
            _fmt(e["efficiency"], ".0%"),
            _fmt(e["cores_busy"], ".2f"),
        ]
        for e in train
    ]
    parts.append(
        "### Training over the links\n\n"
        + (
            _table(
                [
                    "run",
                    "P",
                    "images/s",
                    "step (ms)",
                    "comm per step measured (ms)",
                    "comm per step model (ms)",
                    "throughput / ddp",
                    "model",
                    "scaling efficiency",
                    "cores busy",
                ],
                rows,
            )
            + "\n\n_Comm per step: the hook's measured time per step (ddp's all-reduce is built in, so it "
            "has none); the model's is one all-reduce of the model's gradients (4 bytes per parameter) "
            "with the algorithm's fitted alpha and the link's beta. The model's throughput / ddp "
            "assumes a step is DDP's step minus DDP's all-reduce (modelled as the ring's) plus this "
            "algorithm's all-reduce, with no overlap with backward. Scaling efficiency: throughput "
            "against what the nodes could compute with no communication at all, one node's throughput "
            f"at P = 1 times min(P, {int(res.machine.get('cpus') or 1)}): the nodes share this host's "
            "cores, so beyond that many nodes the compute does not grow and the links are what is "
            "left to measure. Training computes on the CPU, so its cores are busy (unlike the "
            "benchmark's): there a comm thread written in Python waits for a core as well as for the "
            "link, and Gloo's built-in all-reduce, in C++ threads, waits less._"
            if rows
            else "_No training runs on the cluster._"
        )
        + (f"\n\n![training on the cluster]({fig.relative_to(res.root).as_posix()})" if fig else "")
    )

    # --- the seeds
    parts.append(_seeds_section(ratios, times, worlds))
    return "\n\n".join(parts), summary


def _training(res: Results, alphas: Mapping[str, float | None], beta: float) -> list[dict]:
    runs = [m for m in res.runs if m.get("_kind") == "train" and (m.get("_meta") or {}).get("cluster_link")]
    out = []
    # One node computes alone at P = 1 (nothing travels); P nodes on C cores can at best compute
    # min(P, C) times as fast, since the nodes share the host's cores. Efficiency is against that.
    solo = [
        float(m["throughput_img_s"]) for m in runs if m.get("world_size") == 1 and m.get("throughput_img_s")
    ]
    x1 = statistics.median(solo) if solo else None
    cores = int(res.machine.get("cpus") or 1)
    ddp: dict[int, Mapping] = {}
    for m in runs:
        if m.get("algo") == "ddp":
            ddp[int(m["world_size"])] = m
    for m in sorted(runs, key=lambda m: (series(m), int(m.get("world_size") or 0))):
        p = int(m["world_size"])
        if p == 1:
            continue  # the baseline above, not a row
        name = series(m)
        stats = step_stats(m)
        grad_bytes = 4.0 * float(m.get("parameters") or 0)
        label = "ring" if name == "ddp" else name
        alpha = alphas.get(label) if label in alphas else alphas.get("ring")
        comm_model = (
            predict_time(label, p, grad_bytes, alpha, beta)
            if grad_bytes and alpha is not None and p > 1
            else None
        )
        base = ddp.get(p)
        vs_ddp = (
            float(m["throughput_img_s"]) / float(base["throughput_img_s"])
            if base and m.get("throughput_img_s") and base.get("throughput_img_s")
            else None
        )
        vs_model = None
        if base is not None and comm_model is not None:
            ddp_step = step_stats(base)["step_time_s"]
            ring_alpha = alphas.get("ring")
            ddp_comm = (
                predict_time("ring", p, grad_bytes, ring_alpha, beta) if ring_alpha is not None else None
            )
            if ddp_step and ddp_comm is not None:
                vs_model = ddp_step / max(ddp_step - ddp_comm + comm_model, 1e-9)
        out.append(
            {
                "name": m.get("_name"),
                "series": name,
                "world_size": p,
                "throughput_img_s": m.get("throughput_img_s"),
                "step_time_s": stats["step_time_s"],
                "comm_s": stats["comm_time_s"],
                "comm_model_s": comm_model if name != "ddp" else None,
                "vs_ddp": vs_ddp,
                "vs_ddp_model": vs_model if name != "ddp" else 1.0,
                "ideal_img_s": x1 * min(p, cores) if x1 else None,
                "efficiency": float(m["throughput_img_s"]) / (x1 * min(p, cores))
                if x1 and m.get("throughput_img_s")
                else None,
                "parameters": m.get("parameters"),
            }
        )
    return out


def _seeds_section(
    ratios: Mapping[str, Mapping[int, Mapping[str, float | None]]],
    times: Mapping[tuple[str, int, int], float],
    worlds: Sequence[int],
) -> str:
    rows = []
    for p in worlds:
        seq = (ratios.get("ps") or {}).get(p) or {}
        rows.append(
            [
                p,
                f"(P−1)·M = {p - 1}·M",
                f"2(P−1)/P·M = {2 * (p - 1) / p:.2f}·M",
                f"{p}",
                _fmt(seq.get("measured"), ".2f"),
            ]
        )
    return (
        "### What the seeds projected, and what is measured here\n\n"
        "The projects this one learned from compare ring and parameter server on paper: the server's "
        "link carries O(M·N), the ring's O(M), so the server should fall behind linearly in N; their "
        "multi-node speedups were projected from assumed overheads, not measured. On one host that "
        "lesson does not show (t_ps/t_ring was 0.9-1.0 at 4 ranks: every rank shares the memory and "
        "the cores, so no link is a bottleneck). Behind one link per node it does:\n\n"
        + _table(
            [
                "P",
                "server's link carries, each way (paper)",
                "a ring link carries, in all",
                "t_ps / t_ring on paper (sequential)",
                "t_ps / t_ring measured here",
            ],
            rows,
        )
    )
