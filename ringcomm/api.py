"""``ringcomm.all_reduce``, ``reduce_scatter``, ``all_gather``, ``broadcast`` (and ``*_async``): validate, queue,
check, run the algorithm.

The four collectives share one path: a ``_Call`` names its collective, and ``_admit`` (validate,
publish a refusal), the comm queue and ``_execute`` (number, check, transport, algorithm, account)
serve them all; only the validation (``_prepare``, ``_prepare_collective``) and the algorithm's
signature differ (``registry.py`` for all_reduce, ``collectives.py`` for the others).

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from . import auto
from .algorithms.collectives import COLLECTIVE_ALGOS
from .algorithms.hier import node_shape
from .algorithms.registry import ALGOS, AlgorithmSpec
from .compress.wire import WireTransport, check_wire_dtype, round_result
from .compress.wire import wire_dtype as wire_dtype_of
from .errors import CommError, MismatchError
from .ops import OPS, SUPPORTED_DTYPES, check_op_dtype
from .runtime import session as sessions
from .runtime import trace
from .runtime.check import check_same_call, fingerprint, refuse
from .runtime.comm_queue import CommStats
from .runtime.settings import DEFAULT_TIMEOUT_S, check_default, default_timeout
from .transports.base import Transport, TransportKind, transport_kind
from .transports.torch import subgroup_problem

__all__ = [
    "all_reduce",
    "all_reduce_async",
    "reduce_scatter",
    "reduce_scatter_async",
    "all_gather",
    "all_gather_async",
    "broadcast",
    "broadcast_async",
    "run_async",
    "init",
    "comm_stats",
    "validate",
    "ALGOS",
]

_log = logging.getLogger(__name__)

T = TypeVar("T")

#: Above this many elements, a tensor whose strides interleave is not checked element by element
#: for overlap (that needs 8 bytes per element); it is refused instead (see ``_check_no_overlap``).
_OVERLAP_CHECK_MAX = 1 << 24


@dataclass
class _Call:
    """One validated collective, ready to run.

    ``tensor`` is what the call writes (all_reduce's and broadcast's tensor, the others' output);
    ``input`` what reduce_scatter and all_gather read (None for the other two).
    """

    tensor: torch.Tensor
    op: str
    spec: AlgorithmSpec
    kind: TransportKind
    options: dict[str, Any]
    timeout: float
    check: bool
    collective: str = "all_reduce"
    input: torch.Tensor | None = None
    src: int = 0
    wire: str | None = None  # all_reduce's wire_dtype (compress/wire.py): None sends the tensor's dtype

    @property
    def what(self) -> str:
        t = self.tensor
        root = f", src={self.src}" if self.collective == "broadcast" else ""
        return (
            f"{self.collective}({t.numel()} x {str(t.dtype).removeprefix('torch.')}{root}, "
            f"{self.spec.name} over {self.kind.name})"
        )

    def fingerprint(self, numel: int) -> list[object]:
        """What the same-call check compares: all_reduce's as before; the others name their collective
        in the algo field and their root in the options, so a rank calling all_gather while another
        calls broadcast differs in the check, and every rank raises ``MismatchError``."""
        dtype = str(self.tensor.dtype).removeprefix("torch.")
        if self.collective == "all_reduce":
            algo, options = self.spec.name, self.options
            if self.wire is not None:  # ranks must agree on what the wire carries
                options = {**options, "wire_dtype": self.wire}
        else:
            algo = f"{self.collective} {self.spec.name}"
            options = {**self.options, "src": self.src} if self.collective == "broadcast" else self.options
        return fingerprint(numel, dtype, self.op, algo, self.kind.name, self.tensor.device.type, options)


#: torch.distributed's reduce ops that ringcomm has, by what they mean here.
_REDUCE_OPS = {"SUM": "sum", "AVG": "avg", "MAX": "max", "MIN": "min"}


def op_name(op: object) -> str:
    """``op`` as one of ``ops.OPS``: a name as it is, a ``torch.distributed.ReduceOp`` by its meaning.

    Raises:
        ValueError: a ReduceOp that ringcomm does not reduce (PRODUCT, BAND, ...), or neither kind.
    """
    if isinstance(op, str):
        return op
    if isinstance(op, (dist.ReduceOp, dist.ReduceOp.RedOpType)):
        for name, ours in _REDUCE_OPS.items():
            if op == getattr(dist.ReduceOp, name):
                return ours
        raise ValueError(
            f"op={op!r} is not reduced by ringcomm; it reduces ReduceOp.SUM, AVG, MAX and MIN "
            f"(or {', '.join(map(repr, OPS))})"
        )
    raise ValueError(
        f"op must be a string, one of {', '.join(map(repr, OPS))}, or a torch.distributed.ReduceOp; got {op!r}"
    )


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
    tensor: Any,
    op: object,
    algo: str,
    transport: str,
    timeout: float | None,
    check: bool | None,
    options: dict,
    group: Any = None,
    wire_dtype: str | None = None,
) -> _Call:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"all_reduce expects a torch.Tensor, got {type(tensor).__name__}")
    op = op_name(op)  # a list would reach a dict lookup and fail as a TypeError: refused here
    check_op_dtype(op, tensor.dtype)
    _check_no_overlap(tensor)
    wire = check_wire_dtype(wire_dtype, tensor)
    if timeout is not None and not _is_timeout(timeout):
        raise ValueError(_timeout_problem(timeout))
    if check is not None and not isinstance(check, bool):  # bool("no") is True
        raise ValueError(f"check must be True, False or None (RINGCOMM_CHECK), got {check!r}")
    world_size = sessions.group_place(group)[1] if dist.is_initialized() else None
    spec, kind, complete = validate(algo, transport, tensor.device, options, world_size)
    if world_size is None:
        raise RuntimeError("ringcomm.all_reduce needs torch.distributed.init_process_group to have been called")
    _check_subgroup_transport(kind, tensor.device, group)
    return _Call(
        tensor, op, spec, kind, complete, float(timeout) if timeout is not None else default_timeout(),
        check_default() if check is None else check, wire=None if wire is None else str(wire_dtype),
    )


def _describe(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)}, {str(t.dtype).removeprefix('torch.')}, {t.numel()} elements"


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``[first, end)`` byte addresses that ``t``'s elements may touch (non-negative strides)."""
    reach = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 1)
    return t.data_ptr(), t.data_ptr() + (reach + 1) * t.element_size()


