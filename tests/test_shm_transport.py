"""ShmTransport: every algorithm over shared memory, hostile headers, leaks, hosts, a sleeping waiter.

Spawned worlds check the algorithms against the float64 reference with ranks
agreeing bitwise, with the default slots and with tiny ones (every message
streams through its queue in many fragments). In-process pairs (two transports
on threads of this process, sharing a HashStore) check what the receiver does
with hostile bytes written into its queue: ``FrameError`` naming the peer and
the field, the tensor untouched, no crash.
"""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from grid import BIG, check_grid, world_sizes
from hypothesis import given, settings
from hypothesis import strategies as st
from pool import run_pooled
from traffic import count_from_zero  # tests/traffic.py

import ringcomm
from ringcomm.errors import CommTimeoutError, FrameError
from ringcomm.tools.spawn import loopback_store, run_world
from ringcomm.transports.base import exchange, recv, recv_reduce, send
from ringcomm.transports.segments import _SEGMENT_NAME, SHM_DIR, _pid_namespace
from ringcomm.transports.shm import _HEADER, ShmTransport

WORLD_TIMEOUT_S = 240


def _ours(pids: list[int]) -> list[str]:
    """The segments in /dev/shm made by these processes (their names carry the creator's pid);
    never the whole of /dev/shm: other users and other tests share it."""
    names = ((n, _SEGMENT_NAME.fullmatch(n)) for n in os.listdir(SHM_DIR))
    return sorted(n for n, m in names if m and int(m.group(1)) == _pid_namespace() and int(m.group(2)) in pids)


# --- every algorithm, the correctness grid of test_ring, over shm ---


def _grid_rank(rank: int, p: int) -> list[str]:
    failures = []
    for algo in ringcomm.ALGOS:
        failures += check_grid(rank, p, algo, "shm")
    transport = ringcomm.init("shm")
    x = torch.ones(10 * p)
    count_from_zero(transport.stats)
    ringcomm.all_reduce(x, algo="ring", transport="shm")
    s = transport.stats
    if p > 1 and (s.sent_msgs, s.recv_msgs, s.sends_to) != (2 * (p - 1), 2 * (p - 1), {(rank + 1) % p: 2 * (p - 1)}):
        failures.append(f"rank {rank}: ring message counts {s.sent_msgs}, {s.recv_msgs}, {s.sends_to}")
    pids: list[Any] = [None] * p
    dist.all_gather_object(pids, os.getpid())  # and every rank has set up: its segments are gone
    if rank == 0 and _ours(pids):
        failures.append(f"segments left in {SHM_DIR} after set-up: {_ours(pids)}")
    return failures


@pytest.mark.parametrize("p", world_sizes([1, 2, 3, 4, 5], quick=[3]))
def test_grid_over_shm_matches_float64_reference_and_ranks_agree_bitwise(p: int) -> None:
    failures = run_pooled(_grid_rank, p, timeout=WORLD_TIMEOUT_S)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat[:20])


def _big_rank(rank: int, p: int) -> list[str]:
    # the 2**20+3 case, float32 sum only: the slow one, and dtype handling is size-independent
    return [f for algo in ringcomm.ALGOS for f in check_grid(rank, p, algo, "shm", sizes=[BIG])]


@pytest.mark.parametrize("p", [1, 2, 3, 4, 5])
def test_a_large_odd_float32_sum_over_shm_matches_the_reference(p: int) -> None:
    failures = run_pooled(_big_rank, p, timeout=WORLD_TIMEOUT_S)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat[:20])


def _tiny_slots_rank(rank: int, p: int) -> list[str]:
    # 2 slots of 64 bytes: a 1000-element message crosses each queue in 63 fragments, a 2**20+3 one in
    # 65537, while the receiver reduces fragment by fragment and frees slots the sender is waiting for
    return check_grid(rank, p, "ring", "shm", sizes=[0, 1, p + 1, 1000]) + check_grid(
        rank, p, "ps", "shm", options={"ps_shards": 2}, sizes=[5, 1000]
    )


def test_messages_larger_than_the_queue_stream_through_it() -> None:
    env = {"RINGCOMM_SHM_SLOTS": "2", "RINGCOMM_SHM_SLOT_BYTES": "64"}
    failures = run_world(_tiny_slots_rank, 3, timeout=WORLD_TIMEOUT_S, env=env)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat[:20])


