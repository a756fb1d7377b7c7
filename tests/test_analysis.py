"""Specification of ``analysis``: the fits recover what they are fed, and the report and every
figure are built from a small fixture of result files. No process is spawned (the sweep, which
starts processes, is specified in ``test_sweep.py``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from analysis import fit, plots, report, results, tables, timeline
from ringcomm import cost
from ringcomm.tools.bench import AlgoSpec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KB = 1 << 10
MB = 1 << 20

# Link parameters the fixture's timings are generated from (seconds, seconds per byte).
LINKS = {
    "gloo": (30e-6, 0.8e-9),
    "ring": (50e-6, 1.0e-9),
    "naive": (50e-6, 1.0e-9),
    "ps": (50e-6, 1.0e-9),
    "ps:2": (50e-6, 1.0e-9),
    "ring@zmq": (120e-6, 2.0e-9),
    "ps@zmq": (120e-6, 2.0e-9),
}


def assert_png(path: Path | None) -> None:
    assert path is not None and path.exists(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"


# --------------------------------------------------------------------------- alpha-beta fit


@pytest.mark.fast
@pytest.mark.parametrize("label", ["ring", "gloo", "naive", "ps", "ps:2", "ring@zmq"])
def test_fit_recovers_alpha_beta_exactly_from_model_timings(label: str) -> None:
    alpha, beta = 42e-6, 0.7e-9
    ps_, ms, ts = [], [], []
    for p in (2, 4, 8):
        for m in (4 * KB, 64 * KB, MB, 16 * MB):
            ps_.append(p)
            ms.append(m)
            ts.append(fit.predict_time(label, p, m, alpha, beta))
    f = fit.fit_algo(label, ps_, ms, ts)
    assert f is not None
    # Noise-free data on the model: only floating point separates the fit from the truth.
    assert f.alpha_s == pytest.approx(alpha, rel=1e-9)
    assert f.beta_s_per_byte == pytest.approx(beta, rel=1e-9)
    assert f.max_rel_err < 1e-9
    assert f.bandwidth_gbs == pytest.approx(1 / beta / 1e9)
    assert not f.constrained


@pytest.mark.fast
def test_fit_recovers_alpha_beta_under_noise() -> None:
    # 2% multiplicative noise, 3 world sizes x 8 sizes x 4 repeats = 96 points. Each coefficient is
    # pinned by the third or so of points its term dominates (alpha: <= 64K, beta: >= 4M), so its
    # standard error is about 2% / sqrt(30) ~ 0.4%; 3% is over 6 standard errors.
    rng = np.random.default_rng(0)
    alpha, beta = 80e-6, 1.5e-9
    ps_, ms, ts = [], [], []
    for p in (2, 4, 8):
        for m in [4 * KB * 4**i for i in range(8)]:
            for _ in range(4):
                ps_.append(p)
                ms.append(m)
                ts.append(cost.COSTS["ring"].time(p, m, alpha, beta) * (1 + 0.02 * rng.standard_normal()))
    f = fit.fit_algo("ring", ps_, ms, ts)
    assert f is not None
    assert f.alpha_s == pytest.approx(alpha, rel=0.03)
    assert f.beta_s_per_byte == pytest.approx(beta, rel=0.03)
    # The residuals are the noise: median |N(0, 2%)| is 0.67 * 2% = 1.35%.
    assert 0.005 < f.median_rel_err < 0.03


@pytest.mark.fast
def test_fit_pins_a_negative_coefficient_to_zero() -> None:
    # Pure bandwidth with noise that makes the free fit's alpha negative: alpha is pinned at 0.
    ms = [MB, 2 * MB, 4 * MB, 8 * MB]
    ts = [cost.COSTS["ring"].time(2, m, 0.0, 1e-9) * k for m, k in zip(ms, (0.95, 1.0, 1.01, 1.015))]
    free_alpha, _ = cost.fit_alpha_beta([2] * 4, [m for m in ms], ts)
    assert free_alpha < 0
    f = fit.fit_algo("ring", [2] * 4, ms, ts)
    assert f is not None and f.constrained
    assert f.alpha_s == 0.0
    assert f.beta_s_per_byte == pytest.approx(1e-9, rel=0.03)


@pytest.mark.fast
def test_fit_skips_points_the_model_rejects() -> None:
    # ps:4 cannot run at P=2; those rows are left out rather than failing the whole fit.
    ps_ = [2, 2, 4, 4, 4]
    ms = [KB, MB, KB, MB, 4 * MB]
    ts = [1e-3, 2e-3] + [fit.predict_time("ps:4", 4, m, 30e-6, 1e-9) for m in ms[2:]]
    f = fit.fit_algo("ps:4", ps_, ms, ts)
    assert f is not None and f.points == 3 and f.alpha_s == pytest.approx(30e-6)
    assert math.isnan(f.predict(2, MB))


@pytest.mark.fast
def test_fit_needs_two_distinguishable_points() -> None:
    assert fit.fit_algo("ring", [2], [MB], [1e-3]) is None
    assert fit.fit_algo("ring", [1, 1, 1], [KB, MB, 4 * MB], [1e-3, 2e-3, 3e-3]) is None  # P=1: no comm
    assert fit.fit_algo("ring", [2, 2], [MB, MB], [1e-3, 1.1e-3]) is None  # alpha and beta confounded


@pytest.mark.fast
def test_comm_counts_follow_the_cost_model() -> None:
    p, m = 4, 1000.0
    # ring and gloo: 2(P-1) = 6 messages, 2(P-1)/P * M = 1500 bytes; naive: rank 0 takes 3000 in, then out.
    assert fit.comm_counts("ring", p, m) == (6.0, pytest.approx(1500.0))
    assert (
        fit.comm_counts("gloo", p, m) == fit.comm_counts("ring", p, m) == fit.comm_counts("ring_simple", p, m)
    )
    assert fit.comm_counts("naive", p, m) == (6.0, pytest.approx(6000.0))
    # The parameter server: two rounds (push, pull), each server hearing from its P-1 peers in turn
    # (2(P-1) = 6 messages); k = 1 loads the server's link like naive's root, k shards divide it
    # (down to the idle worker's M), and k = P moves the ring's bytes.
    assert fit.comm_counts("ps", p, m) == (6.0, pytest.approx(6000.0))
    assert fit.comm_counts("ps:2@zmq", p, m) == (6.0, pytest.approx(3000.0))
    assert fit.comm_counts("ps:3", p, m) == (6.0, pytest.approx(2000.0))  # the idle worker's 2M binds
    assert fit.comm_counts(f"ps:{p}", p, m) == (6.0, pytest.approx(1500.0))
    with pytest.raises(ValueError, match="out of range for P=2"):
        fit.comm_counts("ps:4", 2, m)  # more shards than ranks
    assert fit.comm_counts("ring", 1, m) == (0.0, 0.0)
    with pytest.raises(ValueError, match="no cost model.*ring, naive, ps"):
        fit.model_for("allgather")


@pytest.mark.fast
def test_a_new_cost_entry_is_fitted_with_no_change_to_the_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Recursive doubling, as someone might add it: log2(P) rounds, each moving all of M.
    rd = cost.AlgoCost(
        name="rd",
        title="recursive doubling",
        messages=lambda p, k: math.log2(p),
        nbytes=lambda p, m, k: math.log2(p) * m,
        messages_text="log₂P",
        bytes_text="log₂P·M",
        busiest="every link alike",
    )
    monkeypatch.setitem(cost.COSTS, "rd", rd)
    assert fit.comm_counts("rd@zmq", 8, 1000.0) == (3.0, 3000.0)
    ps_, ms = [2, 4, 8, 8], [KB, MB, KB, MB]
    f = fit.fit_algo("rd", ps_, ms, [fit.predict_time("rd", p, m, 20e-6, 2e-9) for p, m in zip(ps_, ms)])
    assert f is not None and f.alpha_s == pytest.approx(20e-6) and f.beta_s_per_byte == pytest.approx(2e-9)


@pytest.mark.fast
def test_cost_name_maps_a_label_to_the_model_it_is_fitted_with() -> None:
    assert [fit.cost_name(x) for x in ("gloo", "ring_simple", "ring@zmq", "ps:2@zmq", "naive")] == [
        "ring",
        "ring",
        "ring",
        "ps",
        "naive",
    ]


@pytest.mark.fast
def test_fit_rows_groups_by_label_and_skips_world_size_one() -> None:
    rows = []
    for label, (a, b) in LINKS.items():
        for p in (1, 2, 4):
            for m in (64 * KB, MB, 4 * MB):
                t = fit.predict_time(label, p, m, a, b) if p > 1 else 5e-6
                rows.append({"algo": label, "world_size": p, "size_bytes": m, "time_us": t * 1e6})
    rows.append({"algo": "mystery", "world_size": 2, "size_bytes": MB, "time_us": 1.0})
    fits = fit.fit_rows(rows)
    assert set(fits) == set(LINKS)
    for label, (a, b) in LINKS.items():
        assert fits[label].alpha_s == pytest.approx(a, rel=1e-6)
        assert fits[label].beta_s_per_byte == pytest.approx(b, rel=1e-6)
        assert fits[label].points == 6
    assert fits["ring@zmq"].transport == "zmq"


# --------------------------------------------------------------------------- Amdahl


@pytest.mark.fast
def test_amdahl_fit_recovers_f_exactly_and_with_noise() -> None:
    ps_ = [1, 2, 4, 8, 16]
    exact = fit.fit_amdahl(ps_, [fit.amdahl_speedup(p, 0.9) for p in ps_])
    assert exact is not None and exact.f == pytest.approx(0.9, abs=1e-12)
    assert exact.rmse < 1e-9 and exact.points == 4 and exact.max_speedup == pytest.approx(10.0)
    # 1% noise on S moves 1/S - 1 by about 1% of 1/S, i.e. well under 0.01 in f for these P.
    rng = np.random.default_rng(1)
    noisy = fit.fit_amdahl(
        ps_, [fit.amdahl_speedup(p, 0.9) * (1 + 0.01 * rng.standard_normal()) for p in ps_]
    )
    assert noisy is not None and noisy.f == pytest.approx(0.9, abs=0.02)


@pytest.mark.fast
def test_amdahl_fit_reports_slowdown_as_negative_f() -> None:
    a = fit.fit_amdahl([1, 2, 4], [1.0, 0.8, 0.6])
    assert a is not None and a.f < 0
    assert fit.fit_amdahl([1], [1.0]) is None


@pytest.mark.fast
def test_amdahl_superlinear_is_flagged_in_the_report() -> None:
    a = fit.fit_amdahl([1, 2], [1.0, 4.4])  # as measured once on the shared 2-core machine
    assert a is not None and a.f > 1
    text = report._training_section([], {})  # no runs: says so
    assert "No training runs" in text
    rows = [{"series": "ring", "world_size": 2, "speedup": 4.4}]
    table = [
        {
            **r,
            "global_batch_size": 64,
            "steps": 20,
            "throughput_img_s": 166.7,
            "efficiency": 2.2,
            "comm_share": 0.19,
            "final_train_loss": 3.96,
            "final_test_accuracy": 0.4665,
            "baseline": "ring",
        }
        for r in rows
    ]
    assert "superlinear" in report._training_section(table, {"ring": a})


@pytest.mark.fast
def test_karp_flatt_is_the_serial_fraction_under_amdahl() -> None:
    for p in (2, 4, 8):
        assert fit.karp_flatt(p, fit.amdahl_speedup(p, 0.75)) == pytest.approx(0.25)
    assert math.isnan(fit.karp_flatt(1, 1.0))


# --------------------------------------------------------------------------- report fixture


def _bench_file(root: Path, name: str, p: int, labels: list[str]) -> None:
    rows = []
    for m in (64 * KB, MB, 4 * MB):
        for label in ["gloo", *labels]:
            a, b = LINKS[label]
            t = fit.predict_time(label, p, m, a, b)
            rows.append(
                {
                    "size_bytes": m,
                    "count": m // 4,
                    "dtype": "float32",
                    "algo": label,
                    "transport": AlgoSpec.parse(label).transport,
                    "world_size": p,
                    "time_us": t * 1e6,
                    "algbw_gbs": cost.algbw(m, t),
                    "busbw_gbs": cost.busbw(p, m, t),
                    "wrong": 0,
                    "samples_us": [t * 1e6] * 3,
                }
            )
    machine = {
        "cpus": 2,
        "platform": "Linux-test",
        "processor": "x86_64",
        "python": "3.11",
        "torch": "2.x-test",
    }
    path = root / "bench" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine, "world_size": p, "rows": rows}))


def _metrics(
    algo: str,
    transport: str,
    p: int,
    thr: float,
    acc: float,
    batch: int = 32,
    capped: bool = False,
    **extra: object,
) -> dict:
    """A run's metrics.json as trainer/loop.py writes it (the keys the report reads), two epochs."""
    steps = 20
    step_time = batch * p / thr
    comm = 0.0 if p == 1 else 0.004 * (p - 1)
    hook = algo != "ddp"  # ddp's all-reduce is built in: no hook, so no comm time or bytes
    classes = [f"c{i}" for i in range(10)]
    m = {
        "algo": algo,
        "transport": transport if hook else None,
        "backend": "gloo",
        "world_size": p,
        "model": "simplecnn",
        "dataset": "synthetic",
        "steps": steps,
        "batch_size_per_worker": batch,
        "global_batch_size": batch * p,
        "peak_lr": 0.05,
        "train_time_s": step_time * steps,
        "throughput_img_s": thr,
        "comm_time_s": comm * steps if hook else None,
        "final_train_loss": 0.4321,
        "final_test_accuracy": acc,
        "history": [
            {
                "epoch": e,
                "step": 10 * (e + 1),
                "complete": not capped,
                "train_loss": loss,
                "train_accuracy": train_acc,
                "test_loss": 1.0,
                "test_accuracy": test_acc,
                "epoch_time_s": epoch_time,
            }
            for e, (loss, train_acc, test_acc, epoch_time) in enumerate(
                ((1.2, 0.55, acc - 0.1, 2.0), (0.4321, 0.8, acc, 1.9))
            )
        ],
        "classes": classes,
        "per_class_accuracy": dict(zip(classes, [0.9, 0.8, 0.7, 0.95, 0.6, 0.85, 0.75, 0.65, 0.9, 0.8])),
        "confusion_matrix": [[50 if i == j else (i + j) % 3 for j in range(10)] for i in range(10)],
        "step_records": [
            {"step": s, "step_time_s": step_time}
            | ({"comm_time_s": comm, "bytes": 0 if p == 1 else 250_000, "buckets": 1} if hook else {})
            for s in range(steps)
        ],
        "config": {
            "algo": algo,
            "batch_size": batch,
            "lr": 0.05,
            "synthetic_size": 10_000,
            "scale_lr": False,
        },
    }
    m.update(extra)
    return m


