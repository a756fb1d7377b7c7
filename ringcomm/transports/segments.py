"""Shared memory between the ranks of one host: segments, doorbells, and the rule that nothing leaks.

Used by the shm transport (``shm_transport.py``: message queues) and the call
board (``board.py``: the same-call check on one host).

**Segments.** ``share_segments`` makes one segment per rank in ``/dev/shm``
under a name unique to the set-up, maps every rank's segment, and, once the
store says every rank has mapped every segment, unlinks its own. From then on
a segment lives only in the mappings: even ``kill -9`` of every rank leaves
nothing in ``/dev/shm``, and no file descriptor stays open.

A rank killed during set-up (between its create and its unlink) does leave its
segment. So the name carries its creator's pid (and pid namespace)::

    ringcomm-<pid namespace inode>-<pid>-<16 random hex digits>-r<rank>

and every set-up first removes the segments of this pid namespace whose
creator is gone (``sweep_stale``): a leak lasts until the next set-up on the
host, never longer. (An anonymous ``memfd`` passed to the peers would leave
nothing at all, but a peer can reach it only through ``/proc/<pid>/fd``,
which ptrace rules, ``hidepid`` and container profiles may close.)

**Memory is reserved up front.** tmpfs gives a page on its first touch, so a
segment made sparse with ``ftruncate`` on a full ``/dev/shm`` maps fine and
then kills the rank with SIGBUS at its first write. ``posix_fallocate``
reserves every page at creation instead; a rank that cannot get them says so
in the set-up's gather, and *every* rank raises ``OSError`` (``ENOSPC``)
naming ``/dev/shm``, the bytes the world needs and the bytes free.

**Containers.** Docker gives a container a 64 MiB ``/dev/shm`` unless told
otherwise; the shm transport needs about ``P (P-1) slots slot_bytes`` bytes
(P = 5 with the default 4 slots of 1 MiB: 80 MiB). Give it room with
``docker run --shm-size=1g`` (Kubernetes: an ``emptyDir`` with
``medium: Memory`` mounted on ``/dev/shm``), or make the queues smaller
(``RINGCOMM_SHM_SLOTS``, ``RINGCOMM_SHM_SLOT_BYTES``).

**Doorbells.** A 32-bit word a rank sleeps on with ``futex`` (with a timeout,
after reading its value); whoever gives it work writes a new value there and
wakes it. Writers write ``(their rank, a count of their own)``, never the value
the sleeper read, so a wake-up cannot be lost between the look and the sleep.
The rank takes the top ``bit_length(P - 1)`` bits and the count the rest (24
bits up to 256 ranks, 16 at 65536, the most a doorbell serves).
Beside the word, the sleeper raises a flag while it sleeps, and a ringer makes
the wake-up system call only when the flag is up: a rank that is busy, or
looking again before it sleeps, costs its peers nothing. (The ringer's store
of the word and load of the flag are kept in order by a full barrier, a locked
instruction; the kernel puts one between the sleeper's flag and its look at
the word. So either the ringer sees the flag or the sleeper sees the word.)

**Waiting** (``bell_wait``, for the transport's queues and the call board
alike): look for work; if none moved, look again for a few microseconds when
every rank can have a core of its own (a peer on another core answers within
that), then sleep on the doorbell for at most one heartbeat. After each
heartbeat without progress, ask whether the awaited peers are still there
(``watch``: ``PeerError`` when one is dead or gave up), and at the deadline
raise ``CommTimeoutError``: a dead peer makes the others raise, never hang.

**Ordering.** The structures built on these segments have one writer per word
and rely on x86-64's store ordering (TSO: a reader that sees a counter sees
what was written before it, and aligned 8-byte stores are atomic), so
``require_x86_linux`` refuses other machines by name.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable

import numpy as np

__all__ = [
    "SHM_DIR",
    "Doorbell",
    "bell_wait",
    "fence",
    "host_identity",
    "require_x86_linux",
    "share_segments",
    "sweep_stale",
    "unmap",
]

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


_SEGMENT_NAME = re.compile(r"ringcomm-([0-9]+)-([0-9]+)-[0-9a-f]{16}-r([0-9]+)")
#: What a rank writes in the set-up's gather instead of its segment's name when it has none.
_NO_SEGMENT = "!"


def _pid_namespace() -> int:
    """The inode of this process's pid namespace (0 if unknown): pids mean something only inside it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def sweep_stale() -> list[str]:
    """Unlink the segments in ``/dev/shm`` whose creator (in this pid namespace) is gone; return their names.

    A creator unlinks its segment once every rank has mapped it, so a segment of a live
    creator may be mid-set-up and is left alone; one of a dead creator was orphaned by a
    kill between create and unlink. Segments of other pid namespaces (another container
    sharing ``/dev/shm``) are never touched: their pids mean nothing here.
    """
    ns = _pid_namespace()
    if not ns:
        return []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    removed = []
    for name in names:
        m = _SEGMENT_NAME.fullmatch(name)
        if m is None or int(m.group(1)) != ns or _alive(int(m.group(2))):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            removed.append(name)
        except OSError:  # gone meanwhile (another rank swept it), or not ours to remove
            pass
    return removed


