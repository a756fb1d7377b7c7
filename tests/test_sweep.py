"""Specification of ``analysis.sweep``: the plan holds what it should, and the runner records every
run and leaves no process behind, whether a run ends, fails, times out or the sweep is interrupted.

The runner's tests start real, tiny Python processes (no torch, no world): a child that sleeps
stands in for launch.py and its grandchild for the ranks launch.py spawns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from analysis import sweep

# --------------------------------------------------------------------------- the plan


@pytest.mark.fast
def test_quick_plan_covers_the_grid(tmp_path: Path) -> None:
    runs = sweep.build_plan("quick", tmp_path, python="python")
    names = [r.name for r in runs]
    assert len(names) == len(set(names)), "run names must be unique (they name files)"
    train = [r for r in runs if r.kind == "train"]
    # P=1: ddp, ring, ps on torch (zmq and shm carry nothing at P=1); P=2 and 4: all 7 algo/transport pairs.
    assert len(train) == 3 + 7 + 7
    assert {(r.meta["algo"], r.meta["transport"]) for r in train if r.meta["world_size"] == 1} == {
        ("ddp", "torch"),
        ("ring", "torch"),
        ("ps", "torch"),
    }
    for r in train:
        assert r.argv[:2] == ["python", "launch.py"]
        cmd = r.command
        assert f"--world-size {r.meta['world_size']}" in cmd
        assert "--model simplecnn --dataset synthetic" in cmd
        assert "--max-steps 20" in cmd and "--seed 0" in cmd
        assert f"--out {tmp_path / 'train' / r.name}" in cmd
        assert r.output == f"train/{r.name}/metrics.json"
    bench = [r for r in runs if r.kind == "bench"]
    assert {r.meta["world_size"] for r in bench} == {2, 4}
    for r in bench:
        assert r.argv[1:3] == ["-m", "ringcomm.bench"]
        assert "--sizes 64K,1M,4M" in r.command
        assert r.argv[r.argv.index("--algos") + 1].startswith("gloo,")  # the in-world reference
        assert r.argv[r.argv.index("--json") + 1] == str(tmp_path / r.output)
    assert any("--transport zmq" in r.command for r in bench)
    batch = [r for r in runs if r.kind == "batch"]
    assert [r.meta["batch_size"] for r in batch] == [32, 256, 2048]
    large = [r for r in runs if r.kind == "largebatch"]
    assert [r.meta["variant"] for r in large] == ["small", "large", "large_scaled"]
    # Linear scaling against the small-batch reference: 512/32 = 16 times the LR, with warmup.
    assert "--lr 0.8 " in large[2].command and "--warmup-epochs 1" in large[2].command
    assert "--lr 0.05 " in large[1].command and "--warmup-epochs" not in large[1].command
    trace = [r for r in runs if r.kind == "trace"]
    assert len(trace) == 1 and f"--trace {tmp_path / 'trace.json'}" in trace[0].command


@pytest.mark.fast
def test_full_plan_is_bigger_and_runs_full_epochs(tmp_path: Path) -> None:
    quick = sweep.build_plan("quick", tmp_path)
    full = sweep.build_plan("full", tmp_path)
    assert len(full) > len(quick)
    # launch.py caps at 150 steps unless told --max-steps 0 (no cap).
    assert all("--max-steps 0 " in r.command + " " for r in full if r.kind in ("train", "batch"))
    assert [r.meta["batch_size"] for r in full if r.kind == "batch"] == [32, 64, 128, 256, 512, 1024, 2048]
    assert {r.meta["world_size"] for r in full if r.kind == "train"} == {1, 2, 4, 8}


@pytest.fixture
def no_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dry run must not start processes: ``subprocess.Popen`` and ``run`` fail the test."""

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("dry run must not start processes")

    monkeypatch.setattr(subprocess, "Popen", boom)
    monkeypatch.setattr(subprocess, "run", boom)