def _prepare_collective(
    collective: str,
    output: Any,
    input: Any,
    op: object,
    src: object,
    algo: str,
    transport: str,
    timeout: float | None,
    check: bool | None,
    options: dict,
    group: Any = None,
) -> _Call:
    """Validate a reduce_scatter, all_gather or broadcast (``input`` is None for broadcast); ``ValueError``
    naming what is wrong (the rank, the tensors' shapes and dtypes) before a byte moves."""
    if not dist.is_initialized():
        raise RuntimeError(f"ringcomm.{collective} needs torch.distributed.init_process_group to have been called")
    rank, world_size = sessions.group_place(group)
    where = f"rank {dist.get_rank()}: {collective}" if sessions.is_default(group) else (
        f"rank {dist.get_rank()} (rank {rank} of group= {dist.get_process_group_ranks(group)}): {collective}"
    )
    tensors = {"tensor": output} if input is None else {"output": output, "input": input}
    for label, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where} expects {label} to be a torch.Tensor, got {type(t).__name__}")
    if collective == "reduce_scatter":
        op = op_name(op)
        check_op_dtype(op, output.dtype)
    else:
        op = ""
        if output.dtype not in SUPPORTED_DTYPES:
            names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
            raise ValueError(f"{where}: unsupported dtype {output.dtype} ({_describe(output)}); ringcomm moves {names}")
    _check_no_overlap(output)
    if input is not None:
        if input.dtype != output.dtype or input.device != output.device:
            raise ValueError(
                f"{where}: input ({_describe(input)}, on {input.device}) and output ({_describe(output)}, "
                f"on {output.device}) must have one dtype and one device"
            )
        big, small = (output, input) if collective == "all_gather" else (input, output)
        if big.numel() != world_size * small.numel():
            names = ("output", "input") if collective == "all_gather" else ("input", "output")
            raise ValueError(
                f"{where}: {names[0]}.numel() must be P * {names[1]}.numel() = {world_size} * {small.numel()} = "
                f"{world_size * small.numel()}; got {names[0]} {_describe(big)} and {names[1]} {_describe(small)}"
            )
        if input.numel() and output.numel() and input.untyped_storage().data_ptr() == output.untyped_storage().data_ptr():
            (a0, a1), (b0, b1) = _byte_span(input), _byte_span(output)
            if a0 < b1 and b0 < a1:
                raise ValueError(
                    f"{where}: input ({_describe(input)}) and output ({_describe(output)}) overlap in memory; "
                    "pass an output that shares no storage with the input"
                )
    if collective == "broadcast":
        if isinstance(src, bool) or not isinstance(src, numbers.Integral):
            raise ValueError(f"{where}: src={src!r} is not a rank (an int)")
        if sessions.is_default(group):
            if not 0 <= int(src) < world_size:
                raise ValueError(f"{where}: src={src!r} is not a rank of this world of {world_size} (0..{world_size - 1})")
        else:  # a global rank, as torch's: numbered within the group from here on
            members = dist.get_process_group_ranks(group)
            if int(src) not in members:
                raise ValueError(f"{where}: src={src!r} (a global rank, as in torch) is not in group= {members}")
            src = members.index(int(src))
    if timeout is not None and not _is_timeout(timeout):
        raise ValueError(_timeout_problem(timeout))
    if check is not None and not isinstance(check, bool):
        raise ValueError(f"check must be True, False or None (RINGCOMM_CHECK), got {check!r}")
    specs = COLLECTIVE_ALGOS[collective]
    spec = specs.get(algo) if isinstance(algo, str) else None
    if spec is None:
        raise ValueError(f"unknown algo {algo!r} for {collective}; expected one of {', '.join(specs)}")
    kind = transport_kind(transport)
    kind.validate_device(output.device)
    _check_subgroup_transport(kind, output.device, group)
    complete = spec.options(options, world_size)
    return _Call(
        output, op, spec, kind, complete, float(timeout) if timeout is not None else default_timeout(),
        check_default() if check is None else check, collective, input,
        int(src) if collective == "broadcast" else 0,  # type: ignore[arg-type]
    )


