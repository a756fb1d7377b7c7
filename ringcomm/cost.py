r"""The alpha-beta cost model of ringcomm's all-reduce algorithms: the one place its formulas live.

A message of n bytes between two ranks costs ``alpha + n * beta`` seconds:
alpha is the per-message latency (seconds), beta the inverse bandwidth
(seconds per byte). An all-reduce of M bytes over P ranks puts some messages
and some bytes on its critical path, the longest chain of transfers that must
happen one after another, and takes::

    T = messages * alpha + bytes * beta

``COSTS`` holds one ``AlgoCost`` per algorithm: its two counts as functions and
as the formulas written out. Everything else reads them from there: the time
functions below, ``analysis.fit`` (which fits alpha and beta to measurements
with these counts), the report, and the README, whose cost table is
``markdown_table()``'s output (a test holds it to that). To model a new
algorithm, add one entry to ``COSTS``. The two-level all-reduce (``hier``) is the one
row whose counts take nodes and ranks per node instead of P: ``HIER``, a ``TwoLevelCost``
kept beside ``COSTS`` (its diagram and formula are there), with ``flat_ring_link_bytes``
for the flat ring it is weighed against.

Links are full duplex: a rank that sends and receives at once pays for the
larger direction only, while a rank that must receive before it can send (the
naive root, a parameter server) pays for both. Reduction arithmetic is left
out: on the machines we measure, the wire and memory copies dominate, and the
fitted alpha and beta absorb what is left.

**The parameter server** (``param_server.py``), M bytes over P ranks, k shards
(1 <= k <= P). Its two rounds are not two messages: every message a server
receives or sends is one more alpha on its own critical path, and a server takes
one shard's push from each of its P-1 peers, one after another (an incast:
P-1 senders, one receiver), then sends the result back to each in turn::

    central server (k = 1), the owner:
        steps            P-1 receives (push), then P-1 sends (pull): 2(P-1)
        bytes per rank   the owner (P-1)·M in, then (P-1)·M out; a worker M out, then M in
        time             2(P-1)·α + 2(P-1)·M·β
    sharded server (k shards), each shard's owner:
        steps            P-1 receives of its shard (its k-1 pushes to the other owners
                         go out meanwhile), then P-1 sends: 2(P-1)
        bytes per rank   an owner (P-1)/k·M in, then out; a rank that owns nothing
                         (k < P) M out, then M in; at k = P every rank 2(P-1)/P·M, the ring's
        time             2(P-1)·α + 2·max((P-1)/k, w)·M·β,  w = 1 if k < P, (P-1)/P if k = P

So sharding spreads the server's bytes over k links but not its messages: every
owner still hears from all P-1 peers. The alpha term grows with P like the
ring's and naive's; a 4 KiB gradient over 64 ranks is not "two messages". The
overlapped form (``ps_overlap=True``) cuts each shard into S segments and runs
S+1 rounds of P-1 messages each way, (S+1)(P-1) messages; its row counts S = 1.

**A sharded optimizer** (ZeRO-1/2, ``trainer/zero.py``), M bytes of gradients and
as many of parameters over P ranks. Each step is a reduce-scatter of the
gradient (rank r receives block r of the mean) and, after each rank stepped its
block, an all-gather of the parameters: the two phases of the ring all-reduce,
run apart, with the optimizer between them::

    ZeRO (ringcomm):           reduce-scatter (P-1)/P·M  +  all-gather (P-1)/P·M  =  2(P-1)/P·M per rank
    ring all-reduce (DDP):     the same two phases back to back                    =  2(P-1)/P·M per rank
    ZeroRedundancyOptimizer:   all-reduce 2(P-1)/P·M  +  a broadcast of each block
    style (torch)              from its owner, (P-1)/P·M more (pipelined chain)    ≈  3(P-1)/P·M per rank

so ZeRO costs the all-reduce's bytes and 2(P-1) messages, and only the
optimizer state (and with stage 2 the gradient between steps) shrinks to 1/P;
torch's form puts about 1.5× the bytes on the wire. What differs from DDP is
overlap, not volume: in this design the two phases run after backward, not
inside it (``trainer/zero.py`` says what overlaps).

``busbw`` follows nccl-tests: for all-reduce, busbw = algbw * 2(P-1)/P, where
algbw = M / time, so that busbw is comparable across P and with the link speed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .algorithms.chunks import CHAIN_SEGMENT_BYTES, core_size

__all__ = [
    "AlgoCost",
    "COSTS",
    "COLLECTIVE_COSTS",
    "CollectiveCost",
    "HIER",
    "Level",
    "PLACEMENTS",
    "TwoLevelCost",
    "flat_ring_link_bytes",
    "markdown_table",
    "algbw",
    "busbw",
    "busbw_factor",
    "fit_alpha_beta",
    "fit_nonnegative",
    "powersgd_elements",
    "topk_bytes_sent",
    "wire_bytes",
]


@dataclass(frozen=True)
class AlgoCost:
    """One algorithm's row of the cost table: its critical path as numbers and as formulas.

    Attributes:
        name: the ringcomm algorithm name (``ring``, ``naive``, ``ps``, ``rhd``, ``rd``).
        title: the row's name in the table.
        messages: ``(P, k) -> `` messages on the critical path, each paying alpha once.
        nbytes: ``(P, M, k) ->`` bytes on the critical path (M in bytes), each paying beta once.
        messages_text: ``messages`` written out, in P and k.
        bytes_text: ``nbytes`` written out, in P, M and k.
        busiest: which link is busiest and what it carries, in words.
        sharded: whether the algorithm takes k, a number of shards with 1 <= k <= P;
            the others take k = 1 only.
    """

    name: str
    title: str
    messages: Callable[[int, int], float]
    nbytes: Callable[[int, float, int], float]
    messages_text: str
    bytes_text: str
    busiest: str
    sharded: bool = False

    def critical_path(self, p: int, nbytes: float, shards: int = 1) -> tuple[float, float]:
        """``(messages, bytes)`` on the critical path of one all-reduce of ``nbytes`` over ``p`` ranks.

        Raises:
            ValueError: ``shards`` other than 1 for an algorithm without shards, or outside 1..P.
        """
        if not self.sharded and shards != 1:
            raise ValueError(f"{self.name} has no shards; got shards={shards!r}")
        if not 1 <= shards <= max(p, 1):
            raise ValueError(f"shards={shards!r} is out of range for P={p}; expected 1 <= shards <= {p}")
        if p <= 1:
            return 0.0, 0.0  # one rank: nothing travels
        return float(self.messages(p, shards)), float(self.nbytes(p, nbytes, shards))

    def time(self, p: int, nbytes: float, alpha: float, beta: float, shards: int = 1) -> float:
        """Predicted seconds: ``messages * alpha + bytes * beta`` (alpha in s, beta in s/byte)."""
        messages, path_bytes = self.critical_path(p, nbytes, shards)
        return messages * alpha + path_bytes * beta

    @property
    def time_text(self) -> str:
        """The time formula, written out from the two counts (a sum of messages in parentheses before ·α)."""
        messages = f"({self.messages_text})" if " + " in self.messages_text else self.messages_text
        return f"{messages}·α + {self.bytes_text}·β"


def _ps_messages(p: int, k: int) -> float:
    # Every shard's owner receives its shard from each of its P-1 peers, one after another, then sends
    # the result back to each: 2(P-1) whatever k. Its k-1 pushes to (and pulls from) the other owners
    # overlap those on a full-duplex link, and a rank that owns nothing sends and receives k <= P-1.
    return 2 * (p - 1)


def _ps_bytes(p: int, m: float, k: int) -> float:
    # Push then pull, each round's messages all in flight at once. A server of one of the k shards
    # takes (P-1)/k * M in while pushing; then sends as much back. A rank serving nothing (there is
    # one when k < P) pushes and pulls all of M; at k = P every rank moves the ring's (P-1)/P * M.
    worker = 1.0 if k < p else (p - 1) / p
    return 2 * max((p - 1) / k, worker) * m


def _folded(p: int) -> tuple[int, int]:
    # (log2 P', f): P' the power-of-two core (fold.py), f = 1 when P' < P, i.e. when extra ranks fold
    # into partners, whose chain grows by a message in and a message out of M each.
    core = core_size(p)
    return core.bit_length() - 1, int(core < p)


def _rhd_messages(p: int, k: int) -> float:
    log_core, f = _folded(p)
    return 2 * log_core + 2 * f


def _rhd_bytes(p: int, m: float, k: int) -> float:
    log_core, f = _folded(p)
    core = 1 << log_core
    return 2 * (core - 1) / core * m + 2 * f * m


def _rd_messages(p: int, k: int) -> float:
    log_core, f = _folded(p)
    return log_core + 2 * f


def _rd_bytes(p: int, m: float, k: int) -> float:
    return _rd_messages(p, k) * m  # every message is the whole tensor


#: One entry per algorithm, in the order the table shows them.
COSTS: dict[str, AlgoCost] = {
    c.name: c
    for c in (
        AlgoCost(
            name="ring",
            title="ring",
            messages=lambda p, k: 2 * (p - 1),
            nbytes=lambda p, m, k: 2 * (p - 1) / p * m,
            messages_text="2(P−1)",
            bytes_text="2(P−1)/P·M",
            busiest="every link alike: each rank sends and receives 2(P−1)/P·M at once",
        ),
        AlgoCost(
            name="naive",
            title="naive",
            messages=lambda p, k: 2 * (p - 1),
            nbytes=lambda p, m, k: 2 * (p - 1) * m,
            messages_text="2(P−1)",
            bytes_text="2(P−1)·M",
            busiest="rank 0's: (P−1)·M in (gather), then (P−1)·M out (broadcast)",
        ),
        AlgoCost(
            name="ps",
            title="parameter server, k shards",
            messages=_ps_messages,
            nbytes=_ps_bytes,
            messages_text="2(P−1)",
            bytes_text="2·max((P−1)/k, w)·M",
            busiest="each server's: P−1 pushes of (P−1)/k·M in all, received one after another, then as many "
            "pulls out; "
            "w = 1 if k < P (a rank that serves nothing moves all of M), (P−1)/P if k = P",
            sharded=True,
        ),
        AlgoCost(
            name="ps_overlap",
            title="parameter server, k shards, overlapped",
            messages=_ps_messages,
            nbytes=lambda p, m, k: (p + k - 2) / k * m,
            messages_text="2(P−1)",
            bytes_text="(P+k−2)/k·M",
            busiest="each server's, in both directions at once: it pulls segment s back while segment s+1 "
            "is pushed (ps_overlap=True), so the (P−1)/k·M of its shard in and out overlap, beside its "
            "own (k−1)/k·M to and from the other servers: (P−1)·M at k = 1 (half of ps), the ring's "
            "2(P−1)/P·M at k = P",
            sharded=True,
        ),
        AlgoCost(
            name="rhd",
            title="recursive halving + doubling",
            messages=_rhd_messages,
            nbytes=_rhd_bytes,
            messages_text="2·log₂P′ + 2f",
            bytes_text="(2(P′−1)/P′ + 2f)·M",
            busiest="P′ = the largest power of two ≤ P, f = 1 if P′ < P else 0; a fold partner's: "
            "M in from its extra rank, (P′−1)/P′·M each way while halving and again while doubling, "
            "M back out",
        ),
        AlgoCost(
            name="rd",
            title="recursive doubling",
            messages=_rd_messages,
            nbytes=_rd_bytes,
            messages_text="log₂P′ + 2f",
            bytes_text="(log₂P′ + 2f)·M",
            busiest="P′ and f as for rhd; every core rank's: M each way per step; "
            "a fold partner's adds M in before and M out after",
        ),
    )
}


@dataclass(frozen=True)
class CollectiveCost:
    """One row of the other collectives' cost table (``collectives.py``): critical path and time.

    M is the whole tensor in bytes: reduce_scatter's input, all_gather's output, broadcast's tensor.

    Attributes:
        collective, algo: the call (``ringcomm.<collective>(..., algo=algo)``).
        messages: ``(P, M) ->`` messages on the critical path, each paying alpha once.
        nbytes: ``(P, M) ->`` bytes on the critical path, each paying beta once.
        messages_text, bytes_text: the two written out (S = the chain's segments).
        fit: the all_reduce algorithm whose fitted alpha (per message) and beta (per byte) this one
            borrows: no collective has a fit of its own yet, and the messages are alike (the ring's
            phases are the ring's messages; rhd's halving and doubling, rhd's; the tree's whole
            tensor per round, rd's).
        power_of_two: whether the algorithm needs P a power of two.
    """

    collective: str
    algo: str
    messages: Callable[[int, float], float]
    nbytes: Callable[[int, float], float]
    messages_text: str
    bytes_text: str
    fit: str
    power_of_two: bool = False

    def time(self, p: int, nbytes: float, alpha: float, beta: float) -> float:
        """Predicted seconds: ``messages * alpha + bytes * beta`` (0 for one rank)."""
        if p <= 1:
            return 0.0
        return self.messages(p, nbytes) * alpha + self.nbytes(p, nbytes) * beta


def _log2_ceil(p: int) -> int:
    return (p - 1).bit_length()


def _chain_segments(m: float) -> int:
    # chain.py's default segment (the pick weighs the defaults); whole bytes, at least one segment
    return max(1, -(-int(m) // CHAIN_SEGMENT_BYTES))


#: (collective, algo) -> its row, in the order the table shows them.
COLLECTIVE_COSTS: dict[tuple[str, str], CollectiveCost] = {
    (c.collective, c.algo): c
    for c in (
        CollectiveCost(
            "reduce_scatter", "ring", lambda p, m: p - 1, lambda p, m: (p - 1) / p * m,
            "P−1", "(P−1)/P·M", "ring",
        ),
        CollectiveCost(
            "reduce_scatter", "rhd", lambda p, m: _log2_ceil(p), lambda p, m: (p - 1) / p * m,
            "log₂P", "(P−1)/P·M", "rhd", power_of_two=True,
        ),
        CollectiveCost(
            "all_gather", "ring", lambda p, m: p - 1, lambda p, m: (p - 1) / p * m,
            "P−1", "(P−1)/P·M", "ring",
        ),
        CollectiveCost(
            "all_gather", "rd", lambda p, m: _log2_ceil(p), lambda p, m: (p - 1) / p * m,
            "log₂P", "(P−1)/P·M", "rhd", power_of_two=True,
        ),
        CollectiveCost(
            "broadcast", "ring", lambda p, m: p + _chain_segments(m) - 2,
            lambda p, m: (p + _chain_segments(m) - 2) * m / _chain_segments(m),
            "P+S−2", "(P+S−2)/S·M", "ring",
        ),
        CollectiveCost(
            "broadcast", "tree", lambda p, m: _log2_ceil(p), lambda p, m: _log2_ceil(p) * m,
            "⌈log₂P⌉", "⌈log₂P⌉·M", "rd",
        ),
    )
}


# --------------------------------------------------------------------------- two levels: nodes of ranks


@dataclass(frozen=True)
class Level:
    """One phase of a two-level all-reduce: where it runs and what it puts on its critical path.

    Attributes:
        phase: ``"reduce-scatter"``, ``"all-reduce"`` or ``"all-gather"``.
        link: ``"node"`` (inside a node: shared memory) or ``"network"`` (the node's one link out).
        messages: messages on the phase's critical path, each paying that link's alpha once.
        nbytes: bytes the phase puts through the busiest such link, each paying its beta once.
    """

    phase: str
    link: str
    messages: float
    nbytes: float


@dataclass(frozen=True)
class TwoLevelCost:
    r"""The ``hier`` row: a two-level all-reduce of M bytes over N = n·g ranks, n nodes of g ranks.

    A node's g ranks share memory and **one** network link (full duplex, beta_net seconds per
    byte each way); phase 2 runs g cross groups at once, one per local rank, all through that link::

            node 0 (shm)                 node 1 (shm)
        +------------------+         +------------------+
        | r0 -- r1         |         | r2 -- r3         |    1. reduce-scatter in the node: g-1 steps of M/g
        +-+-----+----------+         +-+-----+----------+    2. all-reduce each 1/g shard across the n nodes,
          |     +---- local 1 ----------|-----+                 g groups at once on the node's one link
          +---------- local 0 ----------+                     3. all-gather in the node: g-1 steps of M/g
               (each node's one link)

        level      phase             messages     bytes through the busiest link
        node       reduce-scatter    g-1          (g-1)/g·M          (shm: α_node, β_node)
        network    all-reduce        2(n-1)       g · 2(n-1)/n · M/g = 2(n-1)/n·M   (α_net, β_net; a ring)
        node       all-gather        g-1          (g-1)/g·M          (shm)

        T_hier = 2(g-1)·α_node + 2(g-1)/g·M·β_node + 2(n-1)·α_net + 2(n-1)/n·M·β_net

    The network phase's bytes are the g cross groups' together, since they share the link:
    a ring of n ranks on M/g bytes each, g of them, is a ring of n on M as far as the link
    goes (bytes are linear in M), so ``network_time`` is the inner algorithm's own row at
    (n, M). Beside it, a **flat** ring of N ranks on the same nodes (``flat_ring_link_bytes``):

    - contiguous placement (node k holds ranks k·g .. k·g+g-1): one hop of the ring leaves
      each node, so each link carries 2(N-1)/N·M, with 2(N-1) messages;
    - interleaved placement (rank r on node r mod n): every hop leaves its node, and the g
      ranks of a node send at once through its link: g · 2(N-1)/N·M.

    At 2 × 2 the link carries M (hier), 1.5·M (contiguous ring) and 3·M (interleaved ring):
    on a link-bound network hier is 1.5× and 3× faster. Reduction and shm copies are left to
    the fitted alpha and beta of each level, as in ``COSTS``.
    """

    name: str = "hier"
    title: str = "two-level (hier), n nodes × g ranks"
    messages_text: str = "2(g−1) on shm + 2(n−1) on the network"
    bytes_text: str = "2(g−1)/g·M on shm + 2(n−1)/n·M on the node's link"

    @staticmethod
    def _check(nodes: int, per_node: int) -> None:
        for label, value in (("nodes", nodes), ("ranks per node", per_node)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"hier cost: {label} must be an integer >= 1, got {value!r}")

    def levels(self, nodes: int, per_node: int, nbytes: float) -> list[Level]:
        """The three phases' critical paths, for ``nodes`` (n) nodes of ``per_node`` (g) ranks and
        ``nbytes`` (M) bytes, with a ring in phase 2; a phase with nothing to do is left out."""
        self._check(nodes, per_node)
        n, g, m = nodes, per_node, float(nbytes)
        out = []
        if g > 1:
            out.append(Level("reduce-scatter", "node", g - 1, (g - 1) / g * m))
        if n > 1:
            out.append(Level("all-reduce", "network", 2 * (n - 1), 2 * (n - 1) / n * m))
        if g > 1:
            out.append(Level("all-gather", "node", g - 1, (g - 1) / g * m))
        return out

    def node_time(self, per_node: int, nbytes: float, alpha: float, beta: float) -> float:
        """Seconds of phases 1 and 3 together: 2(g-1)·alpha + 2(g-1)/g·M·beta (the node's link)."""
        self._check(1, per_node)
        return COSTS["ring"].time(per_node, nbytes, alpha, beta)  # the ring's two phases, run apart

    def network_time(
        self, nodes: int, nbytes: float, alpha: float, beta: float, inner: str = "ring", shards: int = 1
    ) -> float:
        """Seconds of phase 2 on the node's link: the ``inner`` row of ``COSTS`` at (n, M), since the g
        cross groups of M/g bytes each share that link (see the class docstring)."""
        self._check(nodes, 1)
        return COSTS[inner].time(nodes, nbytes, alpha, beta, shards)

    def time(
        self,
        nodes: int,
        per_node: int,
        nbytes: float,
        node_fit: tuple[float, float],
        net_fit: tuple[float, float],
        inner: str = "ring",
    ) -> float:
        """Predicted seconds: ``node_time`` with ``node_fit`` = (alpha s, beta s/B) of shared memory
        plus ``network_time`` with ``net_fit`` of the node's link."""
        return self.node_time(per_node, nbytes, *node_fit) + self.network_time(nodes, nbytes, *net_fit, inner=inner)

    @property
    def time_text(self) -> str:
        return "2(g−1)·α_node + 2(g−1)/g·M·β_node + 2(n−1)·α_net + 2(n−1)/n·M·β_net"

    def markdown_row(self) -> str:
        """This row in ``markdown_table()``'s columns (kept apart from it: its counts take n and g, not P)."""
        busiest = "each node's one link: 2(n−1)/n·M each way, its g ranks' shards together"
        return f"| {self.title} | {self.messages_text} | {self.bytes_text} | {self.time_text} | {busiest} |"


#: The two-level all-reduce's row (``algorithms/hier.py``).
HIER = TwoLevelCost()

#: How global ranks map to nodes in ``flat_ring_link_bytes`` (as ``analysis.cluster --placement``).
PLACEMENTS = ("contiguous", "interleaved")


def flat_ring_link_bytes(nodes: int, per_node: int, nbytes: float, placement: str = "contiguous") -> float:
    """Bytes one node's link carries each way in a flat ring of N = n·g ranks over M = ``nbytes``.

    ``contiguous``: one ring hop leaves each node, 2(N-1)/N·M; ``interleaved`` (rank r on node
    r mod n): all g of the node's ranks send every step through its link, g · 2(N-1)/N·M.
    One node: 0 (nothing leaves it).
    """
    TwoLevelCost._check(nodes, per_node)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: expected one of {', '.join(PLACEMENTS)}")
    n, g = nodes, per_node
    if n == 1:
        return 0.0
    world = n * g
    ring = 2 * (world - 1) / world * float(nbytes)
    return ring if placement == "contiguous" or g == 1 else g * ring


def markdown_table() -> str:
    """``COSTS`` as a Markdown table (no trailing newline): the README's and the report's cost table."""
    rows = [
        "| algorithm | messages on the critical path | bytes on the critical path | time | busiest link |",
        "|---|---|---|---|---|",
    ]
    rows += [
        f"| {c.title} | {c.messages_text} | {c.bytes_text} | {c.time_text} | {c.busiest} |"
        for c in COSTS.values()
    ]
    return "\n".join(rows)


def algbw(nbytes: float, seconds: float) -> float:
    """Algorithm bandwidth in GB/s (1e9 bytes per second): tensor bytes over time."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def busbw_factor(p: int, collective: str = "all_reduce") -> float:
    """busbw / algbw for ``collective`` over ``p`` ranks, as nccl-tests defines it (0 for one rank).

    What the busiest link carries per byte of M (the whole tensor): all_reduce 2(P-1)/P;
    all_gather and reduce_scatter (P-1)/P (M their output, resp. input: P blocks, a rank
    moves all but its own); broadcast 1 (every byte crosses each link of the chain once).
    """
    factors = {"all_reduce": 2 * (p - 1) / p, "all_gather": (p - 1) / p, "reduce_scatter": (p - 1) / p, "broadcast": 1.0}
    if collective not in factors:
        raise ValueError(f"busbw of {collective!r}: expected one of {', '.join(factors)}")
    return factors[collective] if p > 1 else 0.0


def busbw(p: int, nbytes: float, seconds: float, collective: str = "all_reduce") -> float:
    """Bus bandwidth in GB/s as nccl-tests defines it: algbw * ``busbw_factor(p, collective)``.

    ``nbytes`` is M, the whole tensor: all_reduce's and broadcast's tensor, all_gather's output,
    reduce_scatter's input (P times the bytes per rank of the last two), as nccl-tests' algbw.
    """
    return algbw(nbytes, seconds) * busbw_factor(p, collective)


def fit_alpha_beta(
    messages: Sequence[float], nbytes: Sequence[float], seconds: Sequence[float]
) -> tuple[float, float]:
    """Least-squares fit of ``seconds ~= messages * alpha + nbytes * beta``.

    Args:
        messages: messages on the critical path of each measurement (2(P-1) for ring).
        nbytes: bytes on the critical path (2(P-1)/P * M for ring).
        seconds: measured times.

    Returns:
        ``(alpha, beta)`` in seconds and seconds per byte. Weighted by 1/seconds
        so small and large messages count alike (relative error is minimised).
    """
    import numpy as np

    t = np.asarray(seconds, dtype=float)
    a = np.stack([np.asarray(messages, float), np.asarray(nbytes, float)], axis=1) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    return float(alpha), float(beta)


def fit_nonnegative(
    messages: Sequence[float], nbytes: Sequence[float], seconds: Sequence[float]
) -> tuple[float, float, bool]:
    """``fit_alpha_beta``, with neither coefficient below 0: ``(alpha, beta, constrained)``.

    If the free fit gives a negative coefficient (noise at a few points), it is
    pinned at 0 and the other refitted alone, whichever of the two fits better:
    the non-negative least-squares answer for two unknowns. ``constrained`` says so.
    """
    import numpy as np

    m, b, t = (np.asarray(v, dtype=float) for v in (messages, nbytes, seconds))
    alpha, beta = fit_alpha_beta(m, b, t)
    if alpha >= 0 and beta >= 0:
        return alpha, beta, False

    def one(x: np.ndarray) -> float:  # relative least squares for t ~= c * x
        r = x / t
        denom = float(r @ r)
        return max(0.0, float(r.sum() / denom)) if denom > 0 else 0.0

    def loss(ab: tuple[float, float]) -> float:
        return float((((m * ab[0] + b * ab[1]) / t - 1) ** 2).sum())

    alpha, beta = min((one(m), 0.0), (0.0, one(b)), key=loss)
    return alpha, beta, True


# --- compression (ringcomm/compress/, issue 24): the bytes each compressor puts on the wire ---
#
# M is the gradient's bytes (float32: 4 bytes per element), e its element size. An uncompressed
# ring all-reduce sends 2(P−1)/P·M per rank; a compressor shrinks what is all-reduced (linear ones)
# or what is all-gathered (top-k). These give the payload; multiply by the collective's factor
# (ring all-reduce 2(P−1)/P, ring all-gather P−1 per rank's block) for the bytes a rank sends.


def wire_bytes(nbytes: float, elem: int, wire_elem: int) -> float:
    """Bytes of an M-byte tensor of ``elem``-byte elements carried as ``wire_elem``-byte ones: M·w/e.

    bf16/fp16 on the wire (``compress/wire.py``) of a float32 gradient: ``M·2/4``, half, whatever
    the algorithm (every message is cast, none added).
    """
    return nbytes * wire_elem / elem


def powersgd_elements(shapes: Sequence[tuple[int, int]], rank: int) -> int:
    """Elements PowerSGD all-reduces for matrices of ``shapes`` (n×m each) at ``rank`` r: Σ (n+m)·r.

    P (n×r) and Q (m×r) are all-reduced one after the other; a matrix with (n+m)·r >= n·m gains
    nothing and goes uncompressed (n·m elements), as ``compress/powersgd.py`` decides.
    """
    return sum(min((n + m) * rank, n * m) for n, m in shapes)


def topk_bytes_sent(numel: int, fraction: float, p: int, value_bytes: int = 4, index_bytes: int = 4) -> float:
    """Bytes one rank sends for top-k of ``numel`` elements at ``fraction`` F over ``p`` ranks (ring all_gather).

    k = ⌈F·N⌉ values and k indices per rank, gathered by everyone: (P−1)·k·(value + index bytes)
    per rank; beside the ring all-reduce's 2(P−1)/P·N·4, the ratio is P·k·(v+i) / (2·N·4).
    """
    k = max(1, math.ceil(fraction * numel))
    return (p - 1) * k * (value_bytes + index_bytes)
