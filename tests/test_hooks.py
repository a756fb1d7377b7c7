"""DDP comm hooks (trainer/hooks.py): same gradients as built-in DDP, on the comm thread, errors that surface.

Each world builds one model twice from the same seed: a built-in DDP (the
reference) and a DDP per algorithm and transport with ``ringcomm_hook``. After
one backward on rank-dependent data the gradients must match the reference;
after a few SGD steps the parameters must stay close. DDP reduces everything as
one bucket on step 0 and then rebuilds its buckets; a small ``bucket_cap_mb``
then gives several per step, so later steps check that the comm thread keeps
their order on every rank, after the rebuild.
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ringcomm
from ringcomm.tools.spawn import run_world
from trainer.hooks import RingcommState, ringcomm_hook

HOOK_ALGOS = list(ringcomm.ALGOS)
# one world runs every transport (spawning a world costs more than the test on a busy 2-core machine)
TRANSPORTS = list(ringcomm.transport_names())
STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    # odd sizes, so buckets do not split evenly into P chunks; 1.2 MB of gradients, more than
    # DDP's 1 MB first bucket, so that bucket_cap_mb=0.25 gives several buckets per step
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 1001),
        nn.ReLU(),
        nn.Linear(1001, 5),
    )


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(4 + rank, 3, 8, 8, generator=g), torch.randint(0, 5, (4 + rank,), generator=g)


def _train(ddp: DDP, rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[ringcomm.CommStats]]:
    """STEPS SGD steps; the gradients of step 0, the final parameters, ringcomm's work per step."""
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    first_grads: list[torch.Tensor] = []
    per_step = []
    for step in range(STEPS):
        x, y = _batch(rank, step)
        opt.zero_grad()
        before = ringcomm.comm_stats()
        nn.functional.cross_entropy(ddp(x), y).backward()
        per_step.append(ringcomm.comm_stats() - before)  # backward returned: every bucket is done
        if step == 0:
            first_grads = [p.grad.clone() for p in ddp.parameters()]
        opt.step()
    return first_grads, [p.detach().clone() for p in ddp.parameters()], per_step


def _parity_worker(rank: int, world_size: int) -> dict[tuple[str, str], list[ringcomm.CommStats]]:
    ref_grads, ref_params, _ = _train(DDP(_model(), bucket_cap_mb=0.25), rank)
    logs = {}
    for transport, algo in itertools.product(TRANSPORTS, HOOK_ALGOS):
        ddp = DDP(_model(), bucket_cap_mb=0.25)
        ddp.register_comm_hook(RingcommState(algo, transport, timeout=60), ringcomm_hook)
        grads, params, per_step = _train(ddp, rank)
        label = f"{algo}/{transport}"
        for i, (got, want) in enumerate(zip(grads, ref_grads)):
            torch.testing.assert_close(
                got, want, msg=lambda m, lb=label, i=i: f"{lb}: grad of param {i}: {m}"
            )
        for i, (got, want) in enumerate(zip(params, ref_params)):
            torch.testing.assert_close(
                got, want, rtol=1e-4, atol=1e-5, msg=lambda m, lb=label, i=i: f"{lb}: param {i}: {m}"
            )
        logs[transport, algo] = per_step
    return logs


@pytest.mark.parametrize("world_size", [2, 3])
def test_hook_gradients_match_builtin_ddp(world_size: int) -> None:
    logs = run_world(_parity_worker, world_size, timeout=240)
    n_params = sum(p.numel() for p in _model().parameters())
    for transport, algo in itertools.product(TRANSPORTS, HOOK_ALGOS):
        records = logs[0][transport, algo]
        assert len(records) == STEPS
        for r in records:
            assert r.seconds > 0, (algo, transport)
        # DDP puts every gradient in one bucket on step 0, then rebuilds buckets at bucket_cap_mb
        assert records[0].calls == 1 and all(r.calls >= 2 for r in records[1:]), (
            algo,
            transport,
            [r.calls for r in records],
        )
        if algo in ("ring", "ring_simple"):
            # the ring sends 2(P-1)/P of the gradient bytes, give or take uneven chunks
            expected = 2 * (world_size - 1) / world_size * n_params * 4
            assert all(abs(r.sent_bytes - expected) <= 0.05 * expected for r in records), (
                algo,
                transport,
                records,
            )


