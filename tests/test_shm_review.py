"""Shared memory under review (issue 19): a small /dev/shm, leaks, exits, layouts, doorbells, the board.

Spawned worlds that need a /dev/shm of their own (a small one, or one where every
name is this world's) run under ``unshare -m`` with a fresh tmpfs mounted on
/dev/shm, and skip where that is not allowed. Everything else looks only at the
names its own processes made: other users share /dev/shm.

This file is also the script those worlds run (``python tests/test_shm_review.py
<scenario> ...``): the scenarios are at the bottom.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
WORLD_TIMEOUT_S = 240


def _private_shm_argv(size: str, argv: list[str]) -> list[str] | None:
    """``argv`` under ``unshare -m`` with a fresh tmpfs of ``size`` on /dev/shm; None where not allowed."""
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return None
    # RINGCOMM_TEST_PRIVATE_SHM: every name in this /dev/shm is the world's own
    script = f"mount -t tmpfs -o size={size} tmpfs /dev/shm && RINGCOMM_TEST_PRIVATE_SHM=1 exec \"$@\""
    return ["unshare", "-m", "sh", "-c", script, "sh", *argv]


def _run_scenario(argv: list[str], timeout: float) -> dict:
    """Run this file as a script (a process group of its own, stopped whatever happens); its JSON report."""
    from procs import run

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE.parent)])}
    done = run(argv, timeout=timeout, capture_output=True, cwd=ROOT, env=env, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, f"rc {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(lines[-1])


# --- item 2: a /dev/shm too small for the segments ---


def test_a_small_dev_shm_is_an_error_on_every_rank_naming_it_not_a_sigbus() -> None:
    # 3 ranks, default queues: each segment is 2 queues of 4 slots of 1 MiB, more than the 8 MiB
    # there. Before: ftruncate made them sparse, and the first write killed every rank with SIGBUS.
    from ringcomm.transports.shm import DEFAULT_SLOT_BYTES, DEFAULT_SLOTS, segment_bytes

    argv = _private_shm_argv("8m", [sys.executable, str(HERE), "small-shm", "3"])
    if argv is None:
        pytest.skip("unshare -m with a tmpfs on /dev/shm is not allowed here (needs root or user namespaces)")
    report = _run_scenario(argv, WORLD_TIMEOUT_S)
    size = segment_bytes(3, DEFAULT_SLOTS, DEFAULT_SLOT_BYTES)
    for rank, said in enumerate(report["ranks"]):
        assert said.startswith("OSError: [Errno 28] "), f"rank {rank}: {said}"
        assert f"rank {rank}: could not set up shared memory" in said, said
        assert f"could not reserve a segment of {size} bytes in /dev/shm" in said, said
        assert "it holds 8388608 bytes, " in said and " bytes free now" in said, said
        assert f"this world needs {3 * size} bytes there (3 ranks x {size})" in said, said
        assert "--shm-size" in said and "RINGCOMM_SHM_SLOTS" in said, said
    assert report["left"] == [], report


# --- item 3: a refused first call, then a normal exit ---


def test_a_refused_first_call_then_exit_leaves_no_segment_and_no_abort() -> None:
    # Before: the refusal was still publishing itself on the comm thread (setting up the call
    # board) when the program ended: the board's segment stayed in /dev/shm, and a rank whose
    # store wait came back during finalisation aborted ("terminate called without an active
    # exception"). Two worlds, since the abort needs that timing.
    argv = [sys.executable, str(HERE), "refused-world", "3", "2"]
    private = _private_shm_argv("64m", argv)
    report = _run_scenario(private or argv, WORLD_TIMEOUT_S)
    for world in report["worlds"]:
        for rank, (rc, err) in enumerate(world["ranks"]):
            assert rc == 0 and "terminate called" not in err, f"rank {rank} exited {rc}: {err[-2000:]}"
        assert world["left"] == [], f"segments left in /dev/shm: {world['left']}"


# --- item 3: a rank killed during set-up; the next set-up sweeps its segment ---


_HOLD_IN_SETUP = """
import sys, time
from ringcomm.transports.segments import share_segments

def gather(name, value):
    print(value, flush=True)  # our segment exists now; the peers never come
    time.sleep(600)

