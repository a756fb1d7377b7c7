"""The comm queue (comm_queue.py): one thread per process, collectives in issue order, a clean end.

- Two threads of one rank calling all_reduce at once used to share receive
  buffers and interleave their messages; now the second waits for the first.
- all_reduce_async returns a future; futures and blocking calls keep one order.
- Shutting down while a collective is stuck on a silent peer raises, naming it,
  within its timeout, instead of returning while the thread is still inside Gloo.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from pool import run_pooled

import ringcomm
from ringcomm.errors import CommError
from ringcomm.runtime.comm_queue import CommQueue
from ringcomm.tools.spawn import finish, run_world


def _two_threads_rank(rank: int, p: int) -> dict[str, list[float]]:
    """On every rank thread a issues a large all_reduce, and thread b another once a is running.

    Small segments: each call keeps several receives of one tag posted, so two calls
    running at once match each other's messages and share the receive slots.
    """
    ringcomm.init("torch")
    results: dict[str, list[float]] = {}

    def call(name: str, value: float) -> None:
        x = torch.full((1 << 22,), value * (rank + 1))
        ringcomm.all_reduce(x, algo="ring", timeout=60, segment_bytes=4096)
        results[name] = [x.min().item(), x.max().item()]

    a = threading.Thread(target=call, args=("a", 1.0))
    b = threading.Thread(target=call, args=("b", 1000.0))
    dist.barrier()
    a.start()
    queue = ringcomm.runtime.session.current().queue
    end = time.monotonic() + 10
    while queue._running is None and a.is_alive() and time.monotonic() < end:
        time.sleep(0.001)  # until a holds the queue: then b comes second on every rank
    b.start()
    a.join(60)
    b.join(60)
    return results


def _until(condition: Callable[[], object], seconds: float) -> bool:
    """Whether ``condition()`` became true within ``seconds`` (polled every 1 ms): wait for an event
    that can be seen, never for a fixed time that a loaded machine outlasts."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.001)
    return True


def _queued(q: CommQueue, what: str) -> bool:
    """Whether a call named ``what`` waits in ``q``'s queue (issued, not started)."""
    with q._cond:
        return any(item.what == what for item in q._items)


def test_two_threads_calling_at_once_run_one_after_the_other() -> None:
    p = 2
    for results in run_pooled(_two_threads_rank, p, timeout=120):
        assert results == {"a": [3.0, 3.0], "b": [3000.0, 3000.0]}, results


def _async_order_rank(rank: int, p: int) -> dict:
    futures = [ringcomm.all_reduce_async(torch.full((1000,), float(i + rank)), algo=algo) for i, algo in enumerate(ringcomm.ALGOS)]
    x = torch.full((7,), float(rank))
    ringcomm.all_reduce(x, algo="ps")  # blocking, behind the queued ones
    values = [f.wait()[0].item() for f in futures]
    try:
        ringcomm.all_reduce_async(torch.ones(3), op="prod")
        refused = None
    except ValueError as exc:
        refused = str(exc)
    y = torch.ones(3)
    ringcomm.all_reduce(y)
    return {"values": values, "x": x[0].item(), "refused": refused, "y": y.tolist(), "stats": ringcomm.comm_stats().calls}


def test_async_futures_and_blocking_calls_keep_one_order() -> None:
    p = 3
    for r in run_pooled(_async_order_rank, p, timeout=120):
        assert r["values"] == [sum(float(i + q) for q in range(p)) for i in range(len(ringcomm.ALGOS))]
        assert r["x"] == sum(range(p))
        assert r["refused"].startswith("unknown op 'prod'")  # bad arguments raise at once, not in the future
        assert r["y"] == [3.0] * 3  # the refused call took its turn on every rank alike
        assert r["stats"] == len(ringcomm.ALGOS) + 2


def _stuck_rank(rank: int, p: int) -> dict:
    ringcomm.init("torch")
    out = {}
    if rank == 0:
        fut = ringcomm.all_reduce_async(torch.ones(10), timeout=30)  # rank 1 never joins
        queue = ringcomm.runtime.session.current().queue
        # shutdown must meet the collective running, not still queued: wait for that, not a fixed time
        out["was running"] = _until(lambda: queue._running is not None, 20.0)
        t0 = time.monotonic()
        try:
            ringcomm.shutdown(timeout=1.0)
            out["shutdown"] = "returned"
        except CommError as exc:
            out["shutdown"] = str(exc)
        out["seconds"] = time.monotonic() - t0
        out["done"] = fut.done()
        finish(ok=False)  # what the launcher does after a failed run: it must leave the group alone
        out["group_kept"] = dist.is_initialized()
    return out


