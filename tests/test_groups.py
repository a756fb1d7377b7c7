"""``group=``: collectives in subgroups made with ``dist.new_group``, side by side on every transport.

One world of 4 ranks covers it all (spawning worlds is what costs here): the pairs {0, 1} and
{2, 3} each run all_reduce, all_gather, broadcast (``src`` a global rank, as torch's),
reduce_scatter and an async all_reduce on torch, zmq and shm at the same time, each checked
against its own pair's reference; then the refusals (a rank outside the group, a ``src`` outside
it), and the default group in the same processes, before, between and after.
"""

from __future__ import annotations

import torch

from ringcomm.tools.spawn import run_world

TRANSPORTS = ("torch", "zmq", "shm")


def _groups_rank(rank: int, p: int) -> list[str]:
    """What went wrong on this rank (empty: nothing)."""
    import torch.distributed as dist

    import ringcomm

    failures: list[str] = []

    def expect(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        if not torch.equal(got, want):
            failures.append(f"rank {rank}: {what}: got {got.tolist()}, expected {want.tolist()}")

    # torch's rule: every rank makes every group, in the same order; a non-member gets NON_GROUP_MEMBER
    low, high = dist.new_group([0, 1]), dist.new_group([2, 3])
    mine, elsewhere = (low, high) if rank < 2 else (high, low)
    members = dist.get_process_group_ranks(mine)
    me = members.index(rank)

    whole = torch.full((3,), float(rank + 1))
    ringcomm.all_reduce(whole)  # the default group first: its session exists before the subgroups'
    expect("default all_reduce before", whole, torch.full((3,), float(sum(range(1, p + 1)))))

    for transport in TRANSPORTS:
        x = torch.arange(6, dtype=torch.float64) * (rank + 1)
        ringcomm.all_reduce(x, transport=transport, group=mine)
        expect(f"{transport} all_reduce", x, torch.arange(6, dtype=torch.float64) * sum(m + 1 for m in members))

        gathered = torch.empty(2 * 3)
        ringcomm.all_gather(gathered, torch.full((3,), float(rank)), transport=transport, group=mine)
        expect(f"{transport} all_gather", gathered, torch.tensor([float(m) for m in members]).repeat_interleave(3))

        root = members[1]  # a global rank: 1 in one pair, 3 in the other
        b = torch.full((5,), float(rank) * 10)
        ringcomm.broadcast(b, src=root, transport=transport, group=mine)
        expect(f"{transport} broadcast src={root}", b, torch.full((5,), float(root) * 10))

        scattered = torch.empty(2, dtype=torch.int64)
        ringcomm.reduce_scatter(scattered, torch.arange(4) + 100 * rank, transport=transport, group=mine)
        expect(
            f"{transport} reduce_scatter",
            scattered,
            sum(torch.arange(4) + 100 * m for m in members)[2 * me : 2 * me + 2],
        )

        pending = ringcomm.all_reduce_async(torch.full((4,), float(rank)), op="max", transport=transport, group=mine)
        expect(f"{transport} all_reduce_async max", pending.wait(), torch.full((4,), float(max(members))))

        between = torch.ones(2)  # the default group, between subgroup calls, on the same transport
        ringcomm.all_reduce(between, transport=transport)
        expect(f"{transport} default all_reduce between", between, torch.full((2,), float(p)))

    # A rank outside a group is refused in one line, and nothing of it reaches any group's count.
    try:
        ringcomm.all_reduce(torch.ones(3), group=elsewhere)
        failures.append(f"rank {rank}: all_reduce with a group it is not in was accepted")
    except ValueError as exc:
        if "NON_GROUP_MEMBER" not in str(exc) or "\n" in str(exc):
            failures.append(f"rank {rank}: the non-member refusal is not one line naming it: {exc!r}")

    # src outside the group: refused on both members (it is the same call on both).
    outsider = [r for r in range(p) if r not in members][0]
    b = torch.zeros(2)
    try:
        ringcomm.broadcast(b, src=outsider, transport="zmq", group=mine)
        failures.append(f"rank {rank}: broadcast src={outsider} outside {members} was accepted")
    except ValueError as exc:
        if f"src={outsider}" not in str(exc) or str(members) not in str(exc):
            failures.append(f"rank {rank}: the src refusal does not name src and the group: {exc!r}")
    except ringcomm.MismatchError:
        pass  # the peer's refusal, heard first, is as good: it names this call too

    # The subgroups are still in step after the refusals ...
    y = torch.full((2,), float(rank))
    ringcomm.all_reduce(y, transport="shm", group=mine)
    expect("shm all_reduce after the refusals", y, torch.full((2,), float(sum(members))))
    # ... and so is the default group, on every transport.
    for transport in TRANSPORTS:
        z = torch.full((4,), float(rank))
        ringcomm.all_reduce(z, transport=transport)
        expect(f"{transport} default all_reduce after", z, torch.full((4,), float(sum(range(p)))))
    ringcomm.shutdown()
    return failures


def test_two_subgroups_side_by_side_on_every_transport() -> None:
    failures = run_world(_groups_rank, 4, timeout=280)
    assert not [f for r in failures for f in r]
