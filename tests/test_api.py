"""ringcomm.all_reduce's contract: bad input refused before any communication, timeouts named."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest
import torch
from pool import run_pooled

import ringcomm
from ringcomm.algorithms.chunks import chunk_bounds, chunk_sizes
from ringcomm.tools.spawn import run_world


@pytest.mark.fast
@pytest.mark.parametrize("numel", [0, 1, 3, 4, 5, 10, 1000, 2**20 + 3])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 5, 7])
def test_chunks_cover_the_tensor_with_sizes_differing_by_at_most_one(numel: int, parts: int) -> None:
    bounds = chunk_bounds(numel, parts)
    assert len(bounds) == parts
    assert [s for s, _ in bounds] == [sum(chunk_sizes(numel, parts)[:i]) for i in range(parts)]
    assert sum(n for _, n in bounds) == numel
    sizes = [n for _, n in bounds]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


BAD_CALLS = [
    (dict(op="prod"), "unknown op 'prod'"),
    (dict(algo="tree"), "unknown algo 'tree'"),
    (dict(transport="mpi"), "unknown transport 'mpi'"),
    (dict(timeout=0), "timeout must be a positive"),
    (dict(timeout=-1.0), "timeout must be a positive"),
    (dict(timeout=True), "timeout=True is a bool, not a number of seconds"),  # it used to mean 1 s
    (dict(timeout=float("nan")), "timeout must be a positive"),
    (dict(check="no"), "check must be True, False or None"),  # bool("no") is True
    (dict(check=0), "check must be True, False or None"),
    (dict(op=["sum"]), "op must be a string"),  # it was a TypeError (unhashable), never published
]


@pytest.mark.fast
@pytest.mark.parametrize("kwargs, message", BAD_CALLS)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs: dict, message: str) -> None:
    x = torch.arange(6.0)
    with pytest.raises(ValueError, match=message):
        ringcomm.all_reduce(x, **kwargs)
    assert torch.equal(x, torch.arange(6.0))


@pytest.mark.fast
@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.uint8, torch.int8])
def test_unsupported_dtype_is_named(dtype: torch.dtype) -> None:
    x = torch.zeros(4, dtype=dtype)
    with pytest.raises(ValueError, match=f"unsupported tensor dtype {dtype}"):
        ringcomm.all_reduce(x)


@pytest.mark.fast
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_avg_on_integers_is_refused(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="op='avg' on an integer tensor"):
        ringcomm.all_reduce(torch.ones(3, dtype=dtype), "avg")


@pytest.mark.fast
def test_not_a_tensor() -> None:
    with pytest.raises(ValueError, match="expects a torch.Tensor, got list"):
        ringcomm.all_reduce([1.0, 2.0])


@pytest.mark.fast
def test_without_process_group_says_what_to_call() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        ringcomm.all_reduce(torch.ones(3))


@pytest.mark.fast
def test_a_numpy_number_is_a_timeout() -> None:
    np = pytest.importorskip("numpy")
    with pytest.raises(RuntimeError, match="init_process_group"):  # past the argument checks
        ringcomm.all_reduce(torch.ones(3), timeout=np.float32(2.5))
    with pytest.raises(ValueError, match="is a bool"):
        ringcomm.all_reduce(torch.ones(3), timeout=np.bool_(True))


OVERLAPPING = [
    (lambda: torch.zeros(1).expand(8), r"shape \[8\], stride \[0\]\) is expanded"),
    (lambda: torch.zeros(3, 1).expand(3, 4), r"shape \[3, 4\], stride \[1, 0\]\) is expanded"),
    (lambda: torch.zeros(5).as_strided((4, 2), (1, 1)), r"overlaps itself: its 8 elements occupy 5 places"),
    (lambda: torch.zeros(13).as_strided((3, 2, 2), (2, 3, 5)), r"overlaps itself: its 12 elements occupy 10 "),
]


@pytest.mark.fast
@pytest.mark.parametrize("make, message", OVERLAPPING)
def test_a_tensor_whose_elements_share_memory_is_refused_up_front(make, message: str) -> None:
    """They used to be reduced through a contiguous copy, and then the write-back failed (or kept
    one of the aliased results) after the peers had finished."""
    with pytest.raises(ValueError, match=message):
        ringcomm.all_reduce(make())


@pytest.mark.fast
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(4, 6).t(),  # transposed
        lambda: torch.zeros(10)[::3],  # a slice with a step
        lambda: torch.zeros(8).as_strided((3, 2), (2, 3)),  # interleaved strides, offsets 0,2,3,4,5,7
        lambda: torch.zeros(1, 5).expand(1, 5),  # stride 0 on a dimension of size 1
        lambda: torch.zeros(0, 1).expand(0, 3),
    ],
    ids=["transposed", "stepped", "interleaved", "size-1-expand", "empty"],
)
def test_a_strided_tensor_whose_elements_are_distinct_passes_the_checks(make) -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):  # refused only for want of a world
        ringcomm.all_reduce(make())


def _bad_input_in_a_world_rank(rank: int, p: int) -> list[str]:
    """Every bad call is refused on every rank with the tensor untouched; the world still works after."""
    failures = []
    bad = [
        (torch.ones(5, dtype=torch.int64), dict(op="avg")),
        (torch.zeros(5, dtype=torch.bool), {}),
        (torch.ones(5), dict(op="prod")),
        (torch.ones(5), dict(algo="nope")),
        (torch.empty(5, device="meta"), {}),
        (torch.ones(5), dict(transport="carrier-pigeon")),
    ]
    for tensor, kwargs in bad:
        before = tensor.clone() if tensor.device.type != "meta" else None
        try:
            ringcomm.all_reduce(tensor, **kwargs)
            failures.append(f"rank {rank}: {kwargs} {tensor.dtype} {tensor.device} accepted")
        except ValueError:
            pass
        if before is not None and not torch.equal(tensor, before):
            failures.append(f"rank {rank}: {kwargs} modified the tensor")
    x = torch.full((7,), float(rank))
    ringcomm.all_reduce(x)  # nothing was half-sent: the next collective matches up
    if not torch.equal(x, torch.full((7,), float(sum(range(p))))):
        failures.append(f"rank {rank}: all_reduce after refused calls gave {x.tolist()}")
    return failures


def test_bad_input_in_a_world_is_refused_and_loses_nothing() -> None:
    failures = run_pooled(_bad_input_in_a_world_rank, 2, timeout=120)
    assert not [f for r in failures for f in r]


def _one_rank_refuses_rank(rank: int, p: int) -> dict:
    """Rank 1 makes a call it refuses, the others a good one, five times over; then all a good one."""
    ringcomm.init("torch")
    bad = {
        "op-list": lambda: ringcomm.all_reduce(torch.ones(8), op=["sum"], timeout=60),
        "timeout-bool": lambda: ringcomm.all_reduce(torch.ones(8), timeout=True),
        "check-text": lambda: ringcomm.all_reduce(torch.ones(8), check="no", timeout=60),
        "expanded": lambda: ringcomm.all_reduce(torch.ones(1).expand(8), timeout=60),
        "overlapping": lambda: ringcomm.all_reduce(torch.ones(5).as_strided((4, 2), (1, 1)), timeout=60),
        "async-op-list": lambda: ringcomm.all_reduce_async(torch.ones(8), op=["sum"], timeout=60),
    }
    out: dict = {}
    for name, call in bad.items():
        start = time.monotonic()
        try:
            if rank == 1:
                call()
            else:
                ringcomm.all_reduce(torch.ones(8), timeout=60)
            out[name] = ("returned", "", time.monotonic() - start)
        except Exception as exc:
            out[name] = (type(exc).__name__, str(exc), time.monotonic() - start)
    # the world is still in step: an interleaved (non-overlapping) view is reduced in place
    x = torch.zeros(8).as_strided((3, 2), (2, 3)).fill_(float(rank))
    ringcomm.all_reduce(x, timeout=60)
    out["after"] = x.tolist()
    return out


def test_any_refusal_on_one_rank_is_told_to_the_others_at_once_with_its_reason() -> None:
    """A TypeError (op=["sum"]) used to go unpublished: the others waited for rank 1 until it died,
    or paired their call with its next one. timeout=True was taken as 1 s."""
    p = 3
    results = run_pooled(_one_rank_refuses_rank, p, timeout=240)
    reasons = {
        "op-list": "op must be a string",
        "timeout-bool": "timeout=True is a bool",
        "check-text": "check must be True, False or None",
        "expanded": "shape [8], stride [0]) is expanded",
        "overlapping": "shape [4, 2], stride [1, 1]) overlaps itself",
        "async-op-list": "op must be a string",
    }
    for rank, out in enumerate(results):
        for name, reason in reasons.items():
            kind, message, seconds = out[name]
            if rank == 1:
                assert kind == "ValueError" and reason in message, (name, out[name])
            else:
                assert kind == "MismatchError", (rank, name, out[name])
                assert f"rank {rank}: ranks [1] refused this all_reduce (rank 1: ValueError: " in message
                assert reason in message, (rank, name, message)
                assert seconds < 30, f"rank {rank} heard of rank 1's refusal only after {seconds:.1f} s"
        assert out["after"] == [[float(sum(range(p)))] * 2] * 3


def _silent_peer_rank(rank: int, p: int, algo: str) -> dict:
    """Rank 1 makes the same call (the same-call check passes) and then goes silent inside the
    algorithm: it sends nothing until rank 0 has given up. Rank 0 must time out *in the algorithm*,
    waiting on rank 1's data, not earlier (a peer that never calls fails the check or the board)."""
    import dataclasses

    import torch.distributed as dist

    from ringcomm.algorithms.registry import ALGOS

    store = dist.distributed_c10d._get_default_store()
    gave_up = "tests/rank-0-gave-up"  # a key of the test's own, beside ringcomm's
    ringcomm.init("torch")
    result: dict = {}
    if rank == 0:
        t0 = time.monotonic()
        try:
            ringcomm.all_reduce(torch.ones(1000), algo=algo, timeout=1.5)
            result["error"] = None
        except ringcomm.CommTimeoutError as exc:
            result["error"] = str(exc)
            result["peer"] = exc.peer
        result["elapsed"] = time.monotonic() - t0
        store.set(gave_up, "1")
    else:

        def silent(*args: object, **options: object) -> None:
            result["in the algorithm"] = True
            store.wait([gave_up], timedelta(seconds=30))  # alive (heartbeating), sending nothing

        ALGOS[algo] = dataclasses.replace(ALGOS[algo], run=silent)  # this process only
        try:
            ringcomm.all_reduce(torch.ones(1000), algo=algo, timeout=30)
        except ringcomm.CommError:
            pass  # rank 0's failure may reach this rank's call; what matters is rank 0's error
    # both meet again on the default group to finish
    dist.barrier()
    return result


