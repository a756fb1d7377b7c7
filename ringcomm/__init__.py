"""ringcomm: ring all-reduce and a parameter server, written to be read and measured.

    >>> import torch, torch.distributed as dist, ringcomm
    >>> dist.init_process_group("gloo")          # or torchrun / launch.py
    >>> t = torch.full((1000,), float(dist.get_rank()))
    >>> ringcomm.all_reduce(t, op="sum", algo="ring")        # in place; returns t
    >>> fut = ringcomm.all_reduce_async(t, algo="ps")       # on ringcomm's comm thread
    >>> fut.wait()

Where things are (``ls`` shows the layers; docs/layout.md has a line per module):

- ``api.py``: the public calls (all_reduce, reduce_scatter, all_gather, broadcast, their
  ``_async`` forms, run_async, init, explain_auto): validate, queue, check, run.
- ``algorithms/``: one algorithm a file, each beside its diagram and cost (ring.py first),
  and ``registry.py``, the contract they share.
- ``transports/``: how bytes move between two ranks (``base.py``: the protocol; torch.py,
  zmq.py, shm.py).
- ``runtime/``: what runs around a collective (session, rendezvous, same-call check, call
  board, liveness, the comm queue, settings, trace).
- ``cost.py`` and ``auto.py``: the alpha-beta model and the picker that uses it.
- ``tools/``: the commands' code (bench, demo, the local process spawner, the one CLI parser).

``names.py`` (the algorithm, transport and op names and the bench's label grammar),
``errors.py``, ``cost.py`` and ``tools/cli.py`` need no torch: ``import ringcomm`` imports
torch only when a collective or a tensor type is first touched (``__getattr__`` below), so
commands answer ``--help`` at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Torch-free, so imported at once: the errors a caller catches and the default timeout.
from .errors import CommError, CommTimeoutError, FrameError, MismatchError, PeerError
from .runtime.settings import DEFAULT_TIMEOUT_S

# The rest needs torch (over a second to import), so it is imported when first touched
# (PEP 562): `import ringcomm` in a command's --help costs milliseconds, and
# `ringcomm.all_reduce(...)` imports what it needs on its first call. name -> (module, attribute).
_LAZY: dict[str, tuple[str, str]] = {
    "ALGOS": ("algorithms.registry", "ALGOS"),
    "all_reduce": ("api", "all_reduce"),
    "all_reduce_async": ("api", "all_reduce_async"),
    "reduce_scatter": ("api", "reduce_scatter"),
    "reduce_scatter_async": ("api", "reduce_scatter_async"),
    "all_gather": ("api", "all_gather"),
    "all_gather_async": ("api", "all_gather_async"),
    "broadcast": ("api", "broadcast"),
    "broadcast_async": ("api", "broadcast_async"),
    "run_async": ("api", "run_async"),
    "comm_stats": ("api", "comm_stats"),
    "init": ("api", "init"),
    "explain_auto": ("api", "explain_auto"),
    "CommStats": ("runtime.comm_queue", "CommStats"),
    "shutdown": ("runtime.session", "shutdown"),
    "Transport": ("transports.base", "Transport"),
    "transport_names": ("transports.base", "transport_names"),
}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from .algorithms.registry import ALGOS
    from .api import (
        all_gather,
        all_gather_async,
        all_reduce,
        all_reduce_async,
        broadcast,
        broadcast_async,
        comm_stats,
        explain_auto,
        init,
        reduce_scatter,
        reduce_scatter_async,
        run_async,
    )
    from .runtime.comm_queue import CommStats
    from .runtime.session import shutdown
    from .transports.base import Transport, transport_names


def __getattr__(name: str) -> Any:
    """``ringcomm.<name>``, imported on first use: a public name of ``_LAZY``, or a submodule."""
    if name in _LAZY:
        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attribute)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("__"):
        try:  # `import ringcomm; ringcomm.runtime.trace.enable(...)` worked when the root imported everything
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise  # the submodule exists but something it imports does not
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "ALGOS",
    "DEFAULT_TIMEOUT_S",
    "CommError",
    "CommStats",
    "CommTimeoutError",
    "FrameError",
    "MismatchError",
    "PeerError",
    "Transport",
    "all_gather",
    "all_gather_async",
    "all_reduce",
    "all_reduce_async",
    "broadcast",
    "broadcast_async",
    "reduce_scatter",
    "reduce_scatter_async",
    "run_async",
    "comm_stats",
    "explain_auto",
    "init",
    "shutdown",
    "transport_names",
]

__version__ = "0.2.0.dev0"
