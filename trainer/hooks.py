"""DDP communication hooks that average gradient buckets with ringcomm instead of DDP's all-reduce.

DDP groups gradients into buckets (25 MB by default, in reverse order of the
parameters) and, as soon as every gradient of a bucket is ready during
``backward()``, calls the registered hook with it. The hook must return a
``torch.futures.Future`` that will hold the averaged bucket; DDP waits for all
of them at the end of backward and copies the results into ``param.grad``.

Overlap. The hook itself must not block, or backward would stop until the
bucket is reduced. So it only puts the bucket on a queue and returns an
unfinished future; a single communication thread takes buckets off the queue
in order, all-reduces each with ``ringcomm.all_reduce(op="avg")``, and
completes its future with ``set_result``::

    autograd thread:  grad grad grad | hook(b0) grad grad | hook(b1) grad | wait all
    comm thread:                     [ all_reduce(b0) ....][ all_reduce(b1) ... ]

Why one thread, and a FIFO: DDP calls the hook for the buckets in the same
order on every rank, and a collective must be entered in the same order
everywhere; one thread draining one queue keeps that order. Two threads could
start bucket 1 before bucket 0 on one rank and the other way round elsewhere.

Gradients reach the hook summed over nothing: each rank's own, not divided by
the world size (DDP's built-in hook divides first, then sums); ``op="avg"``
sums, then divides once. DDP rebuilds its buckets after the first iteration,
so nothing here is keyed by bucket index.

Errors. If an all-reduce raises (a peer died, a timeout, a bad option), the
thread sets the exception on that bucket's future, so ``loss.backward()``
raises it in the training loop instead of hanging; every later bucket fails at
once with an error that names the first one.

Metrics. The state sums, per step, the seconds the thread spent in
``all_reduce`` and the bytes this rank sent (the transport's counters);
``mark_step`` closes a step and appends a record to ``step_log``.
"""

# No "from __future__ import annotations": DDP checks the hook's annotations at runtime
# (bucket must be dist.GradBucket, the return torch.futures.Future[torch.Tensor]), not as strings.

import queue
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

import ringcomm
from ringcomm import trace
from ringcomm.api import ALGOS

__all__ = ["RingcommState", "ringcomm_hook"]

#: signature of the tracing callback: (start, end) as time.perf_counter() values, bytes sent


