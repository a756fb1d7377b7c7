"""trainer/loop.py in a one-process world, in this process: what ``train`` leaves behind.

Whole runs and resume are tested through launch.py in test_launch.py and
test_resume.py; here only what is quick to see in one process.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ringcomm.tools.spawn import loopback_store
from trainer import checkpoint
from trainer.checkpoint import Progress
from trainer.loop import TrainConfig, train

#: Each test makes a gloo group (and test_loop trains): a hang fails it here, not at CI's limit.
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """A one-process gloo group in this process (no spawn), destroyed afterwards."""
    store = loopback_store(1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_refused_resume_still_stops_the_comm_hook(tmp_path: Path, world_of_one: None) -> None:
    """The hook is attached before the checkpoint is read; refusing the checkpoint must close it.

    A first, successful run starts whatever the library keeps for the life of
    the process group (its transport, a heartbeat thread); the refused run must
    leave no thread beyond those.
    """
    cfg = TrainConfig(
        algo="ring",
        dataset="synthetic",
        synthetic_size=64,  # 4 steps of 16 per epoch
        batch_size=16,
        max_steps=1,
        eval_batches=1,
        eval_batch_size=16,
        out=str(tmp_path / "run"),
    )
    assert train(cfg, 0, 1, torch.device("cpu")) is not None
    after_a_run = set(threading.enumerate())

    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    other = tmp_path / "other.pt"
    checkpoint.save(other, TrainConfig(model="resnet18"), model, optimizer, scheduler, Progress())
    with pytest.raises(ValueError, match="checkpoint is of model 'resnet18', not 'simplecnn'"):
        train(dataclasses.replace(cfg, resume=str(other)), 0, 1, torch.device("cpu"))
    left = [t.name for t in threading.enumerate() if t not in after_a_run and t.is_alive()]
    assert left == [], f"threads left running after train() refused the checkpoint: {left}"


def _tiny(out: Path, **changes: object) -> TrainConfig:
    """8 steps of 16 images per epoch, one epoch, a test batch: about a second in one process."""
    base = TrainConfig(
        algo="ring",
        dataset="synthetic",
        synthetic_size=128,
        batch_size=16,
        epochs=1,
        schedule="constant",
        eval_batches=1,
        eval_batch_size=16,
        log_every=100,
        out=str(out),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _lrs(metrics: dict | None) -> dict[int, float]:
    assert metrics is not None
    return {r["step"]: r["lr"] for r in metrics["step_records"]}


def test_raising_max_steps_on_resume_follows_the_new_cosine_schedule(
    tmp_path: Path, world_of_one: None, capsys: pytest.CaptureFixture
) -> None:
    """Issue 15: resumed with a higher --max-steps, the cosine restarted partway up from the old end."""
    cpu = torch.device("cpu")
    planned = train(_tiny(tmp_path / "whole", schedule="cosine", max_steps=8), 0, 1, cpu)
    short = train(_tiny(tmp_path / "part", schedule="cosine", max_steps=4), 0, 1, cpu)
    assert _lrs(short)[4] < 0.5 * _lrs(planned)[4]  # the short plan had nearly decayed by its end
    capsys.readouterr()
    ckpt = str(tmp_path / "part" / "checkpoint.pt")
    resumed = train(_tiny(tmp_path / "part", schedule="cosine", max_steps=8, resume=ckpt), 0, 1, cpu)
    assert resumed is not None and resumed["steps"] == 8
    got, want = _lrs(resumed), _lrs(planned)
    for step in range(5, 9):  # every resumed step, the first included, at the new plan's rate
        assert got[step] == pytest.approx(want[step], rel=1e-12), (step, got[step], want[step])
    assert "resume: the schedule now ends at step 8, not 4" in capsys.readouterr().out


def test_checkpoint_every_writes_resumable_checkpoints_mid_epoch(
    tmp_path: Path, world_of_one: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--checkpoint-every 3 over 7 steps: checkpoints at 3 and 6 (mid-epoch), then 7; resuming from 3 is exact."""
    saved: list[int] = []
    real_save = checkpoint.save

    def save_and_keep(path: Path, *args: object, **kwargs: object) -> None:
        real_save(path, *args, **kwargs)  # type: ignore[arg-type]
        step = torch.load(path, weights_only=False)["step"]
        saved.append(step)
        Path(path).with_name(f"at{step}.pt").write_bytes(Path(path).read_bytes())

    monkeypatch.setattr(checkpoint, "save", save_and_keep)
    cpu = torch.device("cpu")
    whole = train(_tiny(tmp_path / "run", max_steps=7, checkpoint_every=3), 0, 1, cpu)
    assert whole is not None and saved == [3, 6, 7]
    at3 = torch.load(tmp_path / "run" / "at3.pt", weights_only=False)
    assert (at3["epoch"], at3["batch_in_epoch"], at3["images_seen"]) == (0, 3, 48)

    resumed = train(
        _tiny(tmp_path / "again", max_steps=7, resume=str(tmp_path / "run" / "at3.pt")), 0, 1, cpu
    )
    assert resumed is not None and resumed["steps"] == 7
    a = torch.load(tmp_path / "run" / "at7.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "again" / "checkpoint.pt", weights_only=False)["model"]
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["time-limit", "interrupted"])
def test_a_run_stopped_early_writes_its_checkpoint_and_says_why(
    how: str, tmp_path: Path, world_of_one: None
) -> None:
    """--time-limit, or Ctrl-C (the launcher's handler calls request_stop): stop after the step, checkpoint."""
    from trainer import loop

    cpu = torch.device("cpu")
    if how == "interrupted":
        loop.request_stop("interrupted")
        cfg = _tiny(tmp_path / "run")
    else:
        cfg = _tiny(tmp_path / "run", time_limit=1e-6)  # over after the first step
    m = train(cfg, 0, 1, cpu)
    assert m is not None and m["stopped"] == how and m["steps"] == 1
    assert not m["history"][-1]["complete"]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert (ckpt["step"], ckpt["batch_in_epoch"]) == (1, 1)

    # the request belonged to that run: the resumed one trains to the end
    resumed = train(_tiny(tmp_path / "run", resume=str(tmp_path / "run" / "checkpoint.pt")), 0, 1, cpu)
    assert resumed is not None and resumed["stopped"] is None and resumed["steps"] == 8


def test_resuming_with_nothing_left_is_refused_by_the_loop_too(tmp_path: Path, world_of_one: None) -> None:
    cpu = torch.device("cpu")
    assert train(_tiny(tmp_path / "run", max_steps=4), 0, 1, cpu) is not None
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    with pytest.raises(
        ValueError, match="nothing left to train: the checkpoint is at step 4 and --max-steps is 4"
    ):
        train(_tiny(tmp_path / "run", max_steps=4, resume=str(tmp_path / "run" / "checkpoint.pt")), 0, 1, cpu)
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before  # nothing rewritten


def test_each_step_record_holds_its_loss(tmp_path: Path, world_of_one: None) -> None:
    """The report's loss curves (analysis.report, Compression) read the loss of every step from
    metrics.json; at one rank the epoch's mean train loss is the mean of those 8 batches' losses."""
    metrics = train(_tiny(tmp_path / "run", max_steps=8), 0, 1, torch.device("cpu"))
    assert metrics is not None
    losses = [r["loss"] for r in metrics["step_records"]]
    assert len(losses) == 8 and all(isinstance(x, float) and x > 0 for x in losses), losses
    assert sum(losses) / len(losses) == pytest.approx(metrics["history"][-1]["train_loss"], rel=1e-6)
    assert len(set(losses)) > 1, "each step's own loss, not one value repeated"
