"""trainer/checkpoint.py: the atomic write, and save then restore giving back every piece of state.

No processes are started: ``save`` gathers the ranks' RNG states, so the
round-trip tests run in a one-process gloo group in this process.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from ringcomm.tools.spawn import loopback_store
from trainer import checkpoint
from trainer.checkpoint import Progress, atomic_write
from trainer.loop import TrainConfig

#: Each test makes a gloo group (and test_loop trains): a hang fails it here, not at CI's limit.
pytestmark = [pytest.mark.timeout(120), pytest.mark.fast]

# --- atomic_write -----------------------------------------------------------------------------------


def test_atomic_write_replaces_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    atomic_write(path, lambda f: f.write(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def write_half(f: object) -> None:
        f.write(b"half")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, write_half)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"], "a temporary file was left behind"


# --- save and restore -------------------------------------------------------------------------------


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """A one-process gloo group in this process (no spawn), destroyed afterwards."""
    store = loopback_store(1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _parts(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A small model with an SGD-with-momentum optimizer and a step schedule, weights from ``seed``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def _train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, steps: int) -> None:
    for _ in range(steps):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]


def _draws() -> tuple[torch.Tensor, np.ndarray, float]:
    """One draw from each RNG a checkpoint restores."""
    return torch.rand(4), np.random.rand(4), random.random()


def test_restore_gives_back_weights_optimizer_schedule_position_and_rng(
    tmp_path: Path, world_of_one: None
) -> None:
    cfg = TrainConfig(model="tiny", batch_size=8)
    model, optimizer, scheduler = _parts(seed=0)
    _train_steps(model, optimizer, scheduler, 3)
    progress = Progress(
        step=3,
        epoch=1,
        batch_in_epoch=2,
        history=[{"epoch": 0, "step": 1, "complete": True}],
        step_records=[{"step": s, "step_time_s": 0.5} for s in (1, 2, 3)],
        train_time_s=1.5,
        images_seen=24,
    )
    path = tmp_path / "run" / "checkpoint.pt"  # save creates the folder
    checkpoint.save(path, cfg, model, optimizer, scheduler, progress)
    expected_draws = _draws()  # what the RNGs give right after the save
    expected_state = {k: v.clone() for k, v in model.state_dict().items()}
    expected_momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    fresh_model, fresh_optimizer, fresh_scheduler = _parts(seed=1)
    lines: list[str] = []
    got = checkpoint.restore(
        path,
        cfg,
        fresh_model,
        fresh_optimizer,
        fresh_scheduler,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        say=lines.append,
    )

    assert got == progress
    for key, value in expected_state.items():  # BatchNorm's running statistics included
        torch.testing.assert_close(fresh_model.state_dict()[key], value, rtol=0, atol=0)
    for p, momentum in zip(fresh_model.parameters(), expected_momentum):
        torch.testing.assert_close(fresh_optimizer.state[p]["momentum_buffer"], momentum, rtol=0, atol=0)
    assert fresh_scheduler.last_epoch == 3 and fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    torch_draw, numpy_draw, python_draw = _draws()
    torch.testing.assert_close(torch_draw, expected_draws[0], rtol=0, atol=0)
    np.testing.assert_array_equal(numpy_draw, expected_draws[1])
    assert python_draw == expected_draws[2]
    assert lines == [f"resume: {path} at step 3, epoch 1, batch 2 of that epoch"]

    ckpt = checkpoint.load(path)
    assert set(ckpt) == set(checkpoint.KEYS) | set(checkpoint.OPTIONAL_KEYS)
    assert (ckpt["model_name"], ckpt["batch_size"], ckpt["config"]["model"]) == ("tiny", 8, "tiny")
    assert len(ckpt["rng"]) == 1  # one state per rank


def test_restore_into_another_world_size_keeps_fresh_rng_streams_and_says_so(
    tmp_path: Path, world_of_one: None
) -> None:
    cfg = TrainConfig(model="tiny", batch_size=8)
    model, optimizer, scheduler = _parts(seed=0)
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, cfg, model, optimizer, scheduler, Progress(step=4))
    ckpt = checkpoint.load(path)
    ckpt["rng"] = ckpt["rng"] * 2  # as if two ranks had written it
    torch.save(ckpt, path)

    parts = _parts(seed=1)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    lines: list[str] = []
    checkpoint.restore(path, cfg, *parts, rank=0, world_size=1, device=torch.device("cpu"), say=lines.append)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)  # the RNG was left alone
    assert lines[0].startswith("resume: checkpoint from world size 2, batch 8; continuing with fresh RNG")
    assert lines[1] == f"resume: {path} at step 4, epoch 0, batch 0 of that epoch"


def test_restore_refuses_a_checkpoint_of_another_model(tmp_path: Path, world_of_one: None) -> None:
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, TrainConfig(model="resnet18"), *_parts(seed=0), Progress())
    with pytest.raises(ValueError, match=r"checkpoint is of model 'resnet18', not 'simplecnn'"):
        checkpoint.restore(
            path,
            TrainConfig(model="simplecnn"),
            *_parts(seed=0),
            rank=0,
            world_size=1,
            device=torch.device("cpu"),
            say=print,
        )


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ({"model": {}, "step": 3}, r"missing model_name, optimizer, scheduler, epoch, batch_in_epoch"),
        ([1, 2, 3], r"it holds a list, not a dict"),
    ],
)
def test_load_refuses_a_file_that_is_not_a_checkpoint_and_says_why(
    tmp_path: Path, content: object, problem: str
) -> None:
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=rf"other\.pt: not a trainer checkpoint \({problem}"):
        checkpoint.load(path)