def _check_subgroup_transport(kind: TransportKind, device: torch.device, group: Any) -> None:
    """ValueError if ``kind`` cannot carry ``device``'s tensors in the subgroup ``group`` (torch over NCCL)."""
    if kind.name == "torch" and not sessions.is_default(group):
        problem = subgroup_problem(device.type)
        if problem is not None:
            raise ValueError(problem)


def _outside(group: Any) -> bool:
    """Whether this rank is outside ``group`` (or it is no process group): ``group_place`` refuses it."""
    try:
        sessions.group_place(group)
    except ValueError:
        return True
    return False


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

    session.queue.submit(refusal, "a refused call", torch.futures.Future())


def _admit(
    prepare: Callable[[], _Call], timeout: object, check: object, blocking: bool, group: Any = None
) -> tuple[sessions.Session, _Call]:
    """Validate and find the session; any refusal is published to the peers, then raised.

    Whatever is raised here (``ValueError`` for bad arguments, but also a ``TypeError`` from an
    argument no check foresaw, or the ``CommError`` of a ``blocking`` call on the comm thread)
    refuses the call before a byte moves, and the peers must hear of it: otherwise they wait
    for this rank's fingerprint until their timeout, or pair their call with its next one.

    A rank outside ``group`` (or a ``group`` that is no process group) is refused here alone: it has no
    peers in that group to tell, and its own groups' calls are not this one.
    """
    if dist.is_initialized():
        sessions.group_place(group)
    try:
        call = prepare()
        session = sessions.current(group)
        if blocking:
            session.queue.refuse_blocking_here(call.what)
        if session.queue.in_job():
            _refuse_setup_in_job(session, call.kind.name, call.tensor.device.type, call.what)
    except BaseException as exc:
        if dist.is_initialized():
            try:
                _refuse(sessions.current(group), f"{type(exc).__name__}: {exc}", check, timeout)
            except Exception as unsaid:  # raise the refusal itself; say why the peers were not told
                _log.error(
                    "ringcomm: could not tell the peers that this rank refused a collective "
                    "(%s: %s): %s: %s; they wait for this rank until their timeout",
                    type(exc).__name__, exc, type(unsaid).__name__, unsaid,
                )
        raise
    return session, call


