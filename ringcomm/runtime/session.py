"""The session: ringcomm's state for one default process group (one "world"), its failure policy,
and which session is current.

::

    Session (one per init_process_group)                       runtime/
      store, prefix        the default group's store; keys unique to this world
      liveness             the heartbeat thread                    liveness.py
      queue                the comm thread: collectives run one at a time, in issue order   comm_queue.py
      rendezvous           agreeing through the store; the transports, one per (name,
                           device type), and the call board made that way   rendezvous.py
      scratch              receive buffers, used by one collective at a time   algorithms/buffers.py
      calls                collectives begun in this world: the same-call check's key   check.py
      tune                 rank 0's fit for algo="auto", the same on every rank, and the picks   tuning.py
      failed               the first failure (below)

    current()  the session of the current default group, made on first use (the old one closed)
    current(group)  a subgroup's (dist.new_group), made on its first use on this rank
    shutdown() closes them all; so does the interpreter's exit (atexit)

**Subgroups** (``group=``): a session per group object, whose rank and size are
this process's in the group; its keys are minted by the group's rank 0 under
the group's global ranks (``mint_prefix``'s scope), its transports are made
among the members only (``SetupContext.group``), and it has its own heartbeat,
call numbers and same-call check. It shares the default group's comm queue: one
comm thread per process, so two groups' collectives on one rank run in issue
order. A new world closes the old world's subgroup sessions with its own.

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
gets fresh ones (``rendezvous.mint_prefix``). A ``Session`` that fails half-made
counts once: made again in the same world, it keeps the id (a shared counter
that every rank bumped drifted then, and the ranks waited under different keys).
Liveness starts last in ``Session.__init__``, so one that fails half-made leaves
no thread.

A new ``init_process_group`` after a destroy gets a new session; the old one is
closed (its transports closed, its heartbeat stopped). If it cannot be closed
(its comm thread is still inside a collective of the old world), ``current()``
raises ``CommError`` saying so, and keeps it: its transports, mappings and
heartbeat are still in use under that thread, and closing them there would
crash the process. The next call tries again; it succeeds once that collective
ends (at its own timeout at the latest).

Why ``current``/``shutdown`` live here rather than in a module of their own: they
are the Session's life cycle (made, kept, closed) and nothing else, and every
caller (the api, the tools, the package root, the tests) reaches them as
``session.current()``; a separate module would import ``Session`` from here and
could not be re-exported here without an import cycle.
"""

from __future__ import annotations

import atexit
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from ..algorithms.buffers import ScratchPool
from ..auto import Fits
from ..errors import CommError
from ..transports.base import Transport, TransportKind
from . import tuning
from .comm_queue import CommQueue
from .liveness import Liveness
from .rendezvous import Rendezvous, mint_prefix, own_client
from .settings import heartbeat_s, liveness_s

__all__ = ["Session", "current", "member_session", "owner_of", "shutdown"]

T = TypeVar("T")


