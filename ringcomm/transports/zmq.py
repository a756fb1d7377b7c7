r"""ZmqTransport: the Transport protocol over ZeroMQ, a preamble, a msgpack header and a raw body.

The algorithms (ring, ring_simple, naive, ps) run over it unchanged: it offers
the same ``isend`` / ``irecv`` / ``wait`` as ``TorchTransport``, for CPU tensors.

**One message** is one ZeroMQ multipart message (the format is ``wire.py``'s)::

    as sent by the PUSH socket of rank 2 to rank 3:
      +---------------------------------------------------------------+
      | frame 0: preamble, 20 bytes: this world's token | src rank 2  |
      +---------------------------------------------------------------+
      | frame 1: header, a msgpack map (~70 bytes, at most 256)       |
      |   {"v": 2, "src": 2, "dst": 3, "tag": 0, "seq": 17,           |
      |    "dtype": "float32", "shape": [262144], "nbytes": 1048576}  |
      +---------------------------------------------------------------+
      | frame 2..: body, the tensor's raw bytes (nbytes, native       |
      |   order) in pieces of at most 16 MiB; zero-copy when >= 512 KiB|
      +---------------------------------------------------------------+

``seq`` counts messages per (source, destination, tag) from 0: the receiver
expects exactly the next one, so a lost, duplicated or replayed message is
caught, not silently reduced twice.

**Topology.** Each rank binds one PULL socket, its inbox, once. To send to peer
j it uses a PUSH socket connected to j's inbox, made on the first send to j (a
ring makes one, the root of ``naive`` makes P-1)::

        rank 0                         rank 1
      +--------------+              +--------------+
      | PUSH to 1    | -----------> | PULL inbox   | bound to ipc://<tmpdir>/rank1
      | PULL inbox   | <----------- | PUSH to 0    |   (or tcp://127.0.0.1:<port>, or
      +--------------+              +--------------+    tcp://$RINGCOMM_ZMQ_HOST:<port>)

No socket has a routing identity: who sent a message is what its preamble says,
believed only because the preamble carries the token (below). (An earlier
version used ROUTER/DEALER with ``b"rank:<r>"`` identities that each DEALER
declared itself, and ``router_handover``: any process that connected first, or
last, with ``b"rank:1"`` took rank 1's place.)

**Strangers.** Anything that can reach the inbox (a stray client, port
scanners, a zombie rank of a crashed job whose port was reused) can send it
frames. So:

- each transport set-up mints a **token** (16 random bytes, on rank 0; the
  others read it from the store with the endpoints), and every message starts
  with it. A message without it is dropped unread, counted in ``dropped``, and
  the first one is printed to stderr (once per transport: a flood must not
  flood the log). It never fails a collective.
- the inbox refuses frames longer than ``wire.MAX_FRAME_BYTES`` (16 MiB, the
  largest frame a rank ever sends: bodies travel in pieces of at most that):
  ``ZMQ_MAXMSGSIZE``, checked by libzmq on a frame's length prefix before it
  allocates anything; the sender is disconnected.
- only the tags of ``tags.Tag`` (and 0, the protocol's default) are accepted,
  on either side, so the arrival queues below have at most (P-1) x 11 keys.

A message *with* the token comes from a rank of this world; one that breaks the
format there is a bug, and raises ``FrameError`` (below).

**Progress without threads of our own.** ``wait`` drives everything: it reads
whole messages from the inbox (a blocking read bounded by the time left to the
deadline, ``ZMQ_RCVTIMEO``), validates each, and matches it first in, first
out with the receives posted for its (peer, tag). A message whose receive is not
posted yet is kept, zero-copy, in an arrival queue for that (peer, tag), and the
``irecv`` that comes later takes it at once. Reading only when a receive is
posted would not work: the pipelined ring keeps several receives per peer in
flight on two tags, and a tag-1 message at the head of the socket would block
the tag-0 receive behind it. ZeroMQ's own I/O thread keeps reading the network
into the socket's queue (no high-water mark) whether or not Python is in
``wait``, so a sender never waits on the receiver's Python code.

**A dead peer.** ZeroMQ never reports one: a PUSH socket reconnects quietly. So
``wait`` reads in slices of one heartbeat interval and, between slices, asks
``liveness.py`` whether the awaited peer still heartbeats through the store;
one silent for ``RINGCOMM_LIVENESS_S`` fails the wait with ``PeerError``.

**Copies.** Sends of 512 KiB or more go zero-copy (``copy=False``) and complete
when ZeroMQ releases the buffer, seen through pyzmq's ``MessageTracker``; the
``_SendOp`` keeps the tensor alive until then. (pyzmq signals that release from
its own process-wide daemon thread, "pyzmq garbage collector", started at the
first zero-copy send; it is pyzmq's, not ours, and outlives ``close``.) Smaller
sends are copied into the message and complete at once: below about 512 KiB a
memcpy costs less than the two thread wake-ups a tracked send waits for. The
body is received as zero-copy ``zmq.Frame`` pieces, their total length checked
against the validated header and the posted tensor, and only then copied into
the tensor: one copy, the same count as ``Socket.recv_into`` (libzmq copies out
of its message there too), but ``recv_into`` would write a too-long or
too-short body into the tensor before we could see its length.

**Closing.** A send "complete" here may still sit in ZeroMQ's queue (every
copied send does, for a moment), so a rank that closes right after its last
collective, and exits, must let ZeroMQ finish writing: ``close`` gives each
PUSH socket up to ``CLOSE_LINGER_S`` (5 s) to hand its queued messages to the
kernel, and ``Context.term`` waits for that. Closing with linger 0 used to drop
them: a rank that called ``ringcomm.shutdown()`` and exited right after a naive
all_reduce left a peer waiting for the result until its liveness limit. After a
failed wait or send (the world is broken: peers may be gone) it closes with
linger 0 and does not wait at all.

**Validation.** Nothing is ever unpickled. The header codec lives in
``wire.py``; on top of it this transport checks the preamble names another rank
of the world, the frame count, the tag, the expected ``seq``, the body length,
and that dtype and element count match the posted tensor. Any failure raises
``FrameError`` naming the peer and the field. The message is dropped, the
destination tensor is not written, and the transport goes on serving
well-formed messages.

**Rendezvous** (collective: every rank makes the transport, in the same order,
after ``rendezvous.py`` has checked that all ranks asked for it) goes through the
store of the default process group: each rank publishes its hostname (rank 0
with this set-up's token), then binds and publishes its endpoint under the key
prefix of this set-up. Where it binds:

- ``RINGCOMM_ZMQ_HOST`` (or ``host=``) set: TCP on that address, for multi-host runs;
- all hostnames equal: ``ipc://`` (a Unix socket in a private temporary
  directory, removed by ``close``), or ``tcp://127.0.0.1`` on a kernel-chosen port
  if ``RINGCOMM_ZMQ_IPC=0`` (or ``ipc=False``). IPC is the default because it
  took less CPU per byte than loopback TCP here (no TCP stack, no ACKs), which is
  what counts when ranks share cores;
- otherwise: TCP on the local address that routes to ``MASTER_ADDR``.

Ports are always chosen by the kernel (``bind_to_random_port``), never fixed.

Example::

    >>> dist.init_process_group("gloo")
    >>> ringcomm.all_reduce(t, algo="ring", transport="zmq")  # makes a ZmqTransport on first use
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
import zmq

from ..algorithms.tags import Tag
from ..errors import CommTimeoutError, FrameError, PeerError
from ..runtime.liveness import Liveness
from ..runtime.settings import env_bool
from .base import Pending, PendingOp, PointToPoint, TransportStats, register_transport
from .wire import (
    DTYPE_NAMES,
    DTYPES,
    MAX_FRAME_BYTES,
    PREAMBLE_BYTES,
    TOKEN_BYTES,
    Header,
    body_frames,
    body_pieces,
    decode_header,
    encode_header,
    encode_preamble,
    new_token,
    read_preamble,
)

__all__ = ["ZmqTransport", "ZERO_COPY_MIN_BYTES", "SOCKET_BUFFER_BYTES", "CLOSE_LINGER_S", "KNOWN_TAGS"]

#: Sends of at least this many bytes go zero-copy; smaller ones are copied.
ZERO_COPY_MIN_BYTES = 512 * 1024
#: Kernel socket buffer asked for on every socket, in bytes (Linux caps it at
#: net.core.wmem_max / rmem_max). The default 208 KiB of a Unix socket costs a
#: wake-up of both I/O threads every 208 KiB; 4 MiB lets a 1 MiB segment pass in one.
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
#: Seconds a clean ``close`` lets each PUSH socket finish writing what is queued (ZMQ_LINGER).
#: A peer alive to need the data takes milliseconds; the bound is for one that is gone.
CLOSE_LINGER_S = 5.0
#: The tags a message may carry: every ``tags.Tag``, and 0 (``isend``'s default, for direct use).
KNOWN_TAGS = frozenset({0, *(int(t) for t in Tag)})


class _SendOp:
    """A posted send: the tracker (None once complete) and the tensor it keeps alive."""

    __slots__ = ("tensor", "tracker")

    def __init__(self, tensor: torch.Tensor, tracker: zmq.MessageTracker | None) -> None:
        self.tensor = tensor
        self.tracker = tracker


class _RecvOp:
    """A posted receive; ``done`` once filled, or failed with ``error``."""

    __slots__ = ("tensor", "peer", "tag", "done", "error")

    def __init__(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        self.tensor = tensor
        self.peer = peer
        self.tag = tag
        self.done = False
        self.error: FrameError | None = None


def _address_towards(target: str) -> str:
    """The local IPv4 address the kernel would use to reach ``target`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(target), 9))
        return probe.getsockname()[0]


class ZmqTransport(PointToPoint):
    """Point-to-point over ZeroMQ: PULL inbox per rank, PUSH per peer, progress in ``wait``.

    Made by the session (``ringcomm.init("zmq")`` or the first ``all_reduce``
    with ``transport="zmq"``), collectively, through the default group's store
    (the tests make one without it: ``tests/zmq_standalone.py``). Use one thread at a time:
    ZeroMQ sockets are not thread-safe, and ``wait`` is where all progress
    happens (the comm queue guarantees it).

    Args:
        setup: the session's ``SetupContext`` (store, rank, world size, liveness, key prefix).
        host: address to bind and advertise (multi-host runs); default
            ``RINGCOMM_ZMQ_HOST``, else 127.0.0.1 when all ranks share a host.
        ipc: bind ``ipc://`` rather than TCP when all ranks share a host; default
            ``RINGCOMM_ZMQ_IPC`` (``1``/``0``), else True.

    Attributes:
        endpoint: the address peers connect to.
        token: this world's token (``wire.py``): only messages that carry it are read.
        dropped: messages dropped unread because they did not carry the token.
    """

    def __init__(self, setup: Any, *, host: str | None = None, ipc: bool | None = None) -> None:
        self._open(setup.rank, setup.world_size, b"")  # the token comes with the rendezvous
        try:
            self._rendezvous(setup, host, ipc)
        except BaseException:
            self.close()
            raise
        self.liveness = setup.liveness

    # --- setup ---

    def _open(self, rank: int, world_size: int, token: bytes) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        self.device_type = "cpu"
        self.rank = rank
        self.world_size = world_size
        self.stats = TransportStats()
        self.endpoint = ""
        self.token = token
        self.dropped = 0
        self.zero_copy_min_bytes = ZERO_COPY_MIN_BYTES
        self.close_linger_s = CLOSE_LINGER_S
        self._endpoints: dict[int, str] = {}
        self._outboxes: dict[int, zmq.Socket] = {}
        self._send_seq: dict[tuple[int, int], int] = {}
        self._recv_seq: dict[tuple[int, int], int] = {}
        self._posted: dict[tuple[int, int], deque[_RecvOp]] = {}
        self._arrived: dict[tuple[int, int], deque[tuple[Header, list[zmq.Frame]]]] = {}
        self._ipc_dir: str | None = None
        self._closed = False
        self._failed = False  # a wait or send failed: the world is broken, close drops what is queued
        self._context = zmq.Context(io_threads=1)
        self._inbox = self._context.socket(zmq.PULL)
        self._inbox.linger = 0  # it never sends
        self._inbox.rcvhwm = 0  # no limit: the I/O thread always drains the network
        self._inbox.maxmsgsize = MAX_FRAME_BYTES  # a longer frame disconnects its sender, unallocated
        self._inbox.rcvbuf = SOCKET_BUFFER_BYTES
        self._rcvtimeo_ms = -1  # the inbox's ZMQ_RCVTIMEO now: -1 blocks forever
        self.liveness: Liveness | None = None  # set when joined through the store

    def _bind(self, base: str) -> None:
        if base.startswith("ipc://"):
            self._ipc_dir = tempfile.mkdtemp(prefix="ringcomm-zmq-")
            # Transports cached by get_transport are rarely closed by hand: remove the folder
            # at interpreter exit too (a killed process still leaves it; /tmp is cleaned by the OS).
            atexit.register(shutil.rmtree, self._ipc_dir, True)
            self.endpoint = f"ipc://{self._ipc_dir}/rank{self.rank}"
            self._inbox.bind(self.endpoint)
        elif base.startswith("tcp://"):
            address = socket.gethostbyname(base[len("tcp://") :])
            port = self._inbox.bind_to_random_port(f"tcp://{address}")
            self.endpoint = f"tcp://{address}:{port}"
        else:
            raise ValueError(f"bind must be 'tcp://<address>' or 'ipc://', got {base!r}")

    def _rendezvous(self, setup: Any, host: str | None, ipc: bool | None) -> None:
        # setup.gather: keys unique to this set-up (rendezvous.py numbers them), a wait that ends at once
        # when a peer dies or fails its own half of the set-up. Rank 0 mints this set-up's token and
        # sends it along with its hostname: a store round trip saved, and the token is in the store
        # before any rank binds, so no rank reads a message before it knows which ones are foreign.
        mine = socket.gethostname()
        if self.rank == 0:
            mine = f"{new_token().hex()} {mine}"
        answers = setup.gather("zmq/host", mine)
        token_hex, _, first_host = answers[0].partition(" ")
        try:
            token = bytes.fromhex(token_hex)
        except ValueError:
            token = b""
        if len(token) != TOKEN_BYTES:
            raise PeerError(self.rank, 0, "zmq rendezvous", f"rank 0 published no valid token: {answers[0][:80]!r}")
        self.token = token
        hosts = {first_host, *answers[1:]}
        host = host or os.environ.get("RINGCOMM_ZMQ_HOST") or None
        if ipc is None:
            ipc = env_bool("RINGCOMM_ZMQ_IPC", None)
        if host is not None:
            self._bind(f"tcp://{host}")
        elif len(hosts) == 1:
            self._bind("tcp://127.0.0.1" if ipc is False else "ipc://")
        else:
            self._bind(f"tcp://{_address_towards(os.environ.get('MASTER_ADDR', socket.gethostname()))}")
        endpoints = setup.gather("zmq/endpoint", self.endpoint)
        self.set_peers({r: e for r, e in enumerate(endpoints) if r != self.rank})

    def set_peers(self, endpoints: Mapping[int, str]) -> None:
        """Record where each peer's inbox is (``{rank: endpoint}``); PUSH sockets connect on first send."""
        for peer, endpoint in endpoints.items():
            self._check_peer(peer)
            self._endpoints[peer] = endpoint

    def _check_peer(self, peer: int) -> None:
        if type(peer) is not int or not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(
                f"rank {self.rank}: peer {peer!r} is not another rank of a world of {self.world_size}"
            )

    def _check_tag(self, tag: int) -> int:
        if not isinstance(tag, int) or isinstance(tag, bool) or int(tag) not in KNOWN_TAGS:
            raise ValueError(
                f"rank {self.rank}: tag {tag!r} is not a known tag; allowed: {sorted(KNOWN_TAGS)} (tags.Tag)"
            )
        return int(tag)

    def _outbox(self, peer: int) -> zmq.Socket:
        sock = self._outboxes.get(peer)
        if sock is None:
            endpoint = self._endpoints.get(peer)
            if endpoint is None:
                raise PeerError(self.rank, peer, PendingOp.SEND, "no endpoint known for this peer")
            sock = self._context.socket(zmq.PUSH)
            sock.linger = 0  # until close, which decides how long to flush
            sock.sndhwm = 0  # no limit: isend never blocks; memory is the tensors themselves
            sock.sndbuf = SOCKET_BUFFER_BYTES
            sock.connect(endpoint)
            self._outboxes[peer] = sock
        return sock

    # --- the Transport protocol ---

    def _check_tensor(self, tensor: torch.Tensor, op: str) -> None:
        if tensor.device.type != "cpu":
            raise ValueError(
                f"rank {self.rank}: ZmqTransport.{op} needs a CPU tensor, got one on {tensor.device}"
            )
        if not tensor.is_contiguous():
            raise ValueError(f"rank {self.rank}: ZmqTransport.{op} needs a contiguous tensor")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(
                f"rank {self.rank}: dtype {tensor.dtype} cannot travel; allowed: {', '.join(DTYPES)}"
            )

    def isend(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        """Queue ``tensor`` for ``peer``; never blocks. The tensor must not change until waited."""
        self._check_peer(peer)
        self._check_tensor(tensor, "isend")
        tag = self._check_tag(tag)
        nbytes = tensor.numel() * tensor.element_size()
        key = (peer, tag)
        seq = self._send_seq.get(key, 0)
        header = encode_header(Header(self.rank, peer, tag, seq, tensor.dtype, tuple(tensor.shape), nbytes))
        raw = tensor.detach().reshape(-1).view(torch.uint8).numpy() if nbytes else b""
        pieces = body_pieces(memoryview(raw))
        zero_copy = nbytes >= self.zero_copy_min_bytes
        sock = self._outbox(peer)
        try:
            sock.send(encode_preamble(self.token, self.rank), zmq.SNDMORE | zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # nothing was queued: the socket is as it was
            self._failed = True
            raise PeerError(self.rank, peer, PendingOp.SEND, f"ZeroMQ refused the message: {exc}") from exc
        try:
            sock.send(header, zmq.SNDMORE)
            trackers = [
                sock.send(piece, zmq.SNDMORE if i < len(pieces) - 1 else 0, copy=not zero_copy, track=zero_copy)
                for i, piece in enumerate(pieces)
            ]
        except BaseException as exc:
            # The first frames are queued with SNDMORE: this socket now expects the rest of a
            # message, and the next preamble would be glued onto it. Throw the socket away (its
            # half message with it); the next send to this peer connects a fresh one.
            self._outboxes.pop(peer, None)
            sock.close(linger=0)
            self._failed = True
            if not isinstance(exc, Exception):
                raise  # a Ctrl-C stays a KeyboardInterrupt, not a peer's failure
            raise PeerError(self.rank, peer, PendingOp.SEND, f"ZeroMQ failed half-way through a message: {exc}") from exc
        self._send_seq[key] = seq + 1
        self.stats.count_send(peer, nbytes)
        return Pending(PendingOp.SEND, peer, _SendOp(tensor, zmq.MessageTracker(*trackers) if zero_copy else None))

    def irecv(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> Pending:
        """Post a receive of the next message from ``peer`` on ``tag`` into ``tensor``."""
        self._check_peer(peer)
        self._check_tensor(tensor, "irecv")
        tag = self._check_tag(tag)
        op = _RecvOp(tensor, peer, tag)
        key = (peer, tag)
        arrived = self._arrived.get(key)
        if arrived:  # it came before we asked: take it now
            header, body = arrived.popleft()
            self._deliver(op, header, body)
        else:
            self._posted.setdefault(key, deque()).append(op)
        self.stats.count_recv(peer, tensor.numel() * tensor.element_size())
        return Pending(PendingOp.RECV, peer, op)

    def wait_message(self, pending: Pending, deadline: float) -> None:
        """Drive progress until ``pending`` completes; CommTimeoutError at ``deadline``.

        Raises:
            CommTimeoutError: ``deadline`` (a ``time.monotonic()`` value) passed first.
            PeerError: the peer stopped heartbeating or gave up on this call.
            FrameError: a malformed message of this world arrived meanwhile (from any
                peer), or the message for this receive did not fit its tensor (the
                transport goes on). Foreign messages (without the token) never raise.
        """
        try:
            self._wait(pending, deadline)
        except BaseException:
            self._failed = True  # the collective failed: close() will not wait to flush to this world
            raise

    def _wait(self, pending: Pending, deadline: float) -> None:
        start = time.monotonic()
        timeout = max(deadline - start, 0.0)
        op = pending.handle
        live = self.liveness
        # Wait in slices of one heartbeat interval, and between slices ask whether the
        # peer still heartbeats (liveness.py): a dead or frozen peer fails this wait in
        # RINGCOMM_LIVENESS_S, not at the timeout. Without liveness: one slice. The
        # deadline and the slice are checked on every turn, not only when a read comes
        # back empty: a stranger's flood of foreign messages must not keep a wait alive.
        slice_s = live.interval_s if live is not None else math.inf
        next_check = start + slice_s
        if isinstance(op, _SendOp):
            while op.tracker is not None:
                now = time.monotonic()
                if now >= deadline:
                    raise CommTimeoutError(
                        self.rank, pending.peer, PendingOp.SEND, timeout, "ZeroMQ still holds the message"
                    )
                if now >= next_check:
                    live.check(pending.peer, PendingOp.SEND)  # type: ignore[union-attr]
                    next_check = now + slice_s
                try:
                    op.tracker.wait(max(min(deadline, next_check) - now, 1e-3))
                    op.tracker = None
                except zmq.NotDone:
                    pass
            return
        while not op.done:
            now = time.monotonic()
            if now >= deadline:
                raise CommTimeoutError(
                    self.rank, op.peer, PendingOp.RECV, timeout, f"no message with tag {op.tag} arrived"
                )
            if now >= next_check:
                live.check(op.peer, PendingOp.RECV)  # type: ignore[union-attr]
                next_check = now + slice_s
            # A blocking read bounded by the time left (ZMQ_RCVTIMEO): one system call
            # when a message is there, and no busy loop when none is.
            self._read_one(max(1, math.ceil((min(deadline, next_check) - now) * 1000)))
        if op.error is not None:
            raise op.error

    # --- progress: read, validate, match ---

    def _read_one(self, timeout_ms: int) -> bool:
        """Read and handle one whole message, waiting up to ``timeout_ms`` (ms); False if none came."""
        if timeout_ms != self._rcvtimeo_ms:
            self._inbox.rcvtimeo = self._rcvtimeo_ms = timeout_ms
        try:
            frames = self._inbox.recv_multipart(copy=False)
        except zmq.Again:
            return False
        # len() first: a foreign frame 0 may be megabytes, not worth copying to look at
        peer = read_preamble(frames[0].bytes, self.token) if len(frames[0]) == PREAMBLE_BYTES else None
        if peer is None:
            self._drop(frames)
            return True
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise FrameError(
                self.rank, peer, "src", f"the preamble names rank {peer}, not another rank of this world"
            )
        if len(frames) < 3:
            raise FrameError(
                self.rank, peer, "frames", f"{len(frames)} frames, expected a preamble, a header and a body"
            )
        header = decode_header(frames[1].bytes, rank=self.rank, world_size=self.world_size, peer=peer)
        if header.tag not in KNOWN_TAGS:
            raise FrameError(self.rank, peer, "tag", f"tag {header.tag} is not one of {sorted(KNOWN_TAGS)}")
        body = frames[2:]
        if len(body) != body_frames(header.nbytes):
            raise FrameError(
                self.rank,
                peer,
                "frames",
                f"body in {len(body)} frames, {header.nbytes} bytes travel in {body_frames(header.nbytes)}",
            )
        key = (peer, header.tag)
        expected = self._recv_seq.get(key, 0)
        if header.seq != expected:
            raise FrameError(
                self.rank,
                peer,
                "seq",
                f"sequence number {header.seq} on tag {header.tag}, expected {expected} "
                "(message lost, duplicated or replayed)",
            )
        length = sum(len(piece) for piece in body)
        if length != header.nbytes:
            raise FrameError(self.rank, peer, "body", f"{length} bytes, the header announced {header.nbytes}")
        self._recv_seq[key] = expected + 1
        posted = self._posted.get(key)
        if posted:
            self._deliver(posted.popleft(), header, body)
        else:
            self._arrived.setdefault(key, deque()).append((header, body))
        return True

    def _drop(self, frames: list[zmq.Frame]) -> None:
        """Drop a foreign message (no token); say so on stderr the first time only."""
        self.dropped += 1
        if self.dropped > 1:
            return
        try:
            source = f" from {frames[0].get('Peer-Address')}"  # TCP only: libzmq knows the address
        except (zmq.ZMQError, AttributeError):
            source = ""
        print(
            f"ringcomm: rank {self.rank}: dropped a message{source} to {self.endpoint} that does not carry "
            f"this world's token ({len(frames)} frames, the first {len(frames[0])} bytes): a stray "
            "process, or one left from a job that used this address before? Later ones are dropped "
            "without a word (counted in ZmqTransport.dropped)",
            file=sys.stderr,
            flush=True,
        )

    def _deliver(self, op: _RecvOp, header: Header, body: list[zmq.Frame]) -> None:
        """Copy a validated message into ``op.tensor``, or fail ``op`` if it does not fit."""
        tensor = op.tensor
        if header.dtype != tensor.dtype:
            op.error = FrameError(
                self.rank,
                op.peer,
                "dtype",
                f"message carries {DTYPE_NAMES[header.dtype]}, receive expects {tensor.dtype}",
            )
        elif math.prod(header.shape) != tensor.numel():
            op.error = FrameError(
                self.rank,
                op.peer,
                "shape",
                f"message shape {list(header.shape)} has {math.prod(header.shape)} elements, "
                f"receive expects {tensor.numel()} (shape {list(tensor.shape)})",
            )
        elif header.nbytes:
            out = memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())
            at = 0
            for piece in body:
                out[at : at + len(piece)] = piece.buffer
                at += len(piece)
        op.done = True

    # --- teardown ---

    def close(self) -> None:
        """Close the sockets, terminate the context, remove any ipc files.

        After a clean run each PUSH socket first gets up to ``close_linger_s`` seconds to
        write out what is still queued (``Context.term`` returns once all have), so the
        last sends of the last collective reach their peers even if this process exits
        right after. After a failed wait or send nothing is flushed (linger 0).
        """
        if getattr(self, "_closed", True):
            return
        self._closed = True
        linger_ms = 0 if self._failed else max(0, int(self.close_linger_s * 1000))
        for sock in self._outboxes.values():
            sock.close(linger=linger_ms)
        self._inbox.close(linger=0)
        self._context.term()
        self._outboxes.clear()
        self._posted.clear()
        self._arrived.clear()
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def __enter__(self) -> ZmqTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


register_transport(
    "zmq",
    lambda device_type, setup: ZmqTransport(setup),
    devices=("cpu",),
    summary="ZeroMQ: a token preamble, a msgpack header and raw body frames per message (CPU tensors)",
)
