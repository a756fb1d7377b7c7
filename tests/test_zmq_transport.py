"""ZmqTransport: the algorithms over ZeroMQ, the wire format, hostile frames, timeouts, cleanup.

Spawned worlds (one per world size, every case grouped) check that ring,
ring_simple, naive and ps give the float64 reference and agree bitwise over
``transport="zmq"``. Everything about frames runs in this process: a transport
made with ``zmq_standalone.standalone`` and a raw pyzmq PUSH socket that plays its peer.
Strangers without the world's token are in ``test_zmq_hardening.py``.
"""

from __future__ import annotations

import errno
import os
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import torch
import zmq
from grid import BIG, check_grid, world_sizes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pool import run_pooled
from traffic import count_from_zero  # tests/traffic.py
from zmq_standalone import standalone  # a transport without torch.distributed (tests only)

import ringcomm
from ringcomm.algorithms.tags import Tag
from ringcomm.errors import CommError, CommTimeoutError, FrameError, PeerError
from ringcomm.tools.spawn import run_world
from ringcomm.transports.wire import (
    DTYPES,
    FORMAT_VERSION,
    Header,
    decode_header,
    encode_header,
    encode_preamble,
)
from ringcomm.transports.zmq import ZmqTransport

WORLD_TIMEOUT_S = 240
#: how late past its deadline a wait may raise: generous, as a loaded 2-core machine can keep a
#: test off the CPU for seconds (250 ms failed there); a wait that ignored its deadline would
#: still block far longer, until its 60 s default or pytest's timeout
LATE_S = 5.0

#: the smallest tag no algorithm uses (tags.Tag grows as collectives are added)
UNKNOWN_TAG = max(int(t) for t in Tag) + 1


def _threads() -> tuple[int, int]:
    """(Python threads, libzmq's native threads): what a ZmqTransport could leak.

    libzmq names its I/O and reaper threads ``ZMQbg/...``; other native threads of the
    process (torch's, the store client's) come and go with other tests and are not ours.
    The liveness heartbeat is one daemon thread per process, shared by all transports.
    """
    python = [t for t in threading.enumerate() if t.name != "ringcomm-heartbeat"]
    zmq_native = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                zmq_native += f.read().startswith("ZMQbg")
        except FileNotFoundError:  # the thread ended while we looked
            pass
    return len(python), zmq_native


# --- parity: every algorithm over zmq, the grid of test_ring, in one world per P ---


def _grid_rank(rank: int, p: int) -> list[str]:
    failures = []
    for algo in ringcomm.ALGOS:
        failures += check_grid(rank, p, algo, "zmq")
    transport = ringcomm.init("zmq")
    if p > 1 and not transport.endpoint.startswith("ipc://"):
        failures.append(f"rank {rank}: one-host world bound {transport.endpoint}, expected ipc://")
    # how data moves: the ring sends 2(P-1) messages, all to the right neighbour
    x = torch.ones(10 * p)
    count_from_zero(transport.stats)
    ringcomm.all_reduce(x, algo="ring", transport="zmq", timeout=60)
    s = transport.stats
    if p > 1 and (s.sent_msgs, s.recv_msgs, s.sends_to) != (
        2 * (p - 1),
        2 * (p - 1),
        {(rank + 1) % p: 2 * (p - 1)},
    ):
        failures.append(f"rank {rank}: ring message counts {s.sent_msgs}, {s.recv_msgs}, {s.sends_to}")
    return failures


@pytest.mark.parametrize("p", world_sizes([1, 2, 3, 4], quick=[3]))
def test_grid_over_zmq_matches_float64_reference_and_ranks_agree_bitwise(p: int) -> None:
    failures = run_pooled(_grid_rank, p, timeout=WORLD_TIMEOUT_S)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat[:20])


def _big_rank(rank: int, p: int) -> list[str]:
    # the 2**20+3 case, float32 sum only: the slow one, and dtype handling is size-independent
    return [f for algo in ringcomm.ALGOS for f in check_grid(rank, p, algo, "zmq", sizes=[BIG])]


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_a_large_odd_float32_sum_over_zmq_matches_the_reference(p: int) -> None:
    failures = run_pooled(_big_rank, p, timeout=WORLD_TIMEOUT_S)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat[:20])


