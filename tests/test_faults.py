"""A peer dies or freezes in the middle of an all_reduce: every survivor raises, in time, naming it.

The grid: fault {exit, kill, stop} x algo {ring, ps, naive} x transport
{torch, zmq, shm}, on 3 ranks. Rank 1 is the victim, so rank 0 (which sends to it in
the ring, and is the server of ps and the root of naive) and rank 2 (which
receives from it) survive. The victim completes one all_reduce, then, in the
second, passes the same-call check and faults at its first message of the
algorithm, as the survivors wait on it:

    exit   os._exit(3)                      (a crash: sockets closed by the kernel)
    kill   SIGKILL to itself                (kill -9)
    stop   SIGSTOP to itself                (frozen: sockets stay open, nothing moves)
    slow   sleeps 1.5 liveness limits, then goes on (alive: its heartbeat never stops)

Each survivor must raise ``CommError`` (not return, not hang) within the
timeout plus slack, naming a peer and the operation; for "slow" every rank must
finish with the right sum. Each test records what the survivors did and how
long after the fault; with RINGCOMM_RELIABILITY_OUT=path.jsonl set it appends
one JSON line per case there, and ``python -m analysis.reliability path.jsonl``
renders the table in the README's reliability section.

Settings: timeout 6 s, heartbeat every 0.5 s, liveness limit 3 s, so each case
takes a few seconds beyond spawning. (A full suite on 2 busy cores has had a rank reach its session
3 s after its peers began waiting for it there: a peer is judged only once it has beaten, see
``liveness.py``.) ZeroMQ binds TCP on 127.0.0.1 here
(RINGCOMM_ZMQ_IPC=0): a killed victim cannot remove an ipc socket file.
Every process is SIGKILLed and joined at the end of its case (SIGKILL also ends
a stopped process).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import time
from datetime import timedelta
from typing import Any

import pytest
import torch
from procs import end_processes  # SIGKILL (stopped ones too), ignoring one already gone

from ringcomm.tools.spawn import loopback_store

P = 3
VICTIM = 1
TIMEOUT_S = 6.0
SLACK_S = 4.0  # spawn jitter on a shared 2-core machine, a heartbeat slice, a cascade hop
NUMEL = 30_000
ENV = {
    "RINGCOMM_HEARTBEAT_S": "0.5",
    "RINGCOMM_LIVENESS_S": "3",
    "RINGCOMM_ZMQ_IPC": "0",
    "OMP_NUM_THREADS": "1",
}
FAULTS = ("exit", "kill", "stop")


def _fault(kind: str, store: Any) -> None:
    """Do to this process what ``kind`` says, noting the wall-clock time first."""
    store.set("fault_t", repr(time.time()))
    if kind == "exit":
        os._exit(3)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    if kind == "slow":
        time.sleep(1.5 * float(ENV["RINGCOMM_LIVENESS_S"]))  # past the limit, within the 6 s timeout


def _arm(comm: Any, kind: str, store: Any) -> None:
    """Make the victim's transport fault at its first message (the same-call check, in the store, is past)."""
    post = comm.post

    def faulty(*args: Any, **kwargs: Any) -> Any:
        comm.post = post  # once
        _fault(kind, store)
        return post(*args, **kwargs)

    comm.post = faulty


