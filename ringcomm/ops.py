"""Reduction operators and the dtypes they accept.

An op is applied element-wise, in place, ``dst <- dst (op) src``. ``avg`` reduces
as ``sum`` and is then divided by the world size once, by the rank that owns
the fully reduced data, so every rank still ends with identical bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .names import OP_NAMES

__all__ = ["OPS", "SUPPORTED_DTYPES", "check_op_dtype", "reduce_into", "finalize"]

OPS = OP_NAMES  # the one list, known without torch (names.py)

SUPPORTED_DTYPES = (
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int32,
    torch.int64,
)


def _sum(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.add_(src)


def _max(dst: torch.Tensor, src: torch.Tensor) -> None:
    torch.maximum(dst, src, out=dst)


def _min(dst: torch.Tensor, src: torch.Tensor) -> None:
    torch.minimum(dst, src, out=dst)


_REDUCE: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "sum": _sum,
    "avg": _sum,
    "max": _max,
    "min": _min,
}


def check_op_dtype(op: str, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` unless ``op`` is known and applies to ``dtype``."""
    if op not in _REDUCE:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise ValueError(f"unsupported tensor dtype {dtype}; ringcomm reduces {names}")
    if op == "avg" and not dtype.is_floating_point:
        raise ValueError(
            f"op='avg' on an integer tensor ({dtype}) would truncate; "
            "use op='sum' and divide, or cast to a floating dtype first"
        )


def reduce_into(dst: torch.Tensor, src: torch.Tensor, op: str) -> None:
    """``dst <- dst (op) src``, element-wise and in place."""
    _REDUCE[op](dst, src)


def finalize(reduced: torch.Tensor, op: str, world_size: int) -> None:
    """Apply the post-reduction step of ``op`` (the division of ``avg``) in place."""
    if op == "avg" and world_size > 1:
        reduced.div_(world_size)