def _tcp_and_generations_rank(rank: int, p: int) -> list[str]:
    """RINGCOMM_ZMQ_IPC=0 binds loopback TCP; a second transport rendezvous on keys of its own."""
    from ringcomm.runtime import session
    from ringcomm.runtime.rendezvous import SetupContext

    failures = []
    first = ringcomm.init("zmq")
    if not first.endpoint.startswith("tcp://127.0.0.1:"):
        failures.append(f"rank {rank}: RINGCOMM_ZMQ_IPC=0 bound {first.endpoint}")
    current = session.current()  # collective, same order on every rank: a set-up prefix of its own
    deadline = time.monotonic() + 60
    second = ZmqTransport(SetupContext(current.rendezvous, current.key("second"), deadline, "a second transport"))
    try:
        if second.endpoint == first.endpoint:
            failures.append(f"rank {rank}: second transport reused {first.endpoint}")
        for transport in (first, second):
            x = torch.full((7,), float(rank + 1))
            right, left = (rank + 1) % p, (rank - 1) % p
            deadline = time.monotonic() + 30
            y = torch.empty(7)
            recv = transport.irecv(y, left, tag=5)  # isend/irecv: the transport's own primitives
            transport.wait(transport.isend(x, right, tag=5), deadline)
            transport.wait(recv, deadline)
            if not torch.equal(y, torch.full((7,), float(left + 1))):
                failures.append(f"rank {rank}: got {y.tolist()} from {left}")
        failures += check_grid(rank, p, "ring", "zmq", sizes=[0, 1, p + 1, 1000])
    finally:
        second.close()
    return failures


def test_tcp_loopback_and_a_second_transport_generation() -> None:
    failures = run_world(_tcp_and_generations_rank, 3, timeout=WORLD_TIMEOUT_S, env={"RINGCOMM_ZMQ_IPC": "0"})
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat[:20])


# --- single-process helpers: a transport and a raw socket that plays rank 1 ---


