"""``algo="hier"``: the two-level all-reduce, on one host with nodes made of blocks of ranks.

``hier_ranks_per_node=2`` makes ranks {0, 1} and {2, 3} two "nodes" (shm inside, the call's
transport across). Each world runs the grid (float64 reference; integer data exact; ranks
bitwise equal) over torch and zmq as the cross transport, the inner algorithms, and how the
bytes move (each rank puts 2(n-1)/n · S/g on the cross transport); then the refusals.
"""

from __future__ import annotations

import pytest
import torch
from grid import check_grid

from ringcomm.algorithms.hier import node_layout
from ringcomm.tools.spawn import run_world

SIZES = [0, 1, 3, 5, 1000, 4099]


def _cross_stats(name: str, transport: str):
    """This rank's hier session ``name`` ("hier-node" or "hier-cross") and its ``transport``'s stats."""
    from ringcomm.runtime import session as sessions

    found = [s for key, s in sessions._GROUPS.items() if isinstance(key, tuple) and key[2] == name]
    assert len(found) == 1, found
    return found[0], found[0].transports[(transport, "cpu")].stats


def _hier_rank(rank: int, p: int, g: int) -> list[str]:
    import ringcomm

    failures: list[str] = []
    for transport in ("torch", "zmq"):
        for inner in ("auto", "ring", "rhd"):
            sizes = SIZES if inner == "auto" else [7, 1000]
            failures += check_grid(
                rank, p, "hier", transport, {"hier_ranks_per_node": g, "hier_inner": inner}, sizes=sizes
            )
    # how the bytes move: the cross group is this rank's local rank on every node, and a ring across
    # n nodes puts 2(n-1)/n of the rank's S/g bytes on the wire
    n = p // g
    x = torch.ones(1200 * p, dtype=torch.float32)
    cross, stats = _cross_stats("hier-cross", "zmq")
    if cross.world_size != n or cross.rank != rank // g:
        failures.append(f"rank {rank}: cross group is rank {cross.rank} of {cross.world_size}, expected {rank // g} of {n}")
    before, accounted = stats.sent_bytes, ringcomm.comm_stats()
    ringcomm.all_reduce(x, algo="hier", transport="zmq", hier_ranks_per_node=g, hier_inner="ring_simple")
    sent, total = stats.sent_bytes - before, (ringcomm.comm_stats() - accounted).sent_bytes
    s = x.numel() * 4
    want = 2 * (n - 1) * (s // g) // n
    if sent != want:
        failures.append(f"rank {rank}: sent {sent} B across nodes, expected 2(n-1)/n * S/g = {want} B")
    if total != want + 2 * (g - 1) * (s // g):  # comm_stats: the node's 2(g-1) shm steps of S/g too
        failures.append(f"rank {rank}: comm_stats counted {total} B, expected {want} + {2 * (g - 1) * (s // g)}")
    if not torch.equal(x, torch.full_like(x, float(p))):
        failures.append(f"rank {rank}: traffic case wrong result")
    # default options: one host is one node (shm only), still right
    y = torch.arange(10, dtype=torch.int64) * (rank + 1)
    ringcomm.all_reduce(y, algo="hier")
    if not torch.equal(y, torch.arange(10, dtype=torch.int64) * sum(range(1, p + 1))):
        failures.append(f"rank {rank}: hier with one node gave {y.tolist()}")
    return failures


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("p", "g"), [(4, 2), (6, 2)])
def test_hier_matches_reference_and_ranks_agree_bitwise(p: int, g: int) -> None:
    failures = run_world(_hier_rank, p, (g,), timeout=280)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat[:20])


def _uneven_rank(rank: int, p: int) -> list[str]:
    import ringcomm

    try:
        ringcomm.all_reduce(torch.ones(4), algo="hier", hier_ranks_per_node=3)
    except ValueError as exc:
        if "hier_ranks_per_node=3" not in str(exc) or "\n" in str(exc):
            return [f"rank {rank}: refusal does not name the option in one line: {exc}"]
    else:
        return [f"rank {rank}: hier_ranks_per_node=3 of 4 ranks was not refused"]
    x = torch.ones(4)  # the world goes on: the refusal came before anything moved
    ringcomm.all_reduce(x)
    return [] if torch.equal(x, torch.full((4,), float(p))) else [f"rank {rank}: next call gave {x.tolist()}"]


@pytest.mark.timeout(120)
def test_uneven_nodes_are_refused_on_every_rank() -> None:
    failures = run_world(_uneven_rank, 4, timeout=100)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat)


def test_node_layout_groups_by_key_and_refuses_uneven_nodes() -> None:
    layout = node_layout(["b", "a", "b", "a"], rank=0)  # interleaved: nodes {0, 2} and {1, 3}
    assert layout.nodes == ((0, 2), (1, 3))
    assert layout.node_of(2) == (0, 2) and layout.cross_of(2) == (2, 3) and layout.cross_of(1) == (0, 1)
    with pytest.raises(ValueError, match=r"as many ranks on every node.*\[1, 2\]"):
        node_layout(["a", "a", "b"], rank=1)


# --- algo="auto" weighs hier where the world has nodes of several ranks ---


