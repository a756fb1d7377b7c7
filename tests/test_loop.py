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

from trainer import checkpoint
from trainer.checkpoint import Progress
from trainer.loop import TrainConfig, train


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """A one-process gloo group in this process (no spawn), destroyed afterwards."""
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
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
