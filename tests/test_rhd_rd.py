"""Recursive halving + doubling (``algo="rhd"``) and recursive doubling (``algo="rd"``), as a specification.

1. The grid (``grid.py``): world sizes 1..7, powers of two and not (P = 3, 5, 6,
   7 fold extra ranks in and out) x sizes x dtypes x ops, against a float64
   reference, and every rank ends with the same bytes; the 2**20+3 case for
   float32 sum only (the slow one), as a test of its own. Once more over ZeroMQ (P = 3) and over shared
   memory with 64-byte slots (P = 5), where every message crosses in fragments
   and a receiver reduces fragment by fragment.
2. Signed zeros: max and min of +0.0 and -0.0 depend on operand order and on
   whether torch reduces an element in its SIMD body or its scalar tail. rhd
   computes each element on one rank; rd computes it on every rank, which must
   still agree bitwise (``rd.py`` says how).
3. How data moves, counted by the transport: at P = 4 each rank sends rd's
   log2(P) = 2 messages of M bytes, and rhd's 2·log2(P) = 4 messages of
   2(P-1)/P·M bytes in all; at P = 6 the extra ranks 4 and 5 send their vector
   once to ranks 0 and 1 and get the result back, and ranks 0 and 1 carry that
   on top of the core's traffic. The counts are the cost model's (``cost.COSTS``).
4. Without processes: the fold's arithmetic, the trace parts, the cost rows by
   hand, and both algorithms at P = 6, 7, 8 under the NCCL-order emulator
   (``test_nccl_order.py`` runs them at P = 1..5).

One pooled world per P (``pool.run_pooled``, shared with the other modules'
grids) runs every group of that P in one call (starting a world costs more than
the cases); each rank returns failure strings per group and each test asserts
its group is empty.
"""

from __future__ import annotations

import hashlib
import time

import pytest
import torch
import torch.distributed as dist
from grid import BIG, check_grid, digest, world_sizes
from pool import run_pooled
from traffic import count_from_zero  # tests/traffic.py

import ringcomm
from ringcomm import cost
from ringcomm.algorithms.buffers import ScratchPool
from ringcomm.algorithms.fold import core_size, fold_partner
from ringcomm.algorithms.registry import ALGOS
from ringcomm.tools.spawn import run_world
from tests.nccl_order import run_threads

ALGOS_HERE = ("rhd", "rd")
WORLD_SIZES = (1, 2, 3, 4, 5, 6, 7)
QUICK_SIZES = (3, 4, 6)  # the quick tier: a fold of one, a power of two, a fold of two
TIMEOUT_S = 300.0  # for a whole spawned world of up to 7 ranks, on a loaded 2-core machine
ZERO_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ZERO_SIZES = (67, 1000, 4099)  # SIMD bodies and scalar tails of different lengths


# --- signed zeros: what each rank computes on its own ---------------------------------------


def signed_zero_input(numel: int, dtype: torch.dtype, rank: int, case: int) -> torch.Tensor:
    """Mostly zeros of random sign (ties between +0.0 and -0.0 everywhere), the rest ordinary values."""
    g = torch.Generator().manual_seed(7919 * case + rank)
    x = torch.randn(numel, generator=g, dtype=torch.float64)
    zero = torch.rand(numel, generator=g) < 0.75
    negative = torch.rand(numel, generator=g) < 0.5
    x[zero] = 0.0
    x[zero & negative] = -0.0
    return x.to(dtype)


def check_signed_zeros(rank: int, p: int, algo: str, transport: str = "torch") -> list[str]:
    """max and min over signed zeros: the right magnitude, and the same bytes (sign bits) on every rank."""
    failures, digests, names = [], [], []
    case = 0
    for dtype in ZERO_DTYPES:
        for numel in ZERO_SIZES:
            for op in ("max", "min"):
                case += 1
                name = f"{algo}/{transport} P={p} numel={numel} {str(dtype)[6:]} {op} signed zeros"
                x = signed_zero_input(numel, dtype, rank, case)
                ringcomm.all_reduce(x, op, algo=algo, transport=transport, timeout=120)
                xs = torch.stack([signed_zero_input(numel, dtype, r, case).double() for r in range(p)])
                exact = xs.max(0).values if op == "max" else xs.min(0).values
                if not torch.equal(x.double(), exact):  # -0.0 == +0.0 here: the sign is the next check's
                    failures.append(f"rank {rank} {name}: wrong value")
                digests.append(digest(x))
                names.append(name)
    mine = torch.stack(digests)
    everyone = [torch.empty_like(mine) for _ in range(p)]
    dist.all_gather(everyone, mine)
    for i, name in enumerate(names):
        if any(not torch.equal(theirs[i], mine[i]) for theirs in everyone):
            failures.append(f"rank {rank} {name}: ranks disagree bitwise")
    return failures