def test_dry_run_prints_the_plan_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_processes: None
) -> None:
    assert sweep.main(["--quick", "--dry-run", "--out", str(tmp_path), "--only", "train,bench"]) == 0
    out = capsys.readouterr().out
    assert out.count("[train]") == 17 and out.count("[bench]") == 6  # 2 world sizes x 3 transports
    assert "launch.py --algo ring --transport zmq --world-size 4" in out
    assert not (tmp_path / "sweep.json").exists()


# --------------------------------------------------------------------------- the runner


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by whoever adopted it) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# A stand-in for launch.py: starts a grandchild (a "rank"), prints its pid, then hangs. On SIGTERM it
# says so and exits, as launch.py does, without waiting for its grandchild. The grandchild ignores
# SIGTERM when told to (a rank stuck in a collective), so only SIGKILL stops it.
HANGS_WITH_A_GRANDCHILD = """
    import signal, subprocess, sys, time
    stubborn = {stubborn!r}
    rank = ("import signal, time; "
            + ("signal.signal(signal.SIGTERM, signal.SIG_IGN); " if stubborn else "")
            + "print('rank up', flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", rank])
    print("grandchild", child.pid, flush=True)
    def on_term(signum, frame):
        print("launcher got SIGTERM", flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_term)
    time.sleep(120)
"""


def _grandchild_pid(log: Path) -> int:
    for line in log.read_text().splitlines():
        if line.startswith("grandchild "):
            return int(line.split()[1])
    raise AssertionError(f"the child never started its grandchild; log:\n{log.read_text()}")


