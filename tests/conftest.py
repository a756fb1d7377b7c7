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

# Every TCPStore client connection makes a reverse DNS lookup of its own peer address, to log it
# (torch's c10d socket.cpp: the client connects to ::ffff:127.0.0.1, which /etc/hosts' "127.0.0.1"
# line does not match, so the lookup goes to the name server). Where that server drops a UDP query
# now and then (this sandbox's: about 1 in 30), the resolver waits its 5 s timeout, so a world's
# set-up stalled 5 s in about one test in 40. One-second tries, three of them, for the suite's
# processes and everything they start (the environment is inherited): a drop then costs 1 s.
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:3")

from procs import descendants, parent_of  # noqa: E402

from ringcomm.tools import spawn  # noqa: E402

# The suite's worlds (run_world, the pooled worlds) fork their ranks from one server that has
# imported torch and ringcomm once: ~0.1 s a rank instead of ~1.5 s of imports on these 2 cores.
# RINGCOMM_TEST_START=spawn runs them as new interpreters (as RINGCOMM_START=spawn makes the commands do).
# The server starts nothing itself and needs no timeout of its own: each world it forks for has
# its test's timeout, and the server exits when this process does (its pipe from us closes).
if os.environ.get("RINGCOMM_TEST_START", "forkserver") == "forkserver":
    spawn.use_forkserver(
        ("torch", "torch.distributed", "ringcomm", "ringcomm.api", "ringcomm.runtime.session",
         "ringcomm.transports.zmq", "ringcomm.transports.shm", "ringcomm.algorithms.registry")  # fmt: skip
    )

#: The modules that take longest in a full run, longest first (measured: the sum of their tests'
#: durations, 3 workers on 2 cores, 2026-12-07). pytest-xdist hands a worker a whole module at a time
#: (``--dist loadfile``; ``--no-loadscope-reorder`` keeps this order): the long ones go first, so
#: that the last modules handed out are short and the workers finish together. In xdist's own
#: order (most tests first) the few-test, minute-long modules came last: in one run a worker spent
#: its last 65 s alone in test_two_hosts. The modules not named keep their order, after these.
LONGEST_FIRST = (
    "test_learner.py", "test_faults.py", "test_zero.py", "test_launch.py", "test_two_hosts.py",
    "test_shm_review.py", "test_shm_transport.py", "test_cluster.py", "test_rhd_rd.py", "test_resume.py",
    "test_zmq_transport.py", "test_demo.py", "test_ring.py", "test_compress.py", "test_collectives.py",
    "test_new_user.py", "test_param_server.py", "test_hier.py", "test_session.py", "test_hooks.py",
)  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Collect the long modules first (``LONGEST_FIRST``); each module's tests keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: ties keep their order


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