@pytest.mark.parametrize("algo", ["ring", "ring_simple", "naive"])
def test_a_silent_peer_makes_the_waiting_rank_raise_within_the_timeout(algo: str) -> None:
    result, peer = run_world(_silent_peer_rank, 2, (algo,), timeout=60)
    assert peer.get("in the algorithm"), "rank 1 never reached the algorithm: the test would see only the set-up"
    assert result["error"] is not None, "all_reduce returned although the peer never sent"
    assert "rank 0" in result["error"] and "peer rank 1" in result["error"]
    # names the time it waited: the 1.5 s timeout less the same-call check's round before it
    waited = float(re.search(r"within ([0-9.]+) s", result["error"]).group(1))
    assert 1.0 < waited <= 1.5
    assert result["peer"] == 1
    assert 1.4 <= result["elapsed"] < 1.5 + 3.0


@pytest.mark.fast
def test_an_option_the_algorithm_does_not_take_is_refused() -> None:
    x = torch.ones(3)
    with pytest.raises(ValueError, match="algo='ring' takes no option 'ps_shards'"):
        ringcomm.all_reduce(x, algo="ring", ps_shards=2)
    with pytest.raises(ValueError, match="takes no option 'ps_shard'"):
        ringcomm.all_reduce(x, algo="ps", ps_shard=2)


