"""A new user's mistakes and rough edges (issue 21), each as that user would meet it.

Commands run as subprocesses with a timeout (``procs.run`` / ``procs.started``: a child's own
children are stopped too), on tiny synthetic runs to stay fast on a shared 2-core machine.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist
from procs import is_worker, started

from ringcomm.errors import CommError
from ringcomm.runtime.liveness import Liveness
from ringcomm.runtime.session import Session
from ringcomm.tools.spawn import loopback_store

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "16", "--eval-batches", "1"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def _live(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, which only waits to be reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _processes_with(marker: str) -> list[int]:
    """The live processes whose environment holds ``marker`` (wherever they were re-parented)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes() and _live(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _training(out: Path) -> bool:
    """Whether rank 0 has printed a step's progress line (the world is up and training)."""
    return re.search(r"^step +\d", out.read_text(), re.MULTILINE) is not None


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- item 1: no worker outlives its launcher; a rank taken for dead stops working ---------------


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the processes from /proc")
@pytest.mark.timeout(240)
def test_ranks_stop_within_seconds_when_the_launcher_is_killed(tmp_path: Path) -> None:
    """``kill -9`` of launch.py: its ranks were re-parented to init and trained on to --max-steps,
    printing TCPStore stack traces every second. Now each stops at once with one line."""
    marker = f"RINGCOMM_TEST_MARKER={uuid.uuid4().hex}"
    key, value = marker.split("=")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    cmd = [sys.executable, "launch.py", "--world-size", "2", *TINY, "--epochs", "1000", "--max-steps", "100000",
           "--log-every", "1", "--out", str(tmp_path / "run")]
    ranks: list[int] = []
    try:
        with open(out, "w") as fo, open(err, "w") as fe, started(
            cmd, cwd=ROOT, stdout=fo, stderr=fe, env=_env(**{key: value})
        ) as proc:
            end = time.monotonic() + 150
            while not _training(out) and time.monotonic() < end and proc.poll() is None:
                time.sleep(0.5)
            assert _training(out), f"training never started:\n{err.read_text()[-2000:]}"
            ranks = [pid for pid in _processes_with(marker) if pid != proc.pid]
            assert len(ranks) >= 2, ranks
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            end = time.monotonic() + 15
            while any(map(_live, ranks)) and time.monotonic() < end:
                time.sleep(0.2)
            left = [pid for pid in ranks if _live(pid)]
        assert left == [], f"processes {left} outlived their killed launcher"
        said = err.read_text()
        # Every rank is gone (above), each saying why, none with a traceback. Under load a rank used
        # to end without its line: the gone store (or a peer that had stopped) failed its collective
        # before its watch saw the launcher go, and it exited as any failed rank (spawn.stop_if_orphaned).
        assert said.count("is gone; stopping now") >= 2, said[-3000:]
        assert "Traceback (most recent call last)" not in said, said[-3000:]
        # a rank's heartbeat may meet the gone store once before the rank stops; not every second
        assert said.count("Exception raised from") <= 2, said[-3000:]
    finally:
        _kill_all(_processes_with(marker))


def test_a_rank_whose_heartbeat_gave_up_starts_no_more_collectives() -> None:
    """Its heartbeat failed for the liveness limit ("peers now take this rank for dead") and the
    rank trained on regardless. Now its next collective is refused with that reason."""
    base = dist.HashStore()

    class _BeatsFail:
        def add(self, key: str, amount: int) -> int:
            if amount == 1 and key.endswith("/liveness/0") and base.add("tries", 1) > 1:
                raise RuntimeError("Broken pipe (injected)")
            return base.add(key, amount)

    live = Liveness(_BeatsFail(), "w", 0, 2, interval_s=0.05, stale_s=0.3)
    try:
        session = types.SimpleNamespace(failed=None, calls=3, liveness=live, rank=0)
        session._refuse_if_failed = functools.partial(Session._refuse_if_failed, session)
        assert Session.begin_call(session) == 3  # beating: the call starts
        end = time.monotonic() + 10
        while live.error is None and time.monotonic() < end:
            time.sleep(0.05)
        assert live.error is not None, "the heartbeat never gave up"
        with pytest.raises(CommError, match=r"rank 0: collective 4 not started: rank 0's heartbeat has failed"):
            Session.begin_call(session)
    finally:
        live.stop()


# --- item 2: every output checked before any work; one artifact's failure loses no other -----------


@pytest.mark.parametrize(
    "cmd, flag",
    [
        (["launch.py", "--trace", "{f}/t.json"], "--trace"),
        (["launch.py", "--out", "{f}/run"], "--out"),
        (["launch.py", "--out", "{f}"], "--out"),
        (["-m", "ringcomm.bench", "--json", "{f}/b.json"], "--json"),
        (["-m", "analysis.sweep", "--out", "{f}/r"], "--out"),
        (["-m", "analysis.timeline", "t.json", "--out", "{f}/t.png"], "--out"),
    ],
)
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(
    tmp_path: Path, cmd: list[str], flag: str
) -> None:
    """``--trace /nope/t.json`` trained first, then failed with a 22-line traceback and no metrics.json."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = [sys.executable, *(a.format(f=blocker) for a in cmd)]
    proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{flag} {blocker}" in lines[0] and "is a file, not a folder" in lines[0], lines
    assert proc.stdout == ""  # nothing started


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """A one-process gloo group in this process (no spawn), destroyed afterwards."""
    store = loopback_store(1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_trace_that_cannot_be_written_loses_nothing_else(
    tmp_path: Path, world_of_one: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The trace's folder became unwritable during the run (here: a file where its folder should be):
    metrics.json and the checkpoint are written all the same, and the failure is one line."""
    import torch

    from trainer.loop import TrainConfig, train

    (tmp_path / "gone").write_text("a file where the trace's folder was")
    cfg = TrainConfig(
        algo="ring", dataset="synthetic", synthetic_size=64, batch_size=16, epochs=1, eval_batches=1,
        eval_batch_size=16, log_every=100, out=str(tmp_path / "run"), trace=str(tmp_path / "gone" / "t.json"),
    )  # fmt: skip
    metrics = train(cfg, 0, 1, torch.device("cpu"))
    assert metrics is not None and (tmp_path / "run" / "metrics.json").is_file()
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    said = capsys.readouterr().err
    assert f"--trace {cfg.trace}: not written (" in said and "metrics.json and the checkpoint are saved" in said


# --- item 3: every algorithm option and size checked against the world before it starts -----------

# torch made unimportable: a refusal that needs it (or that comes from a spawned rank) fails loudly
_NO_TORCH = "import sys; sys.modules['torch'] = None; from ringcomm.tools import bench; bench.main(sys.argv[1:])"


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--world-size", "2", "--algos", "gloo,ps:5"], "--algos ps:5: ps_shards=5 is out of range for a world of P=2"),
        (["--algos", "ps:5@shm"], "ps_shards=5 is out of range for a world of P=4"),  # the default world
        (["--world-size", "2", "--sizes", "3"], "'3' is 3 B, not a whole number of float32 elements (4 B each)"),
        (["--sizes", "64K,6", "--dtype", "float64"], "'6' is 6 B, not a whole number of float64 elements (8 B each)"),
    ],
)
def test_bench_refuses_options_and_sizes_the_world_cannot_take_before_importing_torch(
    argv: list[str], says: str
) -> None:
    """``--algos gloo,ps:5`` at P=2 started a world and printed ~40 lines; ``--sizes 3`` timed 4 bytes."""
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, *argv], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr
    assert proc.stdout == ""


