"""Start a command that starts processes of its own, and stop all of them, whatever happens.

``subprocess.run(timeout=)`` SIGKILLs only the child it started: a launch.py (or demo, or
analysis.cluster) killed that way never stops the ranks it spawned, and they keep two cores busy
for the rest of the suite. Here the child leads a session of its own, which everything it starts
inherits; when the test leaves early (a timeout, a failed assertion) or while the child still
runs, the whole group is stopped as analysis.sweep stops a run: SIGTERM, a grace period in which
launch.py stops its workers, then SIGKILL (``analysis.sweep.stop_group``). After the child exited
by itself nothing is touched: what it left running is for the test to see (several tests assert
that a launcher leaves no worker behind).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from analysis.sweep import stop_group

GRACE_S = 5.0


@contextmanager
def started(cmd: Sequence[str], *, grace_s: float = GRACE_S, **popen: Any) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(cmd, **popen)`` in a new session; its group is stopped if the block raises
    or leaves the child running."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    try:
        yield proc
    except BaseException:
        stop_group(proc, grace_s)
        raise
    if proc.poll() is None:
        stop_group(proc, grace_s)


def run(
    cmd: Sequence[str], *, timeout: float, capture_output: bool = False, **popen: Any
) -> subprocess.CompletedProcess:
    """As ``subprocess.run(cmd, timeout=..., capture_output=...)``, but a timeout stops the children too."""
    if capture_output:
        popen.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with started(cmd, **popen) as proc:
        out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def end_processes(procs: Sequence[Any], join_s: float = 10.0) -> None:
    """SIGKILL every process in ``procs`` that has not exited, then join (reap) it.

    For ``multiprocessing.Process`` and ``subprocess.Popen`` alike. SIGKILL, not SIGTERM: it also ends
    a SIGSTOPped process (a pending SIGTERM would wait for a SIGCONT that never comes, and
    multiprocessing's exit handler would then join that child forever). A process that exits between
    the look and the kill is no error: ``kill()`` of both classes ignores one already gone, where a
    bare ``os.kill`` raises ProcessLookupError and would skip the processes after it.
    """
    for proc in procs:
        try:
            proc.kill()
        except (ProcessLookupError, ValueError):  # gone already, or a Process never started/closed
            pass
    for proc in procs:
        try:
            if isinstance(proc, subprocess.Popen):
                proc.wait(timeout=join_s)
            else:
                proc.join(timeout=join_s)
        except (subprocess.TimeoutExpired, ValueError, AssertionError):
            pass


def descendants(pid: int) -> list[int]:
    """The pids of every live descendant of ``pid`` (from /proc; empty where /proc is missing)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def parent_of(pid: int) -> int:
    """``pid``'s parent pid (from /proc), or -1 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def is_worker(pid: int) -> bool:
    """Whether ``pid`` is a rank that multiprocessing started: spawned (its command line runs
    ``spawn_main``), or forked by a fork server (it keeps the server's command line, and its parent
    is that server). Not the fork server itself, not the resource tracker, not the command."""
    cmd = _cmdline(pid)
    if b"spawn_main" in cmd:
        return True
    return b"multiprocessing.forkserver" in cmd and b"multiprocessing.forkserver" in _cmdline(parent_of(pid))


def workers_of(pid: int) -> list[int]:
    """The ranks ``pid`` started through multiprocessing: its children that are workers, or those of
    the fork server it started."""
    return sorted(w for w in descendants(pid) if is_worker(w) and pid in (parent_of(w), parent_of(parent_of(w))))
