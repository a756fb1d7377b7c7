"""trainer/zero.py: the shards partition the parameters, and ZeRO training is ring training, 1/P of the state.

The partition test starts no process. The training tests run ``trainer.loop.train`` in a
``run_world`` (P processes, the torch transport), several runs one after another in the same
world, to pay the start-up once:

- for sgd and adamw, a plain ring run and a ``--zero 1`` run from the same seed: final train loss
  within 0.5 %, test accuracy within 1 point, and each rank's optimizer state <= 1/P + 5 % of the
  plain run's. Shortened from the issue's 40 steps to ``STEPS`` on a small synthetic set (the
  machine running the tests is small and shared); AdamW at lr 1e-3 (the trainer's default 0.05 is
  SGD's and diverges AdamW, which would compare two blow-ups).
- adamw at P = 3 over shm for the issue's full 40 steps (uneven shards), the final parameters too;
  analysis/measured/zero/agreement.py runs the whole grid.
- at P = 2: ``--zero 2`` gives the very weights ``--zero 1`` gives, and a ``--zero 1`` run stopped
  half-way and resumed ends bitwise where the uninterrupted one ended (weights and optimizer state).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ringcomm
from ringcomm.tools.spawn import run_world
from trainer import checkpoint
from trainer.hooks import zero_hook
from trainer.loop import TrainConfig, train
from trainer.zero import ZeroOptimizer, flatten_parameters, padded_numel, shard_bounds

pytestmark = pytest.mark.timeout(600)

STEPS = 20  # optimizer steps per compared run

# --- the partition (no processes) -----------------------------------------------------------------

SHAPES = [(3, 5), (7,), (2, 3, 3), (1,), (11,)]  # 52 elements: uneven for P = 3, 5 (and 4 divides it)


def _params() -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(shape)) for shape in SHAPES]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("numel", [1, 4, 52, 53, 101])
def test_the_blocks_cover_every_element_once(world_size: int, numel: int) -> None:
    owners = torch.zeros(padded_numel(numel, world_size), dtype=torch.int64)
    sizes = set()
    for rank in range(world_size):
        lo, hi = shard_bounds(numel, world_size, rank)
        owners[lo:hi] += 1
        sizes.add(hi - lo)
    assert owners.eq(1).all(), f"P={world_size} numel={numel}: owner counts {owners.tolist()}"
    assert len(sizes) == 1, f"blocks of unequal sizes {sizes}: the collectives need equal blocks"
    assert 0 <= owners.numel() - numel < world_size, "padding must be fewer than P elements"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_flatten_parameters_shards_partition_the_model_exactly(world_size: int) -> None:
    """Each rank's shard is its block of the values; the blocks together are every parameter element once."""
    originals = [p.detach().clone() for p in _params()]
    want = torch.cat([t.reshape(-1) for t in originals])
    seen = torch.zeros(want.numel(), dtype=torch.int64)
    pieces = []
    for rank in range(world_size):
        params = _params()
        (flat,) = flatten_parameters(params, world_size, rank)
        assert flat.numel == want.numel()
        assert flat.buffer.numel() % world_size == 0
        assert torch.equal(flat.buffer[: flat.numel], want) and flat.buffer[flat.numel :].eq(0).all()
        for p, orig in zip(params, originals):  # still the same values, now views of the buffer
            assert torch.equal(p.detach(), orig)
            assert p.untyped_storage().data_ptr() == flat.buffer.untyped_storage().data_ptr()
        assert torch.equal(flat.shard.detach(), flat.buffer[flat.lo : flat.hi])
        seen[flat.lo : min(flat.hi, flat.numel)] += 1
        pieces.append(flat.shard.detach())
    assert seen.eq(1).all(), f"P={world_size}: element owner counts {seen.tolist()}"
    assert torch.equal(torch.cat(pieces)[: want.numel()], want)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("bucket_bytes", [1, 40, 100, 10**6])
