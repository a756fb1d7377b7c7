"""The session: everything ringcomm keeps for one default process group (one "world").

::

    Session (one per init_process_group)
      store, prefix        the default group's store; keys unique to this world
      liveness             the heartbeat thread (liveness.py)
      queue                the comm thread: collectives run one at a time, in issue order (comm_queue.py)
      transports           one per (name, device type), made on first use, collectively
      scratch              receive buffers (buffers.py), used by one collective at a time
      calls                collectives begun in this world: the same-call check's key
      board                the check's channel when every rank is on one host (board.py)
      tuning               rank 0's fit for algo="auto", the same on every rank (auto.py)

**Setting up a transport** is collective (``dist.new_group``, a ZeroMQ
rendezvous), so a rank that asks for a different transport, or never asks
because its call was refused, would leave the others waiting inside the
backend until the store's own timeout. So every rank first says in the store
which transport it is about to make (``gather``), waits for all of them within
the call's deadline, watching the missing ranks' heartbeats, and only then
makes it; a different answer is a ``MismatchError`` on every rank.

**After a failed collective** (a timeout, a dead peer, a malformed message,
but also an out-of-memory error or a Ctrl-C in the middle: anything but a
``MismatchError``, which every rank raises alike before data moves) the ranks
are out of step, and a receive of the failed call may still be posted into a
buffer that later calls reuse. So ``failed`` keeps the first such error (an
error that is not a ``CommError`` is wrapped in one) and later calls raise at
once, naming it, instead of reducing garbage or waiting for peers that have
moved on; the peers waiting on this rank in that call learn it at once
(``liveness.give_up``). Re-initialise the process group to go on.

A new ``init_process_group`` after a destroy gets a new session; the old one is
closed (its transports closed, its heartbeat stopped).
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from .auto import Fits, choose, load_local, parse_fits
from .board import CallBoard
from .buffers import ScratchPool
from .comm_queue import CommQueue
from .errors import CommError, CommTimeoutError, MismatchError, PeerError
from .liveness import DEAD_NOTE, Liveness
from .settings import heartbeat_s, liveness_s
from .shm import host_identity, require_x86_linux
from .transport import Transport, TransportKind

__all__ = ["Session", "SetupContext", "current", "shutdown"]


class SetupContext:
    """What a transport factory gets: the store, this rank's place, a key prefix of its own, and
    ``gather`` for its rendezvous."""

    def __init__(self, session: Session, prefix: str, deadline: float, what: str) -> None:
        self.store = session.store
        self.rank = session.rank
        self.world_size = session.world_size
        self.liveness = session.liveness
        self.prefix = prefix  # unique to this setup: "<world prefix>/setup/<n>"
        self._session, self._deadline, self._what = session, deadline, what

    def gather(self, name: str, value: str) -> list[str]:
        """Every rank's ``value`` for ``name`` (collective), by rank: ``Session.gather``, so a rank
        that died, or failed its own set-up and gave up, ends the wait at once (``PeerError``)."""
        return self._session.gather(f"{self.prefix}/{name}", value, self._deadline, self._what)


class Session:
    """ringcomm's state for one default process group; see the module docstring."""

    def __init__(self, world: Any, store: Any, rank: int, world_size: int) -> None:
        self.world = world
        # Connections of our own to the default group's store: a store client runs one request
        # at a time, so a blocking wait of the same-call check on the shared client would hold up
        # the heartbeat and every other user of the store in this process (torch's, the caller's).
        self.store = _own_client(store)
        self.rank, self.world_size = rank, world_size
        # Every rank adds 1 once per world, so a re-initialised group that reuses the
        # store gets fresh keys: all ranks of world g read a value in (g*P, (g+1)*P].
        joined = int(store.add("ringcomm/worlds", 1))
        self.prefix = f"ringcomm/{(joined - 1) // world_size}"
        stale = liveness_s()
        self.liveness: Liveness | None = None
        if stale > 0 and world_size > 1:
            self.liveness = Liveness(_own_client(store), self.prefix, rank, world_size, heartbeat_s(), stale)
        self.queue = CommQueue(f"ringcomm-comm-r{rank}")
        self.scratch = ScratchPool()
        self.transports: dict[tuple[str, str], Transport] = {}
        self.calls = 0
        #: The first collective failure in this world (see the module docstring); None while healthy.
        self.failed: CommError | None = None
        self._setups = 0
        self._board: CallBoard | None = None
        self._board_decided = False
        self._fits: Fits | None = None
        self._fits_lock = threading.Lock()
        self._picks: dict[tuple[str, int], Any] = {}
        if rank == 0:  # auto's fit: rank 0's, published for everyone (read where first needed)
            fits = load_local()
            store.set(self.key("tune"), json.dumps({"source": fits.source, "fits": _plain(fits)}))
        self._closed = False

    def key(self, *parts: object) -> str:
        """A store key unique to this world."""
        return "/".join([self.prefix, *map(str, parts)])

    def begin_call(self) -> int:
        """Number the next collective (called in queue order, so the same on every rank).

        Raises:
            CommError: an earlier collective failed (``failed``); this one is not started.
        """
        if self.failed is not None:
            raise CommError(
                f"rank {self.rank}: an earlier collective failed ({self.failed}); the ranks are out of "
                "step, so this one was not started; re-initialise the process group to go on"
            )
        n = self.calls
        self.calls += 1
        if self.liveness is not None:
            self.liveness.call = n
        return n

    # --- agreeing through the store ---

    def gather(self, base: str, value: str, deadline: float, what: str) -> list[str]:
        """Publish ``value`` under ``base``/rank and return every rank's value, by rank.

        One blocking store wait, until ``deadline`` (a ``time.monotonic()`` value).
        Meanwhile the heartbeat thread writes a note into the key of a missing rank
        that is dead or gave up (``liveness.py``), which ends the wait: ``PeerError``
        naming it. At the deadline, ``CommTimeoutError`` naming the missing ranks.
        """
        self.store.set(f"{base}/{self.rank}", value)
        keys = [f"{base}/{r}" for r in range(self.world_size)]
        live = self.liveness
        start = time.monotonic()
        if live is not None:
            live.slots = list(enumerate(keys))
        try:
            self.store.wait(keys, timedelta(seconds=max(deadline - start, 1e-3)))
        except RuntimeError:  # DistStoreError: the deadline passed
            missing = [r for r in range(self.world_size) if not self.store.check([keys[r]])]
            if missing:
                raise CommTimeoutError(
                    self.rank,
                    missing[0],
                    what,
                    max(deadline - start, 0.0),  # what this wait was allowed: the call's time left
                    f"ranks {missing} did not reach it (a different call, a refused call, or check off there?)",
                ) from None
        finally:
            if live is not None:
                live.slots = None
        values = [v.decode() for v in self.store.multi_get(keys)]
        for r, v in enumerate(values):
            if v.startswith(DEAD_NOTE):
                raise PeerError(self.rank, r, what, v[len(DEAD_NOTE) :])
        return values

    def board(self, deadline: float) -> CallBoard | None:
        """The call board, set up at the world's first check (collective); None when the ranks are
        on several hosts (or not on x86-64 Linux): the check then goes through the store."""
        if not self._board_decided:
            hosts = self.gather(self.key("board-host"), host_identity(), deadline, "setting up the call board")
            try:
                require_x86_linux("the call board")
                one_host = len(set(hosts)) == 1
            except ValueError:
                one_host = False
            if one_host:
                base, what = self.key("board"), "setting up the call board"
                self._board = CallBoard(
                    lambda name, value: self.gather(f"{base}/{name}", value, deadline, what),
                    self.rank,
                    self.world_size,
                    self.liveness,
                )
            self._board_decided = True
        return self._board

    def tuning(self, deadline: float | None = None) -> Fits:
        """The fit ``algo="auto"`` uses in this world: rank 0's, read from the store once.

        Raises:
            CommTimeoutError: rank 0 has not published it by ``deadline`` (default: 30 s from now).
        """
        with self._fits_lock:
            if self._fits is None:
                key = self.key("tune")
                wait_s = (deadline - time.monotonic()) if deadline is not None else 30.0
                try:
                    self.store.wait([key], timedelta(seconds=max(wait_s, 1e-3)))
                except RuntimeError:
                    raise CommTimeoutError(
                        self.rank, 0, "reading rank 0's tune file", max(wait_s, 0.0),
                        "rank 0 has made no ringcomm call in this process group yet",
                    ) from None
                doc = json.loads(self.store.get(key).decode())
                self._fits = parse_fits(json.dumps({"fits": doc["fits"]}), doc["source"])
            return self._fits

    def auto_pick(self, transport: str, nbytes: int, deadline: float) -> Any:
        """The algorithm ``algo="auto"`` runs for ``nbytes`` on ``transport`` (remembered per size)."""
        key = (transport, nbytes)
        spec = self._picks.get(key)
        if spec is None:
            from .algorithms import ALGOS

            spec = ALGOS[choose(self.tuning(deadline), transport, self.world_size, nbytes).algo]
            if len(self._picks) < 4096:  # a training run has a few bucket sizes; bound it anyway
                self._picks[key] = spec
        return spec

    def forget(self, base: str) -> None:
        """Delete this rank's key under ``base`` (every rank has read it; see fingerprint.py)."""
        self.store.delete_key(f"{base}/{self.rank}")

    # --- transports ---

    def transport(self, kind: TransportKind, device_type: str, deadline: float) -> Transport:
        """The transport ``kind`` for ``device_type``: the cached one, or a new one made collectively."""
        cached = self.transports.get((kind.name, device_type))
        if cached is not None:
            return cached
        if self.failed is not None:  # the peers are past the failed call: no new set-up with them
            raise CommError(
                f"rank {self.rank}: an earlier collective failed ({self.failed}); the ranks are out of "
                "step, so no transport is set up; re-initialise the process group to go on"
            )
        n = self._setups
        self._setups += 1
        base = self.key("setup", n)
        wanted = f"{kind.name}:{device_type}"
        answers = self.gather(base, wanted, deadline, f"setting up transport {wanted}")
        if any(a != wanted for a in answers):
            by_value: dict[str, list[int]] = {}
            for r, a in enumerate(answers):
                by_value.setdefault(a, []).append(r)
            described = "; ".join(f"ranks {ranks} {value}" for value, ranks in by_value.items())
            raise MismatchError(
                f"rank {self.rank}: ranks set up different transports ({described}); nothing was sent"
            )
        try:
            setup = SetupContext(self, base, deadline, f"setting up transport {wanted}")
            transport = kind.factory(device_type, setup)  # type: ignore[call-arg]
        except BaseException:
            # This rank's half of the set-up failed (a socket, /dev/shm): the others wait in its
            # rendezvous; giving up ends their wait at once, naming this rank.
            if self.liveness is not None:
                self.liveness.give_up(self.liveness.call)
            raise
        self.transports[(kind.name, device_type)] = transport
        return transport

    def refuse_setup(self, reason: str) -> None:
        """Take the next set-up's turn with ``reason`` instead of a transport (``init`` refused on
        this rank only): the others' ``gather`` then differs at once, a ``MismatchError`` naming it."""
        n = self._setups
        self._setups += 1
        self.store.set(f"{self.key('setup', n)}/{self.rank}", reason[:300])

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued collectives, then close transports and stop the heartbeat.

        Raises:
            CommError: the comm thread is still inside a collective after ``timeout``
                seconds; nothing is closed under it (the caller must not destroy the
                process group either).
        """
        if self._closed:
            return
        self.queue.close(timeout)  # raises if stuck: then leave everything as it is
        self._closed = True
        for transport in self.transports.values():
            transport.close()
        self.transports.clear()
        if self._board is not None:
            self._board.close()
            self._board = None
        if self.liveness is not None:
            self.liveness.stop()


def _plain(fits: Fits) -> dict:
    """``fits`` as the JSON a tune file holds (the ``"fits"`` member)."""
    return {
        t: {str(p): {a: {"alpha_s": ab[0], "beta_s_per_byte": ab[1]} for a, ab in algos.items()} for p, algos in worlds.items()}
        for t, worlds in fits.by_world.items()
    }


def _own_client(store: Any) -> Any:
    """A new connection to the same store (``Store.clone``), or the store itself if it has none."""
    try:
        return store.clone()
    except (AttributeError, NotImplementedError, RuntimeError):
        return store


_CURRENT: Session | None = None
_LOCK = threading.Lock()


def current() -> Session:
    """The session of the current default process group, made on first use (and the old one closed).

    Raises:
        RuntimeError: torch.distributed is not initialised.
    """
    global _CURRENT
    if not dist.is_initialized():
        raise RuntimeError("ringcomm needs torch.distributed.init_process_group to have been called")
    world = dist.group.WORLD
    with _LOCK:
        session = _CURRENT
        if session is not None and session.world is world:
            return session
        if session is not None:
            try:
                session.close(timeout=1.0)
            except CommError:
                pass  # its thread is stuck in a dead world; nothing to hand over
        store = dist.distributed_c10d._get_default_store()
        _CURRENT = Session(world, store, dist.get_rank(), dist.get_world_size())
        return _CURRENT


def shutdown(timeout: float = 10.0) -> None:
    """Close the current session, if any: queued collectives finish, transports close.

    Call it before ``dist.destroy_process_group``.

    Raises:
        CommError: a collective is still running after ``timeout`` seconds (a peer
            stopped answering); do not destroy the process group under it.
    """
    global _CURRENT
    with _LOCK:
        session = _CURRENT
        if session is None:
            return
        session.close(timeout)
        _CURRENT = None


def _shutdown_at_exit() -> None:
    """Close the session when the interpreter exits, so that no ringcomm thread is inside the backend then.

    A program may end right after a call whose work is still queued (a refusal publishing itself
    to the peers). Python ends its daemon threads where they next take the GIL: one coming back
    from a store wait unwinds through C++ frames that may not unwind, and the process aborts
    ("terminate called without an active exception"). Letting the queue finish first avoids it:
    up to 10 s in a healthy world, 1 s in a failed one (what still runs there waits on a peer that
    is gone), as ``world.finish`` does.
    """
    session = _CURRENT
    if session is None:
        return
    try:
        shutdown(timeout=10.0 if session.failed is None else 1.0)
    except Exception as exc:  # at exit: say it, never raise
        print(f"ringcomm: at exit: {exc}", file=sys.stderr, flush=True)


atexit.register(_shutdown_at_exit)
