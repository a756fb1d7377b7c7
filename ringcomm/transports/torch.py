"""TorchTransport: the Transport protocol on torch.distributed point-to-point (Gloo, NCCL).

It runs on its **own** process group, made with ``dist.new_group``, so ring
traffic never interleaves with DDP's collectives on the default group. CPU
tensors go over Gloo, CUDA tensors over NCCL (``BACKEND_FOR_DEVICE``).

**Posting.** NCCL runs a pair's operations in issue order and ignores tags, so
a step's sends and receives are issued as one group with
``dist.batch_isend_irecv`` (see ``transport.py``). Gloo needs no grouping: its
sends and receives progress independently, and grouping costs more there
(measured: an all-to-all round of 2(P-1) small messages took 206 µs batched
against 148 µs as plain isend/irecv at P = 2, and 2.66 ms against 2.60 ms at
P = 4; README, "NCCL-safe exchanges"). So Gloo posts receives, then sends, one
by one.

**Waiting.** Gloo's ``Work.wait(timeout)`` blocks until the deadline. A NCCL
wait returns at once on the host (it only orders the CUDA streams), so for CUDA
the host polls ``Work.is_completed()`` until the deadline and, past it, aborts
the group: its kernels would otherwise stay queued on the GPU forever.
Which it was, timeout or peer failure, is decided by our own clock, never by
the wording of the backend's message.

**In a subgroup** (``group=``, ``dist.new_group``) the transport cannot make a
group of its own with ``dist.new_group``: that must be called by every rank of
the default group, and only the subgroup's members call ringcomm with it. So it
makes a Gloo process group directly among the members, on the store under the
session's keys (a backend object torch.distributed never registers, so the
default group's numbering of new groups is left as it was), and numbers peers
within the subgroup. NCCL is not made that way yet: ``group=`` with CUDA tensors
over ``torch`` is refused (``subgroup_problem``).

After a failure the group is not used again (``session.py`` refuses later
collectives in that world).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CommError, CommTimeoutError, PeerError
from ..runtime.liveness import Liveness
from ..runtime.rendezvous import own_client
from ..runtime.settings import default_timeout
from .base import (
    Message,
    MessageKind,
    Pending,
    PendingOp,
    PointToPoint,
    TransportStats,
    register_transport,
    remaining,
)

__all__ = ["BACKEND_FOR_DEVICE", "TorchTransport", "backend_for", "subgroup_problem"]

#: The torch.distributed backend for each device type: the one place this map is written.
BACKEND_FOR_DEVICE = {"cpu": "gloo", "cuda": "nccl"}

#: Longest sleep between two polls of a CUDA wait, in seconds (the first polls do not sleep).
_POLL_MAX_S = 1e-3


def backend_for(device_type: str) -> str:
    """The backend that carries tensors on ``device_type`` (ValueError for any other device)."""
    try:
        return BACKEND_FOR_DEVICE[device_type]
    except KeyError:
        raise ValueError(
            f"torch.distributed carries {', '.join(BACKEND_FOR_DEVICE)} tensors here, not {device_type!r}"
        ) from None


def check_device(device: torch.device) -> None:
    """ValueError unless the default process group's backend serves ``device``."""
    needed = backend_for(device.type)
    if not dist.is_initialized():
        return  # all_reduce says so itself
    backend = str(dist.get_backend())
    if needed not in backend:
        raise ValueError(
            f"tensor on {device} needs the {needed} backend, but the process group was "
            f"initialised with backend {backend!r}; move the tensor to "
            f"{'the GPU' if device.type == 'cpu' else 'the CPU'} or init with backend "
            f"'{needed}' (or 'cpu:gloo,cuda:nccl')"
        )


def subgroup_problem(device_type: str) -> str | None:
    """Why ``transport="torch"`` cannot carry ``device_type`` tensors in a subgroup, or None if it can."""
    if backend_for(device_type) == "gloo":
        return None
    return (
        f"transport='torch' in a subgroup (group=) carries CPU tensors only (Gloo), not {device_type} ones: "
        "NCCL subgroups are not made yet; use transport='zmq' or 'shm' (through host memory) or the default group"
    )


