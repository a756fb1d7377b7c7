"""DDP comm hooks that compress (issue 24): ``--compress bf16|fp16|powersgd:R|topk:F``.

The linear ones ride ringcomm.all_reduce with the run's algorithm and transport: bf16/fp16 as
``wire_dtype`` (queued like ``ringcomm_hook``, on the comm thread), PowerSGD's P and Q as two
all-reduces per bucket. Top-k gathers (``ringcomm.all_gather``). A PowerSGD or top-k bucket is one
job on the comm thread (``ringcomm.run_async``): its collectives, each needing the last one's
result, run there one after another in the job's FIFO turn, while backward computes the earlier
layers' gradients::

    autograd thread:  hook(bucket 0) -> job 0    hook(bucket 1) -> job 1    ... DDP waits
    comm thread:                        [job 0: plain, P, Q]  [job 1: plain, P, Q]

The compressor's state (Q, error feedback, the step count) is touched only by the jobs, in order,
during a step; DDP waits for every bucket's future before the optimizer step, so a checkpoint
taken after it sees the step's state whole.

Their state (Q and error feedback, per rank) is saved beside the checkpoint by ``trainer/loop.py``.
"""

# No "from __future__ import annotations": DDP checks the hook's annotations at runtime.

from typing import Any

import torch
import torch.distributed as dist

import ringcomm
from ringcomm.api import validate
from ringcomm.compress import parse_compress
from ringcomm.compress.powersgd import PowerSGD
from ringcomm.compress.topk import TopK

__all__ = ["CompressState", "check_compress", "compress_hook"]


def check_compress(compress: str, algo: str) -> tuple[str, Any]:
    """``--compress`` parsed, refused (ValueError, one line) where it cannot apply with ``algo``."""
    kind, arg = parse_compress(compress)
    if kind != "none" and algo == "ddp":
        raise ValueError(f"--compress {compress} compresses ringcomm's collectives; --algo ddp uses DDP's own")
    if kind == "topk" and algo == "ps":
        raise ValueError(f"--compress {compress} gathers every rank's entries (all_gather); --algo ps cannot gather")
    return kind, arg


class CompressState:
    """The hook's state: the run's algorithm and transport, the compressor, each parameter's index.

    Collective (sets the transport up): every rank, in the main thread, before training.
    """

    def __init__(
        self,
        compress: str,
        model: torch.nn.Module,
        algo: str = "ring",
        transport: str = "torch",
        *,
        device: str | torch.device = "cpu",
        timeout: float | None = None,
        options: dict[str, Any] | None = None,
        warmup_steps: int = 10,
    ) -> None:
        self.kind, arg = check_compress(compress, algo)
        world_size = dist.get_world_size() if dist.is_initialized() else None
        validate(algo, transport, device, options or {}, world_size)
        self.algo, self.transport, self.timeout = algo, transport, timeout
        self.options = dict(options or {})
        self.world = world_size or 1
        self.index = {id(p): i for i, p in enumerate(model.parameters())}
        self.compressor: PowerSGD | TopK | None = None
        if self.kind == "powersgd":
            self.compressor = PowerSGD(int(arg), warmup_steps=warmup_steps)  # type: ignore[arg-type]
        elif self.kind == "topk":
            sizes = {i: p.numel() for i, p in enumerate(model.parameters()) if TopK.sparsifies(p.shape)}
            self.compressor = TopK(float(arg), warmup_steps=warmup_steps, sizes=sizes)  # type: ignore[arg-type]
        ringcomm.init(transport, device)

    def all_reduce(self, t: torch.Tensor, op: str) -> None:
        ringcomm.all_reduce(t, op, algo=self.algo, transport=self.transport, timeout=self.timeout, **self.options)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        algo = "ring" if self.algo in ("ring", "ring_simple") else "auto"  # rd: power-of-two worlds only
        ringcomm.all_gather(out, inp, algo=algo, transport=self.transport, timeout=self.timeout)


def compress_hook(state: CompressState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average ``bucket`` across ranks, compressed as ``state`` says.

    Example::

        >>> ddp.register_comm_hook(CompressState("powersgd:2", model), compress_hook)
    """
    buf = bucket.buffer()
    if state.kind in ("bf16", "fp16", "none"):
        return ringcomm.all_reduce_async(
            buf, "avg", algo=state.algo, transport=state.transport, timeout=state.timeout,
            wire_dtype=state.kind, **state.options,
        )
    # Read the bucket here, in the hook: DDP's GradBucket is not to be used after the hook returns.
    params = [(state.index[id(p)], p.shape) for p in bucket.parameters()]
    index, last = bucket.index(), bucket.is_last()
    compressor = state.compressor

    def job() -> torch.Tensor:  # on the comm thread, in this bucket's turn; its collectives run inline
        with torch.no_grad():
            if isinstance(compressor, PowerSGD):
                compressor.reduce(buf, params, state.all_reduce, state.world)
            else:
                assert isinstance(compressor, TopK)
                compressor.reduce(buf, params, state.all_gather, state.world, state.all_reduce)
            if last:  # in the last bucket's job: after every reduce of the step, before the next step's
                compressor.end_step()
        return buf

    return ringcomm.run_async(job, what=f"{state.kind} bucket {index}", device=buf.device)
