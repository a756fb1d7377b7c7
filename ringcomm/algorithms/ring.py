r"""Ring all-reduce: scatter-reduce, then all-gather. The readable version.

P ranks stand in a ring; each talks only to its two neighbours::

            send to right ->
        +-------+       +-------+
        | rank0 | ----> | rank1 |
        +-------+       +-------+
            ^               |
            |               v
        +-------+       +-------+
        | rank3 | <---- | rank2 |
        +-------+       +-------+

    left  = (rank - 1) mod P      (we receive from left)
    right = (rank + 1) mod P      (we send to right)

The flat tensor is cut into P chunks c0..c3 (``chunks.chunk_bounds``; sizes
differ by at most one element). Phase 1, **scatter-reduce**, P-1 steps: at step
i rank r sends chunk (r - i) and receives chunk (r - i - 1), which it reduces
into its own copy (a *reduce* message, ``transport.recv_reduce``: the transport
reduces as it receives). After P-1 steps rank r holds chunk (r + 1) fully reduced.
Phase 2, **all-gather**, P-1 steps: at step i rank r sends chunk (r + 1 - i)
(fully reduced) and receives chunk (r - i), which it stores as is.

Who sends which chunk, P = 4 (``c2`` = rank sends its chunk 2 to the right)::

                    scatter-reduce          all-gather
    step             0    1    2          0    1    2
    rank 0 sends    c0   c3   c2         c1   c0   c3
    rank 1 sends    c1   c0   c3         c2   c1   c0
    rank 2 sends    c2   c1   c0         c3   c2   c1
    rank 3 sends    c3   c2   c1         c0   c3   c2
    rank r owns c(r+1) fully reduced after scatter-reduce.

Cost: 2(P-1) messages of about M/P bytes per rank, so 2(P-1)/P * M bytes in
all, nearly independent of P (the time model is ``cost.COSTS["ring"]``, in ``cost.py`` with the others).

Every element is reduced in exactly one place (its owner) and then copied, so
all ranks end with bitwise identical bytes regardless of float rounding.

**The two phases on their own** are ``ringcomm.reduce_scatter`` and
``ringcomm.all_gather`` with ``algo="ring"`` (``ring_reduce_scatter``,
``ring_all_gather`` below). torch's convention wants rank r to end with block r,
while scatter-reduce leaves rank r owning c(r+1). So both hand the phases the
blocks rotated by one, ``chunks[j] = block (j - 1)``: rank r then owns
``chunks[r + 1]`` = block r, and the table above holds with ``cj`` read as
block j-1. For reduce_scatter, P = 4 (``b3`` = the rank sends its block 3)::

    step             0    1    2
    rank 0 sends    b3   b2   b1      rank r owns b_r fully reduced after step P-2
    rank 1 sends    b0   b3   b2
    rank 2 sends    b1   b0   b3
    rank 3 sends    b2   b1   b0

and all_gather, where rank r starts with b_r (its input) and forwards what it got::

    step             0    1    2
    rank 0 sends    b0   b3   b2
    rank 1 sends    b1   b0   b3
    rank 2 sends    b2   b1   b0
    rank 3 sends    b3   b2   b1

Each is half the all-reduce: P-1 messages of M/P bytes per rank, (P-1)/P * M
bytes (M = the whole tensor: reduce_scatter's input, all_gather's output);
``cost.COLLECTIVE_COSTS``.
``ring_pipelined.py`` is the faster variant, checked against this one.
"""

from __future__ import annotations

import torch

from ..ops import finalize
from ..transports.base import Transport, exchange, recv, recv_reduce, send
from .buffers import ScratchPool
from .chunks import chunk_bounds
from .tags import Tag

__all__ = ["ring_all_reduce", "ring_all_gather", "ring_reduce_scatter", "scatter_reduce", "all_gather"]


def scatter_reduce(
    chunks: list[torch.Tensor],
    op: str,
    transport: Transport,
    deadline: float,
    inputs: list[torch.Tensor] | None = None,
) -> None:
    """P-1 steps; afterwards ``chunks[(rank + 1) % P]`` holds the reduction of all ranks.

    Args:
        chunks: the P chunks, reduced into in place (the all-reduce: they hold this rank's
            contribution). With ``inputs``, where each step's partial reduction lands instead
            (``ring_reduce_scatter``); read only at the indices the steps reduce into.
        inputs: None, or this rank's contribution as P chunks that are only read: then each step
            receives into its target chunk and reduces this rank's own chunk into it
            (``chunk <- input op incoming``), so the contribution stays as it was without a copy.
    """
    rank, p = transport.rank, transport.world_size
    left, right = (rank - 1) % p, (rank + 1) % p
    for step in range(p - 1):
        # At step i, send chunk (rank - i) and receive chunk (rank - i - 1), reducing it into ours.
        k_send, k_recv = (rank - step) % p, (rank - step - 1) % p
        if inputs is None:
            # One post: the send and the receive travel together (empty chunks: no message at all).
            exchange(
                transport,
                [recv_reduce(chunks[k_recv], left, Tag.RING, op), send(chunks[k_send], right, Tag.RING)],
                deadline,
            )
            continue
        # Out of place: step 0 sends our own chunk as it is, later steps what the step before reduced.
        outgoing = inputs[k_send] if step == 0 else chunks[k_send]
        exchange(transport, [recv(chunks[k_recv], left, Tag.RING), send(outgoing, right, Tag.RING)], deadline)
        _reduce_from(chunks[k_recv], inputs[k_recv], op)


