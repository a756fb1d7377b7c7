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
