"""ZmqTransport under a program's end and under strangers: nothing sent is lost, nothing foreign gets in.

1. A rank that ends right after its last collective (``shutdown()``, then exit) must not take that
   collective's last sends with it: ZeroMQ counts a small send done while its own I/O thread still
   holds it, so closing with linger 0 used to drop them and leave a peer waiting for its result.
2. Any process that can reach a rank's port (a stray client, a zombie of a crashed job on a
   reused port) must not get a frame into a collective, or make libzmq allocate a huge frame,
   or take a rank's place: its frames are dropped (and logged once), and the collective succeeds.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch
import zmq
from zmq_standalone import standalone  # a transport without torch.distributed (tests only)

from ringcomm.errors import CommTimeoutError
from ringcomm.tools import spawn
from ringcomm.tools.spawn import loopback_store
from ringcomm.transports.wire import MAX_FRAME_BYTES, PREAMBLE_BYTES, Header, encode_header, encode_preamble

# all_reduce then shutdown, in one process; the last is followed by the process's exit. 40000 float64
# (320 KB) is still a copied send, and more than a kernel socket buffer holds by default (208 KiB).
SIZES = (40000, 8, 40000)
WORLDS = 3  # worlds of fresh processes, one after the other
P = 4
TIMEOUT_S = 180  # a whole world, start to exit (4 processes importing torch on 2 shared cores)


def _ends_right_after(rank: int, world_size: int, port: int, results: Any) -> None:
    """One rank: for each of SIZES, all_reduce over zmq with naive, shutdown; report; then exit at once."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RINGCOMM_LIVENESS_S="5")
    import torch.distributed as dist

    import ringcomm

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    failures = []
    for n, numel in enumerate(SIZES):
        x = torch.arange(numel, dtype=torch.float64) + 100 * rank + n
        ringcomm.all_reduce(x, algo="naive", transport="zmq", timeout=60)
        expected = sum(torch.arange(numel, dtype=torch.float64) + 100 * r + n for r in range(world_size))
        if not torch.equal(x, expected):
            wrong = int((x != expected).sum())
            failures.append(f"rank {rank} round {n}: {wrong} of {numel} elements differ from the sum")
        ringcomm.shutdown()  # the session's transports close here; the next round makes new ones
    results.put((rank, failures))
    dist.destroy_process_group()
    # and the process exits now: nothing waits for the peers


def _kill_all(procs: list[Any]) -> None:
    for proc in procs:
        if proc.pid is not None:
            try:
                os.kill(proc.pid, signal.SIGKILL)  # also ends a stopped process
            except ProcessLookupError:
                pass
    for proc in procs:
        proc.join(timeout=10)


def test_ranks_that_exit_right_after_a_naive_all_reduce_lose_nothing() -> None:
    """Four ranks, naive over zmq (rank 0 sends the result last, to everyone), each calling
    shutdown() and exiting straight after: every rank gets the right result and exits 0."""

    ctx, _ = spawn.context()  # the suite's fork server (conftest): torch is imported once, not 12 times
    for world in range(WORLDS):
        store = loopback_store(P + 1)
        results = ctx.Queue()
        procs = [ctx.Process(target=_ends_right_after, args=(r, P, store.port, results)) for r in range(P)]
        try:
            for proc in procs:
                proc.start()
            deadline = time.monotonic() + TIMEOUT_S
            for proc in procs:
                proc.join(timeout=max(deadline - time.monotonic(), 0.0))
            reports: dict[int, list[str]] = {}
            while len(reports) < P:  # every rank reported (no 1 s wait for an empty queue), or one never will
                try:
                    rank, failures = results.get(timeout=1.0)
                except queue.Empty:
                    break
                reports[rank] = failures
            codes = [proc.exitcode for proc in procs]
            assert codes == [0] * P, f"world {world}: exit codes {codes} (None: still running after {TIMEOUT_S} s)"
            assert sorted(reports) == list(range(P)), f"world {world}: reports from ranks {sorted(reports)}"
            flat = [f for r in range(P) for f in reports[r]]
            assert not flat, "\n".join(flat)
        finally:
            _kill_all(procs)
            results.close()
            del store


