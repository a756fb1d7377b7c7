"""TorchTransport on NCCL, without a GPU: what it issues, and how long it waits.

A NCCL world needs a GPU per rank, so these tests put a stand-in for
``torch.distributed`` under the transport and check its two NCCL rules:

- a step's sends and receives go out together, as one ``batch_isend_irecv``
  group (NCCL runs a pair's operations in issue order: a receive issued alone
  blocks the send behind it; ``tests/nccl_order.py`` shows the deadlock);
- a wait honours the call's deadline on the host (a NCCL work's ``wait`` returns
  at once on the host), and past it aborts the communicator, whose kernels would
  otherwise stay queued on the GPU.

The Gloo side, and the algorithms under NCCL's ordering, are tested elsewhere
(``test_api.py``, ``test_nccl_order.py``).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ringcomm.errors import CommTimeoutError, PeerError
from ringcomm.transports import torch as torch_transport
from ringcomm.transports.base import Pending, TransportStats, recv, recv_reduce, send

pytestmark = pytest.mark.fast  # every test here is quick


class _Work:
    """A NCCL work: done after ``polls`` looks (never if None); ``wait`` raises ``error`` if given."""

    def __init__(self, polls: int | None = 0, error: str | None = None) -> None:
        self.polls, self.error, self.waited = polls, error, False

    def is_completed(self) -> bool:
        if self.polls is None:
            return False
        self.polls -= 1
        return self.polls < 0

    def wait(self, *args: object) -> None:
        self.waited = True
        if self.error is not None:
            raise RuntimeError(self.error)


class _Group:
    aborted = 0

    def abort(self) -> None:
        self.aborted += 1


def _nccl_transport(monkeypatch: pytest.MonkeyPatch, work: _Work) -> tuple[Any, list]:
    """A TorchTransport on "NCCL" whose torch.distributed calls land in ``calls``."""
    calls: list = []

    def alone(kind: str) -> Any:
        return lambda tensor, peer, group, tag: calls.append(("alone", kind, tensor, peer)) or work

    fake = SimpleNamespace(
        isend=alone("send"),
        irecv=alone("recv"),
        P2POp=lambda op, tensor, peer, group, tag: (op, tensor, peer),
        batch_isend_irecv=lambda ops: calls.append(("group", list(ops))) or [work],
    )
    monkeypatch.setattr(torch_transport, "dist", fake)
    transport = torch_transport.TorchTransport.__new__(torch_transport.TorchTransport)
    transport.backend, transport.device_type, transport.rank, transport.world_size = "nccl", "cuda", 0, 2
    transport.group, transport.stats, transport.liveness = _Group(), TransportStats(), None
    transport._closed = True  # nothing to destroy
    return transport, calls


def test_a_steps_sends_and_receives_go_out_as_one_nccl_group(monkeypatch: pytest.MonkeyPatch) -> None:
    work = _Work()
    transport, calls = _nccl_transport(monkeypatch, work)
    fake = torch_transport.dist
    incoming, outgoing, into = torch.empty(3), torch.ones(3), torch.zeros(3)
    pending = transport.post([recv(incoming, 1), send(outgoing, 1), recv_reduce(into, 1, 0, "sum")])
    assert len(calls) == 1, f"issued as {len(calls)} separate calls: {[c[:2] for c in calls]}"
    kind, ops = calls[0]
    assert kind == "group" and [op for op, _, _ in ops] == [fake.irecv, fake.isend, fake.irecv]
    assert ops[0][1] is incoming and ops[1][1] is outgoing and all(peer == 1 for _, _, peer in ops)
    assert ops[2][1] is not into  # the reduce lands in a staging buffer, reduced in when waited
    assert transport.stats.sent_msgs == 1 and transport.stats.recv_msgs == 2
    for p in pending:
        transport.wait(p, time.monotonic() + 5)
    assert work.waited  # the host wait orders the current stream after the group's kernels


def test_a_nccl_wait_that_never_completes_ends_at_the_deadline_and_aborts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = _Work(polls=None)
    transport, _ = _nccl_transport(monkeypatch, work)
    start = time.monotonic()
    with pytest.raises(CommTimeoutError, match=r"recv with peer rank 1 did not complete within [0-9.]+ s") as err:
        transport.wait(Pending("recv", 1, work), start + 0.3)
    assert 0.3 <= time.monotonic() - start < 2.0
    # the error names the time this wait had left when it began: at most the 0.3 s given, less by
    # however long the call took to get there (the message's rounding of it is not asserted)
    assert 0.0 < err.value.timeout <= 0.3
    assert transport.group.aborted == 1 and not work.waited


def test_a_nccl_failure_before_the_deadline_is_a_peer_error(monkeypatch: pytest.MonkeyPatch) -> None:
    work = _Work(polls=3, error="NCCL error: remote process exited or there was a network error")
    transport, _ = _nccl_transport(monkeypatch, work)
    with pytest.raises(PeerError, match="send with peer rank 1 failed: NCCL error: remote process exited"):
        transport.wait(Pending("send", 1, work), time.monotonic() + 60)


def test_message_and_pending_kinds_are_enums_that_read_as_before() -> None:
    """Kinds are ``MessageKind``/``PendingOp`` members (a typo fails at once) that still print and
    compare as the strings traces and error messages have always shown."""
    from ringcomm.transports.base import Message, MessageKind, PendingOp

    t = torch.zeros(2)
    assert [send(t, 1).kind, recv(t, 1).kind, recv_reduce(t, 1, 0, "sum").kind] == list(MessageKind)
    assert Message("send", t, 1).kind is MessageKind.SEND  # a string is taken, and stored as the member
    assert f"{MessageKind.REDUCE} <- r1" == "reduce <- r1" and MessageKind.RECV == "recv"
    with pytest.raises(ValueError, match="'recieve' is not a valid MessageKind"):
        Message("recieve", t, 1)  # type: ignore[arg-type]
    assert Pending("recv", 1, None).op is PendingOp.RECV and str(PendingOp.SEND) == "send"
    with pytest.raises(ValueError, match="'reduce' is not a valid PendingOp"):
        Pending("reduce", 1, None)  # type: ignore[arg-type]
    error = CommTimeoutError(0, 1, PendingOp.SEND, 1.0, "detail")
    assert "send" in str(error) and "PendingOp" not in str(error)
