"""The correctness grid shared by the algorithm tests (ring, naive, ps) and transports.

Rank r's input is a quadratic in r over three small integer patterns of the element index,
``x_r[i] = (a[i] + b[i]·r + c[i]·r²) · s`` (s = 1/4 for floating dtypes, so fractional bits are
carried too; 1 for integers). Every value is exact in every dtype tested, the float64 reference is
exact, and it is computed from the patterns without regenerating every rank's input. The
tolerance is the same worst-case rounding bound as for arbitrary inputs (rounding still happens:
bfloat16 sums, avg's division). The patterns come from a multiplicative hash of the index, so no
two chunks of a vector look alike (a chunk sent to the wrong place shows). The ranks then compare
SHA-256 digests of their result bytes to prove bitwise agreement. A rank returns a list of failure
strings; the test asserts the list is empty.

The large odd size (``BIG``) is outside the grid: a test of its own per module (the full tier),
``check_grid(..., sizes=[BIG])``, for float32 sum only (dtype and op handling do not depend on
the size; the size's chunk arithmetic does not depend on the dtype).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pytest
import torch
import torch.distributed as dist

import ringcomm

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)
DTYPES = FLOAT_DTYPES + INT_DTYPES
OPS = ("sum", "avg", "max", "min")
BIG = 2**20 + 3


def world_sizes(every: Iterable[int], quick: Iterable[int]) -> list:
    """``every`` world size for ``pytest.mark.parametrize("p", ...)``; those in ``quick`` are in the
    quick tier too (``-m fast``: the pooled worlds of a few P, chosen to cover a power of two and
    not, while the full suite runs them all)."""
    quick = set(quick)
    return [pytest.param(p, marks=pytest.mark.fast) if p in quick else p for p in every]


def sizes_for(p: int) -> list[int]:
    """The edge sizes of the grid: 0, 1, P-1, P, P+1 and 1000 (the large odd ``BIG`` runs on its own:
    ``check_grid(..., sizes=[BIG])``, float32 sum only)."""
    return sorted({0, 1, max(p - 1, 0), p, p + 1, 1000})


def _patterns(numel: int, case: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a in [-8, 8], b in [-2, 2], c in [-1, 1] per element (int64), pseudo-random in the index."""
    h = (torch.arange(numel, dtype=torch.int64) + case * 7919) * 2654435761 % (1 << 32)
    return (h >> 8) % 17 - 8, (h >> 16) % 5 - 2, (h >> 24) % 3 - 1


def _scale(dtype: torch.dtype) -> float:
    return 0.25 if dtype.is_floating_point else 1.0


def make_input(numel: int, dtype: torch.dtype, rank: int, case: int) -> torch.Tensor:
    a, b, c = _patterns(numel, case)
    return ((a + b * rank + c * rank * rank).double() * _scale(dtype)).to(dtype)


def reference(
    numel: int, dtype: torch.dtype, op: str, p: int, case: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact (float64) result and an elementwise error bound for ``dtype`` arithmetic.

    Summing P values in any order in a dtype with unit roundoff u errs by at most
    (P-1)·u·Σ|x_i| (plus one rounding of the result, and one of the division for avg).
    The sum is the closed form P·a + b·Σr + c·Σr²; max, min and Σ|x_i| take one pass per rank
    over the patterns (integer arithmetic, no generator).
    """
    a, b, c = _patterns(numel, case)
    s = _scale(dtype)
    if op in ("sum", "avg"):
        r1, r2 = p * (p - 1) // 2, (p - 1) * p * (2 * p - 1) // 6
        exact = (a * p + b * r1 + c * r2).double() * s
        magnitude = sum((a + b * r + c * r * r).abs() for r in range(p)).double() * s
        u = torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0
        bound = (p + 1) * u * magnitude
        if op == "avg":
            exact, bound = exact / p, bound / p + u * (exact / p).abs()
    else:
        pick = torch.maximum if op == "max" else torch.minimum
        exact = a.clone()  # rank 0's value
        for r in range(1, p):
            exact = pick(exact, a + b * r + c * r * r)
        exact = exact.double() * s
        bound = torch.zeros_like(exact)
    return exact, bound


def cases(
    p: int, sizes: Iterable[int] | None = None, big_dtypes: Iterable = (torch.float32,), big_ops: Iterable = ("sum",)
):
    """(case id, numel, dtype, op) for the whole grid at world size ``p``."""
    case = 0
    for numel in sizes if sizes is not None else sizes_for(p):
        for dtype in DTYPES:
            for op in OPS:
                if op == "avg" and not dtype.is_floating_point:
                    continue
                if numel == BIG and (dtype not in big_dtypes or op not in big_ops):
                    continue
                case += 1
                yield case, numel, dtype, op


def digest(t: torch.Tensor) -> torch.Tensor:
    data = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return torch.tensor(list(hashlib.sha256(data).digest()), dtype=torch.uint8)


def check_grid(
    rank: int, p: int, algo: str, transport: str = "torch", options: dict | None = None, **grid
) -> list[str]:
    """Run the grid for one algorithm on this rank; return descriptions of every failure."""
    failures = []
    for case, numel, dtype, op in cases(p, **grid):
        where = f"{algo}/{transport} P={p} numel={numel} {str(dtype)[6:]} {op}"
        x = make_input(numel, dtype, rank, case)
        out = ringcomm.all_reduce(x, op, algo=algo, transport=transport, timeout=120, **(options or {}))
        if out is not x:
            failures.append(f"{where}: did not return the same tensor object")
        exact, bound = reference(numel, dtype, op, p, case)
        err = (x.double() - exact).abs()
        bad = err > bound
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            failures.append(
                f"rank {rank} {where}: {int(bad.sum())} elements out of bound, "
                f"first at {i}: got {x[i].item()} expected {exact[i].item()} (bound {bound[i].item():.3g})"
            )
        mine = digest(x)
        everyone = [torch.empty_like(mine) for _ in range(p)]
        dist.all_gather(everyone, mine)
        if any(not torch.equal(d, mine) for d in everyone):
            failures.append(f"rank {rank} {where}: ranks disagree bitwise")
    return failures