share_segments(gather, 0, 2, 4096)
"""


def test_a_segment_of_a_rank_killed_in_set_up_is_swept_by_the_next_set_up() -> None:
    from ringcomm.transports.segments import SHM_DIR, sweep_stale

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_IN_SETUP], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        name = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert name.startswith("ringcomm-") and f"-{proc.pid}-" in name, name
        path = os.path.join(SHM_DIR, name)
        assert os.path.exists(path)
        sweep_stale()
        assert os.path.exists(path), "a live creator's segment (mid-set-up) was swept"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
        proc.stdout.close()  # type: ignore[union-attr]
    # Killed between create and unlink, its segment stays until a sweep. The sweep may be another
    # process's (a test in another xdist worker that sets shm up sweeps every dead creator's
    # segments), so what is asserted is that it is gone once this sweep has run, not who removed it.
    swept = sweep_stale()
    assert not os.path.exists(path), f"a dead creator's segment survived the sweep (it swept {swept})"


# --- item 8: the queues' layout, not only the total size ---


class _Setup:
    """A set-up context without a session: ``gather`` straight through the store (no liveness)."""

    def __init__(self, store: Any, rank: int, world_size: int, prefix: str) -> None:
        self.store, self.rank, self.world_size, self.prefix = store, rank, world_size, prefix
        self.liveness = None

    def gather(self, name: str, value: str) -> list[str]:
        base = f"{self.prefix}/{name}"
        self.store.set(f"{base}/{self.rank}", value)
        self.store.wait([f"{base}/{r}" for r in range(self.world_size)], timedelta(seconds=30))
        return [self.store.get(f"{base}/{r}").decode() for r in range(self.world_size)]


def _on_threads(world_size: int, fn: Any) -> list[Any]:
    """``fn(rank)`` on one thread per rank; each one's result or exception, by rank."""
    out: list[Any] = [None] * world_size

    def run(rank: int) -> None:
        try:
            out[rank] = fn(rank)
        except Exception as exc:
            out[rank] = exc

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank's thread did not finish in 60 s"
    return out


@pytest.mark.fast
def test_queues_of_the_same_total_size_but_other_slots_are_refused_on_every_rank() -> None:
    # 2 slots of 192 bytes and 4 of 64 make segments of the same size; before, they set up and
    # then every message failed as a "magic" FrameError.
    import torch.distributed as dist

    from ringcomm.transports.shm import ShmTransport, segment_bytes

    assert segment_bytes(2, 2, 192) == segment_bytes(2, 4, 64)
    store = dist.HashStore()
    layouts = {0: (2, 192), 1: (4, 64)}

    def make(rank: int) -> Any:
        slots, slot_bytes = layouts[rank]
        transport = ShmTransport(_Setup(store, rank, 2, "layout"), slots=slots, slot_bytes=slot_bytes)
        transport.close()
        return transport

    for rank, result in enumerate(_on_threads(2, make)):
        assert isinstance(result, ValueError), f"rank {rank}: {result!r}"
        said = str(result)
        assert said.startswith(f"rank {rank}: shm queues differ between ranks"), said
        assert "ranks [0] 2 slots x 192 bytes; ranks [1] 4 slots x 64 bytes" in said, said


# --- item 8: the doorbell word at rank 256 and beyond ---


@pytest.mark.fast
def test_a_doorbell_tells_rank_256_and_more_apart_and_refuses_worlds_it_cannot() -> None:
    from ringcomm.transports.segments import Doorbell

    for p in (2, 256, 257, 1000, 65536):
        bufs = {r: memoryview(bytearray(8)) for r in range(p)}
        seen = set()
        for ringer in sorted({0, 1, 255 % p, 256 % p, p - 1}):
            bell = Doorbell(bufs, 0, ringer)
            for _ in range(3):
                bell.ring(0)  # before: rank 256's ring raised OverflowError (its rank << 24 is 2**32)
                value = int(Doorbell(bufs, 0, 0).value())
                assert value not in seen, f"P={p}: rank {ringer}'s ring wrote {value:#x}, written before"
                seen.add(value)
    too_many = dict.fromkeys(range(Doorbell.MAX_RANKS + 1), memoryview(bytearray(8)))
    with pytest.raises(ValueError, match=f"at most {Doorbell.MAX_RANKS} ranks, not {Doorbell.MAX_RANKS + 1}"):
        Doorbell(too_many, 0, 0)


# --- item 8: a call board slot reused while a slow rank still reads it ---