def test_the_registry_and_the_command_lines_share_one_option_check() -> None:
    """``ringcomm.all_reduce``'s validation is the torch-free check the bench runs (one check, not two)."""
    from ringcomm.algorithms.checks import check_options
    from ringcomm.algorithms.registry import ALGOS

    assert ALGOS["ps"].validate is check_options and ALGOS["ring"].validate is check_options
    with pytest.raises(ValueError, match="ps_shards=3 is out of range for a world of P=2"):
        ALGOS["ps"].options({"ps_shards": 3}, world_size=2)


# --- item 4: Ctrl-C: one line, status 130, nothing left behind --------------------------------------


def _ignores_sigint(pid: int) -> bool:
    """Whether ``pid`` ignores SIGINT (its SigIgn mask in /proc; a gone process does not)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line for line in f if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))


def _is_rank(pid: int) -> bool:
    """Whether ``pid`` is a worker started by multiprocessing (not its resource tracker, not its fork
    server, not the command): spawned, or forked by the fork server (whose command line it keeps)."""
    return is_worker(pid)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the processes from /proc")
@pytest.mark.timeout(240)
def test_ctrl_c_in_the_bench_is_one_line_status_130_and_leaves_no_worker(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) during a bench printed
    tracebacks from every rank. Now: one line, status 130, every worker ended."""
    marker = f"RINGCOMM_TEST_MARKER={uuid.uuid4().hex}"
    key, value = marker.split("=")
    cmd = [sys.executable, "-m", "ringcomm.bench", "--world-size", "2", "--algos", "gloo,ring",
           "--sizes", "64M", "--reps", "1000", "--sample-s", "0"]  # fmt: skip
    workers: list[int] = []
    try:
        with started(cmd, cwd=ROOT, env=_env(**{key: value}), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True) as proc:  # fmt: skip
            end = time.monotonic() + 150
            while time.monotonic() < end and proc.poll() is None:  # both ranks are running their part
                workers = [pid for pid in _processes_with(marker) if _is_rank(pid) and _ignores_sigint(pid)]
                if len(workers) == 2:
                    break
                time.sleep(0.2)
            assert len(workers) == 2, f"the world never started: {proc.poll()}"
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert err.strip().splitlines() == ["python -m ringcomm.bench: interrupted (Ctrl-C); the workers are stopped"]
        assert [pid for pid in _processes_with(marker) if _is_rank(pid)] == []
    finally:
        _kill_all(_processes_with(marker))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the processes from /proc")