THROUGHPUT = {("ddp", "torch"): (100.0, 170.0, 260.0), ("ring", "torch"): (100.0, 180.0, 300.0)}
THROUGHPUT[("ring", "zmq")] = (100.0, 150.0, 200.0)
THROUGHPUT[("ps", "torch")] = (100.0, 140.0, 160.0)


def make_results(root: Path) -> Path:
    """A results folder as analysis.sweep would leave it, with plausible, hand-checkable numbers."""
    manifest_runs = []
    for p in (2, 4):
        _bench_file(root, f"bench_p{p}_torch_0", p, ["ring", "naive"])
        _bench_file(root, f"bench_p{p}_torch_1", p, ["ps", "ps:2"])
        _bench_file(root, f"bench_p{p}_zmq_2", p, ["ring@zmq", "ps@zmq"])
        for i, t in enumerate(("torch", "torch", "zmq")):
            manifest_runs.append(
                {
                    "name": f"bench_p{p}_{t}_{i}",
                    "kind": "bench",
                    "output": f"bench/bench_p{p}_{t}_{i}.json",
                    "command": f"python -m ringcomm.bench --world-size {p}",
                    "status": "ok",
                    "seconds": 12.5,
                    "meta": {},
                }
            )

    def put(kind: str, name: str, m: dict, meta: dict) -> None:
        path = root / kind / name / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(m))
        manifest_runs.append(
            {
                "name": name,
                "kind": kind,
                "output": f"{kind}/{name}/metrics.json",
                "command": f"python launch.py --out {kind}/{name}",
                "status": "ok",
                "seconds": 30.0,
                "meta": meta,
            }
        )

    for (algo, transport), thr in THROUGHPUT.items():
        for p, t in zip((1, 2, 4), thr):
            if p == 1 and transport == "zmq":
                continue
            m = _metrics(algo, transport, p, t, 0.8765)
            put(
                "train",
                f"train_{algo}_{transport}_p{p}",
                m,
                {"algo": algo, "transport": transport, "world_size": p},
            )
    for bs, thr in ((32, 150.0), (256, 400.0), (2048, 640.0)):
        m = _metrics("ring", "torch", 2, thr, 0.5, batch=bs, capped=True)
        put("batch", f"batch_b{bs}_p2", m, {"world_size": 2})
    for variant, bs, acc, lr, extra in (
        ("small", 32, 0.9123, 0.05, {}),
        ("large", 512, 0.6234, 0.05, {}),
        ("large_scaled", 512, 0.8845, 0.8, {"scale_lr": True, "warmup_epochs": 1}),
    ):
        meta = {
            "variant": variant,
            "batch_size": bs,
            "world_size": 2,
            "lr": lr,
            "scale_lr": bool(extra),
            **extra,
        }
        put(
            "largebatch",
            f"largebatch_{variant}_b{bs}_p2",
            _metrics("ring", "torch", 2, 300.0, acc, batch=bs, peak_lr=lr),
            meta,
        )
    manifest_runs.append(
        {
            "name": "train_ps_zmq_p4",
            "kind": "train",
            "output": "train/train_ps_zmq_p4/metrics.json",
            "command": "python launch.py --algo ps --transport zmq --world-size 4",
            "status": "timeout",
            "error": "stopped after 240 s",
            "seconds": 240.0,
            "log": "logs/train_ps_zmq_p4.log",
            "meta": {},
        }
    )
    manifest = {
        "preset": "quick",
        "started": "2026-11-21T22:30:00",
        "finished": "2026-11-21T22:34:00",
        "seconds": 240.0,
        "machine": {
            "cpus": 2,
            "platform": "Linux-test",
            "processor": "x86_64",
            "python": "3.11",
            "torch": "2.x-test",
        },
        "env": {"OMP_NUM_THREADS": "1"},
        "cwd": "/repo",
        "runs": manifest_runs,
    }
    (root / "sweep.json").write_text(json.dumps(manifest))
    events = []
    for rank in (0, 1):
        t = 0.0
        for _step in range(3):
            events.append(
                {
                    "ph": "X",
                    "name": "forward_backward",
                    "cat": "compute",
                    "ts": t,
                    "dur": 8000,
                    "pid": rank,
                    "tid": 0,
                }
            )
            events.append(
                {"ph": "B", "name": "all_reduce", "cat": "comm", "ts": t + 8000, "pid": rank, "tid": 0}
            )
            events.append({"ph": "E", "ts": t + 11000 + 500 * rank, "pid": rank, "tid": 0})
            t += 12000
    (root / "trace.json").write_text(json.dumps({"traceEvents": events}))
    return root


