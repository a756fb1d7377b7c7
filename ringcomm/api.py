"""``ringcomm.all_reduce``: validate, pick an algorithm and a transport, run it in place.

Everything that can be wrong with the arguments is found here, before a single
byte moves, and raised as ``ValueError`` with the tensor untouched.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from . import trace
from .buffers import ScratchPool
from .fingerprint import check_enabled, check_same_call
from .naive import naive_all_reduce
from .ops import check_op_dtype
from .param_server import check_ps_options, ps_all_reduce
from .ring import ring_all_reduce
from .ring_pipelined import pipelined_ring_all_reduce
from .transport import Transport, default_timeout, get_transport, transport_names

__all__ = ["all_reduce", "init", "ALGOS"]

Algorithm = Callable[..., None]

#: name -> function(flat, op, transport, deadline, scratch, **options)
ALGOS: dict[str, Algorithm] = {
    "ring": pipelined_ring_all_reduce,  # the fast ring: pipelined segments (ring_pipelined.py)
    "ring_simple": ring_all_reduce,  # the readable ring of ring.py, step for step
    "naive": naive_all_reduce,
    "ps": ps_all_reduce,  # parameter server, optionally sharded (param_server.py)
}

#: name -> function(world_size, **options) raising ValueError, run before any communication
OPTION_CHECKS: dict[str, Callable[..., None]] = {
    "ps": lambda world_size, ps_rank=0, ps_shards=1: check_ps_options(ps_rank, ps_shards, world_size),
}

_SCRATCH = ScratchPool()


def _check_device(tensor: torch.Tensor, transport: str) -> str:
    """The device type to communicate on; ValueError if the backend cannot serve it."""
    device_type = tensor.device.type
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"tensor is on device {tensor.device}; ringcomm handles cpu and cuda tensors")
    if transport == "zmq" and device_type != "cpu":
        raise ValueError(
            f"transport='zmq' sends host memory; tensor is on {tensor.device}. "
            "Move it to the CPU or use transport='torch' (NCCL)"
        )
    if transport == "torch":
        backend = str(dist.get_backend())
        needed = {"cpu": "gloo", "cuda": "nccl"}[device_type]
        if needed not in backend:
            raise ValueError(
                f"tensor on {tensor.device} needs the {needed} backend, but the process group was "
                f"initialised with backend {backend!r}; move the tensor to "
                f"{'the GPU' if device_type == 'cpu' else 'the CPU'} or init with backend "
                f"'{needed}' (or 'cpu:gloo,cuda:nccl')"
            )
    return device_type


@functools.cache
def _option_names(algo: str) -> tuple[str, ...]:
    """The keyword-only options the algorithm's function takes (read once per algorithm)."""
    params = inspect.signature(ALGOS[algo]).parameters
    return tuple(name for name, prm in params.items() if prm.kind is inspect.Parameter.KEYWORD_ONLY)


def _check_options(algo: str, options: dict) -> None:
    """ValueError for an option the algorithm does not take (a typo must not pass silently)."""
    known = _option_names(algo)
    for name in options:
        if name not in known:
            raise ValueError(
                f"algo={algo!r} takes no option {name!r}; its options are: {', '.join(known) or 'none'}"
            )


def _validate(
    tensor: torch.Tensor, op: str, algo: str, transport: str, timeout: float | None, options: dict
) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"all_reduce expects a torch.Tensor, got {type(tensor).__name__}")
    if algo not in ALGOS:
        raise ValueError(f"unknown algo {algo!r}; expected one of {', '.join(ALGOS)}")
    if transport not in transport_names() and transport != "zmq":
        raise ValueError(f"unknown transport {transport!r}; expected 'torch' or 'zmq'")
    check_op_dtype(op, tensor.dtype)
    _check_options(algo, options)
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not dist.is_initialized():
        raise RuntimeError(
            "ringcomm.all_reduce needs torch.distributed.init_process_group to have been called"
        )


def init(transport: str = "torch", device: str | torch.device = "cpu") -> Transport:
    """Make the transport now (collective: call on every rank), instead of at first use.

    Useful before handing all_reduce to another thread, e.g. a DDP comm hook.
    """
    device_type = torch.device(device).type
    return get_transport(transport, device_type)


@torch.no_grad()
def all_reduce(
    tensor: torch.Tensor,
    op: str = "sum",
    *,
    algo: str = "ring",
    transport: str = "torch",
    timeout: float | None = None,
    check: bool | None = None,
    **options: object,
) -> torch.Tensor:
    """Reduce ``tensor`` across all ranks, in place, and return it.

    Args:
        tensor: any shape; float16, bfloat16, float32, float64, int32 or int64.
            A non-contiguous tensor is reduced through a contiguous copy.
        op: ``"sum"``, ``"avg"`` (floating dtypes only), ``"max"`` or ``"min"``.
        algo: ``"ring"`` (pipelined ring), ``"ring_simple"`` (the readable ring),
            ``"ps"`` (parameter server) or ``"naive"`` (gather to rank 0).
        transport: ``"torch"`` (Gloo for CPU, NCCL for CUDA) or ``"zmq"``.
        timeout: seconds the whole collective may take before ``CommTimeoutError``;
            None means RINGCOMM_TIMEOUT or 300 s.
        check: first verify that every rank passed the same numel, dtype, op, algo
            and options (``MismatchError`` on every rank otherwise); costs one round
            of 40-byte messages. None means RINGCOMM_CHECK (default on).
        **options: algorithm options, e.g. ``ps_rank``, ``ps_shards`` for ``algo="ps"``.

    Returns:
        ``tensor`` itself, holding the result, bitwise identical on every rank.

    Raises:
        ValueError: bad arguments, found before any communication; tensor untouched.
        MismatchError: ranks passed different calls (with the check on); tensor untouched.
        CommTimeoutError, PeerError: a peer did not answer in time or failed.

    Example::

        >>> dist.init_process_group("gloo")
        >>> grad = torch.ones(1000) * dist.get_rank()
        >>> ringcomm.all_reduce(grad, op="avg")
    """
    _validate(tensor, op, algo, transport, timeout, options)
    device_type = _check_device(tensor, transport)
    fn = ALGOS[algo]
    comm = get_transport(transport, device_type)
    if algo in OPTION_CHECKS:
        OPTION_CHECKS[algo](comm.world_size, **options)
    # World size 1 runs through the algorithm too: no messages, but its option checks apply.
    deadline = time.monotonic() + (timeout if timeout is not None else default_timeout())
    work = tensor if tensor.is_contiguous() else tensor.contiguous()
    flat = work.view(-1)
    tracer = trace.get()
    if check_enabled(check):
        check_same_call(flat, op, algo, options, comm, deadline, _SCRATCH)
    if tracer is None:
        fn(flat, op, comm, deadline, _SCRATCH, **options)
    else:
        nbytes = flat.numel() * flat.element_size()
        with tracer.span(
            f"all_reduce {algo} {nbytes} B", "all_reduce", "collective", algo=algo, bytes=nbytes
        ):
            fn(flat, op, trace.TracedTransport(comm, tracer, flat, algo), deadline, _SCRATCH, **options)
    if work is not tensor:
        tensor.copy_(work)
    return tensor