def _kill(pid: int) -> None:
    """Clean up after a failing test: the grandchild must not outlive it."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stubborn", [False, True], ids=["rank-obeys-sigterm", "rank-ignores-sigterm"])
def test_a_timed_out_run_takes_its_whole_process_group_down(tmp_path: Path, stubborn: bool) -> None:
    run = sweep.Run("hang", "bench", _python(HANGS_WITH_A_GRANDCHILD.format(stubborn=stubborn)), "x.json", 3)
    t0 = time.monotonic()
    manifest = sweep.run_plan([run], tmp_path, "test", kill_grace_s=1.0)
    took = time.monotonic() - t0
    log = tmp_path / "logs" / "hang.log"
    pid = _grandchild_pid(log)
    try:
        assert manifest["runs"][0]["status"] == "timeout"
        assert _wait_gone(pid, 2.0), "the grandchild outlived its timed-out run"
        # SIGTERM came first, so the launcher could clean up; SIGKILL only after the grace period.
        assert "launcher got SIGTERM" in log.read_text()
        assert took < 3 + 1.0 + 5, f"run_plan took {took:.1f} s for a 3 s timeout and a 1 s grace"
    finally:
        _kill(pid)


@pytest.mark.fast
@pytest.mark.timeout(60)
def test_a_run_that_exits_leaves_nothing_running(tmp_path: Path) -> None:
    # A launcher that crashes without joining its rank: the run is over, the rank must not go on.
    crashes = """
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print("grandchild", child.pid, flush=True)
        sys.exit(1)
    """
    manifest = sweep.run_plan([sweep.Run("crash", "bench", _python(crashes), "x.json", 30)], tmp_path, "test")
    pid = _grandchild_pid(tmp_path / "logs" / "crash.log")
    try:
        assert manifest["runs"][0]["status"] == "failed" and manifest["runs"][0]["rc"] == 1
        assert _wait_gone(pid, 2.0), "the grandchild outlived a run that had ended"
    finally:
        _kill(pid)


@pytest.mark.fast
@pytest.mark.timeout(60)
def test_ctrl_c_of_the_sweep_stops_the_running_group_and_records_it(tmp_path: Path) -> None:
    runs = [
        sweep.Run("hang", "bench", _python(HANGS_WITH_A_GRANDCHILD.format(stubborn=False)), "x.json", 60),
        sweep.Run("never", "bench", _python("print('ran')"), "y.json", 60),
    ]
    log = tmp_path / "logs" / "hang.log"

    def ctrl_c_once_the_rank_is_up() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            # a line of its own: the log's first line, the command, holds the words too
            if log.exists() and "rank up" in log.read_text().splitlines():
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's Ctrl-C handler, as in a terminal: a pytest started in the background by a
    # non-interactive shell (CI scripts do) inherits SIGINT ignored, and this test then waited 60 s
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Thread(target=ctrl_c_once_the_rank_is_up, daemon=True)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep.run_plan(runs, tmp_path, "test", kill_grace_s=1.0)
    finally:
        signal.signal(signal.SIGINT, previous)
    timer.join()
    pid = _grandchild_pid(log)
    try:
        assert _wait_gone(pid, 2.0), "the grandchild outlived the interrupted sweep"
        saved = json.loads((tmp_path / "sweep.json").read_text())
        assert [(r["name"], r["status"]) for r in saved["runs"]] == [("hang", "interrupted")]
    finally:
        _kill(pid)


@pytest.mark.fast
@pytest.mark.timeout(60)
def test_run_plan_records_successes_failures_and_timeouts(tmp_path: Path) -> None:
    good = tmp_path / "bench" / "good.json"
    runs = [
        sweep.Run("good", "bench", _python(f"open({str(good)!r}, 'w').write('{{}}')"), "bench/good.json", 30),
        sweep.Run(
            "bad",
            "bench",
            _python("import sys; print('Traceback: something broke'); sys.exit(1)"),
            "b.json",
            30,
        ),
        sweep.Run("silent", "bench", _python("pass"), "bench/silent.json", 30),
        sweep.Run("slow", "bench", _python("import time; time.sleep(60)"), "bench/slow.json", 1),
    ]
    manifest = sweep.run_plan(runs, tmp_path, "quick", env={"OMP_NUM_THREADS": "1"}, kill_grace_s=1.0)
    status = {r["name"]: r["status"] for r in manifest["runs"]}
    assert status == {"good": "ok", "bad": "failed", "silent": "failed", "slow": "timeout"}
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["finished"] and saved["env"] == {"OMP_NUM_THREADS": "1"}
    assert saved["machine"]["cpus"] == os.cpu_count() and saved["machine"]["torch"]
    by_name = {r["name"]: r for r in saved["runs"]}
    assert by_name["bad"]["rc"] == 1 and "something broke" in by_name["bad"]["log_tail"]
    assert by_name["silent"]["rc"] == 0 and "no bench/silent.json" in by_name["silent"]["error"]
    assert by_name["slow"]["rc"] is None and by_name["slow"]["error"] == "stopped after 1 s"
    assert by_name["good"]["command"] == sweep.Run("g", "bench", runs[0].argv, "", 1).command
    # --resume keeps what exists
    again = sweep.run_plan(runs[:1], tmp_path, "quick", resume=True)
    assert again["runs"][0]["status"] == "kept"
    assert again["runs"][0]["log"] == "logs/good.log", "a kept run still points at the log that made it"


@pytest.mark.fast
def test_cluster_plan_runs_every_world_through_analysis_cluster(tmp_path: Path) -> None:
    runs = sweep.build_plan("cluster", tmp_path, python="python")
    assert {r.kind for r in runs} == {"bench", "train"}, "batch, large batch and trace are one-host studies"
    link = sweep.PRESETS["cluster"].cluster_link
    for r in runs:
        ws = r.meta["world_size"]
        assert r.argv[:8] == ["python", "-m", "analysis.cluster", "--nodes", str(ws), "--link", link, "--"]
        assert r.meta["cluster_link"] == link
        inner = r.argv[8:]
        if r.kind == "bench":
            assert inner[1:3] == ["-m", "ringcomm.bench"]
            assert "--world-size" not in inner, "on a cluster the nodes are the world"
            algos = inner[inner.index("--algos") + 1].split(",")
            assert "ps:P" not in algos
            if "ps" in algos:
                assert f"ps:{ws}" in algos and "ps+overlap" in algos
        else:
            assert inner[1] == "launch.py"
    assert {r.meta["world_size"] for r in runs if r.kind == "bench"} == {2, 4, 8}
    trains = {(r.meta["algo"], r.meta["world_size"]) for r in runs if r.kind == "train"}
    # one node alone, once (the compute baseline of scaling efficiency), then every algo at P = 2, 4, 8
    assert trains == {("ddp", 1)} | {(a, p) for a in ("ring", "ps", "ddp") for p in (2, 4, 8)}


@pytest.mark.fast
def test_hier_plan_runs_each_layout_in_both_placements_through_multi_rank_nodes(tmp_path: Path) -> None:
    runs = sweep.build_plan("hier", tmp_path, python="python")
    preset = sweep.PRESETS["hier"]
    assert {r.kind for r in runs} == {"bench"}
    want = {(n, g, pl) for n, g in preset.node_shapes for pl in ("contiguous", "interleaved")}
    got = {(r.meta["nodes"], r.meta["ranks_per_node"], r.meta["placement"]) for r in runs}
    assert got == want and len(runs) == len(want), "one world per layout and placement"
    assert any(g > 1 for _, g, _ in got) and len({n for n, _, _ in got}) > 1, "nodes x ranks per node must vary"
    for r in runs:
        n, g, placement = r.meta["nodes"], r.meta["ranks_per_node"], r.meta["placement"]
        assert r.meta["world_size"] == n * g
        assert r.argv[:11] == ["python", "-m", "analysis.cluster", "--nodes", str(n), "--ranks-per-node", str(g),
                               "--placement", placement, "--link", preset.cluster_link]  # fmt: skip
        inner = r.argv[r.argv.index("--") + 1 :]
        assert inner[1:3] == ["-m", "ringcomm.bench"] and "--world-size" not in inner
        assert inner[inner.index("--algos") + 1].split(",") == ["gloo", "ring", "hier"]
        assert "16M" in inner[inner.index("--sizes") + 1].split(","), "the issue's goal size"
        assert r.output == f"bench/bench_n{n}g{g}_{placement}_torch_0.json"
        # not "cluster_link": the report's one-rank-per-node section would read these worlds as P = n*g
        assert "cluster_link" not in r.meta and r.meta["link"] == preset.cluster_link


@pytest.mark.fast
def test_one_rank_per_node_cluster_commands_name_no_layout(tmp_path: Path) -> None:
    for r in sweep.build_plan("cluster", tmp_path, python="python"):
        assert "--ranks-per-node" not in r.argv and "--placement" not in r.argv, r.command


@pytest.mark.fast
@pytest.mark.parametrize("preset", sorted(sweep.PRESETS))
def test_every_bench_command_of_every_preset_passes_the_benchs_own_checks(preset: str, tmp_path: Path) -> None:
    from ringcomm.tools import bench

    (tmp_path / "bench").mkdir()
    for r in sweep.build_plan(preset, tmp_path, python="python"):
        if r.kind != "bench":
            continue
        at = r.argv.index("ringcomm.bench")
        argv = r.argv[at + 1 :]
        if "--world-size" not in argv and "--nodes" in r.argv:  # on the cluster: its ranks are the world
            per_node = int(r.argv[r.argv.index("--ranks-per-node") + 1]) if "--ranks-per-node" in r.argv else 1
            argv += ["--world-size", str(int(r.argv[r.argv.index("--nodes") + 1]) * per_node)]
        args, sizes, algos = bench._parse_args(argv)  # exits 2 on a refused flag
        assert sizes and algos, r.command


def _launch_part(r: sweep.Run) -> list[str]:
    """A link study's run (compression, ZeRO): its launch.py command, checked to run on this host
    (no link) or inside ``analysis.cluster`` on 4 nodes of its link, and kept out of the ring/ps
    study's cluster section."""
    link = r.meta["link"]
    assert "cluster_link" not in r.meta, "the cluster section of the report is the ring/ps study's"
    if link is None:  # the ranks are processes of this host
        assert r.argv[1] == "launch.py" and "analysis.cluster" not in r.argv
        return r.argv
    assert r.argv[:8] == ["python", "-m", "analysis.cluster", "--nodes", "4", "--link", link, "--"]
    return r.argv[8:]