def _traced_rank(rank: int, p: int, path: str) -> list[dict]:
    from ringcomm.runtime import trace

    trace.enable(rank)
    ringcomm.all_reduce(torch.ones(4 * p), algo="ring_simple")
    trace.get().dump(f"{path}.{rank}")
    trace.enable(rank)
    ringcomm.all_reduce(torch.ones(10), algo="ps", ps_shards=2)
    ringcomm.all_reduce(torch.ones(10), algo="naive")
    labels = {
        e["cat"]: sorted({e["args"].get("part", "") for e in trace.get().events if e["cat"] == e_cat})
        for e_cat in ("ps.send", "naive.send")
        for e in trace.get().events
        if e["cat"] == e_cat
    }
    trace.disable()
    return labels


def test_trace_records_each_ring_message_with_peer_and_chunk(tmp_path) -> None:
    import json

    from ringcomm.runtime import trace

    p = 3
    labels = run_pooled(_traced_rank, p, (str(tmp_path / "t"),), timeout=120)
    # ps messages are labelled by shard (s0, s1), naive's by the whole tensor, not by the ring's chunks
    assert all(per_rank == {"ps.send": ["s0", "s1"], "naive.send": ["all"]} for per_rank in labels), labels
    merged = trace.merge([str(tmp_path / f"t.{r}") for r in range(p)], str(tmp_path / "trace.json"))
    events = [e for e in json.load(open(merged))["traceEvents"] if e["ph"] == "X"]
    for rank in range(p):
        mine = [e for e in events if e["pid"] == rank]
        sends = [e for e in mine if e["cat"] == "ring_simple.send"]
        recvs = [e for e in mine if e["cat"] == "ring_simple.recv"]
        assert len(sends) == len(recvs) == 2 * (p - 1)
        assert {e["args"]["peer"] for e in sends} == {(rank + 1) % p}
        # scatter-reduce step i sends chunk (rank - i), all-gather step i sends chunk (rank + 1 - i)
        expected = [(rank - i) % p for i in range(p - 1)] + [(rank + 1 - i) % p for i in range(p - 1)]
        assert [e["args"]["chunk"] for e in sends] == expected
        assert sum(e["cat"] == "all_reduce" for e in mine) == 1


