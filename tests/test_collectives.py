"""reduce_scatter, all_gather and broadcast (issue 22), as a specification.

1. The grid: collective x algorithm (auto too) x transport (torch at P = 1..4, zmq and shm at
   P = 2, 3) x block sizes 0, 1, P-1, P+1, 1000 x float32, float64, int64, bfloat16 x (for
   reduce_scatter) sum, avg, max, min. all_gather is compared with torch's own
   ``all_gather_into_tensor`` (Gloo) and broadcast with ``dist.broadcast``, bitwise;
   reduce_scatter with a float64 reference within the dtype's error bound (every rank regenerates
   every rank's input, ``grid.py``), and its input must be left as it was. One spawned world per
   (transport, P) runs every case.
2. Refusals, on every rank before a byte moves: wrong sizes, dtype or device mismatch, overlapping
   input and output, src out of range, a power-of-two-only algorithm at P = 3, an unknown ReduceOp;
   and one rank refusing while the other is right (the other raises MismatchError).
3. The same-call check: rank 0 calls all_gather while rank 1 calls broadcast: MismatchError on both,
   and the world goes on.
4. How data moves: a ring all_gather sends exactly P-1 messages per rank, of n elements each; a
   ring reduce_scatter too; a tree broadcast at P = 4 sends 2, 1, 0, 0 messages.
5. Without processes: ``op_name`` (strings and ReduceOps), the cost rows, ``auto.choose_collective``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from grid import digest, make_input, reference
from traffic import count_from_zero  # tests/traffic.py

import ringcomm
from ringcomm import auto, cost
from ringcomm.api import op_name
from ringcomm.tools.spawn import run_world

TIMEOUT_S = 300.0  # a whole spawned world on a loaded 2-core machine
DTYPES = (torch.float32, torch.float64, torch.int64, torch.bfloat16)
OPS = ("sum", "avg", "max", "min")
ALGOS = {
    "reduce_scatter": ("ring", "rhd", "auto"),
    "all_gather": ("ring", "rd", "auto"),
    "broadcast": ("ring", "tree", "auto"),
}
POWER_OF_TWO_ONLY = {("reduce_scatter", "rhd"), ("all_gather", "rd")}


def block_sizes(p: int) -> list[int]:
    return sorted({0, 1, max(p - 1, 0), p + 1, 1000})


def _agree(t: torch.Tensor, p: int) -> bool:
    """Whether every rank holds the same bytes in ``t``."""
    mine = digest(t)
    everyone = [torch.empty_like(mine) for _ in range(p)]
    dist.all_gather(everyone, mine)
    return all(torch.equal(d, mine) for d in everyone)


def grid_world(rank: int, p: int, transport: str, dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[str]:
    """Every case at world size ``p`` over ``transport``; the failures, as text."""
    failures: list[str] = []
    case = 0
    power_of_two = p & (p - 1) == 0
    for dtype in dtypes:
        for n in block_sizes(p):
            for collective, algos in ALGOS.items():
                for algo in algos:
                    if (collective, algo) in POWER_OF_TWO_ONLY and not power_of_two:
                        continue
                    ops = OPS if collective == "reduce_scatter" else ("",)
                    for op in ops:
                        if op == "avg" and not dtype.is_floating_point:
                            continue
                        case += 1
                        where = f"rank {rank} {collective} {algo}/{transport} P={p} n={n} {str(dtype)[6:]} {op}"
                        failures += _one_case(rank, p, transport, collective, algo, op, n, dtype, case, where)
    return failures


def _one_case(
    rank: int, p: int, transport: str, collective: str, algo: str, op: str, n: int, dtype: torch.dtype,
    case: int, where: str,
) -> list[str]:
    kw = {"algo": algo, "transport": transport, "timeout": 120}
    if collective == "reduce_scatter":
        x = make_input(p * n, dtype, rank, case)
        before = x.clone()
        out = torch.full((n,), 7, dtype=dtype)
        if ringcomm.reduce_scatter(out, x, op, **kw) is not out:
            return [f"{where}: did not return output"]
        if not torch.equal(x, before):
            return [f"{where}: the input changed"]
        exact, bound = reference(p * n, dtype, op, p, case)
        exact, bound = exact[rank * n : (rank + 1) * n], bound[rank * n : (rank + 1) * n]
        bad = (out.double() - exact).abs() > bound
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            return [f"{where}: {int(bad.sum())} out of bound, first at {i}: {out[i].item()} vs {exact[i].item()}"]
        return []
    if collective == "all_gather":
        x = make_input(n, dtype, rank, case)
        out = torch.full((p * n,), 7, dtype=dtype)
        if ringcomm.all_gather(out, x, **kw) is not out:
            return [f"{where}: did not return output"]
        theirs = torch.empty_like(out)
        dist.all_gather_into_tensor(theirs, x)  # torch's own, over Gloo
        if not torch.equal(out.view(torch.uint8) if n else out, theirs.view(torch.uint8) if n else theirs):
            return [f"{where}: differs from torch's all_gather_into_tensor"]
        return [] if _agree(out, p) else [f"{where}: ranks disagree bitwise"]
    src = case % p
    x = make_input(n, dtype, rank, case)
    if ringcomm.broadcast(x, src, **kw) is not x:
        return [f"{where}: did not return the tensor"]
    theirs = make_input(n, dtype, rank, case)
    dist.broadcast(theirs, src)
    if not torch.equal(x, theirs):
        return [f"{where} src={src}: differs from dist.broadcast"]
    return [] if _agree(x, p) else [f"{where}: ranks disagree bitwise"]


WORLDS = [("torch", 1), ("torch", 2), ("torch", 3), ("torch", 4), ("zmq", 2), ("zmq", 3), ("shm", 2), ("shm", 3)]


@pytest.mark.parametrize("transport,p", WORLDS, ids=[f"{t}-P{p}" for t, p in WORLDS])
def test_grid(transport: str, p: int) -> None:
    results = run_world(grid_world, p, (transport,), timeout=TIMEOUT_S)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures[:20])


WIDE = [("torch", 5, (torch.float32, torch.int64)), ("shm", 8, (torch.int64,))]


@pytest.mark.parametrize("transport,p,dtypes", WIDE, ids=[f"{t}-P{p}" for t, p, _ in WIDE])
def test_grid_of_larger_worlds(transport: str, p: int, dtypes: tuple[torch.dtype, ...]) -> None:
    """P = 5 and 8 (the issue asks for 1-8): every collective, algorithm and op, on fewer dtypes (the
    dtype axis is covered at P <= 4; spawning and running 8 ranks on 2 cores is the slow part; P = 6
    and 7 passed too when this was written, 72 s and 66 s on the loaded machine)."""
    results = run_world(grid_world, p, (transport, dtypes), timeout=TIMEOUT_S)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures[:20])


# --- refusals ---------------------------------------------------------------------------------


def refusals_world(rank: int, p: int) -> list[str]:
    """Bad calls made alike on every rank: each must raise ValueError naming what is wrong."""
    f32 = torch.zeros(6)
    buf = torch.zeros(4 * p)
    bad = [
        ("all_gather output size", lambda: ringcomm.all_gather(torch.zeros(5), torch.zeros(3)), "P * input.numel()"),
        ("reduce_scatter input size", lambda: ringcomm.reduce_scatter(torch.zeros(3), torch.zeros(7)), "P * output.numel()"),
        ("dtype mismatch", lambda: ringcomm.all_gather(torch.zeros(6, dtype=torch.float64), torch.zeros(3)), "one dtype"),
        ("overlap", lambda: ringcomm.all_gather(buf[: 2 * p], buf[1:3]), "overlap"),
        ("overlap rs", lambda: ringcomm.reduce_scatter(buf[2 * p - 1 : 2 * p + 1], buf[: 2 * p]), "overlap"),
        ("src out of range", lambda: ringcomm.broadcast(f32, src=p), "src="),
        ("src negative", lambda: ringcomm.broadcast(f32, src=-1), "src="),
        ("src a bool", lambda: ringcomm.broadcast(f32, src=True), "src="),
        ("unknown algo", lambda: ringcomm.broadcast(f32, algo="rhd"), "unknown algo"),
        ("ReduceOp.PRODUCT", lambda: ringcomm.reduce_scatter(torch.zeros(3), torch.zeros(3 * p), dist.ReduceOp.PRODUCT), "PRODUCT"),
        ("all_reduce ReduceOp.BAND", lambda: ringcomm.all_reduce(torch.zeros(3), dist.ReduceOp.BAND), "BAND"),
        ("avg on ints", lambda: ringcomm.reduce_scatter(torch.zeros(1, dtype=torch.int64), torch.zeros(p, dtype=torch.int64), "avg"), "truncate"),
        ("not a tensor", lambda: ringcomm.all_gather([0.0] * p, torch.zeros(1)), "torch.Tensor"),
        ("bad option", lambda: ringcomm.broadcast(f32, segment_bytes=0), "segment_bytes"),
    ]
    if p & (p - 1):
        bad.append(("rhd at P=3", lambda: ringcomm.reduce_scatter(torch.zeros(1), torch.zeros(p), algo="rhd"), "power-of-two"))
        bad.append(("rd at P=3", lambda: ringcomm.all_gather(torch.zeros(p), torch.zeros(1), algo="rd"), "power-of-two"))
    failures = []
    for name, call, words in bad:
        before = buf.clone()
        try:
            call()
            failures.append(f"rank {rank} {name}: not refused")
        except ValueError as exc:
            if words not in str(exc):
                failures.append(f"rank {rank} {name}: {exc!r} does not say {words!r}")
        if not torch.equal(buf, before):
            failures.append(f"rank {rank} {name}: a tensor changed")
    # one rank wrong, the other right: the wrong one ValueError, the right one MismatchError, at once
    out = torch.zeros(2 * p)
    try:
        ringcomm.all_gather(out if rank != 1 else torch.zeros(2 * p + 1), torch.zeros(2), timeout=60)
        failures.append(f"rank {rank}: one-sided refusal not raised")
    except ringcomm.MismatchError as exc:  # first: a MismatchError is a ValueError too
        if rank == 1 or "rank 1" not in str(exc):
            failures.append(f"rank {rank}: unexpected MismatchError {exc}")
    except ValueError as exc:
        if rank != 1 or "rank 1" not in str(exc):
            failures.append(f"rank {rank}: unexpected ValueError {exc}")
    # and the world goes on
    x = torch.full((4,), float(rank))
    ringcomm.broadcast(x, src=p - 1, timeout=60)
    if not torch.equal(x, torch.full((4,), float(p - 1))):
        failures.append(f"rank {rank}: broadcast after the refusals gave {x.tolist()}")
    return failures


@pytest.mark.parametrize("p", [2, 3])
def test_refusals(p: int) -> None:
    results = run_world(refusals_world, p, timeout=TIMEOUT_S)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures)


def mismatch_world(rank: int, p: int) -> list[str]:
    failures = []
    x = torch.arange(4.0)
    try:
        if rank == 0:
            ringcomm.all_gather(torch.zeros(4 * p), x, timeout=60)
        else:
            ringcomm.broadcast(x, src=0, timeout=60)
        failures.append(f"rank {rank}: no MismatchError")
    except ringcomm.MismatchError as exc:
        if "all_gather" not in str(exc) or "broadcast" not in str(exc):
            failures.append(f"rank {rank}: the error does not name both collectives: {exc}")
    try:  # two broadcasts from different roots differ too
        ringcomm.broadcast(x, src=rank, timeout=60)
        failures.append(f"rank {rank}: no MismatchError for different src")
    except ringcomm.MismatchError:
        pass
    y = torch.full((3,), float(rank))
    ringcomm.all_reduce(y, dist.ReduceOp.SUM, timeout=60)  # and the world goes on; a ReduceOp works
    if not torch.equal(y, torch.full((3,), float(sum(range(p))))):
        failures.append(f"rank {rank}: all_reduce after the mismatch gave {y.tolist()}")
    return failures


def test_mismatch_between_collectives() -> None:
    results = run_world(mismatch_world, 2, timeout=TIMEOUT_S)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures)


# --- how data moves ---------------------------------------------------------------------------


def traffic_world(rank: int, p: int) -> dict:
    stats = ringcomm.init("torch").stats
    n = 10
    counts = {}
    for name, call in (
        ("all_gather ring", lambda: ringcomm.all_gather(torch.zeros(p * n), torch.ones(n), algo="ring")),
        ("reduce_scatter ring", lambda: ringcomm.reduce_scatter(torch.zeros(n), torch.ones(p * n), algo="ring")),
        ("broadcast tree", lambda: ringcomm.broadcast(torch.ones(n), src=0, algo="tree")),
        ("broadcast ring", lambda: ringcomm.broadcast(torch.ones(n), src=1, algo="ring", segment_bytes=12)),
    ):
        count_from_zero(stats)
        call()
        counts[name] = (stats.sent_msgs, stats.sent_bytes, dict(stats.sends_to))
    futures = [ringcomm.all_gather_async(torch.zeros(p * n), torch.full((n,), float(rank))) for _ in range(2)]
    futures.append(ringcomm.all_reduce_async(torch.ones(n)))
    futures.append(ringcomm.broadcast_async(torch.full((n,), float(rank)), src=2))
    out = torch.zeros(n)
    futures.append(ringcomm.reduce_scatter_async(out, torch.ones(p * n), "avg"))
    results = [f.wait() for f in futures]
    counts["async"] = [r.tolist() for r in results]
    return counts


@pytest.mark.fast
def test_how_data_moves() -> None:
    p, n = 4, 10
    results = run_world(traffic_world, p, timeout=TIMEOUT_S)
    for rank, counts in enumerate(results):
        # the ring's phases: P-1 messages of n elements (4 bytes each) to the right neighbour
        for name in ("all_gather ring", "reduce_scatter ring"):
            assert counts[name] == (p - 1, (p - 1) * n * 4, {(rank + 1) % p: p - 1}), (rank, name, counts[name])
        # binomial tree from 0 at P = 4: rank 0 sends to 1 then 2, rank 1 to 3 (tree.py's table)
        expected_tree = {0: {1: 1, 2: 1}, 1: {3: 1}, 2: {}, 3: {}}[rank]
        assert counts["broadcast tree"] == (len(expected_tree), len(expected_tree) * n * 4, expected_tree)
        # the chain from src 1: 1 -> 2 -> 3 -> 0, 40 bytes in segments of 3 elements (12 bytes): 4 segments
        sends = 0 if rank == 0 else 4
        assert counts["broadcast ring"][0] == sends, (rank, counts["broadcast ring"])
        assert counts["broadcast ring"][1] == (0 if rank == 0 else n * 4)
        gathered = [float(r) for r in range(p) for _ in range(n)]
        assert counts["async"] == [gathered, gathered, [float(p)] * n, [2.0] * n, [1.0] * n]


def copies_world(rank: int, p: int, transport: str) -> list[str]:
    """The ring reduce_scatter reads its input in place: the largest allocation while it runs is one
    block (the scratch block; none at P = 2), not the P blocks of a copy of the input. A traced run
    (which reduces into a copy, so the tracer can place each message) gives the same bits, and
    neither changes the input."""
    from torch.profiler import ProfilerActivity, profile

    from ringcomm.runtime import trace

    failures = []
    n = 5000  # elements per block: 20 kB, far above anything else the call allocates
    for dtype, op in ((torch.float32, "sum"), (torch.float32, "max"), (torch.int64, "min"), (torch.bfloat16, "avg")):
        x = make_input(p * n, dtype, rank, 7)
        before = x.clone()
        out = torch.empty(n, dtype=dtype)
        ringcomm.reduce_scatter(out, x, op, transport=transport, timeout=120)  # the transport set up first
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            ringcomm.reduce_scatter(out, x, op, transport=transport, timeout=120)
        largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
        block = n * x.element_size()
        if largest > block:
            failures.append(f"rank {rank} {dtype} {op}: allocated {largest} B at once, more than one block ({block} B)")
        trace.enable(rank)
        try:
            traced = torch.empty(n, dtype=dtype)
            ringcomm.reduce_scatter(traced, x, op, transport=transport, timeout=120)
        finally:
            trace.disable()
        if not torch.equal(traced.view(torch.uint8), out.view(torch.uint8)):
            failures.append(f"rank {rank} {dtype} {op}: the traced run (a copy reduced in place) differs bitwise")
        if not torch.equal(x, before):
            failures.append(f"rank {rank} {dtype} {op}: the input changed")
    return failures


@pytest.mark.parametrize("transport,p", [("torch", 3), ("shm", 2)])
def test_ring_reduce_scatter_copies_no_input(transport: str, p: int) -> None:
    results = run_world(copies_world, p, (transport,), timeout=TIMEOUT_S)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures)


# --- without processes ------------------------------------------------------------------------


@pytest.mark.fast
def test_op_name() -> None:
    assert op_name("max") == "max"
    assert [op_name(o) for o in (dist.ReduceOp.SUM, dist.ReduceOp.AVG, dist.ReduceOp.MAX, dist.ReduceOp.MIN)] == [
        "sum", "avg", "max", "min",
    ]
    for refused in (dist.ReduceOp.PRODUCT, dist.ReduceOp.BXOR):
        with pytest.raises(ValueError, match="SUM, AVG, MAX and MIN"):
            op_name(refused)
    with pytest.raises(ValueError, match="ReduceOp"):
        op_name(["sum"])


@pytest.mark.fast
def test_cost_rows() -> None:
    rows = cost.COLLECTIVE_COSTS
    assert {(c, a) for c, a in rows} == {(c, a) for c, algos in ALGOS.items() for a in algos if a != "auto"}
    m = 4096.0
    rs = rows[("reduce_scatter", "ring")]
    assert (rs.messages(4, m), rs.nbytes(4, m)) == (3, 3 * m / 4)  # half the all-reduce's ring
    assert rows[("all_gather", "rd")].messages(8, m) == 3
    assert rows[("broadcast", "tree")].messages(5, m) == 3  # ceil(log2 5)
    big = float(8 << 20)  # 8 segments of 1 MiB: P + S - 2 steps of M/S
    chain = rows[("broadcast", "ring")]
    assert (chain.messages(4, big), chain.nbytes(4, big)) == (10, 10 * big / 8)
    assert chain.time(1, big, 1.0, 1.0) == 0.0


@pytest.mark.fast
def test_auto_picks_per_collective() -> None:
    fits = auto.Fits()
    # P = 3: the power-of-two-only algorithms are never weighed
    for collective in ("reduce_scatter", "all_gather"):
        assert set(auto.choose_collective(fits, collective, "torch", 3, 1 << 20).predicted_s) == {"ring"}
    # broadcast: the tree for a tiny tensor at many ranks (fewest latencies), the chain for a large one
    assert auto.choose_collective(fits, "broadcast", "torch", 16, 64).algo == "tree"
    assert auto.choose_collective(fits, "broadcast", "torch", 4, 64 << 20).algo == "ring"
    choice = auto.choose_collective(fits, "all_gather", "shm", 4, 1 << 20)
    assert "all_reduce's fits" in choice.source
