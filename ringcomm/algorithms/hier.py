r"""Two-level (hierarchical) all-reduce: shared memory inside a node, the network across nodes.

N = n·g ranks on n nodes of g ranks each. Inside a node the ranks share memory (``shm``,
fast); between nodes each node has one link (slow), shared by its g ranks::

        node A (shm)                       node B (shm)
    +-------------------+              +-------------------+
    | rank0 <--> rank1  |              | rank2 <--> rank3  |      phases 1 and 3: inside the node
    +--|-----------|----+              +--|-----------|----+
       |           +----- local 1 ---------------+    |         phase 2: across, one cross group
       +----------------- local 0 ----------------+---+                  per local rank, all at once
                       (the nodes' links)

    1. reduce-scatter inside the node (shm; the ring's scatter-reduce, ring.py): local rank l
       ends owning chunk c(l+1) of the node's sum (chunks: ``chunk_bounds(numel, g)``).
    2. all-reduce that chunk across nodes, among the ranks of local rank l (the cross group),
       over the call's transport, with any all-reduce (``hier_inner``; ``auto`` by default).
    3. all-gather inside the node (shm; the ring's all-gather): every rank gets every chunk.

Who sends what, 2 nodes x 2 ranks (ranks 0, 1 on node A, 2, 3 on node B; ``c1`` = chunk 1)::

    phase                 1 (node, shm)      2 (cross, network)          3 (node, shm)
    rank 0 (A, local 0)   c0 -> rank 1       c1 <-> rank 2 (all-reduce)  c1 -> rank 1
    rank 1 (A, local 1)   c1 -> rank 0       c0 <-> rank 3               c0 -> rank 0
    rank 2 (B, local 0)   c0 -> rank 3       c1 <-> rank 0               c1 -> rank 3
    rank 3 (B, local 1)   c1 -> rank 2       c0 <-> rank 1               c0 -> rank 2
    after phase 1 rank l of each node owns c(l+1) of its node's sum; after phase 2, of everyone's.

Cost (S = the tensor's bytes; a ring in phase 2): each rank puts 2(n-1)/n · S/g on the network,
so each node's link carries 2(n-1)/n · S. A flat ring of N ranks placed node by node crosses
each node's link once, carrying 2(N-1)/N · S; placed round-robin (interleaved), every hop
crosses, g times that. At 2 x 2: S against 1.5 S (contiguous) and 3 S (interleaved). Time ≈
phase 2 on a link shared by g ranks, plus 2(g-1) shm steps of S/g bytes (``cost.py``).

Every element is reduced in one place per phase (its chunk's owner in the node, then the
cross all-reduce, bitwise equal across its group) and then copied, so the ranks end bitwise
equal. ``avg`` sums through both levels and divides once, by N, on the chunk's owner.

**Which ranks form a node**, agreed once per session (one gather through the store):
``hier_ranks_per_node=G`` (> 0) makes consecutive blocks of G ranks a node (tests on one
host; a cluster whose nodes are contiguous); otherwise torchrun's ``GROUP_RANK`` where set,
else the host identity the shm transport uses (``segments.host_identity``). Nodes of
different sizes are refused on every rank alike (``ValueError``). The node's and the cross
group's sessions are made at the first ``hier`` call, among their members only, without
``dist.new_group`` (``session.member_session``); the node's transport is ``shm``, the
cross group's the call's own (over ``torch``: CPU tensors only, as ``group=``), each carrying
the call's ``wire_dtype`` if it has one. The bytes they move are added to the call transport's
byte counters, which ``comm_stats`` reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..compress.wire import WireTransport
from ..errors import CommError
from ..ops import finalize
from ..runtime import session as sessions
from ..transports.base import Transport, transport_kind
from ..transports.segments import host_identity
from .buffers import ScratchPool
from .chunks import chunk_bounds
from .ring import all_gather, scatter_reduce

__all__ = ["Layout", "check_hier_options", "hier_all_reduce", "node_layout", "node_shape", "session_layout"]


@dataclass(frozen=True)
class Layout:
    """The nodes of a session: ``nodes[k]`` the ranks (ascending) of node k, nodes ordered by their
    lowest rank; all of one size g."""

    nodes: tuple[tuple[int, ...], ...]

    def place(self, rank: int) -> tuple[int, int]:
        """(node index, local rank) of ``rank``."""
        for k, members in enumerate(self.nodes):
            if rank in members:
                return k, members.index(rank)
        raise ValueError(f"rank {rank} is on no node of {self.nodes}")

    def node_of(self, rank: int) -> tuple[int, ...]:
        return self.nodes[self.place(rank)[0]]

    def cross_of(self, rank: int) -> tuple[int, ...]:
        """The ranks with ``rank``'s local rank, one per node: its cross group."""
        local = self.place(rank)[1]
        return tuple(members[local] for members in self.nodes)