def _reduce_from(target: torch.Tensor, mine: torch.Tensor, op: str) -> None:
    """``target <- mine (op) target``, ``target`` holding what arrived: one pass, no copy of ``mine``.

    The operands in the order ``ops.reduce_into(mine, incoming)`` takes them (the in-place path), so
    both paths give the same bits, max and min of +0.0 and -0.0 included.
    """
    if op in ("sum", "avg"):  # avg sums; the owner divides once (ops.finalize)
        torch.add(mine, target, out=target)
    elif op == "max":
        torch.maximum(mine, target, out=target)
    elif op == "min":
        torch.minimum(mine, target, out=target)
    else:
        raise ValueError(f"unknown op {op!r}")


def all_gather(chunks: list[torch.Tensor], transport: Transport, deadline: float) -> None:
    """P-1 steps that pass each fully reduced chunk once around the ring."""
    rank, p = transport.rank, transport.world_size
    left, right = (rank - 1) % p, (rank + 1) % p
    for step in range(p - 1):
        # At step i, send chunk (rank + 1 - i) and receive chunk (rank - i) in place.
        send_chunk = chunks[(rank + 1 - step) % p]
        recv_chunk = chunks[(rank - step) % p]
        exchange(transport, [recv(recv_chunk, left, Tag.RING), send(send_chunk, right, Tag.RING)], deadline)


def ring_all_reduce(
    flat: torch.Tensor, op: str, transport: Transport, deadline: float, scratch: ScratchPool
) -> None:
    """All-reduce the contiguous 1-D tensor ``flat`` in place over ``transport``.

    Args:
        flat: contiguous 1-D tensor, this rank's contribution; holds the result after.
        op: ``"sum"``, ``"avg"``, ``"max"`` or ``"min"``.
        transport: the wire.
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
        scratch: unused (a transport stages what it cannot reduce in place itself).
    """
    p = transport.world_size
    chunks = [flat[start : start + n] for start, n in chunk_bounds(flat.numel(), p)]
    scatter_reduce(chunks, op, transport, deadline)
    finalize(chunks[(transport.rank + 1) % p], op, p)  # only the owner divides (avg)
    all_gather(chunks, transport, deadline)


def _rotated_blocks(flat: torch.Tensor, p: int) -> list[torch.Tensor]:
    """``flat``'s P equal blocks as the phases' chunks, rotated by one: ``chunks[j]`` = block (j - 1).

    scatter-reduce leaves rank r owning ``chunks[r + 1]``, which is then block r, as torch's
    reduce_scatter_tensor and all_gather_into_tensor want (the table in the module docstring).
    """
    n = flat.numel() // p
    blocks = [flat[i * n : (i + 1) * n] for i in range(p)]
    return blocks[-1:] + blocks[:-1]


def ring_reduce_scatter(
    output: torch.Tensor,
    input: torch.Tensor,
    op: str,
    transport: Transport,
    deadline: float,
    work: torch.Tensor | None = None,
) -> None:
    """Phase 1 alone: ``output`` (n elements) <- block ``rank`` of the reduction of every rank's ``input``.

    ``input`` is only read. Each step receives into ``output`` or one scratch block and reduces this
    rank's own block into it there (``scatter_reduce``'s ``inputs``): no copy of the input, and one
    block of scratch memory (P >= 3), where a copy took P blocks. The step's targets alternate so that a block is
    never received into while the step sends it on, and the last step's is ``output``; for P = 4,
    rank r (blocks rotated as above, ``chunks[j]`` = block j-1)::

        step              0          1          2
        sends             input      output     scratch     (later steps: what the step before reduced)
        receives into     output     scratch    output      (output: block r fully reduced after step P-2)

    (P = 3: scratch, then output; P = 2: output alone.)

    Args:
        output: contiguous 1-D, n elements; this rank's block of the result after.
        input: contiguous 1-D, P * n elements: this rank's contribution, left as it was.
        op: ``"sum"``, ``"avg"``, ``"max"`` or ``"min"``.
        transport: the wire.
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
        work: None, or a copy of ``input`` (P * n elements) to reduce into in place instead, as the
            all-reduce does: every message then lands in that one tensor, which is what a traced run
            needs to place and label each message (``collectives.py``). ``input`` is then unused.
    """
    rank, p = transport.rank, transport.world_size
    if work is not None:
        chunks = _rotated_blocks(work, p)
        scatter_reduce(chunks, op, transport, deadline)
        mine = chunks[(rank + 1) % p]  # = block rank
        finalize(mine, op, p)  # avg: the owner divides once
        output.copy_(mine)
        return
    inputs = _rotated_blocks(input, p)
    if p == 1:
        output.copy_(input)  # no step: the only block is ours as it is
        return
    scratch = torch.empty_like(output) if p > 2 else output
    targets = list(inputs)  # index rank: sent at step 0 from the input, never received into
    for step in range(p - 1):
        # Step i receives chunk (rank - i - 1); output at the last step, and at every second before it.
        targets[(rank - step - 1) % p] = output if (p - 2 - step) % 2 == 0 else scratch
    scatter_reduce(targets, op, transport, deadline, inputs)
    finalize(output, op, p)  # avg: the owner divides once


def ring_all_gather(output: torch.Tensor, transport: Transport, deadline: float) -> None:
    """Phase 2 alone: ``output`` (P * n elements) holds this rank's input in block ``rank``; after, all blocks.

    Args:
        output: contiguous 1-D, P * n elements, block ``rank`` already filled with this rank's input.
        transport: the wire.
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
    """
    all_gather(_rotated_blocks(output, transport.world_size), transport, deadline)
