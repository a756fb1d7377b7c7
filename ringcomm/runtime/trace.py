"""Chrome-trace timelines: watch the ring step by step, and its overlap with backward.

Off by default. ``enable(rank)`` turns it on for this process; every collective
(``all_reduce`` and the others; reduce_scatter's messages placed in its copy of
the input) then wraps its transport in ``TracedTransport`` (one global lookup per call
when off, nothing more), which records every send and receive from the moment
it is posted to the moment its wait returns, with the peer, the chunk index
and the byte count. The trainer adds forward, backward and per-bucket spans.
``dump(path)`` writes this rank's events; ``merge`` joins the ranks' files into
one JSON file for chrome://tracing or https://ui.perfetto.dev (one row group
per rank: ``pid`` = rank).

Timestamps come from CLOCK_MONOTONIC (``time.monotonic_ns``), shared by all
processes of one host, so ranks line up; across hosts they do not.

``enable(rank, values=True)`` also records the numbers: each message's values,
its place in the tensor (``start``, element offset) and the step it belongs to
(the index of the ``post`` that issued it). A reduce message is then received
into a buffer of the tracer's and reduced into its tensor when waited on (as
``transport.PointToPoint`` does), so that the incoming values, and the tensor's
values just before and after the reduce, can be shown. (No snapshot of the
whole tensor: receives still in flight may be writing into it.) For small
tensors only: ``ringcomm.demo`` uses it.

An algorithm that talks over transports of its own inside the call (``hier``: its node's and its
cross group's) asks the call's ``TracedTransport`` to wrap them too (``nested``): their messages
join the call's, in one numbering of messages and posts, with their peers named by rank in the
world and each labelled with its ``level``.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..ops import reduce_into
from ..transports.base import Message, MessageKind, Pending, Transport

__all__ = ["Tracer", "TracedTransport", "enable", "disable", "get", "span", "merge"]


class Tracer:
    """Collects complete ("X") events for one rank; with ``values``, the numbers too (see the module)."""

    def __init__(self, rank: int, values: bool = False) -> None:
        self.rank = rank
        self.values = values
        self.events: list[dict[str, Any]] = []
        self._threads: dict[str, int] = {}  # lane name -> the numeric tid Chrome traces expect
        self._lock = threading.Lock()

    def add(self, name: str, cat: str, start_ns: int, end_ns: int, tid: str, **args: Any) -> None:
        event = {
            "name": name,
            "cat": cat,
            "ph": "X",
            "ts": start_ns / 1e3,
            "dur": max(end_ns - start_ns, 0) / 1e3,
            "pid": self.rank,
            "args": args,
        }
        with self._lock:
            event["tid"] = self._threads.setdefault(tid, len(self._threads))
            self.events.append(event)

    @contextmanager
    def span(self, name: str, cat: str, tid: str = "main", **args: Any) -> Iterator[None]:
        start = time.monotonic_ns()
        try:
            yield
        finally:
            self.add(name, cat, start, time.monotonic_ns(), tid, **args)

    def dump(self, path: str) -> None:
        """Write this rank's events (a copy taken under the lock: other threads may still add)."""
        with self._lock:
            events = list(self.events)
            lanes = dict(self._threads)
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}]
        meta += [
            {"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid, "args": {"name": lane}}
            for lane, tid in lanes.items()
        ]
        with open(path, "w") as f:
            json.dump({"traceEvents": meta + events, "displayTimeUnit": "ms"}, f)


_TRACER: Tracer | None = None


def enable(rank: int, values: bool = False) -> Tracer:
    """Start tracing this process (as ``rank``; ``values``: record the numbers too); returns the tracer."""
    global _TRACER
    _TRACER = Tracer(rank, values)
    return _TRACER


def disable() -> None:
    global _TRACER
    _TRACER = None


def get() -> Tracer | None:
    """The active tracer, or None when tracing is off."""
    return _TRACER


@contextmanager
def span(name: str, cat: str, tid: str = "main", **args: Any) -> Iterator[None]:
    """A span on the active tracer; does nothing when tracing is off."""
    tracer = _TRACER
    if tracer is None:
        yield
        return
    with tracer.span(name, cat, tid, **args):
        yield


class _Count:
    """The numbers a call's messages and posts take, shared by its ``TracedTransport`` and the ones
    ``nested`` in it: one sequence per rank and call, whichever transport carried the message."""

    __slots__ = ("msg", "step")

    def __init__(self) -> None:
        self.msg = 0
        self.step = 0


class TracedTransport:
    """Wraps a transport for one collective, recording each message as an event.

    ``parts`` (``AlgorithmSpec.cut``) says how the algorithm cuts the flat tensor:
    the ring's P chunks ``c0..``, the parameter server's k shards ``s0..``, or
    ``all``; a message is labelled with the part it reads or writes (a receive into
    scratch memory has no label). ``members`` (a nested one's: the world ranks of its
    transport's ranks) names each peer by its world rank, and ``level`` (``"node"``,
    ``"cross"``) is recorded with every message.
    """

    def __init__(
        self,
        inner: Transport,
        tracer: Tracer,
        flat: torch.Tensor,
        algo: str,
        parts: Sequence[tuple[str, int, int]],
        *,
        members: Sequence[int] | None = None,
        level: str = "",
        count: _Count | None = None,
    ) -> None:
        self.inner, self.tracer, self.algo = inner, tracer, algo
        self.rank, self.world_size, self.stats = inner.rank, inner.world_size, inner.stats
        self.device_type = inner.device_type
        self._base = flat.data_ptr()
        self._elsize = flat.element_size()
        self._numel = flat.numel()
        self._parts = [p for p in parts if p[2] > 0]
        self._starts = [start for _, start, _ in self._parts]
        self._posted: dict[int, tuple[int, str, dict]] = {}
        self._flat, self._parts_given = flat, parts
        self._members = None if members is None else tuple(members)
        self._level = level
        self._count = count if count is not None else _Count()
        self._reduces: dict[int, tuple[torch.Tensor, torch.Tensor, str]] = {}  # id(pending) -> target, incoming, op
        self._recvs: dict[int, torch.Tensor] = {}  # id(pending) -> the tensor a plain receive lands in

    def nested(self, inner: Transport, members: Sequence[int], level: str) -> TracedTransport:
        """A tracer of ``inner``, a transport among ``members`` (world ranks, ascending: its rank i is
        ``members[i]``) that the algorithm talks over inside this call: its messages are placed in the
        same tensor, numbered on with this one's, and recorded with ``level``."""
        return TracedTransport(
            inner, self.tracer, self._flat, self.algo, self._parts_given, members=members, level=level,
            count=self._count,
        )

    def _start(self, tensor: torch.Tensor) -> int | None:
        offset = (tensor.data_ptr() - self._base) // self._elsize
        return offset if 0 <= offset < self._numel else None

    def _part(self, tensor: torch.Tensor) -> int | None:
        offset = (tensor.data_ptr() - self._base) // self._elsize
        if 0 <= offset < self._numel and self._parts:
            return bisect.bisect_right(self._starts, offset) - 1
        return None  # a scratch buffer (e.g. the scatter-reduce receive slot)

    def post(self, messages: Sequence[Message]) -> list[Pending]:
        values = self.tracer.values
        self._count.step += 1
        wire = list(messages)
        incoming: dict[int, torch.Tensor] = {}
        if values:  # show a reduce's incoming numbers: receive them here, reduce when waited
            for i, m in enumerate(messages):
                if m.kind is MessageKind.REDUCE:
                    incoming[i] = torch.empty_like(m.tensor)
                    wire[i] = Message(MessageKind.RECV, incoming[i], m.peer, m.tag)
        posted = self.inner.post(wire)
        now = time.monotonic_ns()
        for i, (m, pending) in enumerate(zip(messages, posted)):
            arrow = "->" if m.kind is MessageKind.SEND else "<-"
            peer = m.peer if self._members is None else self._members[m.peer]  # by its rank in the world
            args: dict[str, Any] = {
                "peer": peer, "bytes": m.tensor.numel() * m.tensor.element_size(), "tag": int(m.tag),
                "msg": self._count.msg,
            }
            if self._level:
                args["level"] = self._level
            part = self._part(m.tensor)
            label = ""
            if part is not None:
                args["part"] = label = self._parts[part][0]
                args["chunk"] = part
            if values:
                args.update(kind=str(m.kind), step=self._count.step, start=self._start(m.tensor), op=m.op)
                if m.kind is MessageKind.SEND:
                    args["values"] = m.tensor.reshape(-1).tolist()
                if i in incoming:  # "before" is read when the reduce is applied, in wait
                    self._reduces[id(pending)] = (m.tensor, incoming[i], m.op)
                elif m.kind is MessageKind.RECV:
                    self._recvs[id(pending)] = m.tensor
            self._posted[id(pending)] = (now, f"{m.kind} {arrow} r{peer}" + (f" {label}" if label else ""), args)
            self._count.msg += 1
        return posted

    def wait(self, pending: Pending, deadline: float) -> None:
        self.inner.wait(pending, deadline)
        start, name, args = self._posted.pop(id(pending))
        if self.tracer.values:
            reduce = self._reduces.pop(id(pending), None)
            if reduce is not None:
                target, incoming, op = reduce
                args["values"] = incoming.reshape(-1).tolist()
                args["before"] = target.reshape(-1).tolist()  # not at post: another reduce may land first
                reduce_into(target, incoming, op)
                args["after"] = target.reshape(-1).tolist()
            elif id(pending) in self._recvs:
                args["values"] = self._recvs.pop(id(pending)).reshape(-1).tolist()
        self.tracer.add(name, f"{self.algo}.{pending.op}", start, time.monotonic_ns(), f"{pending.op}s", **args)


    def close(self) -> None:
        """Nothing: the wrapper lives for one collective and owns nothing; the session closes ``inner``."""


def merge(paths: Sequence[str], out: str) -> str:
    """Join per-rank trace files into one Chrome trace at ``out``; returns ``out``."""
    events: list[dict[str, Any]] = []
    for path in paths:
        with open(path) as f:
            events.extend(json.load(f)["traceEvents"])
    with open(out, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return out
