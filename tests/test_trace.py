"""launch.py --trace: a Chrome trace with, per rank, compute spans, each bucket's all_reduce on the comm
thread, and every ring message."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from procs import run  # a child's own children stopped too

from ringcomm.runtime import trace

ROOT = Path(__file__).resolve().parents[1]


def test_a_short_traced_run_yields_the_expected_events_per_rank(tmp_path: Path) -> None:
    p, steps = 2, 3
    trace_file = tmp_path / "trace.json"
    cmd = [sys.executable, "launch.py", "--algo", "ring", "--world-size", str(p), "--dataset", "synthetic",
           "--synthetic-size", "640", "--max-steps", "5", "--eval-batches", "1", "--out", str(tmp_path),
           "--trace", str(trace_file), "--trace-steps", str(steps)]  # fmt: skip
    done = run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    events = json.loads(trace_file.read_text())["traceEvents"]
    assert not list(tmp_path.glob("trace.json.rank*")), "per-rank parts were not cleaned up"
    spans = [e for e in events if e["ph"] == "X"]
    assert all(e["dur"] >= 0 and e["ts"] > 0 for e in spans)
    for rank in range(p):
        mine = Counter((e["cat"], e["name"]) for e in spans if e["pid"] == rank)
        for phase in ("forward", "backward", "optimizer"):
            assert mine[("compute", phase)] == steps, (rank, phase, mine)
        lanes = {
            e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["pid"] == rank and "tid" in e
        }
        buckets = [e for e in spans if e["pid"] == rank and e["cat"] == "all_reduce"]
        assert len(buckets) >= steps  # one all_reduce per bucket, at least one bucket per step
        assert {lanes[e["tid"]] for e in buckets} == {"comm thread"}  # DDP's hook: ringcomm's thread
        sends = [e for e in spans if e["pid"] == rank and e["cat"] == "ring.send"]
        # 2(P-1) ring messages per bucket (segments of 4 MiB: simplecnn's buckets are smaller)
        assert len(sends) == 2 * (p - 1) * len(buckets)
        assert {e["args"]["peer"] for e in sends} == {(rank + 1) % p}
    # ranks line up on one clock. Causality says so whatever the load: a rank's k-th all_reduce needs
    # every peer's data, sent inside that peer's k-th all_reduce, so it cannot end before any peer's
    # k-th began. (A gap between the ranks' first forwards, once checked under a second, reached
    # 1.08 s on a busy 2-core machine: a rank may lag, the clock is still one.)
    per_rank = [
        sorted((e for e in spans if e["pid"] == r and e["cat"] == "all_reduce"), key=lambda e: e["ts"])
        for r in range(p)
    ]
    for k in range(min(map(len, per_rank))):
        latest_start = max(mine[k]["ts"] for mine in per_rank)
        for r, mine in enumerate(per_rank):
            ended = mine[k]["ts"] + mine[k]["dur"]
            assert ended >= latest_start, f"rank {r}'s all_reduce {k} ended before a peer's began"


@pytest.mark.fast
def test_dump_takes_its_copy_under_the_lock_that_add_holds(tmp_path: Path) -> None:
    """The comm thread may add events (and lanes) while the trainer dumps; dump used to iterate
    the live list and dict ("dictionary changed size during iteration")."""
    from ringcomm.runtime.trace import Tracer

    tracer = Tracer(0)
    tracer.add("forward", "compute", 0, 10, "main")
    path = tmp_path / "rank0.json"
    dump = threading.Thread(target=tracer.dump, args=(str(path),), daemon=True)
    with tracer._lock:  # an add in progress on another thread
        dump.start()
        dump.join(0.3)
        assert dump.is_alive() and not path.exists(), "dump read the events while an add held the lock"
    dump.join(5)
    events = json.loads(path.read_text())["traceEvents"]
    assert [e["name"] for e in events] == ["process_name", "thread_name", "forward"]


class _Arrived:
    """A transport whose every receive has already arrived: peer r's message is r + 1 everywhere."""

    rank, world_size, device_type = 0, 3, "cpu"

    def __init__(self) -> None:
        from ringcomm.transports.base import TransportStats

        self.stats = TransportStats()

    def post(self, messages: list) -> list:
        from ringcomm.transports.base import Pending

        for m in messages:
            if m.kind == "recv":
                m.tensor.fill_(m.peer + 1)
        return [Pending("send" if m.kind == "send" else "recv", m.peer, None) for m in messages]

    def wait(self, pending: object, deadline: float) -> None:
        pass


@pytest.mark.fast
def test_a_reduce_shows_the_values_it_was_applied_to_not_those_at_its_post() -> None:
    # A server posts the reduces of two workers into one accumulator together; the second is
    # applied to the first's result. Its "before" used to be read at the post, before either.
    from ringcomm.transports.base import recv_reduce

    tracer = trace.Tracer(0, values=True)
    acc = torch.zeros(2)
    traced = trace.TracedTransport(_Arrived(), tracer, acc, "ps", [("all", 0, 2)])
    first, second = traced.post([recv_reduce(acc, 1, 4, "sum"), recv_reduce(acc, 2, 4, "sum")])
    traced.wait(first, time.monotonic() + 5)
    traced.wait(second, time.monotonic() + 5)
    events = [e["args"] for e in tracer.events]
    assert [(e["before"], e["values"], e["after"]) for e in events] == [
        ([0.0, 0.0], [2.0, 2.0], [2.0, 2.0]),
        ([2.0, 2.0], [3.0, 3.0], [5.0, 5.0]),
    ]


def _traced_collectives_rank(rank: int, p: int, _: int) -> dict:
    import ringcomm

    tracer = trace.enable(rank, values=True)
    x = torch.arange(4.0) + 10 * rank
    out = torch.empty(2)
    ringcomm.reduce_scatter(out, x, algo="ring", timeout=60)
    gathered = torch.empty(8)
    ringcomm.all_gather(gathered, x, algo="ring", timeout=60)
    trace.disable()
    messages = [(e["cat"], e["args"]) for e in tracer.events if "kind" in e["args"]]
    return {"messages": messages, "input": x.tolist()}


def test_reduce_scatter_and_all_gather_record_each_message_placed_in_what_it_moves() -> None:
    """Both used to record a span and no message; reduce_scatter's would have no place (its copy
    of the input was made out of the tracer's sight)."""
    from ringcomm.tools.spawn import run_world

    p = 2
    for rank, got in enumerate(run_world(_traced_collectives_rank, p, (p,), timeout=120)):
        assert got["input"] == [10.0 * rank + i for i in range(4)]  # reduce_scatter left it as it was
        by_cat = Counter(cat for cat, _ in got["messages"])
        assert by_cat == {"ring.send": 2, "ring.recv": 2}, by_cat  # P-1 = 1 of each per collective
        reduce_scatter, all_gather = got["messages"][:2], got["messages"][2:]
        for _, args in reduce_scatter:  # in the input's copy: block (rank + 1) % P goes out, block rank comes in
            assert args["start"] == 2 * (rank if args["kind"] == "reduce" else (rank + 1) % p), args
            assert args["part"] == f"b{args['start'] // 2}"
        for _, args in all_gather:  # in the output: rank's own block goes out, the other's comes in
            assert args["start"] == 4 * (rank if args["kind"] == "send" else (rank + 1) % p), args
            assert args["values"] == [10.0 * (args["start"] // 4) + i for i in range(4)]
