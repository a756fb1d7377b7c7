"""The message tags of every algorithm, in one registry.

A tag keeps two streams of messages between the same pair of ranks apart on
transports that match by (peer, tag): Gloo, ZeroMQ, shared memory. Each kind
of message has its own tag, so no two algorithms reuse a number with different
meanings, and a trace shows which kind a message was.

NCCL ignores tags and matches a pair's messages purely in the order they were
issued. So no algorithm may *depend* on tags for correctness: every rank issues
its messages to a peer in the same order as that peer issues the receives.
Tags are a second line of defence, never the first.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Tag"]


class Tag(IntEnum):
    """One tag per kind of message (values are what goes on the wire)."""

    RING = 1  # ring.py: both phases (a step's messages are waited before the next step's)
    SCATTER_REDUCE = 2  # ring_pipelined.py, phase 1 (several segments in flight)
    ALL_GATHER = 3  # ring_pipelined.py, phase 2
    PS_PUSH = 4  # param_server.py: worker -> server
    PS_PULL = 5  # param_server.py: server -> worker
    NAIVE = 6  # naive.py: to the root and back
    RHD_HALVING = 7  # rhd.py, phase 1: half a block to the partner, reduced there
    RHD_DOUBLING = 8  # rhd.py, phase 2: a fully reduced block to the partner, copied there
    RD = 9  # rd.py: the whole vector to the partner, both reduce
    FOLD = 10  # fold.py (rhd and rd, P not a power of two): an extra rank's vector in, the result out
    CHAIN = 11  # chain.py: broadcast, a segment to the next rank down the chain
    TREE = 12  # tree.py: broadcast, the whole tensor to a child in the binomial tree
