"""launch.py end to end: 2 spawned ranks on synthetic data, metrics.json, resume, a dying worker.

Most tests run ``python launch.py`` as a subprocess with a timeout, as a user
would. The runs are tiny (a 256-image synthetic set, 16 images per worker, so
8 steps per epoch) to stay fast on a shared 2-core machine. One test calls
``trainer.loop.train`` in a one-process world, in this process, to check that
a resumed run ends with the very weights of an uninterrupted one. The dying
worker is made by ``tests/fault_launch.py`` (launch.py with a patched
optimizer step), so that no switch for it lives in the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from procs import run  # a child's own children stopped too

from ringcomm.tools.spawn import loopback_store
from trainer.loop import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--world-size",
    "2",
    "--dataset",
    "synthetic",
    "--synthetic-size",
    "256",
    "--batch-size",
    "16",
    "--eval-batch-size",
    "32",
    "--eval-batches",
    "1",
    "--log-every",
    "2",
]
STEPS_PER_EPOCH = 256 // 2 // 16

REQUIRED_KEYS = {
    "algo",
    "transport",
    "world_size",
    "model",
    "dataset",
    "steps",
    "global_batch_size",
    "train_time_s",
    "throughput_img_s",
    "comm_time_s",
    "final_train_loss",
    "final_test_accuracy",
    "history",
    "per_class_accuracy",
    "confusion_matrix",
    "step_records",
}


def _launch(
    *args: str, timeout: float = 150, env: dict[str, str] | None = None, script: str = "launch.py"
) -> subprocess.CompletedProcess:
    """``python SCRIPT TINY... ARGS...`` from the repository root, with a timeout (seconds)."""
    return run(
        [sys.executable, script, *TINY, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def _metrics(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


def _check_run(proc: subprocess.CompletedProcess, out: Path, algo: str, steps: int) -> dict[str, Any]:
    """The output lines and metrics.json of a fresh 2-rank run of ``steps`` steps in one epoch."""
    _ok(proc)
    lines = proc.stdout.splitlines()
    assert lines[0] == "dataset: synthetic (asked for)"
    assert sum(line.startswith("step ") for line in lines) == steps // 2  # --log-every 2
    assert "img/s" in lines[2] and ("comm n/a" in lines[2]) == (algo == "ddp")

    m = _metrics(out)
    assert REQUIRED_KEYS <= set(m), REQUIRED_KEYS - set(m)
    assert (m["algo"], m["world_size"], m["model"], m["dataset"]) == (algo, 2, "simplecnn", "synthetic")
    assert m["steps"] == steps and m["global_batch_size"] == 32
    assert m["train_time_s"] > 0 and m["throughput_img_s"] > 0
    assert len(m["history"]) == 1
    assert {"train_loss", "train_accuracy", "test_accuracy", "epoch_time_s"} <= set(m["history"][0])
    assert len(m["per_class_accuracy"]) == 10
    confusion = torch.tensor(m["confusion_matrix"])
    assert confusion.shape == (10, 10) and int(confusion.sum()) == 256 // 5  # the whole test split
    assert [r["step"] for r in m["step_records"]] == list(range(1, steps + 1))
    assert all(r["step_time_s"] > 0 for r in m["step_records"])
    if algo == "ring":
        assert m["transport"] == "torch" and m["comm_time_s"] > 0
        # a ring of 2 sends each rank's whole gradient once (2(P-1)/P = 1), plus a few bytes of
        # per-collective bookkeeping, whatever ringcomm sends besides the data
        grad_bytes = m["parameters"] * 4
        assert all(abs(r["bytes"] - grad_bytes) < 0.01 * grad_bytes for r in m["step_records"])
    else:
        assert m["transport"] is None and m["comm_time_s"] is None
    assert (out / "checkpoint.pt").is_file()
    return m


def test_ddp_two_ranks_write_metrics(tmp_path: Path) -> None:
    _check_run(_launch("--algo", "ddp", "--max-steps", "4", "--out", str(tmp_path)), tmp_path, "ddp", 4)


def test_ring_two_ranks_then_resume(tmp_path: Path) -> None:
    """A ring run (its metrics checked like ddp's), then resumed from its checkpoint with more epochs."""
    common = ["--algo", "ring", "--out", str(tmp_path), "--max-steps", "12", "--schedule", "constant"]
    # 1. "interrupted": --epochs 1 stops after the first epoch of a run that --max-steps 12 spans 2 of
    first = _check_run(_launch(*common, "--epochs", "1"), tmp_path, "ring", STEPS_PER_EPOCH)
    assert first["history"][0]["complete"] and first["epochs_completed"] == 1

    # 2. resume with more epochs: epoch 1 runs until --max-steps, stopping mid-epoch
    proc = _launch(*common, "--epochs", "3", "--resume")
    _ok(proc)
    assert f"resume: {tmp_path / 'checkpoint.pt'} at step {STEPS_PER_EPOCH}, epoch 1, batch 0" in proc.stdout
    second = _metrics(tmp_path)
    assert second["steps"] == 12 and second["epochs_completed"] == 1
    assert [h["epoch"] for h in second["history"]] == [0, 1]
    assert not second["history"][1]["complete"]
    assert [r["step"] for r in second["step_records"]] == list(range(1, 13))
    assert second["resumed_from"] == str(tmp_path / "checkpoint.pt")
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]) == (12, 1, 12 - STEPS_PER_EPOCH)
    assert len(ckpt["rng"]) == 2  # one RNG state per rank


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """A one-process gloo group in this process (no spawn), destroyed afterwards."""
    store = loopback_store(1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_resume_mid_epoch_matches_an_uninterrupted_run(tmp_path: Path, world_of_one: None) -> None:
    """Stopping after 5 of 8 steps and resuming gives the very same weights as never stopping."""

    def config(out: Path, **changes: Any) -> TrainConfig:
        base = TrainConfig(
            algo="ring",
            dataset="synthetic",
            synthetic_size=128,  # 8 steps of 16 per epoch
            batch_size=16,
            epochs=2,
            schedule="constant",  # a cosine would depend on --max-steps
            eval_batches=1,
            eval_batch_size=16,
            log_every=100,
            out=str(out),
        )
        return dataclasses.replace(base, **changes)

    cpu = torch.device("cpu")
    whole = train(config(tmp_path / "whole"), 0, 1, cpu)
    part = train(config(tmp_path / "part", max_steps=5), 0, 1, cpu)
    assert part is not None and part["steps"] == 5
    resumed = train(config(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint.pt")), 0, 1, cpu)
    assert whole is not None and resumed is not None
    assert resumed["steps"] == whole["steps"] == 16
    assert [h["epoch"] for h in resumed["history"]] == [0, 0, 1]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


def _processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds ``marker`` (this one excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_dying_worker_stops_the_world_and_is_named(tmp_path: Path) -> None:
    """Rank 1 exits abruptly after its 3rd step (tests/fault_launch.py); the launcher names it, stops rank 0."""
    marker = f"RINGCOMM_TEST_MARKER={uuid.uuid4().hex}"
    key, value = marker.split("=")
    start = time.monotonic()
    proc = _launch(
        "--algo",
        "ring",
        "--max-steps",
        "50",
        "--out",
        str(tmp_path),
        env={"FAULT_LAUNCH_DIE": "1:3", key: value},
        timeout=120,
        script="tests/fault_launch.py",
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "rank 1 died with exit code 17" in proc.stderr
    assert "stopped the other workers" in proc.stderr
    assert time.monotonic() - start < 100  # not rank 0's 300 s communication timeout
    time.sleep(0.5)
    assert _processes_with(marker) == [], "orphaned worker processes"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_device_cuda_without_a_gpu_is_a_one_line_error_before_any_worker_starts(tmp_path: Path) -> None:
    for backend in ([], ["--backend", "gloo"]):  # the default (nccl on cuda) and one that would start
        proc = _launch("--device", "cuda", *backend, "--out", str(tmp_path), timeout=60)
        assert proc.returncode != 0
        assert proc.stderr.splitlines() == [
            "launch.py: --device cuda: no CUDA device is available (torch.cuda.device_count() is 0); "
            "use --device cpu or auto"
        ], proc.stderr
        assert proc.stdout == ""  # no worker printed its dataset line
        assert not any(tmp_path.iterdir())
