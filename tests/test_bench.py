"""Specification of ``ringcomm.bench``: its size and label grammar, and the JSON document it writes.

The torchrun path is run in this process as a world of one rank (the environment torchrun would
set, a free port): it starts no process.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ringcomm import bench


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def as_torchrun_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The environment torchrun gives rank 0 of a one-rank world."""
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # bench pins a rank to one thread
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.timeout(60)
def test_json_under_torchrun_records_the_world_torchrun_started(
    as_torchrun_rank: None, tmp_path: Path
) -> None:
    # --world-size is not given (torchrun chose the world); its default, 4, is not what ran.
    out = tmp_path / "bench.json"
    argv = ["--sizes", "4K", "--algos", "gloo", "--reps", "2", "--warmup", "0", "--sample-s", "0.001"]
    rows = bench.main([*argv, "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["world_size"] == 1
    assert [r["world_size"] for r in doc["rows"]] == [1] == [r["world_size"] for r in rows]
    assert doc["machine"] == bench.machine_info()


@pytest.mark.timeout(60)
def test_a_world_size_that_contradicts_torchrun_is_refused(
    as_torchrun_rank: None, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--world-size", "4", "--sizes", "4K", "--algos", "gloo"])
    err = capsys.readouterr().err
    assert "--world-size 4" in err and "1" in err and "torchrun" in err
    assert not dist.is_initialized()