# --- 2. strangers: frames without the world's token are dropped, never fatal ---


def _stranger_type(transport: Any) -> int:
    """A socket type the inbox accepts connections from (PULL takes PUSH; the ROUTER inbox of the
    version before this one took DEALER), so that the strangers below reach it either way."""
    return zmq.PUSH if transport._inbox.type == zmq.PULL else zmq.DEALER


def _forgeries(token: bytes, dst: int, src: int, seq: int, tag: int, numel: int) -> list[list[bytes]]:
    """Messages a stranger sends: junk, an earlier format, and well-formed ones with a wrong token,
    claiming to be ``src`` with the ``seq`` the receiver expects next, full of 999."""
    body = torch.full((numel,), 999.0, dtype=torch.float64).numpy().tobytes()
    header = encode_header(Header(src, dst, tag, seq, torch.float64, (numel,), len(body)))
    wrong = bytes(b ^ 0x5A for b in token)
    return [
        [os.urandom(37)],
        [b"", b"", b""],
        [header, body],  # the format before the token: no preamble
        [encode_preamble(wrong, src), header, body],  # a wrong token, else perfect
        [encode_preamble(token[:-1] + b"\0", src)[: len(token)], header, body],  # a truncated preamble
        [os.urandom(1 << 20), header, body],  # a big frame 0
        [bytes(PREAMBLE_BYTES + 1), header, body],
    ]


@pytest.fixture
def receiver() -> Iterator[Any]:
    transport = standalone(0, 2)
    yield transport
    transport.close()


def _stranger(endpoint: str, kind: int, routing_id: bytes = b"rank:1") -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.linger = 0
    if kind == zmq.DEALER:
        sock.routing_id = routing_id  # what the ROUTER inbox used to believe
    sock.connect(endpoint)
    return ctx, sock