def test_shutdown_with_a_collective_stuck_on_a_silent_peer_raises_naming_it() -> None:
    out = run_world(_stuck_rank, 2, timeout=120)[0]
    assert "all_reduce(10 x float32, ring over torch) is still running after 1 s" in out["shutdown"], out
    assert "must not be destroyed under it" in out["shutdown"]
    assert out["was running"], "the collective never started on the comm thread"
    assert out["seconds"] < 10 and not out["done"]
    assert out["group_kept"], "finish destroyed the process group under the comm thread"


def _callback_calls_blocking_rank(rank: int, p: int) -> dict:
    """Rank 0 issues a blocking all_reduce in a future's callback; rank 1 makes the same calls plainly."""
    ringcomm.init("torch")
    store = dist.distributed_c10d._get_default_store()
    out: dict = {}
    if rank == 0:
        said: list[str] = []
        first = ringcomm.all_reduce_async(torch.ones(4), timeout=60)

        def nested(fut: torch.futures.Future) -> None:
            out["callback thread"] = threading.current_thread().name
            try:
                ringcomm.all_reduce(torch.ones(4), timeout=60)
                said.append("returned")
            except Exception as exc:
                said.append(f"{type(exc).__name__}: {exc}")

        first.add_done_callback(nested)
        store.set("callback-ready", "1")  # only now may rank 1 join: the callback runs on the comm thread
        first.wait()
        end = time.monotonic() + 30
        while not said and time.monotonic() < end:
            time.sleep(0.01)
        out["nested"] = said
    else:
        store.wait(["callback-ready"])
        ringcomm.all_reduce(torch.ones(4), timeout=60)
        try:
            ringcomm.all_reduce(torch.ones(4), timeout=60)  # pairs with rank 0's refused one
            out["nested"] = ["returned"]
        except ringcomm.MismatchError as exc:
            out["nested"] = [str(exc)]
    last = torch.full((3,), float(rank + 1))
    ringcomm.all_reduce(last, timeout=60)
    out["last"] = last.tolist()
    return out


def test_a_blocking_all_reduce_in_a_callback_is_refused_and_the_peers_hear_why() -> None:
    """With the queue empty it used to run inline on the comm thread; with work queued, raise."""
    zero, one = run_world(_callback_calls_blocking_rank, 2, timeout=120)
    assert zero["callback thread"] == "ringcomm-comm-r0"
    assert len(zero["nested"]) == 1 and zero["nested"][0].startswith("CommError: all_reduce(4 x float32"), zero
    assert "was refused: a blocking collective issued on ringcomm's comm thread" in zero["nested"][0]
    assert one["nested"][0].startswith("rank 1: ranks [0] refused this all_reduce (rank 0: CommError: "), one
    assert zero["last"] == one["last"] == [3.0] * 3


# --- the queue on its own, no processes ---


@pytest.mark.fast
def test_a_blocking_call_issued_behind_queued_work_waits_its_turn() -> None:
    q = CommQueue("test-comm")
    order: list[str] = []
    gate = threading.Event()

    def slow() -> str:
        gate.wait(10)
        order.append("queued")
        return "queued"

    fut = q.submit(slow, "slow", torch.futures.Future())
    assert _until(lambda: q._running == "slow", 10.0), "the queued work never started"
    t = threading.Thread(target=lambda: order.append(q.run(lambda: "blocking", "blocking") + " returned"))
    t.start()
    # until the blocking call is queued behind slow, or (the bug) ran at once
    assert _until(lambda: order or _queued(q, "blocking"), 10.0), "the blocking call neither ran nor queued"
    assert order == []  # the blocking call did not jump the queue
    gate.set()
    t.join(5)
    assert fut.wait() == "queued" and order == ["queued", "blocking returned"]
    q.close(1.0)