#: Option forms the plain grid (defaults only) leaves out; -1 stands for P.
OPTION_FORMS = [
    ("ps", {"ps_shards": -1}),
    ("ps", {"ps_overlap": True, "ps_segment_bytes": 256}),
    ("ps", {"ps_shards": 2, "ps_overlap": True, "ps_segment_bytes": 256}),
    ("ring", {"segment_bytes": 128}),
]


def _option_forms_rank(rank: int, p: int) -> list[str]:
    failures = []
    for algo, options in OPTION_FORMS:
        options = {k: p if v == -1 else v for k, v in options.items()}
        failures += check_grid(rank, p, algo, "shm", options=options, sizes=[1, 7, 1000])
    return failures


@pytest.mark.parametrize("p", [2, 3])
def test_every_option_form_over_shm(p: int) -> None:
    # The overlapped, sharded server at P = 2 posts a pull receive behind a push on the same queue
    # (test_waiting_for_a_later_receive_may_complete_it_on_the_way is that case, made certain).
    failures = run_pooled(_option_forms_rank, p, timeout=WORLD_TIMEOUT_S)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat[:20])


def _elsewhere_rank(rank: int, p: int) -> str:
    import ringcomm.transports.shm as shm_transport

    if rank == 1:  # pretend rank 1 runs on another machine
        shm_transport.host_identity = lambda: "elsewhere (boot 12345678)"
    try:
        ringcomm.all_reduce(torch.ones(4), transport="shm", timeout=60)
        return "returned"
    except ValueError as exc:
        return str(exc)


def test_ranks_on_different_hosts_are_told_which_before_any_data_moves() -> None:
    for rank, message in enumerate(run_world(_elsewhere_rank, 2, timeout=120)):
        assert f"rank {rank}: transport='shm' needs every rank on one host" in message, message
        assert "ranks [1] on elsewhere (boot 12345678)" in message and "ranks [0] on " in message


# --- hostile bytes in a queue: an in-process pair of transports ---


class _Setup:
    """A set-up context without a session: ``gather`` straight through the store (no liveness)."""

    def __init__(self, store: Any, rank: int, world_size: int) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.liveness = None
        self.prefix = "test"

    def gather(self, name: str, value: str) -> list[str]:
        base = f"{self.prefix}/{name}"
        self.store.set(f"{base}/{self.rank}", value)
        return [self.store.get(f"{base}/{r}").decode() for r in range(self.world_size)]


def _make_pair(prefix: str = "test") -> tuple[ShmTransport, ShmTransport]:
    """Two transports of one world of 2, made on two threads (set-up is collective)."""
    store = dist.HashStore()
    made: dict[int, ShmTransport] = {}

    def make(rank: int) -> None:
        setup = _Setup(store, rank, 2)
        setup.prefix = prefix
        made[rank] = ShmTransport(setup, slots=2, slot_bytes=64)

    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return made[0], made[1]


@pytest.fixture
def pair() -> Iterator[tuple[ShmTransport, ShmTransport]]:
    a, b = _make_pair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _corrupt(receiver: ShmTransport, peer: int, field: str, value: Any) -> None:
    """Overwrite one field of the header waiting in ``receiver``'s queue from ``peer`` (slot 0)."""
    q = receiver._in[peer]
    names = ("magic", "dtype", "tag", "seq", "total", "offset", "length")
    values = list(_HEADER.unpack_from(q.headers[0], 0))
    values[names.index(field)] = value
    _HEADER.pack_into(q.headers[0], 0, *values)


HOSTILE = [
    ("magic", 0xDEADBEEF, "magic"),
    ("dtype", 3, "dtype"),  # float32 -> float64 (wire.DTYPE_TABLE's codes)
    ("dtype", 200, "dtype"),  # no such dtype
    ("tag", 99, "tag"),
    ("seq", 5, "seq"),
    ("total", 1 << 40, "total"),
    ("offset", 8, "offset"),
    ("length", 1 << 31, "length"),
    ("length", 4, "length"),
]


