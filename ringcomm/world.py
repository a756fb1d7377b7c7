"""Spawn a world of P local processes that run one function under torch.distributed.

Used by the tests, the benchmark and ``launch.py``. Guarantees, in order:

1. **No fixed ports.** The parent starts a ``TCPStore`` on port 0 (the kernel
   picks a free one) and the children join it as clients: no race between
   picking a port and binding it.
2. **No hang.** The parent waits until a deadline; past it, or as soon as one
   rank fails, it stops the others (SIGTERM, then SIGKILL) and raises
   ``WorldError`` naming the rank that failed first.
3. **No orphans.** Every child is joined before ``run_world`` returns or raises.

Results travel back through a ``multiprocessing`` queue between our own local
processes (a pipe, never the network).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

__all__ = ["WorldError", "finish", "run_world", "free_port"]


class WorldError(RuntimeError):
    """A rank failed, died or the world ran past its timeout."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel reports free right now (for the rare caller that needs a number)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    args: tuple,
    results: Any,
    env: dict[str, str],
) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # P processes share the machine's cores
    ok = False
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=60))
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=120)
        )
        value = fn(rank, world_size, *args)
        ok = True
        results.put((rank, "ok", value))
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None
    finally:
        finish(ok)


def finish(ok: bool) -> None:
    """Shut ringcomm down, then destroy the default process group; never under a thread still inside it.

    ``ok``: the work ended normally (wait up to 10 s for queued collectives), or
    failed (1 s: a collective still running then is stuck on a peer that is gone).
    If one is still running, the group is left to the process's exit: destroying
    it under the comm thread would crash the process and hide the real error.
    """
    import torch.distributed as dist

    import ringcomm

    if not dist.is_initialized():
        return
    try:
        ringcomm.shutdown(timeout=10.0 if ok else 1.0)
    except ringcomm.CommError as exc:
        print(f"ringcomm: {exc}; leaving the process group to the process's exit", file=sys.stderr, flush=True)
        return
    try:
        dist.destroy_process_group()
    except Exception:  # a group whose peers are gone may fail to tear down; the process ends anyway
        pass


def run_world(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    timeout: float = 120.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes.

    ``fn`` must be importable (a module-level function). Each rank runs after
    ``init_process_group`` and ``torch.set_num_threads(1)``.

    Returns:
        ``fn``'s return values, indexed by rank.

    Raises:
        WorldError: a rank raised or died (named, with its traceback), or the
            world did not finish within ``timeout`` seconds.
    """
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False)
    port = store.port
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, rank, world_size, port, backend, args, results, dict(env or {})),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    failure: WorldError | None = None
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size and failure is None:
            try:
                rank, status, value = results.get(timeout=0.2)
            except queue.Empty:
                for rank, proc in enumerate(procs):
                    if rank not in values and proc.exitcode is not None:
                        # exited without reporting: killed, or a crash below Python
                        time.sleep(0.2)  # its report may still be in the pipe
                        if results.empty():
                            failure = WorldError(f"rank {rank} died with exit code {proc.exitcode}", rank)
                            break
                if failure is None and time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(values))
                    failure = WorldError(
                        f"world of {world_size} timed out after {timeout:.0f} s; ranks {missing} did not finish"
                    )
                continue
            if status == "ok":
                values[rank] = value
            else:
                failure = _first_cause(procs, rank, value, reported=set(values) | {rank})
    finally:
        _stop(procs, grace=5.0 if failure is None else 1.0)
        results.close()
        del store
    if failure is not None:
        raise failure
    return [values[r] for r in range(world_size)]


def _first_cause(procs: list[Any], rank: int, report: str, reported: set[int]) -> WorldError:
    """The error to raise when ``rank`` reported a failure.

    When a worker dies, its peers fail a moment later ("connection closed by
    peer") and may report before the dead one's exit is noticed. So look for
    a rank that exited without reporting, for a short while, and blame it first.
    """
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        for other, proc in enumerate(procs):
            if other not in reported and proc.exitcode not in (None, 0):
                return WorldError(
                    f"rank {other} died with exit code {proc.exitcode} "
                    f"(then rank {rank} failed: {report.splitlines()[0]})",
                    other,
                )
        time.sleep(0.05)
    return WorldError(f"rank {rank} failed: {report}", rank)


def _stop(procs: list[Any], grace: float) -> None:
    """Join every process; terminate, then kill, those that do not exit within ``grace``."""
    end = time.monotonic() + grace
    for proc in procs:
        proc.join(timeout=max(0.0, end - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2.0)
