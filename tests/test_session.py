"""What used to hang now ends in a clear error on every rank, quickly (session.py, fingerprint.py).

Each case is a call that one rank makes differently: before the session checked
calls and set-ups through the store, the others waited inside ``new_group`` or
a transport's rendezvous until the store's own timeout (minutes), or, with
transports already made, until the collective's timeout (300 s). Every case
here runs with a 60 s timeout and must end in a few seconds.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

import ringcomm
from ringcomm.tools.spawn import run_world

QUICK_S = 15.0  # "quickly": far below the 60 s timeout of each call, with room for a loaded machine


def _timed(fn: object) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        fn()  # type: ignore[operator]
        outcome = "returned"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    return outcome, time.monotonic() - t0


def _refused_first_call_rank(rank: int, p: int) -> dict:
    """Rank 0's first call is refused (bad op) before any transport exists; rank 1's is valid."""
    x = torch.ones(5)
    op = "prod" if rank == 0 else "sum"
    first = _timed(lambda: ringcomm.all_reduce(x, op, transport="zmq", timeout=60))
    y = torch.ones(5)
    second = _timed(lambda: ringcomm.all_reduce(y, transport="zmq", timeout=60))  # in step again
    return {"first": first, "second": second, "y": y.tolist(), "untouched": x.tolist() == [1.0] * 5}


def test_a_call_refused_on_one_rank_fails_on_every_rank_at_once() -> None:
    results = run_world(_refused_first_call_rank, 2, timeout=120)
    (first0, _), (first1, t1) = results[0]["first"], results[1]["first"]
    assert first0.startswith("ValueError: unknown op 'prod'"), first0
    assert first1.startswith("MismatchError") and "ranks [0] refused this all_reduce" in first1, first1
    assert "unknown op 'prod'" in first1  # the peer's reason travels with the refusal
    assert t1 < QUICK_S, f"rank 1 waited {t1:.1f} s for a call rank 0 refused"
    for r in results:
        assert r["untouched"] and r["second"][0] == "returned" and r["y"] == [2.0] * 5, r


def _refusing_ahead_rank(rank: int, p: int, channel: str) -> dict:
    """Rank 0 refuses three calls in a row at once; rank 1 makes them (valid there) a second later.

    A refusal used to publish and move on without reading the others' call: rank 0's third
    refusal then overwrote (board) or deleted (store) its refusal of the first call before
    rank 1 had read it, and rank 1 waited for it until the timeout.
    """
    if channel == "store":  # ranks on "different hosts": the check goes through the store
        from ringcomm.runtime import session

        session.host_identity = lambda: f"host {rank}"
    op = "prod" if rank == 0 else "sum"
    outcomes = []
    for _ in range(3):
        if rank == 1:
            time.sleep(0.5)  # rank 0 is well ahead
        outcomes.append(_timed(lambda: ringcomm.all_reduce(torch.ones(4), op, timeout=20)))
    y = torch.ones(4)
    ringcomm.all_reduce(y, timeout=20)
    return {"outcomes": outcomes, "y": y.tolist()}


@pytest.mark.parametrize("channel", ["board", "store"])
def test_a_rank_that_refuses_calls_in_a_row_stays_in_step(channel: str) -> None:
    for rank, r in enumerate(run_world(_refusing_ahead_rank, 2, (channel,), timeout=120)):
        for outcome, seconds in r["outcomes"]:
            expected = "ValueError: unknown op 'prod'" if rank == 0 else "MismatchError"
            assert outcome.startswith(expected), (rank, outcome)
            assert seconds < QUICK_S, (rank, outcome, seconds)
        assert r["y"] == [2.0] * 4, r


def _refused_call_nobody_else_makes_rank(rank: int, p: int) -> dict:
    """Rank 0 refuses a call with ``timeout=3``; rank 1 never makes that call (it is elsewhere,
    alive, until rank 0 is done). The refusal waited the default timeout (300 s) for rank 1 to
    read it, so rank 0's next call stood behind it for minutes; it waits the refused call's own 3 s."""
    ringcomm.init("zmq")  # both ranks in the session: rank 1 heartbeats while it is elsewhere
    store = dist.distributed_c10d._get_default_store()
    done = "tests/rank-0-is-done"  # a key of the test's own, beside ringcomm's
    if rank == 1:
        # alive and silent for exactly as long as rank 0 needs: not a fixed sleep that a slow
        # machine outlasts (rank 1 gone early) or a fast one waits out (25 s for nothing)
        store.wait([done], timedelta(seconds=100))
        return {}
    try:
        refused = _timed(lambda: ringcomm.all_reduce(torch.ones(4), "prod", transport="zmq", timeout=3))
        after = _timed(lambda: ringcomm.all_reduce(torch.ones(4), transport="zmq", timeout=3))
    finally:
        store.set(done, "1")
    return {"refused": refused, "after": after}


def test_a_refusal_waits_for_the_peers_only_as_long_as_the_refused_call_may_take() -> None:
    r0 = run_world(_refused_call_nobody_else_makes_rank, 2, timeout=120)[0]
    assert r0["refused"][0].startswith("ValueError: unknown op 'prod'"), r0
    outcome, seconds = r0["after"]
    assert outcome.startswith("CommError") and "an earlier collective failed" in outcome, outcome
    assert seconds < QUICK_S, f"rank 0's next call waited {seconds:.1f} s behind a refusal of a 3 s call"


def _fails_mid_call_rank(rank: int, p: int) -> dict:
    """Rank 0 fails in the middle of a call with an error that is not a CommError (out of memory).

    It used to leave the world healthy on rank 0 and say nothing to rank 1, which waited for
    rank 0's all-gather until its timeout; rank 0's next call then started out of step.
    """
    from ringcomm.transports import base as transport

    ringcomm.init("zmq")  # waits in slices that look at the peer's notices (a Gloo wait cannot)
    if rank == 0:
        def out_of_memory(*args: object) -> None:
            raise RuntimeError("out of memory (injected)")

        transport.reduce_into = out_of_memory  # rank 0's first reduce of the ring fails
    first = _timed(lambda: ringcomm.all_reduce(torch.ones(8), transport="zmq", timeout=30))
    second = _timed(lambda: ringcomm.all_reduce(torch.ones(8), transport="zmq", timeout=30))
    setup = _timed(lambda: ringcomm.init("shm", timeout=30))  # a new transport after the failure
    return {"first": first, "second": second, "setup": setup}


def test_a_failure_that_is_not_a_comm_error_fails_the_world_on_every_rank_at_once() -> None:
    r0, r1 = run_world(_fails_mid_call_rank, 2, timeout=120)
    assert r0["first"][0] == "RuntimeError: out of memory (injected)", r0
    outcome, seconds = r1["first"]
    assert outcome.startswith("PeerError") and "gave up on this call" in outcome, outcome
    assert seconds < QUICK_S, r1
    for r in (r0, r1):
        assert r["second"][0].startswith("CommError") and "an earlier collective failed" in r["second"][0], r
        assert r["setup"][0].startswith("CommError") and "an earlier collective failed" in r["setup"][0], r
        assert r["setup"][1] < QUICK_S, r
    assert "RuntimeError: out of memory (injected)" in r0["second"][0]


def _different_transports_rank(rank: int, p: int, made_first: bool) -> dict:
    if made_first:  # both transports exist on every rank before the differing call
        ringcomm.init("torch")
        ringcomm.init("zmq")
    x = torch.ones(5)
    transport = "torch" if rank == 0 else "zmq"
    outcome = _timed(lambda: ringcomm.all_reduce(x, transport=transport, timeout=60))
    y = torch.ones(5)
    ringcomm.all_reduce(y, timeout=60)  # a MismatchError leaves the ranks in step
    return {"outcome": outcome, "y": y.tolist(), "untouched": x.tolist() == [1.0] * 5}


@pytest.mark.parametrize("made_first", [False, True], ids=["at-set-up", "transports-made"])
def test_ranks_passing_different_transports_get_a_mismatch_not_a_hang(made_first: bool) -> None:
    for rank, r in enumerate(run_world(_different_transports_rank, 2, (made_first,), timeout=120)):
        outcome, seconds = r["outcome"]
        assert outcome.startswith("MismatchError"), outcome
        assert "transport differs: ranks [0] torch; ranks [1] zmq" in outcome, outcome
        assert seconds < QUICK_S, (rank, seconds)
        assert r["untouched"] and r["y"] == [2.0, 2.0, 2.0, 2.0, 2.0]


def _set_up_different_transports_rank(rank: int, p: int) -> str:
    """ringcomm.init (a set-up with the check left out of it) of different transports."""
    return _timed(lambda: ringcomm.init("torch" if rank == 0 else "zmq", timeout=60))[0]


def test_setting_up_different_transports_is_a_mismatch_on_every_rank() -> None:
    for outcome in run_world(_set_up_different_transports_rank, 2, timeout=120):
        assert outcome.startswith("MismatchError") and "ranks [0] torch:cpu; ranks [1] zmq:cpu" in outcome, outcome


def _refused_init_rank(rank: int, p: int) -> dict:
    """One rank's ringcomm.init is refused (a bad device there); it stays alive (its heartbeat goes
    on) and waits in a barrier, so only the refusal itself can tell the others."""
    outcome = _timed(lambda: ringcomm.init("zmq", device="cuda:x" if rank == 1 else "cpu", timeout=60))
    dist.barrier()
    return {"outcome": outcome}


def test_an_init_refused_on_one_rank_fails_on_every_rank_at_once() -> None:
    results = run_world(_refused_init_rank, 3, timeout=120)
    for rank, r in enumerate(results):
        outcome, seconds = r["outcome"]
        assert seconds < QUICK_S, (rank, outcome, seconds)
        if rank == 1:
            assert outcome.startswith("ValueError") and "'cuda:x'" in outcome, outcome
        else:
            assert outcome.startswith("MismatchError") and "ranks [1] refused (ValueError" in outcome, outcome


def _failing_set_up_rank(rank: int, p: int, transport: str) -> dict:
    """Rank 1's half of the set-up fails after every rank agreed on the transport (its socket or
    its segment); it stays alive in a barrier, so only its giving up can tell the others."""
    if rank == 1:
        import ringcomm.transports.shm as shm_transport
        import ringcomm.transports.zmq as zmq_transport

        def fail(*args: object, **kwargs: object) -> None:
            raise OSError("injected: no room for this rank's half of the set-up")

        zmq_transport.ZmqTransport._bind = fail  # type: ignore[method-assign]
        shm_transport.share_segments = fail  # type: ignore[assignment]
    outcome = _timed(lambda: ringcomm.init(transport, timeout=60))
    dist.barrier()
    return {"outcome": outcome}


@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_a_set_up_that_fails_on_one_rank_fails_on_every_rank_at_once(transport: str) -> None:
    for rank, r in enumerate(run_world(_failing_set_up_rank, 3, (transport,), timeout=120)):
        outcome, seconds = r["outcome"]
        assert seconds < QUICK_S, (rank, outcome, seconds)
        if rank == 1:
            assert outcome.startswith("OSError: injected"), outcome
        else:
            assert outcome.startswith("PeerError") and "peer rank 1 failed: it gave up" in outcome, outcome


def _default_options_rank(rank: int, p: int) -> list[float]:
    x = torch.full((6,), float(rank))
    options = {"ps_rank": 0} if rank == 0 else {}  # the default, spelled out on one rank only
    ringcomm.all_reduce(x, algo="ps", timeout=60, **options)
    return x.tolist()


def test_an_option_given_as_its_default_is_the_same_call() -> None:
    for values in run_world(_default_options_rank, 3, timeout=120):
        assert values == [3.0] * 6


def _reinit_rank(rank: int, p: int) -> dict:
    """A second init_process_group in the same processes gets fresh transports; the old ones close."""
    first = ringcomm.init("zmq")
    x = torch.ones(4)
    ringcomm.all_reduce(x, transport="zmq")
    store = dist.distributed_c10d._get_default_store()
    ringcomm.shutdown()
    dist.destroy_process_group()
    dist.init_process_group("gloo", store=store, rank=rank, world_size=p)
    second = ringcomm.init("zmq")
    y = torch.ones(4)
    ringcomm.all_reduce(y, transport="zmq")
    return {"closed": first._closed, "fresh": second is not first and not second._closed, "y": y.tolist()}


def test_a_new_process_group_closes_the_old_transports_and_makes_new_ones() -> None:
    for r in run_world(_reinit_rank, 2, timeout=120):
        assert r == {"closed": True, "fresh": True, "y": [2.0] * 4}, r


def _replaced_world_rank(rank: int, p: int) -> bool:
    """Without ringcomm.shutdown: the session notices the new world and closes the old transports."""
    first = ringcomm.init("zmq")
    store = dist.distributed_c10d._get_default_store()
    dist.destroy_process_group()
    dist.init_process_group("gloo", store=store, rank=rank, world_size=p)
    ringcomm.all_reduce(torch.ones(3), transport="zmq")
    return first._closed


def test_transports_of_a_destroyed_world_are_closed_not_dropped() -> None:
    assert run_world(_replaced_world_rank, 2, timeout=120) == [True, True]


@pytest.mark.fast
@pytest.mark.parametrize("value", ["flase", "maybe", "2"])
def test_a_boolean_setting_that_is_not_one_raises_naming_it(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from ringcomm.runtime.settings import check_default, env_bool

    monkeypatch.setenv("RINGCOMM_CHECK", value)
    with pytest.raises(ValueError, match=f"RINGCOMM_CHECK={value!r}"):
        check_default()  # it used to mean "on" for anything but 0/off/false/no
    monkeypatch.setenv("RINGCOMM_ZMQ_IPC", value)
    with pytest.raises(ValueError, match="RINGCOMM_ZMQ_IPC"):
        env_bool("RINGCOMM_ZMQ_IPC", None)


@pytest.mark.fast
@pytest.mark.parametrize("value, expected", [("0", False), ("off", False), ("No", False), ("1", True), ("on", True), ("", True)])
def test_boolean_settings_accept_the_usual_spellings(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool
) -> None:
    from ringcomm.runtime.settings import check_default

    monkeypatch.setenv("RINGCOMM_CHECK", value)
    assert check_default() is expected


def _set_up_thread_rank(rank: int, p: int) -> dict:
    """Record the thread that calls dist.new_group when all_reduce_async needs a new transport:
    first with the queue idle, then with zmq collectives still queued ahead of it."""
    import threading

    from ringcomm.transports import torch as torch_transport

    makers: list[str] = []
    real = dist.new_group

    def recording_new_group(*args: object, **kwargs: object) -> object:
        makers.append(threading.current_thread().name)
        return real(*args, **kwargs)

    torch_transport.dist.new_group = recording_new_group  # type: ignore[assignment]
    x = torch.ones(4)
    ringcomm.all_reduce_async(x, transport="torch", timeout=60).wait()  # first call, queue idle
    ringcomm.init("zmq")
    ringcomm.shutdown()  # a fresh session: no transport, and a queue kept busy below
    ringcomm.init("zmq")
    busy = [ringcomm.all_reduce_async(torch.ones(1 << 16), transport="zmq", timeout=60) for _ in range(8)]
    y = torch.ones(4)
    fut = ringcomm.all_reduce_async(y, transport="torch", timeout=60)  # new transport behind 8 queued calls
    for f in busy:
        f.wait()
    fut.wait()
    return {"makers": makers, "me": threading.current_thread().name, "x": x.tolist(), "y": y.tolist()}


def test_all_reduce_async_sets_a_transport_up_on_the_calling_thread() -> None:
    """dist.new_group ran on ringcomm's comm thread, out of the caller's program order (and off its
    CUDA device) when the first all_reduce_async of a transport made it lazily."""
    for r in run_world(_set_up_thread_rank, 2, timeout=180):
        assert len(r["makers"]) == 2 and set(r["makers"]) == {r["me"]}, r
        assert r["x"] == [2.0] * 4 and r["y"] == [2.0] * 4, r


def _stuck_old_world_rank(rank: int, p: int) -> dict:
    """The old world's comm thread is still inside a collective when a new process group starts."""
    import threading

    from ringcomm.runtime import session as sessions

    old = sessions.current()
    release = threading.Event()
    old.queue.submit(lambda: release.wait(60), "all_reduce(stuck on a dead peer)", torch.futures.Future())
    store = dist.distributed_c10d._get_default_store()
    dist.destroy_process_group()
    dist.init_process_group("gloo", store=store, rank=rank, world_size=p)
    stuck = _timed(sessions.current)
    kept = sessions._CURRENT is old and not old._closed
    release.set()  # that collective ends (its timeout, in real life)
    new = sessions.current()
    return {"stuck": stuck[0], "kept": kept, "closed_then": old._closed, "new": new is not old}