def _mismatch_rank(rank: int, p: int, transport: str) -> dict:
    ringcomm.init(transport)
    # rank 1 passes more elements, the last rank another dtype: Gloo alone would abort the process
    x = torch.ones(100 + 8 * (rank == 1), dtype=torch.float64 if rank == p - 1 else torch.float32)
    before = x.clone()
    result = {}
    try:
        ringcomm.all_reduce(x, transport=transport, timeout=30)
        result["error"] = None
    except ringcomm.MismatchError as exc:
        result["error"] = str(exc)
    result["untouched"] = torch.equal(x, before)
    y = torch.ones(10)
    ringcomm.all_reduce(y, "avg", algo="ps", transport=transport, timeout=30, check=True)  # still usable
    result["after"] = y.tolist()
    z = torch.ones(10)
    try:  # other options on one rank
        ringcomm.all_reduce(z, algo="ps", ps_shards=1 + (rank == 0), transport=transport, timeout=30)
        result["options_error"] = None
    except ringcomm.MismatchError as exc:
        result["options_error"] = str(exc)
    return result


@pytest.mark.parametrize("transport", ["torch"])
def test_ranks_calling_with_different_numel_or_dtype_all_raise_a_clear_mismatch(transport: str) -> None:
    p = 3
    for rank, result in enumerate(run_pooled(_mismatch_rank, p, (transport,), timeout=120)):
        error = result["error"]
        assert error is not None and f"rank {rank}:" in error
        assert "numel differs: ranks [0, 2] 100; ranks [1] 108" in error
        assert "dtype differs: ranks [0, 1] float32; ranks [2] float64" in error
        assert result["untouched"]
        assert result["after"] == [1.0] * 10
        assert "options differs" in result["options_error"]