@pytest.mark.fast
def test_an_exception_reaches_the_future_and_the_queue_goes_on() -> None:
    q = CommQueue("test-comm")

    def boom() -> None:
        raise CommError("boom")

    fut = q.submit(boom, "boom", torch.futures.Future())
    with pytest.raises(Exception, match="boom"):
        fut.wait()
    assert q.run(lambda: 42, "after") == 42
    q.close(1.0)
    with pytest.raises(CommError, match="shut down"):
        q.run(lambda: 1, "late")


@pytest.mark.fast
def test_close_answers_queued_work_that_never_started() -> None:
    """The thread is still in a callback of a finished collective's future when close's time is up:
    what was queued behind must fail, not be dropped (a caller blocked on it would wait forever)."""
    q = CommQueue("test-comm")
    gate = threading.Event()
    in_callback = threading.Event()
    attached = threading.Event()
    # first waits until its callback is attached: finished before, its future would run the
    # callback at once, here on the test's thread, and the comm thread would go on to run queued
    first = q.submit(lambda: attached.wait(10), "first", torch.futures.Future())
    # runs on the comm thread, in set_result
    first.add_done_callback(lambda fut: (in_callback.set(), gate.wait(10)))
    attached.set()
    assert in_callback.wait(10), "the finished collective's callback never ran"
    queued = q.submit(lambda: "queued", "queued", torch.futures.Future())
    blocked: list[str] = []
    caller = threading.Thread(
        target=lambda: blocked.append(_outcome(lambda: q.run(lambda: "x", "blocked"))), daemon=True
    )
    caller.start()
    assert _until(lambda: _queued(q, "blocked"), 10.0), "the blocking call was never queued"
    q.close(0.3)
    caller.join(5)
    gate.set()
    assert queued.done() and not caller.is_alive(), "queued work was dropped unanswered"
    with pytest.raises(CommError, match="queued was not started"):
        queued.wait()
    assert blocked == ["CommError: ringcomm is shut down; blocked was not started"], blocked


@pytest.mark.fast
def test_close_on_the_comm_thread_is_refused_and_the_queue_goes_on() -> None:
    """close() from a future's callback used to wait out its timeout for itself, abandon the work
    queued behind, then fail inside Thread.join ("cannot join current thread")."""
    q = CommQueue("test-comm")
    said: list[str] = []
    gate = threading.Event()
    first = q.submit(lambda: gate.wait(5), "first", torch.futures.Future())
    first.add_done_callback(lambda fut: said.append(_outcome(lambda: q.close(30.0))))
    queued = q.submit(lambda: "queued", "queued", torch.futures.Future())
    gate.set()  # first finishes now, on the comm thread: its callback runs there
    start = time.monotonic()
    assert queued.wait() == "queued" and time.monotonic() - start < 5.0
    assert len(said) == 1 and said[0].startswith("CommError: ringcomm.shutdown() was called on"), said
    assert q.run(lambda: 42, "after") == 42  # still open
    q.close(1.0)


def _outcome(fn: Any) -> str:
    try:
        return f"returned {fn()}"
    except CommError as exc:
        return f"CommError: {str(exc).split(' (')[0]}"


def _wait_done(fut: torch.futures.Future, seconds: float = 5.0) -> bool:
    """Whether ``fut`` completes within ``seconds`` (``Future.wait`` has no timeout)."""
    end = time.monotonic() + seconds
    while not fut.done() and time.monotonic() < end:
        time.sleep(0.01)
    return fut.done()


@pytest.mark.fast
@pytest.mark.parametrize("fails", [False, True], ids=["result", "error"])
def test_a_future_its_user_completed_first_does_not_stop_the_comm_thread(fails: bool) -> None:
    """set_result on a completed future raises; it used to escape _Item.finish and end the thread,
    so every later collective of the process waited forever."""
    q = CommQueue("test-comm")
    gate = threading.Event()

    def first() -> str:
        gate.wait(5)
        if fails:
            raise CommError("first failed")
        return "first"

    fut = q.submit(first, "first", torch.futures.Future())
    fut.set_result("completed by its user")
    gate.set()
    later = q.submit(lambda: "later", "later", torch.futures.Future())
    assert _wait_done(later), "the comm thread died: work queued after it never ran"
    assert later.wait() == "later" and fut.wait() == "completed by its user"
    assert q._thread is not None and q._thread.is_alive()
    q.close(1.0)