def test_a_session_stuck_in_the_old_world_is_said_not_dropped() -> None:
    """current() swallowed the close's CommError and left the old world's transports and
    heartbeat alive, unseen; now it raises, keeps the old session, and closes it once it can."""
    (r,) = run_world(_stuck_old_world_rank, 1, timeout=120)
    assert r["stuck"].startswith("CommError") and "previous process group cannot be closed" in r["stuck"], r
    assert "all_reduce(stuck on a dead peer) is still running" in r["stuck"], r
    assert r["kept"] and r["closed_then"] and r["new"], r


def _half_made_session_rank(rank: int, p: int) -> dict:
    """Rank 0's first Session fails after it joined the world (an unreadable tune file), and it
    makes one again at its next call; the world's keys must stay the same on every rank."""
    import threading

    from ringcomm.runtime import tuning

    outcomes = []
    if rank == 0:
        real, tries = tuning.load_local, []

        def broken_once() -> object:
            tries.append(1)
            if len(tries) == 1:
                raise OSError("injected: tune file unreadable")
            return real()

        tuning.load_local = broken_once  # type: ignore[assignment]
    # rank 0's first call fails before a byte moves: a refusal, which rank 1's first call hears
    outcomes.append(_timed(lambda: ringcomm.all_reduce(torch.ones(4), timeout=30))[0])
    x = torch.ones(4)
    outcomes.append(_timed(lambda: ringcomm.all_reduce(x, timeout=30))[0])
    beating = [t.name for t in threading.enumerate() if t.name == "ringcomm-heartbeat"]
    return {"outcomes": outcomes, "x": x.tolist(), "beating": beating}


