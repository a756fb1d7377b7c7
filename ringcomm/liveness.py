"""Liveness: each rank heartbeats through the store, so a waiting rank can tell dead from slow.

A fixed timeout alone cannot tell a dead or frozen peer from a slow one (a large
model's backward pass). So, as PyTorch's watchdog and Horovod's stall inspector
do, every process runs one daemon thread that bumps a counter in the store of
the default process group every ``RINGCOMM_HEARTBEAT_S`` seconds (default 1)::

    rank r's thread, every 1 s:        store.add("ringcomm/liveness/<gen>/r", 1)
    a rank waiting on peer p:          store.add("ringcomm/liveness/<gen>/p", 0)  (a read)

A waiting rank that sees peer p's counter unchanged for ``RINGCOMM_LIVENESS_S``
seconds (default 10) gives up on it with ``PeerError`` ("stopped heartbeating
N s ago (dead or frozen)"), long before the timeout (300 s). A slow peer whose
thread still beats keeps the caller waiting, up to the timeout: the timeout is
the backstop. Silence is measured on the reader's own monotonic clock (it times
how long the counter has not moved), so clocks of different hosts never meet.

A rank that learns a peer failed (``PeerError``) marks itself failed too: it
drives its counter negative and stores why, so ranks waiting on *it* learn at
their next check, instead of one liveness period later.

Where it is used:

- ``ZmqTransport.wait`` reads with a receive timeout anyway; it reads in slices
  of one heartbeat interval and checks the awaited peer between slices. A
  message that is there is read at once: the check costs nothing on the hot path.
- ``TorchTransport.wait`` blocks inside Gloo, which cannot be woken early (a
  Gloo wait that times out cannot be waited on again, and ``abort`` does not
  unblock it). A killed peer closes its sockets and Gloo fails at once; a frozen
  peer is caught by the timeout, whose error then says whether the peer was
  still heartbeating (slow, or not in the same call) or not (dead or frozen).

Limits: the counters live in the store, so the store must outlive the peer
(``run_world`` and torchrun's agent host it outside the workers; with
``init_process_group("env://")`` rank 0 hosts it, and if rank 0 dies the others
fall back to the timeout). A thread that cannot get the GIL for
``RINGCOMM_LIVENESS_S`` (a C extension that holds it) looks dead.
``RINGCOMM_LIVENESS_S=0`` turns liveness off.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from .errors import PeerError

__all__ = ["Liveness", "env_seconds", "for_world", "heartbeat_s", "liveness_s"]

#: Seconds between two heartbeats of a process (override: RINGCOMM_HEARTBEAT_S).
DEFAULT_HEARTBEAT_S = 1.0
#: Seconds of silence after which a peer is declared dead or frozen (override: RINGCOMM_LIVENESS_S).
DEFAULT_LIVENESS_S = 10.0

_FAILED = -(10**15)  # added to a counter to mark "this rank gave up"; any beat count stays negative


def env_seconds(name: str, default: float, allow_zero: bool = False) -> float:
    """Seconds from environment variable ``name`` (``default`` when unset); ValueError names it."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of seconds") from None
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'} seconds, got {value!r}")
    return seconds


def heartbeat_s() -> float:
    """Seconds between heartbeats: RINGCOMM_HEARTBEAT_S or 1 s."""
    return env_seconds("RINGCOMM_HEARTBEAT_S", DEFAULT_HEARTBEAT_S, allow_zero=False)


def liveness_s() -> float:
    """Seconds of peer silence that count as dead: RINGCOMM_LIVENESS_S or 10 s (0: liveness off)."""
    return env_seconds("RINGCOMM_LIVENESS_S", DEFAULT_LIVENESS_S, allow_zero=True)