def _auto_rank(rank: int, p: int, tune_file: str) -> dict:
    import os

    import ringcomm
    from ringcomm.runtime import session as sessions

    # as torchrun sets them on 2 nodes of 2 ranks; before this process's first ringcomm call
    os.environ.update(GROUP_RANK=str(rank // 2), LOCAL_RANK=str(rank % 2), RINGCOMM_TUNE_FILE=tune_file)
    x = torch.arange(1000, dtype=torch.int64) + rank
    ringcomm.all_reduce(x, algo="auto")
    crossed = [s for key, s in sessions._GROUPS.items() if isinstance(key, tuple) and key[2] == "hier-cross"]
    return {
        "exact": bool(torch.equal(x, 4 * torch.arange(1000, dtype=torch.int64) + sum(range(p)))),
        "cross": [(s.rank, s.world_size) for s in crossed],
    }


@pytest.mark.timeout(200)
def test_auto_runs_hier_on_two_nodes_of_two_ranks(tmp_path) -> None:
    """A fit where the network is slow and shared memory fast: auto must pick hier, found from GROUP_RANK."""
    import json

    from ringcomm.auto import CANDIDATES

    def table(alpha: float, beta: float) -> dict:
        return {a: {"alpha_s": alpha, "beta_s_per_byte": beta} for a in CANDIDATES}

    fits = {"torch": {"2": table(1e-3, 16e-9), "4": table(1e-3, 16e-9)}, "shm": {"2": table(5e-6, 0.2e-9)}}
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps({"version": 1, "fits": fits}))
    results = run_world(_auto_rank, 4, (str(tune),), timeout=180)
    for rank, r in enumerate(results):
        assert r["exact"], (rank, r)
        assert r["cross"] == [(rank // 2, 2)], f"rank {rank}: no cross group of the 2 nodes, auto ran no hier: {r}"


def test_node_shape_asks_no_one_below_four_ranks_or_off_the_cpu() -> None:
    from types import SimpleNamespace

    from ringcomm.algorithms.hier import node_shape

    # no rendezvous to gather through: an answer other than None would have had to ask the peers
    assert node_shape(SimpleNamespace(world_size=3), 1e18) is None
    assert node_shape(SimpleNamespace(world_size=8), 1e18, "cuda") is None


def _uneven_auto_rank(rank: int, p: int) -> dict:
    import os

    import ringcomm
    from ringcomm.runtime import session as sessions

    os.environ.update(GROUP_RANK="0" if rank < 3 else "1", LOCAL_RANK=str(rank % 3))  # nodes of 3 and 1
    ringcomm.init("torch")
    rendezvous = sessions.current().rendezvous
    asked: list[str] = []
    gather = rendezvous.gather

    def counted(base: str, *args: object) -> list[str]:
        asked.append(base)
        return gather(base, *args)

    rendezvous.gather = counted
    exact = []
    for _ in range(3):
        x = torch.arange(100, dtype=torch.int64) * (rank + 1)
        ringcomm.all_reduce(x, algo="auto")
        exact.append(bool(torch.equal(x, torch.arange(100, dtype=torch.int64) * sum(range(1, p + 1)))))
    return {"exact": exact, "node gathers": sum("hier-nodes" in key for key in asked)}


@pytest.mark.timeout(200)
def test_auto_on_uneven_nodes_runs_flat_and_asks_for_the_nodes_once() -> None:
    """hier refuses nodes of 3 and 1 ranks, so auto must not weigh it, and must not gather the nodes
    again at every call to learn the same thing."""
    results = run_world(_uneven_auto_rank, 4, timeout=180)
    for rank, r in enumerate(results):
        assert r == {"exact": [True] * 3, "node gathers": 1}, (rank, r)


def _wire_rank(rank: int, p: int) -> dict:
    import ringcomm

    x = torch.randn(5003, generator=torch.Generator().manual_seed(rank))
    sent = {}
    results = {}
    for wire in (None, "bf16"):
        y = x.clone()
        before = ringcomm.comm_stats()
        ringcomm.all_reduce(y, algo="hier", transport="zmq", hier_ranks_per_node=2, hier_inner="ring", wire_dtype=wire)
        sent[wire] = (ringcomm.comm_stats() - before).sent_bytes
        results[wire] = y
    return {"sent": sent, "results": results}


@pytest.mark.timeout(200)
def test_hier_carries_the_wire_dtype_on_both_levels() -> None:
    """wire_dtype="bf16" with algo="hier" moved float32 bytes: hier ran its levels on transports of its
    own and dropped the call's wire dtype, silently (the result was only rounded at the end)."""
    results = run_world(_wire_rank, 4, timeout=180)
    exact = sum(torch.randn(5003, generator=torch.Generator().manual_seed(r)).double() for r in range(4))
    for rank, r in enumerate(results):
        assert r["sent"]["bf16"] * 2 == r["sent"][None], (rank, r["sent"])  # 2 bytes an element, not 4
        assert r["results"]["bf16"].equal(results[0]["results"]["bf16"]), f"rank {rank} differs from rank 0"
        err = (r["results"]["bf16"].double() - exact).abs().max().item()
        assert 0 < err < 0.1, f"rank {rank}: bf16 result off by {err} (0: nothing was rounded)"