@pytest.mark.timeout(240)
def test_sigint_to_the_launcher_and_its_group_at_once_is_one_ctrl_c(tmp_path: Path) -> None:
    """``timeout -s INT launch.py ...`` signals the launcher and its group together: the launcher took
    the two for a double Ctrl-C and stopped without a checkpoint. Now they count once: it is saved."""
    marker = f"RINGCOMM_TEST_MARKER={uuid.uuid4().hex}"
    key, value = marker.split("=")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "launch.py", "--world-size", "2", *TINY, "--epochs", "1000", "--max-steps", "100000",
           "--log-every", "1", "--out", str(run_dir)]  # fmt: skip
    try:
        with open(out, "w") as fo, open(err, "w") as fe, started(
            cmd, cwd=ROOT, stdout=fo, stderr=fe, env=_env(**{key: value})
        ) as proc:
            end = time.monotonic() + 150
            while not _training(out) and time.monotonic() < end and proc.poll() is None:
                time.sleep(0.5)
            assert _training(out), f"training never started:\n{err.read_text()[-2000:]}"
            os.kill(proc.pid, signal.SIGINT)  # as timeout(1) does: the command, then its whole group
            time.sleep(0.3)  # apart enough for the launcher to take each (two pending SIGINTs merge into one)
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
        said = err.read_text()
        assert proc.returncode == 130, said[-3000:]
        assert "stopped now" not in said and said.count("launch.py: interrupted") == 1, said[-3000:]
        assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "metrics.json").is_file()
        assert "stopped early (Ctrl-C)" in out.read_text()
    finally:
        _kill_all(_processes_with(marker))


# --- item 5: benchtable --auto compares within one transport and world -----------------------------