def test_bucketed_shards_partition_the_model_exactly(world_size: int, bucket_bytes: int) -> None:
    """With buckets, rank r owns block r of each: over the ranks, every parameter element exactly once.

    ``bucket_bytes`` 1 makes a bucket of every parameter; 40 and 100 (bytes; the float32 parameters
    are 60, 28, 72, 4, 44 bytes) group some from the last one back; 10**6 makes one bucket.
    """
    originals = [p.detach().clone() for p in _params()]
    seen = [torch.zeros(t.numel(), dtype=torch.int64) for t in originals]  # per parameter: owners per element
    layouts = set()
    for rank in range(world_size):
        params = _params()
        flats = flatten_parameters(params, world_size, rank, bucket_bytes=bucket_bytes)
        layouts.add(tuple(tuple(p.shape for p in f.params) for f in flats))
        assert [p for f in flats for p in f.params] == params, "buckets must keep the model's order, each once"
        for f in flats:
            assert f.buffer.numel() == padded_numel(f.numel, world_size) and f.buffer[f.numel :].eq(0).all()
            assert torch.equal(f.shard.detach(), f.buffer[f.lo : f.hi])
            offset = 0
            for p in f.params:
                i = next(k for k, q in enumerate(params) if q is p)
                assert torch.equal(p.detach(), originals[i]), "flattening changed a value"
                assert p.untyped_storage().data_ptr() == f.buffer.untyped_storage().data_ptr()
                # the part of this parameter inside this rank's block [lo, hi) of the bucket
                lo, hi = max(f.lo - offset, 0), min(f.hi - offset, p.numel())
                if lo < hi:
                    seen[i][lo:hi] += 1
                offset += p.numel()
    assert len(layouts) == 1, "every rank must cut the same buckets"
    for i, owners in enumerate(seen):
        assert owners.eq(1).all(), f"P={world_size} bucket_bytes={bucket_bytes}: parameter {i} owners {owners.tolist()}"


def test_buckets_are_grouped_from_the_last_parameter_back() -> None:
    """Backward finishes the last layers first, so the bucket it completes first must be the last one."""
    sizes = [[p.numel() * 4 for p in f.params] for f in flatten_parameters(_params(), 2, 0, bucket_bytes=100)]
    assert sizes == [[60, 28], [72, 4, 44]], sizes  # from the end: 44+4+72 >= 100 closes; 28+60 is what is left


def test_a_sharded_checkpoint_is_refused_by_a_run_that_is_not_and_the_reverse() -> None:
    sharded = {"zero": 1, "config": {"optimizer": "adamw"}}
    plain = {"config": {}}  # an older file: no "zero" key, sgd
    assert checkpoint.mismatch(sharded, TrainConfig(zero=2, optimizer="adamw")) is None
    assert "written with --zero 1" in (checkpoint.mismatch(sharded, TrainConfig(zero=0, optimizer="adamw")) or "")
    assert "written with no --zero" in (checkpoint.mismatch(plain, TrainConfig(zero=1)) or "")
    assert "--optimizer adamw's state, not sgd's" in (checkpoint.mismatch(sharded, TrainConfig(zero=1)) or "")
    assert checkpoint.mismatch(plain, TrainConfig()) is None


def test_launch_refuses_zero_with_ddp_in_one_line() -> None:
    import launch

    args = launch.parse_args(["--algo", "ddp", "--zero", "1"])
    with pytest.raises(SystemExit, match=r"^launch.py: --zero 1 needs one of ringcomm's algorithms"):
        launch.check_args(args, 2)
    assert launch.config_from_args(launch.parse_args(["--zero", "2", "--optimizer", "adamw"]), 2).zero == 2


# --- training -------------------------------------------------------------------------------------


def _cfg(out: Path, **changes: Any) -> TrainConfig:
    base = TrainConfig(
        algo="ring",
        transport="torch",
        comm_timeout=120,
        dataset="synthetic",
        synthetic_size=1536,  # 512 training images per rank at P = 3: 32 steps of 16
        batch_size=16,
        max_steps=STEPS,
        schedule="constant",
        eval_batches=2,
        eval_batch_size=64,
        log_every=1000,
        out=str(out),
    )
    return dataclasses.replace(base, **changes)


LR = {"sgd": 0.05, "adamw": 1e-3}


