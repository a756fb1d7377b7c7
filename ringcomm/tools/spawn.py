"""Spawn a world of P local processes that run one function under torch.distributed.

Used by the tests, the benchmark and ``launch.py``. Guarantees, in order:

1. **No fixed ports.** The parent starts a ``TCPStore`` on port 0 (the kernel
   picks a free one) and the children join it as clients: no race between
   picking a port and binding it.
2. **No hang.** The parent waits until a deadline; past it, or as soon as one
   rank fails, it stops the others (SIGTERM, then SIGKILL) and raises
   ``WorldError`` naming the rank that failed first.
3. **No orphans.** Every child is joined before ``run_world`` returns or raises;
   and a child whose parent is gone (the launcher SIGKILLed, so no ``finally``
   ran) stops within a second, with one line saying so: on Linux the kernel
   sends it a signal of its own when the parent dies (``prctl(PR_SET_PDEATHSIG)``), and
   everywhere a watch thread sees its parent pid change. Without this the ranks
   trained on with no store (it lives in the parent) and no one to report to.

Results travel back through a ``multiprocessing`` queue between our own local
processes (a pipe, never the network).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

__all__ = [
    "WorldError", "finish", "forked_ranks", "loopback_store", "run_world", "free_port", "start_method",
    "stop_forkserver", "use_forkserver",
]  # fmt: skip


class WorldError(RuntimeError):
    """A rank failed, died or the world ran past its timeout.

    Attributes:
        rank: the rank that failed first (None for a timeout).
        summary: one line: which rank failed first and why, then what the others did, in that order.
        traceback: the first failed rank's traceback ("" if it died without one).

    ``str()`` is the summary, then the traceback.
    """

    def __init__(self, summary: str, rank: int | None = None, traceback: str = "") -> None:
        super().__init__(f"{summary}\n{traceback}" if traceback else summary)
        self.rank = rank
        self.summary = summary
        self.traceback = traceback


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel reports free right now (for the rare caller that needs a number)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


#: Seconds between the watch thread's looks at the parent pid: a getppid() call, so cheap; short, so
#: that the rank stops before its heartbeat meets the gone store (torch prints a C++ trace for that).
PARENT_WATCH_S = 0.2
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
#: The signal the kernel sends a rank when the thread that started it exits (``PR_SET_PDEATHSIG``):
#: a real-time signal that nothing else sends, so its arrival alone says the launcher is going.
#: (It was SIGTERM, which a live launcher also sends to stop its world; telling the two apart by
#: ``getppid()`` failed under load, when the kernel had first re-parented the rank to another thread
#: of the dying launcher and the handler's short look saw the launcher's pid still.)
PARENT_DEATH_SIGNAL: int | None = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else None
_orphan_lock = threading.RLock()


def _stop_orphan(rank: int, parent: int) -> None:
    """Say in one line that the launcher is gone, and end this process now (status 1).

    ``os._exit``: the store lived in the parent and nobody reads the results any more; a clean
    shutdown would only wait on the gone store. ringcomm's shared memory is unlinked once mapped,
    so nothing is left in /dev/shm.
    """
    # The signal handler and the watch thread may see it together: the second waits here for
    # the first to end the process (returning would let this thread go on as if nothing had happened).
    # Re-entrant: a handler that interrupts the main thread's own call here must not deadlock.
    _orphan_lock.acquire()
    line = f"ringcomm: rank {rank}: its launcher (pid {parent}) is gone; stopping now, without saving\n"
    try:
        # os.write, not print: the handler may interrupt a print of this very thread, whose
        # buffer would refuse a re-entrant write (and sys.stderr may hold unflushed text)
        os.write(2, line.encode())
    except OSError:  # stderr was the launcher's pipe, closed with it
        pass
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    try:  # a zombie (exited, not yet reaped by its own parent) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc: kill(0) is all there is


def _exit_waiter(pid: int) -> Callable[[float], bool]:
    """A function ``gone(wait_s)``: whether ``pid`` has exited, waiting up to ``wait_s`` seconds for it.

    Linux: a pidfd, readable once the process has exited (zombie or reaped, and never another
    process that took its pid later); elsewhere a sleep, then ``_alive``. Needed under the fork
    server, where the launcher is not the rank's parent: the server exits when the launcher's end of
    its pipe closes, but every rank it forked holds a copy of that end (multiprocessing hands it
    over as the rank's parent sentinel), so the server outlives a killed launcher while its ranks live.
    """
    try:
        fd = os.pidfd_open(pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):  # not Linux 5.3+, or already gone
        fd = None
    if fd is None:
        def gone(wait_s: float) -> bool:
            time.sleep(wait_s)
            return not _alive(pid)

        return gone
    import select

    def gone_fd(wait_s: float) -> bool:
        return bool(select.select([fd], [], [], wait_s)[0])

    return gone_fd


#: Seconds a failed rank looks for its launcher's death before it exits: the launcher's sockets
#: close (its store: this rank's error) a moment before its parent-death signal, or after it.
GONE_CHECK_S = 0.3


def _die_with_parent(rank: int, parent: int) -> Callable[[], None]:
    """Stop this rank as soon as ``parent`` (the process that called ``run_world``) is gone.

    Two ways, whichever sees it first: the kernel's parent-death signal (Linux:
    ``PARENT_DEATH_SIGNAL`` when the thread that started this rank exits), whose handler is Python's
    and so waits for the main thread to leave C code, and a daemon thread that watches ``parent``
    itself (``_exit_waiter``) and compares ``os.getppid()`` with the parent pid seen at start every
    ``PARENT_WATCH_S`` (re-parenting to init or a subreaper changes it). SIGTERM keeps its default
    action (a live parent's ``_stop`` terminating the world). Under the ``forkserver`` start method the
    direct parent is the fork server, which outlives a killed ``parent`` while its ranks live: the
    watch on ``parent`` sees it go.
    """
    direct = os.getppid()  # ``parent`` itself, or the fork server that forked this rank for it

    def stop_if_orphaned() -> None:
        """If the parent is going (or gone), say so in the one line and stop; else return.

        For a rank that failed: the parent's store, gone with it, or a peer that stopped for it, can
        reach this rank before either sign. Waits up to ``GONE_CHECK_S`` for one: the parent-death
        signal (its handler runs meanwhile) or the re-parenting, which comes only once the last of
        the dying parent's threads has exited.
        """
        end = time.monotonic() + GONE_CHECK_S
        while True:
            if os.getppid() != direct or not _alive(parent):
                _stop_orphan(rank, parent)
            if time.monotonic() >= end:
                return
            time.sleep(0.05)

    def on_parent_death(signum: int, frame: Any) -> None:
        _stop_orphan(rank, parent)

    launcher_gone = _exit_waiter(parent)

    def watch() -> None:
        while os.getppid() == direct and not launcher_gone(PARENT_WATCH_S):
            pass
        _stop_orphan(rank, parent)

    if sys.platform.startswith("linux") and PARENT_DEATH_SIGNAL is not None:
        signal.signal(PARENT_DEATH_SIGNAL, on_parent_death)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (an unusual libc): the watch thread remains
            pass
    # died before the signal was asked for: the kernel will not send it
    if os.getppid() != direct or not _alive(parent):
        _stop_orphan(rank, parent)
    threading.Thread(target=watch, name="ringcomm-parent-watch", daemon=True).start()
    return stop_if_orphaned


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    args: tuple,
    results: Any,
    env: dict[str, str],
    parent: int,
    caller: Caller | None = None,
) -> None:
    stop_if_orphaned = _die_with_parent(rank, parent)
    if caller is not None:  # forked from a server started earlier: take the caller's environment now
        caller.adopt()
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
        results.put((rank, "ok", in_band(value), time.time()))
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        # the time orders the failures: the first is the cause, the peers' usually its consequence
        results.put((rank, "error", (f"{type(exc).__name__}: {exc}", traceback.format_exc()), time.time()))
        # Under load the error (the store gone with the launcher, or a peer that already stopped for
        # it) could reach this rank before its watch saw the launcher go: then it ended without the line.
        stop_if_orphaned()
        raise SystemExit(1) from None
    finally:
        finish(ok)


def in_band(value: Any) -> bytes:
    """``value`` pickled with the bytes of its tensors inside, for a rank's report (``pickle.loads`` undoes it).

    A results queue pickles with torch's reductions, which send a CPU tensor as a file descriptor
    that the sending process hands over on request, while it lives. A rank reports, then exits at
    once: a parent that reads the report later (a loaded machine) asked a process that was gone,
    and ``get`` raised ConnectionResetError instead of returning the rank's values.
    """
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


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
        print(
            f"ringcomm: {exc}; leaving the process group to the process's exit", file=sys.stderr, flush=True
        )
        return
    try:
        dist.destroy_process_group()
    except Exception:  # a group whose peers are gone may fail to tear down; the process ends anyway
        pass


#: How ``run_world`` starts its ranks; ``use_forkserver`` changes it for this process.
_START: dict[str, Any] = {"method": "spawn", "preload": ()}


def use_forkserver(preload: tuple[str, ...] = ("torch", "torch.distributed", "ringcomm")) -> None:
    """Start the ranks of later ``run_world`` calls from a fork server that imported ``preload`` once.

    ``spawn`` (the default) starts each rank as a new interpreter that imports torch (about 1.5 s
    of CPU per rank); a fork server imports it once and forks a rank from itself in milliseconds.
    The test suite uses it. Each rank still gets the caller's environment, working directory,
    stdout and stderr as they are at the call (as under ``spawn``), not as they were when the
    server started (``Caller``).
    """
    _START.update(method="forkserver", preload=tuple(preload))


def stop_forkserver() -> None:
    """End the fork server ``use_forkserver`` started, and wait for it (no-op if none runs).

    It would end by itself a moment after this process does (its pipe from us closes); a command
    that is done with its world (launch.py) ends it first, so that nothing of its outlives it.
    """
    if _START["method"] != "forkserver":
        return
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)  # CPython's own (3.8+), used by its tests
    if stop is not None:
        stop()


#: How a command's world starts its ranks (``RINGCOMM_START``): forked from one server that
#: imported torch once (``forkserver``, the default), or each a new interpreter (``spawn``).
START_METHODS = ("forkserver", "spawn")


def start_method() -> str:
    """``RINGCOMM_START``, checked: ``forkserver`` (the default) or ``spawn``; ValueError otherwise."""
    start = os.environ.get("RINGCOMM_START", "forkserver")
    if start not in START_METHODS:
        raise ValueError(f"RINGCOMM_START={start!r}: expected one of {', '.join(START_METHODS)}")
    return start


@contextmanager
def forked_ranks(preload: tuple[str, ...]) -> Iterator[None]:
    """In the block, ``run_world`` forks its ranks from a server that imported ``preload`` once;
    the server ends with the block. For the commands that start a world (the demo, the bench).

    A rank then starts in milliseconds instead of importing torch anew (about 2 s of CPU a rank
    on a 2-core machine). ``RINGCOMM_START=spawn`` keeps new interpreters. A process that has
    chosen already (the test suite's fork server, ``use_forkserver``) keeps its choice and its server.

    Raises:
        ValueError: ``RINGCOMM_START`` is neither ``forkserver`` nor ``spawn``.
    """
    start = start_method()
    if _START["method"] == "forkserver" or start == "spawn":
        yield
        return
    use_forkserver(preload)
    try:
        yield
    finally:
        stop_forkserver()
        _START.update(method="spawn", preload=())


class _Fd:
    """A file descriptor of the caller, handed to a rank as it starts (pickled while multiprocessing
    starts the process, the one moment it can pass descriptors to the fork server)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        from multiprocessing import reduction

        return (_Fd._received, (reduction.DupFd(self.fd),))

    @staticmethod
    def _received(dup: Any) -> int:
        return dup.detach()


class Caller:
    """What a rank forked by the fork server takes from the process that asked for it, as a
    spawned rank inherits it: the environment, the working folder, stdout and stderr."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.cwd = os.getcwd()
        self.stdout, self.stderr = _Fd(1), _Fd(2)

    def adopt(self) -> None:
        os.environ.clear()
        os.environ.update(self.env)
        os.chdir(self.cwd)
        for fd, given in ((1, self.stdout), (2, self.stderr)):
            if isinstance(given, int):  # unpickled in the rank: a descriptor of its own
                os.dup2(given, fd)
                os.close(given)


def context() -> tuple[Any, Caller | None]:
    """The multiprocessing context for a world's ranks, and what a forked rank takes from its caller
    (pass it to the rank, which calls ``adopt()`` first)."""
    ctx = mp.get_context(_START["method"])
    if _START["method"] != "forkserver":
        return ctx, None
    ctx.set_forkserver_preload(list(_START["preload"]))
    return ctx, Caller()


def loopback_store(world_size: int) -> Any:
    """A master ``TCPStore`` for ``world_size`` clients that listens on 127.0.0.1 only, on a free port.

    Given a host and port 0, ``TCPStore`` listens on every interface (``*:port``, IPv6 and IPv4):
    anyone on the network could reach the world's store. So the socket is bound here, to the
    loopback address, and handed over (``master_listen_fd``; the store owns it from then on).
    """
    import socket

    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    fd = sock.detach()  # the store closes it
    return dist.TCPStore(
        "127.0.0.1", port, world_size, is_master=True, wait_for_workers=False, master_listen_fd=fd
    )


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
    store = loopback_store(world_size + 1)
    port = store.port
    ctx, caller = context()
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, rank, world_size, port, backend, args, results, dict(env or {}), os.getpid(), caller),
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
                rank, status, value, at = results.get(timeout=0.2)
            except queue.Empty:
                for rank, proc in enumerate(procs):
                    if rank not in values and proc.exitcode is not None:
                        # exited without reporting: killed, or a crash below Python
                        time.sleep(0.2)  # its report may still be in the pipe
                        if results.empty():
                            failure = _first_cause(procs, results, values, {})
                            break
                if failure is None and time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(values))
                    failure = WorldError(
                        f"world of {world_size} timed out after {timeout:.0f} s; ranks {missing} did not finish"
                    )
                continue
            if status == "ok":
                values[rank] = pickle.loads(value)  # in_band: from our own rank, over its pipe
            else:
                failure = _first_cause(procs, results, values, {rank: (at, *value)})
    finally:
        _stop(procs, grace=5.0 if failure is None else 1.0)
        results.close()
        del store
    if failure is not None:
        raise failure
    return [values[r] for r in range(world_size)]


def _first_cause(
    procs: list[Any], results: Any, values: dict[int, Any], failed: dict[int, tuple[float, str, str]]
) -> WorldError:
    """The error to raise once a rank has failed: which rank failed first and why, then the others.

    ``failed``: the reports read so far, rank -> (time, "Type: message", traceback).
    When one rank fails, its peers fail a moment later ("connection closed by
    peer"), and the parent may read their reports before the first one's. So
    for up to a second, read every report still in the queue and watch for
    ranks that exit; then put first a rank that exited without a report (killed,
    or crashed below Python: the others failed because of it), then the reports
    in the order they were made. A rank that did report is never said to have
    "died", whatever its exit code.
    """
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        try:
            rank, status, value, at = results.get(timeout=0.05)
        except queue.Empty:
            pending = [r for r, p in enumerate(procs) if r not in values and r not in failed]
            if all(procs[r].exitcode is not None for r in pending) and results.empty():
                break  # everyone has reported or exited: nothing more to wait for
            continue
        if status == "ok":
            values[rank] = value
        else:
            failed[rank] = (at, *value)
    # a rank that exited without a report, whatever its exit code: killed, or crashed below Python
    died = [r for r, p in enumerate(procs) if r not in values and r not in failed and p.exitcode is not None]
    causes = [(r, f"died with exit code {procs[r].exitcode} (no error report)") for r in died]
    by_time = sorted(failed.items(), key=lambda item: item[1][0])
    causes += [(r, f"failed: {head.splitlines()[0] if head else '?'}") for r, (_, head, _) in by_time]
    (first_rank, first), later = causes[0], causes[1:]
    summary = "; then ".join(
        [f"rank {first_rank} {first}"]
        + [f"rank {r} {'failed the same way' if what == first else what}" for r, what in later]
    )
    return WorldError(summary, first_rank, failed[first_rank][2] if first_rank in failed else "")


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