# --- how data moves ----------------------------------------------------------------------------

NUMEL_PER_RANK = 10  # float32: M = 40·P bytes; P' chunks of 10 elements at P = 4, 15 at P = 6


def _traffic(stats: ringcomm.transports.base.TransportStats) -> dict:
    return {
        "sent_msgs": stats.sent_msgs,
        "recv_msgs": stats.recv_msgs,
        "sent_bytes": stats.sent_bytes,
        "recv_bytes": stats.recv_bytes,
        "sends_to": dict(stats.sends_to),
        "recvs_from": dict(stats.recvs_from),
    }


def _rank_counts(rank: int, p: int) -> dict[str, dict]:
    stats = ringcomm.init("torch").stats
    traffic = {}
    for algo in ALGOS_HERE:
        x = torch.ones(NUMEL_PER_RANK * p)
        count_from_zero(stats)
        ringcomm.all_reduce(x, algo=algo, timeout=120, check=False)  # count the algorithm's messages alone
        traffic[algo] = _traffic(stats)
        traffic[algo]["right"] = torch.equal(x, torch.full_like(x, float(p)))
    return traffic


def _both_ways(msgs: int, nbytes: int, peers: dict[int, int], right: bool = True) -> dict:
    """The traffic of a rank that sends and receives the same: ``peers`` maps peer -> messages each way."""
    return {
        "sent_msgs": msgs,
        "recv_msgs": msgs,
        "sent_bytes": nbytes,
        "recv_bytes": nbytes,
        "sends_to": peers,
        "recvs_from": peers,
        "right": right,
    }


# Rank r's partners are r XOR 1, then r XOR 2. M = 160 bytes at P = 4.
EXPECTED_P4 = {
    # rd: one message of the whole M to each partner: log2(4) = 2 messages, 2M = 320 bytes each way
    "rd": [_both_ways(2, 320, {r ^ 1: 1, r ^ 2: 1}) for r in range(4)],
    # rhd: halving sends M/2 to r XOR 2, then M/4 to r XOR 1; doubling M/4 to r XOR 1, then M/2 to
    # r XOR 2: 2·log2(4) = 4 messages, 2(P-1)/P·M = 240 bytes each way
    "rhd": [_both_ways(4, 240, {r ^ 1: 2, r ^ 2: 2}) for r in range(4)],
}

# P = 6 = 4 + 2: ranks 4 and 5 fold into ranks 0 and 1. M = 240 bytes; the core's chunks are M/4 = 60 bytes.
EXTRA = [_both_ways(1, 240, {r - 4: 1}) for r in (4, 5)]  # its whole vector out, the result back in
EXPECTED_P6 = {
    # partners 0 and 1: the core's 2 messages of M, plus the fold (M in, M out): 3 messages, 3M = 720 bytes
    # each way; ranks 2 and 3: the core's alone, as at P = 4
    "rd": [_both_ways(3, 720, {r ^ 1: 1, r ^ 2: 1, r + 4: 1}) for r in (0, 1)]
    + [_both_ways(2, 480, {r ^ 1: 1, r ^ 2: 1}) for r in (2, 3)]
    + EXTRA,
    # partners: the core's 4 messages of 2·(M/2 + M/4) = 360 bytes, plus the fold: 5 messages, 600 bytes each
    # way; ranks 2 and 3: the core's 4 messages, 360 bytes
    "rhd": [_both_ways(5, 600, {r ^ 1: 2, r ^ 2: 2, r + 4: 1}) for r in (0, 1)]
    + [_both_ways(4, 360, {r ^ 1: 2, r ^ 2: 2}) for r in (2, 3)]
    + EXTRA,
}


# --- the worlds --------------------------------------------------------------------------------


def _rank_all(rank: int, p: int) -> dict[str, object]:
    """Everything one world of ``p`` over the torch transport checks, grouped."""
    report: dict[str, object] = {"grid": [], "signed_zeros": []}
    for algo in ALGOS_HERE:
        report["grid"] += check_grid(rank, p, algo)
        report["signed_zeros"] += check_signed_zeros(rank, p, algo)
    if p in (4, 6):
        report["counts"] = _rank_counts(rank, p)
    return report


