"""Chrome-trace timelines: watch the ring step by step, and its overlap with backward.

Off by default. ``enable(rank)`` turns it on for this process; ``all_reduce``
then wraps its transport in ``TracedTransport`` (one global lookup per call
when off, nothing more), which records every send and receive from the moment
it is posted to the moment its wait returns, with the peer, the chunk index
and the byte count. The trainer adds forward, backward and per-bucket spans.
``dump(path)`` writes this rank's events; ``merge`` joins the ranks' files into
one JSON file for chrome://tracing or https://ui.perfetto.dev (one row group
per rank: ``pid`` = rank).

Timestamps come from CLOCK_MONOTONIC (``time.monotonic_ns``), shared by all
processes of one host, so ranks line up; across hosts they do not.
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

from .chunks import chunk_bounds
from .transport import Pending, Transport

__all__ = ["Tracer", "TracedTransport", "enable", "disable", "get", "span", "merge"]


class Tracer:
    """Collects complete ("X") events for one rank."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
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
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}]
        meta += [
            {"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid, "args": {"name": lane}}
            for lane, tid in self._threads.items()
        ]
        with open(path, "w") as f:
            json.dump({"traceEvents": meta + self.events, "displayTimeUnit": "ms"}, f)


_TRACER: Tracer | None = None


def enable(rank: int) -> Tracer:
    """Start tracing this process (as ``rank``); returns the tracer."""
    global _TRACER
    _TRACER = Tracer(rank)
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


class TracedTransport:
    """Wraps a transport for one collective, recording each message as an event."""

    def __init__(self, inner: Transport, tracer: Tracer, flat: torch.Tensor, algo: str) -> None:
        self.inner, self.tracer, self.algo = inner, tracer, algo
        self.rank, self.world_size, self.stats = inner.rank, inner.world_size, inner.stats
        self._base = flat.data_ptr()
        self._elsize = flat.element_size()
        self._numel = flat.numel()
        self._starts = [s for s, _ in chunk_bounds(flat.numel(), inner.world_size)]
        self._posted: dict[int, tuple[int, str, dict]] = {}
        self._msg = 0

    def _chunk(self, tensor: torch.Tensor) -> int | None:
        offset = (tensor.data_ptr() - self._base) // self._elsize
        if 0 <= offset < self._numel:
            return bisect.bisect_right(self._starts, offset) - 1
        return None  # a scratch buffer (e.g. the scatter-reduce receive slot)

    def _post(self, pending: Pending, tensor: torch.Tensor, peer: int, tag: int) -> Pending:
        arrow = "->" if pending.op == "send" else "<-"
        args = {"peer": peer, "bytes": tensor.numel() * tensor.element_size(), "tag": tag, "msg": self._msg}
        chunk = self._chunk(tensor)
        if chunk is not None:
            args["chunk"] = chunk
        name = f"{pending.op} {arrow} r{peer}" + (f" c{chunk}" if chunk is not None else "")
        self._posted[id(pending)] = (time.monotonic_ns(), name, args)
        self._msg += 1
        return pending

    def isend(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        return self._post(self.inner.isend(tensor, peer, tag), tensor, peer, tag)

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        return self._post(self.inner.irecv(tensor, peer, tag), tensor, peer, tag)

    def wait(self, pending: Pending, deadline: float) -> None:
        self.inner.wait(pending, deadline)
        start, name, args = self._posted.pop(id(pending))
        self.tracer.add(
            name, f"{self.algo}.{pending.op}", start, time.monotonic_ns(), f"{pending.op}s", **args
        )


def merge(paths: Sequence[str], out: str) -> str:
    """Join per-rank trace files into one Chrome trace at ``out``; returns ``out``."""
    events: list[dict[str, Any]] = []
    for path in paths:
        with open(path) as f:
            events.extend(json.load(f)["traceEvents"])
    with open(out, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return out
