"""Agreeing through the store, and what is set up that way: the world's id, transports, the call board.

Everything here is collective: every rank calls it, in the same order, and
waits for the others through the default group's store::

    rank r                                 store
      gather(base, value)  -- set -->   <base>/r = value
                           -- wait -->  <base>/0 .. <base>/P-1     (within the call's deadline)
                           <- get --    every rank's value, by rank

**Setting up a transport** is collective (``dist.new_group``, a ZeroMQ
rendezvous), so a rank that asks for a different transport, or never asks
because its call was refused, would leave the others waiting inside the
backend until the store's own timeout. So every rank first says in the store
which transport it is about to make (``gather``), waits for all of them within
the call's deadline, watching the missing ranks' heartbeats, and only then
makes it; a different answer is a ``MismatchError`` on every rank. A factory
gets a ``SetupContext``: the store, its rank, a key prefix of its own and
``gather`` for its own rendezvous.

**A dead or departed peer** never hangs a ``gather``: meanwhile the heartbeat
thread writes a note into the key of a missing rank that is dead or gave up
(``liveness.py``), which ends the wait with ``PeerError`` naming it; at the
deadline, ``CommTimeoutError`` names the ranks that did not come.

**The world's id** (``mint_prefix``) names the session's store keys
(``ringcomm/<id>/...``), so a group re-initialised on the same store gets
fresh ones: rank 0 takes the next id from a store counter and publishes it
under its own count of the sessions it made on this store; every other rank
reads it under its own count.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any, Protocol

from ..errors import CommTimeoutError, MismatchError, PeerError, who_said_what
from ..transports.base import Transport, TransportKind
from ..transports.segments import host_identity, require_x86_linux
from .board import CallBoard
from .liveness import DEAD_NOTE, Liveness
from .settings import DEFAULT_TIMEOUT_S, default_timeout

__all__ = ["Rendezvous", "SetupContext", "mint_prefix", "own_client"]


def own_client(store: Any) -> Any:
    """A new connection to the same store (``Store.clone``), or the store itself if it has none."""
    try:
        return store.clone()
    except (AttributeError, NotImplementedError, RuntimeError):
        return store


def mint_prefix(store: Any, rank: int, scope: str = "") -> str:
    """A new session's key prefix, ``ringcomm/<id>``: rank 0 mints the id, the others read it.

    ``scope`` names a subgroup's sessions (``g<its global ranks>``, ``rank`` its rank in it), "" the
    default group's: each scope counts its own sessions, and ids come from one counter, so a
    subgroup's keys never meet the default group's or another subgroup's.

    Rank 0 takes the next id from the store's counter and publishes it under its count of the
    sessions it has made on this store; every rank reads it under its own count, the same as
    rank 0's as long as every rank makes its sessions alike. Each call counts one session: the
    caller (``session.current``) keeps the prefix for a session that failed half-made.

    Raises:
        CommTimeoutError: rank 0 has not published the id within RINGCOMM_TIMEOUT (or 300 s).
    """
    where = f"{scope}/" if scope else ""
    joined = int(store.add(f"ringcomm/joined/{where}{rank}", 1))
    slot = f"ringcomm/world-id/{where}{joined}"
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
    return f"ringcomm/{int(store.get(slot))}"


class _Gatherer(Protocol):
    """What a ``SetupContext`` is made from (a ``Rendezvous``, or a ``Session``, which has one)."""

    store: Any
    rank: int
    world_size: int
    liveness: Liveness | None
    group: Any

    def gather(self, base: str, value: str, deadline: float, what: str) -> list[str]: ...


class SetupContext:
    """What a transport factory gets: the store, this rank's place, a key prefix of its own, and
    ``gather`` for its rendezvous."""

    def __init__(self, owner: _Gatherer, prefix: str, deadline: float, what: str) -> None:
        self.store = owner.store
        self.rank = owner.rank
        self.world_size = owner.world_size
        self.liveness = owner.liveness
        self.prefix = prefix  # unique to this setup: "<world prefix>/setup/<n>"
        self.group = owner.group  # the subgroup (dist.new_group) it is made in; None: the default group
        self._owner, self._deadline, self._what = owner, deadline, what

    def gather(self, name: str, value: str) -> list[str]:
        """Every rank's ``value`` for ``name`` (collective), by rank: ``Rendezvous.gather``, so a rank
        that died, or failed its own set-up and gave up, ends the wait at once (``PeerError``)."""
        return self._owner.gather(f"{self.prefix}/{name}", value, self._deadline, self._what)


class Rendezvous:
    """One world's agreements through the store, and the transports and call board made by them.

    Args:
        store: a client of the default group's store of its own (``own_client``).
        prefix: the world's key prefix (``mint_prefix``).
        rank, world_size: this rank's place (in ``group``).
        group: the subgroup (``dist.new_group``) whose session this is; None for the default group.

    ``liveness`` (None until the session starts its heartbeat) is what ``gather`` asks about
    missing ranks.
    """

    def __init__(self, store: Any, prefix: str, rank: int, world_size: int, group: Any = None) -> None:
        self.store, self.prefix, self.group = store, prefix, group
        self.rank, self.world_size = rank, world_size
        self.liveness: Liveness | None = None
        self.transports: dict[tuple[str, str], Transport] = {}  # (transport name, device type) -> one
        self._setups = 0  # set-ups begun (made or refused): each has keys of its own
        self._board: CallBoard | None = None
        self._board_decided = False

    def key(self, *parts: object) -> str:
        """A store key unique to this world."""
        return "/".join([self.prefix, *map(str, parts)])

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

    def forget(self, base: str) -> None:
        """Delete this rank's key under ``base`` (every rank has read it; see check.py)."""
        self.store.delete_key(f"{base}/{self.rank}")

    def board(self, deadline: float) -> CallBoard | None:
        """The call board, set up at the world's first check (collective); None when the ranks are
        on several hosts (or not on x86-64 Linux): the check then goes through the store."""
        if not self._board_decided:
            what = "setting up the call board"
            hosts = self.gather(self.key("board-host"), host_identity(), deadline, what)
            try:
                require_x86_linux("the call board")
                one_host = len(set(hosts)) == 1
            except ValueError:
                one_host = False
            if one_host:
                base = self.key("board")
                self._board = CallBoard(
                    lambda name, value: self.gather(f"{base}/{name}", value, deadline, what),
                    self.rank,
                    self.world_size,
                    self.liveness,
                )
            self._board_decided = True
        return self._board

    def transport(self, kind: TransportKind, device_type: str, deadline: float) -> Transport:
        """The transport ``kind`` for ``device_type``: the cached one, or a new one made collectively.

        Raises:
            MismatchError: the ranks asked for different transports (or one refused); nothing was made.
            CommTimeoutError, PeerError: a rank did not come (``gather``).
        """
        cached = self.transports.get((kind.name, device_type))
        if cached is not None:
            return cached
        n = self._setups
        self._setups += 1
        base = self.key("setup", n)
        wanted = f"{kind.name}:{device_type}"
        answers = self.gather(base, wanted, deadline, f"setting up transport {wanted}")
        if any(a != wanted for a in answers):
            described = who_said_what(answers)
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

    def close(self) -> None:
        """Close every transport and the call board (the comm thread is idle: ``Session.close``)."""
        for transport in self.transports.values():
            transport.close()
        self.transports.clear()
        if self._board is not None:
            self._board.close()
            self._board = None