@pytest.mark.fast
def test_foreign_messages_are_dropped_and_logged_once_and_the_real_one_arrives(
    receiver: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ctx, sock = _stranger(receiver.endpoint, _stranger_type(receiver))
    peer = _RawRank(receiver)
    try:
        forged = _forgeries(receiver.token, dst=0, src=1, seq=0, tag=0, numel=4)
        for frames in forged:
            sock.send_multipart(frames)
        sock.send(bytes(MAX_FRAME_BYTES + 1))  # libzmq hangs up on it before allocating
        # the real message comes after the forgeries, and fills the receive
        dst = torch.full((4,), -1.0, dtype=torch.float64)
        pending = receiver.irecv(dst, 1)
        deadline = time.monotonic() + 30
        while receiver.dropped < len(forged) and time.monotonic() < deadline:
            receiver._read_one(100)  # the forgeries are read, and must not raise
        peer.send(torch.arange(4, dtype=torch.float64))
        receiver.wait(pending, deadline)
        assert torch.equal(dst, torch.arange(4, dtype=torch.float64)), dst
        assert receiver.dropped == len(forged)
        said = [line for line in capsys.readouterr().err.splitlines() if "token" in line]
        assert len(said) == 1 and "rank 0: dropped a message" in said[0], said
    finally:
        peer.close()
        sock.close(0)
        ctx.term()


class _RawRank:
    """A bare PUSH socket that is rank 1 of the receiver's world: it has the token."""

    def __init__(self, transport: Any) -> None:
        self.ctx, self.sock = _stranger(transport.endpoint, zmq.PUSH)
        self.token, self.seq = transport.token, 0

    def send(self, values: torch.Tensor) -> None:
        nbytes = values.numel() * values.element_size()
        header = encode_header(Header(1, 0, 0, self.seq, values.dtype, tuple(values.shape), nbytes))
        self.sock.send_multipart([encode_preamble(self.token, 1), header, values.numpy().tobytes()])
        self.seq += 1

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.mark.fast
def test_a_flood_of_foreign_messages_does_not_stop_a_wait_from_timing_out(receiver: Any) -> None:
    """A wait read messages until one matched, and looked at the clock only when none came."""
    ctx, sock = _stranger(receiver.endpoint, _stranger_type(receiver))
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            sock.send(b"junk")
            time.sleep(0.0005)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        timeout = 0.5
        start = time.monotonic()
        with pytest.raises(CommTimeoutError) as info:
            receiver.wait(receiver.irecv(torch.empty(4), 1), start + timeout)
        assert time.monotonic() - start < timeout + 10  # generous: two shared cores
        assert info.value.peer == 1 and receiver.dropped > 0
    finally:
        stop.set()
        thread.join(timeout=10)
        sock.close(0)
        ctx.term()


def _zmtp_client(endpoint: str, socket_type: bytes) -> socket.socket:
    """A raw TCP client that does the ZMTP 3.0 handshake (NULL security) by hand, so it can then
    announce frame lengths a ZeroMQ socket would never send."""
    host, port = endpoint[len("tcp://") :].rsplit(":", 1)
    client = socket.create_connection((host, int(port)), timeout=10)
    greeting = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
    client.sendall(greeting)
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    client.sendall(bytes([0x04, len(ready)]) + ready)  # a short command frame
    return client


def _hung_up(client: socket.socket, within_s: float) -> bool:
    """Whether the server closed the connection within ``within_s`` (its greeting is read and ignored)."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        client.settimeout(max(end - time.monotonic(), 0.01))
        try:
            if not client.recv(4096):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


@pytest.mark.fast
def test_a_frame_announcing_gigabytes_gets_its_sender_disconnected_before_allocation(receiver: Any) -> None:
    """ZMQ_MAXMSGSIZE: libzmq reads the 8-byte length of a frame and hangs up when it is over the
    cap, instead of allocating 4 GiB and waiting for them."""
    kind = b"PUSH" if _stranger_type(receiver) == zmq.PUSH else b"DEALER"
    with _zmtp_client(receiver.endpoint, kind) as control:  # the same, announcing a legal frame
        control.sendall(b"\x02" + struct.pack(">Q", 1000))
        assert not _hung_up(control, 1.0), "the receiver hung up on a legal frame length"
        with _zmtp_client(receiver.endpoint, kind) as client:
            client.sendall(b"\x02" + struct.pack(">Q", 4 << 30))  # a long frame, the last of its message
            assert _hung_up(client, 10.0), "the receiver kept a connection announcing a 4 GiB frame"
    peer = _RawRank(receiver)  # and the transport goes on
    try:
        dst = torch.zeros(3, dtype=torch.float64)
        pending = receiver.irecv(dst, 1)
        peer.send(torch.ones(3, dtype=torch.float64))
        receiver.wait(pending, time.monotonic() + 30)
        assert torch.equal(dst, torch.ones(3, dtype=torch.float64))
    finally:
        peer.close()


# --- the same during collectives: a stray process at a rank's port while a world all-reduces ---

STRAY_P = 3
BIG = (16 << 20) // 8 + 5  # float64 elements: a naive message of more than one 16 MiB body frame
ALGOS = ("ring", "ring_simple", "naive", "ps", "rhd", "rd")


def _stray(endpoint: str, kind: int, token: bytes, stop: threading.Event, sent: list[int]) -> None:
    """Rank 0's stray thread: forgeries to ``endpoint`` (rank 1's inbox) until ``stop``, claiming
    to be rank 0 with a believable seq and tag; and a raw client announcing a 4 GiB frame."""
    from ringcomm.algorithms.tags import Tag

    ctx, sock = _stranger(endpoint, kind, routing_id=b"rank:0")
    try:
        seq = 0
        while not stop.is_set():
            for tag in (Tag.RING, Tag.NAIVE, Tag.PS_PULL, Tag.RHD_HALVING, Tag.SCATTER_REDUCE, 12345):
                for frames in _forgeries(token, dst=1, src=0, seq=seq % 4, tag=int(tag), numel=7):
                    sock.send_multipart(frames)
                    sent[0] += 1
            seq += 1
            if seq % 20 == 1:
                sock.send(bytes(MAX_FRAME_BYTES + 1))
                if endpoint.startswith("tcp://"):
                    with _zmtp_client(endpoint, b"PUSH" if kind == zmq.PUSH else b"DEALER") as raw:
                        raw.sendall(b"\x02" + struct.pack(">Q", 8 << 30))
                        _hung_up(raw, 2.0)
            time.sleep(0.002)
    finally:
        sock.close(0)
        ctx.term()


def _under_a_stray(rank: int, p: int) -> dict:
    """Every rank: collectives of every algorithm while rank 0's stray thread hits rank 1's inbox."""
    import contextlib
    import io

    import ringcomm

    transport = ringcomm.init("zmq")
    failures: list[str] = []
    stop, sent = threading.Event(), [0]
    thread = None
    if rank == 0:
        thread = threading.Thread(
            target=_stray,
            args=(transport._endpoints[1], _stranger_type(transport), transport.token, stop, sent),
            daemon=True,
        )
        thread.start()
    log = io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            if rank == 1:  # the stray's first messages are there before the first collective
                deadline = time.monotonic() + 60
                while getattr(transport, "dropped", 0) < 1 and time.monotonic() < deadline:
                    transport._read_one(100)
            for round_ in range(2):
                for algo in ALGOS:
                    for numel in (1, 1000, BIG if algo == "naive" and round_ == 0 else 5):
                        x = torch.arange(numel, dtype=torch.float64) * (rank + 1) + round_
                        ringcomm.all_reduce(x, algo=algo, transport="zmq", timeout=120)
                        expected = torch.arange(numel, dtype=torch.float64) * (p * (p + 1) // 2) + p * round_
                        if not torch.equal(x, expected):
                            wrong = int((x != expected).sum())
                            failures.append(f"rank {rank} {algo} numel {numel}: {wrong} elements wrong")
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=30)
    said = [line for line in log.getvalue().splitlines() if "this world's token" in line]
    return {"failures": failures, "dropped": getattr(transport, "dropped", 0), "said": said, "sent": sent[0]}


def test_a_stray_process_at_a_ranks_port_cannot_disturb_collectives() -> None:
    """Junk, oversized and forged frames (claiming rank 0, believable seq and tags, the earlier
    format, a wrong token, the old ``rank:0`` identity) at rank 1's TCP port while every algorithm
    runs: every result is exact, rank 1 dropped what reached it, and said so once."""
    from ringcomm.tools.spawn import run_world

    reports = run_world(_under_a_stray, STRAY_P, timeout=300, env={"RINGCOMM_ZMQ_IPC": "0"})
    flat = [f for report in reports for f in report["failures"]]
    assert not flat, "\n".join(flat[:20])
    assert reports[0]["sent"] > 0
    assert reports[1]["dropped"] > 0, reports[1]
    assert len(reports[1]["said"]) == 1, reports[1]["said"]
    assert [r["dropped"] for r in (reports[0], reports[2])] == [0, 0]


@pytest.mark.fast
def test_a_body_longer_than_one_frame_travels_in_pieces_bit_for_bit() -> None:
    """Bodies are cut into frames of at most BODY_FRAME_BYTES (the inbox refuses longer ones)."""
    from ringcomm.transports.wire import BODY_FRAME_BYTES, body_frames

    with standalone(0, 2) as a, standalone(1, 2, token=a.token) as b:
        a.set_peers({1: b.endpoint})
        b.set_peers({0: a.endpoint})
        deadline = time.monotonic() + 60
        for nbytes in (BODY_FRAME_BYTES, 2 * BODY_FRAME_BYTES + 8):
            x = torch.randint(-(2**62), 2**62, (nbytes // 8,), dtype=torch.int64)
            y = torch.zeros_like(x)
            pending = b.irecv(y, 0, tag=6)
            a.wait(a.isend(x, 1, tag=6), deadline)
            b.wait(pending, deadline)
            assert torch.equal(x, y), nbytes
        assert body_frames(2 * BODY_FRAME_BYTES + 8) == 3 and body_frames(0) == 1
