r"""ShmTransport: the Transport protocol through shared memory, for ranks on one host.

On one host Gloo moves every byte through TCP loopback: a copy into the kernel
and a copy out, and its waiters poll. Here a message is copied once into a
queue in shared memory by its sender, and the receiver copies it out, or
reduces it straight out of the queue into its tensor::

    rank 0's segment (its inbox), mapped by every rank
    +----------+----------------------------+----------------------------+---
    | doorbell | queue from rank 1          | queue from rank 2          | ...
    |  (futex) | head | tail | slot0 slot1 .| head | tail | slot0 slot1 .|
    +----------+----------------------------+----------------------------+---

**Queues.** Each (sender, receiver) pair has its own single-producer,
single-consumer ring of ``slots`` fixed slots of ``slot_bytes`` each, in the
receiver's segment. The sender writes a slot (a 64-byte header, then data) and
then advances ``tail``; the receiver reads slots from ``head`` to ``tail`` and
then advances ``head``. Each counter has one writer, so no atomic
read-modify-write is needed: on x86-64 an aligned 8-byte store is atomic, and
stores become visible in program order (TSO), so a receiver that sees the new
``tail`` sees the slot written before it. (That ordering is why the transport
refuses to run on other architectures.) A message larger than a slot streams
through the ring in fragments, as the receiver frees slots.

**Header** (every fragment; the receiver validates it before touching data)::

    magic u32 | dtype u8 | pad u8 x3 | tag u32 | pad u32 | seq u64 | total u64 | offset u64 | length u32

(``dtype``: the code of ``wire.DTYPE_TABLE``, fixed per dtype, shared with the ZeroMQ format's table.)

``seq`` counts messages per queue, ``total`` is the message's bytes,
``offset``/``length`` place the fragment. A header that disagrees with what
the receiver expects (the posted tensor's dtype and size, the next ``seq``, the
tag, the next offset, a length that fits the slot) raises ``FrameError``
naming the peer and the field; so do counters that claim more than ``slots``
fragments are waiting. Everything read from shared memory is bounds-checked
before use: hostile bytes make an error, never a crash. (The data bytes
themselves are not checksummed.)

**Doorbell** (``shm.Doorbell``). A rank that finds nothing to do sleeps in
``futex`` on the 32-bit doorbell at the start of its own segment, with a
timeout; whoever gives it something to do (a sender that published a fragment,
a receiver that freed a slot it was waiting for) rings it. When every rank can
have a core of its own it first looks again for ``RINGCOMM_SHM_SPIN_US`` (50 µs):
a peer on another core answers within that, and a futex wake-up costs about
60 µs on the machine we measure on (a round trip of two small messages took
122 µs sleeping at once, 35 µs looking first). Four ranks on two cores: a
waiting rank sleeps at once; it never spins while its peer needs the core.

**Progress** happens in ``wait``: whatever it waits for, it pushes every
pending send as far as free slots allow and consumes every posted receive whose
data has arrived, oldest first on each queue, as Gloo writes a receive whenever
its data comes. A reduce is applied only when it is waited on (after any reduce
posted into the same tensor before it), as ``PointToPoint`` does, so algorithms
order what lands in a tensor by the order they wait. Consuming in every wait
matters: two ranks that each wait for a send larger than the queue must drain
each other's queues meanwhile, or both wait forever.

**Liveness and timeouts** as on ZeroMQ: a wait sleeps in slices of one
heartbeat and asks ``liveness.py`` about the peer it depends on between
slices; a dead or frozen peer fails the wait in ``RINGCOMM_LIVENESS_S``.

**Nothing leaks.** Set-up (collective, through ``setup.gather``: the store,
watched, so a rank that dies or fails its half of the set-up ends the others'
wait at once, naming it): every rank checks
that all ranks share its host (hostname and boot id; else ``ValueError``
naming them) and use the same queues (slots and slot bytes; else
``ValueError`` naming both layouts), then ``shm.share_segments`` makes (with
every page reserved: a ``/dev/shm`` too small is an ``OSError`` on every rank,
never a SIGBUS; see ``shm.py`` for containers' ``--shm-size``), maps and
unlinks the segments: even ``kill -9`` of every rank leaves nothing in
``/dev/shm`` (one killed during set-up leaves its segment until the next
set-up sweeps it), and no file descriptor stays open. No thread of its own.
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import CommTimeoutError, FrameError, who_said_what
from ..ops import reduce_into
from ..runtime.settings import env_int
from .base import Message, MessageKind, Pending, PendingOp, TransportStats, register_transport
from .segments import Doorbell, bell_wait, fence, host_identity, require_x86_linux, share_segments, unmap
from .wire import CODE_DTYPES, DTYPE_CODES, DTYPE_NAMES, DTYPES

__all__ = ["ShmTransport", "DEFAULT_SLOT_BYTES", "DEFAULT_SLOTS", "DEFAULT_SPIN_US", "segment_bytes"]

#: Bytes of data per slot (RINGCOMM_SHM_SLOT_BYTES), and slots per queue (RINGCOMM_SHM_SLOTS).
DEFAULT_SLOT_BYTES = 1 << 20
DEFAULT_SLOTS = 4
#: Microseconds a waiting rank looks again before it sleeps, when ranks <= cores (RINGCOMM_SHM_SPIN_US).
DEFAULT_SPIN_US = 50

_LINE = 64  # a cache line: counters on lines of their own, headers one line each
_HEADER = struct.Struct("<IB3xI4xQQQI")  # magic, dtype, tag, seq, total, offset, length
_MAGIC = 0x51434D52  # "RMCQ"


def _queue_bytes(slots: int, slot_bytes: int) -> int:
    return 2 * _LINE + slots * (_LINE + slot_bytes)


def segment_bytes(world_size: int, slots: int, slot_bytes: int) -> int:
    """Size of one rank's segment: a doorbell line and one queue per other rank."""
    return _LINE + (world_size - 1) * _queue_bytes(slots, slot_bytes)


