"""The DDP communication hook: average each gradient bucket with ringcomm instead of DDP's all-reduce.

DDP groups gradients into buckets (25 MB by default, in reverse order of the
parameters) and, as soon as every gradient of a bucket is ready during
``backward()``, calls the registered hook with it. The hook must return a
``torch.futures.Future`` that will hold the averaged bucket; DDP waits for all
of them at the end of backward and copies the results into ``param.grad``.

So the hook is one call: ``ringcomm.all_reduce_async`` queues the bucket on
ringcomm's comm thread and returns its future at once, and backward goes on::

    autograd thread:  grad grad grad | hook(b0) grad grad | hook(b1) grad | wait all
    comm thread:                     [ all_reduce(b0) ....][ all_reduce(b1) ... ]

DDP calls the hook for the buckets in the same order on every rank, and the
comm thread runs them first in, first out (``ringcomm/runtime/comm_queue.py``), so
every rank enters the collectives in the same order.

Gradients reach the hook summed over nothing: each rank's own, not divided by
the world size (DDP's built-in hook divides first, then sums); ``op="avg"``
sums, then divides once. If a collective fails (a peer died, a timeout), its
future carries the exception, so ``loss.backward()`` raises it in the training
loop instead of hanging; the transport is then marked failed and later buckets
fail at once, naming the first failure. Time and bytes per step come from
``ringcomm.comm_stats()``.
"""

# No "from __future__ import annotations": DDP checks the hook's annotations at runtime
# (bucket must be dist.GradBucket, the return torch.futures.Future[torch.Tensor]), not as strings.

from typing import Any

import torch
import torch.distributed as dist

import ringcomm
from ringcomm.api import validate

__all__ = ["RingcommState", "broadcast_module", "broadcast_tensors", "ringcomm_hook", "zero_hook"]


class RingcommState:
    """What ``ringcomm_hook`` passes to ``all_reduce_async``, validated once, up front.

    Creating it sets the transport up (``ringcomm.init``), which is collective:
    build the state on every rank, in the main thread, before training.

    Args:
        algo: a key of ``ringcomm.ALGOS`` (``"ring"``, ``"rhd"``, ``"rd"``, ``"ps"``, ``"auto"`` ...).
        transport: a registered transport (``"torch"``, ``"zmq"``, ``"shm"``).
        device: where the gradients live (``"cpu"`` or a CUDA device).
        timeout: seconds one bucket's all-reduce may take; None: ringcomm's default.
        options: the algorithm's options (e.g. ``{"ps_shards": 2}`` for ``"ps"``).

    Raises:
        ValueError: an unknown algo or transport, a device the transport cannot carry,
            or an option the algorithm does not take.

    Example::

        >>> ddp = DistributedDataParallel(model)
        >>> ddp.register_comm_hook(RingcommState("ring", "torch"), ringcomm_hook)
        >>> loss_fn(ddp(x), y).backward()       # buckets go over the ring
    """

    __slots__ = ("algo", "transport", "timeout", "options")

    def __init__(
        self,
        algo: str = "ring",
        transport: str = "torch",
        *,
        device: str | torch.device = "cpu",
        timeout: float | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        world_size = dist.get_world_size() if dist.is_initialized() else None
        validate(algo, transport, device, options or {}, world_size)
        self.algo = algo
        self.transport = transport
        self.timeout = timeout
        self.options = dict(options or {})
        ringcomm.init(transport, device)  # collective: every rank, same order, this thread


def ringcomm_hook(state: RingcommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` across ranks with ringcomm, on its comm thread; returns at once.

    Example::

        >>> ddp_model.register_comm_hook(RingcommState("ring"), ringcomm_hook)
    """
    return ringcomm.all_reduce_async(
        bucket.buffer(), "avg", algo=state.algo, transport=state.transport, timeout=state.timeout, **state.options
    )


def zero_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The ZeRO comm hook: ``state`` (a ``trainer.zero.ZeroOptimizer``) queues the reduce-scatter of each
    of its buckets that ``bucket`` completes, on ringcomm's comm thread; returns at once.

    DDP requires a future of the bucket; this one holds the bucket as it was (each rank's own
    gradient: the reduced blocks go to the optimizer's shards, not back into ``p.grad``) and
    completes when those reduce-scatters have, so ``backward()`` raises a failed one's error.

    Example::

        >>> ddp_model.register_comm_hook(zero_optimizer, zero_hook)
    """
    return state.reduce_scatter_bucket(bucket)


def broadcast_module(
    module: torch.nn.Module, src: int = 0, *, transport: str = "torch", timeout: float | None = None
) -> None:
    """Give every rank rank ``src``'s parameters and buffers, through ``ringcomm.broadcast``.

    What DDP's constructor does through the process group (``init_sync``), done by ringcomm, so
    that a ring run moves no tensor through Gloo's collectives: the tensors of one dtype and
    device travel as one flat buffer (one collective each, not one per parameter), then are
    copied back in place. Collective: every rank, in the same order, with the same module.
    """
    broadcast_tensors([*module.parameters(), *module.buffers()], src, transport=transport, timeout=timeout)


def broadcast_tensors(
    tensors: list[torch.Tensor], src: int = 0, *, transport: str = "torch", timeout: float | None = None
) -> None:
    """``broadcast_module``'s work for any list of tensors: one flat ``ringcomm.broadcast`` per dtype and device."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for tensors in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            ringcomm.broadcast(flat, src, algo="auto", transport=transport, timeout=timeout)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