def _rank(rank: int, port: int, kind: str, algo: str, transport: str, results: Any) -> None:
    """One process of a faulty world: report (rank, outcome) on ``results``, then leave at once."""
    os.environ.update(ENV)
    import torch.distributed as dist

    import ringcomm
    from ringcomm.errors import CommError

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, P, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=P)
    comm = ringcomm.init(transport)
    x = torch.ones(NUMEL)
    ringcomm.all_reduce(x, algo=algo, transport=transport, timeout=60)  # connections are up
    if rank == VICTIM:
        _arm(comm, kind, store)
    x = torch.full((NUMEL,), float(rank))
    report: dict[str, Any] = {"rank": rank}
    try:
        ringcomm.all_reduce(x, algo=algo, transport=transport, timeout=TIMEOUT_S)
        report.update(outcome="returned", ok=bool((x == P * (P - 1) / 2).all()))
    except CommError as exc:
        report.update(outcome=type(exc).__name__, message=str(exc), peer=getattr(exc, "peer", None))
    except Exception as exc:  # the test fails on these: every failure must be a CommError
        report.update(outcome=type(exc).__name__, message=str(exc)[:300], peer=None)
    report["after_fault_s"] = time.time() - float(store.get("fault_t"))
    results.put(report)
    results.close()
    results.join_thread()
    if transport != "torch":
        comm.close()
    os._exit(0)  # as a failed worker would; no teardown that waits on the dead


def _state(pid: int) -> str:
    """The process state letter from /proc (R, S, T for stopped, Z, ...) or '-' if gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "-"


def _context() -> Any:
    """The suite's fork server (conftest), which has imported torch once: a world starts in about a second, not ten."""
    from ringcomm.tools import spawn

    return spawn.context()[0]


def run_faulty_world(kind: str, algo: str, transport: str) -> dict[str, Any]:
    """Run one case; return the survivors' reports and what became of the victim."""
    store = loopback_store(P + 1)
    ctx = _context()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(r, store.port, kind, algo, transport, results)) for r in range(P)
    ]
    for proc in procs:
        proc.start()
    expected = P if kind == "slow" else P - 1
    reports: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 60 + TIMEOUT_S + SLACK_S
    victim_state = "-"
    try:
        while len(reports) < expected and time.monotonic() < deadline:
            try:
                report = results.get(timeout=0.5)
                reports[report["rank"]] = report
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for r, p in enumerate(procs) if r != VICTIM):
                    break  # a survivor crashed without reporting
        victim_state = _state(procs[VICTIM].pid)
    finally:
        end_processes(procs)  # SIGKILL: ends the stopped victim too
        results.close()
        del store
    return {
        "reports": reports,
        "victim_exitcode": procs[VICTIM].exitcode,
        "victim_state": victim_state,
        "orphans": [p.pid for p in procs if p.is_alive()],
    }


def _record(kind: str, algo: str, transport: str, run: dict[str, Any], wall_s: float) -> None:
    path = os.environ.get("RINGCOMM_RELIABILITY_OUT")
    if not path:
        return
    row = {
        "fault": kind,
        "algo": algo,
        "transport": transport,
        "world_size": P,
        "victim": VICTIM,
        "timeout_s": TIMEOUT_S,
        "liveness_s": float(ENV["RINGCOMM_LIVENESS_S"]),
        "heartbeat_s": float(ENV["RINGCOMM_HEARTBEAT_S"]),
        "survivors": [run["reports"][r] for r in sorted(run["reports"])],
        "world_wall_s": wall_s,
    }
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


CASES = [(k, a, t) for t in ("torch", "zmq", "shm") for a in ("ring", "ps", "naive") for k in FAULTS]


@pytest.mark.parametrize(("kind", "algo", "transport"), CASES)
def test_every_survivor_raises_in_time_naming_the_peer(kind: str, algo: str, transport: str) -> None:
    start = time.monotonic()
    run = run_faulty_world(kind, algo, transport)
    _record(kind, algo, transport, run, time.monotonic() - start)
    assert run["orphans"] == []
    reports = run["reports"]
    assert sorted(reports) == [r for r in range(P) if r != VICTIM], f"survivors did not report: {run}"
    for r, report in reports.items():
        assert report["outcome"] in ("PeerError", "CommTimeoutError"), report
        assert f"rank {r}:" in report["message"] and "peer rank" in report["message"], report
        assert "recv" in report["message"] or "send" in report["message"], report
        assert report["after_fault_s"] < TIMEOUT_S + SLACK_S, report
    # at least one survivor names the victim itself (the others may name a survivor that gave up)
    assert any(rep["peer"] == VICTIM for rep in reports.values()), reports
    if kind == "stop":
        assert run["victim_state"] == "T", "the victim was not stopped while the survivors raised"
    else:
        assert run["victim_exitcode"] == (3 if kind == "exit" else -signal.SIGKILL)
    if transport != "torch" or kind != "stop":
        # caught by liveness or by a closed connection, not by the 6 s backstop
        assert max(rep["after_fault_s"] for rep in reports.values()) < TIMEOUT_S, reports


