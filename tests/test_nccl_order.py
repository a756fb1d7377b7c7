"""Every algorithm completes under NCCL's ordering (one group at a time, tags ignored), without a GPU.

``nccl_order.py`` emulates how NCCL runs point-to-point operations. Before
ringcomm posted a step's sends and receives together, the ring, the pipelined
ring and the parameter server deadlocked under it (a receive issued alone
blocks the send queued behind it); these tests run the real algorithm
functions through the emulator and check the result and that ranks agree
bitwise, so an algorithm that goes back to separate posts fails here.
"""

from __future__ import annotations

import time

import pytest
import torch

from ringcomm.algorithms.buffers import ScratchPool
from ringcomm.algorithms.registry import ALGOS
from ringcomm.errors import CommTimeoutError
from tests.nccl_order import run_threads

pytestmark = pytest.mark.fast  # every test here is quick

TIMEOUT_S = 10.0

# (algo, options) pairs: every algorithm, the pipelined ring with several segments per chunk
# and a window, the parameter server central, sharded and with a server other than rank 0.
CASES = [
    ("ring_simple", {}),
    ("ring", {}),
    ("ring", {"segment_bytes": 12, "window": 2}),
    ("ring", {"segment_bytes": 8, "window": 3}),
    ("naive", {}),
    ("ps", {}),
    ("ps", {"ps_shards": "P"}),
    ("ps", {"ps_shards": 2, "ps_rank": 1}),
    ("ps", {"ps_overlap": True, "ps_segment_bytes": 16}),
    ("ps", {"ps_shards": 2, "ps_rank": 1, "ps_overlap": True, "ps_segment_bytes": 24}),
    ("rhd", {}),
    ("rd", {}),
]


def _run(algo: str, options: dict, p: int, numel: int) -> list[torch.Tensor | BaseException]:
    opts = {k: (p if v == "P" else v) for k, v in options.items()}
    if algo == "ps" and (opts.get("ps_shards", 1) > p or opts.get("ps_rank", 0) >= p):
        pytest.skip("option out of range for this world size")
    spec = ALGOS[algo]
    complete = spec.options(opts, p)

    def body(rank: int, transport: object) -> torch.Tensor:
        x = torch.arange(numel, dtype=torch.float64) * (rank + 1) + rank
        spec.run(x, "sum", transport, time.monotonic() + TIMEOUT_S, ScratchPool(), **complete)
        return x

    return run_threads(p, body, TIMEOUT_S)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algo, options", CASES, ids=[f"{a}-{o}" for a, o in CASES])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_algorithm_completes_under_nccl_ordering(algo: str, options: dict, p: int) -> None:
    for numel in (0, 1, p - 1, p, p + 1, 37, 101):
        results = _run(algo, options, p, numel)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{algo} {options} P={p} numel={numel}: {errors[0]!r}"
        expected = sum(torch.arange(numel, dtype=torch.float64) * (r + 1) + r for r in range(p))
        for rank, x in enumerate(results):
            assert torch.equal(x, expected), f"{algo} P={p} numel={numel}: rank {rank} wrong"


def test_the_emulator_deadlocks_a_receive_posted_alone_before_a_send() -> None:
    """The emulator is strict enough to catch the old ordering: irecv, then isend, at P = 2."""

    def body(rank: int, transport: object) -> None:
        peer = 1 - rank
        got = torch.empty(3)
        deadline = time.monotonic() + 1.0
        r = transport.irecv(got, peer)  # type: ignore[attr-defined]
        s = transport.isend(torch.ones(3), peer)  # type: ignore[attr-defined]
        transport.wait(r, deadline)  # type: ignore[attr-defined]
        transport.wait(s, deadline)  # type: ignore[attr-defined]

    results = run_threads(2, body, 2.0)
    assert all(isinstance(r, CommTimeoutError) for r in results), results


def test_the_emulator_runs_the_same_exchange_posted_together() -> None:
    from ringcomm.transports.base import exchange, recv, send

    def body(rank: int, transport: object) -> torch.Tensor:
        got = torch.empty(3)
        exchange(transport, [recv(got, 1 - rank), send(torch.full((3,), float(rank)), 1 - rank)], time.monotonic() + 2)  # type: ignore[arg-type]
        return got

    results = run_threads(2, body, 2.0)
    assert [r[0].item() for r in results] == [1.0, 0.0]


# --- the other collectives: every algorithm of broadcast, all_gather and reduce_scatter ---

COLLECTIVE_CASES = [
    ("broadcast", "ring", {}),
    ("broadcast", "ring", {"segment_bytes": 8}),  # several segments in flight down the chain
    ("broadcast", "tree", {}),
    ("all_gather", "ring", {}),
    ("all_gather", "rd", {}),
    ("reduce_scatter", "ring", {}),
    ("reduce_scatter", "rhd", {}),
]


def _run_collective(
    collective: str, algo: str, options: dict, p: int, n: int, src: int
) -> list[torch.Tensor | BaseException]:
    """Each rank's output of ``collective`` through the emulator; n numbers per block (per rank)."""
    from ringcomm.algorithms.collectives import COLLECTIVE_ALGOS, POWER_OF_TWO_ONLY

    if (collective, algo) in POWER_OF_TWO_ONLY and p & (p - 1):
        pytest.skip("a power-of-two algorithm")
    spec = COLLECTIVE_ALGOS[collective][algo]
    complete = spec.options(options, p)

    def body(rank: int, transport: object) -> torch.Tensor:
        x = torch.arange(p * n, dtype=torch.float64) * (rank + 1) + rank  # reduce_scatter's input
        if collective == "broadcast":
            output = x[:n].clone() if rank == src else torch.full((n,), -1.0, dtype=torch.float64)
            spec.run(output, output, "sum", src, transport, time.monotonic() + TIMEOUT_S, **complete)
        elif collective == "all_gather":
            output = torch.full((p * n,), -1.0, dtype=torch.float64)
            spec.run(output, x[:n].clone(), "sum", 0, transport, time.monotonic() + TIMEOUT_S, **complete)
        else:
            before = x.clone()
            output = torch.empty(n, dtype=torch.float64)
            spec.run(output, x, "sum", 0, transport, time.monotonic() + TIMEOUT_S, **complete)
            assert torch.equal(x, before), f"rank {rank}: reduce_scatter changed its input"
        return output

    return run_threads(p, body, TIMEOUT_S)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("collective, algo, options", COLLECTIVE_CASES, ids=[f"{c}-{a}-{o}" for c, a, o in COLLECTIVE_CASES])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_every_collective_completes_under_nccl_ordering(collective: str, algo: str, options: dict, p: int) -> None:
    """Sends and receives of a step posted as one group: no collective deadlocks under NCCL's ordering,
    and each ends with torch's result (all_gather_into_tensor, reduce_scatter_tensor, broadcast)."""
    for n in (0, 1, 3, 37):
        src = p - 1  # not rank 0: the chain and the tree start elsewhere
        results = _run_collective(collective, algo, options, p, n, src)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{collective} {algo} {options} P={p} n={n}: {errors[0]!r}"
        inputs = [torch.arange(p * n, dtype=torch.float64) * (r + 1) + r for r in range(p)]
        for rank, out in enumerate(results):
            if collective == "broadcast":
                expected = inputs[src][:n]
            elif collective == "all_gather":
                expected = torch.cat([inputs[r][:n] for r in range(p)])
            else:
                expected = sum(inputs)[rank * n : (rank + 1) * n]
            assert torch.equal(out, expected), f"{collective} {algo} P={p} n={n}: rank {rank} wrong"