@pytest.mark.fast
@pytest.mark.parametrize("field, value, named", HOSTILE, ids=[f"{f}={v}" for f, v, _ in HOSTILE])
@pytest.mark.parametrize("kind", ["recv", "reduce"])
def test_a_corrupt_header_is_a_frame_error_naming_peer_and_field(
    pair: tuple[ShmTransport, ShmTransport], field: str, value: Any, named: str, kind: str
) -> None:
    a, b = pair
    deadline = time.monotonic() + 10
    exchange(b, [send(torch.arange(8.0), 0, tag=3)], deadline)  # 32 bytes: one slot, waiting in a's queue
    _corrupt(a, 1, field, value)
    target = torch.full((8,), -1.0)
    message = recv(target, 1, 3) if kind == "recv" else recv_reduce(target, 1, 3, "sum")
    with pytest.raises(FrameError) as info:
        exchange(a, [message], deadline)
    assert info.value.peer == 1 and info.value.field == named, str(info.value)
    assert "rank 0: rejected a message from peer rank 1" in str(info.value)
    assert torch.equal(target, torch.full((8,), -1.0)), "the tensor was written before the header was checked"


@pytest.mark.fast
def test_counters_that_claim_more_than_the_queue_holds_are_a_frame_error(
    pair: tuple[ShmTransport, ShmTransport],
) -> None:
    a, b = pair
    exchange(b, [send(torch.arange(8.0), 0)], time.monotonic() + 10)
    a._in[1].ctl[8] = 1 << 40  # tail far ahead of head
    with pytest.raises(FrameError, match="counters"):
        exchange(a, [recv(torch.empty(8), 1)], time.monotonic() + 10)


@pytest.mark.fast
def test_waiting_for_a_later_receive_may_complete_it_on_the_way(pair: tuple[ShmTransport, ShmTransport]) -> None:
    # Two receives from one peer, both arrived; waiting for the second waits for the first, and that
    # wait consumes every plain receive that has arrived, the second included. This used to end in
    # IndexError (looking for the second in a queue it had already left), in the overlapped server.
    a, b = pair
    deadline = time.monotonic() + 10
    exchange(b, [send(torch.arange(4.0), 0, tag=1), send(torch.arange(4.0) + 10, 0, tag=2)], deadline)
    first, second = torch.zeros(4), torch.zeros(4)
    pending = a.post([recv(first, 1, 1), recv(second, 1, 2)])
    a.wait(pending[1], deadline)
    a.wait(pending[0], deadline)
    assert torch.equal(first, torch.arange(4.0)) and torch.equal(second, torch.arange(4.0) + 10)


@pytest.mark.fast
@settings(max_examples=100, deadline=None)
@given(junk=st.binary(min_size=1, max_size=64), at=st.integers(0, 63))
def test_fuzz_random_bytes_over_a_header_never_crash(junk: bytes, at: int) -> None:
    a, b = _make_pair()
    try:
        exchange(b, [send(torch.arange(8.0), 0)], time.monotonic() + 10)
        header = a._in[1].headers[0]
        end = min(64, at + len(junk))
        header[at:end] = junk[: end - at]
        target = torch.zeros(8)
        try:
            exchange(a, [recv(target, 1)], time.monotonic() + 2)
            assert torch.equal(target, torch.arange(8.0))  # the junk changed nothing that matters
        except FrameError:
            assert torch.equal(target, torch.zeros(8))
    finally:
        a.close()
        b.close()


@pytest.mark.fast
def test_a_silent_peer_times_out_naming_it(pair: tuple[ShmTransport, ShmTransport]) -> None:
    a, _ = pair
    t0 = time.monotonic()
    with pytest.raises(CommTimeoutError, match="rank 0: recv with peer rank 1 did not complete within"):
        exchange(a, [recv(torch.empty(4), 1)], time.monotonic() + 0.5)
    assert time.monotonic() - t0 < 3


@pytest.mark.fast
def test_transports_made_and_closed_leak_no_descriptors_threads_or_segments() -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = (fds(), threading.active_count(), _ours([os.getpid()]))
    for i in range(10):
        a, b = _make_pair(f"leak{i}")
        exchange(a, [send(torch.ones(30), 1)], time.monotonic() + 10)  # 120 bytes: two 64-byte slots
        got = torch.zeros(30)
        exchange(b, [recv(got, 0)], time.monotonic() + 10)
        assert torch.equal(got, torch.ones(30))
        a.close()
        b.close()
    assert (fds(), threading.active_count(), _ours([os.getpid()])) == before


# --- kill -9 of every rank leaves nothing behind ---