def test_report_builds_every_figure_and_carries_the_numbers(tmp_path: Path) -> None:
    root = make_results(tmp_path / "results")
    path = report.build_report(root)
    text = path.read_text()
    figures = sorted((root / "figures").glob("*.png"))
    assert [f.name for f in figures] == sorted(
        [
            "busbw_vs_size.png",
            "time_vs_world_size.png",
            "speedup_efficiency.png",
            "comm_vs_compute.png",
            "bandwidth_utilisation.png",
            "training_curves.png",
            "per_class_accuracy.png",
            "confusion_matrix.png",
            "batch_size_sweep.png",
            "large_batch.png",
            "timeline.png",
        ]
    )
    for f in figures:
        assert_png(f)
        assert f"](figures/{f.name})" in text, f"{f.name} not linked from REPORT.md"

    # Honest framing and machine.
    assert "measurements on this machine (2-core CPU" in text and "not projections" in text
    assert "CPU cores: **2**" in text and "torch 2.x-test" in text and "OMP_NUM_THREADS=1" in text
    # Bench table: ring at P=4, 4M: 2*3*50us + 1.5*4M*1ns = 300 + 6291.456 us; gloo is faster.
    t_ring = cost.COSTS["ring"].time(4, 4 * MB, *LINKS["ring"]) * 1e6
    t_gloo = cost.COSTS["ring"].time(4, 4 * MB, *LINKS["gloo"]) * 1e6
    assert f"{t_ring:.1f}" == "6591.5" and "| 4 | 4M (4194304) | ring | torch | 6591.5 |" in text
    assert f"| {t_gloo / t_ring:.2f}x |" in text and "| 1.00x |" in text
    # Fits recover the generating links: ring 50 us and 1 ns/B -> 1.000 GB/s; zmq 120 us, 0.500 GB/s.
    assert "| ring | torch | 50.0 | 1.0000 | 1.000 | 6 | 0.0% | 0.0% |" in text
    assert "| ring@zmq | zmq | 120.0 | 2.0000 | 0.500 | 6 |" in text
    assert "| gloo | torch | 30.0 | 0.8000 | 1.250 | 18 |" in text
    # ps vs ring, model and measurement agree when the data is the model: P=4, 4M, ps k=1.
    r_ps = fit.predict_time("ps", 4, 4 * MB, *LINKS["ps"]) / cost.COSTS["ring"].time(4, 4 * MB, *LINKS["ring"])
    assert f"| ps | 4 | 4M | {r_ps:.2f} | {r_ps:.2f} |" in text
    # Training: ring at P=4 runs 300 img/s vs 100 at P=1: speedup 3.00, efficiency 0.75.
    assert "| ring | 4 | 128 | 20 | 300.0 | 3.00 | 0.75 |" in text
    # ring@zmq has no P=1 run of its own (nothing travels at P=1): its baseline is ring's, and says so.
    assert "| ring@zmq | 2 | 64 | 20 | 150.0 | 1.50 | 0.75 | 0.9% | 0.4321 | 87.65% | ring |" in text
    assert "87.65%" in text
    # Amdahl f for ring from S(2)=1.8, S(4)=3.0 (least squares by hand):
    x = np.array([-0.5, -0.75])
    y = np.array([1 / 1.8 - 1, 1 / 3.0 - 1])
    assert f"| ring | {float(x @ y / (x @ x)):.3f} |" in text
    # Utilisation: 250000 B sent in 12 ms at P=4 is 0.021 GB/s; one bucket's tensor is
    # 250000 / 1.5 B, nearest bench size 64K, where ring's busbw is in the bench table.
    ring_64k = cost.busbw(4, 64 * KB, cost.COSTS["ring"].time(4, 64 * KB, *LINKS["ring"]))
    assert f"| ring P=4 | 0.021 | ring | 64K | {ring_64k:.3f} | {0.250 / 12 / ring_64k:.0%} |" in text
    # Batch sweep, capped runs: synthetic's 10,000 images / 640 img/s = 15.62 s per epoch.
    assert "| 2048 | 4096 | 20 | 1.95 | 15.62 | 640.0 |" in text
    # Large batch accuracies and the scaled run flagged.
    assert "91.23%" in text and "62.34%" in text
    assert (
        "| large batch, scaled LR + warmup (b=512/worker) | 1024 | 0.8 | yes | 1 | 0.4321 | 88.45% |" in text
    )
    # Commands and the failure.
    assert "python launch.py --algo ps --transport zmq --world-size 4" in text
    assert "`train_ps_zmq_p4`: timeout: stopped after 240 s" in text
    summary = json.loads((root / "analysis.json").read_text())
    assert summary["fits"]["ring"]["alpha_s"] == pytest.approx(50e-6)


