"""Gradient compression (issue 24), as a specification.

1. Wire dtype (``all_reduce(wire_dtype=...)``, ``compress/wire.py``): every all-reduce algorithm, at
   P = 2, 3, over torch and shm, bf16 and fp16, on float32 tensors: the result is within the
   rounding bound of its hops of the float64 reference, bitwise the same on every rank, and the
   bytes sent are exactly half of the same call without it. Refusals in one line without processes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from grid import digest, make_input

import ringcomm
from ringcomm import cost
from ringcomm.compress.wire import WIRE_DTYPES
from ringcomm.tools.spawn import run_world

TIMEOUT_S = 300.0  # a whole spawned world on a loaded 2-core machine
WIRE_ALGOS = ("ring", "ring_simple", "rhd", "rd", "ps", "naive", "auto")
SIZES = (1, 5, 1000, 4099)


def wire_bound(xs: torch.Tensor, wire: torch.dtype, p: int) -> torch.Tensor:
    """Elementwise bound on |result − exact| for a float32 sum of ``xs`` (P × N) with ``wire`` on the wire.

    Every value a rank sends is rounded to the wire dtype once (u = its unit roundoff, 2^-8 bf16,
    2^-11 fp16), and a value already rounded is not rounded again. On the way to the result a value
    passes at most L = P roundings, the call's final rounding of the result included (ring: P−1
    reduce-scatter hops, then the all-gather's or the final one; rhd at P = 3: fold, halving, doubling;
    rd at P = 3: fold, exchange, final; at P = 2, ps, naive: 2). Each errs by at most u times a partial sum,
    whose magnitude is at most S = Σ|x_i| grown by the errors before it: (1+u)^L. The P−1 float32
    additions add (P−1)·eps32/2 of S each at most.
    """
    u = torch.finfo(wire).eps / 2
    u32 = torch.finfo(torch.float32).eps / 2
    s = xs.abs().sum(0)
    lhops = p
    return (lhops * u + (p - 1) * u32) * (1 + u) ** lhops * (1 + u32) ** p * s


def wire_world(rank: int, p: int, transport: str) -> list[str]:
    failures: list[str] = []
    comm = ringcomm.init(transport=transport)
    case = 0
    for wire_name, wire in WIRE_DTYPES.items():
        for algo in WIRE_ALGOS:
            for n in SIZES:
                case += 1
                where = f"rank {rank} {algo}/{transport} P={p} n={n} wire={wire_name}"
                xs = torch.stack([make_input(n, torch.float32, r, case) for r in range(p)]).double()
                plain = make_input(n, torch.float32, rank, case)
                t = plain.clone()
                sent0 = comm.stats.sent_bytes
                ringcomm.all_reduce(plain, algo=algo, transport=transport, timeout=120)
                sent_plain = comm.stats.sent_bytes - sent0
                sent0 = comm.stats.sent_bytes
                ringcomm.all_reduce(t, algo=algo, transport=transport, timeout=120, wire_dtype=wire_name)
                sent_wire = comm.stats.sent_bytes - sent0
                exact = xs.sum(0)
                err = (t.double() - exact).abs()
                bound = wire_bound(xs, wire, p)
                if not bool((err <= bound).all()):
                    i = int((err - bound).argmax())
                    failures.append(f"{where}: element {i} off by {err[i]:.3g} > bound {bound[i]:.3g}")
                if 2 * sent_wire != sent_plain:
                    failures.append(f"{where}: sent {sent_wire} B with the wire dtype, {sent_plain} B without")
                mine = digest(t)
                everyone = [torch.empty_like(mine) for _ in range(p)]
                dist.all_gather(everyone, mine)
                if not all(torch.equal(d, mine) for d in everyone):
                    failures.append(f"{where}: ranks differ")
    return failures


@pytest.mark.parametrize("transport", ["torch", "shm"])
@pytest.mark.parametrize("p", [2, 3])
def test_wire_dtype_every_algorithm(p: int, transport: str) -> None:
    results = run_world(wire_world, p, (transport,), timeout=TIMEOUT_S)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize(
    ("dtype", "wire", "needle"),
    [
        (torch.int64, "bf16", "needs a float32 or float64 tensor"),
        (torch.bfloat16, "fp16", "needs a float32 or float64 tensor"),
        (torch.float32, "int8", "wire_dtype='int8'"),
    ],
)
def test_wire_dtype_refused(dtype: torch.dtype, wire: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        ringcomm.all_reduce(torch.ones(4, dtype=dtype), wire_dtype=wire)
    assert "\n" not in str(info.value)


def test_wire_bytes_formula() -> None:
    assert cost.wire_bytes(4000, 4, 2) == 2000
    assert cost.wire_bytes(8000, 8, 2) == 2000