class Session:
    """ringcomm's state for one default process group; see the module docstring."""

    def __init__(
        self,
        world: Any,
        store: Any,
        rank: int,
        world_size: int,
        prefix: str,
        group: Any = None,
        queue: CommQueue | None = None,
    ) -> None:
        """``prefix``: this session's store keys (``rendezvous.mint_prefix``: ``ringcomm/<id>``).

        ``group``: the subgroup (``dist.new_group``) this session serves, None for the default group;
        ``rank`` and ``world_size`` are then this process's place in it. ``queue``: the process's comm
        queue, which a subgroup's session shares with the default group's (not closed by ``close``).
        """
        self.world = world
        self.group = group
        # Connections of our own to the default group's store: a store client runs one request
        # at a time, so a blocking wait of the same-call check on the shared client would hold up
        # the heartbeat and every other user of the store in this process (torch's, the caller's).
        self.store = own_client(store)
        self.rank, self.world_size = rank, world_size
        self.prefix = prefix
        stale = liveness_s()  # settings first: a junk value fails before anything is made
        beat_s = heartbeat_s() if stale > 0 and world_size > 1 else 0.0
        self.liveness: Liveness | None = None  # started last, below
        # One comm thread per process: a subgroup's collectives run in issue order with everyone else's.
        self._owns_queue = queue is None
        self.queue = CommQueue(f"ringcomm-comm-r{rank}") if queue is None else queue
        self.scratch = ScratchPool()
        self.rendezvous = Rendezvous(self.store, prefix, rank, world_size, group)
        self.tune = tuning.WorldTuning(self.store, self.key("tune"), rank, world_size)
        self.calls = 0
        if rank == 0:  # auto's fit: rank 0's, published for everyone (read where first needed)
            tuning.publish(store, self.key("tune"))
        self._closed = False
        self._failed: CommError | None = None
        # Last: nothing after it can fail, so a Session that fails half-made leaves no thread behind.
        # The beats get a client of their own (a watch's round trips on the other never delay them).
        if stale > 0 and world_size > 1:
            self.liveness = Liveness(
                own_client(store), prefix, rank, world_size, beat_s, stale, beat_store=own_client(store)
            )
            self.rendezvous.liveness = self.liveness

    # --- the failure policy ---

    @property
    def failed(self) -> CommError | None:
        """The first collective failure in this world (see the module docstring); None while healthy.

        Setting it stores a copy without traceback, cause or context (``_frameless``).
        """
        return self._failed

    @failed.setter
    def failed(self, error: CommError | None) -> None:
        self._failed = None if error is None else _frameless(error)

    def _refuse_if_failed(self, what: str) -> None:
        if self.failed is not None:  # the peers are past the failed call: nothing more with them
            raise CommError(
                f"rank {self.rank}: an earlier collective failed ({self.failed}); the ranks are out of "
                f"step, so {what}; re-initialise the process group to go on"
            )

    def key(self, *parts: object) -> str:
        """A store key unique to this world."""
        return "/".join([self.prefix, *map(str, parts)])

    def begin_call(self) -> int:
        """Number the next collective (called in queue order, so the same on every rank).

        Raises:
            CommError: an earlier collective failed (``failed``); this one is not started.
        """
        self._refuse_if_failed("this one was not started")
        n = self.calls
        self.calls += 1
        if self.liveness is not None:
            self.liveness.call = n
        return n

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

    # --- what the api asks of the parts (rendezvous.py, tuning.py) ---

    @property
    def transports(self) -> dict[tuple[str, str], Transport]:
        """The transports made in this world, by (transport name, device type)."""
        return self.rendezvous.transports

    def transport(self, kind: TransportKind, device_type: str, deadline: float) -> Transport:
        """The transport ``kind`` for ``device_type``: the cached one, or a new one made collectively
        (``Rendezvous.transport``); none is made in a failed world."""
        cached = self.rendezvous.transports.get((kind.name, device_type))
        if cached is not None:
            return cached
        self._refuse_if_failed("no transport is set up")
        return self.rendezvous.transport(kind, device_type, deadline)

    def refuse_setup(self, reason: str) -> None:
        """``Rendezvous.refuse_setup``: the others' next set-up fails at once, naming ``reason``."""
        self.rendezvous.refuse_setup(reason)

    def tuning(self, deadline: float | None = None) -> Fits:
        """The fit ``algo="auto"`` uses in this world (``WorldTuning.fits``)."""
        return self.tune.fits(deadline)

    def auto_pick(
        self, transport: str, nbytes: int, deadline: float, device: str = "cpu", nodes: tuple[int, int] | None = None
    ) -> str:
        """The algorithm ``algo="auto"`` runs for this call (``WorldTuning.pick``; ``nodes``: ``auto.choose``'s)."""
        return self.tune.pick(transport, nbytes, deadline, device, nodes)

    def close(self, timeout: float = 10.0) -> None:
        """Finish queued collectives, then close transports and stop the heartbeat.

        Raises:
            CommError: the comm thread is still inside a collective after ``timeout``
                seconds; nothing is closed under it (the caller must not destroy the
                process group either).
        """
        if self._closed:
            return
        if self._owns_queue:  # a subgroup's session: the default group's closes the shared queue first
            self.queue.close(timeout)  # raises if stuck: then leave everything as it is
        self._closed = True
        self.rendezvous.close()
        if self.liveness is not None:
            self.liveness.stop()


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


_CURRENT: Session | None = None
_LOCK = threading.Lock()
#: The subgroups' sessions in the current world, by group object (``dist.new_group``'s).
_GROUPS: dict[Any, Session] = {}
#: (torch's world group, prefix) by group (None: the default group): minted for a Session not made
#: yet (its first try failed half-made)
_PENDING: dict[Any, tuple[Any, str]] = {}


def _session_prefix(world: Any, store: Any, rank: int, group: Any = None, scope: str = "") -> str:
    """The next session's key prefix (``rendezvous.mint_prefix``), kept until a Session is made with
    it: one that failed half-made and is made again in the same world counts nothing."""
    pending = _PENDING.get(group)
    if pending is not None and pending[0] is world:
        return pending[1]
    prefix = mint_prefix(store, rank, scope)
    _PENDING[group] = (world, prefix)
    return prefix


def is_default(group: Any) -> bool:
    """Whether ``group`` means the default process group (None, or ``dist.group.WORLD`` itself)."""
    return group is None or group is dist.group.WORLD


def group_place(group: Any) -> tuple[int, int]:
    """This process's (rank, size) in ``group`` (None: the default group), as the collectives number them.

    Raises:
        ValueError: ``group`` is torch's ``GroupMember.NON_GROUP_MEMBER`` (what ``dist.new_group`` gives
            a rank that is not in it) or not a process group at all.
        RuntimeError: torch.distributed is not initialised.
    """
    if not dist.is_initialized():
        raise RuntimeError("ringcomm needs torch.distributed.init_process_group to have been called")
    if is_default(group):
        return dist.get_rank(), dist.get_world_size()
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"rank {dist.get_rank()}: group= is GroupMember.NON_GROUP_MEMBER: this rank is not in that "
            "dist.new_group, so it takes no part in the group's collectives; call them on its members only"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group must be a process group from dist.new_group (or None), got {group!r}")
    rank = dist.get_rank(group)
    if rank < 0:  # a group object from another rank's view: not ours
        raise ValueError(f"rank {dist.get_rank()}: this rank is not a member of group= (global ranks "
                         f"{dist.get_process_group_ranks(group)})")
    return rank, dist.get_world_size(group)


