"""The call board: the same-call check through shared memory when every rank is on one host.

The same-call check (``check.py``) needs a channel that every transport shares.
The store is one, but each round trip to it costs a wake-up of the process
that serves it: three of them made the check cost about 0.5 ms per call here,
more than a 64 KiB all-reduce over shared memory. When all ranks are on one
host the board carries it instead::

    rank r's segment:  | doorbell, read | slot 0: seq, length, fingerprint | slot 1: ... |
                                           (call n uses slot n % 2)

Call n: each rank writes its fingerprint (the text the check compares) into
slot ``n % 2`` of its own segment, then ``seq = n + 1`` (last: a reader that
sees the new ``seq`` sees the text written before it), and rings every other
rank's doorbell; then it reads every rank's slot once all show ``n + 1``,
sleeping on its own doorbell meanwhile (``shm.Doorbell``), and says so in its
``read`` word (``n + 1``).

**Reusing a slot.** A rank overwrites a slot only once every other rank's
``read`` shows it has read what the slot held (call n - 2, or whichever
checked call used it last). That is normally so already: a collective
synchronises the ranks, so by the time a rank reaches call n every rank has
read call n - 2. But a call without the check and without data (an empty
tensor, ``check=False``) synchronises nothing: a fast rank would reach call n
while a slow one still waits to read call n - 2, overwrite it, and leave the
slow one waiting for a fingerprint that is gone. So the write waits (in
``collect``, under the call's deadline) until the slot is free. A rank that
waits for ``read`` words raises its ``wants`` flag, and a reader rings only
ranks whose flag is up (the same look-after-fence as the doorbell's).

A rank missing from the board is watched through the heartbeats between
slices (``PeerError`` when it is dead or gave up), and the call's deadline
bounds the wait (``CommTimeoutError``). Every byte read is bounds-checked: a
slot that cannot be decoded reads as a fingerprint that differs, never a crash.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from ..errors import CommTimeoutError, PeerError
from ..transports.segments import Doorbell, bell_wait, fence, share_segments, unmap
from .liveness import Liveness

__all__ = ["CallBoard"]

_LINE = 64  # line 0: doorbell word u32, sleeping flag u32 (shm.Doorbell), read u64, wants u32
_READ = struct.Struct("<Q")
_READ_AT, _WANTS_AT = 8, 16
_SLOT = 512  # bytes per slot: seq u64, length u32, then the text
_SLOT_HEAD = struct.Struct("<QI")
_TEXT_MAX = _SLOT - _SLOT_HEAD.size
_SPIN_S = 50e-6  # look again this long before sleeping, when every rank can have a core


class CallBoard:
    """One host's board of call fingerprints; see the module docstring.

    Made collectively (``segments.share_segments`` through ``gather``: ``Rendezvous.gather`` under a key of its own).
    """

    def __init__(
        self, gather: Callable[[str, str], list[str]], rank: int, world_size: int, liveness: Liveness | None
    ) -> None:
        self.rank, self.world_size, self.liveness = rank, world_size, liveness
        self._maps = share_segments(gather, rank, world_size, _LINE + 2 * _SLOT)
        self._bufs = {r: memoryview(m) for r, m in self._maps.items()}
        self._bell = Doorbell(self._bufs, 0, rank)
        self._spin_s = _SPIN_S if world_size <= len(os.sched_getaffinity(0)) else 0.0
        self._held: list[int | None] = [None, None]  # the call each of our slots holds
        self._unwritten: tuple[int, bytes] | None = None  # published, waiting for its slot to be free

    def _slot(self, rank: int, call: int) -> memoryview:
        start = _LINE + (call % 2) * _SLOT
        return self._bufs[rank][start : start + _SLOT]

    def _read_upto(self, rank: int) -> int:
        """``rank``'s ``read`` word: it has read every rank's fingerprint of calls below this."""
        return _READ.unpack_from(self._bufs[rank], _READ_AT)[0]

    def publish(self, call: int, text: str) -> None:
        """Put this rank's fingerprint of ``call`` on the board and ring everyone (once the slot is free:
        at once unless a peer has still to read what the slot holds; then ``collect`` writes it)."""
        self._unwritten = (call, text.encode()[:_TEXT_MAX])
        self._write()

    def _readers_behind(self) -> list[int]:
        """The ranks that have still to read what the slot of the unwritten call holds."""
        assert self._unwritten is not None
        held = self._held[self._unwritten[0] % 2]
        if held is None:
            return []
        return [r for r in range(self.world_size) if r != self.rank and self._read_upto(r) <= held]

    def _write(self) -> bool:
        """Write the unwritten fingerprint if its slot is free; True if it is on the board now."""
        if self._unwritten is None:
            return True
        own = self._bufs[self.rank]
        if self._readers_behind():
            struct.pack_into("<I", own, _WANTS_AT, 1)  # ring me when you have read
            fence()  # the flag is visible before the second look (a reader that missed it is seen)
            if self._readers_behind():
                return False
        struct.pack_into("<I", own, _WANTS_AT, 0)
        call, data = self._unwritten
        slot = self._slot(self.rank, call)
        slot[_SLOT_HEAD.size : _SLOT_HEAD.size + len(data)] = data
        struct.pack_into("<I", slot, 8, len(data))
        struct.pack_into("<Q", slot, 0, call + 1)  # last: the text is there when this is seen
        self._held[call % 2] = call
        self._unwritten = None
        for peer in range(self.world_size):
            if peer != self.rank:
                self._bell.ring(peer)
        return True

    def _read(self, rank: int, call: int) -> str | None:
        seq, length = _SLOT_HEAD.unpack_from(self._slot(rank, call), 0)
        if seq != call + 1:
            return None
        length = min(length, _TEXT_MAX)
        return bytes(self._slot(rank, call)[_SLOT_HEAD.size : _SLOT_HEAD.size + length]).decode(errors="replace")

    def _mark_read(self, call: int) -> None:
        """Say that this rank has read every fingerprint of ``call``; ring whoever waits for that."""
        _READ.pack_into(self._bufs[self.rank], _READ_AT, call + 1)
        fence()  # the word is visible before the look at the flags
        for peer in range(self.world_size):
            if peer != self.rank and struct.unpack_from("<I", self._bufs[peer], _WANTS_AT)[0]:
                self._bell.ring(peer)

    def collect(self, call: int, deadline: float, what: str) -> list[str]:
        """Every rank's fingerprint of ``call``, by rank, once all are on the board (ours included:
        written here if ``publish`` found its slot still in use).

        Raises:
            PeerError: a rank still missing (or still to read the slot we need) is dead, frozen or
                gave up on this call.
            CommTimeoutError: ``deadline`` (a ``time.monotonic()`` value) passed first.
        """
        live = self.liveness
        texts: list[str | None] = [None] * self.world_size

        def poll() -> bool:
            if not self._write():
                return False
            moved = False
            for r in range(self.world_size):
                if texts[r] is None:
                    texts[r] = self._read(r, call)
                    moved |= texts[r] is not None
            return moved

        def done() -> bool:
            return self._unwritten is None and None not in texts

        def missing() -> tuple[list[int], str]:
            """The ranks waited for, and why."""
            if self._unwritten is None:
                ranks = [r for r, t in enumerate(texts) if t is None]
                return ranks, f"ranks {ranks} did not reach it (a different call, a refused call, or check off there?)"
            ranks, held = self._readers_behind(), self._held[call % 2]
            return ranks, (
                f"ranks {ranks} have not read call {held}'s fingerprints, whose slot call {call} needs "
                "(stuck before that call's check?)"
            )

        def watch() -> None:
            if live is None:
                return
            for r in missing()[0]:
                reason = live.dead_reason(r)
                if reason is not None:
                    raise PeerError(self.rank, r, what, reason)

        def timed_out(waited_s: float) -> CommTimeoutError:
            ranks, detail = missing()
            peer = ranks[0] if ranks else (self.rank + 1) % self.world_size  # they moved since: name one
            return CommTimeoutError(self.rank, peer, what, waited_s, detail)

        bell_wait(
            self._bell,
            poll,
            done,
            deadline,
            slice_s=live.interval_s if live is not None else 1.0,
            spin_s=self._spin_s,
            watch=watch,
            timed_out=timed_out,
        )
        self._mark_read(call)
        return texts  # type: ignore[return-value]  (done: none is None)

    def close(self) -> None:
        self._bell.close()
        self._bufs.clear()
        unmap(self._maps)
