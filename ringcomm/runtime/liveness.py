"""Liveness: each rank heartbeats through the store, so a waiting rank can tell dead from slow.

A fixed timeout alone cannot tell a dead or frozen peer from a slow one (a large
model's backward pass). So, as PyTorch's watchdog and Horovod's stall inspector
do, every process runs one daemon thread that bumps a counter in the store of
the default process group every ``RINGCOMM_HEARTBEAT_S`` seconds (default 1)::

    rank r's beat thread, every 1 s:   store.add("<world>/liveness/r", 1)
    a rank waiting on peer p:          store.add("<world>/liveness/p", 0)  (a read)

A waiting rank that sees peer p's counter unchanged for ``RINGCOMM_LIVENESS_S``
seconds (default 10) gives up on it with ``PeerError`` ("stopped heartbeating
N s ago (dead or frozen)"), long before the timeout (300 s). A slow peer whose
thread still beats keeps the caller waiting, up to the timeout: the timeout is
the backstop. Silence is measured on the reader's own monotonic clock (it times
how long the counter has not moved), so clocks of different hosts never meet.

**Giving up on a call.** A rank whose collective fails (a peer died, a timeout)
stores the number of that call under its ``gave-up`` key, so ranks waiting on
*it* in the same call learn at their next check, instead of one liveness
period later. The notice is about that call only: the rank keeps heartbeating,
and its next calls are judged afresh.

**Two threads.** One beats and does nothing else; the other watches (the peer
a blocking wait is on, the missing keys of a store wait), each with its own
round trips. A watch that is slow (a loaded store, many missing ranks) never
delays this rank's own beats, so it never makes this live rank look dead.
The beats go through a store client of their own when the session gives one
(``beat_store``): a client runs one request at a time. Neither thread dies of
an error of its own: it logs it and goes on (a message that cannot be printed,
with stderr closed, is logged through ``logging`` instead, or dropped).

**A heartbeat that fails** (the store briefly unreachable) is retried at the
next interval, with one warning on stderr; if it keeps failing for the
liveness limit, the thread says loudly that peers will now take this rank for
dead, records why (``error``), and stops; this rank's own waits then raise
that error instead of waiting on peers that have given up on it, and so does
the start of its next collective (setting ``call``): a rank its peers take for
dead must not keep working.

**A store that cannot be read** says nothing about the peer: for the liveness
limit its verdict is "unknown" (no error yet, and a timeout's message says the
heartbeat could not be read); once every read has failed for that long, the
peer is given up on with an error that names the store (its type and address)
and its last error, instead of counting as alive until the call's timeout.

Where it is used:

- ``ZmqTransport.wait`` reads with a receive timeout anyway; it reads in slices
  of one heartbeat interval and checks the awaited peer between slices. A
  message that is there is read at once: the check costs nothing on the hot path.
- ``TorchTransport.wait`` blocks inside Gloo, which cannot be woken early (a
  Gloo wait that times out cannot be waited on again, and ``abort`` does not
  unblock it). A killed peer closes its sockets and Gloo fails at once; a frozen
  peer is caught by the timeout, whose error then says whether the peer was
  still heartbeating (slow, or not in the same call) or not (dead or frozen).
- The same-call check and a transport's set-up wait in the store
  (``Rendezvous.gather``) for every rank's key, in one blocking wait. Meanwhile the
  watch thread looks at the ranks whose key is still missing, and writes a
  "dead" note into the slot of one that stopped heartbeating or gave up; that
  ends the wait at once, and the waiting rank raises ``PeerError`` naming it.

Limits: the counters live in the store, so the store must outlive the peer
(``run_world`` and torchrun's agent host it outside the workers; with
``init_process_group("env://")`` rank 0 hosts it, and if rank 0 dies the others
fall back to the timeout). A thread that cannot get the GIL for
``RINGCOMM_LIVENESS_S`` (a C extension that holds it) looks dead. A peer is
judged only once it has beaten: one still starting (its counter is 0) is
waited for, and one that dies before its first beat is caught by the timeout
alone, whose message says it never started heartbeating. (A rank that reaches
its session seconds after its peers, on a busy machine, must not be taken for
dead; a full suite on 2 cores once saw a 3 s gap.)
``RINGCOMM_LIVENESS_S=0`` turns liveness off.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from ..errors import CommError, PeerError

__all__ = ["DEAD_NOTE", "Liveness", "describe_store"]

#: What the watch thread writes into a dead rank's missing store key (followed by why).
DEAD_NOTE = "!dead: "


def _say(text: str) -> None:
    """Print ``text`` on stderr; never raise (a closed or broken stderr must not end a thread)."""
    try:
        print(text, file=sys.stderr, flush=True)
    except Exception:
        try:
            logging.getLogger("ringcomm").warning(text)
        except Exception:
            pass  # nowhere left to say it; the thread goes on


def describe_store(store: Any) -> str:
    """The store for an error message: its type, and host:port for a TCP store (wrappers unwrapped)."""
    inner = store
    try:
        for _ in range(8):  # PrefixStore(PrefixStore(TCPStore)): name the one that talks to the network
            wrapped = getattr(inner, "underlying_store", None)
            if wrapped is None:
                break
            inner = wrapped
        host, port = getattr(inner, "host", None), getattr(inner, "port", None)
    except Exception:  # a store that fails even to describe itself
        host = port = None
    where = f" at {host}:{port}" if host is not None and port is not None else ""
    return f"{type(inner).__name__}{where}"


class Liveness:
    """This rank's heartbeat and watch threads, and its view of the peers' heartbeats.

    Args:
        store: a torch.distributed store shared by all ranks (thread-safe).
        prefix: the store keys' prefix, unique to this world (``session.py``).
        rank, world_size: this process's place in the world.
        interval_s: seconds between heartbeats.
        stale_s: seconds without a heartbeat after which a peer is dead, and seconds of failed
            reads after which the store counts as unreachable.
        beat_store: a client of the same store for the beats alone (default: ``store``).
    """

    def __init__(
        self,
        store: Any,
        prefix: str,
        rank: int,
        world_size: int,
        interval_s: float,
        stale_s: float,
        beat_store: Any = None,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.interval_s, self.stale_s = interval_s, stale_s
        self._store = store
        self._beat_store = beat_store if beat_store is not None else store
        self._store_name = describe_store(store)
        self._prefix = f"{prefix}/liveness"
        # peer -> (counter, monotonic time it changed), for the peers that have beaten (counter > 0)
        self._seen: dict[int, tuple[int, float]] = {}
        #: The peer a blocking wait is on now (set by TorchTransport.wait): the thread watches it.
        self.awaiting: int | None = None
        #: (rank, store key) a blocking store wait needs (set by Rendezvous.gather): the thread marks
        #: a dead rank's missing key, which ends the wait.
        self.slots: list[tuple[int, str]] | None = None
        #: The number of the collective this rank is in (set by the API): gave-up notices name it.
        self._call = -1
        #: Why the heartbeat stopped for good (None while it beats).
        self.error: str | None = None
        self._warned: set[int] = set()
        # Reads of the store that failed in a row: (monotonic time of the first, the last error);
        # None while reads work. Written by whichever thread reads, as one tuple.
        self._unreadable: tuple[float, str] | None = None
        self._failing_since: float | None = None  # the beats' failures in a row: since when, how many
        self._failures = 0
        self._stop = threading.Event()
        self._beat_store.add(self._key(rank), 1)  # one beat now: peers that look before our first interval see us
        self._beater = threading.Thread(target=self._beat_loop, name="ringcomm-heartbeat", daemon=True)
        self._watcher = threading.Thread(target=self._watch_loop, name="ringcomm-watch", daemon=True)
        self._beater.start()
        self._watcher.start()

    @property
    def call(self) -> int:
        """The number of the collective this rank is in (set by the session as each one begins)."""
        return self._call

    @call.setter
    def call(self, n: int) -> None:
        # A rank whose heartbeat has given up has told its peers it is dead: they no longer wait
        # for it, so a collective it starts now could only hang or pair with the wrong call. Each
        # collective begins by setting its number here, so refusing here stops the next one (and
        # the training loop above it) with the reason, instead of working on as a ghost.
        if self.error is not None:
            raise CommError(
                f"rank {self.rank}: collective {n} not started: {self.error}; this rank must stop "
                "(is the launcher or the store's host gone?)"
            )
        self._call = n

    def _key(self, rank: int) -> str:
        return f"{self._prefix}/{rank}"

    # --- the two threads ---

    def _beat_loop(self) -> None:
        """Beat every ``interval_s`` until stopped, or until the beats have failed for ``stale_s``."""
        while not self._stop.wait(self.interval_s):
            try:
                if not self._beat():
                    return
            except Exception as exc:  # a bug of ours must not pass for a dead rank: log, beat on
                _say(f"ringcomm: rank {self.rank}: heartbeat thread error ({type(exc).__name__}: {exc}); going on")

    def _beat(self) -> bool:
        """One beat; False once the beats have failed for ``stale_s`` (``error`` then says why)."""
        try:
            self._beat_store.add(self._key(self.rank), 1)
        except Exception as exc:  # the store is a network service: anything can come back
            now = time.monotonic()
            self._failures += 1
            if self._failing_since is None:
                self._failing_since = now
                _say(f"ringcomm: rank {self.rank}: heartbeat failed ({type(exc).__name__}: {exc}); retrying")
            if now - self._failing_since >= self.stale_s:
                self.error = (
                    f"rank {self.rank}'s heartbeat has failed for {now - self._failing_since:.1f} s "
                    f"({self._failures} tries; store {self._store_name}; last: {type(exc).__name__}: {exc}); "
                    "peers now take this rank for dead or frozen"
                )
                _say(f"ringcomm: {self.error}; heartbeat thread stopped")
                return False
            return True
        if self._failing_since is not None:
            _say(f"ringcomm: rank {self.rank}: heartbeat recovered after {self._failures} failed tries")
            self._failing_since, self._failures = None, 0
        return True

    def _watch_loop(self) -> None:
        """Every ``interval_s``: look at the peer a blocking wait is on, and at a store wait's missing keys."""
        while not self._stop.wait(self.interval_s):
            try:
                # Read each field once: the waiting thread clears it when its wait ends, and a second
                # read could see None.
                peer, slots = self.awaiting, self.slots
                if peer is not None:
                    self._watch(peer)
                if slots:
                    self._watch_slots(slots)
            except Exception as exc:  # as in _beat_loop: log, watch on
                _say(f"ringcomm: rank {self.rank}: liveness watch error ({type(exc).__name__}: {exc}); going on")

    def _watch(self, peer: int) -> None:
        """Follow the peer a blocking wait is stuck on; warn once if it goes silent (a stall report)."""
        silent = self.silence(peer)
        if silent is not None and silent >= self.stale_s and peer not in self._warned:
            self._warned.add(peer)
            _say(
                f"ringcomm: rank {self.rank}: waiting on rank {peer}, which stopped heartbeating "
                f"{silent:.1f} s ago (dead or frozen); this wait fails at its timeout"
            )

    def _watch_slots(self, slots: list[tuple[int, str]]) -> None:
        """Write a "dead" note into the missing store key of each rank that is dead or gave up."""
        for rank, key in slots:
            try:
                if rank == self.rank or self._store.check([key]):
                    continue
                reason = self.dead_reason(rank)
                if reason is not None:  # compare_set with "": only if the rank has not written it meanwhile
                    self._store.compare_set(key, "", f"{DEAD_NOTE}{reason}")
            except Exception:
                return  # the store is gone: the wait ends at its deadline

    def silence(self, peer: int) -> float | None:
        """Seconds since this rank last saw ``peer``'s counter move; None if the store is unreachable.

        The first look at a peer starts its clock: a peer is never judged on less
        than ``stale_s`` of watching. A peer that has not beaten yet (counter 0: it
        has not reached this session, a slow start on a busy machine) is not
        judged at all: silence 0, and only the call's timeout ends a wait on it.
        """
        now = time.monotonic()
        try:
            count = int(self._store.add(self._key(peer), 0))
        except Exception as exc:
            self._read_failed(exc)
            return None
        self._unreadable = None
        if count == 0:  # not started: kept out of _seen, which holds the peers that have beaten
            return 0.0
        last = self._seen.get(peer)
        if last is None or last[0] != count:
            self._seen[peer] = (count, now)
            return 0.0
        return now - last[1]

    def gave_up(self, peer: int) -> bool:
        """Whether ``peer`` gave up on the call this rank is in."""
        key = f"{self._prefix}/gave-up/{peer}"
        try:
            if not self._store.check([key]):
                return False
            return int(self._store.get(key)) == self.call
        except Exception as exc:
            self._read_failed(exc)
            return False

    def _read_failed(self, exc: Exception) -> None:
        """Note a failed read of the store (the first of a run keeps its time)."""
        failing = self._unreadable
        self._unreadable = (failing[0] if failing else time.monotonic(), f"{type(exc).__name__}: {exc}")

    def unreadable_reason(self, peer: int) -> str | None:
        """Why ``peer``'s liveness cannot be judged: every read of the store has failed for
        ``stale_s`` seconds (None before that, or while reads work)."""
        failing = self._unreadable
        if failing is None:
            return None
        since, last = failing
        failed_s = time.monotonic() - since
        if failed_s < self.stale_s:
            return None
        return (
            f"the store ({self._store_name}) has failed every read for {failed_s:.1f} s (last: {last}), so "
            f"peer rank {peer}'s heartbeat cannot be read; liveness limit {self.stale_s:g} s (RINGCOMM_LIVENESS_S)"
        )

    def dead_reason(self, peer: int) -> str | None:
        """Why ``peer`` counts as gone for this call (it gave up, it is silent, or the store has not
        been readable for ``stale_s``), or None."""
        if self.gave_up(peer):
            return "it gave up on this call after a failure of its own (see that rank's error)"
        silent = self.silence(peer)
        if silent is None:  # unknown, not alive: after stale_s of failed reads, the store is the reason
            return self.unreadable_reason(peer)
        if silent < self.stale_s:
            return None
        return (
            f"peer rank {peer} stopped heartbeating {silent:.1f} s ago (dead or frozen); "
            f"liveness limit {self.stale_s:g} s (RINGCOMM_LIVENESS_S)"
        )

    def check(self, peer: int, op: str) -> None:
        """Raise if ``peer`` gave up on this call or has been silent for ``stale_s``; or if this rank's
        own heartbeat has stopped (its peers have then given up on it)."""
        if self.error is not None:
            raise CommError(f"rank {self.rank}: {op} with peer rank {peer}: {self.error}")
        reason = self.dead_reason(peer)
        if reason is not None:
            raise PeerError(self.rank, peer, op, reason)

    def describe(self, peer: int) -> str:
        """A phrase for a timeout's message: was ``peer`` still heartbeating?"""
        if self.gave_up(peer):
            return "it had given up on this call after a failure of its own"
        silent = self.silence(peer)
        if silent is None:
            return "its heartbeat could not be read (store unreachable)"
        if peer not in self._seen:  # silence() just read its counter: still 0
            return "it had not started heartbeating (not yet in ringcomm: still starting, or dead before it got there)"
        if silent < self.stale_s:
            return "it was still heartbeating (alive: slow, or not in the same all_reduce)"
        return f"it stopped heartbeating {silent:.1f} s ago (dead or frozen)"

    def give_up(self, call: int) -> None:
        """Tell the peers this rank gave up on call ``call`` (read at their next check)."""
        try:
            self._store.set(f"{self._prefix}/gave-up/{self.rank}", str(call))
        except Exception:
            pass  # the store is gone: peers fall back to the heartbeat and the timeout

    def stop(self) -> None:
        """Stop heartbeating (peers will see this rank go silent)."""
        self._stop.set()
        for thread in (self._beater, self._watcher):  # a watch stuck in a store call is left to exit
            thread.join(timeout=2 * self.interval_s + 1.0)
