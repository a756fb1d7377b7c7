"""launch.py with one worker made to die abruptly: a crashed or killed rank, for the launcher's tests.

Run it as launch.py, with ``FAULT_LAUNCH_DIE=RANK:STEPS`` in the environment::

    FAULT_LAUNCH_DIE=1:3 python tests/fault_launch.py --world-size 2 ...

Rank RANK calls ``os._exit(17)`` right after its STEPS-th optimizer step: no
exception, no cleanup, its peers left blocked in the next step's all-reduce,
as when a worker is killed.

How the fault reaches a spawned worker: launch.py spawns its workers with
multiprocessing's "spawn" start method, which runs the parent's ``__main__``
file again in every child (as ``__mp_main__``) before the worker function.
So the patch below, made at import time, is in place in every worker too.
The patched ``SGD.step`` reads the worker's rank (``RANK``, which
``ringcomm.tools.spawn`` sets in each child) when it is called, not at import time,
because the child sets it after the import. The fault lives here, in test
code, so that nothing in trainer/ or launch.py exists only for tests.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # launch.py and the packages beside it, as when run from the root

import launch  # noqa: E402  (after the path is set)

EXIT_CODE = 17


def _parse(spec: str) -> tuple[int, int]:
    """``"RANK:STEPS"`` -> (rank, steps), or a message naming the variable."""
    rank, sep, steps = spec.partition(":")
    if not (sep and rank.isdigit() and steps.isdigit() and int(steps) > 0):
        raise SystemExit(f"fault_launch.py: FAULT_LAUNCH_DIE must be RANK:STEPS (e.g. 1:3), got {spec!r}")
    return int(rank), int(steps)


def _die_after(rank: int, steps: int) -> None:
    """Patch ``torch.optim.SGD.step`` (the loop's optimizer) to exit on ``rank`` after ``steps`` calls."""
    step = torch.optim.SGD.step
    calls = 0

    @functools.wraps(step)
    def step_then_maybe_die(self: torch.optim.SGD, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        result = step(self, *args, **kwargs)
        calls += 1
        if calls == steps and os.environ.get("RANK") == str(rank):
            os._exit(EXIT_CODE)  # abrupt on purpose: no exception for the loop to report
        return result

    torch.optim.SGD.step = step_then_maybe_die  # type: ignore[method-assign]


_die_after(*_parse(os.environ.get("FAULT_LAUNCH_DIE", "")))

#: Seconds the launcher may run before it stops itself as on Ctrl-C (stopping its workers), so a
#: run that hangs fails its test instead of holding CI (FAULT_LAUNCH_TIMEOUT_S). Below the 120 s
#: its test waits (tests/test_launch.py), so the launcher's own clean stop comes first; the test's
#: timeout, which stops the launcher's whole process group (tests/procs.py), is the backstop.
TIMEOUT_S = float(os.environ.get("FAULT_LAUNCH_TIMEOUT_S", "90"))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"fault_launch.py: still running after {TIMEOUT_S:g} s")


if __name__ == "__main__":
    signal.signal(signal.SIGALRM, _interrupt)
    signal.alarm(max(1, int(TIMEOUT_S)))  # the parent only: spawned workers import this as __mp_main__
    sys.exit(launch.main())
