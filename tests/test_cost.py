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


# --------------------------------------------------------------------------- two levels (cost.HIER)


@pytest.mark.parametrize(
    ("n", "g", "levels"),
    [
        # M = 1200 B. In the node: the ring's two halves over g ranks, g-1 messages of M/g each;
        # across: a ring of n nodes on the whole M (the g shards share the node's one link)
        (2, 2, [("reduce-scatter", "node", 1, 600), ("all-reduce", "network", 2, 1200), ("all-gather", "node", 1, 600)]),
        (4, 2, [("reduce-scatter", "node", 1, 600), ("all-reduce", "network", 6, 1800), ("all-gather", "node", 1, 600)]),
        (2, 4, [("reduce-scatter", "node", 3, 900), ("all-reduce", "network", 2, 1200), ("all-gather", "node", 3, 900)]),
        (3, 1, [("all-reduce", "network", 4, 1600)]),  # one rank per node: the inner ring alone
        (1, 3, [("reduce-scatter", "node", 2, 800), ("all-gather", "node", 2, 800)]),  # one node: shm alone
        (1, 1, []),
    ],
)
def test_hier_levels_by_hand(n: int, g: int, levels: list[tuple[str, str, int, int]]) -> None:
    got = [(lv.phase, lv.link, lv.messages, lv.nbytes) for lv in cost.HIER.levels(n, g, 1200.0)]
    assert got == [(p, link, m, pytest.approx(b)) for p, link, m, b in levels]


def test_hier_time_is_the_node_levels_on_shm_plus_the_network_level_on_the_link() -> None:
    shm, net = (2e-6, 1e-10), (50e-6, 16e-9)  # shared memory: fast; the node's link: 500 Mbit/s
    m = 16.0 * 2**20
    # 2 x 2: one shm message of M/2 each way in the node, a ring of 2 nodes on M across
    want = 2 * shm[0] + m * shm[1] + 2 * net[0] + m * net[1]
    assert cost.HIER.time(2, 2, m, shm, net) == pytest.approx(want)
    # 4 x 2: 6 messages and 1.5 M across
    assert cost.HIER.time(4, 2, m, shm, net) == pytest.approx(2 * shm[0] + m * shm[1] + 6 * net[0] + 1.5 * m * net[1])
    # the inner algorithm's own row across: rhd at 4 nodes is 2 log2(4) messages and 1.5 M
    assert cost.HIER.time(4, 2, m, shm, net, inner="rhd") == pytest.approx(
        2 * shm[0] + m * shm[1] + 4 * net[0] + 1.5 * m * net[1]
    )
    # and the sum of the levels, each at its own link's alpha and beta
    fit = {"node": shm, "network": net}
    summed = sum(lv.messages * fit[lv.link][0] + lv.nbytes * fit[lv.link][1] for lv in cost.HIER.levels(4, 2, m))
    assert cost.HIER.time(4, 2, m, shm, net) == pytest.approx(summed)


def test_what_each_nodes_link_carries_hier_against_the_flat_ring() -> None:
    """The issue's numbers: at 2 x 2, M (hier) against 1.5 M (contiguous ring) and 3 M (interleaved)."""
    m = float(1 << 20)

    def hier_link(n: int, g: int) -> float:
        return sum(lv.nbytes for lv in cost.HIER.levels(n, g, m) if lv.link == "network")

    assert hier_link(2, 2) == m
    assert cost.flat_ring_link_bytes(2, 2, m) == pytest.approx(1.5 * m)
    assert cost.flat_ring_link_bytes(2, 2, m, "interleaved") == pytest.approx(3 * m)
    assert hier_link(4, 2) == pytest.approx(1.5 * m)
    assert cost.flat_ring_link_bytes(4, 2, m) == pytest.approx(1.75 * m)
    assert cost.flat_ring_link_bytes(4, 2, m, "interleaved") == pytest.approx(3.5 * m)
    # one rank per node: placement means nothing, and hier is the ring itself
    assert cost.flat_ring_link_bytes(4, 1, m, "interleaved") == cost.flat_ring_link_bytes(4, 1, m) == hier_link(4, 1)
    assert cost.flat_ring_link_bytes(1, 4, m) == 0.0  # one node: nothing leaves it


def test_hier_cost_refuses_what_is_no_layout() -> None:
    with pytest.raises(ValueError, match="placement 'random'"):
        cost.flat_ring_link_bytes(2, 2, 1.0, "random")
    with pytest.raises(ValueError, match="nodes must be an integer >= 1, got 0"):
        cost.HIER.levels(0, 2, 1.0)
    with pytest.raises(ValueError, match="ranks per node must be an integer >= 1, got 2.0"):
        cost.HIER.time(2, 2.0, 1.0, (0, 0), (0, 0))  # type: ignore[arg-type]


def test_hier_row_writes_out_its_formula() -> None:
    row = cost.HIER.markdown_row()
    assert row.count(" | ") == 4 and cost.HIER.time_text in row
    assert "2(n−1)/n·M" in cost.HIER.bytes_text and "2(g−1)/g·M" in cost.HIER.bytes_text