@pytest.mark.fast
def test_results_accessors_read_what_trainer_loop_writes() -> None:
    m = _metrics("ring", "zmq", 2, 150.0, 0.7, batch=64, capped=True)
    assert results.series(m) == "ring@zmq" and results.series(_metrics("ddp", "torch", 2, 1.0, 0.5)) == "ddp"
    assert results.per_worker_batch(m) == 64
    assert results.per_worker_batch({**m, "_meta": {"batch_size": 16}}) == 16  # the sweep's word first
    assert results.per_worker_batch({"global_batch_size": 96, "world_size": 3}) == 32
    assert results.train_size(m) == 10_000  # synthetic: the run's config says
    assert results.train_size({**m, "config": {"synthetic_size": 2_500}}) == 2_500
    assert (
        results.train_size({"dataset": "cifar10"}) == 50_000 and results.train_size({"dataset": "x"}) is None
    )
    classes, acc = results.per_class({**m, "classes": ["c3", "c0", "gone"]})
    assert classes == ["c3", "c0"] and acc == [0.95, 0.9]
    assert results.per_class({"per_class_accuracy": {}}) is None


@pytest.mark.fast
def test_step_stats_skip_the_first_step_and_ddp_has_no_comm() -> None:
    m = _metrics("ring", "torch", 2, 160.0, 0.7)
    m["step_records"][0]["step_time_s"] = 99.0  # set-up and warm-up: left out
    st = tables.step_stats(m)
    assert st["step_time_s"] == pytest.approx(64 / 160.0) and st["comm_time_s"] == pytest.approx(0.004)
    assert st["bytes"] == 250_000 and st["source"] == "step_records"
    ddp = tables.step_stats(_metrics("ddp", "torch", 2, 160.0, 0.7))
    assert ddp["comm_time_s"] is None and ddp["step_time_s"] == pytest.approx(0.4)
    totals = tables.step_stats({**m, "step_records": []})
    assert totals["source"] == "totals" and totals["step_time_s"] == pytest.approx(m["train_time_s"] / 20)


