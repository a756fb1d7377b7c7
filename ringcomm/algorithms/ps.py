r"""Parameter server all-reduce: push to a server, reduce there, pull the result.

The synchronous central parameter server (as in DistBelief, ps-lite, BytePS).
One rank, ``ps_rank`` (0 by default), is the server and a worker at once; the
others are workers. P = 4, ``ps_rank = 0``, one shard (k = 1)::

                        +-------+
                        | rank1 |
                        +-------+
                         |     ^
                    push |     | pull
                         v     |
        +-------+  push  +-------+  push  +-------+
        | rank3 | -----> | rank0 | <----- | rank2 |
        |       | <----- |server | -----> |       |
        +-------+  pull  +-------+  pull  +-------+

1. **push**: every worker sends its whole tensor x_r to the server, which has
   posted one receive per worker at once (a *reduce* receive, into its
   accumulator), so they travel in whatever order the wire delivers them.
2. **aggregate**: the server reduces in **rank order**, its own x at its own
   position, ``y = (((x0 op x1) op x2) op x3)``, whatever the arrival order: a
   reduce is applied when it is waited on, and the server waits in rank order.
   So the result is reproducible; then ``ops.finalize`` (the division of avg).
3. **pull**: the server sends y to every worker. Every rank ends with the
   server's bytes: bitwise identical everywhere.

Who sends what, P = 4, k = 1 (M = the tensor, in bytes)::

              push                        pull
    rank 0    receives x1, x2, x3 (3M)    sends y to 1, 2, 3 (3M)
    rank 1    sends x1 to 0 (M)           receives y from 0 (M)
    rank 2    sends x2 to 0 (M)           receives y from 0 (M)
    rank 3    sends x3 to 0 (M)           receives y from 0 (M)

**Sharding** (``ps_shards = k``, 1 <= k <= P), as BytePS and ps-lite split keys
over several servers: the flat tensor is cut into k contiguous key ranges with
``chunks.chunk_bounds(numel, k)``; shard j is served by rank
``(ps_rank + j) % P``, so each rank serves at most one shard. Each shard runs
steps 1-3 on its own, all shards at once. With k = 2 above, rank 0 serves
s0 = the first half and rank 1 serves s1 = the second half: rank 0 receives s0
from ranks 1, 2, 3 and pushes its own s1 to rank 1; rank 1 does the mirror
image; ranks 2 and 3 push s0 to rank 0 and s1 to rank 1, then pull both back.

Bytes each rank sends (and receives, the same), shards of M/k bytes::

                           messages sent   bytes sent = bytes received
    server of a shard      P-1 + k-1       (P-1)*M/k  +  (k-1)*M/k  = (P+k-2)/k * M
                           (pull to every other rank, push to the other servers)
    pure worker (k < P)    k               M            (one push per shard)
    k = 1: server          P-1             (P-1)*M;   workers: 1 message, M
    k = P: every rank      2(P-1)          2(P-1)/P * M, as in the ring

Sharding spreads the server's (P-1)*M over k links. Push and pull are two
rounds whose messages all fly at once, so the busiest link sets the time: the
central server's term grows with P where the ring's stays near 2M; that is why
rings replaced central servers for dense gradients. The time model is
``cost.COSTS["ps"]`` (``cost.py`` holds every algorithm's formula). Server memory:
one shard of accumulator (M/k bytes), plus what a transport that cannot reduce as
it receives stages (P-1 shards).

**Two posts, in this order, on every rank** (``transport.py``: a step's sends
and receives go out together). Round 1, push: a server's receives of its shard
and every rank's pushes. Round 2, pull: a server's sends of the result and
every rank's receives of the shards it does not serve. A server posts round 2
only after aggregating, so a server that also waits for another server's pull
must not put that receive in round 1: on NCCL, which runs one group after the
other, two servers would each wait for the other's round 2 behind their own
unfinished round 1.
"""

from __future__ import annotations

import functools

import torch

from ..ops import finalize, reduce_into
from ..transports.base import Message, Pending, Transport, recv, recv_reduce, send
from .buffers import ScratchPool
from .checks import check_ps_options  # torch-free: the command lines run it before spawning
from .chunks import chunk_bounds
from .tags import Tag

__all__ = ["ps_all_reduce", "push", "aggregate", "pull", "shard_server", "check_ps_options"]


def shard_server(shard: int, ps_rank: int, world_size: int) -> int:
    """The rank that serves shard ``shard``: ``(ps_rank + shard) % P``."""
    return (ps_rank + shard) % world_size


def push(shards: list[torch.Tensor], servers: list[int], transport: Transport) -> list[Message]:
    """This rank's slice of every shard it does not serve, each to that shard's server."""
    rank = transport.rank
    return [
        send(shard, server, Tag.PS_PUSH)
        for shard, server in zip(shards, servers)
        if server != rank and shard.numel()  # empty shards (numel < k) send no message
    ]