class _Queue:
    """Views of one (sender -> receiver) queue inside the receiver's mapped segment.

    Line 0 (the receiver writes): ``head``. Line 1 (the sender writes): ``tail``, and
    ``wanted``, up while the sender waits for a free slot: only then does the
    receiver ring it after freeing one (a ring that wakes a rank with nothing to do
    costs a context switch, and with more ranks than cores every one counts).
    """

    __slots__ = ("ctl", "headers", "data", "typed", "slots", "slot_bytes")

    def __init__(self, buf: memoryview, base: int, slots: int, slot_bytes: int) -> None:
        # 8-byte items: ctl[0] = head, ctl[8] = tail (one line later), ctl[9] = wanted. An aligned
        # 8-byte item is loaded and stored by one instruction.
        self.ctl = buf[base : base + 2 * _LINE].cast("Q")
        self.slots, self.slot_bytes = slots, slot_bytes
        first = base + 2 * _LINE
        stride = _LINE + slot_bytes
        self.headers = [buf[first + i * stride : first + i * stride + _LINE] for i in range(slots)]
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=slots * stride, offset=first)
        self.data = [raw[i * stride + _LINE : (i + 1) * stride] for i in range(slots)]
        self.typed: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def view(self, slot: int, dtype: torch.dtype) -> torch.Tensor:
        """Slot ``slot``'s data as ``dtype`` elements (made once per slot and dtype)."""
        v = self.typed.get((slot, dtype))
        if v is None:
            v = self.typed[slot, dtype] = self.data[slot][
                : (self.slot_bytes // dtype.itemsize) * dtype.itemsize
            ].view(dtype)
        return v

    def capacity(self, dtype: torch.dtype) -> int:
        """Elements of ``dtype`` one fragment carries."""
        return self.slot_bytes // dtype.itemsize


class _Send:
    __slots__ = ("flat", "peer", "tag", "seq", "code", "offset", "done")

    def __init__(self, tensor: torch.Tensor, peer: int, tag: int, seq: int) -> None:
        self.flat = tensor.view(-1)
        self.peer, self.tag, self.seq, self.code = peer, tag, seq, DTYPE_CODES[tensor.dtype]
        self.offset = 0  # elements already written
        self.done = False


class _Recv:
    __slots__ = ("flat", "shape", "peer", "tag", "op", "before", "offset", "done")

    def __init__(self, tensor: torch.Tensor, peer: int, tag: int, op: str, before: _Recv | None) -> None:
        self.flat, self.shape = tensor.view(-1), tuple(tensor.shape)
        self.peer, self.tag, self.op, self.before = peer, tag, op, before
        self.offset = 0  # elements already taken
        self.done = False


class ShmTransport:
    """Point-to-point through shared memory queues; see the module docstring.

    Args:
        setup: the session's ``SetupContext`` (store, rank, world size, liveness, key prefix).
        slots: slots per queue (RINGCOMM_SHM_SLOTS, default 4).
        slot_bytes: data bytes per slot (RINGCOMM_SHM_SLOT_BYTES, default 1 MiB).
    """

    device_type = "cpu"

    def __init__(self, setup: Any, *, slots: int | None = None, slot_bytes: int | None = None) -> None:
        require_x86_linux("transport='shm'")
        self.rank, self.world_size = setup.rank, setup.world_size
        self.liveness = setup.liveness
        self.stats = TransportStats()
        self.slots = slots or env_int("RINGCOMM_SHM_SLOTS", DEFAULT_SLOTS)
        self.slot_bytes = slot_bytes or env_int("RINGCOMM_SHM_SLOT_BYTES", DEFAULT_SLOT_BYTES, minimum=64)
        if self.slots < 1 or self.slot_bytes < 64 or self.slot_bytes % 64:
            raise ValueError(
                f"shm queues need slots >= 1 and slot_bytes a multiple of 64, got {self.slots}, {self.slot_bytes}"
            )
        self._maps: dict[int, Any] = {}
        self._closed = False
        self._send_seq = [0] * self.world_size
        self._recv_seq = [0] * self.world_size
        self._outbox: list[deque[_Send]] = [deque() for _ in range(self.world_size)]
        self._posted: list[deque[_Recv]] = [deque() for _ in range(self.world_size)]
        self._last_into: dict[tuple[int, int, torch.dtype], _Recv] = {}
        # Look again for a few microseconds before sleeping, but only when every rank can have a
        # core of its own: a spinning rank on a shared core takes the time its peer needs.
        cores = len(os.sched_getaffinity(0))
        spin_us = env_int(
            "RINGCOMM_SHM_SPIN_US", DEFAULT_SPIN_US if self.world_size <= cores else 0, minimum=0
        )
        self._spin_s = spin_us * 1e-6
        try:
            self._set_up(setup)
        except BaseException:
            self.close()
            raise

    # --- set-up ---

    def _set_up(self, setup: Any) -> None:
        p, rank = self.world_size, self.rank
        hosts = setup.gather("shm/host", host_identity())
        if len(set(hosts)) > 1:
            where = who_said_what(hosts, "on ")
            raise ValueError(
                f"rank {rank}: transport='shm' needs every rank on one host, but {where}; "
                "use transport='torch' or 'zmq' across hosts"
            )
        # Agree on the layout itself: a total size alone lets 2 slots of 192 bytes meet 4 of 64.
        mine = f"{self.slots} slots x {self.slot_bytes} bytes"
        layouts = setup.gather("shm/layout", mine)
        if len(set(layouts)) > 1:
            described = who_said_what(layouts)
            raise ValueError(
                f"rank {rank}: shm queues differ between ranks ({described}); set RINGCOMM_SHM_SLOTS "
                "and RINGCOMM_SHM_SLOT_BYTES alike on every rank"
            )
        size = segment_bytes(p, self.slots, self.slot_bytes)
        hint = (
            f", or make the queues smaller (now {mine} per queue, {p - 1} queues per rank: "
            "RINGCOMM_SHM_SLOTS, RINGCOMM_SHM_SLOT_BYTES)"
        )
        self._maps = share_segments(
            lambda name, value: setup.gather(f"shm/{name}", value), rank, p, size, hint
        )
        bufs = {r: memoryview(m) for r, m in self._maps.items()}
        self._bell = Doorbell(bufs, 0, rank)  # the first line of every segment
        qbytes = _queue_bytes(self.slots, self.slot_bytes)

        def queue(receiver: int, sender: int) -> _Queue:
            index = sender - (sender > receiver)  # the receiver's queues, in sender order, skipping itself
            return _Queue(bufs[receiver], _LINE + index * qbytes, self.slots, self.slot_bytes)

        self._out = {peer: queue(peer, rank) for peer in range(p) if peer != rank}  # in the peer's segment
        self._in = {peer: queue(rank, peer) for peer in range(p) if peer != rank}  # in ours

    # --- posting ---

    def _check(self, tensor: torch.Tensor, peer: int) -> None:
        if type(peer) is not int or not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(
                f"rank {self.rank}: peer {peer!r} is not another rank of a world of {self.world_size}"
            )
        if not tensor.is_cpu or not tensor.is_contiguous() or tensor.dtype not in DTYPE_CODES:
            raise ValueError(
                f"rank {self.rank}: shm carries contiguous CPU tensors of {', '.join(DTYPES)}; "
                f"got {tensor.dtype} on {tensor.device}{'' if tensor.is_contiguous() else ', not contiguous'}"
            )

    def post(self, messages: Sequence[Message]) -> list[Pending]:
        """Queue the messages; sends start moving at once, as far as the queues have room."""
        for m in messages:
            self._check(m.tensor, m.peer)
        pending = []
        for m in messages:
            nbytes = m.tensor.numel() * m.tensor.element_size()
            if m.kind is MessageKind.SEND:
                op: _Send | _Recv = _Send(m.tensor, m.peer, int(m.tag), self._send_seq[m.peer])
                self._send_seq[m.peer] += 1
                self._outbox[m.peer].append(op)
                self.stats.count_send(m.peer, nbytes)
                pending.append(Pending(PendingOp.SEND, m.peer, op))
                continue
            if m.kind is MessageKind.REDUCE:
                key = (m.tensor.data_ptr(), m.tensor.numel(), m.tensor.dtype)
                op = _Recv(m.tensor, m.peer, int(m.tag), m.op, self._last_into.get(key))
                self._last_into[key] = op  # the next reduce into this tensor lands after this one
            else:
                op = _Recv(m.tensor, m.peer, int(m.tag), "", None)
            self._posted[m.peer].append(op)
            self.stats.count_recv(m.peer, nbytes)
            pending.append(Pending(PendingOp.RECV, m.peer, op))
        self._push()
        return pending

    # --- progress ---

    def _push(self) -> bool:
        """Write as many fragments of pending sends as the queues have room for; True if any moved."""
        moved = False
        for peer, outbox in enumerate(self._outbox):
            if not outbox:
                continue
            q = self._out[peer]
            ctl = q.ctl
            wrote = False
            while outbox:
                send = outbox[0]
                head, tail = ctl[0], ctl[8]
                if not 0 <= tail - head <= q.slots:
                    raise FrameError(
                        self.rank, peer, "counters", f"head {head}, tail {tail} for {q.slots} slots"
                    )
                if tail - head == q.slots:  # full: ask to be rung when a slot is free, then look once more
                    ctl[9] = 1
                    fence()
                    if ctl[8] - ctl[0] == q.slots:
                        break
                    continue
                if ctl[9]:
                    ctl[9] = 0
                slot = tail % q.slots
                flat, first = send.flat, send.offset
                total = flat.numel()
                dtype = flat.dtype
                n = min(q.capacity(dtype), total - first)
                size = dtype.itemsize
                _HEADER.pack_into(
                    q.headers[slot],
                    0,
                    _MAGIC,
                    send.code,
                    send.tag,
                    send.seq,
                    total * size,
                    first * size,
                    n * size,
                )
                if n:
                    q.view(slot, dtype)[:n].copy_(flat if n == total else flat[first : first + n])
                send.offset = first + n
                ctl[8] = tail + 1  # publish: the slot was written before this store
                wrote = True
                if send.offset >= total:
                    send.done = True
                    outbox.popleft()
            if wrote:
                self._bell.ring(peer)
                moved = True
        return moved

    def _consume(self, recv: _Recv) -> bool:
        """Take the fragments of ``recv`` (the oldest posted receive of its peer) that have arrived."""
        q = self._in[recv.peer]
        ctl = q.ctl
        moved = False
        while not recv.done:
            head, tail = ctl[0], ctl[8]
            if tail == head:
                break
            if not 0 < tail - head <= q.slots:
                raise FrameError(
                    self.rank, recv.peer, "counters", f"head {head}, tail {tail} for {q.slots} slots"
                )
            self._take(recv, q, head % q.slots)
            ctl[0] = head + 1  # free the slot: read before this store
            moved = True
        if moved:
            fence()  # the head above is visible before the look at ``wanted`` below
            if ctl[9]:
                self._bell.ring(recv.peer)  # the sender waits for a free slot: it may go on
        return moved

    def _take(self, recv: _Recv, q: _Queue, slot: int) -> None:
        """Validate one fragment's header, then copy or reduce its data into ``recv``'s tensor."""
        magic, code, tag, seq, total, offset, length = _HEADER.unpack_from(q.headers[slot], 0)
        peer, flat = recv.peer, recv.flat
        dtype = flat.dtype
        size = dtype.itemsize

        def bad(field: str, detail: str) -> FrameError:
            return FrameError(self.rank, peer, field, detail)

        if magic != _MAGIC:
            raise bad("magic", f"{magic:#x}, not a ringcomm shm header")
        if seq != self._recv_seq[peer]:
            raise bad(
                "seq", f"message {seq}, expected {self._recv_seq[peer]} (lost, repeated or out of order)"
            )
        if tag != recv.tag:
            raise bad("tag", f"tag {tag}, the receive expects {recv.tag}")
        if code != DTYPE_CODES[dtype]:
            got = DTYPE_NAMES[CODE_DTYPES[code]] if code in CODE_DTYPES else f"code {code}"
            raise bad("dtype", f"message carries {got}, receive expects {DTYPE_NAMES[dtype]}")
        count = flat.numel()
        if total != count * size:
            raise bad("total", f"{total} bytes, receive expects {count * size} (shape {list(recv.shape)})")
        first = recv.offset
        if offset != first * size:
            raise bad("offset", f"fragment at byte {offset}, expected {first * size}")
        n = min(q.capacity(dtype), count - first)
        if length != n * size:
            raise bad("length", f"{length} bytes at offset {offset} of {total} in slots of {q.slot_bytes}")
        if n:
            src = q.view(slot, dtype)[:n]
            dst = flat if n == count else flat[first : first + n]
            if recv.op:
                reduce_into(dst, src, recv.op)
            else:
                dst.copy_(src)
        recv.offset = first + n
        if recv.offset >= count:
            recv.done = True
            self._recv_seq[peer] += 1
            self._posted[peer].popleft()
            if recv.op:
                key = (flat.data_ptr(), count, dtype)
                if self._last_into.get(key) is recv:
                    del self._last_into[key]

    # --- waiting ---

    def wait(self, pending: Pending, deadline: float) -> None:
        """Drive progress until ``pending`` completes; CommTimeoutError at ``deadline``, PeerError on a
        dead or frozen peer, FrameError on a header that breaks the format."""
        op = pending.handle
        if isinstance(op, _Recv):
            self._receive(op, deadline)
        else:
            self._until(lambda: op.done, op.peer, PendingOp.SEND, deadline, self._consume_ready)

    def _receive(self, recv: _Recv, deadline: float) -> None:
        if recv.done:
            return
        if recv.before is not None:  # a reduce into the same tensor posted before this one lands first
            self._receive(recv.before, deadline)
        posted = self._posted[recv.peer]
        # The same queue: earlier messages come first. Waiting for one of them may take this one
        # too (every wait consumes the plain receives that have arrived), so look again each time.
        while not recv.done and posted[0] is not recv:
            self._receive(posted[0], deadline)
        self._until(
            lambda: recv.done,
            recv.peer,
            PendingOp.RECV,
            deadline,
            lambda: self._consume(recv) | self._consume_ready(),
        )

    def _consume_ready(self) -> bool:
        """Consume what has arrived for every posted plain receive at the head of its queue (as
        Gloo would write it at any time after the post). True if any moved. A reduce is left for
        its own wait: algorithms order what lands in a tensor by the order they wait (a server
        folds its own contribution in between two workers')."""
        moved = False
        for posted in self._posted:
            while posted:
                head = posted[0]
                if head.op:
                    break
                if not self._consume(head):
                    break
                moved = True
                if not head.done:  # the rest of it has not arrived yet
                    break
        return moved

    def _until(self, done: Any, peer: int, what: PendingOp, deadline: float, consume: Any) -> None:
        """Push sends and ``consume()`` until ``done()``; sleep on the doorbell while nothing moves
        (``segments.bell_wait``)."""
        live = self.liveness

        def watch() -> None:
            if live is not None:
                live.check(peer, what)

        def timed_out(waited_s: float) -> CommTimeoutError:
            where = "to" if what is PendingOp.SEND else "from"
            return CommTimeoutError(self.rank, peer, what, waited_s, f"the shm queue {where} it did not move")

        bell_wait(
            self._bell,
            lambda: self._push() | consume(),
            done,
            deadline,
            slice_s=live.interval_s if live is not None else 1.0,
            spin_s=self._spin_s,
            watch=watch,
            timed_out=timed_out,
        )

    # --- teardown ---

    def close(self) -> None:
        """Drop the views and unmap every segment (they were unlinked at set-up)."""
        if self._closed:
            return
        self._closed = True
        bell = self.__dict__.pop("_bell", None)
        if bell is not None:
            bell.close()
        for name in ("_out", "_in"):
            self.__dict__.pop(name, None)
        self._outbox, self._posted, self._last_into = [], [], {}
        unmap(self._maps)

    def __enter__(self) -> ShmTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


register_transport(
    "shm",
    lambda device_type, setup: ShmTransport(setup),
    devices=("cpu",),
    summary="shared memory: a single-producer single-consumer queue per pair of ranks (one host, CPU tensors)",
)