@pytest.mark.fast
def test_an_unknown_transport_or_a_device_no_transport_serves_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown transport 'zmqq'; expected one of ") as info:
        ringcomm.init("zmqq")  # it used to be a KeyError
    assert all(repr(name) in str(info.value) for name in ringcomm.transport_names())
    meta = torch.empty(4, device="meta")  # stands in for mps, xla, ...: no transport carries it
    with pytest.raises(ValueError, match=r"transport='torch' carries tensors on cpu, cuda; the tensor is on meta"):
        ringcomm.all_reduce(meta)
    with pytest.raises(ValueError, match="transport='zmq' carries tensors on cpu; the tensor is on meta"):
        ringcomm.all_reduce(meta, transport="zmq")
    with pytest.raises(ValueError, match="carries tensors on cpu, cuda; the tensor is on mps"):
        ringcomm.init("torch", device="mps")


class _FakeWork:
    """A Gloo work whose wait fails at once with the words a timeout uses."""

    def wait(self, timeout: object) -> None:
        raise RuntimeError("Timed out waiting 1ms for recv operation to complete")


@pytest.mark.fast
def test_a_failure_that_says_timed_out_before_the_deadline_is_a_peer_error() -> None:
    """Timeouts are told by our clock, not by the substring "imed out" in the backend's message."""
    from ringcomm.transports.base import Pending
    from ringcomm.transports.torch import TorchTransport

    transport = TorchTransport.__new__(TorchTransport)  # no group needed: the wait is the fake's
    transport.backend, transport.rank, transport.liveness = "gloo", 0, None
    with pytest.raises(ringcomm.PeerError, match="recv with peer rank 1 failed: Timed out waiting"):
        transport.wait(Pending("recv", 1, _FakeWork()), time.monotonic() + 60)
    with pytest.raises(ringcomm.CommTimeoutError):
        transport.wait(Pending("recv", 1, _FakeWork()), time.monotonic() - 1)


@pytest.mark.fast
def test_a_transport_registers_itself_and_the_api_names_none() -> None:
    """all_reduce learns transports from the registry (transport.py), so a new one needs no edit to
    api.py; its device types decide which tensors it takes and which hints an error gives."""
    from ringcomm.api import validate
    from ringcomm.transports.base import _KINDS, register_transport, transport_kind

    never_made = lambda device_type, setup: None  # noqa: E731  (validation never makes one)
    register_transport("test-pigeon", never_made, devices=("meta",))  # type: ignore[arg-type]
    try:
        assert "test-pigeon" in ringcomm.transport_names()
        assert validate("ring", "test-pigeon", "meta", {}, None)[1].name == "test-pigeon"
        with pytest.raises(ValueError, match="the tensor is on meta; transports for meta: test-pigeon"):
            transport_kind("torch").validate_device(torch.device("meta"))
    finally:
        del _KINDS["test-pigeon"]


@pytest.mark.fast
def test_run_async_refuses_what_is_not_a_job_before_queuing_it() -> None:
    with pytest.raises(ValueError, match="run_async expects a function of no arguments, got int"):
        ringcomm.run_async(42)
    with pytest.raises(ValueError, match="what= names the job in errors: expected a string, got int"):
        ringcomm.run_async(lambda: None, what=3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ringcomm.run_async(lambda: None)
