"""The Transport protocol that the algorithms see, and TorchTransport on torch.distributed.

Algorithms (ring, parameter server, naive) never call torch.distributed
directly. They see a ``Transport``: a rank, a world size, a nonblocking send, a
nonblocking receive into a given tensor, and a wait with a timeout. Any
transport that offers these four things (ZeroMQ, see ``zmq_transport.py``) runs
every algorithm unchanged::

    algorithm  --isend/irecv/wait-->  Transport  -->  Gloo | NCCL | ZeroMQ

Ordering contract: messages from one rank to another with the same tag are
received in the order they were sent. Algorithms post a receive before or
together with the matching send, never a blocking send then a receive (that
deadlocks on Gloo once two neighbours both send first).

``TorchTransport`` runs on its **own** process group, made with
``dist.new_group``, so ring traffic never interleaves with DDP's collectives on
the default group. CPU tensors go over Gloo, CUDA tensors over NCCL.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from .errors import CommTimeoutError, PeerError
from .liveness import Liveness, env_seconds, for_world

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Pending",
    "Transport",
    "TransportStats",
    "TorchTransport",
    "default_timeout",
    "get_transport",
    "register_transport",
]

#: Default for ``all_reduce(timeout=None)``: seconds one whole collective may take.
#: Override per call with ``timeout=`` or for the process with RINGCOMM_TIMEOUT.
DEFAULT_TIMEOUT_S = 300.0


def default_timeout() -> float:
    """The timeout used when none is given: RINGCOMM_TIMEOUT (seconds) or 300 s."""
    return env_seconds("RINGCOMM_TIMEOUT", DEFAULT_TIMEOUT_S)


@dataclass
class TransportStats:
    """Messages and bytes this rank has sent and received since the last ``reset``."""

    sent_msgs: int = 0
    sent_bytes: int = 0
    recv_msgs: int = 0
    recv_bytes: int = 0
    sends_to: dict[int, int] = field(default_factory=dict)
    recvs_from: dict[int, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.sent_msgs = self.sent_bytes = self.recv_msgs = self.recv_bytes = 0
        self.sends_to.clear()
        self.recvs_from.clear()

    def count_send(self, peer: int, nbytes: int) -> None:
        self.sent_msgs += 1
        self.sent_bytes += nbytes
        self.sends_to[peer] = self.sends_to.get(peer, 0) + 1

    def count_recv(self, peer: int, nbytes: int) -> None:
        self.recv_msgs += 1
        self.recv_bytes += nbytes
        self.recvs_from[peer] = self.recvs_from.get(peer, 0) + 1


@dataclass
class Pending:
    """A posted send or receive. Opaque to algorithms: pass it to ``Transport.wait``."""

    op: str  # "send" or "recv"
    peer: int
    handle: Any  # transport-specific (a torch Work, a zmq request, ...)


@runtime_checkable
class Transport(Protocol):
    """What an algorithm may ask of the wire."""

    rank: int
    world_size: int
    stats: TransportStats

    def isend(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        """Start sending ``tensor`` (contiguous) to ``peer``; the tensor must not change until waited."""

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        """Start receiving from ``peer`` into ``tensor`` (contiguous, exact size expected)."""

    def wait(self, pending: Pending, deadline: float) -> None:
        """Block until ``pending`` completes; raise CommTimeoutError at ``deadline``.

        ``deadline`` is a ``time.monotonic()`` value: the whole collective shares one.
        """


def remaining(deadline: float) -> float:
    """Seconds left until ``deadline`` (a time.monotonic() value), at least 1 ms."""
    return max(deadline - time.monotonic(), 1e-3)


class TorchTransport:
    """Point-to-point over torch.distributed on a process group of its own.

    Args:
        device_type: ``"cpu"`` (Gloo) or ``"cuda"`` (NCCL).
        timeout_s: the group's own timeout, the backstop under every wait.
    """

    def __init__(self, device_type: str = "cpu", timeout_s: float | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("call torch.distributed.init_process_group before using ringcomm")
        backend = {"cpu": "gloo", "cuda": "nccl"}[device_type]
        self.device_type = device_type
        self.backend = backend
        # new_group is collective: every rank of the default group makes it, in the same order.
        self.group = dist.new_group(
            backend=backend, timeout=timedelta(seconds=timeout_s or default_timeout())
        )
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.stats = TransportStats()
        # Heartbeats (liveness.py): they cannot wake a Gloo wait, but they say in a
        # timeout's message whether the peer was alive, and warn while a wait is stuck.
        self.liveness: Liveness | None = for_world()

    def isend(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        work = dist.isend(tensor, dst=peer, group=self.group, tag=tag)
        self.stats.count_send(peer, tensor.numel() * tensor.element_size())
        return Pending("send", peer, work)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        work = dist.irecv(tensor, src=peer, group=self.group, tag=tag)
        self.stats.count_recv(peer, tensor.numel() * tensor.element_size())
        return Pending("recv", peer, work)

    def wait(self, pending: Pending, deadline: float) -> None:
        timeout = remaining(deadline)
        live = self.liveness
        if live is not None:
            live.awaiting = pending.peer  # the heartbeat thread watches it while we block
        try:
            # Gloo's Work.wait(timeout) raises when the timeout expires; NCCL's
            # is asynchronous on the host, and its group timeout is the backstop.
            pending.handle.wait(timedelta(seconds=timeout))
        except RuntimeError as exc:  # DistBackendError subclasses RuntimeError
            text = str(exc)
            if "imed out" in text or "imeout" in text:
                detail = live.describe(pending.peer) if live is not None else ""
                raise CommTimeoutError(self.rank, pending.peer, pending.op, timeout, detail) from exc
            if live is not None:
                live.mark_failed()  # peers waiting on this rank learn it at their next check
            raise PeerError(self.rank, pending.peer, pending.op, text.splitlines()[0]) from exc
        finally:
            if live is not None:
                live.awaiting = None

    def close(self) -> None:
        """Destroy this transport's process group."""
        if dist.is_initialized():
            dist.destroy_process_group(self.group)


# --- the registry: one transport per (kind, device type) per default process group ---

_FACTORIES: dict[str, Any] = {"torch": TorchTransport}
_CACHE: dict[tuple[str, str], tuple[Any, Transport]] = {}
_LOCK = threading.Lock()


def register_transport(name: str, factory: Any) -> None:
    """Make ``all_reduce(transport=name)`` build transports with ``factory(device_type)``."""
    _FACTORIES[name] = factory


def transport_names() -> tuple[str, ...]:
    return tuple(_FACTORIES)


def get_transport(name: str, device_type: str) -> Transport:
    """The transport ``name`` for tensors on ``device_type``, made on first use.

    Making one is collective (every rank must ask for it in the same order):
    ``ringcomm.init()`` does it up front; otherwise the first ``all_reduce`` does.
    A new ``init_process_group`` (after a destroy) gets fresh transports.
    """
    world = dist.group.WORLD
    key = (name, device_type)
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None and cached[0] is world:
            return cached[1]
        if name not in _FACTORIES and name == "zmq":
            from . import zmq_transport  # noqa: F401  (registers itself)
        transport = _FACTORIES[name](device_type)
        _CACHE[key] = (world, transport)
        return transport
