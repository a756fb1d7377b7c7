"""Ring (readable and pipelined) and naive all-reduce: the grid, how data moves, edge cases.

Every world is a pooled one (``pool.run_pooled``): the P rank processes are started once per
session and shared with the other modules' grids. The grid is the quick tier; the large odd size
(float32 sum) is a test of its own in the full tier.
"""

from __future__ import annotations

import pytest
import torch
from grid import BIG, check_grid, sizes_for, world_sizes
from pool import run_pooled
from traffic import count_from_zero  # tests/traffic.py

import ringcomm

ALGOS = ("ring", "ring_simple", "naive")


def _grid_rank(rank: int, p: int) -> list[str]:
    failures = []
    for algo in ALGOS:
        failures += check_grid(rank, p, algo)
    return failures


@pytest.mark.parametrize("p", world_sizes([1, 2, 3, 4, 5], quick=[2, 3, 4]))
def test_grid_matches_float64_reference_and_ranks_agree_bitwise(p: int) -> None:
    failures = run_pooled(_grid_rank, p, timeout=240)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat[:20])


def _big_rank(rank: int, p: int) -> list[str]:
    return [f for algo in ALGOS for f in check_grid(rank, p, algo, sizes=[BIG])]


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_a_large_odd_float32_sum_matches_the_reference(p: int) -> None:
    failures = run_pooled(_big_rank, p, timeout=240)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat[:20])


def _pipelined_small_segments_rank(rank: int, p: int) -> list[str]:
    """The pipelined ring with tiny segments and windows must equal the readable ring bitwise."""
    import time

    from ringcomm.algorithms.buffers import ScratchPool
    from ringcomm.algorithms.ring_pipelined import pipelined_ring_all_reduce

    failures = []
    scratch = ScratchPool()

    transport = ringcomm.init("torch")
    for numel in sizes_for(p) + [4099]:
        for segment_bytes, window in [(4, 1), (12, 2), (64, 3), (1 << 20, 4)]:
            g = torch.Generator().manual_seed(numel + 7 * rank)
            x = torch.randn(numel, generator=g)
            y = x.clone()
            ringcomm.all_reduce(x, algo="ring_simple")
            pipelined_ring_all_reduce(
                y,
                "sum",
                transport,
                time.monotonic() + 60,
                scratch,
                segment_bytes=segment_bytes,
                window=window,
            )
            if not torch.equal(x, y):
                failures.append(
                    f"rank {rank} numel={numel} segment_bytes={segment_bytes} window={window}: differs from ring_simple"
                )
    return failures


@pytest.mark.parametrize("p", [2, 3])
def test_pipelined_ring_equals_readable_ring_for_any_segmentation(p: int) -> None:
    failures = run_pooled(_pipelined_small_segments_rank, p, timeout=120)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat[:20])


def _message_counts_rank(rank: int, p: int) -> dict:
    transport = ringcomm.init("torch")
    counts = {}
    for algo in ALGOS:
        x = torch.ones(10 * p)
        count_from_zero(transport.stats)
        ringcomm.all_reduce(x, algo=algo, check=False)  # count the algorithm's messages alone
        s = transport.stats
        counts[algo] = (s.sent_msgs, s.recv_msgs, dict(s.sends_to), dict(s.recvs_from), s.sent_bytes)
    return counts


@pytest.mark.parametrize("p", [2, 4, 5])
def test_each_ring_rank_sends_2p_minus_2_messages_to_its_right_neighbour(p: int) -> None:
    per_rank = run_pooled(_message_counts_rank, p, timeout=120)
    for rank, counts in enumerate(per_rank):
        right, left = (rank + 1) % p, (rank - 1) % p
        for algo in ("ring", "ring_simple"):
            sent, recvd, sends_to, recvs_from, sent_bytes = counts[algo]
            assert sent == recvd == 2 * (p - 1), (algo, rank, counts[algo])
            assert sends_to == {right: 2 * (p - 1)} and recvs_from == {left: 2 * (p - 1)}
            assert sent_bytes == 2 * (p - 1) * 10 * 4  # 2(P-1)/P * M bytes, M = 40P bytes
        sent, recvd, sends_to, recvs_from, _ = counts["naive"]
        if rank == 0:
            assert sent == recvd == p - 1
        else:
            assert (sent, recvd, sends_to, recvs_from) == (1, 1, {0: 1}, {0: 1})


def _shapes_rank(rank: int, p: int) -> list[str]:
    failures = []
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5) + rank
    expected = sum(torch.arange(60, dtype=torch.float32).reshape(3, 4, 5) + r for r in range(p))
    for algo in ALGOS:
        x = base.clone()
        ringcomm.all_reduce(x, algo=algo)
        if not torch.equal(x, expected):
            failures.append(f"{algo}: 3-D tensor wrong")
        big = torch.stack([base, -base], dim=-1)  # (3, 4, 5, 2)
        view = big[..., 0]  # non-contiguous view: reduced through a copy, written back
        assert not view.is_contiguous()
        ringcomm.all_reduce(view, algo=algo)
        if not torch.equal(big[..., 0], expected) or not torch.equal(big[..., 1], -base):
            failures.append(f"{algo}: non-contiguous view wrong or its neighbours touched")
        s = torch.tensor(float(rank + 1))  # 0-d tensor
        ringcomm.all_reduce(s, "max", algo=algo)
        if s.item() != p:
            failures.append(f"{algo}: 0-d tensor gave {s.item()}")
        w = torch.ones(8, requires_grad=True)  # a leaf that requires grad, like a parameter
        ringcomm.all_reduce(w, algo=algo)
        if not torch.equal(w.detach(), torch.full((8,), float(p))):
            failures.append(f"{algo}: requires_grad leaf wrong")
    return failures


def test_multidimensional_noncontiguous_scalar_and_leaf_tensors() -> None:
    failures = run_pooled(_shapes_rank, 3, timeout=120)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat)
