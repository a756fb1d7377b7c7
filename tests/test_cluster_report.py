"""The report's "On an emulated cluster" section, from a results folder made here.

The bench rows are the alpha-beta model's own timings (beta from a 400 Mbit/s link, a known alpha
per algorithm), scaled per algorithm by a known "measured vs model" factor, so the section's fitted
alpha, its ratios and its flags can be checked against numbers computed in the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import cluster_report
from analysis.fit import predict_time
from analysis.report import build_report
from analysis.results import load_results

LINK = "400mbit"
BETA = 8 / (400e6 * 1448 / 1514)  # a 400 Mbit/s link moves 1448 data bytes per 1514-byte frame
ALPHA = {"ring": 2e-3, "ps": 5e-3, "ps+overlap": 4e-3, "ps:P": 3e-3, "naive": 1e-3, "gloo": None}
SIZES = [1 << 20, 4 << 20, 16 << 20]
WORLDS = [2, 4, 8]
PARAMS = 1_000_000
# measured / model for the ps rows at 16 MiB, so the ratio table has something to find
SLOWER = {"ps": 1.10, "ps+overlap": 1.20}


def _label(name: str, p: int) -> str:
    return f"ps:{p}" if name == "ps:P" else name


def _time(name: str, p: int, size: int) -> float:
    label = _label(name, p)
    if ALPHA[name] is None:  # gloo: no model; call it the ring's time
        return predict_time("ring", p, size, ALPHA["ring"], BETA)
    t = predict_time(label, p, size, ALPHA[name], BETA)
    return t * (SLOWER.get(name, 1.0) if size == 16 << 20 else 1.0)


def _metrics(algo: str, p: int, throughput: float, step_s: float, comm_s: float | None) -> dict:
    return {
        "algo": algo,
        "transport": None if algo == "ddp" else "torch",
        "world_size": p,
        "dataset": "synthetic",
        "parameters": PARAMS,
        "throughput_img_s": throughput,
        "steps": 10,
        "step_records": [{"step": i, "step_time_s": step_s, "comm_time_s": comm_s} for i in range(10)],
    }


def make_cluster_results(root: Path) -> Path:
    runs = []
    for p in WORLDS:
        names = ["ring", "ps", "ps+overlap", "ps:P", "naive", "gloo"]
        rows = [
            {
                "size_bytes": size,
                "count": size // 4,
                "dtype": "float32",
                "algo": _label(n, p),
                "transport": "torch",
                "world_size": p,
                "time_us": _time(n, p, size) * 1e6,
                "algbw_gbs": size / _time(n, p, size) / 1e9,
                "busbw_gbs": 2 * (p - 1) / p * size / _time(n, p, size) / 1e9,
                "wrong": 0,
            }
            for n in names
            for size in SIZES
        ]
        name = f"bench_p{p}_torch_0"
        (root / "bench").mkdir(parents=True, exist_ok=True)
        (root / "bench" / f"{name}.json").write_text(json.dumps({"machine": {"cpus": 2}, "rows": rows}))
        (root / "logs").mkdir(exist_ok=True)
        (root / "logs" / f"{name}.log").write_text(
            f"  link test: node 0 -> node {p - 1}: 381 Mbit/s (95% of {LINK})\n"
            f"analysis.cluster: cores busy on average during the run: {0.2 * p:.2f} of 2\n"
        )
        runs.append(
            {
                "name": name,
                "kind": "bench",
                "output": f"bench/{name}.json",
                "log": f"logs/{name}.log",
                "meta": {"world_size": p, "cluster_link": LINK},
            }  # fmt: skip
        )
    trains = [("ddp", 1, 100.0, 0.32, None)]
    for p in WORLDS:
        trains += [
            ("ddp", p, 150.0, 0.4, None),
            ("ring", p, 140.0, 0.42, 0.1),
            ("ps", p, 200.0 / p, 0.8, 0.5),
        ]
    for algo, p, x, step, comm in trains:
        name = f"train_{algo}_torch_p{p}"
        out = root / "train" / name
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(_metrics(algo, p, x, step, comm)))
        runs.append(
            {
                "name": name,
                "kind": "train",
                "output": f"train/{name}/metrics.json",
                "meta": {"algo": algo, "world_size": p, "cluster_link": LINK},
            }  # fmt: skip
        )
    (root / "sweep.json").write_text(json.dumps({"preset": "cluster", "machine": {"cpus": 2}, "runs": runs}))
    return root


@pytest.mark.fast
def test_alpha_is_recovered_with_beta_pinned_to_the_link(tmp_path: Path) -> None:
    res = load_results(make_cluster_results(tmp_path))
    assert cluster_report.cluster_link(res) == LINK
    times = cluster_report._times(res.bench_rows)
    # ring has no distortion: its fit is exact
    assert cluster_report.fit_alpha(times, "ring", BETA) == pytest.approx(ALPHA["ring"], rel=1e-9)
    assert cluster_report.fit_alpha(times, "ps:P", BETA) == pytest.approx(ALPHA["ps:P"], rel=1e-9)
    # with beta wrong by 2x the same rows give another alpha: the pin matters
    assert cluster_report.fit_alpha(times, "ring", 2 * BETA) != pytest.approx(ALPHA["ring"], rel=0.05)


@pytest.mark.fast
def test_the_section_reports_ratios_against_the_link_model(tmp_path: Path) -> None:
    root = make_cluster_results(tmp_path)
    notes: list[str] = []
    md, summary = cluster_report.section(load_results(root), root / "figures", notes)
    assert summary["rate_bits_per_s"] == 400e6 and summary["beta_s_per_byte"] == pytest.approx(BETA)
    ratios = summary["ps_over_ring"]
    for p in WORLDS:
        # the model's t_ps/t_ring is the busiest link's bytes: P sequential, P/2 overlapped, ~1 at k = P
        assert ratios["ps"][p]["model"] == pytest.approx(p)
        assert ratios["ps+overlap"][p]["model"] == pytest.approx(p / 2)
        assert ratios["ps:P"][p]["model"] == pytest.approx(1.0)
        ring = _time("ring", p, 16 << 20)
        assert ratios["ps"][p]["measured"] == pytest.approx(_time("ps", p, 16 << 20) / ring)
    assert summary["overlap_over_sequential"][8] == pytest.approx(
        _time("ps+overlap", 8, 16 << 20) / _time("ps", 8, 16 << 20)
    )
    # the ring's bus bandwidth against the link, as the section prints it
    bus = 2 * 7 / 8 * (16 << 20) / _time("ring", 8, 16 << 20) / 1e9
    assert summary["ring_busbw_fraction"][8] == pytest.approx(bus / 0.05)
    assert "1.60 of 2" in md and "| 381 |" in md  # cores busy and the link test, from the logs
    assert (root / "figures" / "cluster_time_vs_p.png").stat().st_size > 1000
    assert (root / "figures" / "cluster_training.png").stat().st_size > 1000


@pytest.mark.fast
def test_training_rows_carry_throughput_against_ddp_and_scaling_efficiency(tmp_path: Path) -> None:
    root = make_cluster_results(tmp_path)
    _, summary = cluster_report.section(load_results(root), root / "figures", [])
    rows = {(e["series"], e["world_size"]): e for e in summary["training"]}
    assert ("ddp", 1) not in rows  # P = 1 is the baseline, not a row
    assert rows[("ring", 4)]["vs_ddp"] == pytest.approx(140 / 150)
    # efficiency: throughput against one node's (100 img/s) times min(P, 2 cores)
    assert rows[("ps", 8)]["efficiency"] == pytest.approx((200 / 8) / (100 * 2))
    assert rows[("ring", 2)]["efficiency"] == pytest.approx(140 / 200)
    # comm per step modelled as one all-reduce of 4 bytes per parameter, with ps's fitted alpha
    alpha = summary["alpha_s"]["ps"]
    assert alpha > ALPHA["ps"]  # the fit absorbed the 16 MiB rows' extra 10 %
    assert rows[("ps", 4)]["comm_model_s"] == pytest.approx(predict_time("ps", 4, 4 * PARAMS, alpha, BETA))


def test_the_report_holds_the_section_only_for_a_cluster_sweep(tmp_path: Path) -> None:
    root = make_cluster_results(tmp_path / "cluster")
    text = build_report(root).read_text()
    assert "## On an emulated cluster" in text
    measured = _time("ps", 8, 16 << 20) / _time("ring", 8, 16 << 20)
    assert f"| ps | 8 | {measured:.2f} | 8.00 | {measured / 8 - 1:+.0%} |" in text
    analysis = json.loads((root / "analysis.json").read_text())
    assert analysis["cluster"]["link"] == LINK


def test_the_committed_cluster_run_still_renders_and_bears_out_the_server_model(tmp_path: Path) -> None:
    import shutil

    committed = Path(__file__).resolve().parents[1] / "analysis" / "emulated"
    root = tmp_path / "emulated"
    shutil.copytree(committed, root, ignore=shutil.ignore_patterns("*.pt", "figures", "REPORT.md"))
    text = build_report(root).read_text()
    assert "## On an emulated cluster" in text and "**500mbit**" in text
    ratios = json.loads((root / "analysis.json").read_text())["cluster"]["ps_over_ring"]
    for p in ("4", "8"):  # JSON keys; the sequential and overlapped server within 25 % of the link model
        for label in ("ps", "ps+overlap"):
            assert abs(ratios[label][p]["error"]) < 0.25, (label, p, ratios[label][p])
