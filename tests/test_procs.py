"""tests/procs.py: a command's timeout stops what the command started, not only the command."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import run

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


def test_a_command_that_ends_is_returned_as_subprocess_run_would() -> None:
    done = run([sys.executable, "-c", "import sys; print('out'); sys.exit(3)"], timeout=30,
               capture_output=True, text=True)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "")
