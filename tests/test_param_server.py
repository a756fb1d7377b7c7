"""The parameter server all-reduce (``algo="ps"``), read as a specification.

1. The grid: world sizes 1..5 x sizes (0, 1, P-1, P, P+1, 1000, 2**20+3) x dtypes
   x ops, for a central server (k = 1, at rank 0 and at rank P-1) and sharded
   (k = 2, k = P), against a float64 reference every rank computes on its own;
   and every rank ends with the same bytes.
2. How data moves: a central server receives P-1 pushes and sends P-1 results,
   a worker sends one message and receives one; sharded, every message is a
   push of one shard to its server or a pull of it back.
3. Bad ``ps_rank`` / ``ps_shards`` raise ValueError before any message moves,
   the tensor untouched, and the next all_reduce still works.
4. A server whose worker never comes raises CommTimeoutError naming that worker.

The pooled world of P (``pool.run_pooled``: started once per session, shared with
the other modules) runs the grid in one call, and the counts and the bad options
(the quick tier) in another; the timeout test has a world of its own. Each rank returns failure strings per group and
each test asserts its group is empty.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from grid import world_sizes
from pool import run_pooled
from traffic import count_from_zero  # tests/traffic.py

import ringcomm
from ringcomm.algorithms.chunks import chunk_bounds
from ringcomm.tools.spawn import run_world

WORLD_SIZES = (1, 2, 3, 4, 5)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64)
BIG = 2**20 + 3  # large and odd; run only for BIG_DTYPES x BIG_OPS to keep the grid fast
BIG_DTYPES = (torch.float32, torch.float16, torch.int64)
BIG_OPS = ("sum", "max")
TIMEOUT_S = 240.0  # for a whole spawned world, on a loaded 2-core machine


# --- what each rank computes on its own -------------------------------------------------


def ps_configs(p: int) -> list[dict[str, object]]:
    """Server placements to test in a world of ``p``: central at 0 and at P-1, k = 2, k = P; and the
    overlapped form, central and sharded (its segment is set per case, about a fifth of the tensor)."""
    configs: list[dict[str, object]] = [{"ps_rank": 0, "ps_shards": 1}]
    if p >= 2:
        configs.append({"ps_rank": p - 1, "ps_shards": 1})  # rank 0's push is not the server's own
        configs.append({"ps_rank": 1, "ps_shards": 2})
        configs.append({"ps_rank": p - 1, "ps_shards": 1, "ps_overlap": True})
        configs.append({"ps_rank": 1, "ps_shards": 2, "ps_overlap": True})
    if p >= 3:
        configs.append({"ps_rank": p // 2, "ps_shards": p})  # server ranks wrap around past P-1
    return configs


def grid_cases(p: int) -> list[tuple[int, torch.dtype, str]]:
    """(numel, dtype, op) for every grid case of a world of ``p``, in the same order on all ranks."""
    cases = []
    for numel in sorted({0, 1, p - 1, p, p + 1, 1000, BIG}):
        for dtype in DTYPES:
            ops = ("sum", "avg", "max", "min") if dtype.is_floating_point else ("sum", "max", "min")
            for op in ops:
                if numel == BIG and (dtype not in BIG_DTYPES or op not in BIG_OPS):
                    continue
                cases.append((numel, dtype, op))
    return cases


def make_input(case: int, rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s input for grid case ``case``: any rank can regenerate any rank's input."""
    gen = torch.Generator().manual_seed(1_000_003 * case + rank)
    if dtype.is_floating_point:
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        return torch.randn(numel, generator=gen, dtype=wide).mul_(4).to(dtype)
    return torch.randint(-1000, 1000, (numel,), generator=gen, dtype=dtype)


