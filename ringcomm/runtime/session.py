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
(``liveness.give_up``). Re-initialise the process group to go on. ``failed``
keeps a copy of the error without its traceback or chained causes: their frames
would pin the failed call's buffers (shared-memory slot views, which ``unmap``
then cannot free; Gloo work objects) for as long as the world lives.

**The session's id** names its store keys (``ringcomm/<id>/...``), so a group
re-initialised on the same store (or a session made again after ``shutdown``)
gets fresh ones. Rank 0 mints it from a store counter and publishes it under its
own count of the sessions it made on this store; every other rank reads it under
its own count (``_session_prefix``). A ``Session`` that fails half-made counts
once: made again in the same world, it keeps the id (a shared counter that every
rank bumped drifted then, and the ranks waited under different keys). Liveness
starts last in ``Session.__init__``, so one that fails half-made leaves no thread.

A new ``init_process_group`` after a destroy gets a new session; the old one is
closed (its transports closed, its heartbeat stopped). If it cannot be closed
(its comm thread is still inside a collective of the old world), ``current()``
raises ``CommError`` saying so, and keeps it: its transports, mappings and
heartbeat are still in use under that thread, and closing them there would
crash the process. The next call tries again; it succeeds once that collective
ends (at its own timeout at the latest).
"""

from __future__ import annotations

import atexit
import json
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from ..algorithms.buffers import ScratchPool
from ..auto import Fits, choose, load_local, parse_fits
from ..errors import CommError, CommTimeoutError, MismatchError, PeerError
from ..transports.base import Transport, TransportKind
from ..transports.segments import host_identity, require_x86_linux
from .board import CallBoard
from .comm_queue import CommQueue
from .liveness import DEAD_NOTE, Liveness
from .settings import DEFAULT_TIMEOUT_S, default_timeout, heartbeat_s, liveness_s

__all__ = ["Session", "SetupContext", "current", "shutdown"]

T = TypeVar("T")


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

    def __init__(self, world: Any, store: Any, rank: int, world_size: int, prefix: str) -> None:
        """``prefix``: this session's store keys (``_session_prefix``: ``ringcomm/<id>``)."""
        self.world = world
        # Connections of our own to the default group's store: a store client runs one request
        # at a time, so a blocking wait of the same-call check on the shared client would hold up
        # the heartbeat and every other user of the store in this process (torch's, the caller's).
        self.store = _own_client(store)
        self.rank, self.world_size = rank, world_size
        self.prefix = prefix
        stale = liveness_s()  # settings first: a junk value fails before anything is made
        beat_s = heartbeat_s() if stale > 0 and world_size > 1 else 0.0
        self.liveness: Liveness | None = None  # started last, below
        self.queue = CommQueue(f"ringcomm-comm-r{rank}")
        self.scratch = ScratchPool()
        self.transports: dict[tuple[str, str], Transport] = {}
        self.calls = 0
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
        self._failed: CommError | None = None
        # Last: nothing after it can fail, so a Session that fails half-made leaves no thread behind.
        # The beats get a client of their own (a watch's round trips on the other never delay them).
        if stale > 0 and world_size > 1:
            self.liveness = Liveness(
                _own_client(store), prefix, rank, world_size, beat_s, stale, beat_store=_own_client(store)
            )

    @property
    def failed(self) -> CommError | None:
        """The first collective failure in this world (see the module docstring); None while healthy.

        Setting it stores a copy without traceback, cause or context (``_frameless``).
        """
        return self._failed

    @failed.setter
    def failed(self, error: CommError | None) -> None:
        self._failed = None if error is None else _frameless(error)

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

    def auto_pick(self, transport: str, nbytes: int, deadline: float, device: str = "cpu") -> str:
        """The algorithm ``algo="auto"`` runs for ``nbytes`` on ``transport`` with tensors on ``device``
        (a device type: torch over CUDA is NCCL, whose pick never uses Gloo's fits), remembered per
        (transport, device, size). Returns the algorithm's name (the api looks it up in the registry)."""
        key = (transport, device, nbytes)
        name = self._picks.get(key)
        if name is None:
            name = choose(self.tuning(deadline), transport, self.world_size, nbytes, device).algo
            if len(self._picks) < 4096:  # a training run has a few bucket sizes; bound it anyway
                self._picks[key] = name
        return name

    def forget(self, base: str) -> None:
        """Delete this rank's key under ``base`` (every rank has read it; see fingerprint.py)."""
        self.store.delete_key(f"{base}/{self.rank}")

    def run_here(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` in its turn in the comm queue, but on the calling thread, and return its result.

        For work that must happen in the caller's thread and program order: setting up a
        transport (``dist.new_group`` must be called in the same order on every rank, relative
        to the caller's own calls of it; the CUDA device is the thread's own). While collectives
        are queued, ``fn`` waits for them (a no-op takes its turn on the comm thread), then runs
        inline when the queue is idle.
        """
        me = threading.current_thread()

        def attempt() -> tuple[bool, T | None]:
            if threading.current_thread() is not me:  # queued behind others: we are on the comm thread
                return False, None
            return True, fn()

        while True:
            here, result = self.queue.run(attempt, what)
            if here:
                return result  # type: ignore[return-value]

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


def _frameless(error: CommError) -> CommError:
    """A copy of ``error`` (same type, message and attributes) with no traceback, cause or context.

    The traceback's frames hold the failed call's locals (tensors, shared-memory views, Gloo work);
    the chained exceptions hold theirs. The copy is made without calling ``__init__`` (subclasses
    take other arguments), as unpickling does.
    """
    cls = type(error)
    for base in cls.__mro__:  # the first __new__ that fits its layout (CommTimeoutError's is OSError's)
        if "__new__" in vars(base):
            try:
                twin = base.__new__(cls)
                break
            except TypeError:
                continue
    else:  # not expected; keep at least the type's name and the message
        return CommError(f"{cls.__name__}: {error}")
    twin.args = error.args
    twin.__dict__.update(vars(error))
    twin.__traceback__ = twin.__cause__ = twin.__context__ = None
    return twin


def _own_client(store: Any) -> Any:
    """A new connection to the same store (``Store.clone``), or the store itself if it has none."""
    try:
        return store.clone()
    except (AttributeError, NotImplementedError, RuntimeError):
        return store


_CURRENT: Session | None = None
_LOCK = threading.Lock()
# (torch's world group, prefix): minted for a Session not made yet (its first try failed half-made)
_PENDING: tuple[Any, str] | None = None


def _session_prefix(world: Any, store: Any, rank: int) -> str:
    """The next session's key prefix, ``ringcomm/<id>``: rank 0 mints the id, the others read it.

    Rank 0 takes the next id from the store's counter and publishes it under its count of the
    sessions it has made on this store; every rank reads it under its own count, the same as
    rank 0's as long as every rank makes its sessions alike (as before). Kept until a Session is
    made with it: one that failed half-made and is made again in the same world counts nothing.

    Raises:
        CommTimeoutError: rank 0 has not published the id within RINGCOMM_TIMEOUT (or 300 s).
    """
    global _PENDING
    if _PENDING is not None and _PENDING[0] is world:
        return _PENDING[1]
    joined = int(store.add(f"ringcomm/joined/{rank}", 1))
    slot = f"ringcomm/world-id/{joined}"
    if rank == 0:
        store.set(slot, str(int(store.add("ringcomm/worlds", 1))))
    else:
        try:
            wait_s = default_timeout()
        except ValueError:  # a junk RINGCOMM_TIMEOUT: its own error comes with the first call
            wait_s = DEFAULT_TIMEOUT_S
        try:
            store.wait([slot], timedelta(seconds=wait_s))
        except RuntimeError:  # DistStoreError: not there in time
            raise CommTimeoutError(
                rank, 0, "reading this world's id from rank 0", wait_s,
                "rank 0 has made no ringcomm call in this process group yet",
            ) from None
    prefix = f"ringcomm/{int(store.get(slot))}"
    _PENDING = (world, prefix)
    return prefix


def current() -> Session:
    """The session of the current default process group, made on first use (and the old one closed).

    Raises:
        RuntimeError: torch.distributed is not initialised.
        CommError: the old world's session could not be closed: its comm thread is still inside a
            collective (see the module docstring); nothing was started. Call again once it ends.
        CommTimeoutError: rank 0 did not publish the new session's id in time (``_session_prefix``).
    """
    global _CURRENT, _PENDING
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
            except CommError as exc:
                # Closing its transports under a thread still inside one would crash the process;
                # leaving it unsaid would keep the old world's groups, sockets, mappings and heartbeat
                # alive unseen. So: keep it, say so, and try again at the next call.
                raise CommError(
                    f"rank {dist.get_rank()}: ringcomm's session of the previous process group cannot be "
                    f"closed ({exc}); its comm thread, transports (process groups, sockets, shared memory) "
                    "and heartbeat are still held, and this call was not started; call again once that "
                    "collective has ended (at its timeout at the latest)"
                ) from None
            _CURRENT = None
        store = dist.distributed_c10d._get_default_store()
        rank = dist.get_rank()
        _CURRENT = Session(world, store, rank, dist.get_world_size(), _session_prefix(world, store, rank))
        _PENDING = None  # made: the next session (after a shutdown or a new world) gets a new id
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