@pytest.mark.fast
def test_load_results_finds_each_kind_and_skips_what_does_not_parse(tmp_path: Path) -> None:
    _bench_file(tmp_path, "b", 2, ["ring"])
    (tmp_path / "batch" / "run").mkdir(parents=True)
    (tmp_path / "batch" / "run" / "metrics.json").write_text(
        json.dumps(_metrics("ring", "torch", 2, 1.0, 0.5))
    )
    (tmp_path / "train" / "dead").mkdir(parents=True)
    (tmp_path / "train" / "dead" / "metrics.json").write_text('{"algo": "ring", "wor')  # died mid-write
    res = results.load_results(tmp_path)
    assert len(res.bench_rows) == 6 and {r["_source"] for r in res.bench_rows} == {"bench/b.json"}
    assert res.machine["cpus"] == 2 and res.manifest is None and res.trace is None
    assert [(m["_name"], m["_kind"]) for m in res.runs] == [("run", "batch")]


def test_the_committed_quick_results_still_render(tmp_path: Path) -> None:
    # analysis/quick holds a real sweep's files, written by trainer/loop.py and ringcomm.bench: the
    # schema the report reads must be theirs. Rendered in a copy, so the committed REPORT.md is kept.
    quick = Path(__file__).resolve().parents[1] / "analysis" / "quick"
    for src in quick.rglob("*.json"):
        if src.name != "analysis.json":
            dst = tmp_path / src.relative_to(quick)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    text = report.build_report(tmp_path).read_text()
    assert "## Notes" not in text, "a figure was skipped on the committed results"
    for heading in ("## Collective benchmark", "## Alpha-beta fits", "## Training", "## Batch-size sweep"):
        assert heading in text
    assert "| ring | torch |" in text  # a fit
    assert "| ring | 2 | 64 | 20 |" in text  # the training table: ring at P=2, 32 per worker, 20 steps
    assert "| step_records |" in text  # per-step comm times were read
    assert "| large batch, scaled LR + warmup (b=512/worker) | 1024 | 0.8 | yes | 1 |" in text


