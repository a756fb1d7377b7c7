"""``ringcomm.all_reduce`` and ``all_reduce_async``: validate, queue, check, run the algorithm in place.

Everything that can be wrong with the arguments is found here, before a
single byte moves, and raised as ``ValueError`` with the tensor untouched
(a bool is not a number here: ``timeout=True`` is refused, not one second). The
call then takes its turn in the process's comm queue (``comm_queue.py``) and,
when it runs::

    n = the call's number in this world            (the same on every rank: queue order)
    same-call check through the store              (fingerprint.py; MismatchError on every rank)
    the transport, set up on first use             (session.py; collective)
    the algorithm, in place on a flat view         (algorithms.py)

A call refused on one rank (whatever it raised before the call was queued: a
``ValueError``, a ``TypeError`` from deep inside a check, a blocking call from
a future's callback) still takes its number: it publishes the refusal, with
its reason, in the check's slot, so with the check on the other ranks raise
``MismatchError`` at once, naming the rank and the reason, instead of waiting
for it (and the comm thread reads theirs, so the refusing rank stays in step;
``fingerprint.refuse``).
"""

from __future__ import annotations

import logging
import numbers
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import auto
from .algorithms.registry import ALGOS, AlgorithmSpec
from .errors import CommError, MismatchError
from .ops import OPS, check_op_dtype
from .runtime import session as sessions
from .runtime import trace
from .runtime.check import check_same_call, fingerprint, refuse
from .runtime.comm_queue import CommStats
from .runtime.settings import DEFAULT_TIMEOUT_S, check_default, default_timeout
from .transports.base import Transport, TransportKind, transport_kind

__all__ = ["all_reduce", "all_reduce_async", "init", "comm_stats", "validate", "ALGOS"]

_log = logging.getLogger(__name__)

#: Above this many elements, a tensor whose strides interleave is not checked element by element
#: for overlap (that needs 8 bytes per element); it is refused instead (see ``_check_no_overlap``).
_OVERLAP_CHECK_MAX = 1 << 24


@dataclass
class _Call:
    """One validated all_reduce, ready to run."""

    tensor: torch.Tensor
    op: str
    spec: AlgorithmSpec
    kind: TransportKind
    options: dict[str, Any]
    timeout: float
    check: bool

    @property
    def what(self) -> str:
        t = self.tensor
        return f"all_reduce({t.numel()} x {str(t.dtype).removeprefix('torch.')}, {self.spec.name} over {self.kind.name})"


def validate(
    algo: str, transport: str, device: torch.device | str, options: Mapping[str, Any], world_size: int | None
) -> tuple[AlgorithmSpec, TransportKind, dict[str, Any]]:
    """Check ``algo``, ``transport``, ``device`` and the options; return them resolved.

    ``world_size`` None skips the checks that need it (option values' ranges).

    Raises:
        ValueError: naming the argument that is wrong and what would be right.
    """
    spec = ALGOS.get(algo) if isinstance(algo, str) else None
    if spec is None:
        raise ValueError(f"unknown algo {algo!r}; expected one of {', '.join(ALGOS)}")
    kind = transport_kind(transport)
    kind.validate_device(torch.device(device))
    return spec, kind, spec.options(options, world_size)


def _prepare(
    tensor: Any, op: str, algo: str, transport: str, timeout: float | None, check: bool | None, options: dict
) -> _Call:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"all_reduce expects a torch.Tensor, got {type(tensor).__name__}")
    if not isinstance(op, str):  # a list would reach a dict lookup and fail as a TypeError
        raise ValueError(f"op must be a string, one of {', '.join(map(repr, OPS))}; got {op!r}")
    check_op_dtype(op, tensor.dtype)
    _check_no_overlap(tensor)
    if timeout is not None and not _is_timeout(timeout):
        raise ValueError(_timeout_problem(timeout))
    if check is not None and not isinstance(check, bool):  # bool("no") is True
        raise ValueError(f"check must be True, False or None (RINGCOMM_CHECK), got {check!r}")
    world_size = dist.get_world_size() if dist.is_initialized() else None
    spec, kind, complete = validate(algo, transport, tensor.device, options, world_size)
    if world_size is None:
        raise RuntimeError("ringcomm.all_reduce needs torch.distributed.init_process_group to have been called")
    return _Call(
        tensor, op, spec, kind, complete, float(timeout) if timeout is not None else default_timeout(),
        check_default() if check is None else check,
    )