def _space() -> tuple[int, int]:
    """``/dev/shm``'s size and its free bytes now."""
    st = os.statvfs(SHM_DIR)
    return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def _create(path: str, size: int, rank: int, world_size: int, hint: str) -> mmap.mmap:
    """Create ``path`` with all ``size`` bytes reserved (zeroed) and map it.

    Raises:
        OSError: ENOSPC naming /dev/shm, the bytes the world needs and the bytes free; or
            whatever else made it fail. ``path`` is gone again either way.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            # Every page now, not on first touch: a full tmpfs would SIGBUS the first write.
            os.posix_fallocate(fd, 0, size)  # zero-filled: every counter starts at 0
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise
            total, free = _space()  # free: other ranks may be reserving theirs at this moment
            raise OSError(
                errno.ENOSPC,
                f"rank {rank}: could not reserve a segment of {size} bytes in {SHM_DIR} "
                f"({os.strerror(exc.errno)}): it holds {total} bytes, {free} bytes free now; this world "
                f"needs {world_size * size} bytes there ({world_size} ranks x {size}). In a container, "
                f"give it more shared memory (docker run --shm-size=...){hint}",
            ) from None
        return mmap.mmap(fd, size)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)  # the mapping keeps the memory; no descriptor stays open


def share_segments(
    gather: Callable[[str, str], list[str]], rank: int, world_size: int, size: int, hint: str = ""
) -> dict[int, mmap.mmap]:
    """Create this rank's segment of ``size`` bytes (zeroed, reserved), map every rank's, then unlink ours.

    Collective through ``gather(name, value)``, which returns every rank's value by rank
    (``SetupContext.gather``). Returns ``{rank: mapping}``. On any failure the mappings
    made so far are closed and our name unlinked.

    Args:
        hint: appended to an out-of-space error (``"; or ..."``: what else would help).

    Raises:
        OSError: on every rank when any rank could not create its segment (ENOSPC when
            ``/dev/shm`` is too small: naming it, the bytes needed and free), naming that rank.
    """
    sweep_stale()
    maps: dict[int, mmap.mmap] = {}
    name = f"ringcomm-{_pid_namespace()}-{os.getpid()}-{uuid.uuid4().hex[:16]}-r{rank}"
    path: str | None = os.path.join(SHM_DIR, name)
    try:
        try:
            maps[rank] = _create(path, size, rank, world_size, hint)
            said = name
        except OSError as exc:  # tell the others in the gather, so that every rank raises it
            path = None
            why = exc.strerror if exc.strerror and exc.filename is None else str(exc)
            said = _NO_SEGMENT + f"{exc.errno or 0} " + why.removeprefix(f"rank {rank}: ")
        names = gather("name", said[:600])
        failed: dict[str, list[int]] = {}  # what went wrong -> the ranks it went wrong on
        code = 0
        for r, n in enumerate(names):
            if n.startswith(_NO_SEGMENT):
                number, _, why = n[len(_NO_SEGMENT) :].partition(" ")
                code = code or (int(number) if number.isdigit() else 0)
                failed.setdefault(why, []).append(r)
        if failed:
            said = "; ".join(
                f"ranks {rs}: {why}" if len(rs) > 1 else f"rank {rs[0]}: {why}" for why, rs in failed.items()
            )
            raise OSError(code, f"rank {rank}: could not set up shared memory: {said}")
        for r in range(world_size):
            if r == rank:
                continue
            m = _SEGMENT_NAME.fullmatch(names[r])
            if m is None or int(m.group(3)) != r:
                raise ValueError(f"rank {rank}: rank {r} named its shared-memory segment {names[r][:80]!r}")
            fd = os.open(os.path.join(SHM_DIR, names[r]), os.O_RDWR)
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
        os.unlink(path)  # type: ignore[arg-type]  (ours was made: no rank failed)
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
        buffers: ``{rank: memoryview}`` of every rank's mapped segment (every rank of the world).
        offset: byte offset of the word in each segment (8 bytes there: word, flag; 4-byte aligned).
        rank: this rank (whose word it sleeps on).

    Raises:
        ValueError: more than ``MAX_RANKS`` ranks (a ring's count would have under 16 bits).
    """

    #: The most ranks a doorbell tells apart: the rest of the 32-bit word (16 bits) counts rings.
    MAX_RANKS = 1 << 16

    def __init__(self, buffers: dict[int, memoryview], offset: int, rank: int) -> None:
        if len(buffers) > self.MAX_RANKS:
            raise ValueError(f"shared-memory doorbells serve at most {self.MAX_RANKS} ranks, not {len(buffers)}")
        self.rank = rank
        # The word is (rank, count): the rank in as few top bits as the world needs, the count below.
        self._count_bits = 32 - max(len(buffers) - 1, 1).bit_length()
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
        word[0] = (self.rank << self._count_bits) | (self._rings & ((1 << self._count_bits) - 1))
        fence()  # the store above is visible before the load below
        if word[1]:
            _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(self._addresses[peer]), _FUTEX_WAKE, 1 << 30, None, None, 0)

    def close(self) -> None:
        """Drop the views (a mapping cannot be closed while they exist)."""
        self._words.clear()
        self._addresses.clear()
        self._own = None  # type: ignore[assignment]


