"""Specification of ``ringcomm.cost``: the cost table's counts, checked by hand, and the README's cost
table, which must be the table ``cost.markdown_table()`` renders from them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ringcomm import cost

pytestmark = pytest.mark.fast  # every test here is quick

README = Path(__file__).resolve().parents[1] / "README.md"
ALPHA, BETA = 1e-5, 1e-9  # seconds per message, seconds per byte


@pytest.mark.parametrize(
    ("name", "p", "shards", "messages", "path_bytes"),
    [
        # ring: 2(P-1) messages, 2(P-1)/P * M bytes; M = 1200 bytes throughout
        ("ring", 2, 1, 2, 1200),
        ("ring", 4, 1, 6, 1800),
        ("ring", 3, 1, 4, 1600),
        # naive: rank 0 takes (P-1) * M in, then sends as much out, one message per peer each way
        ("naive", 2, 1, 2, 2400),
        ("naive", 4, 1, 6, 7200),
        # parameter server: every server receives its shard from its P-1 peers one after another,
        # then sends it back to each: 2(P-1) messages whatever k; the busiest server moves
        # (P-1)/k * M each way, a rank serving nothing M each way, at k = P every rank the ring's
        ("ps", 4, 1, 6, 7200),
        ("ps", 4, 2, 6, 3600),
        ("ps", 4, 3, 6, 2400),  # the idle worker's M per round binds: (P-1)/k = 1 = w
        ("ps", 4, 4, 6, 1800),
        ("ps", 2, 2, 2, 1200),
        ("ps", 64, 1, 126, 2 * 63 * 1200),  # a 63-way incast, then 63 sends
        # overlapped: each direction carries the shard's (P-1)/k * M beside the server's own
        # (k-1)/k * M to the other servers: half of ps at k = 1, the ring's bytes at k = P
        ("ps_overlap", 4, 1, 6, 3600),
        ("ps_overlap", 4, 2, 6, 2400),
        ("ps_overlap", 4, 4, 6, 1800),
    ],
)
def test_critical_path_counts_by_hand(name: str, p: int, shards: int, messages: int, path_bytes: int) -> None:
    entry = cost.COSTS[name]
    assert entry.critical_path(p, 1200.0, shards) == (messages, pytest.approx(path_bytes))
    assert entry.time(p, 1200.0, ALPHA, BETA, shards) == pytest.approx(messages * ALPHA + path_bytes * BETA)


def test_the_named_time_functions_are_the_table_rows() -> None:
    assert cost.COSTS["ring"].time(4, 1200.0, ALPHA, BETA) == pytest.approx(6 * ALPHA + 1800 * BETA)
    assert cost.COSTS["naive"].time(4, 1200.0, ALPHA, BETA) == pytest.approx(6 * ALPHA + 7200 * BETA)
    assert cost.COSTS["ps"].time(4, 1200.0, ALPHA, BETA, shards=2) == pytest.approx(6 * ALPHA + 3600 * BETA)
    assert cost.COSTS["ps"].time(4, 1200.0, ALPHA, BETA) == pytest.approx(6 * ALPHA + 7200 * BETA)


def test_the_ring_moves_about_2m_whatever_p_and_the_server_grows_with_p() -> None:
    m = float(1 << 20)
    ring = [cost.COSTS["ring"].critical_path(p, m)[1] / m for p in (2, 4, 16, 256)]
    server = [cost.COSTS["ps"].critical_path(p, m)[1] / m for p in (2, 4, 16, 256)]
    assert ring == pytest.approx([1.0, 1.5, 1.875, 2 * 255 / 256]) and all(r < 2 for r in ring)
    assert server == [2.0, 6.0, 30.0, 510.0]


@pytest.mark.parametrize("p", [2, 3, 4, 8, 64])
def test_the_parameter_server_pays_alpha_per_peer_like_the_ring_and_naive(p: int) -> None:
    """The server hears from each of its P-1 peers in turn: its latency term grows with P, sharded or
    not, so a tiny tensor over many ranks costs the server as many alphas as the ring's steps."""
    ring_messages = cost.COSTS["ring"].critical_path(p, 4096.0)[0]
    assert cost.COSTS["naive"].critical_path(p, 4096.0)[0] == ring_messages
    for name in ("ps", "ps_overlap"):
        for k in {1, 2, p // 2 or 1, p}:
            assert cost.COSTS[name].critical_path(p, 4096.0, k)[0] == ring_messages == 2 * (p - 1)
    # and at k = P the sharded server is the ring, messages and bytes
    assert cost.COSTS["ps"].critical_path(p, 4096.0, p) == pytest.approx(cost.COSTS["ring"].critical_path(p, 4096.0))


@pytest.mark.parametrize("name", list(cost.COSTS))
def test_one_rank_moves_nothing(name: str) -> None:
    assert cost.COSTS[name].critical_path(1, 1e6) == (0.0, 0.0)
    assert cost.COSTS[name].time(1, 1e6, ALPHA, BETA) == 0.0


def test_shards_are_checked() -> None:
    with pytest.raises(ValueError, match=r"shards=5 is out of range for P=4; expected 1 <= shards <= 4"):
        cost.COSTS["ps"].time(4, 1e6, ALPHA, BETA, shards=5)
    with pytest.raises(ValueError, match="shards=0 is out of range"):
        cost.COSTS["ps"].critical_path(4, 1e6, 0)
    with pytest.raises(ValueError, match="ring has no shards; got shards=2"):
        cost.COSTS["ring"].critical_path(4, 1e6, 2)


def test_algbw_and_busbw_follow_nccl_tests() -> None:
    # 1 GB in 0.5 s: algbw 2 GB/s; busbw multiplies by 2(P-1)/P, 1.5 at P = 4.
    assert cost.algbw(1e9, 0.5) == pytest.approx(2.0)
    assert cost.busbw(4, 1e9, 0.5) == pytest.approx(3.0)
    assert cost.busbw(1, 1e9, 0.5) == 0.0
    assert math.isnan(cost.algbw(1e9, 0.0)) and math.isnan(cost.busbw(4, 1e9, math.nan))


def test_fit_alpha_beta_inverts_the_model() -> None:
    ps_, ms = [2, 4, 8, 2, 4, 8], [1e3, 1e3, 1e3, 1e7, 1e7, 1e7]
    counts = [cost.COSTS["ring"].critical_path(p, m) for p, m in zip(ps_, ms)]
    seconds = [c[0] * ALPHA + c[1] * BETA for c in counts]
    alpha, beta = cost.fit_alpha_beta([c[0] for c in counts], [c[1] for c in counts], seconds)
    assert (alpha, beta) == (pytest.approx(ALPHA, rel=1e-9), pytest.approx(BETA, rel=1e-9))
    assert np.isfinite([alpha, beta]).all()


def test_markdown_table_has_a_row_per_algorithm_with_time_from_its_counts() -> None:
    lines = cost.markdown_table().splitlines()
    assert lines[0].startswith(
        "| algorithm | messages on the critical path | bytes on the critical path | time |"
    )
    assert len(lines) == 2 + len(cost.COSTS)
    for line, entry in zip(lines[2:], cost.COSTS.values()):
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert cells[:4] == [entry.title, entry.messages_text, entry.bytes_text, entry.time_text]
    assert "| ring | 2(P−1) | 2(P−1)/P·M | 2(P−1)·α + 2(P−1)/P·M·β |" in lines[2]


def _readme_cost_table() -> str:
    lines = README.read_text().splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.startswith("| algorithm | messages on the critical path")
    )
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def test_readme_cost_table_is_the_one_cost_py_renders() -> None:
    assert _readme_cost_table() == cost.markdown_table(), (
        "README.md's cost table differs from ringcomm.cost.markdown_table(); paste its output into the README"
    )