@pytest.mark.fast
def test_report_cli_on_sparse_results_skips_gracefully(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "sparse"
    _bench_file(root, "only", 2, ["ring"])  # one world, no training, no trace, no sweep.json
    assert report.main([str(root)]) == 0
    text = (root / "REPORT.md").read_text()
    assert "## Notes" in text and "timeline.png: skipped" in text
    assert "_No training runs" in text and "not recorded" in text
    assert_png(root / "figures" / "busbw_vs_size.png")
    assert not (root / "figures" / "speedup_efficiency.png").exists()
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing")])


def test_a_report_of_training_runs_alone_names_the_machine_they_ran_on(tmp_path: Path) -> None:
    # The learner's path reports two launch.py runs (no sweep.json, no bench file): the machine
    # comes from their metrics.json, not a row of "?"
    machine = {"cpus": 2, "platform": "Linux-6-x86_64", "processor": "x86_64", "python": "3.11.7", "torch": "2.15.0"}
    for algo in ("ring", "ps"):
        path = tmp_path / "train" / algo / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(_metrics(algo, "torch", 4, 300.0, 0.8, machine=machine)))
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "this machine (2-core CPU;" in text and "- CPU cores: **2** (x86_64)" in text, text[:600]
    assert "- Python 3.11.7, torch 2.15.0" in text and "sweep preset" not in text
    assert "?" not in text.split("## Collective benchmark")[0]


@pytest.mark.fast
def test_plots_skip_missing_data_with_a_note(tmp_path: Path) -> None:
    notes: list[str] = []
    calls = [
        plots.plot_busbw([], {}, tmp_path / "a.png", notes),
        plots.plot_time_vs_world([], {}, tmp_path / "b.png", notes=notes),
        plots.plot_speedup([], {}, tmp_path / "c.png", notes),
        plots.plot_comm_compute([], tmp_path / "d.png", notes),
        plots.plot_bandwidth_utilisation([], tmp_path / "e.png", notes),
        plots.plot_training_curves([("x", [])], tmp_path / "f.png", notes),
        plots.plot_per_class(None, tmp_path / "g.png", notes=notes),
        plots.plot_confusion(None, tmp_path / "h.png", notes=notes),
        plots.plot_batch_sweep([], tmp_path / "i.png", notes),
        plots.plot_large_batch([], tmp_path / "j.png", notes),
        timeline.render_trace([], tmp_path / "k.png", notes=notes),
    ]
    assert calls == [None] * len(calls)
    assert len(notes) == len(calls) and not list(tmp_path.glob("*.png"))


@pytest.mark.fast
def test_timeline_pairs_begin_end_and_draws_a_lane_per_rank(tmp_path: Path) -> None:
    events = [
        {"ph": "B", "name": "all_reduce", "cat": "comm", "ts": 100, "pid": 1, "tid": 0},
        {"ph": "X", "name": "fwd", "cat": "compute", "ts": 0, "dur": 100, "pid": 0, "tid": 0},
        {"ph": "E", "ts": 250, "pid": 1, "tid": 0},
        {"ph": "E", "ts": 300, "pid": 0, "tid": 0},  # unmatched: dropped
        {"ph": "M", "name": "process_name", "pid": 0},  # metadata: ignored
    ]
    spans = timeline.trace_spans(events)
    assert spans == [(0, 0, "fwd", "compute", 0.0, 100.0), (1, 0, "all_reduce", "comm", 100.0, 150.0)]
    assert_png(timeline.render_trace({"traceEvents": events}, tmp_path / "t.png"))
    notes: list[str] = []
    (tmp_path / "bad.json").write_text("not json")
    assert timeline.render_trace(tmp_path / "bad.json", tmp_path / "u.png", notes=notes) is None
    assert "unreadable" in notes[0]