class _RefusingFuture(torch.futures.Future):
    """A future that rejects every result (as a device-bound future rejects a tensor it cannot hold)."""

    def set_result(self, result: object) -> None:
        if not isinstance(result, BaseException):  # set_exception comes through here too
            raise TypeError(f"this future takes no {type(result).__name__}")
        super().set_result(result)


@pytest.mark.fast
def test_a_future_that_refuses_its_result_gets_an_error_and_the_queue_goes_on() -> None:
    q = CommQueue("test-comm")
    fut = q.submit(lambda: 42, "picky", _RefusingFuture())
    assert _wait_done(fut), "the future was left pending: its waiter would wait forever"
    with pytest.raises(Exception, match="picky finished, but its future refused its result: TypeError"):
        fut.wait()
    later = q.submit(lambda: "later", "later", torch.futures.Future())
    assert _wait_done(later) and later.wait() == "later"
    q.close(1.0)


@pytest.mark.fast
@pytest.mark.parametrize("behind", [False, True], ids=["queue-empty", "work-queued-behind"])
def test_a_blocking_call_in_a_future_callback_is_always_refused_alike(behind: bool) -> None:
    """It used to run inline when the queue happened to be empty, and raise when it was not."""
    q = CommQueue("test-comm")
    said: list[str] = []
    gate = threading.Event()
    first = q.submit(lambda: gate.wait(5), "first", torch.futures.Future())
    first.add_done_callback(lambda fut: said.append(_outcome(lambda: q.run(lambda: "ran", "nested"))))
    queued = q.submit(lambda: "queued", "queued", torch.futures.Future()) if behind else None
    gate.set()
    assert _wait_done(first)
    if queued is not None:
        assert _wait_done(queued) and queued.wait() == "queued"
    end = time.monotonic() + 5
    while not said and time.monotonic() < end:
        time.sleep(0.01)
    assert said == ["CommError: nested was refused: a blocking collective issued on ringcomm's comm thread"], said
    assert q.run(lambda: 42, "after") == 42  # the queue goes on
    q.close(1.0)


# --- jobs (submit_job, ringcomm.run_async): several collectives in one FIFO turn ---


@pytest.mark.fast
def test_a_jobs_collectives_run_inline_in_its_turn_between_the_work_around_it() -> None:
    """Work submitted before the job runs first, the job's own calls (blocking and queued) in the
    order it makes them, then the work submitted after it, although that reached the queue first."""
    q = CommQueue("test-comm")
    order: list[str] = []
    gate = threading.Event()
    q.submit(lambda: (gate.wait(10), order.append("before")), "before", torch.futures.Future())

    def job() -> str:
        order.append("job starts")
        q.run(lambda: order.append("blocking 1"), "blocking 1")
        inner = q.submit(lambda: order.append("queued in the job") or "inner", "inner", torch.futures.Future())
        assert inner.done(), "a call queued inside a job must have run inline"
        q.run(lambda: order.append("blocking 2"), "blocking 2")
        return inner.wait()

    fut = q.submit_job(job, "job", torch.futures.Future())
    after = q.submit(lambda: order.append("after"), "after", torch.futures.Future())
    gate.set()
    assert _wait_done(after) and fut.wait() == "inner"
    assert order == ["before", "job starts", "blocking 1", "queued in the job", "blocking 2", "after"], order
    q.close(1.0)


@pytest.mark.fast
def test_a_jobs_exception_reaches_its_future_and_the_queue_goes_on() -> None:
    q = CommQueue("test-comm")

    def job() -> None:
        q.run(lambda: None, "inner")
        raise ValueError("the job failed")

    fut = q.submit_job(job, "job", torch.futures.Future())
    with pytest.raises(ValueError, match="the job failed"):
        fut.wait()
    assert not q.in_job()
    assert q.run(lambda: 42, "after") == 42
    q.close(1.0)


@pytest.mark.fast
def test_outside_a_job_a_callback_is_still_refused_a_blocking_call() -> None:
    """The callbacks of a job's own future, and of a future completed inside the job, run on the comm
    thread outside the job: a blocking call there is refused as in any callback."""
    q = CommQueue("test-comm")
    said: list[str] = []

    def blocking_in_callback(fut: torch.futures.Future) -> None:
        said.append(_outcome(lambda: q.run(lambda: "ran", "nested")))

    def job() -> None:
        inner = torch.futures.Future()
        inner.add_done_callback(blocking_in_callback)
        q.submit(lambda: None, "inner", inner)  # completed inline, its callback run here

    fut = torch.futures.Future()
    fut.add_done_callback(blocking_in_callback)
    q.submit_job(job, "job", fut)
    assert _until(lambda: len(said) == 2, 10.0), said
    refused = "CommError: nested was refused: a blocking collective issued on ringcomm's comm thread"
    assert said == [refused, refused], said
    with pytest.raises(CommError, match="inside the job job"):  # a job in a job would queue out of order
        q.submit_job(lambda: q.submit_job(lambda: None, "nested job", torch.futures.Future()), "job",
                     torch.futures.Future()).wait()
    q.close(1.0)


