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

**Jobs.** Some work needs several collectives in a row, each depending on the last one's
result (PowerSGD: all-reduce P, orthonormalise it, then all-reduce Q). Chaining them with
callbacks is not safe: a callback that issues Q's all-reduce reaches the FIFO whenever the comm
thread gets to it, after the next bucket's P on one rank and before it on another. A *job*
(``submit_job``, ``ringcomm.run_async``) is a function that takes one turn in the FIFO and runs
on the comm thread; the collectives it calls run inline, one after another, while it holds the
queue, so they keep their place against everything issued before and after the job::

    caller thread:   all_reduce_async(a)    run_async(job)              all_reduce_async(b)
    FIFO:              [ a ] ------------- [ job ] ---------------------- [ b ]
    comm thread:     run a ............... job: P, orthonormalise, Q .... run b

Inside a job a blocking collective is allowed (it runs inline, the thread waits for no one),
and an ``*_async`` one runs inline too and returns a completed future. Only inside: a future's
callback, even one of a future completed inside a job, is not a job.

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
    __slots__ = ("fn", "what", "future", "job", "done", "result", "error")

    def __init__(
        self, fn: Callable[[], Any], what: str, future: torch.futures.Future | None, job: bool = False
    ) -> None:
        self.fn, self.what, self.future, self.job = fn, what, future, job
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
        self._job: str | None = None  # the job the comm thread runs now (written by that thread only)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stats = CommStats()

    # --- issuing ---

    def run(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` in its turn and return its result (or raise its exception); blocks.

        Inside a job (on the comm thread, which holds the queue for it) ``fn`` runs at once.
        """
        if self.in_job():
            return self._run_in_job(fn, what)
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
        """Queue ``fn``; ``future`` gets its result or exception when it has run. Never blocks.

        Inside a job ``fn`` runs at once instead, and ``future`` is completed on return: queued, it
        would run after whatever other threads issued meanwhile, in an order that differs by rank.
        """
        if self.in_job():
            try:
                result, error = self._run_in_job(fn, what), None
            except BaseException as exc:  # to the future, as on the thread
                result, error = None, exc
            job, self._job = self._job, None  # the future's callbacks run here, but not in the job
            try:
                _Item(fn, what, future).finish(result, error)
            finally:
                self._job = job
            return future
        with self._cond:
            self._check_open(what)
            self._enqueue(fn, what, future)
        return future

    def submit_job(self, fn: Callable[[], Any], what: str, future: torch.futures.Future) -> torch.futures.Future:
        """Queue ``fn`` as a job: it runs on the comm thread in its turn, and the collectives it
        calls (``run``, ``submit``) run inline, in the order it calls them, while it holds the
        queue. ``future`` gets its result or exception. Never blocks.

        Raises:
            CommError: called inside a job (a job's work is the job's; queued, it would run after
                work other threads issued meanwhile, in an order that differs by rank).
        """
        if self.in_job():
            raise CommError(
                f"{what} was refused: a job was submitted inside the job {self._job}; call its function "
                "directly there (it runs inline, in order)"
            )
        with self._cond:
            self._check_open(what)
            self._enqueue(fn, what, future, job=True)
        return future

    def in_job(self) -> bool:
        """Whether the caller is the comm thread running a job (``submit_job``)."""
        return self._job is not None and threading.current_thread() is self._thread

    def _run_in_job(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` now, inside the running job, naming it meanwhile (for ``close``'s error)."""
        with self._cond:  # not refused while closing: the job was queued before, and close lets it finish
            self._running = f"{what} (in {self._job})"
        try:
            return fn()
        finally:
            with self._cond:
                self._running = self._job

    def refuse_blocking_here(self, what: str) -> None:
        """Raise ``CommError`` if the caller is the comm thread (a future's callback runs there),
        outside a job.

        A blocking collective there would wait for the thread it runs on. It is refused every
        time, whether or not the queue happens to be empty (when it is, it could run inline, but
        then the same program would fail or not depending on timing). Inside a job it is allowed:
        the job holds the queue, and the collective runs inline, in the job's order.
        """
        if threading.current_thread() is self._thread and self._job is None:
            raise CommError(
                f"{what} was refused: a blocking collective issued on ringcomm's comm thread (in a "
                "future's callback) would wait for the thread it runs on; use all_reduce_async there, "
                "or call it from your own thread after the future is done"
            )

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise CommError(f"ringcomm is shut down; {what} was not started")

    def _enqueue(
        self, fn: Callable[[], Any], what: str, future: torch.futures.Future | None, job: bool = False
    ) -> _Item:
        item = _Item(fn, what, future, job)
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
                self._job = item.what if item.job else None
            try:
                result, error = item.fn(), None
            except BaseException as exc:  # everything reaches the caller through the item
                result, error = None, exc
            with self._cond:
                self._running = self._job = None  # before finish: the future's callbacks are not in the job
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