@pytest.fixture(scope="module", autouse=True)
def _pyzmq_gc_thread_started() -> None:
    """pyzmq starts one process-wide daemon thread at the first zero-copy send; start it now
    so that thread counts before and after a test compare our threads only."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    a.send(bytearray(1 << 20), copy=False, track=True).wait(5)
    b.recv()
    a.close(0)
    b.close(0)
    ctx.term()
    torch.ones(1 << 20).add_(1)  # and torch's own pools, should it start any


class RawPeer:
    """A bare PUSH socket that plays rank 1 of ``transport``'s world (it knows the world's token),
    connected to ``transport``'s inbox. ``send`` puts the preamble before the frames it is given."""

    def __init__(self, transport: ZmqTransport, token: bytes | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.linger = 0
        self.sock.connect(transport.endpoint)
        self.preamble = encode_preamble(transport.token if token is None else token, 1)
        self.seq = 0

    def header(self, **changes: object) -> dict:
        base = {"v": FORMAT_VERSION, "src": 1, "dst": 0, "tag": 0, "seq": self.seq}
        base.update({"dtype": "float32", "shape": [4], "nbytes": 16})
        base.update(changes)
        return base

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart([self.preamble, *frames])

    def send_good(self, values: torch.Tensor) -> None:
        header = encode_header(
            Header(1, 0, 0, self.seq, values.dtype, tuple(values.shape), values.numel() * 4)
        )
        self.send(header, values.numpy().tobytes())
        self.seq += 1

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def receiver() -> Iterator[ZmqTransport]:
    transport = standalone(0, 2)
    yield transport
    transport.close()


def _pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


SENTINEL = torch.tensor([-1.0, -2.0, -3.0, -4.0])
GOOD = torch.tensor([1.0, 2.0, 3.0, 4.0])

# (case, frames to send given the raw peer, field named by the error, does it consume a sequence number)
BAD_FRAMES = [
    ("header not msgpack", lambda r: [b"\xc1\xc1", bytes(16)], "header", False),
    ("header is a list", lambda r: [_pack([1, 0, 0]), bytes(16)], "header", False),
    ("header is pickle", lambda r: [pickle.dumps(r.header()), bytes(16)], "header", False),
    ("header too long", lambda r: [_pack(r.header(pad="x" * 300)), bytes(16)], "header", False),
    (
        "key missing",
        lambda r: [_pack({k: v for k, v in r.header().items() if k != "seq"}), bytes(16)],
        "header",
        False,
    ),
    ("extra key", lambda r: [_pack(r.header(extra=1)), bytes(16)], "header", False),
    ("ext type", lambda r: [_pack(r.header(tag=msgpack.ExtType(1, b"x"))), bytes(16)], "header", False),
    ("wrong version", lambda r: [_pack(r.header(v=FORMAT_VERSION + 1)), bytes(16)], "v", False),
    ("src differs from preamble", lambda r: [_pack(r.header(src=0)), bytes(16)], "src", False),
    ("src out of range", lambda r: [_pack(r.header(src=9)), bytes(16)], "src", False),
    ("dst not this rank", lambda r: [_pack(r.header(dst=1)), bytes(16)], "dst", False),
    ("bool tag", lambda r: [_pack(r.header(tag=True)), bytes(16)], "tag", False),
    ("seq ahead", lambda r: [_pack(r.header(seq=r.seq + 1)), bytes(16)], "seq", False),
    ("seq replayed", lambda r: [_pack(r.header(seq=r.seq - 1)), bytes(16)], "seq", False),
    ("dtype not allowed", lambda r: [_pack(r.header(dtype="complex64")), bytes(16)], "dtype", False),
    ("dtype not a string", lambda r: [_pack(r.header(dtype=7)), bytes(16)], "dtype", False),
    ("shape not a list", lambda r: [_pack(r.header(shape=4)), bytes(16)], "shape", False),
    ("negative size", lambda r: [_pack(r.header(shape=[-4])), bytes(16)], "shape", False),
    ("nbytes disagrees with shape", lambda r: [_pack(r.header(nbytes=12)), bytes(12)], "nbytes", False),
    ("body shorter than nbytes", lambda r: [_pack(r.header()), bytes(12)], "body", False),
    ("body longer than nbytes", lambda r: [_pack(r.header()), bytes(20)], "body", False),
    ("body frame missing", lambda r: [_pack(r.header())], "frames", False),
    ("extra frame", lambda r: [_pack(r.header()), bytes(16), b"more"], "frames", False),
    ("preamble only", lambda r: [], "frames", False),
    ("unknown tag", lambda r: [_pack(r.header(tag=UNKNOWN_TAG)), bytes(16)], "tag", False),
    ("huge tag", lambda r: [_pack(r.header(tag=2**40)), bytes(16)], "tag", False),
    # well-formed on the wire, wrong for the posted tensor: the message is used up
    (
        "shape differs from tensor",
        lambda r: [_pack(r.header(shape=[8], nbytes=32)), bytes(32)],
        "shape",
        True,
    ),
    (
        "dtype differs from tensor",
        lambda r: [_pack(r.header(dtype="float64", nbytes=32)), bytes(32)],
        "dtype",
        True,
    ),
]


@pytest.mark.fast
@pytest.mark.parametrize("case,make,field,consumes", BAD_FRAMES, ids=[c[0] for c in BAD_FRAMES])
def test_bad_frame_is_rejected_naming_peer_and_field_then_a_good_one_arrives(
    receiver: ZmqTransport, case: str, make, field: str, consumes: bool
) -> None:
    peer = RawPeer(receiver)
    try:
        peer.send_good(GOOD * 10)  # the receiver takes well-formed traffic before
        before = torch.empty(4)
        receiver.wait(receiver.irecv(before, 1), time.monotonic() + 10)
        assert torch.equal(before, GOOD * 10)

        dst = SENTINEL.clone()
        pending = receiver.irecv(dst, 1)
        peer.send(*make(peer))
        with pytest.raises(FrameError) as info:
            receiver.wait(pending, time.monotonic() + 10)
        err = info.value
        assert (err.peer, err.field, err.rank) == (1, field, 0), str(err)
        assert "peer rank 1" in str(err) and repr(field) in str(err)
        assert torch.equal(dst, SENTINEL), f"{case}: destination written: {dst}"

        if consumes:  # the receive failed for good; the next message goes to a new one
            peer.seq += 1
            pending = receiver.irecv(dst, 1)
        peer.send_good(GOOD)
        receiver.wait(pending, time.monotonic() + 10)
        assert torch.equal(dst, GOOD)
    finally:
        peer.close()


@pytest.mark.fast
def test_preamble_naming_no_other_rank_is_rejected(receiver: ZmqTransport) -> None:
    """A message with the token whose preamble names this rank itself, or a rank outside the world."""
    for claimed in (0, 2, 7):
        peer = RawPeer(receiver)
        peer.preamble = encode_preamble(receiver.token, claimed)
        try:
            dst = SENTINEL.clone()
            pending = receiver.irecv(dst, 1)
            peer.send(encode_header(Header(1, 0, 0, 0, torch.float32, (4,), 16)), bytes(16))
            with pytest.raises(FrameError) as info:
                receiver.wait(pending, time.monotonic() + 10)
            assert (info.value.field, info.value.peer) == ("src", claimed), str(info.value)
            assert torch.equal(dst, SENTINEL)
        finally:
            peer.close()


@pytest.mark.fast
def test_same_tag_in_order_tags_independent_arrivals_buffered_before_irecv() -> None:
    with standalone(0, 2) as a, standalone(1, 2, bind="ipc://", token=a.token) as b:
        a.set_peers({1: b.endpoint})
        b.set_peers({0: a.endpoint})
        deadline = time.monotonic() + 30
        # several receives outstanding on two tags before anything is sent (the pipelined ring)
        early = [(tag, i, torch.zeros(3)) for i in range(3) for tag in (0, 1)]
        posted = [(tag, i, t, b.irecv(t, 0, tag)) for tag, i, t in early]
        sent = [a.isend(torch.full((3,), 10.0 * tag + i), 1, tag) for i in range(6) for tag in (1, 0)]
        sent.append(a.isend(torch.arange(1 << 18, dtype=torch.float64), 1, 2))  # 2 MiB: zero-copy
        for tag, i, t, pending in posted:
            b.wait(pending, deadline)
            assert torch.equal(t, torch.full((3,), 10.0 * tag + i)), (tag, i, t)
        big = torch.empty(1 << 18, dtype=torch.float64)
        b.wait(b.irecv(big, 0, 2), deadline)
        assert torch.equal(big, torch.arange(1 << 18, dtype=torch.float64))
        for pending in sent:
            a.wait(pending, deadline)
        # the rest arrived before their receives were posted: taken in order, tag 1 first
        for tag in (1, 0):
            for i in range(3, 6):
                t = torch.zeros(3)
                b.wait(b.irecv(t, 0, tag), deadline)
                assert torch.equal(t, torch.full((3,), 10.0 * tag + i)), (tag, i, t)
        assert (a.stats.sent_msgs, b.stats.recv_msgs, a.stats.sends_to) == (13, 13, {1: 13})
        # every dtype of the allowlist, and empty tensors, travel bit for bit
        for name, dtype in DTYPES.items():
            for numel in (0, 5):
                x = torch.arange(numel).to(dtype)
                y = torch.ones(numel, dtype=dtype)
                r = a.irecv(y, 1, tag=9)
                b.wait(b.isend(x, 0, tag=9), deadline)
                a.wait(r, deadline)
                assert torch.equal(x, y), name


@pytest.mark.fast
@pytest.mark.parametrize(
    "error, expected",
    [(zmq.ZMQError(errno.EINTR), PeerError), (KeyboardInterrupt(), KeyboardInterrupt)],
    ids=["zmq-error", "ctrl-c"],
)
def test_a_send_that_fails_between_its_frames_leaves_no_half_message(
    error: BaseException, expected: type[BaseException]
) -> None:
    """The first frames go in with SNDMORE; if the body frame then fails, the socket must not keep
    the half message (the next header would be glued onto it and the peer reject both). A Ctrl-C
    there stays a KeyboardInterrupt (it used to become a PeerError)."""
    with standalone(0, 2) as a, standalone(1, 2, token=a.token) as b:
        a.set_peers({1: b.endpoint})
        b.set_peers({0: a.endpoint})
        deadline = time.monotonic() + 30
        outbox = a._outbox(1)
        real_send = outbox.send
        calls = {"n": 0}

        def fails_on_the_body(data: Any, flags: int = 0, copy: bool = True, track: bool = False) -> Any:
            calls["n"] += 1
            if calls["n"] == 3:  # the body frame of the first message (after preamble and header)
                raise error
            return real_send(data, flags, copy=copy, track=track)

        outbox.send = fails_on_the_body
        with pytest.raises(expected):
            a.isend(torch.ones(4), 1)
        got = torch.zeros(4)
        received = b.irecv(got, 0)
        a.wait(a.isend(torch.full((4,), 7.0), 1), deadline)
        b.wait(received, deadline)  # arrives whole, with the sequence number b expects
        assert torch.equal(got, torch.full((4,), 7.0))


@pytest.mark.fast
def test_silent_peer_times_out_within_the_deadline_naming_it(receiver: ZmqTransport) -> None:
    timeout = 0.3
    start = time.monotonic()
    with pytest.raises(CommTimeoutError) as info:
        receiver.wait(receiver.irecv(torch.empty(4), 1, tag=3), start + timeout)
    elapsed = time.monotonic() - start
    assert timeout <= elapsed < timeout + LATE_S, elapsed
    assert info.value.peer == 1 and info.value.op == "recv"
    assert "peer rank 1" in str(info.value) and "tag 3" in str(info.value)


@pytest.mark.fast
def test_zero_copy_send_to_a_dead_endpoint_times_out_naming_the_peer(receiver: ZmqTransport) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver.set_peers({1: f"tcp://127.0.0.1:{port}"})
    payload = torch.zeros(1 << 20, dtype=torch.uint8)  # zero-copy: done only once sent
    pending = receiver.isend(payload, 1)
    start = time.monotonic()
    with pytest.raises(CommTimeoutError) as info:
        receiver.wait(pending, start + 0.3)
    assert time.monotonic() - start < 0.3 + LATE_S
    assert (info.value.peer, info.value.op) == (1, "send")


@pytest.mark.fast
def test_close_releases_port_and_ipc_files() -> None:
    tcp = standalone(0, 2)
    ipc = standalone(1, 2, bind="ipc://", token=tcp.token)
    tcp.set_peers({1: ipc.endpoint})
    ipc.set_peers({0: tcp.endpoint})
    deadline = time.monotonic() + 10
    ipc.wait(ipc.isend(torch.ones(3), 0), deadline)
    tcp.wait(tcp.irecv(torch.empty(3), 1), deadline)
    port = int(tcp.endpoint.rsplit(":", 1)[1])
    path = ipc.endpoint[len("ipc://") :]
    tcp.close()
    ipc.close()
    ipc.close()  # twice is fine
    with socket.socket() as again:  # nothing listens there any more (TIME_WAIT is allowed)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()
    assert not os.path.exists(path)


def _settled(before: tuple[int, int], limit_s: float = 3.0) -> tuple[int, int]:
    """Thread counts once libzmq's threads have finished starting (named) or exiting."""
    end = time.monotonic() + limit_s
    now = _threads()
    while time.monotonic() < end and (now[0] > before[0] or now[1] > before[1]):
        time.sleep(0.05)
        now = _threads()
    return now


def test_transports_closed_leak_no_threads_or_file_descriptors() -> None:
    """Twenty transports made, used and closed: a leak would grow with the count.

    libzmq starts two native threads per context, born named "python" and renamed
    ZMQbg/... a moment later, so a before/after comparison of one transport races with
    that renaming (and with pyzmq's process-wide garbage-collector context). A transport
    that leaked its context would add 2 threads and several descriptors *each*: 40 here.
    """
    n = 20
    before = _settled(_threads())
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(n):
        a = standalone(0, 2)
        b = standalone(1, 2, bind="ipc://", token=a.token)
        a.set_peers({1: b.endpoint})
        b.set_peers({0: a.endpoint})
        deadline = time.monotonic() + 10
        received = torch.empty(1 << 18)
        pending = b.irecv(received, 0)
        a.wait(a.isend(torch.ones(1 << 18), 1), deadline)  # 1 MiB: a zero-copy send
        b.wait(pending, deadline)
        a.close()
        b.close()
    after = _settled(before)
    fds_after = len(os.listdir("/proc/self/fd"))
    assert after[0] <= before[0], threading.enumerate()  # no Python thread of ours survives
    assert after[1] - before[1] <= 2, (before, after)  # at most one process-wide context appears
    assert fds_after - fds_before <= 4, (fds_before, fds_after)


@pytest.mark.fast
def test_bad_arguments_are_value_errors(receiver: ZmqTransport) -> None:
    with pytest.raises(ValueError, match="peer"):
        receiver.isend(torch.ones(2), 0)
    with pytest.raises(ValueError, match="peer"):
        receiver.irecv(torch.ones(2), 5)
    with pytest.raises(ValueError, match="contiguous"):
        receiver.isend(torch.ones(4, 4).t(), 1)
    with pytest.raises(ValueError, match="dtype"):
        receiver.isend(torch.ones(2, dtype=torch.complex64), 1)
    for tag in (UNKNOWN_TAG, -1, 2**40, True, 1.0):  # only tags.Tag's values and 0 travel
        with pytest.raises(ValueError, match="tag"):
            receiver.isend(torch.ones(2), 1, tag=tag)
        with pytest.raises(ValueError, match="tag"):
            receiver.irecv(torch.ones(2), 1, tag=tag)


# --- the header decoder: a validated header or a FrameError, never anything else ---


def _decode(data: bytes) -> Header:
    return decode_header(data, rank=0, world_size=4, peer=1)


@pytest.mark.fast
def test_header_round_trips() -> None:
    for name, dtype in DTYPES.items():
        header = Header(1, 0, 7, 2**40, dtype, (3, 0, 5), 0)
        assert _decode(encode_header(header)) == header, name
    header = Header(1, 0, 0, 0, torch.bfloat16, (2, 3), 12)
    assert _decode(encode_header(header)) == header
    assert len(encode_header(Header(1, 0, 1, 123456, torch.float32, (262144,), 1 << 20))) < 100


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(["v", "src", "dst", "tag", "seq", "dtype", "shape", "nbytes"]) | st.text(max_size=6)
_VALID = {"v": 1, "src": 1, "dst": 0, "tag": 0, "seq": 3, "dtype": "float32", "shape": [2, 2], "nbytes": 16}
_near_valid_values = (
    _values
    | st.integers(-3, 5)
    | st.sampled_from([*DTYPES, "object"])
    | st.lists(st.integers(-2, 2**63), max_size=18)
)


def _must_be_header_or_frame_error(data: bytes) -> None:
    try:
        header = _decode(data)
    except FrameError as err:
        assert err.peer == 1 and err.field and isinstance(err, CommError)
        return
    assert header.src == 1 and header.dst == 0 and header.dtype in DTYPES.values()
    assert header.nbytes == torch.Size(header.shape).numel() * header.dtype.itemsize


_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _must_be_header_or_frame_error(data)


@_FUZZ
@given(st.dictionaries(_keys, _values, max_size=10))
def test_fuzz_random_msgpack_maps(obj: dict) -> None:
    _must_be_header_or_frame_error(_pack(obj))


@_FUZZ
@given(
    st.dictionaries(st.sampled_from(sorted(_VALID)), _near_valid_values, max_size=3), st.binary(max_size=3)
)
def test_fuzz_valid_header_with_fields_replaced(changes: dict, tail: bytes) -> None:
    data = _pack({**_VALID, **changes})
    _must_be_header_or_frame_error(data)
    _must_be_header_or_frame_error(data + tail)  # trailing bytes
    _must_be_header_or_frame_error(data[: len(data) // 2])  # truncated