def bell_wait(
    bell: Doorbell,
    poll: Callable[[], bool],
    done: Callable[[], bool],
    deadline: float,
    *,
    slice_s: float,
    spin_s: float,
    watch: Callable[[], None],
    timed_out: Callable[[float], BaseException],
) -> None:
    """Call ``poll`` until ``done()``; while nothing moves, look again for ``spin_s``, then sleep on ``bell``.

    The one wait loop of everything built on these segments (the shm transport's queues, the call
    board). Each turn reads the bell's word before it polls, so a ring after that look ends the
    sleep that follows (no wake-up is lost).

    Args:
        poll: look for work and do what can be done; True if anything moved (progress).
        done: True once the wait is over (checked before every turn).
        deadline: a ``time.monotonic()`` value.
        slice_s: seconds of one heartbeat: the longest sleep, and how long without progress
            before ``watch`` is asked.
        spin_s: seconds after the last progress (or the last ``watch``) during which it looks
            again at once instead of sleeping (0 when ranks share cores).
        watch: called after each ``slice_s`` without progress; raises (``PeerError``) when an
            awaited peer is dead, frozen or gave up.
        timed_out: makes the error raised at ``deadline`` from the seconds this wait lasted.
    """
    start = idle_since = time.monotonic()
    while not done():
        seen = bell.value()  # read before looking: a ring after this ends the sleep
        if poll():
            idle_since = time.monotonic()
            continue
        now = time.monotonic()
        if now >= deadline:
            raise timed_out(now - start)
        if now - idle_since >= slice_s:
            watch()  # nothing moved for a heartbeat: are the peers still there?
            idle_since = now
        if now - idle_since < spin_s:
            continue  # a peer with a core of its own answers within microseconds: look again
        bell.sleep(seen, max(min(slice_s, deadline - now), 1e-4))