def test_a_session_that_fails_half_made_does_not_shift_the_worlds_keys() -> None:
    """Every rank bumped a shared counter per Session: rank 0's second try bumped it again, and
    rank 1 waited under another world's keys until its timeout (and the failed Session's
    heartbeat thread kept running). Under the same keys, rank 1's first call hears rank 0's
    refusal (a failure before a byte moved is published), and the second calls pair up."""
    r0, r1 = run_world(_half_made_session_rank, 2, timeout=120)
    assert r0["outcomes"] == ["OSError: injected: tune file unreadable", "returned"], r0
    first, second = r1["outcomes"]
    assert first.startswith("MismatchError") and "rank 0" in first and "tune file unreadable" in first, first
    assert second == "returned", r1
    for r in (r0, r1):
        assert r["x"] == [2.0] * 4 and r["beating"] == ["ringcomm-heartbeat"], r


def _failed_call_frames_rank(rank: int, p: int) -> dict:
    """Rank 0's call fails inside the algorithm with a CommError; a tensor made inside it (as a
    shared-memory slot view or a Gloo work object would be) must not outlive the call."""
    import gc
    import weakref

    from ringcomm.errors import CommError
    from ringcomm.runtime import session as sessions
    from ringcomm.transports import base as transport

    ringcomm.init("zmq")
    inside: list[weakref.ref] = []
    if rank == 0:
        def failing_reduce(*args: object) -> None:
            buffer = torch.zeros(1024)  # a local of the failed call's frames
            inside.append(weakref.ref(buffer))
            raise CommError("injected failure inside the call")

        transport.reduce_into = failing_reduce
    outcome = _timed(lambda: ringcomm.all_reduce(torch.ones(8), transport="zmq", timeout=30))[0]
    gc.collect()
    failed = sessions.current().failed
    return {
        "outcome": outcome,
        "pinned": [ref() is not None for ref in inside],
        "failed": f"{type(failed).__name__}: {failed}",
        "frames": failed.__traceback__ is not None or failed.__context__ is not None,
    }