@pytest.mark.fast
def test_an_unchecked_empty_call_between_two_checked_ones_does_not_overwrite_an_unread_slot() -> None:
    # Calls 0 and 2 are checked (both use slot 0), call 1 is empty and unchecked: it makes no
    # rank wait for another. Rank 0 finishes call 0 and goes on to call 2 while rank 1 has not read
    # call 0 yet. Before: rank 0 overwrote slot 0 with call 2, and rank 1 waited for call 0's
    # fingerprint until its deadline (CommTimeoutError), then rank 0 for rank 1's call 2.
    import torch.distributed as dist

    from ringcomm.runtime.board import CallBoard

    store = dist.HashStore()
    base = "board-reuse"
    boards = _on_threads(2, lambda r: CallBoard(_Setup(store, r, 2, base).gather, r, 2, None))
    assert all(isinstance(b, CallBoard) for b in boards), boards
    on_to_call_2 = threading.Event()

    def rank0(rank: int) -> list[list[str]]:
        board = boards[0]
        board.publish(0, "call 0 from 0")
        first = board.collect(0, time.monotonic() + 10, "check")
        on_to_call_2.set()  # call 1: empty, unchecked; nothing waits
        board.publish(2, "call 2 from 0")
        return [first, board.collect(2, time.monotonic() + 10, "check")]

    def rank1(rank: int) -> list[list[str]]:
        board = boards[1]
        board.publish(0, "call 0 from 1")
        assert on_to_call_2.wait(10)
        time.sleep(0.3)  # rank 0 is at call 2 by now
        first = board.collect(0, time.monotonic() + 5, "check")
        board.publish(2, "call 2 from 1")
        return [first, board.collect(2, time.monotonic() + 10, "check")]

    try:
        results = _on_threads(2, lambda r: (rank0 if r == 0 else rank1)(r))
    finally:
        for b in boards:
            b.close()
    for rank, result in enumerate(results):
        assert result == [["call 0 from 0", "call 0 from 1"], ["call 2 from 0", "call 2 from 1"]], (
            f"rank {rank}: {result!r}"
        )


# --- the scenarios, run as a script ---


def _small_shm_rank(rank: int, p: int) -> str:
    import torch

    import ringcomm

    try:
        ringcomm.all_reduce(torch.ones(4 << 20), transport="shm", timeout=60)  # 16 MiB of float32
        return "returned"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _ringcomm_names() -> list[str]:
    from ringcomm.transports.segments import SHM_DIR

    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith("ringcomm-"))


def _small_shm(p: int) -> dict:
    from ringcomm.tools.spawn import run_world

    return {"ranks": run_world(_small_shm_rank, p, timeout=WORLD_TIMEOUT_S - 30), "left": _ringcomm_names()}


def _refused_rank(rank: int, p: int, port: int) -> None:
    """A rank whose first (and only) call is refused; it catches the ValueError and ends normally."""
    import torch
    import torch.distributed as dist

    import ringcomm

    store = dist.TCPStore("127.0.0.1", port, p, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=p)
    try:
        ringcomm.all_reduce(torch.ones(4), op="prod", transport="shm", timeout=30)
    except ValueError:
        pass
    else:
        raise SystemExit("op='prod' was accepted")


def _refused_world(p: int) -> dict:
    """``p`` rank processes of ``_refused_rank``; their exit codes and stderr, and the segments they left
    (every ringcomm name in a private /dev/shm, else the names that carry their pids)."""
    from ringcomm.tools.spawn import loopback_store

    store = loopback_store(p + 1)
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE), "refused-rank", str(r), str(p), str(store.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(p)
    ]
    ranks = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=120)
            ranks.append((proc.returncode, err))
    finally:
        for proc in procs:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            proc.wait()
    private = os.environ.get("RINGCOMM_TEST_PRIVATE_SHM") == "1"
    left = [n for n in _ringcomm_names() if private or any(f"-{proc.pid}-" in n for proc in procs)]
    return {"ranks": ranks, "left": left}


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "small-shm":
        print(json.dumps(_small_shm(int(sys.argv[2]))), flush=True)
    elif what == "refused-world":
        worlds = [_refused_world(int(sys.argv[2])) for _ in range(int(sys.argv[3]))]
        print(json.dumps({"worlds": worlds}), flush=True)
    elif what == "refused-rank":
        _refused_rank(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