class RingcommState:
    """State for ``ringcomm_hook``: which algorithm, the communication thread, the per-step counters.

    Creating it makes the transport (``ringcomm.init``), which is collective:
    build the state on every rank, in the main thread, before training, so the
    communication thread never creates process groups.

    Args:
        algo: a key of ``ringcomm.api.ALGOS`` (``"ring"``, ``"ring_simple"``, ``"naive"``, ``"ps"`` ...).
        transport: ``"torch"`` or ``"zmq"``.
        device: where the gradients live (``"cpu"`` or a CUDA device).
        timeout: seconds one bucket's all-reduce may take; None: ringcomm's default.
        options: extra keyword arguments for the algorithm (e.g. ``ps_rank`` for ``"ps"``).

    Example::

        >>> ddp = DistributedDataParallel(model)
        >>> state = RingcommState("ring", "torch", device="cpu")
        >>> ddp.register_comm_hook(state, ringcomm_hook)
        >>> loss_fn(ddp(x), y).backward()       # buckets go over the ring
        >>> state.mark_step(step=1)             # {'step': 1, 'comm_time_s': ..., 'bytes': ..., 'buckets': ...}
        >>> state.close()
    """

    __slots__ = (
        # what to run
        "algo",
        "transport",
        "timeout",
        "options",
        "_comm",
        # the communication thread
        "_queue",
        "_thread",
        "_error",
        "_closed",
        # per-step counters (guarded by _lock), the log, the tracing hook
        "_lock",
        "_comm_time_s",
        "_bytes",
        "_recv_bytes",
        "_buckets",
        "step_log",
    )

    def __init__(
        self,
        algo: str = "ring",
        transport: str = "torch",
        *,
        device: str | torch.device = "cpu",
        timeout: float | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        if algo not in ALGOS:
            raise ValueError(f"unknown algo {algo!r} for the comm hook; expected one of {', '.join(ALGOS)}")
        if not dist.is_initialized():
            raise RuntimeError("RingcommState needs torch.distributed.init_process_group first")
        self.algo = algo
        self.transport = transport
        self.timeout = timeout
        self.options = dict(options or {})
        self._comm = ringcomm.init(transport, device)  # collective: every rank, same order

        self._queue: queue.SimpleQueue[tuple[torch.Tensor, torch.futures.Future, Any] | None] = (
            queue.SimpleQueue()
        )
        self._error: BaseException | None = None
        self._closed = False

        self._lock = threading.Lock()
        self._comm_time_s = 0.0
        self._bytes = 0
        self._recv_bytes = 0
        self._buckets = 0
        self.step_log: list[dict[str, float | int]] = []

        self._thread = threading.Thread(target=self._run, name=f"ringcomm-{algo}-hook", daemon=True)
        self._thread.start()

    # --- the communication thread ---

    def _run(self) -> None:
        """Take buckets off the queue in order; all-reduce each; complete its future."""
        stats = self._comm.stats
        while True:
            item = self._queue.get()
            if item is None:
                return
            buffer, fut, ready, index = item
            if self._error is not None:  # an earlier bucket failed: do not talk to the peers again
                fut.set_exception(self._failed_before())
                continue
            try:
                if ready is not None:  # CUDA: the gradients are computed on the autograd thread's stream
                    torch.cuda.current_stream(buffer.device).wait_event(ready)
                sent0, recv0 = stats.sent_bytes, stats.recv_bytes
                tracer = trace.get()
                start_ns = time.monotonic_ns()
                start = time.perf_counter()
                ringcomm.all_reduce(
                    buffer,
                    "avg",
                    algo=self.algo,
                    transport=self.transport,
                    timeout=self.timeout,
                    **self.options,
                )
                end = time.perf_counter()
                sent = stats.sent_bytes - sent0
                with self._lock:
                    self._comm_time_s += end - start
                    self._bytes += sent
                    self._recv_bytes += stats.recv_bytes - recv0
                    self._buckets += 1
                if tracer is not None:  # launch.py --trace: one span per bucket on this thread
                    tracer.add(
                        f"bucket {index}",
                        "bucket",
                        start_ns,
                        time.monotonic_ns(),
                        "comm thread",
                        bytes=buffer.numel() * buffer.element_size(),
                        sent=sent,
                    )
            except BaseException as exc:  # everything must reach the training loop
                self._error = exc
                fut.set_exception(exc)
                continue
            fut.set_result(buffer)

    def _failed_before(self) -> RuntimeError:
        err = self._error
        return RuntimeError(
            f"ringcomm hook ({self.algo}, {self.transport}): an earlier bucket failed with "
            f"{type(err).__name__}: {err}; no further buckets are sent"
        )

    # --- for the training loop ---

    def mark_step(self, step: int) -> dict[str, float | int]:
        """Close step ``step``: append and return its record, and zero the counters.

        Call it after ``backward()`` has returned (DDP has then waited for every
        bucket of the step). The record: ``step``, ``comm_time_s`` (seconds in
        all_reduce, summed over buckets), ``bytes`` (sent by this rank),
        ``recv_bytes``, ``buckets``.
        """
        with self._lock:
            record: dict[str, float | int] = {
                "step": step,
                "comm_time_s": self._comm_time_s,
                "bytes": self._bytes,
                "recv_bytes": self._recv_bytes,
                "buckets": self._buckets,
            }
            self._comm_time_s = 0.0
            self._bytes = self._recv_bytes = self._buckets = 0
        self.step_log.append(record)
        return record

    def close(self, timeout: float = 10.0) -> None:
        """Stop the communication thread (after the buckets already queued). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)


def ringcomm_hook(state: RingcommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` across ranks with ringcomm, on the state's communication thread.

    Returns at once. The future completes with ``bucket.buffer()`` itself,
    reduced in place (same shape, dtype, device), or with the exception the
    all-reduce raised.

    Args:
        state: a ``RingcommState`` (one per DDP model).
        bucket: the bucket DDP hands over; its flat ``buffer()`` holds this rank's
            gradients, not yet divided by the world size.

    Returns:
        A future of the averaged flat buffer.

    Example::

        >>> ddp_model.register_comm_hook(RingcommState("ring"), ringcomm_hook)
    """
    buffer = bucket.buffer()
    fut: torch.futures.Future[torch.Tensor] = (
        torch.futures.Future(devices=[buffer.device]) if buffer.is_cuda else torch.futures.Future()
    )
    if state._error is not None:  # fail fast: the peers are not in step any more
        fut.set_exception(state._failed_before())
        return fut
    if state._closed:
        fut.set_exception(RuntimeError("ringcomm hook called after RingcommState.close()"))
        return fut
    ready = None
    if buffer.is_cuda:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(buffer.device))
    state._queue.put((buffer, fut, ready, bucket.index()))
    return fut