@pytest.mark.fast
def test_compression_plan_runs_every_method_at_every_link(tmp_path: Path) -> None:
    import launch

    p = sweep.PRESETS["compression"]
    runs = sweep.build_plan("compression", tmp_path, python="python")
    assert {r.kind for r in runs} == {"compress"}, "the compression preset is the compression runs alone"
    grid = [(r.meta["compress"], r.meta["link"]) for r in runs]
    assert sorted(grid, key=str) == sorted(((m, lk) for lk in p.compress_links for m in p.compress_methods), key=str)
    assert None in p.compress_links and len(p.compress_links) >= 3, "one host, and at least two link rates"
    assert len({r.name for r in runs}) == len(runs) and len({r.output for r in runs}) == len(runs)
    for r in runs:
        args = launch.parse_args(_launch_part(r)[2:])  # exits 2 on a refused flag
        launch.check_args(args, 4)  # exits 1 on a refused combination
        assert (args.compress, args.world_size, args.algo) == (r.meta["compress"], 4, "ring")
        assert args.out == str(tmp_path / r.output).removesuffix("/metrics.json")
    for other in ("quick", "full", "cluster"):
        assert not [r for r in sweep.build_plan(other, tmp_path, python="python") if r.kind == "compress"]



@pytest.mark.fast
def test_zero_plan_runs_every_stage_on_one_host_then_ring_against_zero_on_the_cluster(tmp_path: Path) -> None:
    import launch

    p = sweep.PRESETS["zero"]
    runs = sweep.build_plan("zero", tmp_path, python="python")
    assert {r.kind for r in runs} == {"zero"}, "the zero preset is the zero runs alone"
    grid = [(r.meta["link"], r.meta["world_size"], r.meta["zero"]) for r in runs]
    # one host: P = 1 unsharded alone (a shard of one is the whole state), every stage at P = 2 and 4;
    # then every stage on 4 nodes of 100 Mbit/s, after the one-host runs (those need no root)
    assert grid == [(None, 1, 0), *((None, ws, z) for ws in (2, 4) for z in (0, 1, 2)),
                    *(("100mbit", 4, z) for z in (0, 1, 2))]  # fmt: skip
    assert len({r.name for r in runs}) == len(runs) and len({r.output for r in runs}) == len(runs)
    for r in runs:
        ws = r.meta["world_size"]
        inner = _launch_part(r)
        assert r.output == f"zero/{r.name}/metrics.json" and r.timeout_s == p.train_timeout_s
        args = launch.parse_args(inner[2:])  # exits 2 on a refused flag
        launch.check_args(args, ws)  # exits 1 on a refused combination
        assert (args.zero, args.optimizer, args.lr, args.world_size) == (r.meta["zero"], "adamw", 1e-3, ws)
        assert (args.algo, args.transport, args.model, args.max_steps) == ("ring", "torch", "simplecnn", 20)
        assert args.out == str(tmp_path / r.output).removesuffix("/metrics.json")
    for other in ("quick", "full", "cluster", "compression", "hier"):
        assert not [r for r in sweep.build_plan(other, tmp_path, python="python") if r.kind == "zero"]