class Liveness:
    """This rank's heartbeat thread, and its view of the peers' heartbeats.

    Args:
        store: a torch.distributed store shared by all ranks (thread-safe).
        rank, world_size: this process's place in the world.
        interval_s: seconds between heartbeats.
        stale_s: seconds without a heartbeat after which a peer is dead.
    """

    def __init__(self, store: Any, rank: int, world_size: int, interval_s: float, stale_s: float) -> None:
        self.rank, self.world_size = rank, world_size
        self.interval_s, self.stale_s = interval_s, stale_s
        self._store = store
        # Every rank adds 1 once per generation of process group, so a re-initialised
        # group that reuses the store gets fresh keys (as ZmqTransport's rendezvous does).
        joined = int(store.add("ringcomm/liveness/joined", 1))
        self._prefix = f"ringcomm/liveness/{(joined - 1) // world_size}"
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (counter, monotonic time it changed)
        #: The peer a blocking wait is on now (set by TorchTransport.wait): the thread watches it.
        self.awaiting: int | None = None
        self._warned: set[int] = set()
        self._stop = threading.Event()
        self._beat()  # one beat now: peers that look before our first interval see us
        self._thread = threading.Thread(target=self._run, name="ringcomm-heartbeat", daemon=True)
        self._thread.start()

    def _key(self, rank: int) -> str:
        return f"{self._prefix}/{rank}"

    def _beat(self) -> bool:
        try:
            self._store.add(self._key(self.rank), 1)
            return True
        except Exception:  # the store is gone: the world is ending, nobody to tell
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s) and self._beat():
            peer = self.awaiting
            if peer is not None:
                self._watch(peer)

    def _watch(self, peer: int) -> None:
        """Follow the peer a blocking wait is stuck on; warn once if it goes silent (a stall report)."""
        silent = self.silence(peer)
        if silent is not None and silent >= self.stale_s and peer not in self._warned:
            self._warned.add(peer)
            print(
                f"ringcomm: rank {self.rank}: waiting on rank {peer}, which stopped heartbeating "
                f"{silent:.1f} s ago (dead or frozen); this wait fails at its timeout",
                file=sys.stderr,
                flush=True,
            )

    def silence(self, peer: int) -> float | None:
        """Seconds since this rank last saw ``peer``'s counter move; None if the store is unreachable.

        The first look at a peer starts its clock: a peer is never judged on less
        than ``stale_s`` of watching. ``float("inf")`` means the peer marked itself failed.
        """
        now = time.monotonic()
        try:
            count = int(self._store.add(self._key(peer), 0))
        except Exception:
            return None
        if count < 0:
            return float("inf")
        last = self._seen.get(peer)
        if last is None or last[0] != count:
            self._seen[peer] = (count, now)
            return 0.0
        return now - last[1]

    def check(self, peer: int, op: str) -> None:
        """Raise ``PeerError`` if ``peer`` has been silent for ``stale_s`` seconds or gave up."""
        silent = self.silence(peer)
        if silent is None or silent < self.stale_s:
            return
        if silent == float("inf"):
            detail = "it gave up after a failure of its own (see that rank's error)"
        else:
            detail = (
                f"peer rank {peer} stopped heartbeating {silent:.1f} s ago (dead or frozen); "
                f"liveness limit {self.stale_s:g} s (RINGCOMM_LIVENESS_S)"
            )
        self.mark_failed()
        raise PeerError(self.rank, peer, op, detail)

    def describe(self, peer: int) -> str:
        """A phrase for a timeout's message: was ``peer`` still heartbeating?"""
        silent = self.silence(peer)
        if silent is None:
            return "its heartbeat could not be read (store unreachable)"
        if silent == float("inf"):
            return "it had given up after a failure of its own"
        if silent < self.stale_s:
            return "it was still heartbeating (alive: slow, or not in the same all_reduce)"
        return f"it stopped heartbeating {silent:.1f} s ago (dead or frozen)"

    def mark_failed(self) -> None:
        """Tell the peers this rank gave up: its counter goes negative (read at their next check)."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._store.add(self._key(self.rank), _FAILED)
        except Exception:
            pass

    def stop(self) -> None:
        """Stop heartbeating (peers will see this rank go silent)."""
        self._stop.set()


_CURRENT: tuple[Any, Liveness | None] | None = None
_LOCK = threading.Lock()


def for_world() -> Liveness | None:
    """The liveness of the current default process group, started on first call; None if off.

    Collective on first call per process group (every rank must make its first
    transport, which calls this, in the same order).
    """
    global _CURRENT
    import torch.distributed as dist

    world = dist.group.WORLD
    with _LOCK:
        if _CURRENT is not None and _CURRENT[0] is world:
            return _CURRENT[1]
        if _CURRENT is not None and _CURRENT[1] is not None:
            _CURRENT[1].stop()  # a previous group's thread
        stale = liveness_s()
        live = None
        if stale > 0:
            store = dist.distributed_c10d._get_default_store()
            live = Liveness(store, dist.get_rank(), dist.get_world_size(), heartbeat_s(), stale)
        _CURRENT = (world, live)
        return live
