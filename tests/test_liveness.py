"""The heartbeat thread on its own (liveness.py): no processes, one in-process store wrapped to be
slow, broken or unreachable; each case used to make a live rank look dead, or a dead store look alive."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest
import torch.distributed as dist

from ringcomm.errors import PeerError
from ringcomm.runtime.liveness import Liveness
from ringcomm.tools.spawn import loopback_store

pytestmark = pytest.mark.fast  # every test here is quick


class _Wrapped:
    """A store that passes every call to an in-process HashStore, except where ``hook`` says.

    ``hook(name, args)`` runs before each call; it may sleep or raise.
    """

    _METHODS = {"add", "check", "get", "set", "compare_set", "wait", "multi_get", "delete_key"}

    def __init__(self, base: Any, hook: Any) -> None:
        self.base, self.hook = base, hook
        self.underlying_store = base  # as a PrefixStore says what it wraps (errors name the base)

    def __getattr__(self, name: str) -> Any:
        if name not in self._METHODS:
            raise AttributeError(name)
        method = getattr(self.base, name)

        def call(*args: Any) -> Any:
            self.hook(name, args)
            return method(*args)

        return call


def _beats(store: Any, rank: int = 0) -> int:
    return int(store.add(f"w/liveness/{rank}", 0))


def _stop(*lives: Liveness | None) -> None:
    for live in lives:
        if live is not None:
            live.stop()


def test_a_slow_watch_does_not_delay_this_ranks_own_beats() -> None:
    """Reading a peer's counter takes 2 s (a loaded store); this rank still beats every interval.

    The watch round trips ran inline in the heartbeat loop: a beat, then 2 s reading the peer,
    then the next beat; peers then took this live rank for dead."""
    base = dist.HashStore()

    def slow_reads(name: str, args: tuple) -> None:
        if name == "add" and args[1] == 0:  # a read of a counter; beats add 1
            time.sleep(2.0)

    live = None
    try:
        live = Liveness(_Wrapped(base, slow_reads), "w", 0, 2, interval_s=0.05, stale_s=60)
        live.awaiting = 1  # a blocking wait on rank 1: the thread watches it
        time.sleep(0.3)
        before = _beats(base)
        time.sleep(1.5)  # 30 intervals
        beaten = _beats(base) - before
        assert beaten >= 5, f"{beaten} beats in 1.5 s at 0.05 s intervals while a watch read was slow"
    finally:
        _stop(live)


class _BrokenStream:
    """A stderr that fails every write (closed pipe, a detached daemon)."""

    def write(self, text: str) -> int:
        raise OSError("stderr is gone (injected)")

    def flush(self) -> None:
        raise OSError("stderr is gone (injected)")


@pytest.mark.parametrize("trouble", ["a failed beat", "a silent peer"])
def test_the_heartbeat_survives_a_message_it_cannot_print(monkeypatch: pytest.MonkeyPatch, trouble: str) -> None:
    """Its messages go to stderr; a write that raised there ended the thread, silently, so this
    live rank stopped beating and its peers took it for dead."""
    base = dist.HashStore()
    tries = {"beats": 0}

    def two_failed_beats(name: str, args: tuple) -> None:
        if trouble == "a failed beat" and name == "add" and args[0] == "w/liveness/0" and args[1] == 1:
            tries["beats"] += 1
            if tries["beats"] in (2, 3):  # the first (in the constructor) works, then two fail
                raise RuntimeError("store briefly unreachable (injected)")

    monkeypatch.setattr(sys, "stderr", _BrokenStream())
    live = None
    try:
        live = Liveness(_Wrapped(base, two_failed_beats), "w", 0, 2, interval_s=0.05, stale_s=0.2)
        if trouble == "a silent peer":
            live.awaiting = 1  # rank 1 never beats: a stall report after 0.2 s
        time.sleep(1.0)
        before = _beats(base)
        time.sleep(0.5)
        assert _beats(base) > before, "the heartbeat thread stopped beating"
        alive = [t.name for t in threading.enumerate() if t.name.startswith("ringcomm-") and t.is_alive()]
        assert "ringcomm-heartbeat" in alive and "ringcomm-watch" in alive, alive
    finally:
        _stop(live)


def test_an_unreachable_store_reads_as_unknown_then_fails_naming_the_store() -> None:
    """Every read of the store fails (its connection broke) while the beats still get through.

    A read that failed counted as "alive": a rank waiting on a dead peer waited until its
    timeout, and never said why. Now: no verdict for the liveness limit, then an error that
    names the store and its last error."""
    base = dist.HashStore()

    def reads_fail(name: str, args: tuple) -> None:
        if not (name == "add" and args[1] == 1):
            raise RuntimeError("Connection reset by peer (injected)")

    live = None
    try:
        live = Liveness(_Wrapped(base, reads_fail), "w", 0, 2, interval_s=0.05, stale_s=0.5)
        live.check(1, "recv")  # unknown yet: no verdict before the liveness limit
        assert "could not be read" in live.describe(1)
        with pytest.raises(PeerError, match=r"store \(HashStore\) .*Connection reset by peer \(injected\)"):
            end = time.monotonic() + 5
            while time.monotonic() < end:
                live.check(1, "recv")
                time.sleep(0.05)
    finally:
        _stop(live)


def test_a_store_is_named_by_its_address() -> None:
    from ringcomm.runtime.liveness import describe_store

    server = loopback_store(1)
    assert describe_store(dist.PrefixStore("x", server)) == f"TCPStore at 127.0.0.1:{server.port}"
    assert describe_store(dist.HashStore()) == "HashStore"