def _refuse_setup_in_job(session: sessions.Session, transport: str, device_type: str, what: str) -> None:
    """``CommError`` if ``transport`` for ``device_type`` is not set up: inside a job (``run_async``) it
    must not be. Setting up is collective (``dist.new_group``, a rendezvous) and belongs to the caller's
    thread and program order, never to the comm thread."""
    if (transport, device_type) not in session.transports:
        raise CommError(
            f"rank {session.rank}: {what} was refused: it runs inside a job (ringcomm.run_async) on the "
            f"{transport!r} transport for {device_type}, which is not set up yet; call "
            f"ringcomm.init({transport!r}, {device_type!r}) first, on every rank, from your own thread"
        )


def _execute(session: sessions.Session, call: _Call) -> torch.Tensor:
    """Run ``call`` now (in its turn): check, transport, algorithm; account for it."""
    n = session.begin_call()
    start = time.perf_counter()
    deadline = time.monotonic() + call.timeout
    tensor = call.tensor
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    flat = work.view(-1)
    source = call.input.contiguous().view(-1) if call.input is not None else flat  # what is read
    tracer = trace.get()  # read once: the copy below and the wrapping further down must agree
    if call.collective == "reduce_scatter" and tracer is not None:
        # traced: reduced into a copy, so that every message lands in one tensor the tracer can place
        # (untraced, the algorithms only read the input: collectives.py)
        source = call.input.clone(memory_format=torch.contiguous_format).view(-1)  # type: ignore[union-attr]
    comm: Transport | None = None
    sent0 = recv0 = 0
    nbytes = max(flat.numel(), source.numel()) * flat.element_size()  # M: the whole tensor
    try:
        if call.check and session.world_size > 1:
            check_same_call(session, n, call.fingerprint(flat.numel()), deadline)
        spec, options = call.spec, call.options
        if spec.name == "auto" and call.collective == "all_reduce":
            # the same pick on every rank: the same fit (rank 0's), the same call; hier is weighed where the
            # world has nodes of several ranks (hier.node_shape: one gather, once)
            device = tensor.device.type
            nodes = node_shape(session, deadline, device)
            spec = ALGOS[session.auto_pick(call.kind.name, nbytes, deadline, device, nodes)]
            options = spec.options({}, session.world_size)
        elif spec.name == "auto":
            picked = auto.choose_collective(
                session.tuning(deadline), call.collective, call.kind.name, session.world_size, nbytes,
                tensor.device.type,
            )
            spec = COLLECTIVE_ALGOS[call.collective][picked.algo]
            options = spec.options({}, session.world_size)
        comm = session.transport(call.kind, tensor.device.type, deadline)
        sent0, recv0 = comm.stats.sent_bytes, comm.stats.recv_bytes
        if call.collective != "all_reduce":
            name = spec.name if spec is call.spec else f"{call.spec.name}->{spec.name}"
            lane = "comm thread" if threading.current_thread().name == session.queue.name else "main"
            span = f"{call.collective} {name} {nbytes} B"
            if tracer is None:
                spec.run(flat, source, call.op, call.src, comm, deadline, **options)  # type: ignore[call-arg]
            else:
                # messages are placed in what they move: reduce_scatter's copy of the input, else the output
                moved = source if call.collective == "reduce_scatter" else flat
                parts = spec.cut(moved.numel(), comm.world_size, options)
                with tracer.span(span, call.collective, lane, algo=name, bytes=nbytes):
                    traced = trace.TracedTransport(comm, tracer, moved, spec.name, parts)
                    spec.run(flat, source, call.op, call.src, traced, deadline, **options)  # type: ignore[call-arg]
        elif tracer is None:
            spec.run(flat, call.op, _on_wire(comm, call.wire), deadline, session.scratch, **options)
            _round_wire_result(flat, call.wire)
        else:
            parts = spec.cut(flat.numel(), comm.world_size, options)
            name = spec.name if spec is call.spec else f"{call.spec.name}->{spec.name}"
            # the trace's lanes: the comm thread's collectives apart from the caller's own
            lane = "comm thread" if threading.current_thread().name == session.queue.name else "main"
            with tracer.span(f"all_reduce {name} {nbytes} B", "all_reduce", lane, algo=name, bytes=nbytes):
                traced = trace.TracedTransport(_on_wire(comm, call.wire), tracer, flat, spec.name, parts)
                spec.run(flat, call.op, traced, deadline, session.scratch, **options)
            _round_wire_result(flat, call.wire)
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


