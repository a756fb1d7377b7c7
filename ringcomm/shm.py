"""Shared memory between the ranks of one host: segments, doorbells, and the rule that nothing leaks.

Used by the shm transport (``shm_transport.py``: message queues) and the call
board (``board.py``: the same-call check on one host).

**Segments.** ``share_segments`` makes one segment per rank in ``/dev/shm``
under a name unique to the set-up, maps every rank's segment, and, once the
store says every rank has mapped every segment, unlinks its own. From then on
a segment lives only in the mappings: even ``kill -9`` of every rank leaves
nothing in ``/dev/shm``, and no file descriptor stays open.

**Doorbells.** A 32-bit word a rank sleeps on with ``futex`` (with a timeout,
after reading its value); whoever gives it work writes a new value there and
wakes it. Writers write ``(their rank, a count of their own)``, never the value
the sleeper read, so a wake-up cannot be lost between the look and the sleep.
Beside the word, the sleeper raises a flag while it sleeps, and a ringer makes
the wake-up system call only when the flag is up: a rank that is busy, or
looking again before it sleeps, costs its peers nothing. (The ringer's store
of the word and load of the flag are kept in order by a full barrier, a locked
instruction; the kernel puts one between the sleeper's flag and its look at
the word. So either the ringer sees the flag or the sleeper sees the word.)

**Ordering.** The structures built on these segments have one writer per word
and rely on x86-64's store ordering (TSO: a reader that sees a counter sees
what was written before it, and aligned 8-byte stores are atomic), so
``require_x86_linux`` refuses other machines by name.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import re
import socket
import threading
import uuid
from collections.abc import Callable

import numpy as np

__all__ = ["SHM_DIR", "Doorbell", "fence", "host_identity", "require_x86_linux", "share_segments", "unmap"]

#: Where POSIX shared memory lives on Linux (shm_open names are files here).
SHM_DIR = "/dev/shm"

# futex(2): shared between processes, so not the PRIVATE variants.
_SYS_FUTEX = 202  # x86-64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_libc = ctypes.CDLL(None, use_errno=True)


_FENCE = threading.Lock()


def fence() -> None:
    """A full memory barrier: stores before it are visible before loads after it.

    Taking a free lock is a locked instruction (an atomic exchange), which on x86 orders
    every load and store around it; about 0.1 µs, no system call.
    """
    with _FENCE:
        pass


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def require_x86_linux(what: str) -> None:
    """ValueError unless this is Linux on x86-64 with ``/dev/shm`` (``what`` names the feature)."""
    if platform.machine() not in ("x86_64", "AMD64") or not os.path.isdir(SHM_DIR):
        raise ValueError(
            f"{what} needs Linux on x86-64 (shared-memory queues rely on x86's store ordering and "
            f"{SHM_DIR}); this is {platform.system()} on {platform.machine()}"
        )


def host_identity() -> str:
    """This host's name and boot id: two ranks with equal identities share memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
    except OSError:
        boot = "?"
    return f"{socket.gethostname()} (boot {boot})"


_SEGMENT_NAME = re.compile(r"ringcomm-[0-9a-f]{16}-r[0-9]+")


def share_segments(
    gather: Callable[[str, str], list[str]], rank: int, world_size: int, size: int
) -> dict[int, mmap.mmap]:
    """Create this rank's segment of ``size`` bytes (zeroed), map every rank's, then unlink ours.

    Collective through ``gather(name, value)``, which returns every rank's value by rank
    (``SetupContext.gather``). Returns ``{rank: mapping}``. On any failure the mappings
    made so far are closed and our name unlinked.
    """
    maps: dict[int, mmap.mmap] = {}
    path: str | None = os.path.join(SHM_DIR, f"ringcomm-{uuid.uuid4().hex[:16]}-r{rank}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)  # zero-filled: every counter starts at 0
            maps[rank] = mmap.mmap(fd, size)
        finally:
            os.close(fd)  # the mapping keeps the memory; no descriptor stays open
        names = gather("name", os.path.basename(path))
        for r in range(world_size):
            if r == rank:
                continue
            if not _SEGMENT_NAME.fullmatch(names[r]):
                raise ValueError(f"rank {rank}: rank {r} named its shared-memory segment {names[r][:80]!r}")
            peer_path = os.path.join(SHM_DIR, names[r])
            fd = os.open(peer_path, os.O_RDWR)
            try:
                if os.fstat(fd).st_size != size:
                    raise ValueError(
                        f"rank {rank}: rank {r}'s shared-memory segment is not {size} bytes "
                        "(different RINGCOMM_SHM_* settings on the ranks?)"
                    )
                maps[r] = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        # Every rank has mapped every segment once all have said so; then each unlinks its own.
        gather("mapped", "1")
        os.unlink(path)
        path = None
        return maps
    except BaseException:
        unmap(maps)
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        raise


def unmap(maps: dict[int, mmap.mmap]) -> None:
    """Close every mapping (one still exported to a live view goes with the last view)."""
    for m in maps.values():
        try:
            m.close()
        except BufferError:
            pass
    maps.clear()


class Doorbell:
    """The 32-bit word at ``offset`` of each rank's segment, and a sleeping flag after it.

    Args:
        buffers: ``{rank: memoryview}`` of every rank's mapped segment.
        offset: byte offset of the word in each segment (8 bytes there: word, flag; 4-byte aligned).
        rank: this rank (whose word it sleeps on).
    """

    def __init__(self, buffers: dict[int, memoryview], offset: int, rank: int) -> None:
        self.rank = rank
        self._words = {r: np.frombuffer(b, dtype=np.uint32, count=2, offset=offset) for r, b in buffers.items()}
        self._addresses = {r: w.ctypes.data for r, w in self._words.items()}
        self._own = self._words[rank]
        self._rings = 0

    def value(self) -> int:
        """Read before looking for work; pass to ``sleep`` if there was none."""
        return int(self._own[0])

    def sleep(self, seen: int, seconds: float) -> None:
        """Sleep while the word still holds ``seen`` (someone rang since: return at once), at most ``seconds``."""
        whole = int(seconds)
        ts = _Timespec(whole, int((seconds - whole) * 1e9))
        self._own[1] = 1  # "asleep": ringers make the system call
        try:
            _libc.syscall(
                _SYS_FUTEX, ctypes.c_void_p(self._addresses[self.rank]), _FUTEX_WAIT, ctypes.c_uint32(seen),
                ctypes.byref(ts), None, 0,
            )  # fmt: skip
        finally:
            self._own[1] = 0

    def ring(self, peer: int) -> None:
        """Give ``peer`` a new value, and wake it if it sleeps."""
        self._rings += 1
        word = self._words[peer]
        word[0] = (self.rank << 24) | (self._rings & 0xFFFFFF)
        fence()  # the store above is visible before the load below
        if word[1]:
            _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(self._addresses[peer]), _FUTEX_WAKE, 1 << 30, None, None, 0)

    def close(self) -> None:
        """Drop the views (a mapping cannot be closed while they exist)."""
        self._words.clear()
        self._addresses.clear()
        self._own = None  # type: ignore[assignment]
