r"""Recursive doubling on whole vectors: the fewest rounds, for the smallest messages.

A small all-reduce is all latency: the ring's 2(P-1) steps and even
``rhd.py``'s 2·log2(P) cost more than the bytes. Here each step is one
exchange of the whole tensor (M bytes) with the partner at distance d, and
both partners reduce, so log2(P) steps finish the job. At step i, d = 2^i and
rank r's partner is ``r XOR d``::

        step 0, d = 1                  step 1, d = 2
    rank0 <---> rank1              rank0 <-----------> rank2
    rank2 <---> rank3              rank1 <-----------> rank3

After step i a rank holds the reduction of the 2^(i+1) ranks that share its
number's upper bits; after log2(P) steps, of all of them. Written with
``x01 = x0 op x1``, the lower-numbered ranks' data always first::

                     step 0 (d = 1)    step 1 (d = 2)    holds after
    rank 0 sends       x0 -> 1          x01 -> 2          x0123
    rank 1 sends       x1 -> 0          x01 -> 3          x0123
    rank 2 sends       x2 -> 3          x23 -> 0          x0123
    rank 3 sends       x3 -> 2          x23 -> 1          x0123
    (x0123 = x01 op x23, computed by all four ranks)

**Any P** (``fold.py``): P = P' + e with P' the largest power of two <= P.
Each extra rank P' + j first hands its vector to rank j, which reduces it into
its own; ranks 0..P'-1 run the above; then rank j sends the result y back.
P = 6 (P' = 4; a = x0 op x4, b = x1 op x5)::

                  fold-in        step 0 (d = 1)    step 1 (d = 2)       fold-out
    rank 0        <- x4          a -> 1            ab -> 2              y -> 4
    rank 1        <- x5          b -> 0            ab -> 3              y -> 5
    rank 2           .           x2 -> 3           x23 -> 0               .
    rank 3           .           x3 -> 2           x23 -> 1               .
    rank 4        x4 -> 0          (idle until the fold-out)            <- y
    rank 5        x5 -> 1                                               <- y
    (ab = a op b; y = ab op x23, divided by 6 for avg)

Every message is the whole tensor, M bytes.

Cost (``cost.COSTS["rd"]``, with the other algorithms' in ``cost.py``): P a
power of two: log2(P) messages of M bytes per rank, log2(P)·M bytes: fewer
rounds than any other algorithm here, more bytes than the ring from P = 4 on.
Otherwise a fold partner also takes M in and sends M back: log2(P') + 2
messages and (log2(P') + 2)·M bytes on its chain, the critical path.

**Why all ranks agree bitwise.** Unlike the ring, both partners compute the
same combination, so they must compute it the same way, bit for bit. By
induction: before the step at distance d, the d ranks of each aligned group
(the ranks that differ only in bits below d) hold identical bytes; partners
r < r + d each hold one group's bytes and both compute ``lower op upper`` (the
lower group's data first) into a buffer of the whole vector, so both groups
of d end with identical bytes. Two traps, both real on torch 2.15 with AVX-512:

* Operand order: ``torch.maximum(+0.0, -0.0)`` and ``torch.maximum(-0.0, +0.0)``
  differ in the sign bit (min too, and NaN payloads). ``recv_reduce`` computes
  ``tensor op incoming``, which puts the higher rank's own data first, so the
  higher rank receives into scratch (``scratch.get``) and reduces there.
* Where the kernel splits: torch runs the bulk of an element-wise op in SIMD
  and the remainder in scalar code, and the two disagree on the same signed
  zeros (``torch.maximum(+0.0, -0.0)`` is -0.0 in the vector body and +0.0 in
  the scalar tail), so two ranks agree only if both reduce the same range in
  one call. A transport that reduces as it receives may run the reduce in
  pieces (shared memory: one per fragment; today's fragments are multiples of
  64 bytes, in step with AVX-512, but nothing promises that). And the lower
  rank could not reduce into its vector as data arrives anyway: it is sending
  that vector in the same step, and a send's tensor must not change until it
  is waited. So the lower rank receives into scratch too, and both reduce the
  whole vector in one call. (This assumes what a data-parallel job has anyway:
  the same torch build and the same number of intra-op threads on every rank,
  since threads split an op's range as well.)

Integer ops and float sums give the same bits on either code path and, NaN
payloads aside, in either order (IEEE addition is commutative and correctly
rounded), so the care above is for max and min. ``avg`` sums, then every core
rank divides its (identical) whole vector by P in one call (``ops.finalize``),
and the extra ranks receive their partner's quotient: the same bits.
"""

from __future__ import annotations

import torch

from ..ops import finalize, reduce_into
from ..transports.base import Transport, exchange, recv, send
from .buffers import ScratchPool
from .fold import core_size, fold_in, fold_out
from .tags import Tag

__all__ = ["rd_all_reduce", "recursive_doubling"]


def recursive_doubling(
    flat: torch.Tensor, op: str, core: int, transport: Transport, deadline: float, incoming: torch.Tensor
) -> None:
    """log2(``core``) exchanges of the whole ``flat``; ``incoming`` is scratch of ``flat.numel()`` elements."""
    rank = transport.rank
    d = 1
    while d < core:
        partner = rank ^ d
        # At distance d, swap the whole vector with rank XOR d; then both compute lower op upper.
        exchange(transport, [recv(incoming, partner, Tag.RD), send(flat, partner, Tag.RD)], deadline)
        if rank < partner:
            reduce_into(flat, incoming, op)  # ours is the lower group's: flat <- flat op incoming
        else:
            reduce_into(incoming, flat, op)  # the partner's is: incoming <- incoming op flat
            flat.copy_(incoming)
        d *= 2


def rd_all_reduce(
    flat: torch.Tensor, op: str, transport: Transport, deadline: float, scratch: ScratchPool
) -> None:
    """All-reduce the contiguous 1-D tensor ``flat`` in place by recursive doubling on whole vectors.

    Args:
        flat: contiguous 1-D tensor, this rank's contribution; holds the result after.
        op: ``"sum"``, ``"avg"``, ``"max"`` or ``"min"``.
        transport: the wire.
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
        scratch: the partner's vector lands here each step (``flat.numel()`` elements).

    Example::

        >>> ringcomm.all_reduce(loss, op="avg", algo="rd")  # a few bytes: latency is all
    """
    rank, p = transport.rank, transport.world_size
    if flat.numel() == 0 or p == 1:
        return  # nothing to move; avg over one rank divides by 1
    core = core_size(p)
    fold_in(flat, op, transport, deadline)
    if rank < core:
        recursive_doubling(flat, op, core, transport, deadline, scratch.get(flat.numel(), like=flat))
        finalize(flat, op, p)  # every core rank divides the same bits the same way (avg)
    fold_out(flat, transport, deadline)
