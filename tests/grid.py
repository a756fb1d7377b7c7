"""The correctness grid shared by the algorithm tests (ring, naive, ps) and transports.

Every rank regenerates every rank's input from a seed, so it can compute the
float64 reference locally and check its own result; the ranks then compare
SHA-256 digests of their result bytes to prove bitwise agreement. A rank
returns a list of failure strings; the test asserts the list is empty.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
import torch.distributed as dist

import ringcomm

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)
DTYPES = FLOAT_DTYPES + INT_DTYPES
OPS = ("sum", "avg", "max", "min")
BIG = 2**20 + 3


def sizes_for(p: int) -> list[int]:
    """The edge sizes of the grid: 0, 1, P-1, P, P+1, 1000 and a large odd one."""
    return sorted({0, 1, max(p - 1, 0), p, p + 1, 1000, BIG})


def make_input(numel: int, dtype: torch.dtype, rank: int, case: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(case * 1009 + rank)
    if dtype.is_floating_point:
        return (torch.randn(numel, generator=g, dtype=torch.float64) * 4).to(dtype)
    return torch.randint(-1000, 1000, (numel,), generator=g, dtype=torch.int64).to(dtype)


def reference(
    numel: int, dtype: torch.dtype, op: str, p: int, case: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact (float64) result and an elementwise error bound for ``dtype`` arithmetic.

    Summing P values in any order in a dtype with unit roundoff u errs by at most
    (P-1)·u·Σ|x_i| (plus one rounding of the result, and one of the division for avg).
    """
    xs = torch.stack([make_input(numel, dtype, r, case).double() for r in range(p)])
    if op in ("sum", "avg"):
        exact = xs.sum(0)
        u = torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0
        bound = (p + 1) * u * xs.abs().sum(0)
        if op == "avg":
            exact, bound = exact / p, bound / p + u * (exact / p).abs()
    else:
        exact = xs.max(0).values if op == "max" else xs.min(0).values
        bound = torch.zeros_like(exact)
    return exact, bound


def cases(p: int, sizes: Iterable[int] | None = None, big_dtypes=DTYPES, big_ops=OPS):
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