@pytest.mark.parametrize("transport", ["torch", "zmq", "shm"])
def test_a_slow_but_alive_peer_is_waited_for(transport: str) -> None:
    """A peer that stalls for 1.5 liveness limits, heartbeating, is not declared dead."""
    start = time.monotonic()
    run = run_faulty_world("slow", "ring", transport)
    _record("slow", "ring", transport, run, time.monotonic() - start)
    assert run["orphans"] == []
    assert sorted(run["reports"]) == list(range(P)), run
    for report in run["reports"].values():
        assert report["outcome"] == "returned" and report["ok"], report


# --- liveness.py on its own: two Liveness objects on one in-process store, no processes ---


def _pair(stale_s: float = 0.3, store: Any = None) -> tuple[Any, Any]:
    import torch.distributed as dist

    from ringcomm.runtime.liveness import Liveness

    store = store if store is not None else dist.HashStore()
    return (
        Liveness(store, "w", 0, 2, interval_s=0.05, stale_s=stale_s),
        Liveness(store, "w", 1, 2, interval_s=0.05, stale_s=stale_s),
    )


def _check_for(me: Any, seconds: float) -> None:
    """Ask ``me`` about peer rank 1 every 50 ms for ``seconds`` (raises as soon as ``check`` does)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        me.check(1, "recv")
        time.sleep(0.05)


@pytest.mark.fast
def test_liveness_tells_a_silent_peer_from_a_beating_one() -> None:
    from ringcomm.errors import PeerError

    me, peer = _pair()
    try:
        _check_for(me, 0.6)  # two liveness periods of a beating peer: no error
        peer.stop()  # frozen or dead: its counter stops
        with pytest.raises(
            PeerError, match=r"peer rank 1 stopped heartbeating 0\.\d s ago \(dead or frozen\)"
        ):
            _check_for(me, 2)
    finally:
        me.stop()
        peer.stop()


@pytest.mark.fast
def test_a_peer_that_has_not_started_heartbeating_is_waited_for_not_taken_for_dead() -> None:
    """Rank 1 reaches its session 2.5 liveness limits after rank 0 began watching it (a slow start
    on a busy machine): no error meanwhile, and once it beats and then stops, it is judged as usual."""
    import torch.distributed as dist

    from ringcomm.errors import PeerError
    from ringcomm.runtime.liveness import Liveness

    store = dist.HashStore()
    me = Liveness(store, "w", 0, 2, interval_s=0.05, stale_s=0.3)
    peer = None
    try:
        _check_for(me, 0.75)  # counter 0 all along: not judged
        assert "not started heartbeating" in me.describe(1)
        peer = Liveness(store, "w", 1, 2, interval_s=0.05, stale_s=0.3)
        me.check(1, "recv")
        assert "still heartbeating" in me.describe(1)
        peer.stop()
        with pytest.raises(PeerError, match=r"peer rank 1 stopped heartbeating 0\.\d s ago"):
            _check_for(me, 2)
    finally:
        me.stop()
        if peer is not None:
            peer.stop()


@pytest.mark.fast
def test_a_peers_notice_of_giving_up_holds_for_that_call_only() -> None:
    from ringcomm.errors import PeerError

    me, peer = _pair(stale_s=60)
    try:
        me.call = peer.call = 5
        me.check(1, "recv")
        peer.give_up(5)
        with pytest.raises(PeerError, match="gave up on this call after a failure of its own"):
            me.check(1, "recv")
        assert "had given up" in me.describe(1)
        # the next call is judged afresh: the peer still beats, so it is not dead (it used to be
        # marked failed for good, and every later call saw it as dead)
        me.call = peer.call = 6
        me.check(1, "recv")
        assert "still heartbeating" in me.describe(1)
    finally:
        me.stop()
        peer.stop()


class _FlakyStore:
    """A store whose ``add`` fails while ``failing`` is set (the store briefly unreachable)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.inner = dist.HashStore()
        self.failing = False

    def add(self, key: str, value: int) -> int:
        if self.failing and value == 1:  # heartbeats fail; reads go on (they are the peer's)
            raise RuntimeError("store unreachable (injected)")
        return self.inner.add(key, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.fast
def test_the_heartbeat_survives_a_store_that_fails_for_a_while(capfd: pytest.CaptureFixture) -> None:
    store = _FlakyStore()
    me, peer = _pair(stale_s=5.0, store=store)
    try:
        time.sleep(0.2)
        store.failing = True
        time.sleep(0.3)  # several heartbeats fail
        store.failing = False
        before = int(store.inner.add("w/liveness/1", 0))
        time.sleep(0.3)
        after = int(store.inner.add("w/liveness/1", 0))
        assert after > before, "the heartbeat thread stopped at the first failure"
        assert peer.error is None
        err = capfd.readouterr().err
        assert "heartbeat failed" in err and "recovered" in err, err
    finally:
        me.stop()
        peer.stop()


@pytest.mark.fast
def test_a_heartbeat_that_keeps_failing_gives_up_loudly(capfd: pytest.CaptureFixture) -> None:
    from ringcomm.errors import CommError

    store = _FlakyStore()
    me, peer = _pair(stale_s=0.3, store=store)
    try:
        store.failing = True
        time.sleep(1.0)
        assert peer.error is not None and "peers now take this rank for dead" in peer.error
        assert "heartbeat thread stopped" in capfd.readouterr().err
        with pytest.raises(CommError, match="heartbeat has failed"):
            peer.check(0, "recv")  # its own waits say so, rather than wait on peers that gave up on it
    finally:
        me.stop()
        peer.stop()


@pytest.mark.fast
@pytest.mark.parametrize("value", ["-1", "soon"])
def test_liveness_settings_are_validated(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from ringcomm.runtime.settings import heartbeat_s, liveness_s

    monkeypatch.setenv("RINGCOMM_HEARTBEAT_S", value)
    monkeypatch.setenv("RINGCOMM_LIVENESS_S", value)
    with pytest.raises(ValueError, match="RINGCOMM_HEARTBEAT_S"):
        heartbeat_s()
    with pytest.raises(ValueError, match="RINGCOMM_LIVENESS_S"):
        liveness_s()
    monkeypatch.setenv("RINGCOMM_LIVENESS_S", "0")
    assert liveness_s() == 0.0  # off


@pytest.mark.fast
def test_the_heartbeat_survives_a_store_wait_that_ends_while_it_looks() -> None:
    """``slots`` is cleared by the waiting thread when its store wait ends, at any moment; the
    heartbeat thread used to read it twice (test, then use) and died on the None in between."""
    import torch.distributed as dist

    from ringcomm.runtime.liveness import Liveness

    class EndsBetweenTwoReads(Liveness):
        reads = 0

        @property  # type: ignore[override]
        def slots(self) -> list[tuple[int, str]] | None:  # a wait in progress, then over, ...
            self.reads += 1
            return [(1, "w/never-written")] if self.reads % 2 else None

        @slots.setter
        def slots(self, value: object) -> None:
            pass

    store = dist.HashStore()
    me = EndsBetweenTwoReads(store, "w", 0, 2, interval_s=0.02, stale_s=60.0)
    try:
        time.sleep(0.3)
        before = int(store.add("w/liveness/0", 0))
        time.sleep(0.3)
        assert int(store.add("w/liveness/0", 0)) > before, "the heartbeat thread died"
    finally:
        me.stop()