def test_benchtable_auto_compares_auto_with_the_best_of_its_own_transport(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file with ring@shm and auto over torch: the torch row's "best alone" was ring@shm's time
    (labelled ring) and it reported auto / best 5.48. Now each transport is compared with itself."""
    from analysis import benchtable

    def row(algo: str, transport: str, us: float, **extra: object) -> dict:
        return {"size_bytes": 65536, "algo": algo, "transport": transport, "world_size": 4, "time_us": us, **extra}

    doc = {"world_size": 4, "rows": [
        row("gloo", "torch", 6000.0), row("auto", "torch", 5480.0, choice="ring", predicted_us=5000.0),
        row("ring", "torch", 5000.0), row("ring@shm", "shm", 1000.0), row("auto@shm", "shm", 1100.0, choice="ring"),
    ]}  # fmt: skip
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(doc))
    assert benchtable.main([str(path), "--auto"]) == 0
    out = capsys.readouterr().out
    assert "| 4 | torch | 64K | ring | 5 | 5.48 | ring 5 | 1.10 | 1.00 | 1.09× |" in out, out
    assert "| 4 | shm | 64K | ring | – | 1.1 | ring 1 | 1.10 | 1.00 | 5.45× |" in out, out


# --- item 7: one vocabulary across the commands ------------------------------------------------------


def test_launch_and_bench_speak_one_vocabulary() -> None:
    """Defaults, names and label forms that differed between launch.py and the bench."""
    import launch
    from ringcomm.tools import bench, cli

    # one default world; --time-limit is the whole run's limit in both (the bench's --timeout still works)
    assert launch.parse_args([]).world_size == cli.DEFAULT_WORLD_SIZE == bench.DEFAULT_WORLD_SIZE
    assert bench._parse_args(["--time-limit", "60"])[0].timeout == bench._parse_args(["--timeout", "60"])[0].timeout == 60
    # launch.py takes the bench's labels for an algorithm with options
    args = launch.parse_args(["--algo", "ps:2", "--comm-option", "ps_rank=1"])
    assert (args.algo, launch.comm_options(args)) == ("ps", {"ps_shards": 2, "ps_rank": 1})
    args = launch.parse_args(["--algo", "ps+overlap"])
    assert (args.algo, launch.comm_options(args)) == ("ps", {"ps_overlap": True})


def test_bench_help_lists_the_overlapped_parameter_server(capsys: pytest.CaptureFixture[str]) -> None:
    from ringcomm.tools import bench

    with pytest.raises(SystemExit):
        bench._parse_args(["--help"])
    assert "ps+overlap" in capsys.readouterr().out


def test_the_report_prints_accuracy_as_a_percentage_like_launch() -> None:
    from analysis import report

    table = [{"series": "ring", "world_size": 2, "global_batch_size": 64, "steps": 10, "throughput_img_s": 100.0,
              "speedup": 1.0, "efficiency": 1.0, "comm_share": 0.1, "final_train_loss": 1.0,
              "final_test_accuracy": 0.3693, "baseline": "ring"}]  # fmt: skip
    assert "36.93%" in report._training_section(table, {})


# --- item 8: messages ---------------------------------------------------------------------------------


class _LocalCluster:
    """``analysis.cluster.run``'s view of a cluster, with every node a plain local process (no namespaces)."""

    nodes, rate, delay = 2, "1gbit", None

    def free_port(self) -> int:
        return 0

    def address(self, i: int) -> str:
        return "127.0.0.1"

    def exec(self, i: int, argv: list[str]) -> list[str]:
        return argv


def test_cluster_names_the_failing_node_and_its_line_stands_alone(capfd: pytest.CaptureFixture[str]) -> None:
    """``-- false`` exited 1 naming no node (every node had exited before the first look); the
    "stopping the others" line ran into a node's unfinished line."""
    from analysis import cluster

    assert cluster.run(_LocalCluster(), ["false"]) == 1
    err = capfd.readouterr().err
    # both nodes fail at once; whether node 1 has exited by the first look depends on the machine's load
    assert "analysis.cluster: node 0 exited with status 1; " in err, err
    assert "node 1 exited with status 1" in err or "stopping the others" in err, err
    code = "import os, sys, time; sys.stderr.write('half a line'); sys.exit(3) if os.environ['RANK'] == '1' else time.sleep(60)"
    assert cluster.run(_LocalCluster(), [sys.executable, "-c", code], grace=0.5) == 3
    err = capfd.readouterr().err
    assert "[node 1] half a line\n" in err and "\nanalysis.cluster: node 1 exited with status 3; stopping" in err, err


def test_report_on_a_bench_file_and_benchtable_on_a_missing_file_say_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from analysis import benchtable, report

    bench_file = tmp_path / "b.json"
    bench_file.write_text(json.dumps({"world_size": 2, "rows": []}))
    with pytest.raises(SystemExit):
        report.main([str(bench_file)])
    assert f"run python -m analysis.benchtable {bench_file}" in capsys.readouterr().err
    assert benchtable.main([str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err.strip() == f"analysis.benchtable: {tmp_path / 'nope.json'}: no such file"


def test_a_bench_far_from_autos_prediction_says_the_host_looks_untuned() -> None:
    from ringcomm.tools import bench

    row = {"algo": "auto", "choice": "ring", "time_us": 3500.0, "predicted_us": 100.0}
    assert "looks untuned; run python -m ringcomm.bench --tune" in (bench.untuned_note([row]) or "")
    assert bench.untuned_note([{**row, "time_us": 150.0}]) is None