@pytest.mark.fast
def test_human_bytes() -> None:
    assert [plots.human_bytes(n) for n in (512, 64 * KB, MB, 1536 * KB, 1 << 30)] == [
        "512",
        "64K",
        "1M",
        "1.5M",
        "1G",
    ]


# --- the command lines (issue 15) ---------------------------------------------------------------


def test_report_on_a_folder_with_nothing_to_report_fails_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """It exited 0 and wrote a REPORT.md full of "?"."""
    with pytest.raises(SystemExit) as raised:
        report.main([str(tmp_path)])
    assert raised.value.code != 0
    assert "nothing to report" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fast
def test_reliability_help_is_help_and_a_bad_file_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from analysis import reliability

    with pytest.raises(SystemExit) as raised:
        reliability.main(["--help"])  # was: FileNotFoundError for '--help'
    assert raised.value.code == 0 and "FAULTS.jsonl" in capsys.readouterr().out
    assert reliability.main([str(tmp_path / "missing.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err == f"python -m analysis.reliability: {tmp_path / 'missing.jsonl'}: No such file or directory\n"
    (tmp_path / "bad.jsonl").write_text('{"fault": "kill"}\n')
    assert reliability.main([str(tmp_path / "bad.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 1 is not a record of tests/test_faults.py" in err


def test_timeline_command_renders_a_trace_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    events = [
        {"ph": "X", "name": "fwd", "cat": "compute", "ts": 0, "dur": 100, "pid": 0, "tid": 0},
        {"ph": "X", "name": "all_reduce", "cat": "comm", "ts": 100, "dur": 50, "pid": 1, "tid": 0},
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    assert timeline.main([str(trace)]) == 0  # --out defaults to the trace's name with .png
    assert_png(tmp_path / "trace.png")
    assert timeline.main([str(trace), "--out", str(tmp_path / "t.png")]) == 0
    assert_png(tmp_path / "t.png")
    capsys.readouterr()
    (tmp_path / "empty.json").write_text("[]")
    assert timeline.main([str(tmp_path / "empty.json")]) == 1
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "empty.png").exists()


@pytest.mark.fast
def test_benchtable_plots_a_single_bench_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from analysis import benchtable

    _bench_file(tmp_path, "one", 2, ["ring"])
    png = tmp_path / "busbw.png"
    assert benchtable.main([str(tmp_path / "bench" / "one.json"), "--plot", str(png)]) == 0
    assert_png(png)
    assert f"wrote {png}" in capsys.readouterr().out
    (tmp_path / "broken.json").write_text("{}")
    assert benchtable.main([str(tmp_path / "broken.json"), "--plot", str(tmp_path / "no.png")]) == 2
    assert "not a ringcomm.bench --json file" in capsys.readouterr().err
    assert not (tmp_path / "no.png").exists()


@pytest.mark.fast
def test_benchtable_auto_compares_the_pick_with_the_best_single_algorithm(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from analysis import benchtable

    def row(algo: str, us: float, **extra: object) -> dict:
        return {"size_bytes": 65536, "algo": algo, "transport": "shm", "world_size": 4, "time_us": us, **extra}

    doc = {"world_size": 4, "rows": [
        row("gloo", 6000.0), row("auto@shm", 1100.0, choice="naive", predicted_us=900.0),
        row("ring@shm", 1900.0), row("naive@shm", 1000.0), row("ps@shm", 1050.0),
    ]}  # fmt: skip
    path = tmp_path / "auto.json"
    path.write_text(json.dumps(doc))
    assert benchtable.main([str(path), "--auto"]) == 0
    assert "| 4 | shm | 64K | naive | 0.9 | 1.1 | naive 1 | 1.10 | 1.00 | 5.45× |" in capsys.readouterr().out
    doc["rows"] = [r for r in doc["rows"] if not r["algo"].startswith("auto")]
    path.write_text(json.dumps(doc))
    assert benchtable.main([str(path), "--auto"]) == 2
    assert "no file has an auto row" in capsys.readouterr().err


@pytest.mark.fast
@pytest.mark.parametrize("module", ["benchtable", "cluster", "reliability", "report", "sweep", "timeline"])
def test_every_command_helps_without_markup_and_refuses_in_one_line(
    module: str, capsys: pytest.CaptureFixture
) -> None:
    """--help shows each default once, never None/False or ``markup``; a mistake is one line, status 2."""
    import importlib

    main = importlib.import_module(f"analysis.{module}").main
    with pytest.raises(SystemExit) as raised:
        main(["--help"])
    assert raised.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "``" not in text, text
    assert "(default: None)" not in text and "(default: False)" not in text, text
    assert not re.search(r"\(default[^)]*\) \(default", text), text  # its help's default, then argparse's
    with pytest.raises(SystemExit) as raised:
        main(["--no-such-option", "x"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"python -m analysis.{module}: "), err


@pytest.mark.fast
def test_report_refuses_an_empty_folder_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as raised:
        report.main([str(tmp_path)])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"python -m analysis.report: {tmp_path}: nothing to report"), err


# --------------------------------------------------------------------------- two-level all-reduce

# β of a 500 Mbit/s link as the report takes it: 8 bits per byte, 1448 data bytes per 1514-byte frame.
BETA_500 = 8 / (500e6 * 1448 / 1514)


def _layout_file(root: Path, name: str, nodes: int, g: int, placement: str, slow: float = 1.0) -> None:
    """A bench file as ``analysis.cluster --ranks-per-node g --placement ...`` leaves it, 16 MiB, timed
    as the bytes through each node's link say (no alpha, no shared memory), times ``slow``."""
    size = 16 * MB
    link_bytes = {
        "hier": 2 * (nodes - 1) / nodes * size,
        "ring": cost.flat_ring_link_bytes(nodes, g, size, placement),
        "gloo": cost.flat_ring_link_bytes(nodes, g, size, placement),
    }
    rows = []
    for algo, b in link_bytes.items():
        t = b * BETA_500 * slow
        rows.append({"size_bytes": size, "count": size // 4, "dtype": "float32", "algo": algo, "transport": "torch",
                     "world_size": nodes * g, "time_us": t * 1e6, "algbw_gbs": cost.algbw(size, t),
                     "busbw_gbs": cost.busbw(nodes * g, size, t), "wrong": 0, "samples_us": [t * 1e6]})  # fmt: skip
    machine = {"cpus": 2, "python": "3.11", "torch": "2.x-test",
               "cluster": f"{nodes} nodes x {g} ranks ({placement}), 500mbit links"}  # fmt: skip
    path = root / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine, "world_size": nodes * g, "rows": rows}))


def test_two_level_section_sets_each_layout_beside_the_model_and_keeps_it_out_of_the_fits(tmp_path: Path) -> None:
    root = tmp_path / "hier"
    # two runs of 2 x 2 contiguous, one of them 20 % slow; one of 2 x 2 interleaved and of 4 x 2 contiguous
    _layout_file(root, "2x2-contiguous-1", 2, 2, "contiguous")
    _layout_file(root, "2x2-contiguous-2", 2, 2, "contiguous", slow=1.2)
    _layout_file(root, "2x2-interleaved-1", 2, 2, "interleaved")
    _layout_file(root, "4x2-contiguous-1", 4, 2, "contiguous")
    _bench_file(root, "bench_p2_torch_0", 2, ["ring"])  # one host, P = 2: the fits' alone
    text = report.build_report(root).read_text()
    section = text.split("## Two-level all-reduce")[1].split("\n## ")[0]

    # the measured ratios are the link's bytes: 1.5 M and 3 M against hier's M at 2 x 2, 1.75 M and
    # 1.5 M at 4 x 2; the slow run's ratio is the same (it is taken within each world)
    assert "| 2 × 2 | contiguous | 16M | ring |" in section and "| 2 × 2 | interleaved | 16M | gloo |" in section
    summary = json.loads((root / "analysis.json").read_text())
    entries = {(e["nodes"], e["ranks_per_node"], e["placement"], e["algo"]): e for e in summary["two_level"]}
    assert entries[(2, 2, "contiguous", "ring")]["vs_hier"] == pytest.approx(1.5)
    assert entries[(2, 2, "interleaved", "ring")]["vs_hier"] == pytest.approx(3.0)
    assert entries[(4, 2, "contiguous", "gloo")]["vs_hier"] == pytest.approx(1.75 / 1.5)
    # two runs: the median of 1.0 and 1.2 times the link time, and the range
    hier22 = entries[(2, 2, "contiguous", "hier")]
    t_link = 16 * MB * BETA_500
    assert hier22["runs"] == 2 and hier22["time_s"] == pytest.approx(1.1 * t_link)
    assert (hier22["min_s"], hier22["max_s"]) == (pytest.approx(t_link), pytest.approx(1.2 * t_link))
    row = f"| 2 × 2 | contiguous | 16M | hier | {1.1 * t_link * 1e3:.0f} ({t_link * 1e3:.0f}–{1.2 * t_link * 1e3:.0f}) | 2 |"
    assert row in section, section
    # the model: the link's bytes, plus alpha and shared memory, which add a little (under 15 % here)
    for (n, g, placement, algo), e in entries.items():
        on_link = (2 * (n - 1) / n if algo == "hier" else cost.flat_ring_link_bytes(n, g, 1, placement)) * 16 * MB
        assert on_link * BETA_500 <= e["model_s"] < 1.15 * on_link * BETA_500, (n, g, placement, algo)
    assert entries[(2, 2, "interleaved", "ring")]["model_vs_hier"] == pytest.approx(3.0, rel=0.05)
    assert "cost.HIER" in section and "two-level (hier), n nodes × g ranks" in section

    # those worlds stay out of the one-host tables and fits: ring is fitted on P = 2 alone
    bench = text.split("## Collective benchmark")[1].split("\n## ")[0]
    assert "| 4 |" not in bench and "| 8 |" not in bench and "| 2 | 16M" not in bench
    assert summary["fits"]["ring"]["points"] == 3 and summary["fits"]["ring"]["alpha_s"] == pytest.approx(50e-6)
    assert_png(root / "figures" / "two_level.png")
    assert "](figures/two_level.png)" in text


def test_a_report_without_multi_rank_nodes_has_no_two_level_section(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    _bench_file(root, "bench_p2_torch_0", 2, ["ring"])
    _layout_file(root, "4x1", 4, 1, "contiguous")  # a cluster of one rank per node: the ordinary tables'
    text = report.build_report(root).read_text()
    assert "## Two-level all-reduce" not in text and not (root / "figures" / "two_level.png").exists()
    assert "| 4 | 16M (16777216) | ring |" in text
    assert json.loads((root / "analysis.json").read_text())["two_level"] == []
