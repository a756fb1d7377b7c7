"""Suite-wide guards: nothing a test started may outlive the run.

A test that starts processes ends them itself (``procs.end_processes``, ``procs.run``). This is the
backstop for one that fails to: at the end of the session every process still descended from pytest
(a SIGSTOPped rank above all, which multiprocessing's exit handler would join forever) is named and
SIGKILLed, and the run fails, so a leak is seen without hanging CI. The pooled worlds
(``pool.run_pooled``) live for the whole session by design: they are closed first.
"""

from __future__ import annotations

import os
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from procs import descendants, parent_of  # noqa: E402

from ringcomm.tools import spawn  # noqa: E402

# The suite's worlds (run_world, the pooled worlds) fork their ranks from one server that has
# imported torch and ringcomm once: ~0.1 s a rank instead of ~1.5 s of imports on these 2 cores.
# RINGCOMM_TEST_START=spawn runs them as new interpreters, as launch.py and the bench do.
# The server starts nothing itself and needs no timeout of its own: each world it forks for has
# its test's timeout, and the server exits when this process does (its pipe from us closes).
if os.environ.get("RINGCOMM_TEST_START", "forkserver") == "forkserver":
    spawn.use_forkserver(
        ("torch", "torch.distributed", "ringcomm", "ringcomm.api", "ringcomm.runtime.session",
         "ringcomm.transports.zmq", "ringcomm.transports.shm", "ringcomm.algorithms.registry")  # fmt: skip
    )

#: processes multiprocessing keeps for the whole session on purpose
_SERVICES = ("forkserver", "resource_tracker")


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    pooled = sys.modules.get("pool")  # the pooled worlds (tests/pool.py) end here on purpose, first
    if pooled is not None:
        pooled.close_all()
    me = os.getpid()
    # the services themselves are pytest's own children; what a forkserver forked (a rank) is not one
    leaked = [
        (pid, cmd)
        for pid, cmd in ((pid, _cmdline(pid)) for pid in descendants(me))
        if not (parent_of(pid) == me and any(s in cmd for s in _SERVICES))
    ]
    for pid, _ in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leaked:
        lines = "\n".join(f"  pid {pid}: {cmd[:200]}" for pid, cmd in leaked)
        sys.stderr.write(f"\nconftest: processes left running by the tests (killed now):\n{lines}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

