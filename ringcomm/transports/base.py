"""The Transport protocol that the algorithms see, and the registry of transports.

Algorithms (ring, parameter server, naive) never call torch.distributed or
ZeroMQ directly. They see a ``Transport``: a rank, a world size, a way to
**post** a group of sends and receives, and a **wait** with a deadline::

    algorithm  --post/wait-->  Transport  -->  Gloo | NCCL | ZeroMQ | ...

A message is a send, a receive into a tensor, or a **reduce**: a receive whose
data is reduced into the tensor (``tensor <- tensor op incoming``) instead of
overwriting it, so that a transport that can (shared memory) reduces straight
out of its buffer; the others receive into a staging buffer and reduce when the
message is waited on (``PointToPoint``). Reduces into the same tensor are
applied in the order they were posted, whatever order the data arrives in, so
a parameter server folds its workers' pushes in rank order.

``post`` issues its messages *together*. That is the one rule that keeps every
algorithm deadlock-free on every transport: NCCL runs a pair's operations in
the order they were issued, one group at a time, so a receive issued on its own
before a send would block that send until the peer's send arrives, and two
neighbours doing the same wait for each other forever. Whatever a rank sends
and receives in one step of an algorithm goes into one ``post``; a transport
that needs it (NCCL) issues them as one group (``batch_isend_irecv``), the
others post the receives first, then the sends. ``tests/nccl_order.py``
emulates NCCL's ordering and runs every algorithm through it.

Ordering contract: messages from one rank to another are received in the order
they were sent; a receive names the tensor the message lands in (exact size).
Tags (``tags.py``) separate kinds of messages where a transport supports them;
correctness never depends on them (NCCL ignores them).

Each transport module registers itself (``register_transport``) with the device
types it serves, so ``all_reduce`` knows which names exist and which tensors
each can carry without naming any transport itself.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import torch

from ..names import TRANSPORT_MODULES, TRANSPORT_NAMES
from ..ops import reduce_into

__all__ = [
    "Message",
    "MessageKind",
    "Pending",
    "PendingOp",
    "PointToPoint",
    "Transport",
    "TransportKind",
    "TransportStats",
    "exchange",
    "recv",
    "recv_reduce",
    "register_transport",
    "remaining",
    "send",
    "transport_kind",
    "transport_names",
]


@dataclass
class TransportStats:
    """Messages and bytes this rank has sent and received (since the transport was made)."""

    sent_msgs: int = 0
    sent_bytes: int = 0
    recv_msgs: int = 0
    recv_bytes: int = 0
    sends_to: dict[int, int] = field(default_factory=dict)
    recvs_from: dict[int, int] = field(default_factory=dict)

    def count_send(self, peer: int, nbytes: int) -> None:
        self.sent_msgs += 1
        self.sent_bytes += nbytes
        self.sends_to[peer] = self.sends_to.get(peer, 0) + 1

    def count_recv(self, peer: int, nbytes: int) -> None:
        self.recv_msgs += 1
        self.recv_bytes += nbytes
        self.recvs_from[peer] = self.recvs_from.get(peer, 0) + 1


class MessageKind(StrEnum):
    """What a ``Message`` does. String-valued: traces and error messages read ``send``, ``recv``, ``reduce``."""

    SEND = "send"
    RECV = "recv"  # into the tensor, overwriting it
    REDUCE = "reduce"  # into the tensor, reduced with what it holds (``Message.op``)


class PendingOp(StrEnum):
    """What a ``Pending`` waits for: a send leaving, or a receive (plain or reduce) arriving."""

    SEND = "send"
    RECV = "recv"


@dataclass(frozen=True, slots=True)
class Message:
    """One send, receive or reduce of a ``post``: ``tensor`` (contiguous) to or from ``peer``, under ``tag``.

    ``kind`` may be given as its string (``"send"``); it is stored as a ``MessageKind`` (ValueError otherwise).
    """

    kind: MessageKind
    tensor: torch.Tensor
    peer: int
    tag: int = 0
    op: str = ""  # REDUCE only: tensor <- tensor (op) incoming; an ops.OPS name

    def __post_init__(self) -> None:
        if type(self.kind) is not MessageKind:
            object.__setattr__(self, "kind", MessageKind(self.kind))


def send(tensor: torch.Tensor, peer: int, tag: int = 0) -> Message:
    """A message sending ``tensor`` to ``peer`` (it must not change until waited)."""
    return Message(MessageKind.SEND, tensor, peer, tag)


def recv(tensor: torch.Tensor, peer: int, tag: int = 0) -> Message:
    """A message receiving from ``peer`` into ``tensor`` (exact size expected)."""
    return Message(MessageKind.RECV, tensor, peer, tag)


def recv_reduce(tensor: torch.Tensor, peer: int, tag: int, op: str) -> Message:
    """A message receiving from ``peer`` and reducing it into ``tensor``: ``tensor <- tensor op incoming``."""
    return Message(MessageKind.REDUCE, tensor, peer, tag, op)


@dataclass
class Pending:
    """A posted send or receive. Opaque to algorithms: pass it to ``Transport.wait``.

    ``op`` may be given as its string (``"recv"``); it is stored as a ``PendingOp`` (ValueError otherwise).
    """

    op: PendingOp
    peer: int
    handle: Any  # transport-specific (a torch Work, a zmq request, ...)

    def __post_init__(self) -> None:
        if type(self.op) is not PendingOp:
            self.op = PendingOp(self.op)


@runtime_checkable
class Transport(Protocol):
    """What an algorithm may ask of the wire."""

    rank: int
    world_size: int
    device_type: str
    stats: TransportStats

    def post(self, messages: Sequence[Message]) -> list[Pending]:
        """Issue ``messages`` together; one ``Pending`` each, in the same order."""

    def wait(self, pending: Pending, deadline: float) -> None:
        """Block until ``pending`` completes; raise CommTimeoutError at ``deadline``.

        ``deadline`` is a ``time.monotonic()`` value: the whole collective shares one.
        """

    def close(self) -> None:
        """Release sockets, groups, segments; idempotent."""


class _Staged:
    """A reduce done as a plain receive into a staging buffer, reduced into its target when waited."""

    __slots__ = ("inner", "target", "staging", "op", "before", "done")

    def __init__(self, target: torch.Tensor, staging: torch.Tensor, op: str, before: _Staged | None) -> None:
        self.inner: Pending | None = None
        self.target, self.op = target, op
        self.staging = staging  # a buffer of the pool; its first target.numel() elements are used
        self.before = before  # the reduce into the same tensor posted just before: applied first
        self.done = False


class PointToPoint:
    """``post`` and ``wait`` for transports built on independent sends and receives (Gloo, ZeroMQ).

    A subclass provides ``isend``, ``irecv`` and ``wait_message`` (the wait of one
    of its own messages); it may override ``issue`` (how a post goes out: by
    default receives first, so a peer's send finds its receive posted, then sends).
    A reduce becomes a receive into a staging buffer, reduced into its tensor when
    waited on, after any reduce into the same tensor posted before it. Staging
    buffers are reused: in steady state nothing is allocated.
    """

    def isend(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        raise NotImplementedError

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        raise NotImplementedError

    def wait_message(self, pending: Pending, deadline: float) -> None:
        raise NotImplementedError

    def issue(self, messages: Sequence[Message]) -> list[Pending]:
        """Put ``messages`` (sends and plain receives) on the wire: receives first, then sends."""
        pending: list[Pending | None] = [None] * len(messages)
        for i, m in enumerate(messages):
            if m.kind is MessageKind.RECV:
                pending[i] = self.irecv(m.tensor, m.peer, m.tag)
        for i, m in enumerate(messages):
            if m.kind is MessageKind.SEND:
                pending[i] = self.isend(m.tensor, m.peer, m.tag)
        return pending  # type: ignore[return-value]  (every slot was filled)

    def post(self, messages: Sequence[Message]) -> list[Pending]:
        staged: dict[int, _Staged] = {}
        wire = list(messages)
        for i, m in enumerate(messages):
            if m.kind is MessageKind.REDUCE:
                key = _same_tensor(m.tensor)
                st = _Staged(m.tensor, self._stage(m.tensor), m.op, self._reduces.get(key))
                self._reduces[key] = st
                staged[i] = st
                wire[i] = Message(MessageKind.RECV, st.staging[: m.tensor.numel()], m.peer, m.tag)
        pending = self.issue(wire)
        for i, st in staged.items():
            st.inner = pending[i]
            pending[i] = Pending(PendingOp.RECV, pending[i].peer, st)
        return pending

    def wait(self, pending: Pending, deadline: float) -> None:
        if isinstance(pending.handle, _Staged):
            self._apply(pending.handle, deadline)
        else:
            self.wait_message(pending, deadline)

    def _apply(self, st: _Staged, deadline: float) -> None:
        if st.done:
            return
        if st.before is not None:  # reduces into one tensor land in posting order (ps: rank order)
            self._apply(st.before, deadline)
        self.wait_message(st.inner, deadline)  # type: ignore[arg-type]  (set by post)
        reduce_into(st.target, st.staging[: st.target.numel()], st.op)
        st.done, st.before = True, None
        self._free_staging.append(st.staging)
        key = _same_tensor(st.target)
        if self._reduces.get(key) is st:
            del self._reduces[key]

    # --- staging buffers: made on first use, kept for reuse ---

    @property
    def _reduces(self) -> dict[tuple[int, int, torch.dtype], _Staged]:
        return self.__dict__.setdefault("_reduces_by_tensor", {})

    @property
    def _free_staging(self) -> list[torch.Tensor]:
        return self.__dict__.setdefault("_staging_free", [])

    def _stage(self, like: torch.Tensor) -> torch.Tensor:
        """A free staging buffer of at least ``like.numel()`` elements of its dtype and device."""
        free = self._free_staging
        for i, buf in enumerate(free):
            if buf.dtype == like.dtype and buf.device == like.device and buf.numel() >= like.numel():
                return free.pop(i)
        return torch.empty(max(like.numel(), 1), dtype=like.dtype, device=like.device)


def _same_tensor(t: torch.Tensor) -> tuple[int, int, torch.dtype]:
    return (t.data_ptr(), t.numel(), t.dtype)


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (a time.monotonic() value), at least 1 ms."""
    return max(deadline - time.monotonic(), 1e-3)


# --- the registry: which transports exist, and which tensors each can carry ---


@dataclass(frozen=True)
class TransportKind:
    """A registered transport.

    Attributes:
        name: what ``all_reduce(transport=...)`` takes.
        factory: ``factory(device_type, setup) -> Transport``; collective (every rank, same
            order). ``setup`` (``rendezvous.SetupContext``) carries the store, rank, world size,
            liveness and a store-key prefix unique to this setup.
        devices: device types (``tensor.device.type``) it can carry.
        check_device: extra rule for a device it lists, raising ValueError (e.g. the backend
            the default process group was initialised with); None when there is none.
        summary: one line for error messages and ``--help``.
    """

    name: str
    factory: Callable[[str, Any], Transport]
    devices: tuple[str, ...]
    check_device: Callable[[torch.device], None] | None = None
    summary: str = ""

    def validate_device(self, device: torch.device) -> None:
        """ValueError unless this transport can carry tensors on ``device``."""
        if device.type not in self.devices:
            others = [k.name for k in _KINDS.values() if device.type in k.devices]
            hint = f"; transports for {device.type}: {', '.join(others)}" if others else ""
            raise ValueError(
                f"transport={self.name!r} carries tensors on {', '.join(self.devices)}; "
                f"the tensor is on {device}{hint}"
            )
        if self.check_device is not None:
            self.check_device(device)


_KINDS: dict[str, TransportKind] = {}


def register_transport(
    name: str,
    factory: Callable[[str, Any], Transport],
    *,
    devices: Sequence[str],
    check_device: Callable[[torch.device], None] | None = None,
    summary: str = "",
) -> None:
    """Make ``all_reduce(transport=name)`` build transports with ``factory(device_type, setup)``.

    The built-in transports are also listed in ``names.TRANSPORT_NAMES`` (what the command lines offer
    without importing torch; a test keeps the two equal); a transport of the user's registers here alone.
    """
    _KINDS[name] = TransportKind(name, factory, tuple(devices), check_device, summary)


def _builtin_kinds() -> dict[str, TransportKind]:
    """The registry, the built-in transports imported first (they register themselves on import).

    ``import ringcomm`` no longer imports them (it imports nothing that needs torch), so the
    registry loads them the first time it is asked.
    """
    for module in TRANSPORT_MODULES.values():
        importlib.import_module(module)
    return _KINDS


def transport_names() -> tuple[str, ...]:
    """The registered transport names: the built-ins in ``names.TRANSPORT_NAMES``'s order, then others."""
    kinds = _builtin_kinds()
    return tuple(name for name in TRANSPORT_NAMES if name in kinds) + tuple(
        name for name in kinds if name not in TRANSPORT_NAMES
    )


def transport_kind(name: object) -> TransportKind:
    """The registered transport ``name``; ValueError naming the known ones otherwise."""
    kind = _builtin_kinds().get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"unknown transport {name!r}; expected one of {', '.join(map(repr, _KINDS))}")
    return kind


def exchange(transport: Transport, messages: Sequence[Message], deadline: float) -> None:
    """Post ``messages`` together and wait for all of them: one step of an algorithm.

    Messages of zero elements are left out (both ends agree they are empty, so
    neither posts them); a step with none does nothing.
    """
    pending = transport.post([m for m in messages if m.tensor.numel()])
    for p in pending:
        transport.wait(p, deadline)
