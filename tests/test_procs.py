"""tests/procs.py: a command's timeout stops what the command started, not only the command."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import descendants, end_processes, run

# A parent that starts a child which ignores SIGTERM, writes the child's pid, then hangs.
_PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_timeout_stops_the_grandchildren_too(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run([sys.executable, "-c", _PARENT, str(pid_file)], timeout=3, capture_output=True)
    child = int(pid_file.read_text())
    end = time.monotonic() + 5
    while _alive(child) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _alive(child), f"pid {child} outlived its parent's timeout"


@pytest.mark.fast
def test_a_command_that_ends_is_returned_as_subprocess_run_would() -> None:
    done = run([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=30,
               capture_output=True, text=True)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "")


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def test_end_processes_ends_a_stopped_process_beside_one_already_gone() -> None:
    """The stopped one is SIGKILLed (a SIGTERM would stay pending) and reaped; the one that exited
    first is no error (a bare os.kill raised ProcessLookupError there and skipped the rest)."""
    ctx = mp.get_context("spawn")
    gone, stopped = ctx.Process(target=time.sleep, args=(0,)), ctx.Process(target=_stop_self)
    popen = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        gone.start()
        stopped.start()
        gone.join(timeout=60)
        popen.wait(timeout=60)
        end = time.monotonic() + 60
        while stopped.pid is not None and _state(stopped.pid) != "T" and time.monotonic() < end:
            time.sleep(0.05)
        assert _state(stopped.pid) == "T", "the child never stopped itself"
        end_processes([gone, popen, stopped], join_s=10)
        assert stopped.exitcode == -signal.SIGKILL and gone.exitcode == 0 and popen.returncode == 0
        assert stopped.pid not in descendants(os.getpid())
    finally:
        for proc in (gone, stopped):
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(timeout=10)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "-"