def node_layout(keys: list[str], rank: int) -> Layout:
    """The nodes from every rank's node key (by rank); ValueError naming the sizes if they differ."""
    by_key: dict[str, list[int]] = {}
    for r, key in enumerate(keys):
        by_key.setdefault(key, []).append(r)
    nodes = tuple(sorted(tuple(members) for members in by_key.values()))
    sizes = {len(members) for members in nodes}
    if len(sizes) > 1:
        described = "; ".join(f"{key!r}: ranks {members}" for key, members in by_key.items())
        raise ValueError(
            f"rank {rank}: algo='hier' needs as many ranks on every node, but the nodes have "
            f"{sorted(len(m) for m in nodes)} ranks ({described}); use another algo"
        )
    return Layout(nodes)


def _node_key(rank: int, ranks_per_node: int) -> str:
    """What names this rank's node: its block of ``ranks_per_node``, torchrun's node, or the host."""
    if ranks_per_node > 0:
        return f"block {rank // ranks_per_node}"
    group_rank = os.environ.get("GROUP_RANK")
    if group_rank is not None and "LOCAL_RANK" in os.environ:
        return f"torchrun node {group_rank}"
    return f"host {host_identity()}"


#: The algorithms hier may run across nodes: the registry hands itself over once it is built
#: (``registry.py`` calls ``use_registry``), so that this module need not import the registry that
#: imports it.
ALGOS: Mapping[str, Any] = {}


def use_registry(algos: Mapping[str, Any]) -> None:
    """Let ``hier_inner`` name any algorithm of ``algos`` (the registry, once built)."""
    global ALGOS
    ALGOS = algos


#: Layouts agreed so far, by (session prefix, hier_ranks_per_node): one gather per session and option.
_LAYOUTS: dict[tuple[str, int], Layout] = {}

#: ``node_shape``'s answers so far, by session prefix (None: uneven nodes).
_SHAPES: dict[str, tuple[int, int] | None] = {}


def session_layout(session: Any, ranks_per_node: int, deadline: float) -> Layout:
    """The nodes of ``session``'s world, agreed once (a gather of every rank's node key through the
    store, then cached): a collective, so every rank must ask at the same call.

    Raises:
        ValueError: the nodes have different numbers of ranks (``node_layout``).
    """
    key = (session.prefix, ranks_per_node)
    layout = _LAYOUTS.get(key)
    if layout is None:
        keys = session.rendezvous.gather(
            session.key("hier-nodes", ranks_per_node), _node_key(session.rank, ranks_per_node),
            deadline, "algo='hier': which node each rank is on",
        )
        layout = _LAYOUTS[key] = node_layout(keys, session.rank)
    return layout


def node_shape(session: Any, deadline: float, device: str = "cpu") -> tuple[int, int] | None:
    """``(n nodes, g ranks per node)`` of ``session``'s world as ``hier`` finds them by default, for
    ``algo="auto"`` to weigh ``hier`` (``auto.choose``); None where ``hier`` cannot be worth weighing,
    without asking anyone: fewer than 4 ranks (n > 1 and g > 1 need n·g >= 4) or a device other
    than the CPU. Nodes of different sizes give None too (``hier`` refuses them), on every rank alike.

    A collective the first time (``session_layout``): call it at the same call on every rank.
    """
    if session.world_size < 4 or device != "cpu":
        return None
    if session.prefix in _SHAPES:
        return _SHAPES[session.prefix]
    try:
        layout = session_layout(session, 0, deadline)
        shape: tuple[int, int] | None = (len(layout.nodes), len(layout.nodes[0]))
    except ValueError:  # uneven nodes: the same keys on every rank, so the same answer
        shape = None
    _SHAPES[session.prefix] = shape  # uneven nodes too: one gather per world, never one per call
    return shape


def check_hier_options(options: Mapping[str, Any], world_size: int) -> None:
    """ValueError for a ``hier_ranks_per_node`` that is no count or cuts the world unevenly, or an
    inner algorithm that is unknown or ``hier`` itself."""
    g = options["hier_ranks_per_node"]
    if isinstance(g, bool) or not isinstance(g, int) or g < 0:
        raise ValueError(f"hier_ranks_per_node={g!r}: expected an integer >= 0 (0: find the nodes)")
    if g > 0 and world_size % g:
        raise ValueError(
            f"hier_ranks_per_node={g} cuts the {world_size} ranks into nodes of different sizes; "
            f"algo='hier' needs a divisor of {world_size}"
        )
    inner = options["hier_inner"]
    if inner not in ALGOS or inner == "hier":
        names = ", ".join(a for a in ALGOS if a != "hier")
        raise ValueError(f"hier_inner={inner!r}: expected one of {names}")


def _wire_dtype(transport: Transport) -> torch.dtype | None:
    """The wire dtype the call's transport carries (``wire_dtype=``), looking through a tracer's
    wrapper: hier's own transports must carry it too, or the option would be dropped silently."""
    seen: Any = transport
    while seen is not None:
        if isinstance(seen, WireTransport):
            return seen.dtype
        seen = getattr(seen, "inner", None)
    return None


