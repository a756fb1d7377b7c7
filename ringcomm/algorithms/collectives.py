"""The algorithms of broadcast, all_gather and reduce_scatter, and the registry the api picks them from.

``registry.py`` holds all_reduce's; this module holds the other collectives', with the same
``AlgorithmSpec`` (options read from the function's keyword-only arguments, validated before
any message is sent). Each run here has one signature::

    run(output, input, op, src, transport, deadline, **options)

``output`` and ``input`` are contiguous 1-D tensors (broadcast: both are the tensor), ``op`` is
reduce_scatter's (the others get ``""``), ``src`` broadcast's root (the others get 0).
reduce_scatter's ``input`` is the caller's and only read: the ring receives into the output and
one scratch block and reduces its own blocks into them there (``ring.ring_reduce_scatter``), rhd
reduces into a copy it makes. A traced run (``trace.TracedTransport``: the demo, a trace file)
is the exception: the api passes a copy of the input there, and both reduce into it in place, so
that every message lands in the one tensor the tracer places and labels messages in. Where
the work is done:

    collective       ring                           the other                        file
    reduce_scatter   scatter-reduce (ring.py)       rhd: recursive halving           ring.py, rhd.py
    all_gather       all-gather (ring.py)           rd: recursive doubling           ring.py, rhd.py
    broadcast        pipelined chain (chain.py)     tree: binomial tree              chain.py, tree.py

The all-reduce's phases are these very functions: ``ring_all_reduce`` is ``scatter_reduce``
then ``all_gather``, ``rhd_all_reduce`` is ``recursive_halving`` then ``recursive_doubling``.
``"auto"`` is resolved per call by the api from ``cost.COLLECTIVE_COSTS`` (``auto.choose_collective``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..runtime.trace import TracedTransport
from ..transports.base import Transport
from .chain import chain_broadcast
from .chunks import CHAIN_SEGMENT_BYTES
from .registry import AlgorithmSpec, algorithm
from .rhd import rd_all_gather, require_power_of_two, rhd_reduce_scatter
from .ring import ring_all_gather, ring_reduce_scatter
from .tree import tree_broadcast

__all__ = ["COLLECTIVES", "COLLECTIVE_ALGOS", "POWER_OF_TWO_ONLY"]

#: The collectives of this module, in the order errors list them.
COLLECTIVES = ("reduce_scatter", "all_gather", "broadcast")

#: (collective, algo) pairs that need P a power of two (``auto`` leaves them out elsewhere).
POWER_OF_TWO_ONLY = frozenset({("reduce_scatter", "rhd"), ("all_gather", "rd")})


def _traced(transport: Transport) -> bool:
    """Whether this run is traced: the api then passed reduce_scatter a copy of the input to reduce into."""
    return isinstance(transport, TracedTransport)


def _ring_reduce_scatter(
    output: torch.Tensor, input: torch.Tensor, op: str, src: int, transport: Transport, deadline: float
) -> None:
    # untraced: input read only, no copy; traced: input is the api's copy, reduced into (the module)
    ring_reduce_scatter(output, input, op, transport, deadline, work=input if _traced(transport) else None)


def _rhd_reduce_scatter(
    output: torch.Tensor, input: torch.Tensor, op: str, src: int, transport: Transport, deadline: float
) -> None:
    # recursive halving reduces into its tensor in place: a copy, unless the api's (traced) already is one
    rhd_reduce_scatter(output, input if _traced(transport) else input.clone(), op, transport, deadline)


def _own_block(output: torch.Tensor, input: torch.Tensor, rank: int) -> None:
    n = input.numel()
    output[rank * n : (rank + 1) * n].copy_(input)


def _ring_all_gather(
    output: torch.Tensor, input: torch.Tensor, op: str, src: int, transport: Transport, deadline: float
) -> None:
    _own_block(output, input, transport.rank)
    ring_all_gather(output, transport, deadline)


def _rd_all_gather(
    output: torch.Tensor, input: torch.Tensor, op: str, src: int, transport: Transport, deadline: float
) -> None:
    _own_block(output, input, transport.rank)
    rd_all_gather(output, transport, deadline)


def _chain_broadcast(
    output: torch.Tensor,
    input: torch.Tensor,
    op: str,
    src: int,
    transport: Transport,
    deadline: float,
    *,
    segment_bytes: int = CHAIN_SEGMENT_BYTES,
) -> None:
    chain_broadcast(output, src, transport, deadline, segment_bytes=segment_bytes)


def _tree_broadcast(
    output: torch.Tensor, input: torch.Tensor, op: str, src: int, transport: Transport, deadline: float
) -> None:
    tree_broadcast(output, src, transport, deadline)


def _blocks(numel: int, world_size: int, options: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """The trace's labels for reduce_scatter's input and all_gather's output: block ``b<r>`` is rank r's."""
    n = numel // world_size
    return [(f"b{r}", r * n, n) for r in range(world_size)]


def _resolved_per_call(*args: Any, **kwargs: Any) -> None:
    raise RuntimeError("algo='auto' is resolved per call by the api (auto.choose_collective)")


def _power_of_two(collective: str, algo: str) -> Any:
    def check(options: Mapping[str, Any], world_size: int) -> None:
        require_power_of_two(f"{collective} algo={algo!r}", world_size)

    return check


def _check_segment_bytes(options: Mapping[str, Any], world_size: int) -> None:
    value = options["segment_bytes"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"segment_bytes={value!r}: expected an integer >= 1 (bytes)")


#: collective -> algo name -> spec, in the order ``--help`` and errors list them.
COLLECTIVE_ALGOS: dict[str, dict[str, AlgorithmSpec]] = {
    "reduce_scatter": {
        "ring": algorithm("ring", _ring_reduce_scatter, "the ring's scatter-reduce phase (ring.py)", parts=_blocks),  # type: ignore[arg-type]
        "rhd": algorithm(
            "rhd", _rhd_reduce_scatter, "recursive halving (rhd.py), P a power of two",  # type: ignore[arg-type]
            _power_of_two("reduce_scatter", "rhd"), _blocks,
        ),
        "auto": algorithm("auto", _resolved_per_call, "the cost model picks per call"),
    },
    "all_gather": {
        "ring": algorithm("ring", _ring_all_gather, "the ring's all-gather phase (ring.py)", parts=_blocks),  # type: ignore[arg-type]
        "rd": algorithm(
            "rd", _rd_all_gather, "recursive doubling (rhd.py), P a power of two",  # type: ignore[arg-type]
            _power_of_two("all_gather", "rd"), _blocks,
        ),
        "auto": algorithm("auto", _resolved_per_call, "the cost model picks per call"),
    },
    "broadcast": {
        "ring": algorithm(
            "ring", _chain_broadcast, "pipelined chain src -> src+1 -> ... (chain.py)",  # type: ignore[arg-type]
            _check_segment_bytes,
        ),
        "tree": algorithm("tree", _tree_broadcast, "binomial tree, log2(P) rounds (tree.py)"),  # type: ignore[arg-type]
        "auto": algorithm("auto", _resolved_per_call, "the cost model picks per call"),
    },
}