def _local_hook(state, bucket):  # noqa: ANN001  (DDP checks real annotations; this module's are strings)
    """A hook that talks to nobody: this rank's gradients as they are."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _error_worker(rank: int, world_size: int) -> list[str]:
    """Rank 1 never joins ringcomm: rank 0's buckets time out, and the error reaches its training loop.

    Both ranks run forward and backward (DDP's own collectives need both); rank 1's hook is local.
    """
    ddp = DDP(_model(), bucket_cap_mb=0.25)
    state = RingcommState("ring", "torch", timeout=2.0)
    ddp.register_comm_hook(state, ringcomm_hook if rank == 0 else _local_hook)
    x, y = _batch(rank, 0)
    seen = []
    for _ in range(2):
        t0 = time.monotonic()
        try:
            nn.functional.cross_entropy(ddp(x), y).backward()
        except Exception as exc:
            seen.append(f"{time.monotonic() - t0:.1f}s {type(exc).__name__}: {exc}")
        else:
            seen.append(f"{time.monotonic() - t0:.1f}s returned")
    return seen


def test_error_in_comm_thread_reaches_training_loop() -> None:
    seen, other = run_world(_error_worker, 2, timeout=120)
    assert all(line.endswith("returned") for line in other), other
    first, second = seen
    # the first backward waits out the bucket's 2 s timeout, naming the rank that never came (DDP
    # re-raises the future's error as a RuntimeError carrying its message)
    assert "did not complete within 2 s" in first and "peer rank 1" in first, first
    assert 1.5 <= float(first.split("s ")[0]) < 15, first
    # the next step fails at once: the ranks are out of step, nothing is sent
    assert "earlier collective failed" in second and float(second.split("s ")[0]) < 1.0, second


@pytest.mark.fast
def test_unknown_algo_transport_or_option_is_rejected_by_the_state() -> None:
    with pytest.raises(ValueError, match="unknown algo"):
        RingcommState("butterfly")
    with pytest.raises(ValueError, match="unknown transport 'zmqq'"):
        RingcommState("ring", "zmqq")
    with pytest.raises(ValueError, match="takes no option 'shards'"):
        RingcommState("ps", options={"shards": 2})


def _start_worker(rank: int, world_size: int) -> list[str]:
    """Each rank builds the trainer's model from its own seed; _build_model must leave rank 0's on all."""
    import torch.distributed as dist

    from trainer.loop import TrainConfig, _build_model

    out = []
    for algo, transport in (("ring", "torch"), ("ring", "shm"), ("ddp", "torch")):
        cfg = TrainConfig(algo=algo, transport=transport, seed=rank, comm_timeout=60)  # a seed per rank
        torch.manual_seed(rank)
        calls = ringcomm.comm_stats().calls
        model, ddp = _build_model(cfg, torch.device("cpu"))
        through = "ringcomm" if ringcomm.comm_stats().calls > calls else "gloo"
        mine = torch.cat([t.detach().reshape(-1).double() for t in [*model.parameters(), *model.buffers()]])
        first = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(first, mine)  # the reference's own collective, only to compare
        same = all(torch.equal(f, first[0]) for f in first)
        out.append(f"{algo}@{transport}: {'equal' if same else 'differ'} through {through}")
    return out


def test_training_starts_from_rank_0s_weights_through_ringcomm_broadcast() -> None:
    """DDP's own start-up broadcast is off (init_sync=False) for ringcomm's algorithms; ringcomm.broadcast
    gives every rank rank 0's weights even when each rank built its model from another seed."""
    from trainer.models import build_model

    torch.manual_seed(0)
    a = build_model("simplecnn")
    torch.manual_seed(1)
    b = build_model("simplecnn")
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters())), "seeds must matter"
    for lines in run_world(_start_worker, 2, timeout=180):
        assert lines == [
            "ring@torch: equal through ringcomm", "ring@shm: equal through ringcomm", "ddp@torch: equal through gloo"
        ], lines
