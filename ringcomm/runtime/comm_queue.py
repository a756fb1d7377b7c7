"""The comm queue: one thread per process runs every collective, one at a time, in issue order.

A collective must be entered in the same order on every rank, and two
collectives in flight at once on one rank would share receive buffers and
interleave their messages. So, as Horovod's background thread does, ringcomm
owns the thread that talks to the peers, and every caller in the process goes
through one FIFO::

    caller threads:   all_reduce_async(b0)   all_reduce_async(b1)   all_reduce(x)  (blocks)
                             |                      |                    |
    FIFO:                  [ b0 ]  ---------------[ b1 ]--------------[ x ]
    comm thread:           run b0 .............. run b1 ............ run x  -> wakes the caller

A blocking ``all_reduce`` that finds the queue empty and the thread idle runs
in the caller's own thread instead (it holds the queue meanwhile, so whatever
is issued after it runs after it): no thread hand-off on the common path of a
training loop or a benchmark that calls one collective at a time.

**Futures and their callbacks.** The comm thread completes each future it was
given, and torch runs the future's callbacks right there, on the comm thread.
Whatever a future or a callback does cannot stop the thread: a future the user
completed already, or one that rejects the result, is logged and the queue goes
on. A blocking collective issued from a callback is always refused with the
same ``CommError`` (``refuse_blocking_here``): the thread cannot wait for
itself, and whether it happened to find the queue empty must not decide.

Order between threads is the order in which calls reach the queue. If two
threads of one rank issue collectives concurrently, that order can differ from
rank to rank (and the same-call check will then say so): issue collectives
from one thread, or chain them, as DDP does with its hook.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..errors import CommError

__all__ = ["CommQueue", "CommStats"]

T = TypeVar("T")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CommStats:
    """What the comm queue has done since it started (cumulative; diff two snapshots for a step).

    Attributes:
        calls: collectives completed or failed.
        seconds: time spent inside them (from start to end of each, not overlapping), seconds.
        sent_bytes, recv_bytes: bytes this rank's transports sent and received in them.
    """

    calls: int = 0
    seconds: float = 0.0
    sent_bytes: int = 0
    recv_bytes: int = 0

    def __sub__(self, other: CommStats) -> CommStats:
        return CommStats(
            self.calls - other.calls,
            self.seconds - other.seconds,
            self.sent_bytes - other.sent_bytes,
            self.recv_bytes - other.recv_bytes,
        )


class _Item:
    __slots__ = ("fn", "what", "future", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any], what: str, future: torch.futures.Future | None) -> None:
        self.fn, self.what, self.future = fn, what, future
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def finish(self, result: Any, error: BaseException | None) -> None:
        """Hand the outcome over: to the future if there is one, then wake a blocked caller.

        Never raises, and ``done`` is always set: this runs on the comm thread, and an exception
        escaping here would end the thread, leaving every later caller waiting forever.
        """
        self.result, self.error = result, error
        try:
            if self.future is not None:
                self._complete(result, error)
        finally:
            self.done.set()

    def _complete(self, result: Any, error: BaseException | None) -> None:
        future = self.future
        assert future is not None
        outcome = "its result" if error is None else f"its error ({type(error).__name__}: {error})"
        # Look first: set_exception on a completed future raises, but only after replacing how
        # the future unwraps its value, so the user's own result would be lost to a TypeError.
        if future.done():
            _log.warning("ringcomm: %s finished, but its future was already completed; %s was dropped",
                         self.what, outcome)
            return
        try:
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
            return
        except BaseException as exc:  # it rejects this value, or its user completed it just now
            refused = exc
        if future.done():
            _log.warning("ringcomm: %s finished, but its future was completed meanwhile; %s was dropped "
                         "(%s: %s)", self.what, outcome, type(refused).__name__, refused)
            return
        # The future refused the value but is still pending: give it an error instead, so that
        # whoever waits on it learns what happened rather than waiting forever.
        why = CommError(f"{self.what} finished, but its future refused {outcome}: {type(refused).__name__}: {refused}")
        try:
            future.set_exception(why)
        except BaseException as exc:
            _log.error("ringcomm: %s; setting that error on the future failed too (%s: %s)",
                       why, type(exc).__name__, exc)


class CommQueue:
    """A FIFO of collectives and the daemon thread that runs them (started on first use).

    Args:
        name: the thread's name (it names the lane in a trace).
    """

    def __init__(self, name: str = "ringcomm-comm") -> None:
        self.name = name
        self._cond = threading.Condition()
        self._items: deque[_Item] = deque()
        self._running: str | None = None  # what runs now (inline or on the thread), for errors
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stats = CommStats()

    # --- issuing ---

    def run(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` in its turn and return its result (or raise its exception); blocks."""
        self.refuse_blocking_here(what)
        with self._cond:
            self._check_open(what)
            inline = self._running is None and not self._items
            if inline:
                self._running = what
            else:
                item = self._enqueue(fn, what, None)
        if inline:
            try:
                return fn()
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def submit(self, fn: Callable[[], Any], what: str, future: torch.futures.Future) -> torch.futures.Future:
        """Queue ``fn``; ``future`` gets its result or exception when it has run. Never blocks."""
        with self._cond:
            self._check_open(what)
            self._enqueue(fn, what, future)
        return future

    def refuse_blocking_here(self, what: str) -> None:
        """Raise ``CommError`` if the caller is the comm thread (a future's callback runs there).

        A blocking collective there would wait for the thread it runs on. It is refused every
        time, whether or not the queue happens to be empty (when it is, it could run inline, but
        then the same program would fail or not depending on timing).
        """
        if threading.current_thread() is self._thread:
            raise CommError(
                f"{what} was refused: a blocking collective issued on ringcomm's comm thread (in a "
                "future's callback) would wait for the thread it runs on; use all_reduce_async there, "
                "or call it from your own thread after the future is done"
            )

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise CommError(f"ringcomm is shut down; {what} was not started")

    def _enqueue(self, fn: Callable[[], Any], what: str, future: torch.futures.Future | None) -> _Item:
        item = _Item(fn, what, future)
        self._items.append(item)
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()
        self._cond.notify_all()
        return item

    # --- the thread ---

    def _serve(self) -> None:
        while True:
            with self._cond:
                while self._running is not None or not (self._items or self._closed):
                    self._cond.wait()
                if not self._items:  # closed and drained
                    return
                item = self._items.popleft()
                self._running = item.what
            try:
                result, error = item.fn(), None
            except BaseException as exc:  # everything reaches the caller through the item
                result, error = None, exc
            with self._cond:
                self._running = None
                self._cond.notify_all()
            item.finish(result, error)

    # --- accounting ---

    def record(self, seconds: float, sent_bytes: int, recv_bytes: int) -> None:
        """Add one finished collective to the statistics (called by whoever ran it)."""
        with self._cond:
            s = self._stats
            self._stats = CommStats(
                s.calls + 1, s.seconds + seconds, s.sent_bytes + sent_bytes, s.recv_bytes + recv_bytes
            )

    def stats(self) -> CommStats:
        """A snapshot of the cumulative statistics."""
        with self._cond:
            return self._stats

    # --- the end ---

    def close(self, timeout: float) -> None:
        """Refuse new work, let queued collectives finish, stop the thread.

        Raises:
            CommError: a collective is still running after ``timeout`` seconds. The
                collectives queued behind it fail with the same error; the running one is
                left alone (a thread inside a backend cannot be stopped from outside).

        Queued collectives that have not started by then (the thread is still in a
        callback of an earlier one's future) fail too, with a ``CommError`` saying so:
        never dropped unanswered, which would leave a blocked caller waiting forever.

        Called on the comm thread itself (``ringcomm.shutdown()`` in a future's callback), it
        raises ``CommError`` at once and closes nothing: the thread cannot wait for itself.
        """
        if threading.current_thread() is self._thread:
            raise CommError(
                "ringcomm.shutdown() was called on ringcomm's comm thread (in a future's callback), "
                "which cannot wait for itself; call it from your own thread once the future is done"
            )
        end = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while (self._running is not None or self._items) and time.monotonic() < end:
                self._cond.wait(max(end - time.monotonic(), 0.0))
            stuck = self._running
            abandoned = list(self._items)
            self._items.clear()
        if stuck is not None:
            error = CommError(
                f"ringcomm: {stuck} is still running after {timeout:g} s (a peer stopped answering?); "
                "the process group must not be destroyed under it"
            )
            for item in abandoned:
                item.finish(None, error)
            raise error
        for item in abandoned:
            late = f"the comm thread was in a callback of an earlier collective's future for {timeout:g} s"
            item.finish(None, CommError(f"ringcomm is shut down; {item.what} was not started ({late})"))
        if self._thread is not None:
            self._thread.join(timeout=max(end - time.monotonic(), 0.1))