def _is_timeout(value: object) -> bool:
    """Whether ``value`` is a timeout ``all_reduce`` takes: a positive, finite number of seconds.

    Any real number (a numpy scalar too), but not a bool: ``timeout=True`` is a mistake, not 1 s
    (numpy's bool is no ``numbers.Real``; Python's is, as a subclass of int).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return 0 < float(value) < float("inf")


def _timeout_problem(value: object) -> str:
    """What is wrong with a ``timeout`` that ``_is_timeout`` refused."""
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):  # Python's or numpy's
        return f"timeout={value!r} is a bool, not a number of seconds; pass e.g. timeout=30.0"
    return f"timeout must be a positive number of seconds, got {value!r}"


def _check_no_overlap(tensor: torch.Tensor) -> None:
    """``ValueError`` if two elements of ``tensor`` are one place in memory, or might be.

    The result is written back in place, element by element: an ``expand``-ed tensor (stride
    0) or an overlapping ``as_strided`` view cannot hold a separate result per element, and the
    write-back failed (or silently kept one of them) only after the peers had finished.

    The usual case is decided from the strides alone: sorted by stride, each dimension steps
    past everything the smaller-stride dimensions reach, so no two index tuples meet. Layouts
    that interleave fail that test; for those, the offsets are counted, up to
    ``_OVERLAP_CHECK_MAX`` elements.
    """
    shape, strides = tuple(tensor.shape), tuple(tensor.stride())
    if tensor.numel() <= 1:
        return
    dims = sorted((st, n) for n, st in zip(shape, strides) if n > 1)
    reach = 0  # the farthest offset, in elements, that the dimensions seen so far reach
    for st, n in dims:
        if st <= reach:
            break
        reach += st * (n - 1)
    else:
        return
    where = f"shape {list(shape)}, stride {list(strides)}"
    if any(st == 0 for st, _ in dims):
        raise ValueError(
            f"the tensor ({where}) is expanded: elements along a stride-0 dimension share memory, so "
            "all_reduce cannot write a result per element; reduce a copy that owns each element "
            "(tensor.contiguous()) or the tensor it was expanded from"
        )
    if tensor.numel() > _OVERLAP_CHECK_MAX:
        raise ValueError(
            f"the tensor ({where}) has interleaved strides, and ringcomm does not check "
            f"{tensor.numel()} elements one by one for overlap; pass a contiguous tensor (then copy back)"
        )
    offsets = torch.zeros((), dtype=torch.int64)
    for n, st in zip(shape, strides):
        offsets = offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
    distinct = offsets.unique().numel()
    if distinct < tensor.numel():
        raise ValueError(
            f"the tensor ({where}) overlaps itself: its {tensor.numel()} elements occupy {distinct} "
            "places in memory, so all_reduce cannot write a result per element; pass a tensor that "
            "owns each element (e.g. tensor.clone())"
        )


def _refuse(session: sessions.Session, reason: str, check: bool | None, timeout: object) -> None:
    """Take this call's number in queue order; publish the refusal if the check is on.

    The refusal waits for the peers to read it as long as the refused call would have run: its own
    ``timeout`` where that one is valid, else the default (and 300 s if the default is junk too).
    """
    try:
        publish = check if isinstance(check, bool) else check_default()
    except ValueError:
        publish = True
    if _is_timeout(timeout):
        wait = float(timeout)  # type: ignore[arg-type]
    else:
        try:
            wait = default_timeout()
        except ValueError:
            wait = DEFAULT_TIMEOUT_S

    def refusal() -> None:
        if session.failed is not None:
            return  # the peers raise anyway: they are past the failed call
        n = session.begin_call()
        if publish and session.world_size > 1:
            try:
                refuse(session, n, reason, time.monotonic() + wait)
            except CommError as exc:  # a peer never came to this call: out of step, as below
                _fail(session, n, exc)
                raise

    session.queue.submit(refusal, "a refused all_reduce", torch.futures.Future())


def _admit(
    tensor: Any,
    op: str,
    algo: str,
    transport: str,
    timeout: float | None,
    check: bool | None,
    options: dict,
    blocking: bool,
) -> tuple[sessions.Session, _Call]:
    """Validate and find the session; any refusal is published to the peers, then raised.

    Whatever is raised here (``ValueError`` for bad arguments, but also a ``TypeError`` from an
    argument no check foresaw, or the ``CommError`` of a ``blocking`` call on the comm thread)
    refuses the call before a byte moves, and the peers must hear of it: otherwise they wait
    for this rank's fingerprint until their timeout, or pair their call with its next one.
    """
    try:
        call = _prepare(tensor, op, algo, transport, timeout, check, options)
        session = sessions.current()
        if blocking:
            session.queue.refuse_blocking_here(call.what)
    except BaseException as exc:
        if dist.is_initialized():
            try:
                _refuse(sessions.current(), f"{type(exc).__name__}: {exc}", check, timeout)
            except Exception as unsaid:  # raise the refusal itself; say why the peers were not told
                _log.error(
                    "ringcomm: could not tell the peers that this rank refused an all_reduce "
                    "(%s: %s): %s: %s; they wait for this rank until their timeout",
                    type(exc).__name__, exc, type(unsaid).__name__, unsaid,
                )
        raise
    return session, call


def _execute(session: sessions.Session, call: _Call) -> torch.Tensor:
    """Run ``call`` now (in its turn): check, transport, algorithm; account for it."""
    n = session.begin_call()
    start = time.perf_counter()
    deadline = time.monotonic() + call.timeout
    tensor = call.tensor
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    flat = work.view(-1)
    comm: Transport | None = None
    sent0 = recv0 = 0
    nbytes = flat.numel() * flat.element_size()
    try:
        if call.check and session.world_size > 1:
            dtype = str(tensor.dtype).removeprefix("torch.")
            mine = fingerprint(
                flat.numel(), dtype, call.op, call.spec.name, call.kind.name, tensor.device.type, call.options
            )
            check_same_call(session, n, mine, deadline)
        spec, options = call.spec, call.options
        if spec.name == "auto":  # the same pick on every rank: the same fit (rank 0's), the same call
            spec = ALGOS[session.auto_pick(call.kind.name, nbytes, deadline, tensor.device.type)]
            options = spec.options({}, session.world_size)
        comm = session.transport(call.kind, tensor.device.type, deadline)
        sent0, recv0 = comm.stats.sent_bytes, comm.stats.recv_bytes
        tracer = trace.get()
        if tracer is None:
            spec.run(flat, call.op, comm, deadline, session.scratch, **options)
        else:
            parts = spec.cut(flat.numel(), comm.world_size, options)
            name = spec.name if spec is call.spec else f"{call.spec.name}->{spec.name}"
            # the trace's lanes: the comm thread's collectives apart from the caller's own
            lane = "comm thread" if threading.current_thread().name == session.queue.name else "main"
            with tracer.span(f"all_reduce {name} {nbytes} B", "all_reduce", lane, algo=name, bytes=nbytes):
                traced = trace.TracedTransport(comm, tracer, flat, spec.name, parts)
                spec.run(flat, call.op, traced, deadline, session.scratch, **options)
    except BaseException as exc:
        # Whatever failed once the call had begun (a peer, a timeout, but also an out-of-memory
        # error, a Ctrl-C), the ranks are out of step now, with receives maybe still posted into
        # buffers the next call reuses; only a MismatchError is raised alike before data moves.
        if not isinstance(exc, MismatchError):
            why = f"rank {session.rank}: {call.what} failed: {type(exc).__name__}: {exc}"
            _fail(session, n, exc if isinstance(exc, CommError) else CommError(why))
        raise
    finally:
        sent = comm.stats.sent_bytes - sent0 if comm is not None else 0
        got = comm.stats.recv_bytes - recv0 if comm is not None else 0
        session.queue.record(time.perf_counter() - start, sent, got)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def _fail(session: sessions.Session, n: int, error: CommError) -> None:
    """Mark the world failed (``session.py``) and tell peers waiting on this rank in call ``n`` at once."""
    session.failed = session.failed or error
    if session.liveness is not None:
        session.liveness.give_up(n)


def init(transport: str = "torch", device: str | torch.device = "cpu", timeout: float | None = None) -> Transport:
    """Set up the transport now (collective: call on every rank), instead of at first use.

    Useful before handing collectives to another thread (a DDP comm hook): the
    set-up then happens here, in this thread, in a known order.

    Raises:
        ValueError: unknown transport, a device it cannot carry, or a bad timeout. The refusal takes the
            set-up's turn, so the other ranks raise ``MismatchError`` at once, naming it,
            instead of waiting for this rank until their timeout.
        MismatchError: ranks asked for different transports, or one refused.
    """
    try:
        kind = transport_kind(transport)
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device {device!r} is not a torch device: {exc}") from None
        kind.validate_device(dev)
        if timeout is not None and not _is_timeout(timeout):
            raise ValueError(_timeout_problem(timeout))
    except ValueError as exc:
        if dist.is_initialized():
            session = sessions.current()
            reason = f"refused ({type(exc).__name__}: {exc})"
            session.queue.run(lambda: session.refuse_setup(reason), "a refused init")
        raise
    session = sessions.current()
    deadline = time.monotonic() + (float(timeout) if timeout is not None else default_timeout())
    return session.queue.run(lambda: session.transport(kind, dev.type, deadline), f"setting up {transport}")


@torch.no_grad()
def all_reduce(
    tensor: torch.Tensor,
    op: str = "sum",
    *,
    algo: str = "ring",
    transport: str = "torch",
    timeout: float | None = None,
    check: bool | None = None,
    **options: Any,
) -> torch.Tensor:
    """Reduce ``tensor`` across all ranks, in place, and return it.

    Args:
        tensor: any shape; float16, bfloat16, float32, float64, int32 or int64.
            A non-contiguous tensor is reduced through a contiguous copy; one whose elements
            share memory (``expand``, an overlapping ``as_strided``) is refused.
        op: ``"sum"``, ``"avg"`` (floating dtypes only), ``"max"`` or ``"min"``.
        algo: ``"ring"`` (pipelined ring), ``"ring_simple"`` (the readable ring),
            ``"rhd"`` (recursive halving-doubling), ``"rd"`` (recursive doubling),
            ``"ps"`` (parameter server), ``"naive"`` (gather to rank 0), or ``"auto"``
            (the cost model picks per call, the same on every rank; ``explain_auto``
            says what and why); see ``ALGOS``.
        transport: ``"torch"`` (Gloo for CPU, NCCL for CUDA), ``"zmq"``, or ``"shm"``
            (shared memory, ranks of one host); see ``transport_names()``.
        timeout: seconds the whole collective may take before ``CommTimeoutError``;
            None means RINGCOMM_TIMEOUT or 300 s.
        check: first verify that every rank passed the same numel, dtype, op, algo,
            transport and options (``MismatchError`` on every rank otherwise); one round on
            the call board (one host) or through the store. None means RINGCOMM_CHECK (default on).
        **options: algorithm options, e.g. ``ps_rank``, ``ps_shards`` for ``algo="ps"``.

    Returns:
        ``tensor`` itself, holding the result, bitwise identical on every rank.

    Raises:
        ValueError: bad arguments, found before any communication; tensor untouched.
        MismatchError: ranks passed different calls, or one refused it (with the check
            on); tensor untouched.
        CommTimeoutError, PeerError: a peer did not answer in time or failed.
        CommError: called in a future's callback (on the comm thread, which it would wait
            for): refused every time, and the refusal is published like a ``ValueError``.

    After a ``CommError`` other than ``MismatchError``, ``tensor``'s contents are unspecified
    (partially reduced: some chunks summed, some not), and the world's later calls fail until
    the process group is re-initialised.

    Calls from several threads of one process run one at a time, in the order they
    reach the comm queue (``comm_queue.py``).

    Example::

        >>> dist.init_process_group("gloo")
        >>> grad = torch.ones(1000) * dist.get_rank()
        >>> ringcomm.all_reduce(grad, op="avg")
    """
    session, call = _admit(tensor, op, algo, transport, timeout, check, options, blocking=True)
    return session.queue.run(lambda: _execute(session, call), call.what)


def all_reduce_async(
    tensor: torch.Tensor,
    op: str = "sum",
    *,
    algo: str = "ring",
    transport: str = "torch",
    timeout: float | None = None,
    check: bool | None = None,
    **options: Any,
) -> torch.futures.Future[torch.Tensor]:
    """``all_reduce`` on the comm thread: returns at once with a future of ``tensor``.

    Same arguments, same in-place result. Bad arguments raise ``ValueError`` here,
    at once; failures in flight (``CommError``) are set on the future. Collectives
    run in the order they were issued (a FIFO shared with ``all_reduce``), so
    issuing them in the same order on every rank is enough. ``tensor`` must not be
    changed until the future completes. For a CUDA tensor the comm thread first
    waits for the work queued on the caller's current stream.

    The first call on a transport that is not set up yet (``init`` sets it up
    ahead) runs here, to the end, after the queued ones, and returns a completed
    future: setting up is collective (``dist.new_group``, a rendezvous), so it
    happens in the caller's thread and program order, never on the comm thread.

    Example::

        >>> fut = ringcomm.all_reduce_async(grad, op="avg")
        >>> ...                                # compute on
        >>> grad = fut.wait()
    """
    session, call = _admit(tensor, op, algo, transport, timeout, check, options, blocking=False)
    if (call.kind.name, tensor.device.type) not in session.transports:
        done: torch.futures.Future = (
            torch.futures.Future(devices=[tensor.device]) if tensor.is_cuda else torch.futures.Future()
        )

        def first() -> tuple[torch.Tensor | None, Exception | None]:
            try:
                with torch.no_grad():
                    return _execute(session, call), None
            except Exception as exc:  # failures in flight go on the future, as on the comm thread
                return None, exc

        result, error = session.run_here(first, call.what)
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)
        return done
    if tensor.is_cuda:
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(tensor.device))
        future: torch.futures.Future = torch.futures.Future(devices=[tensor.device])

        def run() -> torch.Tensor:
            torch.cuda.current_stream(tensor.device).wait_event(ready)
            with torch.no_grad():
                return _execute(session, call)
    else:
        future = torch.futures.Future()

        def run() -> torch.Tensor:
            with torch.no_grad():
                return _execute(session, call)

    return session.queue.submit(run, call.what, future)


def explain_auto(
    numel: int,
    dtype: torch.dtype | str = torch.float32,
    transport: str = "torch",
    world_size: int | None = None,
    device: str | torch.device = "cpu",
) -> auto.Choice:
    """What ``algo="auto"`` would pick for ``numel`` elements of ``dtype``, and why (``auto.explain``).

    In a running process group it answers with the fit every rank uses (rank 0's) and the group's
    size; outside one, with this process's tune file (or the defaults), and ``world_size`` is needed.
    """

    def world_fits() -> tuple[auto.Fits, int]:
        return sessions.current().tuning(), dist.get_world_size()

    running = dist.is_available() and dist.is_initialized()
    return auto.explain(numel, dtype, transport, world_size, device, world_fits if running else None)


def comm_stats() -> CommStats:
    """Cumulative statistics of this process's collectives in the current world (diff two for a step)."""
    return sessions.current().queue.stats()