def _close_old_world(session: Session) -> None:
    """Close the previous world's sessions (the default group's first: it owns the comm queue)."""
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
    for sub in _GROUPS.values():
        sub.close()
    _GROUPS.clear()


def current(group: Any = None) -> Session:
    """The session of ``group`` (None: the current default process group), made on first use.

    The default group's session is made first (and the old world's sessions closed); a subgroup's
    shares its comm queue, and its keys are minted by the group's rank 0 under the group's global
    ranks (``mint_prefix``), so every member makes its sessions of that group alike.

    Raises:
        RuntimeError: torch.distributed is not initialised.
        ValueError: this rank is not in ``group`` (``group_place``).
        CommError: the old world's session could not be closed: its comm thread is still inside a
            collective (see the module docstring); nothing was started. Call again once it ends.
        CommTimeoutError: rank 0 did not publish the new session's id in time (``_session_prefix``).
    """
    global _CURRENT
    if not dist.is_initialized():
        raise RuntimeError("ringcomm needs torch.distributed.init_process_group to have been called")
    world = dist.group.WORLD
    default = is_default(group)
    if not default:
        rank, size = group_place(group)  # a non-member is refused before anything is made
    with _LOCK:
        session = _CURRENT
        if session is None or session.world is not world:
            if session is not None:
                _close_old_world(session)
                _CURRENT = None
            store = dist.distributed_c10d._get_default_store()
            grank = dist.get_rank()
            _CURRENT = Session(world, store, grank, dist.get_world_size(), _session_prefix(world, store, grank))
            _PENDING.pop(None, None)  # made: the next session (after a shutdown or a new world) gets a new id
        if default:
            return _CURRENT
        sub = _GROUPS.get(group)
        if sub is not None:
            return sub
        store = dist.distributed_c10d._get_default_store()
        scope = "g" + "-".join(map(str, dist.get_process_group_ranks(group)))
        prefix = _session_prefix(world, store, rank, group, scope)
        sub = Session(world, store, rank, size, prefix, group=group, queue=_CURRENT.queue)
        _PENDING.pop(group, None)
        _GROUPS[group] = sub
        return sub


def member_session(parent: Session, members: tuple[int, ...], name: str) -> Session:
    """A session among ``members`` (ranks of ``parent``'s group, ascending, this rank among them), made
    without ``dist.new_group``; the cached one after the first use.

    For an algorithm that talks in groups of its own inside a call (``hier``: a node's ranks, the
    ranks with one local rank): it runs in queue order, on the comm thread maybe, where no
    ``dist.new_group`` may be called. Its transports are made among the members only, as a
    subgroup's (``SetupContext.group`` is not None: torch makes its Gloo group directly on the store);
    it shares ``parent``'s comm queue and is closed with the world's other sessions. Collective among
    ``members``: each of them makes it at the same call. ``name`` keeps two algorithms' sessions of
    the same members apart.
    """
    key = ("members", parent.prefix, name, members)
    with _LOCK:
        sub = _GROUPS.get(key)
        if sub is not None:
            return sub
        store = dist.distributed_c10d._get_default_store()
        rank = members.index(parent.rank)
        scope = f"{name}-{parent.prefix.replace('/', '-')}-" + "-".join(map(str, members))
        prefix = _session_prefix(parent.world, store, rank, key, scope)
        sub = Session(parent.world, store, rank, len(members), prefix, group=key, queue=parent.queue)
        _PENDING.pop(key, None)
        _GROUPS[key] = sub
        return sub


def owner_of(transport: Transport) -> tuple[Session, str]:
    """The session that made ``transport`` (or the one a ``TracedTransport`` wraps) and the transport's
    name: an algorithm that needs more than its call's transport finds its world here.

    Raises:
        ValueError: no session of this world holds it (a transport made by hand, outside ringcomm's calls).
    """
    inner = getattr(transport, "inner", transport)
    with _LOCK:
        candidates = [s for s in (_CURRENT, *_GROUPS.values()) if s is not None]
    for session in candidates:
        for (name, _device), made in session.transports.items():
            if made is inner:
                return session, name
    raise ValueError(
        f"transport {type(inner).__name__} (rank {inner.rank} of {inner.world_size}) belongs to no ringcomm "
        "session of this world; run this algorithm through ringcomm.all_reduce"
    )


def shutdown(timeout: float = 10.0) -> None:
    """Close every session, if any (the default group's and the subgroups'): queued collectives finish,
    transports close.

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
        session.close(timeout)  # the comm queue first: nothing of any group runs after it
        for sub in _GROUPS.values():
            sub.close()
        _GROUPS.clear()
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