def _on_wire(comm: Transport, wire: str | None) -> Transport:
    """``comm``, or ``comm`` carrying ``wire``'s dtype (compress/wire.py); stats stay ``comm``'s."""
    dtype = wire_dtype_of(wire)
    return comm if dtype is None else WireTransport(comm, dtype)


def _round_wire_result(flat: torch.Tensor, wire: str | None) -> None:
    """Every rank's result rounded to the wire dtype once more, so all hold the same bits (compress/wire.py)."""
    dtype = wire_dtype_of(wire)
    if dtype is not None:
        round_result(flat, dtype)


def _fail(session: sessions.Session, n: int, error: CommError) -> None:
    """Mark the world failed (``session.py``) and tell peers waiting on this rank in call ``n`` at once."""
    session.failed = session.failed or error
    if session.liveness is not None:
        session.liveness.give_up(n)


def init(
    transport: str = "torch", device: str | torch.device = "cpu", timeout: float | None = None, group: Any = None
) -> Transport:
    """Set up the transport now (collective: call on every rank, of ``group`` if given), instead of at first use.

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
        if dist.is_initialized():
            sessions.group_place(group)  # outside group=: refused here alone (no peers in it to tell)
        _check_subgroup_transport(kind, dev, group)
    except ValueError as exc:
        if dist.is_initialized() and not _outside(group):
            session = sessions.current(group)
            reason = f"refused ({type(exc).__name__}: {exc})"
            session.queue.run(lambda: session.refuse_setup(reason), "a refused init")
        raise
    session = sessions.current(group)
    if session.queue.in_job():  # set up already: the transport; else refused, not set up on the comm thread
        _refuse_setup_in_job(session, kind.name, dev.type, f"init({transport!r})")
    deadline = time.monotonic() + (float(timeout) if timeout is not None else default_timeout())
    return session.queue.run(lambda: session.transport(kind, dev.type, deadline), f"setting up {transport}")


def run_async(
    fn: Callable[[], T], *, what: str = "a job", device: str | torch.device | None = None
) -> torch.futures.Future[T]:
    """Run ``fn()`` on the comm thread in its turn, as one job; return a future of its result.

    For work that needs several collectives in a row, each on the last one's result (PowerSGD's P,
    then Q): the collectives ``fn`` calls (blocking or ``*_async``) run inline, one after another,
    while the job holds the comm queue, so they keep their place against every collective issued
    before and after it (``comm_queue.py``, "Jobs"). Chaining futures' callbacks cannot promise
    that: a callback reaches the queue whenever the comm thread gets to it, which differs by rank.
    Issue jobs in the same order on every rank, as any collective.

    Args:
        fn: called once, on the comm thread, with no arguments; it must not wait for anything the
            caller does after ``run_async`` returns (the queue waits for it).
        what: names the job in errors and in ``ringcomm.shutdown``'s message.
        device: a CUDA device whose tensors ``fn`` reads: it starts once the work queued so far on
            the caller's current stream of it is done, and the future is bound to it. None: CPU.

    Returns:
        A future of ``fn``'s result; an exception ``fn`` raises (a ``CommError`` of a collective in it
        too) is set on the future. Its collectives count in ``comm_stats`` as any.

    Raises:
        RuntimeError: no process group. CommError: ringcomm is shut down, or called inside a job.

    A collective inside ``fn`` on a transport that is not set up yet is refused (``CommError``, naming
    the transport): set-up is collective, so call ``ringcomm.init`` first, from your own thread.

    Example::

        >>> ringcomm.init("torch")
        >>> def p_then_q() -> torch.Tensor:
        ...     ringcomm.all_reduce(p)                 # inline, in the job's turn
        ...     q = m.T @ orthonormal(p)               # needs the summed p
        ...     return ringcomm.all_reduce(q)
        >>> fut = ringcomm.run_async(p_then_q, what="powersgd bucket 0")
        >>> ...                                        # backward goes on
        >>> q = fut.wait()
    """
    if not callable(fn):
        raise ValueError(f"run_async expects a function of no arguments, got {type(fn).__name__}")
    if not isinstance(what, str):
        raise ValueError(f"what= names the job in errors: expected a string, got {type(what).__name__}")
    session = sessions.current()
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        return session.queue.submit_job(fn, what, torch.futures.Future())
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(dev))

    def after_ready() -> T:
        torch.cuda.current_stream(dev).wait_event(ready)
        return fn()

    return session.queue.submit_job(after_ready, what, torch.futures.Future(devices=[dev]))


@torch.no_grad()
def all_reduce(
    tensor: torch.Tensor,
    op: str | dist.ReduceOp.RedOpType = "sum",
    *,
    algo: str = "ring",
    transport: str = "torch",
    timeout: float | None = None,
    check: bool | None = None,
    group: Any = None,
    wire_dtype: str | None = None,
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
        group: a process group from ``dist.new_group`` (None: the default group): the collective runs
            among its members, numbered 0..P'-1 in it, on transports of its own; a rank outside it
            is refused (``ValueError``). Two subgroups' collectives run side by side.
        wire_dtype: ``"bf16"`` or ``"fp16"``: messages travel in that dtype, summed in the tensor's
            own at every hop (float32/float64 tensors only; ``compress/wire.py``: bytes halved, and
            the result within its rounding bound). None (default) or ``"none"``: the tensor's dtype.
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
    session, call = _admit(
        lambda: _prepare(tensor, op, algo, transport, timeout, check, options, group, wire_dtype), timeout, check,
        blocking=True, group=group,
    )
    return session.queue.run(lambda: _execute(session, call), call.what)


def all_reduce_async(
    tensor: torch.Tensor,
    op: str | dist.ReduceOp.RedOpType = "sum",
    *,
    algo: str = "ring",
    transport: str = "torch",
    timeout: float | None = None,
    check: bool | None = None,
    group: Any = None,
    wire_dtype: str | None = None,
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
    session, call = _admit(
        lambda: _prepare(tensor, op, algo, transport, timeout, check, options, group, wire_dtype), timeout, check,
        blocking=False, group=group,
    )
    return _submit(session, call)


def _submit(session: sessions.Session, call: _Call) -> torch.futures.Future:
    """Queue ``call`` on the comm thread (the first call on a new transport runs here); its future."""
    tensor = call.tensor
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


def _blocking(prepare: Callable[[], _Call], timeout: object, check: object, group: Any) -> torch.Tensor:
    session, call = _admit(prepare, timeout, check, blocking=True, group=group)
    return session.queue.run(lambda: _execute(session, call), call.what)


def _queued(prepare: Callable[[], _Call], timeout: object, check: object, group: Any) -> torch.futures.Future:
    session, call = _admit(prepare, timeout, check, blocking=False, group=group)
    return _submit(session, call)


@torch.no_grad()
def reduce_scatter(
    output: torch.Tensor,
    input: torch.Tensor,
    op: str | dist.ReduceOp.RedOpType = "sum",
    *,
    algo: str = "ring",
    transport: str = "torch",
    timeout: float | None = None,
    check: bool | None = None,
    group: Any = None,
    **options: Any,
) -> torch.Tensor:
    """Reduce every rank's ``input`` and give rank r block r of the result, in ``output``; return ``output``.

    As ``torch.distributed.reduce_scatter_tensor``: ``input`` is P blocks of ``output.numel()`` elements
    in its flat storage order (concatenated along dim 0), ``input.numel() == P * output.numel()``.
    ``input`` is left as it was.

    Args:
        output: any shape; n elements; written.
        input: any shape; P * n elements, the same dtype and device; read.
        op: ``"sum"``, ``"avg"`` (floating dtypes), ``"max"``, ``"min"`` or a ``torch.distributed.ReduceOp``
            (SUM, AVG, MAX, MIN).
        algo: ``"ring"`` (the ring's scatter-reduce phase: P-1 steps), ``"rhd"`` (recursive halving:
            log2(P) steps, P a power of two) or ``"auto"`` (``cost.COLLECTIVE_COSTS``).
        transport, timeout, check, group: as ``all_reduce``'s (the check also compares the collective).

    Raises:
        ValueError: bad arguments (sizes, dtypes, overlapping tensors, algo), on this rank before any
            communication; the others raise ``MismatchError`` (with the check on).
        MismatchError, CommTimeoutError, PeerError: as ``all_reduce``.

    Example::

        >>> shard = torch.empty(n)
        >>> ringcomm.reduce_scatter(shard, grad, op="avg")     # grad.numel() == P * n
    """
    return _blocking(
        lambda: _prepare_collective("reduce_scatter", output, input, op, 0, algo, transport, timeout, check, options, group),
        timeout, check, group,
    )


def reduce_scatter_async(
    output: torch.Tensor,
    input: torch.Tensor,
    op: str | dist.ReduceOp.RedOpType = "sum",
    *,
    algo: str = "ring",
    transport: str = "torch",
    timeout: float | None = None,
    check: bool | None = None,
    group: Any = None,
    **options: Any,
) -> torch.futures.Future[torch.Tensor]:
    """``reduce_scatter`` on the comm thread, in issue order with the other ``*_async`` calls; a future of
    ``output`` (neither tensor may change until it completes)."""
    return _queued(
        lambda: _prepare_collective("reduce_scatter", output, input, op, 0, algo, transport, timeout, check, options, group),
        timeout, check, group,
    )


@torch.no_grad()
def all_gather(
    output: torch.Tensor,
    input: torch.Tensor,
    *,
    algo: str = "ring",
    transport: str = "torch",
    timeout: float | None = None,
    check: bool | None = None,
    group: Any = None,
    **options: Any,
) -> torch.Tensor:
    """Gather every rank's ``input`` into ``output``, in rank order, on every rank; return ``output``.

    As ``torch.distributed.all_gather_into_tensor``: block r of ``output`` (flat storage order,
    concatenated along dim 0) is rank r's ``input``; ``output.numel() == P * input.numel()``.

    Args:
        output: any shape; P * n elements; written, bitwise identical on every rank.
        input: any shape; n elements, the same dtype and device; read.
        algo: ``"ring"`` (the ring's all-gather phase: P-1 steps), ``"rd"`` (recursive doubling:
            log2(P) steps, P a power of two) or ``"auto"``.
        transport, timeout, check: as ``all_reduce``'s.

    Raises:
        as ``reduce_scatter``.

    Example::

        >>> full = torch.empty(P * n)
        >>> ringcomm.all_gather(full, shard)
    """
    return _blocking(
        lambda: _prepare_collective("all_gather", output, input, "", 0, algo, transport, timeout, check, options, group),
        timeout, check, group,
    )


def all_gather_async(
    output: torch.Tensor,
    input: torch.Tensor,
    *,
    algo: str = "ring",
    transport: str = "torch",
    timeout: float | None = None,
    check: bool | None = None,
    group: Any = None,
    **options: Any,
) -> torch.futures.Future[torch.Tensor]:
    """``all_gather`` on the comm thread, in issue order with the other ``*_async`` calls; a future of ``output``."""
    return _queued(
        lambda: _prepare_collective("all_gather", output, input, "", 0, algo, transport, timeout, check, options, group),
        timeout, check, group,
    )


@torch.no_grad()
def broadcast(
    tensor: torch.Tensor,
    src: int = 0,
    *,
    algo: str = "ring",
    transport: str = "torch",
    timeout: float | None = None,
    check: bool | None = None,
    group: Any = None,
    **options: Any,
) -> torch.Tensor:
    """Copy rank ``src``'s ``tensor`` into ``tensor`` on every rank, in place; return ``tensor``.

    Args:
        tensor: any shape and a supported dtype; the same numel and dtype on every rank.
        src: the root's rank, 0 <= src < P; with ``group=``, its global rank (as torch's), in the group.
        algo: ``"ring"`` (a pipelined chain src -> src+1 -> ...; option ``segment_bytes``, default 1 MiB:
            for large tensors), ``"tree"`` (binomial, ceil(log2 P) rounds: for small ones) or ``"auto"``.
        transport, timeout, check: as ``all_reduce``'s (the check also compares ``src``).

    Raises:
        as ``reduce_scatter``.

    Example::

        >>> for p in model.parameters():
        ...     ringcomm.broadcast(p.data, src=0)
    """
    return _blocking(
        lambda: _prepare_collective("broadcast", tensor, None, "", src, algo, transport, timeout, check, options, group),
        timeout, check, group,
    )


def broadcast_async(
    tensor: torch.Tensor,
    src: int = 0,
    *,
    algo: str = "ring",
    transport: str = "torch",
    timeout: float | None = None,
    check: bool | None = None,
    group: Any = None,
    **options: Any,
) -> torch.futures.Future[torch.Tensor]:
    """``broadcast`` on the comm thread, in issue order with the other ``*_async`` calls; a future of ``tensor``."""
    return _queued(
        lambda: _prepare_collective("broadcast", tensor, None, "", src, algo, transport, timeout, check, options, group),
        timeout, check, group,
    )


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