def aggregate(
    own: torch.Tensor,
    acc: torch.Tensor,
    arrivals: list[Pending | None],
    op: str,
    transport: Transport,
    deadline: float,
) -> None:
    """Fold every rank's contribution to the served shard into ``acc``, in rank order; result in ``own``.

    ``arrivals[r]`` is rank r's push (None for this rank, whose contribution is
    ``own``): rank 0's lands in ``acc`` as is, every later one is reduced into it
    when waited on, so the fold is ``((x0 op x1) op x2) ...`` whatever order the
    pushes arrived in. ``acc`` is ``own`` when this rank is rank 0; otherwise the
    fold runs in scratch memory in rank 0's place (max/min are not bitwise
    commutative on signed zeros, so own <- own op acc would not be the same fold).
    """
    rank, p = transport.rank, transport.world_size
    for r in range(p):
        # Step r folds in rank r's contribution: acc <- acc op x_r (step 0: acc <- x_0).
        if r != rank:
            transport.wait(arrivals[r], deadline)  # type: ignore[arg-type]
        elif r > 0:
            reduce_into(acc, own, op)
        # r == rank == 0: acc is own, x_0 is already there
    if acc is not own:
        own.copy_(acc)
    finalize(own, op, p)


def pull(own: torch.Tensor, transport: Transport) -> list[Message]:
    """The reduced shard ``own``, from its server to every other rank."""
    rank, p = transport.rank, transport.world_size
    return [send(own, peer, Tag.PS_PULL) for peer in range(p) if peer != rank]


#: Largest pushed or pulled segment of the overlapped form, in bytes (``ps_segment_bytes``).
DEFAULT_SEGMENT_BYTES = 1 << 20


def _cut(t: torch.Tensor | None, seg: int) -> list[torch.Tensor]:
    return [] if t is None else [t[i : i + seg] for i in range(0, t.numel(), seg)]


def ps_all_reduce(
    flat: torch.Tensor,
    op: str,
    transport: Transport,
    deadline: float,
    scratch: ScratchPool,
    *,
    ps_rank: int = 0,
    ps_shards: int = 1,
    ps_overlap: bool = False,
    ps_segment_bytes: int = DEFAULT_SEGMENT_BYTES,
) -> None:
    """All-reduce the contiguous 1-D tensor ``flat`` in place through a parameter server.

    Args:
        flat: contiguous 1-D tensor, this rank's contribution; holds the result after.
        op: ``"sum"``, ``"avg"``, ``"max"`` or ``"min"``.
        transport: the wire.
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
        scratch: the accumulator of a server other than rank 0 (one shard).
        ps_rank: the server rank (of shard 0 when sharded), 0 <= ps_rank < P.
        ps_shards: k, the number of key ranges and server ranks, 1 <= k <= P.
        ps_overlap: stream segments: pull segment s while segment s+1 is being pushed
            (module docstring, "Overlapped"); False: push everything, then pull.
        ps_segment_bytes: the overlapped form's segment, in bytes.

    Raises:
        ValueError: ``ps_rank`` or ``ps_shards`` out of range, before any message
            is posted; ``flat`` is untouched.

    Example::

        >>> ringcomm.all_reduce(grad, op="avg", algo="ps", ps_shards=2, ps_overlap=True)
    """
    rank, p = transport.rank, transport.world_size
    check_ps_options(ps_rank, ps_shards, p)
    if flat.numel() == 0:
        return
    shards = [flat[start : start + n] for start, n in chunk_bounds(flat.numel(), ps_shards)]
    servers = [shard_server(j, ps_rank, p) for j in range(ps_shards)]
    served = (rank - ps_rank) % p  # the shard this rank serves, if < k
    own = shards[served] if served < ps_shards and shards[served].numel() else None
    acc = None
    if own is not None:  # rank 0's contribution starts the fold: here when this rank is rank 0
        acc = own if rank == 0 else scratch.get(own.numel(), like=flat)
    # One segment per shard (push, then pull) or many (overlapped): round t pushes segment t
    # and pulls segment t-1, so with one segment there are exactly the two rounds.
    seg = max(1, ps_segment_bytes // flat.element_size()) if ps_overlap else max(s.numel() for s in shards)
    mine = [_cut(shard, seg) for shard in shards]  # this rank's slices of every shard, in segments
    own_segs, acc_segs = _cut(own, seg), _cut(acc, seg)
    sent: list[Pending] = []
    for t in range(max(len(m) for m in mine) + 1):
        # Round t, all at once: a server's receives of segment t of its shard (rank 0's into the
        # accumulator, every later one reduced into it) and its sends of segment t-1, folded in
        # round t-1; every rank's push of segment t and pull of segment t-1 of the other shards.
        arrivals: list[Message] = []
        if t < len(acc_segs):
            arrivals = [
                (recv if peer == 0 else functools.partial(recv_reduce, op=op))(acc_segs[t], peer, Tag.PS_PUSH)
                for peer in range(p)
                if peer != rank
            ]
        others = push([m[t] if t < len(m) else flat[:0] for m in mine], servers, transport)
        if t >= 1:
            if t - 1 < len(own_segs):
                others += pull(own_segs[t - 1], transport)
            # A pull lands in the very slice this rank pushed: safe, because the server sends
            # the result only after it has received this rank's whole push of that segment.
            others += [
                recv(m[t - 1], server, Tag.PS_PULL)
                for m, server in zip(mine, servers)
                if server != rank and t - 1 < len(m)
            ]
        posted = transport.post(arrivals + others)
        sent += posted[len(arrivals) :]
        if arrivals:  # fold segment t now: round t+1 sends it back
            folded: list[Pending | None] = [None] * p
            for message, pending in zip(arrivals, posted):
                folded[message.peer] = pending
            aggregate(own_segs[t], acc_segs[t], folded, op, transport, deadline)
    for pending in sent:
        transport.wait(pending, deadline)
