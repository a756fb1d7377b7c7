"""The one argparse of every command: launch.py, ringcomm.bench, ringcomm.demo and analysis.*.

Every command builds its parser with ``parser(prog, description)`` and so answers alike::

    $ python -m ringcomm.bench --reps 0
    python -m ringcomm.bench: --reps must be at least 1, got 0 (--help lists the options)   # status 2

- a mistake is one line on stderr, naming the option, exit status 2 (the usage is what
  ``--help`` is for);
- ``--help`` shows every default once: not a default of None, False or [] (such an option's
  help says what its absence does), and not after a help text that already names its default
  ("(default: ..." in the help); ``literal`` markup of docstrings is dropped.

It imports nothing but the standard library, and every command parses its arguments before
importing torch, so ``--help`` and a mistyped option answer at once (torch takes over a second).
The argparse types below (``at_least``, ``seconds``, ...) say a bad value in the same words everywhere.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

#: Ranks that launch.py, ringcomm.bench and ringcomm.demo start without --world-size. 4, not 2: the
#: smallest world in which the algorithms differ (at P=2 ring, rhd and rd send the same two messages,
#: and a one-shard parameter server is the naive one), and the world of every example in the README.
DEFAULT_WORLD_SIZE = 4

#: The exit status of a command stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 128 + signal.SIGINT

__all__ = [
    "DEFAULT_WORLD_SIZE",
    "EXIT_INTERRUPTED",
    "HelpFormatter",
    "ctrl_c_stops_the_world",
    "ignore_ctrl_c",
    "sigint_held_by_children",
    "Parser",
    "at_least",
    "non_negative",
    "parser",
    "positive",
    "seconds",
    "unwritable",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default shown, once: not None, False or [], and not after a help that names it already."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, with a rejected argument said in one line and status 2, and no ``literal`` markup."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if isinstance(kwargs.get("description"), str):
            kwargs["description"] = kwargs["description"].replace("``", "")
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (--help lists the options)\n")


def parser(prog: str, description: str, **kwargs: Any) -> Parser:
    """The parser of the command ``prog`` (as the user types it, e.g. ``python -m ringcomm.bench``)."""
    return Parser(prog=prog, description=description, **kwargs)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low``."""

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return whole


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def non_negative(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def unwritable(path: str, folder: bool = False) -> str | None:
    """Why the output ``path`` (a file; a folder if ``folder``) cannot be written, or None if it can.

    Checked before any work, so that a run is not lost at its end to a mistyped output path. A
    file can be written if it is writable, or if its folder exists and is writable (as a shell's
    ``>`` needs); a folder, if it is writable, or if its nearest existing ancestor is a folder
    this process may create entries in (the command makes the missing ones). Nothing is created
    here: a refused command leaves no empty folders behind.
    """
    target = Path(path).expanduser()
    if target.exists():
        if folder and not target.is_dir():
            return f"{path} is a file, not a folder"
        if not folder and target.is_dir():
            return f"{path} is a folder; name a file"
        if not os.access(target, os.W_OK | (os.X_OK if folder else 0)):
            return f"{path} is not writable"
        return None
    ancestor = target.absolute().parent
    if folder:
        while not ancestor.exists():
            ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    if not ancestor.is_dir():
        return f"no folder {ancestor} to write it in"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"cannot create {target.name} in {ancestor}: that folder is not writable"
    return None


@contextmanager
def ctrl_c_stops_the_world(prog: str) -> Iterator[None]:
    """Ctrl-C in the block (a spawned world's bench or demo): stop every worker, one line, exit status 130.

    The terminal sends SIGINT to the whole process group. A worker must not act on it (each
    would print a traceback): the workers are started with SIGINT *blocked* (the main thread
    blocks it here, and a process inherits its creator's mask through fork and exec), so
    one that is still starting holds it pending, and ``ignore_ctrl_c``, the first thing a
    rank does, ignores it (dropping it) and unblocks. This process still takes SIGINT, in a
    thread made before the block that only waits; Python runs the handler in the main thread,
    which stops the workers (SIGTERM: there is nothing to save) and unwinds through
    ``run_world``, which joins them. Nothing is left behind.
    """
    import multiprocessing

    def on_sigint(signum: int, frame: Any) -> None:
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signal.SIGTERM)
            except (ProcessLookupError, TypeError):  # exited meanwhile
                pass
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, on_sigint)
    try:
        with sigint_held_by_children():
            yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C); the workers are stopped", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    finally:
        signal.signal(signal.SIGINT, before)


@contextmanager
def sigint_held_by_children() -> Iterator[None]:
    """Processes started in the block begin with SIGINT blocked (pending, not acted on) until they say.

    A process inherits its creator's signal mask through fork and exec, so the main thread
    blocks SIGINT here; a worker unblocks it once it has its own handler (``ignore_ctrl_c``,
    or launch.py's stop-after-this-step). One still importing torch when Ctrl-C comes would
    otherwise die in its import with a traceback. This process keeps taking SIGINT in a
    thread made before the block that only waits (Python runs the handler in the main thread).
    """
    import threading
    from multiprocessing import resource_tracker

    # multiprocessing starts its tracker with the first worker and then *unblocks* SIGINT in this thread
    # (resource_tracker.ensure_running): start it first, so that it leaves the mask alone afterwards
    resource_tracker.ensure_running()
    done = threading.Event()
    threading.Thread(target=done.wait, name="sigint-receiver", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        done.set()


def ignore_ctrl_c() -> None:
    """A worker of ``ctrl_c_stops_the_world``: the Ctrl-C the terminal sends it too is its parent's to act on.

    Ignored first, then unblocked: a SIGINT that arrived while the worker started is dropped. Only in
    a process that multiprocessing started (a worker): a rank run in the command's own process (a world
    of one, a test calling the rank function) keeps its Ctrl-C.
    """
    import multiprocessing

    if multiprocessing.parent_process() is None:
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
