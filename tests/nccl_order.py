"""An in-process world that moves messages the way NCCL orders them, to test algorithms without a GPU.

NCCL point-to-point has two properties that Gloo and ZeroMQ do not, and that
make a send and a receive posted one after the other deadlock:

1. **Operations run in the order they were issued, one group at a time.** Each
   ``dist.isend`` / ``dist.irecv`` (or each ``batch_isend_irecv`` group) becomes
   a kernel on a CUDA stream; the next one starts only when it finishes. A
   receive issued before a send blocks that send until the peer's matching
   send arrives.
2. **Tags are ignored**: messages of a pair match purely in issue order.

This module emulates exactly that, with P threads in one process: each rank's
posted groups execute strictly in order; an operation is *active* only while
its group is the rank's current one; the n-th send from A to B meets the n-th
receive of B from A once both are active, and then the bytes move. A group
that can never complete makes ``wait`` raise ``CommTimeoutError`` at the
deadline instead of hanging, so a deadlock shows up as a test failure.

Both ``isend``/``irecv`` (each a group of one, as a plain ``dist.isend`` is)
and ``post`` (one group, as ``batch_isend_irecv``) are offered, so the same
emulator shows the old ordering deadlock and the grouped ordering complete.

The model is stricter than NCCL in one way: real NCCL gives each pair of ranks
its own stream for single operations, while here every operation of a rank
shares one stream. Grouped exchanges (what ringcomm issues) run on one stream
in NCCL too, so for them the model is exact.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ringcomm.errors import CommTimeoutError
from ringcomm.transports.base import Message, Pending, PointToPoint, TransportStats

__all__ = ["NcclOrderWorld", "NcclOrderTransport", "run_threads"]


class _Op:
    __slots__ = ("kind", "tensor", "peer", "seq", "group", "done", "partner")

    def __init__(self, kind: str, tensor: torch.Tensor, peer: int, seq: int, group: int) -> None:
        self.kind, self.tensor, self.peer, self.seq, self.group = kind, tensor, peer, seq, group
        self.done = False
        self.partner: _Op | None = None


class NcclOrderWorld:
    """The shared state of P emulated ranks: their streams of groups, and one lock."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.cond = threading.Condition()
        self.groups: list[list[list[_Op]]] = [[] for _ in range(world_size)]  # rank -> groups in order
        self.active = [0] * world_size  # rank -> index of the group now executing
        self.send_seq: dict[tuple[int, int], int] = {}
        self.recv_seq: dict[tuple[int, int], int] = {}
        self.errors: list[str] = []

    def transport(self, rank: int) -> NcclOrderTransport:
        return NcclOrderTransport(self, rank)

    # --- called with self.cond held ---

    def _is_active(self, rank: int, op: _Op) -> bool:
        return op.group == self.active[rank]

    def _match(self) -> None:
        """Complete every send/receive pair whose two sides are both active; advance finished groups."""
        progress = True
        while progress:
            progress = False
            for rank in range(self.world_size):
                if self.active[rank] >= len(self.groups[rank]):
                    continue
                for op in self.groups[rank][self.active[rank]]:
                    if op.done or op.kind != "send":
                        continue
                    dst = op.peer
                    if self.active[dst] >= len(self.groups[dst]):
                        continue
                    for other in self.groups[dst][self.active[dst]]:
                        if not other.done and other.kind == "recv" and other.peer == rank and other.seq == op.seq:
                            if other.tensor.numel() != op.tensor.numel() or other.tensor.dtype != op.tensor.dtype:
                                self.errors.append(
                                    f"rank {rank} -> {dst} message {op.seq}: sent {op.tensor.numel()} "
                                    f"{op.tensor.dtype}, receive posted for {other.tensor.numel()} "
                                    f"{other.tensor.dtype}"
                                )
                            else:
                                other.tensor.copy_(op.tensor)
                            op.done = other.done = True
                            progress = True
                            break
            for rank in range(self.world_size):
                while self.active[rank] < len(self.groups[rank]) and all(
                    op.done for op in self.groups[rank][self.active[rank]]
                ):
                    self.active[rank] += 1
                    progress = True
        self.cond.notify_all()


class NcclOrderTransport(PointToPoint):
    """One rank's view of a ``NcclOrderWorld``: the Transport protocol, NCCL's ordering.

    Reduces are staged as ``PointToPoint`` does it, as ``TorchTransport`` does on NCCL.
    """

    def __init__(self, world: NcclOrderWorld, rank: int) -> None:
        self.world = world
        self.rank = rank
        self.world_size = world.world_size
        self.device_type = "cpu"
        self.stats = TransportStats()

    def _group(self, messages: Sequence[Message]) -> list[Pending]:
        w = self.world
        with w.cond:
            group = len(w.groups[self.rank])
            ops = []
            for m in messages:
                if m.kind == "send":
                    key = (self.rank, m.peer)
                    seq = w.send_seq.get(key, 0)
                    w.send_seq[key] = seq + 1
                    self.stats.count_send(m.peer, m.tensor.numel() * m.tensor.element_size())
                else:
                    key = (m.peer, self.rank)
                    seq = w.recv_seq.get(key, 0)
                    w.recv_seq[key] = seq + 1
                    self.stats.count_recv(m.peer, m.tensor.numel() * m.tensor.element_size())
                # A send's bytes are read when it executes, as on a GPU stream: keep the tensor itself.
                ops.append(_Op(m.kind, m.tensor, m.peer, seq, group))
            w.groups[self.rank].append(ops)
            w._match()
        return [Pending(op.kind, op.peer, op) for op in ops]

    def issue(self, messages: Sequence[Message]) -> list[Pending]:
        """Issue ``messages`` as one group (``batch_isend_irecv``)."""
        return self._group(list(messages))

    def isend(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        """A group of one send (a plain ``dist.isend``); ``tag`` is ignored, as NCCL does."""
        return self._group([Message("send", tensor, peer, tag)])[0]

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        """A group of one receive (a plain ``dist.irecv``); ``tag`` is ignored."""
        return self._group([Message("recv", tensor, peer, tag)])[0]

    def wait_message(self, pending: Pending, deadline: float) -> None:
        op: _Op = pending.handle
        w = self.world
        with w.cond:
            while not op.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommTimeoutError(
                        self.rank, op.peer, op.kind, 0.0, "emulated NCCL ordering: the group never completed"
                    )
                w.cond.wait(left)
            if w.errors:
                raise AssertionError("; ".join(w.errors))


def run_threads(world_size: int, fn: Callable[[int, NcclOrderTransport], Any], timeout: float) -> list[Any]:
    """Run ``fn(rank, transport)`` on ``world_size`` threads of one emulated world; return results by rank.

    A rank that raises has its exception returned in its slot (the caller asserts).
    Every thread is joined: ``fn`` must end by ``timeout`` (its waits should use that deadline).
    """
    world = NcclOrderWorld(world_size)
    results: list[Any] = [None] * world_size

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank, world.transport(rank))
        except BaseException as exc:  # reported to the test, which asserts on it
            results[rank] = exc

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5.0)
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    if stuck:
        raise AssertionError(f"ranks {stuck} still running after {timeout + 5.0:.0f} s")
    return results