_RANK_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch, torch.distributed as dist, ringcomm
    rank, port, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    store = dist.TCPStore("127.0.0.1", port, 3, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3)
    ringcomm.all_reduce(torch.ones(10), transport="shm", timeout=60)
    open(ready + str(rank), "w").close()
    time.sleep(120)  # killed long before
    """
)


def test_kill_9_of_every_rank_after_set_up_leaves_nothing_in_dev_shm(tmp_path: Any) -> None:
    """Three ranks started as plain processes (no multiprocessing: its semaphores would outlive a kill
    -9 too, and they are not ours); all three are killed at once after the transport is set up."""
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    ready = str(tmp_path / "ready")
    store = loopback_store(4)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(store.port), ready]) for r in range(3)
    ]
    try:
        end = time.monotonic() + 120
        while not all(os.path.exists(f"{ready}{r}") for r in range(3)):
            assert all(p.poll() is None for p in procs) and time.monotonic() < end, "the world did not come up"
            time.sleep(0.1)
    finally:
        for p in procs:
            p.kill()  # SIGKILL: no cleanup code of ours runs
        for p in procs:
            p.wait(30)
    # reaped: nothing of theirs can run any more, so what is left now stays
    assert _ours([p.pid for p in procs]) == []


# --- a waiting rank sleeps ---


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _idle_rank(rank: int, p: int) -> tuple[float, float] | None:
    t = ringcomm.init("shm")
    x = torch.ones(16)
    exchange(t, [recv(x, 1)] if rank == 0 else [send(x, 0)], time.monotonic() + 30)
    dist.barrier()
    if rank == 0:
        c0, w0 = _cpu(), time.monotonic()
        exchange(t, [recv(x, 1)], time.monotonic() + 30)
        return _cpu() - c0, time.monotonic() - w0
    time.sleep(2.0)
    exchange(t, [send(x, 0)], time.monotonic() + 30)
    return None


def test_a_rank_waiting_for_a_message_sleeps_instead_of_spinning() -> None:
    cpu_s, wall_s = run_world(_idle_rank, 2, timeout=120)[0]
    assert wall_s >= 1.9
    assert cpu_s < 0.2 * wall_s, f"the waiting rank used {cpu_s:.2f} s of CPU in {wall_s:.2f} s"


@pytest.mark.fast
def test_header_layout_fits_its_line() -> None:
    assert _HEADER.size <= 64 and struct.calcsize("<IB3xI4xQQQI") == _HEADER.size


#: The dtype codes a shared-memory header carries: part of the format, so written out here by hand.
#: A change to any of them (a reordered table, codes derived from an order) fails this test.
PINNED_CODES = {
    torch.float16: 0,
    torch.bfloat16: 1,
    torch.float32: 2,
    torch.float64: 3,
    torch.int32: 4,
    torch.int64: 5,
    torch.uint8: 6,
}


def test_the_dtype_codes_are_pinned_and_one_table_serves_both_formats() -> None:
    from ringcomm.transports import wire

    assert wire.DTYPE_CODES == PINNED_CODES
    codes = [code for code, _, _ in wire.DTYPE_TABLE]
    names = [name for _, name, _ in wire.DTYPE_TABLE]
    assert len(set(codes)) == len(codes) and len(set(names)) == len(names)
    assert all(0 <= code < 256 for code in codes)  # the header's dtype field is a u8
    assert set(wire.DTYPES.values()) == set(PINNED_CODES)  # the ZeroMQ format's names: the same dtypes
    assert all(wire.CODE_DTYPES[code] is dtype for dtype, code in PINNED_CODES.items())


@pytest.mark.parametrize("dtype", list(PINNED_CODES), ids=str)
def test_a_shm_header_carries_the_pinned_code(pair: tuple[ShmTransport, ShmTransport], dtype: torch.dtype) -> None:
    a, b = pair
    deadline = time.monotonic() + 10
    exchange(b, [send(torch.ones(4, dtype=dtype), 0, tag=3)], deadline)  # waits in a's queue, slot 0
    assert _HEADER.unpack_from(a._in[1].headers[0], 0)[1] == PINNED_CODES[dtype]
    target = torch.zeros(4, dtype=dtype)
    exchange(a, [recv(target, 1, 3)], deadline)
    assert target.tolist() == [1, 1, 1, 1]