def _compare_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Plain ring and --zero 1 for sgd and adamw; at P = 2 also --zero 2 and a resume. Metrics from rank 0."""
    cpu = torch.device("cpu")
    out: dict[str, Any] = {}
    for opt in ("sgd", "adamw"):
        for zero in (0, 1):
            cfg = _cfg(Path(root) / f"{opt}-z{zero}", optimizer=opt, lr=LR[opt], zero=zero)
            out[f"{opt}-z{zero}"] = train(cfg, rank, world_size, cpu)
    if world_size == 2:
        out["adamw-z2"] = train(_cfg(Path(root) / "adamw-z2", optimizer="adamw", lr=1e-3, zero=2), rank, world_size, cpu)
        half = _cfg(Path(root) / "adamw-half", optimizer="adamw", lr=1e-3, zero=1, max_steps=STEPS // 2)
        train(half, rank, world_size, cpu)
        resumed = dataclasses.replace(half, max_steps=STEPS, resume=str(Path(root) / "adamw-half" / "checkpoint.pt"))
        out["adamw-resumed"] = train(resumed, rank, world_size, cpu)
        try:  # the same checkpoint, resumed without --zero
            train(dataclasses.replace(resumed, zero=0), rank, world_size, cpu)
            out["refused"] = None
        except ValueError as exc:
            out["refused"] = str(exc)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=False)
    flat = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for i, entry in ckpt["optimizer"]["state"].items():
        for key, value in entry.items():
            flat[f"optimizer.{i}.{key}"] = value
    return flat


def _check_zero1_against_ring(got: dict[str, Any], world_size: int, steps: int) -> None:
    """Rank 0's metrics of a plain ring run and a --zero 1 run agree (loss, accuracy), with 1/P of the state."""
    for opt in ("sgd", "adamw"):
        plain, sharded = got[f"{opt}-z0"], got[f"{opt}-z1"]
        assert plain["steps"] == sharded["steps"] == steps
        assert sharded["zero"] == 1 and plain["zero"] == 0 and sharded["optimizer"] == opt
        loss0, loss1 = plain["final_train_loss"], sharded["final_train_loss"]
        assert abs(loss1 - loss0) <= 0.005 * abs(loss0), f"{opt} P={world_size}: train loss {loss1} vs ring {loss0}"
        acc0, acc1 = plain["final_test_accuracy"], sharded["final_test_accuracy"]
        assert abs(acc1 - acc0) <= 0.01, f"{opt} P={world_size}: test accuracy {acc1} vs ring {acc0}"
        whole = plain["optimizer_state_bytes"]
        assert whole > 0 and plain["optimizer_state_bytes_per_rank"] == [whole] * world_size
        for rank, mine in enumerate(sharded["optimizer_state_bytes_per_rank"]):
            assert mine <= whole * (1 / world_size + 0.05), (
                f"{opt} P={world_size} rank {rank}: {mine} B of optimizer state; unsharded {whole} B"
            )
        assert sharded["peak_memory_bytes"] > 0 and len(sharded["peak_memory_bytes_per_rank"]) == world_size


@pytest.mark.parametrize("world_size", [2, 3])
def test_zero1_trains_as_the_ring_does_with_1_over_p_of_the_optimizer_state(world_size: int, tmp_path: Path) -> None:
    results = run_world(_compare_worker, world_size, (str(tmp_path),), timeout=560)
    got = results[0]
    _check_zero1_against_ring(got, world_size, STEPS)
    if world_size == 2:
        z1, z2 = _tensors(tmp_path / "adamw-z1" / "checkpoint.pt"), _tensors(tmp_path / "adamw-z2" / "checkpoint.pt")
        resumed = _tensors(tmp_path / "adamw-half" / "checkpoint.pt")
        assert z1.keys() == z2.keys() == resumed.keys()
        for key, value in z1.items():
            torch.testing.assert_close(z2[key], value, rtol=0, atol=0, msg=f"--zero 2 vs 1: {key}")
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=f"resumed vs whole: {key}")
        assert got["adamw-resumed"]["steps"] == STEPS
        assert "written with --zero 1" in (got["refused"] or ""), got["refused"]


SHM_STEPS = 6  # optimizer steps per run over shm at P = 4: few, so the four runs stay near a minute