def test_a_failed_world_keeps_the_error_not_the_calls_frames() -> None:
    r0, r1 = run_world(_failed_call_frames_rank, 2, timeout=120)
    assert r0["outcome"] == "CommError: injected failure inside the call", r0
    assert r0["pinned"] == [False], "session.failed kept the failed call's frames (and their tensors) alive"
    assert r0["failed"] == "CommError: injected failure inside the call" and not r0["frames"], r0
    assert r1["failed"].startswith("PeerError") and "gave up on this call" in r1["failed"], r1
    assert not r1["frames"], r1


def _raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as exc:
        return exc


@pytest.mark.fast
@pytest.mark.parametrize(
    "make",
    [
        lambda: _raised(ringcomm.CommError("plain")),
        lambda: _raised(ringcomm.errors.CommTimeoutError(0, 1, "recv", 3.0, "detail")),
        lambda: _raised(ringcomm.errors.PeerError(0, 1, "send", "gone")),
    ],
    ids=["CommError", "CommTimeoutError", "PeerError"],
)
def test_session_failed_keeps_type_message_and_fields_without_frames(make: Any) -> None:
    from ringcomm.runtime.session import _frameless

    error = make()
    error.__context__ = ValueError("a chained cause, with frames of its own")
    kept = _frameless(error)
    assert type(kept) is type(error) and str(kept) == str(error) and vars(kept) == vars(error)
    assert kept.__traceback__ is None and kept.__context__ is None and kept.__cause__ is None
    assert error.__traceback__ is not None  # the raised one, which the caller gets, is left whole
