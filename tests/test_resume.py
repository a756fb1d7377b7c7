"""Crash and resume: kill -9 a worker mid-epoch, then ``launch.py --resume`` finishes the run.

One test, three runs of the same tiny configuration (2 ranks, ring, synthetic
data, 2 epochs of 32 steps, constant learning rate, seed 0):

1. uninterrupted, for reference;
2. interrupted: once the checkpoint of epoch 0 exists, SIGKILL one worker
   mid-epoch 1. The launcher must exit 1 within seconds, name the dead rank,
   and leave no process behind. Meanwhile the test loads ``checkpoint.pt``
   every time it changes: a reader never sees a half-written file;
3. ``--resume``: it must start at the epoch-0 checkpoint (step 64, not 0) and
   end where the uninterrupted run ended.

Tolerance: the checkpoint holds the model, optimizer, scheduler, every rank's
RNG state and the position in the epoch, and the ring sums in a fixed order,
so the resumed run replays the very steps of the reference run. We therefore
expect equal numbers and allow only float noise: final train loss within
1e-4 relative, test accuracy within one test image (1/204).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from procs import run, started, workers_of  # a child's own children stopped too
from test_launch import _processes_with  # the /proc scan for leftover workers

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 2048 // 2 // 16  # synthetic train split / ranks / batch
ARGS = [
    "launch.py",
    "--world-size",
    "2",
    "--algo",
    "ring",
    "--dataset",
    "synthetic",
    "--synthetic-size",
    "2048",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--max-steps",
    "0",
    "--schedule",
    "constant",
    "--eval-batches",
    "0",
    "--eval-batch-size",
    "256",
    "--log-every",
    "4",
    "--seed",
    "0",
]


def _env(marker: str) -> dict[str, str]:
    return {**os.environ, "RINGCOMM_TEST_MARKER": marker, "OMP_NUM_THREADS": "1"}


#: The kill -9 test's runs: half the data (2 epochs of 32 steps), each of its three runs half as long.
KILL_SYNTHETIC = 1024
KILL_STEPS_PER_EPOCH = KILL_SYNTHETIC // 2 // 16
KILL_TEST_IMAGES = 204  # the synthetic set's test split at this size (a fifth, rounded down)
KILL_ARGS = [a if a != "2048" else str(KILL_SYNTHETIC) for a in ARGS]


def _run(out: Path, *extra: str, marker: str) -> subprocess.CompletedProcess:
    return run(
        [sys.executable, *KILL_ARGS, "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(marker),
    )


def _last_step(lines: list[str]) -> int:
    """The step of the last progress line (``step N/TOTAL ...``) among ``lines``; 0 before the first."""
    steps = [int(line.split()[1].split("/")[0]) for line in list(lines) if line.startswith("step ")]
    return max(steps, default=0)


def _final(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    reference = _run(tmp_path / "ref", marker=marker)
    assert reference.returncode == 0, reference.stderr
    ref = _final(tmp_path / "ref")

    out = tmp_path / "crash"
    ckpt = out / "checkpoint.pt"
    loads, last_mtime = 0, 0
    with started(
        [sys.executable, *KILL_ARGS, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(marker),
    ) as launcher:
        # both pipes drained as the run goes (the progress lines say where it is; a full pipe would stall it)
        lines: dict[str, list[str]] = {"out": [], "err": []}
        readers = [
            threading.Thread(target=lambda f=f, k=k: lines[k].extend(f), daemon=True)
            for k, f in (("out", launcher.stdout), ("err", launcher.stderr))
        ]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + 180
        # Until a progress line of epoch 1 is printed (the run is then past the epoch-0 checkpoint,
        # whatever the machine's load), load every version of the checkpoint we can see: a
        # half-written file would fail to load.
        while _last_step(lines["out"]) <= KILL_STEPS_PER_EPOCH:
            assert launcher.poll() is None and time.monotonic() < deadline, "no progress line of epoch 1"
            if ckpt.exists() and ckpt.stat().st_mtime_ns != last_mtime:
                last_mtime = ckpt.stat().st_mtime_ns
                state = torch.load(ckpt, weights_only=False)
                assert (state["step"], state["batch_in_epoch"]) == (KILL_STEPS_PER_EPOCH, 0)
                loads += 1
            time.sleep(0.02)
        if loads == 0:  # written and passed between two looks: the version now on disk, once
            assert torch.load(ckpt, weights_only=False)["step"] == KILL_STEPS_PER_EPOCH
            loads += 1
        victims = workers_of(launcher.pid)
        assert len(victims) == 2, victims
        killed_at = time.monotonic()
        os.kill(victims[-1], signal.SIGKILL)  # the last started: rank 1
        launcher.wait(timeout=60)
        stopped_s = time.monotonic() - killed_at
        for reader in readers:
            reader.join(timeout=10)
        stdout, stderr = "".join(lines["out"]), "".join(lines["err"])
    assert launcher.returncode == 1, stderr
    assert "died with exit code -9" in stderr and "stopped the other workers" in stderr, stderr
    assert stopped_s < 15, f"the launcher took {stopped_s:.1f} s to stop the world"
    time.sleep(0.5)
    assert _processes_with(marker) == [], "orphaned worker processes"
    steps_done = [
        int(line.split()[1].split("/")[0]) for line in stdout.splitlines() if line.startswith("step ")
    ]
    assert KILL_STEPS_PER_EPOCH < max(steps_done) < 2 * KILL_STEPS_PER_EPOCH, "the kill was not in epoch 1"
    assert loads >= 1
    torch.load(ckpt, weights_only=False)  # still whole after the kill

    resumed = _run(out, "--resume", marker=marker)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resume: {ckpt} at step {KILL_STEPS_PER_EPOCH}, epoch 1, batch 0" in resumed.stdout
    got = _final(out)
    assert got["steps"] == ref["steps"] == 2 * KILL_STEPS_PER_EPOCH
    assert abs(got["final_train_loss"] - ref["final_train_loss"]) <= 1e-4 * abs(ref["final_train_loss"])
    assert abs(got["final_test_accuracy"] - ref["final_test_accuracy"]) <= 1 / KILL_TEST_IMAGES + 1e-9
    assert _processes_with(marker) == []


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["ctrl-c", "time-limit"])
def test_stopping_early_writes_a_checkpoint_to_resume_from(how: str, tmp_path: Path) -> None:
    """Issue 15: Ctrl-C (or --time-limit) before an epoch ended left nothing to resume from.

    The launcher (alone: the test is not a terminal) gets SIGINT once the workers
    are training, or --time-limit 4 stops them; either way they stop at a step,
    write the checkpoint there, and the launcher exits 130 or 124, saying how to go on.
    """
    marker = uuid.uuid4().hex
    out = tmp_path / "run"
    extra = ["--time-limit", "4"] if how == "time-limit" else []
    with started(
        [sys.executable, *ARGS, "--out", str(out), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(marker),
    ) as launcher:
        if how == "ctrl-c":
            assert launcher.stdout is not None
            for line in launcher.stdout:  # the first progress line: the workers are in the loop
                if line.startswith("step "):
                    break
            launcher.send_signal(signal.SIGINT)
        stdout, stderr = launcher.communicate(timeout=180)
    assert launcher.returncode == (130 if how == "ctrl-c" else 124), stdout + stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    m = _final(out)
    assert m["stopped"] == ("interrupted" if how == "ctrl-c" else "time-limit")
    assert 0 < ckpt["step"] == m["steps"] < 2 * STEPS_PER_EPOCH
    assert ckpt["batch_in_epoch"] > 0 or ckpt["step"] == STEPS_PER_EPOCH  # mid-epoch, as a rule
    said = "stopped early (Ctrl-C):" if how == "ctrl-c" else "stopped early (--time-limit):"
    assert said in stdout and f"to continue: the same command with --resume {out / 'checkpoint.pt'}" in stdout
    assert "Traceback" not in stderr, stderr
    time.sleep(0.5)
    assert _processes_with(marker) == [], "orphaned worker processes"