def reference(
    case: int, p: int, numel: int, dtype: torch.dtype, op: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 result of ``op`` over all ranks' inputs, and the sum of |inputs| (error scale)."""
    ref = make_input(case, 0, numel, dtype).double()
    scale = ref.abs()
    for rank in range(1, p):
        x = make_input(case, rank, numel, dtype).double()
        scale.add_(x.abs())
        if op in ("sum", "avg"):
            ref.add_(x)
        elif op == "max":
            torch.maximum(ref, x, out=ref)
        else:
            torch.minimum(ref, x, out=ref)
    if op == "avg":
        ref.div_(p)
        scale.div_(p)
    return ref, scale


def check_close(result: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, p: int, op: str) -> str:
    """'' if ``result`` matches the float64 reference, else what is wrong.

    max, min and integer sums are exact. A floating sum of P terms rounds P-1
    times (and avg once more), each by at most eps times the partial sum, so
    |result - ref| <= (P+1) * eps * sum|x_i| (divided by P for avg).
    """
    got = result.double()
    if op in ("max", "min") or not result.dtype.is_floating_point:
        bad = got != ref
        tol = None
    else:
        finfo = torch.finfo(result.dtype)
        tol = (p + 1) * finfo.eps * scale + finfo.tiny
        bad = (got - ref).abs() > tol
    if not bool(bad.any()):
        return ""
    i = int(bad.nonzero()[0])
    where = f"first at [{i}]: got {got[i].item()!r}, want {ref[i].item()!r}"
    if tol is not None:
        where += f" (tolerance {tol[i].item():.3g})"
    return f"{int(bad.sum())} of {result.numel()} elements wrong, {where}"


def digest(tensor: torch.Tensor) -> bytes:
    """A hash of the tensor's raw bytes, to compare results across ranks bitwise."""
    return hashlib.sha1(tensor.contiguous().view(torch.uint8).numpy().tobytes()).digest()


# --- the rank functions (module level: run_world spawns them) ---------------------------


def _rank_grid(rank: int, p: int) -> list[str]:
    failures: list[str] = []
    digests: list[tuple[str, bytes]] = []
    for case, (numel, dtype, op) in enumerate(grid_cases(p)):
        mine = make_input(case, rank, numel, dtype)
        ref, scale = reference(case, p, numel, dtype, op)
        for config in ps_configs(p):
            if config.get("ps_overlap"):  # several segments per shard, whatever the size
                config = {**config, "ps_segment_bytes": max(8, numel * mine.element_size() // 5)}
            name = f"P={p} numel={numel} {dtype} op={op} {config}"
            tensor = mine.clone()
            out = ringcomm.all_reduce(tensor, op=op, algo="ps", timeout=TIMEOUT_S / 2, **config)
            if out is not tensor:
                failures.append(f"rank {rank} {name}: all_reduce returned a different tensor")
            if tensor.dtype != dtype or tensor.shape != (numel,):
                failures.append(f"rank {rank} {name}: result is {tensor.dtype} {tuple(tensor.shape)}")
                continue
            wrong = check_close(tensor, ref, scale, p, op)
            if wrong:
                failures.append(f"rank {rank} {name}: {wrong}")
            digests.append((name, digest(tensor)))
    # Bitwise agreement: every rank's bytes equal rank 0's, case by case. The digests
    # travel as a uint8 tensor (no pickled objects over the network, not even in tests).
    mine = torch.tensor([list(d) for _, d in digests], dtype=torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(p)]
    dist.all_gather(everyone, mine)
    for (name, _), theirs, ours in zip(digests, everyone[0], mine):
        if not torch.equal(theirs, ours):
            failures.append(f"rank {rank} {name}: bytes differ from rank 0's")
    return failures


def expected_traffic(p: int, numel: int, ps_rank: int, shards: int, itemsize: int) -> list[dict]:
    """Per rank: the messages and bytes a parameter server all-reduce should move.

    Every non-empty shard j, served by rank s = (ps_rank + j) % P, costs one push
    w -> s and one pull s -> w for every other rank w; nothing else travels.
    """
    sends_to = [Counter() for _ in range(p)]
    recvs_from = [Counter() for _ in range(p)]
    sent_bytes = [0] * p
    for j, (_, n) in enumerate(chunk_bounds(numel, shards)):
        server = (ps_rank + j) % p
        for worker in range(p):
            if n == 0 or worker == server:
                continue
            for src, dst in ((worker, server), (server, worker)):  # push, then pull
                sends_to[src][dst] += 1
                recvs_from[dst][src] += 1
                sent_bytes[src] += n * itemsize
    return [
        {
            "sent_msgs": sum(sends_to[r].values()),
            "recv_msgs": sum(recvs_from[r].values()),
            "sent_bytes": sent_bytes[r],
            "recv_bytes": sent_bytes[r],  # each rank gets back as much as it sends
            "sends_to": dict(sends_to[r]),
            "recvs_from": dict(recvs_from[r]),
        }
        for r in range(p)
    ]


def _traffic(stats: ringcomm.transports.base.TransportStats) -> dict:
    return {
        "sent_msgs": stats.sent_msgs,
        "recv_msgs": stats.recv_msgs,
        "sent_bytes": stats.sent_bytes,
        "recv_bytes": stats.recv_bytes,
        "sends_to": dict(stats.sends_to),
        "recvs_from": dict(stats.recvs_from),
    }


def _rank_counts(rank: int, p: int) -> list[str]:
    failures: list[str] = []
    stats = ringcomm.init("torch").stats
    numel = 1000 * p + 3  # >= P, and not a multiple of any k

    # The central server, spelled out: P-1 pushes in, P-1 results out; a worker, one each way.
    for server in (0, p - 1):
        count_from_zero(stats)
        ringcomm.all_reduce(torch.ones(numel), algo="ps", ps_rank=server, timeout=TIMEOUT_S / 2, check=False)
        got = _traffic(stats)
        others = {peer: 1 for peer in range(p) if peer != server}
        if rank == server:
            want = {"sent_msgs": p - 1, "recv_msgs": p - 1, "sends_to": others, "recvs_from": others}
        else:
            want = {"sent_msgs": 1, "recv_msgs": 1, "sends_to": {server: 1}, "recvs_from": {server: 1}}
        want.update(sent_bytes=want["sent_msgs"] * numel * 4, recv_bytes=want["recv_msgs"] * numel * 4)
        if got != want:
            failures.append(f"rank {rank} ps_rank={server} k=1: traffic {got}, want {want}")

    # Sharded, and with fewer elements than shards (empty shards send nothing).
    for size, ps_rank, shards in ((numel, 1, 2), (numel, p - 1, p), (numel, 0, p - 1), (1, 2 % p, p)):
        count_from_zero(stats)
        tensor = torch.ones(size, dtype=torch.float64)
        ringcomm.all_reduce(
            tensor, algo="ps", ps_rank=ps_rank, ps_shards=shards, timeout=TIMEOUT_S / 2, check=False
        )
        got = _traffic(stats)
        want = expected_traffic(p, size, ps_rank, shards, 8)[rank]
        if got != want:
            failures.append(
                f"rank {rank} numel={size} ps_rank={ps_rank} k={shards}: traffic {got}, want {want}"
            )
        if not torch.equal(tensor, torch.full((size,), float(p), dtype=torch.float64)):
            failures.append(f"rank {rank} numel={size} ps_rank={ps_rank} k={shards}: wrong sum")
    return failures


def _rank_overlapped_counts(rank: int, p: int) -> list[str]:
    """Overlapped, central server: segment s is pushed and pulled on its own, S segments per shard."""
    failures: list[str] = []
    stats = ringcomm.init("torch").stats
    numel, seg_elems = 1000 * p + 3, 250
    segments = -(-numel // seg_elems)
    count_from_zero(stats)
    x = torch.ones(numel)
    ringcomm.all_reduce(x, algo="ps", ps_overlap=True, ps_segment_bytes=seg_elems * 4, timeout=TIMEOUT_S / 2, check=False)
    got = _traffic(stats)
    others = {peer: segments for peer in range(p) if peer != 0}
    if rank == 0:
        want = {"sent_msgs": (p - 1) * segments, "sends_to": others, "recvs_from": others}
    else:
        want = {"sent_msgs": segments, "sends_to": {0: segments}, "recvs_from": {0: segments}}
    got_part = {k: got[k] for k in want}
    # every rank gets back as many messages and bytes as it sends
    if got_part != want or (got["recv_msgs"], got["recv_bytes"]) != (got["sent_msgs"], got["sent_bytes"]):
        failures.append(f"rank {rank} overlapped: traffic {got}, want {want}")
    if not torch.equal(x, torch.full((numel,), float(p))):
        failures.append(f"rank {rank} overlapped: wrong sum")
    return failures


def _rank_bad_options(rank: int, p: int) -> list[str]:
    failures: list[str] = []
    stats = ringcomm.init("torch").stats
    bad_options = [
        ({"ps_shards": 0}, "ps_shards=0"),
        ({"ps_shards": p + 1}, f"ps_shards={p + 1}"),
        ({"ps_shards": -1}, "ps_shards=-1"),
        ({"ps_shards": 2.0}, "ps_shards=2.0"),
        ({"ps_shards": True}, "ps_shards=True"),
        ({"ps_rank": -1}, "ps_rank=-1"),
        ({"ps_rank": p}, f"ps_rank={p}"),
        ({"ps_rank": p, "ps_shards": 2}, f"ps_rank={p}"),
    ]
    for options, named in bad_options:
        tensor = torch.arange(10, dtype=torch.float32) + rank
        before = tensor.clone()
        count_from_zero(stats)
        try:
            ringcomm.all_reduce(tensor, algo="ps", timeout=30.0, **options)
            failures.append(f"rank {rank} {options}: no ValueError")
        except ValueError as exc:
            for part in (named, f"P={p}"):
                if part not in str(exc):
                    failures.append(f"rank {rank} {options}: message {str(exc)!r} does not name {part!r}")
        if not torch.equal(tensor, before):
            failures.append(f"rank {rank} {options}: tensor changed")
        if stats.sent_msgs or stats.recv_msgs:
            failures.append(f"rank {rank} {options}: {stats.sent_msgs} sends, {stats.recv_msgs} receives")
    # Nothing was half-sent: a valid call right after gets exactly its own messages.
    tensor = torch.arange(10, dtype=torch.float32) + rank
    ringcomm.all_reduce(tensor, algo="ps", ps_shards=p, timeout=30.0)
    want = torch.arange(10, dtype=torch.float32) * p + p * (p - 1) / 2
    if not torch.equal(tensor, want):
        failures.append(f"rank {rank}: valid all_reduce after the errors gave {tensor.tolist()}")
    return failures


def _rank_timeout(rank: int, p: int) -> list[str]:
    """Rank 0 serves; rank 1 never pushes. Rank 0 must time out naming rank 1."""
    failures: list[str] = []
    ringcomm.init()  # collective: both ranks make the transport before rank 1 stays away
    if rank == 0:
        start = time.monotonic()
        try:
            ringcomm.all_reduce(torch.ones(8), algo="ps", timeout=1.0)
            failures.append("rank 0: no CommTimeoutError although rank 1 never pushed")
        except ringcomm.CommTimeoutError as exc:
            if exc.peer != 1 or "peer rank 1" not in str(exc):
                failures.append(f"rank 0: timeout names the wrong peer: {exc}")
        elapsed = time.monotonic() - start
        if not 0.5 < elapsed < 30:
            failures.append(f"rank 0: timed out after {elapsed:.1f} s, want about 1 s")
    dist.barrier()  # on the default group: rank 1 waits here, away from ringcomm's group
    return failures


# --- the tests ------------------------------------------------------------------------


def _rank_grid_group(rank: int, p: int) -> dict[str, list[str]]:
    return {"grid": _rank_grid(rank, p)}


def _rank_message_groups(rank: int, p: int) -> dict[str, list[str]]:
    """The quick groups (a world of one returns before the algorithm runs: it has none)."""
    return {
        "counts": _rank_counts(rank, p) + _rank_overlapped_counts(rank, p),
        "bad_options": _rank_bad_options(rank, p),
    }


#: the function that checks each group; its world checks every group of that function at once
_GROUPS = {"grid": _rank_grid_group, "counts": _rank_message_groups, "bad_options": _rank_message_groups}
_WORLDS: dict[tuple[int, str], list[dict[str, list[str]]] | BaseException] = {}


def _failures(p: int, group: str) -> list[str]:
    """The failures of ``group`` in the pooled world of ``p`` (``pool.run_pooled``, shared with the
    other modules), checked on first use together with the groups of the same function."""
    fn = _GROUPS[group]
    if (p, fn.__name__) not in _WORLDS:
        try:
            _WORLDS[p, fn.__name__] = run_pooled(fn, p, timeout=TIMEOUT_S)
        except Exception as exc:  # a crashed world fails every test that reads it, without a rerun
            _WORLDS[p, fn.__name__] = exc
    reports = _WORLDS[p, fn.__name__]
    if isinstance(reports, BaseException):
        raise reports
    return [line for report in reports for line in report[group]]


def _assert_none(failures: list[str]) -> None:
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:30])


@pytest.mark.parametrize("p", WORLD_SIZES)
def test_grid_matches_float64_reference_and_ranks_agree_bitwise(p: int) -> None:
    _assert_none(_failures(p, "grid"))


@pytest.mark.parametrize("p", world_sizes(WORLD_SIZES[1:], quick=(3, 4)))
def test_each_message_is_one_push_or_one_pull(p: int) -> None:
    _assert_none(_failures(p, "counts"))


@pytest.mark.parametrize("p", world_sizes(WORLD_SIZES[1:], quick=(3, 4)))
def test_bad_options_raise_before_any_message(p: int) -> None:
    _assert_none(_failures(p, "bad_options"))


def test_absent_worker_times_out_naming_it() -> None:
    _assert_none([line for per_rank in run_world(_rank_timeout, 2, timeout=TIMEOUT_S) for line in per_rank])
