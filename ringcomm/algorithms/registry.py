"""The algorithm contract, written once, and the registry of algorithms.

Every all-reduce algorithm is a function with the same signature
(``Algorithm``): it reduces a contiguous 1-D tensor in place over a transport,
by a deadline, taking scratch memory from a pool, plus keyword-only options
of its own. ``AlgorithmSpec`` adds what the API needs to know about it without
running it: its options and their defaults, how to validate them before any
message is sent, and how it cuts the tensor (for the trace's labels)::

    ALGOS["ps"].options({"ps_shards": 2}, world_size=4)   # -> {"ps_rank": 0, "ps_shards": 2}
    ALGOS["ps"].run(flat, "sum", transport, deadline, scratch, ps_rank=0, ps_shards=2)

Options are always completed with their defaults before use, so two ranks that
pass ``ps_rank=0`` and nothing mean the same call (the same-call check compares
the completed options).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..names import ALGO_NAMES
from ..transports.base import Transport
from . import hier
from .buffers import ScratchPool
from .checks import check_options
from .chunks import chunk_bounds
from .fold import core_size
from .hier import check_hier_options, hier_all_reduce
from .naive import naive_all_reduce
from .ps import ps_all_reduce
from .rd import rd_all_reduce
from .rhd import rhd_all_reduce
from .ring import ring_all_reduce
from .ring_pipelined import pipelined_ring_all_reduce

__all__ = ["ALGOS", "Algorithm", "AlgorithmSpec", "algorithm"]

#: (label, start, numel) of each part an algorithm cuts the flat tensor into.
Parts = list[tuple[str, int, int]]


class Algorithm(Protocol):
    """An all-reduce: ``flat`` (contiguous, 1-D) is this rank's input and, after, the result."""

    def __call__(
        self,
        flat: torch.Tensor,
        op: str,
        transport: Transport,
        deadline: float,
        scratch: ScratchPool,
        /,
        **options: Any,
    ) -> None: ...


def _keyword_defaults(run: Callable[..., None]) -> dict[str, object]:
    params = inspect.signature(run).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm and what the API must know about it before running it.

    Attributes:
        name: what ``all_reduce(algo=...)`` takes.
        run: the function (``Algorithm``).
        summary: one line for ``--help`` and errors.
        validate: ``validate(options, world_size)`` raises ValueError for bad option values
            (``checks.check_options``, torch-free, so that the command lines run it before spawning).
        parts: ``parts(numel, world_size, options)``: how it cuts the tensor, for trace labels.
        defaults: the keyword-only options of ``run`` and their defaults (read from its signature).
    """

    name: str
    run: Algorithm
    summary: str
    validate: Callable[[Mapping[str, Any], int], None] | None = None
    parts: Callable[[int, int, Mapping[str, Any]], Parts] | None = None
    defaults: Mapping[str, object] = field(default_factory=dict)

    def options(self, given: Mapping[str, Any], world_size: int | None) -> dict[str, Any]:
        """``given`` completed with the defaults; ValueError for an unknown option or a bad value.

        ``world_size`` None checks the names only (the values' ranges need the world).
        """
        for name in given:
            if name not in self.defaults:
                known = ", ".join(self.defaults) or "none"
                raise ValueError(f"algo={self.name!r} takes no option {name!r}; its options are: {known}")
        complete = {**self.defaults, **given}
        if self.validate is not None and world_size is not None:
            self.validate(complete, world_size)
        return complete

    def cut(self, numel: int, world_size: int, options: Mapping[str, Any]) -> Parts:
        """The parts of a tensor of ``numel`` elements (one part, "all", if the algorithm keeps it whole)."""
        if self.parts is None:
            return [("all", 0, numel)]
        return self.parts(numel, world_size, options)


def algorithm(
    name: str,
    run: Algorithm,
    summary: str,
    validate: Callable[[Mapping[str, Any], int], None] | None = None,
    parts: Callable[[int, int, Mapping[str, Any]], Parts] | None = None,
) -> AlgorithmSpec:
    """An ``AlgorithmSpec`` whose option defaults are read from ``run``'s signature."""
    return AlgorithmSpec(name, run, summary, validate, parts, _keyword_defaults(run))


def _resolved_per_call(*args: Any, **kwargs: Any) -> None:
    """``algo="auto"`` never runs as itself: ``ringcomm.all_reduce`` asks the cost model (``auto.py``) which
    algorithm to run for each call, with the world's fit, and runs that one."""
    raise RuntimeError("algo='auto' is resolved by ringcomm.all_reduce; use auto.choose() to pick an algorithm")


def _ring_parts(numel: int, p: int, options: Mapping[str, Any]) -> Parts:
    return [(f"c{i}", start, n) for i, (start, n) in enumerate(chunk_bounds(numel, p))]


def _rhd_parts(numel: int, p: int, options: Mapping[str, Any]) -> Parts:
    # the P' chunks of the power-of-two core; a fold message is the whole tensor, labelled c0
    return [(f"c{i}", start, n) for i, (start, n) in enumerate(chunk_bounds(numel, core_size(p)))]


def _ps_parts(numel: int, p: int, options: Mapping[str, Any]) -> Parts:
    return [(f"s{j}", start, n) for j, (start, n) in enumerate(chunk_bounds(numel, options["ps_shards"]))]


#: name -> spec, in the order ``--help`` lists them.
ALGOS: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for spec in (
        algorithm(
            "ring",
            pipelined_ring_all_reduce,
            "pipelined ring (ring_pipelined.py): the fast one",
            check_options,
            _ring_parts,
        ),
        algorithm("ring_simple", ring_all_reduce, "the readable ring of ring.py, step for step", None, _ring_parts),
        algorithm(
            "ps",
            ps_all_reduce,
            "parameter server, optionally sharded (param_server.py)",
            check_options,
            _ps_parts,
        ),
        algorithm("naive", naive_all_reduce, "gather to rank 0, reduce, broadcast back (naive.py)"),
        algorithm(
            "rhd",
            rhd_all_reduce,
            "recursive halving, then doubling (rhd.py): the ring's bytes in 2 log2(P) steps",
            None,
            _rhd_parts,
        ),
        algorithm("rd", rd_all_reduce, "recursive doubling on whole vectors (rd.py): log2(P) steps, for small tensors"),
        algorithm(
            "hier",
            hier_all_reduce,
            "two-level (hier.py): reduce-scatter in the node over shm, all-reduce across nodes, all-gather",
            check_hier_options,
        ),
        # resolved per call by ringcomm.all_reduce into one of auto.CANDIDATES (auto.py)
        algorithm("auto", _resolved_per_call, "the cost model picks per call: rd or rhd small, the ring large (auto.py)"),
    )
}
hier.use_registry(ALGOS)  # hier runs one of the others across nodes


# The command lines offer names.ALGO_NAMES without importing this module (nor torch): the two
# lists are one, or nothing imports.
if tuple(ALGOS) != ALGO_NAMES:
    raise ImportError(f"ringcomm.ALGOS {tuple(ALGOS)} differs from ringcomm.names.ALGO_NAMES {ALGO_NAMES}")