def _shm_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Plain ring and --zero 1 over shm for sgd and adamw, in one world. Metrics from rank 0."""
    out: dict[str, Any] = {}
    for opt in ("sgd", "adamw"):
        for zero in (0, 1):
            cfg = _cfg(
                Path(root) / f"{opt}-z{zero}", transport="shm", optimizer=opt, lr=LR[opt], zero=zero,
                max_steps=SHM_STEPS, eval_batches=1,
            )
            out[f"{opt}-z{zero}"] = train(cfg, rank, world_size, torch.device("cpu"))
    return out


def test_zero1_over_shm_at_p4_with_uneven_shards_trains_as_the_ring_does(tmp_path: Path) -> None:
    """P = 4 over shared memory: simplecnn's last bucket (1,049,994 elements) does not divide by 4."""
    assert 1_049_994 % 4 != 0
    results = run_world(_shm_worker, 4, (str(tmp_path),), timeout=400)
    _check_zero1_against_ring(results[0], 4, SHM_STEPS)


LONG_STEPS = 40  # the count: order-of-summation drift has 40 steps to grow


def _long_worker(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Plain ring and --zero 1, adamw over shm, 40 steps each, in one world. Metrics from rank 0."""
    out: dict[str, Any] = {}
    for zero in (0, 1):
        cfg = _cfg(
            Path(root) / f"adamw-z{zero}", transport="shm", optimizer="adamw", lr=LR["adamw"], zero=zero,
            synthetic_size=2400,  # 800 training images per rank at P = 3: 50 steps of 16
            max_steps=LONG_STEPS,
        )
        out[f"adamw-z{zero}"] = train(cfg, rank, world_size, torch.device("cpu"))
    return out


def test_zero1_agrees_with_the_ring_over_40_steps_at_p3_with_uneven_shards(tmp_path: Path) -> None:
    """40 steps, the issue's count, at its cheapest uneven config (adamw, P = 3, shm): loss, accuracy, weights.

    Not in the fast tier (14 s in a run of this file on 2 cores; 1 to 2 minutes under heavy load). Besides
    the issue's goal (train loss within 0.5 %, test accuracy within 1 point) it compares the final
    parameters: ``||w_zero - w_ring|| / ||w_ring||`` below 1e-3. The runs differ only in the order of
    the gradient means' additions; AdamW's normalised step turns that rounding into a gap of 8e-5
    here after 40 steps (measured on this config; BatchNorm's running statistics, not parameters,
    drift more and are left out). One AdamW step of lr 1e-3 moves each weight by up to 1e-3, about
    3e-2 of the norm over all of them, so a block stepped once too few or too many is far over.
    analysis/measured/zero/agreement.py runs the issue's whole grid (docs/zero.md, "Correctness").
    """
    results = run_world(_long_worker, 3, (str(tmp_path),), timeout=400)
    got = results[0]
    assert got["adamw-z0"]["steps"] == got["adamw-z1"]["steps"] == LONG_STEPS
    loss0, loss1 = got["adamw-z0"]["final_train_loss"], got["adamw-z1"]["final_train_loss"]
    assert abs(loss1 - loss0) <= 0.005 * abs(loss0), f"adamw P=3 shm: train loss {loss1} vs ring {loss0}"
    acc0, acc1 = got["adamw-z0"]["final_test_accuracy"], got["adamw-z1"]["final_test_accuracy"]
    assert abs(acc1 - acc0) <= 0.01, f"adamw P=3 shm: test accuracy {acc1} vs ring {acc0}"
    ring, sharded = (torch.load(tmp_path / f"adamw-z{z}" / "checkpoint.pt", weights_only=False)["model"] for z in (0, 1))
    assert ring.keys() == sharded.keys()
    params = [k for k in ring if ring[k].is_floating_point() and "running_" not in k]
    assert len(params) == 13, f"simplecnn's parameters: {params}"  # 3 convolutions, 3 BatchNorms, 2 linears
    diff = sum(float((sharded[k].double() - ring[k].double()).pow(2).sum()) for k in params) ** 0.5
    norm = sum(float(ring[k].double().pow(2).sum()) for k in params) ** 0.5
    worst = max(params, key=lambda k: float((sharded[k] - ring[k]).abs().max()))
    assert diff <= 1e-3 * norm, (
        f"adamw P=3 shm, 40 steps: the final parameters differ by {diff / norm:.2e} of their norm; "
        f"the largest gap is in {worst}: {float((sharded[worst] - ring[worst]).abs().max()):.3e}"
    )


# --- the overlapped step, by hand: several buckets, several DDP buckets, against a reference -------

HAND_STEPS = 3
HAND_LR, HAND_MOMENTUM, HAND_DECAY = 0.1, 0.9, 5e-4


def _hand_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def _hand_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _hand_sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=HAND_LR, momentum=HAND_MOMENTUM, weight_decay=HAND_DECAY)


def _hand_worker(rank: int, world_size: int) -> dict[str, Any]:
    """ZeroOptimizer and zero_hook on a 3-layer MLP cut into 3 ZeRO buckets and several DDP buckets."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: dict[str, Any] = {}
    ringcomm.init("torch", "cpu")  # collective: sets the transport up before any hook runs
    for stage in (1, 2):
        model = _hand_model()
        flats = flatten_parameters(model.parameters(), world_size, rank, bucket_bytes=100)  # a bucket per layer
        # bucket_cap_mb: about 400 bytes, so DDP calls the hook several times per backward
        ddp = DDP(model, gradient_as_bucket_view=True, bucket_cap_mb=400 / 2**20, init_sync=False)
        opt = ZeroOptimizer(flats, _hand_sgd, stage=stage, algo="ring", transport="torch", timeout=60, module=model)
        ddp.register_comm_hook(opt, zero_hook)
        held = []
        for step in range(HAND_STEPS):
            x, y = _hand_batch(step, rank)
            loss = nn.functional.mse_loss(ddp(x), y)  # each module waits for its own all-gather here
            opt.zero_grad()
            loss.backward()
            opt.step()
            held.append(sum(g.numel() for g in opt._grads if g is not None))
        opt.wait_params()
        # plain lists (float32 -> float is exact): tensors would travel by shared-memory handles
        # that die with this process
        out[f"z{stage}"] = {"params": [p.detach().tolist() for p in model.parameters()], "held": held,
                            "buckets": len(flats), "numel": sum(f.buffer.numel() for f in flats)}
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_the_overlapped_step_is_sgd_on_the_mean_gradient(world_size: int) -> None:
    """Reduce-scatter per bucket in backward, all-gather waited for in forward: plain SGD on the mean gradient.

    The reference runs in this process: one model, each step the mean of every rank's gradient, torch's
    SGD. Every rank ends with the same weights, bitwise, and within float32 rounding of the
    reference (the sums differ in order only). Stage 2 gives stage 1's weights bitwise and holds no
    full-size gradient buffer of its own after a step; stage 1 keeps one per bucket.
    """
    results = run_world(_hand_worker, world_size, (), timeout=300)
    for got in results:
        for stage in ("z1", "z2"):
            got[stage]["params"] = [torch.tensor(p, dtype=torch.float32) for p in got[stage]["params"]]
    ref = _hand_model()
    sgd = _hand_sgd(ref.parameters())
    for step in range(HAND_STEPS):
        grads = []
        for rank in range(world_size):
            ref.zero_grad()
            x, y = _hand_batch(step, rank)
            nn.functional.mse_loss(ref(x), y).backward()
            grads.append([p.grad.clone() for p in ref.parameters()])
        for i, p in enumerate(ref.parameters()):
            p.grad = sum(g[i] for g in grads) / world_size
        sgd.step()
    want = [p.detach() for p in ref.parameters()]
    for stage in ("z1", "z2"):
        assert results[0][stage]["buckets"] == 3  # one per layer (112, 272, 51 elements): 3 reduce-scatters
        for rank, got in enumerate(results):
            for i, (a, b) in enumerate(zip(got[stage]["params"], want)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{stage} rank {rank} parameter {i}")
                assert torch.equal(a, results[0][stage]["params"][i]), f"{stage}: rank {rank} differs from rank 0"
    for rank, got in enumerate(results):
        for a, b in zip(got["z2"]["params"], got["z1"]["params"]):
            assert torch.equal(a, b), f"rank {rank}: --zero 2 weights differ from --zero 1's"
        assert got["z1"]["held"] == [got["z1"]["numel"]] * HAND_STEPS, "stage 1 keeps its gradient buffers"
        assert got["z2"]["held"] == [0] * HAND_STEPS, "stage 2 must hold no full-size gradient after a step"