@pytest.mark.fast
def test_the_zero_flag_picks_the_preset_and_model_overrides_its_model(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_processes: None
) -> None:
    assert sweep.main(["--zero", "--model", "resnet18", "--dry-run", "--out", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == len(sweep.build_plan("zero", tmp_path)) and all(line.startswith("[zero]") for line in lines)
    assert all("--model resnet18 " in line and "--optimizer adamw" in line for line in lines)
    assert sweep.PRESETS["zero"].model == "simplecnn", "--model changes this sweep's plan, not the preset"

def _compress_metrics(method: str, step_s: float, sent: float, warmup: int = 10, steps: int = 25) -> dict:
    """A metrics.json as launch.py writes it, reduced to what the report's Compression section reads."""
    records = [
        {"step": s, "step_time_s": step_s * (5 if s <= warmup else 1), "bytes": sent * (9 if s <= warmup else 1)}
        for s in range(1, steps + 1)
    ]  # the warm-up steps slower and bigger: the section must leave them out
    return {
        "algo": "ring", "transport": "torch", "world_size": 4, "model": "simplecnn", "global_batch_size": 128,
        "steps": steps, "throughput_img_s": 1.0, "final_train_loss": 1.5, "final_test_accuracy": 0.5,
        "history": [], "step_records": records, "config": {"compress": method, "compress_warmup": warmup},
    }  # fmt: skip


def test_report_compression_section_and_crossover(tmp_path: Path) -> None:
    from analysis import report
    from analysis.cluster_report import PAYLOAD, beta_for

    # one host: none 0.10 s and 6 MB a step, powersgd 0.12 s and 1 MB: it pays while 5 MB cost more
    # than 20 ms on the link, below B* = 8/PAYLOAD * 5e6 / 0.02 bit/s (2.09 Gbit/s)
    plan = {("none", None): (0.10, 6e6), ("powersgd:2", None): (0.12, 1e6), ("bf16", None): (0.09, 3e6)}
    for link, bits in (("100mbit", 1e8), ("1000mbit", 1e9)):
        for (method, _), (t, sent) in list(plan.items())[:3]:
            plan[(method, link)] = (t + sent * beta_for(bits), sent)
    runs = []
    for (method, link), (t, sent) in plan.items():
        name = f"compress_{method.replace(':', '')}_{link or 'host'}_p4"
        (tmp_path / "compress" / name).mkdir(parents=True)
        (tmp_path / "compress" / name / "metrics.json").write_text(json.dumps(_compress_metrics(method, t, sent)))
        runs.append({"name": name, "kind": "compress", "output": f"compress/{name}/metrics.json",
                     "meta": {"compress": method, "link": link, "world_size": 4}, "status": "ok"})  # fmt: skip
    (tmp_path / "sweep.json").write_text(json.dumps({"preset": "compression", "runs": runs, "env": {}}))
    res = report.load_results(tmp_path)
    entries = report.compression_entries(res.runs)
    assert [(e["link"], e["method"]) for e in entries][:3] == [("100mbit", "none"), ("100mbit", "bf16"),
                                                              ("100mbit", "powersgd:2")]  # fmt: skip
    host = {e["method"]: e for e in entries if e["link"] is None}
    assert host["powersgd:2"]["step_time_s"] == pytest.approx(0.12) and host["powersgd:2"]["bytes"] == 1e6
    model = report.compression_model(entries)
    expected = 8 / PAYLOAD * 5e6 / 0.02
    assert model["powersgd:2"]["crossover_bits"] == pytest.approx(expected)
    assert model["bf16"]["crossover_bits"] is None, "cheaper on one host and fewer bytes: pays at every rate"
    assert report._measured_crossover(entries, "powersgd:2").startswith("pays at every rate measured")
    path = report.build_report(tmp_path)
    text = path.read_text()
    assert "## Compression" in text and "compression_vs_link.png" in text
    assert (tmp_path / "figures" / "compression_vs_link.png").is_file()
    assert f"{expected / 1e6:.0f} Mbit/s" in text