def _rank_other_transport(rank: int, p: int, transport: str) -> list[str]:
    failures = []
    for algo in ALGOS_HERE:
        failures += check_grid(rank, p, algo, transport, sizes=[0, 1, p - 1, p, p + 1, 1000])
        failures += check_signed_zeros(rank, p, algo, transport)
    return failures


_WORLDS: dict[int, list[dict[str, object]] | BaseException] = {}


def _reports(p: int) -> list[dict[str, object]]:
    """Each rank's report from the world of ``p``, spawning that world on first use."""
    if p not in _WORLDS:
        try:
            _WORLDS[p] = run_pooled(_rank_all, p, timeout=TIMEOUT_S)
        except Exception as exc:  # a crashed world fails every test that reads it, without a respawn
            _WORLDS[p] = exc
    reports = _WORLDS[p]
    if isinstance(reports, BaseException):
        raise reports
    return reports


def _assert_none(failures: list[str]) -> None:
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:30])


@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("p", world_sizes(WORLD_SIZES, quick=QUICK_SIZES))
def test_grid_matches_float64_reference_and_ranks_agree_bitwise(p: int) -> None:
    _assert_none([line for report in _reports(p) for line in report["grid"]])


def _rank_big(rank: int, p: int) -> list[str]:
    return [f for algo in ALGOS_HERE for f in check_grid(rank, p, algo, sizes=[BIG])]


@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("p", WORLD_SIZES)
def test_a_large_odd_float32_sum_matches_the_reference(p: int) -> None:
    _assert_none([f for r in run_pooled(_rank_big, p, timeout=TIMEOUT_S) for f in r])


@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("p", world_sizes(WORLD_SIZES, quick=QUICK_SIZES))
def test_max_and_min_of_signed_zeros_agree_bitwise(p: int) -> None:
    _assert_none([line for report in _reports(p) for line in report["signed_zeros"]])


@pytest.mark.fast
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_at_p4_rd_sends_log2p_messages_of_m_and_rhd_2log2p_of_the_rings_bytes() -> None:
    reports = _reports(4)
    for algo, expected in EXPECTED_P4.items():
        for rank, report in enumerate(reports):
            got = report["counts"][algo]
            assert got == expected[rank], (algo, rank, got)
            # a power of two has no fold: every rank's chain is the critical path the cost model counts
            m = NUMEL_PER_RANK * 4 * 4
            assert cost.COSTS[algo].critical_path(4, m) == (got["sent_msgs"], got["sent_bytes"])
    assert EXPECTED_P4["rhd"][0]["sent_bytes"] == cost.COSTS["ring"].critical_path(4, 160)[1]


@pytest.mark.fast
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_at_p6_extra_ranks_send_their_vector_once_and_get_the_result_back() -> None:
    reports = _reports(6)
    m = NUMEL_PER_RANK * 6 * 4
    for algo, expected in EXPECTED_P6.items():
        for rank, report in enumerate(reports):
            got = report["counts"][algo]
            assert got == expected[rank], (algo, rank, got)
        # the critical path runs through a fold partner: all it receives (the extra's vector, then the
        # core's messages), then the result back out to its extra rank
        partner = reports[0]["counts"][algo]
        assert cost.COSTS[algo].critical_path(6, m) == (partner["recv_msgs"] + 1, partner["recv_bytes"] + m)


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_over_zmq() -> None:
    _assert_none([f for r in run_pooled(_rank_other_transport, 3, ("zmq",), timeout=TIMEOUT_S) for f in r])


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_over_shm_with_messages_in_fragments() -> None:
    # 2 slots of 64 bytes: a message crosses in fragments of 16 float32 while the receiver takes them in; an rd
    # that reduced into the vector it was still sending would send its partner bytes it had already changed
    env = {"RINGCOMM_SHM_SLOTS": "2", "RINGCOMM_SHM_SLOT_BYTES": "64"}
    failures = run_world(_rank_other_transport, 5, ("shm",), timeout=TIMEOUT_S, env=env)
    _assert_none([f for r in failures for f in r])


# --- without processes -------------------------------------------------------------------------