def hier_all_reduce(
    flat: torch.Tensor,
    op: str,
    transport: Transport,
    deadline: float,
    scratch: ScratchPool,
    *,
    hier_ranks_per_node: int = 0,
    hier_inner: str = "auto",
) -> None:
    """All-reduce ``flat`` in place: reduce-scatter in the node, all-reduce across, all-gather in the node.

    Args:
        flat: contiguous 1-D tensor, this rank's contribution; holds the result after.
        op: ``"sum"``, ``"avg"``, ``"max"`` or ``"min"``.
        transport: the call's transport (its session's); phase 2 runs on one of the same kind.
        deadline: ``time.monotonic()`` value by which the whole collective must finish.
        scratch: handed to the inner algorithm.
        hier_ranks_per_node: G > 0: consecutive blocks of G ranks are a node; 0: find the nodes.
        hier_inner: the all-reduce across nodes (any of ``ALGOS`` but ``hier``).
    """
    parent, kind_name = sessions.owner_of(transport)
    layout = session_layout(parent, hier_ranks_per_node, deadline)
    node, cross = layout.node_of(parent.rank), layout.cross_of(parent.rank)
    g, n, world = len(node), len(cross), parent.world_size
    device = flat.device.type
    level_op = "sum" if op == "avg" else op  # avg: sum through both levels, divide once by N below
    wire_dtype = _wire_dtype(transport)

    def carried(sub: Transport, members: tuple[int, ...], level: str) -> Transport:
        """``sub`` as phase 1 to 3 talk over it: carrying the call's wire dtype on both levels (stats
        stay sub's), and recorded where the call is traced (``ringcomm.demo``: the tracer wraps only
        the call's transport, so it is asked to wrap this one too, its peers named by world rank)."""
        wrapped = sub if wire_dtype is None else WireTransport(sub, wire_dtype)
        nested = getattr(transport, "nested", None)  # trace.TracedTransport's
        return wrapped if nested is None else nested(wrapped, members, level)

    used = []
    moved: list[tuple[Transport, int, int]] = []  # (sub-transport, its sent and received bytes before)
    try:
        chunks = [flat[start : start + size] for start, size in chunk_bounds(flat.numel(), g)]
        local = node.index(parent.rank)
        mine = chunks[(local + 1) % g]  # what this rank owns after phase 1 (ring.py's scatter-reduce)
        if g > 1:
            node_session = sessions.member_session(parent, node, "hier-node")
            used.append(node_session)
            node_session.begin_call()
            shm = node_session.transport(transport_kind("shm"), device, deadline)
            moved.append((shm, shm.stats.sent_bytes, shm.stats.recv_bytes))
            in_node = carried(shm, node, "node")
            # 1. reduce-scatter inside the node: local rank l ends owning chunk (l + 1)
            scatter_reduce(chunks, level_op, in_node, deadline)
        if n > 1:
            cross_session = sessions.member_session(parent, cross, "hier-cross")
            used.append(cross_session)
            cross_session.begin_call()
            wire = cross_session.transport(transport_kind(kind_name), device, deadline)
            moved.append((wire, wire.stats.sent_bytes, wire.stats.recv_bytes))
            inner = hier_inner
            if inner == "auto":  # the same pick on every member: the cross session's fit, the same size
                inner = cross_session.auto_pick(kind_name, mine.numel() * mine.element_size(), deadline, device)
            spec = ALGOS[inner]
            # 2. all-reduce the owned chunk across the nodes, among the ranks of this local rank
            spec.run(mine, level_op, carried(wire, cross, "cross"), deadline, scratch, **spec.options({}, n))
        if op == "avg":
            finalize(mine, "avg", world)  # on the owner only: the copies below stay bitwise equal
        if g > 1:
            # 3. all-gather inside the node: chunk (l + 1) from local rank l to everyone
            all_gather(chunks, in_node, deadline)
    except BaseException as exc:
        # The node's and the cross group's sessions are out of step now, like the call's (api._fail):
        # their later calls refuse, and their peers waiting on this rank learn it at once.
        for session in used:
            session.failed = session.failed or (
                exc if isinstance(exc, CommError) else CommError(f"rank {parent.rank}: algo='hier' failed: {exc}")
            )
            if session.liveness is not None:
                session.liveness.give_up(session.liveness.call)
        raise
    finally:
        # The api accounts a call by its transport's byte counters (comm_stats): hier's bytes moved on
        # the node's and the cross group's transports, so they are added there (bytes only: the
        # message counts and peers stay the call transport's own).
        for sub, sent0, recv0 in moved:
            transport.stats.sent_bytes += sub.stats.sent_bytes - sent0
            transport.stats.recv_bytes += sub.stats.recv_bytes - recv0