def _job_order_rank(rank: int, p: int) -> dict:
    """Async calls before and after a job whose second all_reduce needs its first's sum; each call's
    numel differs, so with the check on any two ranks running them in different orders raise."""
    ringcomm.init("torch")
    stats0 = ringcomm.comm_stats()
    a = ringcomm.all_reduce_async(torch.full((3,), float(rank + 1)), timeout=60)
    p_sum = torch.full((5,), float(rank + 1))

    def job() -> list[float]:
        if rank == 0:
            time.sleep(0.3)  # rank 0's job is slow: b reaches its queue long before the job's calls do
        ringcomm.all_reduce(p_sum, timeout=60)  # blocking: inline in the job
        q = torch.full((7,), p_sum[0].item() * (rank + 1))  # needs the summed p
        fq = ringcomm.all_reduce_async(q, timeout=60)  # inline too: done on return
        return [p_sum[0].item(), fq.wait()[0].item()]

    fut = ringcomm.run_async(job, what="p then q")
    b = ringcomm.all_reduce_async(torch.full((11,), float(rank + 1)), timeout=60)
    c = torch.full((2,), float(rank))
    ringcomm.all_reduce(c, timeout=60)  # blocking, from the caller: after all of it
    return {
        "a": a.wait().tolist(), "job": fut.wait(), "b": b.wait().tolist(), "c": c.tolist(),
        "calls": (ringcomm.comm_stats() - stats0).calls,
    }


def test_a_jobs_collectives_keep_fifo_order_against_async_calls_on_every_rank() -> None:
    p = 3
    total = sum(range(1, p + 1))  # 6
    for r in run_pooled(_job_order_rank, p, timeout=120):
        assert r["a"] == [float(total)] * 3
        assert r["job"] == [float(total), float(total * total)]  # Q from the summed P: 6 * (1 + 2 + 3)
        assert r["b"] == [float(total)] * 11 and r["c"] == [float(sum(range(p)))] * 2
        assert r["calls"] == 5  # the job's two collectives are accounted like any


def _job_on_a_new_transport_rank(rank: int, p: int) -> dict:
    ringcomm.init("torch")
    out: dict = {}

    def outcome(fut: torch.futures.Future) -> str:
        try:
            return f"returned {fut.wait()}"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    out["all_reduce"] = outcome(ringcomm.run_async(lambda: ringcomm.all_reduce(torch.ones(4), transport="zmq")))
    out["init"] = outcome(ringcomm.run_async(lambda: ringcomm.init("zmq")))
    out["raised"] = outcome(ringcomm.run_async(lambda: 1 / 0, what="divide"))
    out["zmq made"] = ("zmq", "cpu") in ringcomm.runtime.session.current().transports
    x = torch.full((3,), float(rank + 1))
    ringcomm.all_reduce(x, timeout=60)  # the world goes on
    out["after"] = x.tolist()
    return out


def test_a_collective_in_a_job_on_a_transport_not_set_up_is_refused_naming_it() -> None:
    for rank, r in enumerate(run_pooled(_job_on_a_new_transport_rank, 2, timeout=120)):
        assert r["all_reduce"].startswith(f"CommError: rank {rank}: all_reduce(4 x float32, ring over zmq) was "
                                          "refused: it runs inside a job"), r
        assert "'zmq' transport for cpu, which is not set up yet; call ringcomm.init('zmq', 'cpu') first" in (
            r["all_reduce"])
        assert r["init"].startswith(f"CommError: rank {rank}: init('zmq') was refused: it runs inside a job"), r
        assert r["raised"].startswith("ZeroDivisionError"), r
        assert not r["zmq made"], "the transport was set up on the comm thread"
        assert r["after"] == [3.0] * 3