class TorchTransport(PointToPoint):
    """Point-to-point over torch.distributed on a process group of its own.

    Args:
        device_type: ``"cpu"`` (Gloo) or ``"cuda"`` (NCCL).
        timeout_s: the group's own timeout, the backstop under every wait.
        liveness: this process's heartbeat (for the timeout's message); None if off.
        subgroup: the set-up of a subgroup's session (``SetupContext``: store, rank and size in the
            subgroup, a key prefix of its own); None in the default group.
    """

    def __init__(
        self,
        device_type: str = "cpu",
        timeout_s: float | None = None,
        liveness: Liveness | None = None,
        subgroup: Any = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("call torch.distributed.init_process_group before using ringcomm")
        self.backend = backend_for(device_type)
        self.device_type = device_type
        timeout = timedelta(seconds=timeout_s or default_timeout())
        #: True when ``group`` is a Gloo backend of our own among a subgroup's members (see the module
        #: docstring): peers are then posted to directly, not through torch.distributed's registry.
        self._direct = subgroup is not None
        if subgroup is None:
            # new_group is collective: every rank of the default group makes it, in the same order.
            self.group = dist.new_group(backend=self.backend, timeout=timeout)
            self.rank = dist.get_rank(self.group)
            self.world_size = dist.get_world_size(self.group)
        else:
            problem = subgroup_problem(device_type)
            if problem is not None:
                raise ValueError(problem)
            store = dist.PrefixStore(f"{subgroup.prefix}/gloo/", own_client(subgroup.store))
            self.rank, self.world_size = subgroup.rank, subgroup.world_size
            self.group = dist.ProcessGroupGloo(store, self.rank, self.world_size, timeout)
        self.stats = TransportStats()
        self.liveness = liveness
        self._closed = False

    # --- posting ---

    def isend(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        if self._direct:
            work = self.group.send([tensor], peer, tag)
        else:
            work = dist.isend(tensor, dst=peer, group=self.group, tag=tag)
        self.stats.count_send(peer, tensor.numel() * tensor.element_size())
        return Pending(PendingOp.SEND, peer, work)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        if self._direct:
            work = self.group.recv([tensor], peer, tag)
        else:
            work = dist.irecv(tensor, src=peer, group=self.group, tag=tag)
        self.stats.count_recv(peer, tensor.numel() * tensor.element_size())
        return Pending(PendingOp.RECV, peer, work)

    def issue(self, messages: Sequence[Message]) -> list[Pending]:
        """Put ``messages`` on the wire together: one NCCL group for CUDA; receives then sends on Gloo."""
        if self.backend != "nccl" or len(messages) < 2:
            return super().issue(messages)
        ops = [
            dist.P2POp(dist.isend if m.kind is MessageKind.SEND else dist.irecv, m.tensor, m.peer, self.group, m.tag)
            for m in messages
        ]
        works = dist.batch_isend_irecv(ops)
        for m in messages:
            nbytes = m.tensor.numel() * m.tensor.element_size()
            (self.stats.count_send if m.kind is MessageKind.SEND else self.stats.count_recv)(m.peer, nbytes)
        # batch_isend_irecv returns one work per op, or a single one for the whole group.
        if len(works) != len(messages):
            works = [works[-1]] * len(messages)
        return [Pending(PendingOp(m.kind), m.peer, w) for m, w in zip(messages, works)]  # sends and plain receives

    # --- waiting ---

    def wait_message(self, pending: Pending, deadline: float) -> None:
        """Block until one of this transport's messages completes; CommTimeoutError at ``deadline``."""
        timeout = remaining(deadline)
        live = self.liveness
        if live is not None:
            live.awaiting = pending.peer  # the heartbeat thread watches it while we block
        try:
            if self.backend == "nccl":
                self._wait_cuda(pending, deadline, timeout)
            else:
                pending.handle.wait(timedelta(seconds=timeout))
        except CommError:
            raise
        except RuntimeError as exc:  # DistBackendError subclasses RuntimeError
            if time.monotonic() >= deadline - 1e-3:  # our clock decides, not the message's wording
                detail = live.describe(pending.peer) if live is not None else ""
                error: CommError = CommTimeoutError(self.rank, pending.peer, pending.op, timeout, detail)
            else:
                error = PeerError(self.rank, pending.peer, pending.op, str(exc).splitlines()[0])
            raise error from exc
        finally:
            if live is not None:
                live.awaiting = None

    def _wait_cuda(self, pending: Pending, deadline: float, timeout: float) -> None:
        """Poll the NCCL work on the host until it completes or ``deadline`` passes (then abort)."""
        work = pending.handle
        pause = 0.0
        while not work.is_completed():
            if time.monotonic() >= deadline:
                # The kernels stay queued on the GPU until the communicator is aborted.
                self.group.abort()
                detail = self.liveness.describe(pending.peer) if self.liveness is not None else ""
                raise CommTimeoutError(self.rank, pending.peer, pending.op, timeout, detail)
            time.sleep(pause)
            pause = min(max(pause * 2, 2e-5), _POLL_MAX_S)
        work.wait()  # re-raises a failure NCCL recorded; orders the current stream after the work

    def close(self) -> None:
        """Destroy this transport's process group (if the default group still exists)."""
        if self._closed:
            return
        self._closed = True
        if self._direct:  # never registered: it goes with its last reference
            return
        if dist.is_initialized():
            try:
                dist.destroy_process_group(self.group)
            except (RuntimeError, ValueError):
                pass  # the group went with a destroyed default group


register_transport(
    "torch",
    lambda device_type, setup: TorchTransport(
        device_type, liveness=setup.liveness, subgroup=setup if setup.group is not None else None
    ),
    devices=tuple(BACKEND_FOR_DEVICE),
    check_device=check_device,
    summary="torch.distributed point-to-point: Gloo for CPU tensors, NCCL for CUDA tensors",
)