@pytest.mark.fast
def test_the_core_is_the_largest_power_of_two_and_extra_rank_pp_plus_j_folds_into_j() -> None:
    assert [core_size(p) for p in range(1, 10)] == [1, 2, 2, 4, 4, 4, 4, 8, 8]
    assert [fold_partner(r, 4) for r in range(4)] == [None] * 4
    assert [fold_partner(r, 6) for r in range(6)] == [4, 5, None, None, 0, 1]
    assert [fold_partner(r, 7) for r in range(7)] == [4, 5, 6, None, 0, 1, 2]
    assert [fold_partner(r, 3) for r in range(3)] == [2, None, 0]
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        core_size(0)


@pytest.mark.fast
def test_rhd_labels_the_cores_chunks_for_the_trace() -> None:
    assert ALGOS["rhd"].cut(10, 6, {}) == [("c0", 0, 3), ("c1", 3, 3), ("c2", 6, 2), ("c3", 8, 2)]
    assert ALGOS["rd"].cut(10, 6, {}) == [("all", 0, 10)]


@pytest.mark.fast
@pytest.mark.parametrize(
    ("name", "p", "messages", "path_bytes"),
    [
        # rhd: 2·log2(P') messages and 2(P'-1)/P'·M bytes, plus 2 messages and 2M for a fold; M = 1200
        ("rhd", 2, 2, 1200),
        ("rhd", 3, 4, 1200 + 2400),
        ("rhd", 4, 4, 1800),
        ("rhd", 6, 6, 1800 + 2400),
        ("rhd", 8, 6, 2100),
        # rd: log2(P') messages of M, plus 2 for a fold
        ("rd", 2, 1, 1200),
        ("rd", 3, 3, 3600),
        ("rd", 4, 2, 2400),
        ("rd", 7, 4, 4800),
        ("rd", 8, 3, 3600),
    ],
)
def test_cost_rows_by_hand(name: str, p: int, messages: int, path_bytes: int) -> None:
    assert cost.COSTS[name].critical_path(p, 1200.0) == (messages, pytest.approx(path_bytes))


@pytest.mark.fast
def test_rhd_moves_the_rings_bytes_in_fewer_steps_and_rd_takes_the_fewest() -> None:
    for p in (2, 4, 8, 16, 64):
        ring, rhd, rd = (cost.COSTS[a].critical_path(p, 1e6) for a in ("ring", "rhd", "rd"))
        assert rhd[1] == pytest.approx(ring[1])
        assert rd[0] < rhd[0] <= ring[0]
    # at P = 4 and past it, rd moves more bytes than the ring: it is for small tensors
    assert cost.COSTS["rd"].critical_path(4, 1e6)[1] > cost.COSTS["ring"].critical_path(4, 1e6)[1]


@pytest.mark.fast
@pytest.mark.timeout(120)
@pytest.mark.parametrize("algo", ALGOS_HERE)
@pytest.mark.parametrize("p", [6, 7, 8])
def test_larger_worlds_under_nccl_ordering_right_and_bitwise_equal(algo: str, p: int) -> None:
    """P = 6, 7 (folds of 2 and 3) and 8 (three levels) in threads: the sum exact, signed zeros agree."""
    timeout = 20.0

    cases = [(101, torch.float64, "sum"), (p + 1, torch.float64, "sum")]
    cases += [
        (n, dt, op) for n in ZERO_SIZES for dt in (torch.float32, torch.float16) for op in ("max", "min")
    ]

    def body(rank: int, transport: object) -> list[torch.Tensor]:
        out = []
        for case, (numel, dtype, op) in enumerate(cases):
            if op == "sum":
                x = torch.arange(numel, dtype=dtype) * (rank + 1) + rank
            else:
                x = signed_zero_input(numel, dtype, rank, case)
            ALGOS[algo].run(x, op, transport, time.monotonic() + timeout, ScratchPool())
            out.append(x)
        return out

    results = run_threads(p, body, timeout)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{algo} P={p}: {errors[0]!r}"
    for numel, x in zip((101, p + 1), results[0]):
        assert torch.equal(x, sum(torch.arange(numel, dtype=torch.float64) * (r + 1) + r for r in range(p)))
    for case in range(len(results[0])):
        hashes = {hashlib.sha256(r[case].view(torch.uint8).numpy().tobytes()).hexdigest() for r in results}
        assert len(hashes) == 1, f"{algo} P={p} case {case}: ranks disagree bitwise"
