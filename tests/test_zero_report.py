"""Specification of the report's section "Sharded optimizer (ZeRO)" (``analysis.zero_report``): built
from small metrics.json files as ``python -m analysis.sweep --zero`` leaves them, the numbers it shows
are the files' (state and peak per rank, their ratio to ``--zero 0``, steady step time and images/s,
the cluster goal), and a results folder without ``--zero`` runs has no such section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import report, tables, zero_report
from analysis.results import load_results

MIB = 1 << 20
#: The unsharded AdamW state of the fixtures' model (bytes): two moments of 1 M float32s, 8 MiB.
UNSHARDED = 8 * MIB
BATCH = 32  # per worker


def _zero_metrics(
    p: int, zero: int, step_s: float, state: list[int], peak: list[int], steps: int = 20
) -> dict:
    """A metrics.json as trainer/loop.py writes it, reduced to what the ZeRO section reads. The first 10
    steps are 5 times slower: the section must leave them out (the steady state, as Compression's)."""
    records = [{"step": s, "step_time_s": step_s * (5 if s <= 10 else 1)} for s in range(1, steps + 1)]
    return {
        "algo": "ring", "transport": "torch", "world_size": p, "model": "simplecnn", "optimizer": "adamw",
        "zero": zero, "global_batch_size": BATCH * p, "steps": steps, "throughput_img_s": 1.0,
        "optimizer_state_bytes": state[0], "peak_memory_bytes": peak[0],
        "optimizer_state_bytes_per_rank": state, "peak_memory_bytes_per_rank": peak,
        "final_train_loss": 2.25, "final_test_accuracy": 0.3, "history": [], "step_records": records,
        "config": {"zero": zero, "optimizer": "adamw", "compress_warmup": 10},
    }  # fmt: skip


def _write(root: Path, runs: dict[tuple[str | None, int, int], dict]) -> None:
    """Writes ``runs`` ((link, P, stage) -> metrics.json) and a sweep.json naming them as a sweep does."""
    manifest = []
    for (link, p, zero), m in runs.items():
        name = f"zero_z{zero}_{link or 'host'}_p{p}"
        (root / "zero" / name).mkdir(parents=True)
        (root / "zero" / name / "metrics.json").write_text(json.dumps(m))
        meta = {"zero": zero, "link": link, "world_size": p, "optimizer": "adamw"}
        manifest.append({"name": name, "kind": "zero", "output": f"zero/{name}/metrics.json", "status": "ok",
                         "meta": meta})  # fmt: skip
    (root / "sweep.json").write_text(json.dumps({"preset": "zero", "runs": manifest, "env": {}}))


def _fixture(root: Path) -> None:
    """P = 1, 2, 4 on one host and 4 nodes on 100 Mbit/s. Sharded state U/P on every rank, except at
    P = 4 --zero 2, whose rank 3 holds U/2 (misses the goal). Peaks: 1000 MiB unsharded, 40 MiB less per
    rank under --zero 1 and 60 MiB less under --zero 2; rank 0 of a sharded run 30 MiB over the others."""
    runs = {(None, 1, 0): _zero_metrics(1, 0, 0.10, [UNSHARDED], [1000 * MIB])}
    for p in (2, 4):
        for zero, step_s, saved in ((0, 0.20, 0), (1, 0.25, 40), (2, 0.16, 60)):
            state = [UNSHARDED if zero == 0 else UNSHARDED // p] * p
            if (p, zero) == (4, 2):
                state[3] = UNSHARDED // 2
            peak = [(1000 - saved + (30 if zero and r == 0 else 0)) * MIB for r in range(p)]
            runs[(None, p, zero)] = _zero_metrics(p, zero, step_s, state, peak)
    for zero, step_s in ((0, 0.50), (1, 0.50 / 0.95), (2, 0.50 / 0.85)):  # img/s 0.95 and 0.85 of ring's
        state = [UNSHARDED if zero == 0 else UNSHARDED // 4] * 4
        runs[("100mbit", 4, zero)] = _zero_metrics(4, zero, step_s, state, [900 * MIB] * 4)
    _write(root, runs)


@pytest.mark.fast
def test_zero_entries_carry_each_runs_memory_and_steady_speed_against_zero_0(tmp_path: Path) -> None:
    _fixture(tmp_path)
    entries = zero_report.zero_entries(load_results(tmp_path).runs, report._steady)
    assert [(e["link"], e["world_size"], e["zero"]) for e in entries] == [
        (None, 1, 0),
        *((None, p, z) for p in (2, 4) for z in (0, 1, 2)),
        *(("100mbit", 4, z) for z in (0, 1, 2)),
    ], "one host first, then by link, P and stage"
    at = {(e["link"], e["world_size"], e["zero"]): e for e in entries}
    z1 = at[(None, 4, 1)]
    assert z1["state_bytes"] == UNSHARDED // 4 and z1["state_fraction"] == pytest.approx(0.25)
    assert z1["state_ratio"] == pytest.approx(0.25) and z1["state_goal_met"] is True
    assert z1["peak_rank0_bytes"] == 990 * MIB and z1["peak_others_bytes"] == 960 * MIB
    assert z1["peak_mean_bytes"] == pytest.approx((990 + 3 * 960) / 4 * MIB)
    assert z1["peak_ratio"] == pytest.approx((990 + 3 * 960) / 4 / 1000)
    # steady: the last 10 steps alone (the slow first 10 left out), img/s = global batch / step time
    assert z1["step_time_s"] == pytest.approx(0.25) and z1["steady_steps"] == 10
    assert z1["img_s"] == pytest.approx(BATCH * 4 / 0.25) and z1["img_s_ratio"] == pytest.approx(0.20 / 0.25)
    bad = at[(None, 4, 2)]  # rank 3 holds half the state: the largest rank is the one the goal is about
    assert bad["state_bytes"] == UNSHARDED // 2 and bad["state_fraction"] == pytest.approx(0.5)
    assert bad["state_goal_met"] is False
    ref = at[(None, 1, 0)]
    assert ref["peak_others_bytes"] is None and ref["state_ratio"] == 1.0
    assert ref["state_goal_met"] is None and at[(None, 4, 0)]["state_goal_met"] is None, "unsharded: no goal"
    assert at[("100mbit", 4, 1)]["img_s_ratio"] == pytest.approx(0.95)
    assert at[("100mbit", 4, 2)]["img_s_ratio"] == pytest.approx(0.85)


@pytest.mark.fast
def test_report_has_the_zero_section_with_its_table_figure_and_cluster_goal(tmp_path: Path) -> None:
    _fixture(tmp_path)
    text = report.build_report(tmp_path).read_text()
    assert "## Sharded optimizer (ZeRO)" in text
    section = text.split("## Sharded optimizer (ZeRO)")[1].split("\n## ")[0]
    # P = 4, --zero 1: 2 MiB of 8, a quarter, goal met; peaks 990 / 960 / mean 967.5 MiB (0.968 of 1000);
    # 250 ms a step, 512 img/s, 0.80 of --zero 0's
    assert "| 4 | 1 | 2.0 | 0.250 | yes | 990.0 | 960.0 | 967.5 | 0.968 | 250 | 512.0 | 0.80 |" in section
    assert "| 4 | 2 | 4.0 | 0.500 | **no** |" in section, "rank 3's half of the state misses the goal"
    assert "| 1 | 0 | 8.0 | 1.000 | – | 1000.0 | – |" in section
    assert "| 4 | 0 | 8.0 | 1.000 | – | 1000.0 | 1000.0 | 1000.0 | 1.000 | 200 | 640.0 | 1.00 |" in section
    assert (tmp_path / "figures" / "zero_memory_vs_p.png").is_file()
    assert "(figures/zero_memory_vs_p.png)" in section
    # the cluster: ring 256 img/s; --zero 1 at 0.95 of it meets the 10 % goal, --zero 2 at 0.85 does not
    assert "| 100 Mbit/s | 4 | 0 (ring) | 500 | 256.0 |" in section
    assert "| 100 Mbit/s | 4 | 1 | 526 | 243.2 | 1.0 | 0.950 | met |" in section
    assert "| 100 Mbit/s | 4 | 2 | 588 | 217.6 | 1.0 | 0.850 | **not met** |" in section
    summary = json.loads((tmp_path / "analysis.json").read_text())
    assert [g["goal_met"] for g in summary["zero"]["cluster_goals"]] == [True, False]
    # the zero runs are not training runs of the speedup table (their kind is their own)
    assert tables.training_table(load_results(tmp_path).runs) == []


@pytest.mark.fast
def test_a_report_without_zero_runs_has_no_zero_section(tmp_path: Path) -> None:
    m = _zero_metrics(2, 0, 0.2, [UNSHARDED] * 2, [1000 * MIB] * 2)
    (tmp_path / "train" / "ring").mkdir(parents=True)
    (tmp_path / "train" / "ring" / "metrics.json").write_text(json.dumps(m))  # a train run, not a zero one
    assert zero_report.section(load_results(tmp_path), tmp_path / "figures", [], report._steady) == ("", {})
    text = report.build_report(tmp_path).read_text()
    assert "Sharded optimizer" not in text and "zero_memory_vs_p" not in text
    assert json.loads((tmp_path / "analysis.json").read_text())["zero"] == {}
