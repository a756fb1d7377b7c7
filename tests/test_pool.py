"""The pooled worlds (tests/pool.py): kept between calls, recycled after a failure or a timeout, all ended."""

from __future__ import annotations

import os
import pickle
import time
from typing import Any

import pool
import pytest
from pool import run_pooled
from procs import descendants, end_processes

from ringcomm.tools import spawn
from ringcomm.tools.spawn import WorldError, loopback_store

pytestmark = pytest.mark.timeout(180)


def _pid_and_session(rank: int, p: int) -> tuple[int, int, bool]:
    import ringcomm.runtime.session as session

    return os.getpid(), rank, session._CURRENT is None


def _use_ringcomm(rank: int, p: int) -> float:
    import torch

    import ringcomm

    x = torch.full((3,), float(rank + 1))
    ringcomm.all_reduce(x)
    return x[0].item()


def _fail_on_rank_1(rank: int, p: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")


def _hang_on_rank_0(rank: int, p: int, seconds: float) -> None:
    if rank == 0:
        time.sleep(seconds)


def _pids(p: int) -> list[int]:
    return [pid for pid, _, _ in run_pooled(_pid_and_session, p, timeout=120)]


@pytest.mark.fast
def test_a_pooled_world_is_kept_and_each_call_starts_without_a_session() -> None:
    first = run_pooled(_pid_and_session, 2, timeout=120)
    assert [rank for _, rank, _ in first] == [0, 1]
    assert run_pooled(_use_ringcomm, 2, timeout=120) == [3.0, 3.0]
    again = run_pooled(_pid_and_session, 2, timeout=120)
    assert [pid for pid, _, _ in again] == [pid for pid, _, _ in first]  # the same processes
    assert all(fresh for _, _, fresh in again), "a task started inside the previous task's session"


def test_a_failure_names_the_rank_and_the_next_call_gets_a_new_world() -> None:
    before = _pids(2)
    with pytest.raises(WorldError) as info:
        run_pooled(_fail_on_rank_1, 2, timeout=120)
    assert info.value.rank == 1 and "rank 1 fails on purpose" in str(info.value)
    assert not any(pid in descendants(os.getpid()) for pid in before), "the failed world's ranks live on"
    after = _pids(2)
    assert set(after).isdisjoint(before)


def test_a_timeout_kills_the_world_and_says_which_ranks_did_not_finish() -> None:
    before = _pids(2)
    start = time.monotonic()
    with pytest.raises(WorldError, match=r"timed out after 3 s; ranks \[0\] did not finish"):
        run_pooled(_hang_on_rank_0, 2, (600.0,), timeout=3)
    assert time.monotonic() - start < 60  # the rank sleeps 600 s: it was killed, not waited for
    assert not any(pid in descendants(os.getpid()) for pid in before)
    assert set(_pids(2)).isdisjoint(before)


def test_close_all_ends_every_pooled_rank() -> None:
    pids = _pids(1) + _pids(2)
    pool.close_all()
    alive = set(descendants(os.getpid()))
    assert not alive.intersection(pids)
    assert pool._POOLS == {}


def _fail_the_session(rank: int, p: int) -> str:
    import torch

    import ringcomm

    ringcomm.init("torch")
    if rank == 0:
        try:
            ringcomm.all_reduce(torch.ones(3), timeout=1.0)  # rank 1 never calls: a timeout
        except ringcomm.CommError as exc:
            return type(exc).__name__
    return "silent"


def test_a_world_whose_session_failed_returns_its_values_and_is_not_used_again() -> None:
    before = _pids(2)
    assert run_pooled(_fail_the_session, 2, timeout=120) == ["CommTimeoutError", "silent"]
    assert not any(pid in descendants(os.getpid()) for pid in before)
    assert set(_pids(2)).isdisjoint(before)


def _a_tensor(rank: int, p: int) -> dict[str, Any]:
    import torch

    return {"rank": rank, "t": torch.arange(5.0) + rank}


def test_a_ranks_tensors_reach_the_parent_after_the_rank_has_exited() -> None:
    """A rank of ``run_world`` reports its values and exits at once; on a loaded machine the parent
    reads them later. A tensor sent as torch shares it (a file descriptor its rank hands over while
    it lives) then could not be read: ``get`` raised ConnectionResetError (test_hier, once, in a
    loaded full run). Here the parent reads only after the rank is gone, every time."""
    import torch

    store = loopback_store(2)
    ctx, caller = spawn.context()
    results = ctx.Queue()
    rank = ctx.Process(
        target=spawn._child, args=(_a_tensor, 0, 1, store.port, "gloo", (), results, {}, os.getpid(), caller)
    )
    try:
        rank.start()
        rank.join(timeout=120)
        assert rank.exitcode == 0, f"the rank exited {rank.exitcode}"
        who, status, value, _ = results.get(timeout=10)
        assert (who, status) == (0, "ok"), value
        got = pickle.loads(value)  # what run_world does with an "ok" report
        assert got["rank"] == 0 and torch.equal(got["t"], torch.arange(5.0)), got
    finally:
        end_processes([rank])
        results.close()
        del store
