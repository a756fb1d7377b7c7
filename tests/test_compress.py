"""Gradient compression (issue 24), as a specification.

1. Wire dtype (``all_reduce(wire_dtype=...)``, ``compress/wire.py``): every all-reduce algorithm, at
   P = 2, 3, over torch and shm, bf16 and fp16, on float32 tensors: the result is within the
   rounding bound of its hops of the float64 reference, bitwise the same on every rank, and the
   bytes sent are exactly half of the same call without it. Refusals in one line without processes.
2. PowerSGD (``compress/powersgd.py``) at P = 2: a sum of rank <= r is sent exactly (one power
   iteration finds its column space), vectors are averaged exactly, the error feedback is what was
   not sent, the warm-up sends plainly, Q is the same on every rank, its bytes are (n+m)·r.
3. Top-k (``compress/topk.py``) at P = 2: the average of what the ranks sent, the same on every
   rank; error feedback conserves the input (sent + kept = given); F = 1 is the plain average.
4. Training: ``--compress powersgd:2`` checkpointed at step 4 and resumed to 8 ends with the same
   weights, bit for bit, as a run straight to 8 (Q and error feedback restored); refusals.
5. The DDP hook (``trainer/compress.py``) runs each PowerSGD or top-k bucket as a job on the comm
   thread: it returns before the bucket is reduced, and the results, Q, the error feedback and the
   step count are bit for bit those of the compressor called synchronously, bucket by bucket.
"""

from __future__ import annotations

import re
import threading

import pytest
import torch
import torch.distributed as dist
from grid import digest, make_input
from pool import run_pooled

import ringcomm
from ringcomm import cost
from ringcomm.compress import parse_compress
from ringcomm.compress.powersgd import PowerSGD, orthonormalise
from ringcomm.compress.topk import TopK
from ringcomm.compress.wire import WIRE_DTYPES
from ringcomm.tools.spawn import run_world

TIMEOUT_S = 300.0  # a whole spawned world on a loaded 2-core machine
WIRE_ALGOS = ("ring", "ring_simple", "rhd", "rd", "ps", "naive", "auto")
SIZES = (1, 5, 1000, 4099)


def wire_bound(xs: torch.Tensor, wire: torch.dtype, p: int) -> torch.Tensor:
    """Elementwise bound on |result − exact| for a float32 sum of ``xs`` (P × N) with ``wire`` on the wire.

    Every value a rank sends is rounded to the wire dtype once (u = its unit roundoff, 2^-8 bf16,
    2^-11 fp16), and a value already rounded is not rounded again. On the way to the result a value
    passes at most L = P roundings, the call's final rounding of the result included (ring: P−1
    reduce-scatter hops, then the all-gather's or the final one; rhd at P = 3: fold, halving, doubling;
    rd at P = 3: fold, exchange, final; at P = 2, ps, naive: 2). Each errs by at most u times a partial sum,
    whose magnitude is at most S = Σ|x_i| grown by the errors before it: (1+u)^L. The P−1 float32
    additions add (P−1)·eps32/2 of S each at most.
    """
    u = torch.finfo(wire).eps / 2
    u32 = torch.finfo(torch.float32).eps / 2
    s = xs.abs().sum(0)
    lhops = p
    return (lhops * u + (p - 1) * u32) * (1 + u) ** lhops * (1 + u32) ** p * s


def wire_world(rank: int, p: int, transport: str) -> list[str]:
    failures: list[str] = []
    comm = ringcomm.init(transport=transport)
    case = 0
    for wire_name, wire in WIRE_DTYPES.items():
        for algo in WIRE_ALGOS:
            for n in SIZES:
                case += 1
                where = f"rank {rank} {algo}/{transport} P={p} n={n} wire={wire_name}"
                xs = torch.stack([make_input(n, torch.float32, r, case) for r in range(p)]).double()
                plain = make_input(n, torch.float32, rank, case)
                t = plain.clone()
                sent0 = comm.stats.sent_bytes
                ringcomm.all_reduce(plain, algo=algo, transport=transport, timeout=120)
                sent_plain = comm.stats.sent_bytes - sent0
                sent0 = comm.stats.sent_bytes
                ringcomm.all_reduce(t, algo=algo, transport=transport, timeout=120, wire_dtype=wire_name)
                sent_wire = comm.stats.sent_bytes - sent0
                exact = xs.sum(0)
                err = (t.double() - exact).abs()
                bound = wire_bound(xs, wire, p)
                if not bool((err <= bound).all()):
                    i = int((err - bound).argmax())
                    failures.append(f"{where}: element {i} off by {err[i]:.3g} > bound {bound[i]:.3g}")
                if 2 * sent_wire != sent_plain:
                    failures.append(f"{where}: sent {sent_wire} B with the wire dtype, {sent_plain} B without")
                mine = digest(t)
                everyone = [torch.empty_like(mine) for _ in range(p)]
                dist.all_gather(everyone, mine)
                if not all(torch.equal(d, mine) for d in everyone):
                    failures.append(f"{where}: ranks differ")
    return failures


@pytest.mark.parametrize("transport", ["torch", "shm"])
@pytest.mark.parametrize("p", [2, 3])
def test_wire_dtype_every_algorithm(p: int, transport: str) -> None:
    results = run_world(wire_world, p, (transport,), timeout=TIMEOUT_S)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures[:20])


@pytest.mark.parametrize(
    ("dtype", "wire", "needle"),
    [
        (torch.int64, "bf16", "needs a float32 or float64 tensor"),
        (torch.bfloat16, "fp16", "needs a float32 or float64 tensor"),
        (torch.float32, "int8", "wire_dtype='int8'"),
    ],
)
def test_wire_dtype_refused(dtype: torch.dtype, wire: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        ringcomm.all_reduce(torch.ones(4, dtype=dtype), wire_dtype=wire)
    assert "\n" not in str(info.value)


def test_wire_bytes_formula() -> None:
    assert cost.wire_bytes(4000, 4, 2) == 2000
    assert cost.wire_bytes(8000, 8, 2) == 2000


# --- 2 and 3: PowerSGD and top-k, the library, at P = 2 ---------------------------------------------


def _ring_all_reduce(t: torch.Tensor, op: str) -> None:
    ringcomm.all_reduce(t, op, algo="ring", timeout=120)


def _ring_all_gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    ringcomm.all_gather(out, inp, algo="ring", timeout=120)


def _agree_all(t: torch.Tensor, p: int) -> bool:
    mine = digest(t.contiguous())
    everyone = [torch.empty_like(mine) for _ in range(p)]
    dist.all_gather(everyone, mine)
    return all(torch.equal(d, mine) for d in everyone)


def powersgd_world(rank: int, p: int) -> list[str]:
    failures: list[str] = []
    n, m, r = 40, 30, 2
    g = torch.Generator().manual_seed(7)
    us = torch.randn(p, n, generator=g)
    vs = torch.randn(p, m, generator=g)
    biases = torch.randn(p, 5, generator=g)
    mats = [torch.outer(us[i], vs[i]) for i in range(p)]  # rank 1 each: their sum has rank <= P = r
    params = [(0, torch.Size([n, m])), (1, torch.Size([5]))]
    psgd = PowerSGD(r, warmup_steps=1)
    # step 0: the warm-up, a plain average
    flat = torch.cat([mats[rank].view(-1), biases[rank]])
    psgd.reduce(flat, params, _ring_all_reduce, p)
    psgd.end_step()
    exact = torch.cat([sum(mats).view(-1) / p, biases.mean(0)])
    if not torch.allclose(flat, exact, rtol=1e-5, atol=1e-5):
        failures.append(f"rank {rank}: warm-up step is not the plain average")
    if psgd.error:
        failures.append(f"rank {rank}: the warm-up left error feedback {list(psgd.error)}")
    # step 1: compressed; a sum of rank <= r comes through exactly
    flat = torch.cat([mats[rank].view(-1), biases[rank]])
    before = flat[: n * m].clone()
    c0 = ringcomm.comm_stats()
    psgd.reduce(flat, params, _ring_all_reduce, p)
    sent = (ringcomm.comm_stats() - c0).sent_bytes
    err = (flat - exact).abs().max().item()
    if err > 1e-4 * exact.abs().max().item():
        failures.append(f"rank {rank}: rank-{r} sum not reproduced: max error {err:.3g}")
    if not torch.allclose(flat[n * m :], biases.mean(0)):
        failures.append(f"rank {rank}: bias not averaged")
    if not torch.allclose(psgd.error[0], before - flat[: n * m], atol=1e-6):
        failures.append(f"rank {rank}: error feedback is not input minus what was sent")
    if not _agree_all(flat, p) or not _agree_all(psgd.q[0], p):
        failures.append(f"rank {rank}: ranks differ in the result or in Q")
    # a ring all-reduce sends 2(P-1)/P of a payload's bytes (± a chunk's rounding: one element a call,
    # three calls: P, Q, the bias): (n+m)·r elements for the matrix, not n·m
    payload = cost.powersgd_elements([(n, m)], r) + 5
    if abs(sent - 2 * (p - 1) / p * payload * 4) > 3 * 2 * (p - 1) * 4:
        failures.append(f"rank {rank}: sent {sent} B for a payload of {payload} elements")
    # the state survives a round trip
    again = PowerSGD(r, warmup_steps=1)
    again.load_state_dict(psgd.state_dict())
    same = torch.equal(again.q[0], psgd.q[0]) and torch.equal(again.error[0], psgd.error[0])
    if again.step != psgd.step or not same:
        failures.append(f"rank {rank}: state_dict round trip lost something")
    return failures


def test_powersgd_low_rank_exact_and_error_feedback() -> None:
    results = run_world(powersgd_world, 2, timeout=TIMEOUT_S)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures)


def test_orthonormalise_and_small_tensors_stay_plain() -> None:
    g = torch.Generator().manual_seed(3)
    p = torch.randn(50, 4, generator=g)
    orthonormalise(p)
    assert torch.allclose(p.T @ p, torch.eye(4), atol=1e-5)
    psgd = PowerSGD(4)
    assert not psgd.compresses((10,))  # a vector
    assert not psgd.compresses((8, 8))  # (8+8)·4 = 64: the factors are as large as the matrix
    assert psgd.compresses((128, 3, 3, 3))  # 128×27: (128+27)·4·5 = 3100 <= 3456
    assert not psgd.compresses((64, 3, 3, 3))  # 64×27: (64+27)·4·5 = 1820 > 1728: factors over a fifth
    assert not PowerSGD(2).compresses((10, 128))  # simplecnn's classifier: 1280/(138·2) = 4.6 < 5
    assert PowerSGD(2, min_gain=2).compresses((10, 128))  # PyTorch's threshold would compress it
    with pytest.raises(ValueError, match="rank=0"):
        PowerSGD(0)


def topk_world(rank: int, p: int) -> list[str]:
    failures: list[str] = []
    g = torch.Generator().manual_seed(11)
    xs = torch.randn(p, 1000, generator=g)
    mat = torch.Size((10, 100))  # a matrix: sparsified (a vector would be averaged whole)
    tk = TopK(0.05, warmup_steps=0)
    flat = xs[rank].clone()
    tk.reduce(flat, [(0, mat)], _ring_all_gather, p)
    kept = tk.error[0]
    sent_mine = xs[rank] - kept
    if int((sent_mine != 0).sum()) != tk.k(1000):
        failures.append(f"rank {rank}: sent {(sent_mine != 0).sum()} entries, expected {tk.k(1000)}")
    if not torch.equal(kept + sent_mine, xs[rank]):
        failures.append(f"rank {rank}: sent + kept != input")
    if sent_mine.abs().max() < kept.abs().max():
        failures.append(f"rank {rank}: kept an entry larger than one it sent")
    if not _agree_all(flat, p):
        failures.append(f"rank {rank}: ranks differ")
    # F = 1: the plain average
    full = TopK(1.0, warmup_steps=0)
    flat = xs[rank].clone()
    full.reduce(flat, [(0, mat)], _ring_all_gather, p)
    if not torch.allclose(flat, xs.mean(0), atol=1e-6):
        failures.append(f"rank {rank}: topk:1 is not the average")
    # the mean of what each rank sent is the result, on the second step with the error added back
    flat = xs[rank].clone()
    tk.reduce(flat, [(0, mat)], _ring_all_gather, p)
    if not _agree_all(flat, p):
        failures.append(f"rank {rank}: ranks differ on step 2")
    # a bucket of a vector (30), a matrix (10×50) and a vector (20): the vectors come back as the exact
    # average (one all-reduce) with no error feedback, the matrix sparse; each rank's sent + kept is its input
    shapes = [(1, torch.Size((30,))), (2, torch.Size((10, 50))), (3, torch.Size((20,)))]
    mine = xs[rank, :550].clone()
    flat = mine.clone()
    mixed = TopK(0.05, warmup_steps=0)
    mixed.reduce(flat, shapes, _ring_all_gather, p, _ring_all_reduce)
    vec = torch.cat([torch.arange(30), torch.arange(530, 550)])
    if not torch.allclose(flat[vec], xs[:, vec].mean(0), atol=1e-6):
        failures.append(f"rank {rank}: the vectors are not the plain average")
    if set(mixed.error) != {2}:
        failures.append(f"rank {rank}: error feedback kept for {sorted(mixed.error)}, expected only the matrix (2)")
    sent = mine[30:530] - mixed.error[2]
    if int((sent != 0).sum()) != mixed.k(500):
        failures.append(f"rank {rank}: the matrix sent {(sent != 0).sum()} entries, expected {mixed.k(500)}")
    if int((flat[30:530] != 0).sum()) > p * mixed.k(500) or not _agree_all(flat, p):
        failures.append(f"rank {rank}: the matrix's average is not sparse or the ranks differ")
    return failures


def test_topk_error_feedback_and_agreement() -> None:
    results = run_world(topk_world, 2, timeout=TIMEOUT_S)
    failures = [f for r in results for f in r]
    assert not failures, "\n".join(failures)


def test_topk_averages_its_warmup_steps_uncompressed() -> None:
    """The first warmup_steps steps go through all_reduce whole, with no error feedback; then top-k."""
    tk = TopK(0.1, warmup_steps=2)
    reduced: list[int] = []

    def all_reduce(t: torch.Tensor, op: str) -> None:
        assert op == "avg"
        reduced.append(t.numel())

    def all_gather(out: torch.Tensor, inp: torch.Tensor) -> None:  # a world of one
        out.copy_(inp)

    flat = torch.arange(100, dtype=torch.float32)
    mat = torch.Size((10, 10))
    for step in range(2):
        before = flat.clone()
        tk.reduce(flat, [(0, mat)], all_gather, 1, all_reduce)
        assert torch.equal(flat, before) and tk.error == {}, f"step {step}: not the plain average"
        tk.end_step()
    assert reduced == [100, 100]
    tk.reduce(flat, [(0, mat)], all_gather, 1, all_reduce)
    assert reduced == [100, 100] and int((flat != 0).sum()) == tk.k(100) == 10  # sparse from step 3
    assert tk.state_dict()["step"] == 2
    with pytest.raises(ValueError, match="warm-up: it needs all_reduce"):
        TopK(0.1, warmup_steps=1).reduce(flat, [(0, mat)], all_gather, 1)
    with pytest.raises(ValueError, match="averaging vectors whole: it needs all_reduce"):
        TopK(0.1, warmup_steps=0).reduce(flat, [(0, flat.shape)], all_gather, 1)
    # a state written before top-k had a warm-up compressed from its first step: past any warm-up
    old = TopK(0.1, warmup_steps=5)
    old.load_state_dict({"kind": "topk", "fraction": 0.1, "per": "parameter", "error": {}})
    assert old.step == 5


def test_topk_shares_one_budget_by_last_steps_energy() -> None:
    """With ``sizes``, k_i = ⌈F·ΣN · E_i/ΣE⌉ from the step before (the warm-up's average first, then the
    energy of gradient + error feedback), whatever bucket a parameter comes in; saved and restored."""
    def world_of_one(out: torch.Tensor, inp: torch.Tensor) -> None:
        out.copy_(inp)

    reduced: list[int] = []

    def all_reduce(t: torch.Tensor, op: str) -> None:
        assert op == "avg"
        reduced.append(t.numel())

    a, b = torch.Size((10, 10)), torch.Size((4, 25))
    tk = TopK(0.1, warmup_steps=1, sizes={0: 100, 1: 100})  # a budget of 20 entries a step
    assert tk.k(100, 0) == tk.k(100, 1) == 10  # no energy yet: ⌈F·N⌉ each
    flat = torch.cat([torch.full((100,), 3.0), torch.full((100,), 1.0)])  # E: 900 and 100
    tk.reduce(flat, [(0, a), (1, b)], world_of_one, 1, all_reduce)  # the warm-up: averaged whole
    tk.end_step()
    assert tk.energy == {0: 900.0, 1: 100.0} and reduced == [200]
    assert (tk.k(100, 0), tk.k(100, 1)) == (18, 2)  # ⌈20·0.9⌉, ⌈20·0.1⌉
    # step 2 in two buckets (another layout than step 1's): 18 and 2 entries sent, the energies of g + e
    # travel in each bucket's all-reduce (one float a matrix), and become the next step's shares
    g0, g1 = torch.arange(100, dtype=torch.float32), torch.ones(100)
    first, second = g0.clone(), g1.clone()
    tk.reduce(first, [(0, a)], world_of_one, 1, all_reduce)
    tk.reduce(second, [(1, b)], world_of_one, 1, all_reduce)
    assert int((first != 0).sum()) == 18 and int((second != 0).sum()) == 2 and reduced == [200, 1, 1]
    assert torch.equal(first[first != 0], g0[-18:])  # the largest entries
    tk.end_step()
    assert tk.energy == {0: float(g0.pow(2).sum()), 1: 100.0}
    again = TopK(0.1, warmup_steps=1, sizes={0: 100, 1: 100})
    again.load_state_dict(tk.state_dict())
    assert again.energy == tk.energy and again.k(100, 1) == tk.k(100, 1) == 1  # ⌈20·100/328450⌉, at least 1
    assert torch.equal(again.error[1], tk.error[1])


def test_topk_refuses_a_per_bucket_state() -> None:
    old = {"kind": "topk", "fraction": 0.01, "error": {12: torch.zeros(5)}}  # before it was per parameter
    with pytest.raises(ValueError, match="per bucket") as info:
        TopK(0.01).load_state_dict(old)
    assert "\n" not in str(info.value)
    tk = TopK(0.01)
    tk.load_state_dict({**old, "per": "parameter"})
    assert torch.equal(tk.error[12], torch.zeros(5))


def test_compress_parsing_refusals() -> None:
    assert parse_compress("powersgd:2") == ("powersgd", 2)
    assert parse_compress("topk:0.01") == ("topk", 0.01)
    assert parse_compress("bf16") == ("bf16", None)
    for bad in ("powersgd", "powersgd:0", "topk:0", "topk:2", "int8", "bf16:2"):
        with pytest.raises(ValueError, match="--compress"):
            parse_compress(bad)
    assert cost.topk_bytes_sent(1000, 0.01, 4) == 3 * 10 * 8


# --- 4: training: the compressor's state through --resume ---------------------------------------------


def _train_world(rank: int, p: int, cfg_kwargs: dict) -> None:
    from trainer.loop import TrainConfig, train

    train(TrainConfig(**cfg_kwargs), rank, p, torch.device("cpu"))


def _run_cfg(tmp: str, **over: object) -> dict:
    base = dict(
        algo="ring", transport="torch", compress="powersgd:2", compress_warmup=2, model="simplecnn",
        dataset="synthetic", synthetic_size=400, batch_size=8, schedule="constant", eval_batches=1,
        eval_batch_size=50, seed=3, out=tmp, log_every=100,
    )
    return {**base, **over}


def test_powersgd_resume_is_exact(tmp_path) -> None:
    straight, first = str(tmp_path / "straight"), str(tmp_path / "first")
    run_world(_train_world, 2, (_run_cfg(straight, max_steps=6),), timeout=TIMEOUT_S)
    run_world(_train_world, 2, (_run_cfg(first, max_steps=3),), timeout=TIMEOUT_S)
    resumed = str(tmp_path / "resumed")
    run_world(
        _train_world, 2, (_run_cfg(resumed, max_steps=6, resume=f"{first}/checkpoint.pt"),), timeout=TIMEOUT_S
    )
    a = torch.load(f"{straight}/checkpoint.pt", weights_only=False)["model"]
    b = torch.load(f"{resumed}/checkpoint.pt", weights_only=False)["model"]
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"resumed run's weights differ from the straight run's in {differ}"
    qa = torch.load(f"{straight}/compressor-rank1.pt", weights_only=True)
    qb = torch.load(f"{resumed}/compressor-rank1.pt", weights_only=True)
    assert qa["step"] == qb["step"] == 6
    assert all(torch.equal(qa["error"][i], qb["error"][i]) for i in qa["error"])
    # without the compressor's files, the resume is refused in one line
    for f in ("compressor-rank0.pt", "compressor-rank1.pt"):
        (tmp_path / "first" / f).unlink()
    with pytest.raises(Exception, match="no compressor-rank"):
        run_world(
            _train_world, 2, (_run_cfg(str(tmp_path / "again"), max_steps=6, resume=f"{first}/checkpoint.pt"),),
            timeout=TIMEOUT_S,
        )


def _logged_losses(text: str) -> dict[int, str]:
    """Rank 0's progress lines (``--log-every 1``): step -> the loss as printed."""
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"step +(\d+)/\d+ .*?\| loss (\S+) \|", text)}


def test_topk_resume_is_exact(tmp_path, capfd) -> None:
    """top-k:0.01 stopped after 3 steps and resumed to 6: the error feedback, the weights and every
    resumed step's loss are the uninterrupted run's (the error feedback is kept per bucket, keyed by
    its first parameter: the buckets DDP builds on the resumed run's first step must match)."""
    cfg = dict(compress="topk:0.01", log_every=1)
    straight, first, resumed = (str(tmp_path / d) for d in ("straight", "first", "resumed"))
    run_world(_train_world, 2, (_run_cfg(straight, max_steps=6, **cfg),), timeout=TIMEOUT_S)
    losses_straight = _logged_losses(capfd.readouterr().out)
    run_world(_train_world, 2, (_run_cfg(first, max_steps=3, **cfg),), timeout=TIMEOUT_S)
    capfd.readouterr()
    run_world(_train_world, 2, (_run_cfg(resumed, max_steps=6, resume=f"{first}/checkpoint.pt", **cfg),),
              timeout=TIMEOUT_S)  # fmt: skip
    losses_resumed = _logged_losses(capfd.readouterr().out)
    assert sorted(losses_straight) == [1, 2, 3, 4, 5, 6] and sorted(losses_resumed) == [4, 5, 6]
    assert {s: losses_straight[s] for s in (4, 5, 6)} == losses_resumed
    for rank in (0, 1):
        ea = torch.load(f"{straight}/compressor-rank{rank}.pt", weights_only=True)
        eb = torch.load(f"{resumed}/compressor-rank{rank}.pt", weights_only=True)
        assert ea["kind"] == eb["kind"] == "topk" and sorted(ea["error"]) == sorted(eb["error"])
        assert ea["step"] == eb["step"] == 6  # its warm-up (2 steps here) counted through the resume
        differ = [i for i in ea["error"] if not torch.equal(ea["error"][i], eb["error"][i])]
        assert not differ, f"rank {rank}: error feedback of buckets {differ} differs from the straight run's"
    a = torch.load(f"{straight}/checkpoint.pt", weights_only=False)
    b = torch.load(f"{resumed}/checkpoint.pt", weights_only=False)
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"resumed run's weights differ from the straight run's in {differ}"
    # the last history entry: the straight run's mean over steps 1-6, the resumed one's over 4-6
    whole, tail = a["history"][-1], b["history"][-1]
    head = torch.load(f"{first}/checkpoint.pt", weights_only=False)["history"][-1]
    assert (head["train_steps"], tail["train_steps"], whole["train_steps"]) == (3, 3, 6)
    assert head["train_loss"] * 3 + tail["train_loss"] * 3 == pytest.approx(whole["train_loss"] * 6, rel=1e-12)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--algo", "ddp", "--compress", "bf16"], "--algo ddp uses DDP's built-in all-reduce"),
        (["--algo", "ps", "--compress", "topk:0.01"], "--algo ps cannot"),
        (["--compress", "powersgd:x"], "expected one of none, bf16"),
    ],
)
def test_launch_refuses_compress_where_it_cannot_apply(argv: list[str], needle: str) -> None:
    import launch

    with pytest.raises(SystemExit, match=needle) as info:
        launch.main([*argv, "--world-size", "2", "--max-steps", "1"])
    assert "\n" not in str(info.value)


# --- --compress-warmup: PowerSGD's uncompressed steps, from the command line, checked on --resume --------


def test_compress_warmup_reaches_the_config() -> None:
    import launch

    args = launch.parse_args(["--compress", "powersgd:2", "--compress-warmup", "3", "--world-size", "2"])
    launch.check_args(args, 2)
    assert launch.config_from_args(args, 2).compress_warmup == 3
    args = launch.parse_args(["--compress", "powersgd:2", "--compress-warmup", "0", "--world-size", "2"])
    assert launch.config_from_args(args, 2).compress_warmup == 0  # compress from the first step
    args = launch.parse_args(["--compress", "powersgd:2", "--world-size", "2"])
    assert launch.config_from_args(args, 2).compress_warmup == PowerSGD(2).warmup_steps  # the library's default


@pytest.mark.parametrize("compress", ["none", "bf16", "fp16"])
def test_compress_warmup_refused_without_powersgd_or_topk(compress: str) -> None:
    import launch

    with pytest.raises(SystemExit, match="--compress-warmup 3: only --compress powersgd:R and topk:F") as info:
        launch.main(["--compress", compress, "--compress-warmup", "3", "--world-size", "2", "--max-steps", "1"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("value", ["-1", "x"])
def test_compress_warmup_refused_unless_a_whole_number(value: str, capsys) -> None:
    import launch

    with pytest.raises(SystemExit) as info:
        launch.main(["--compress", "powersgd:2", f"--compress-warmup={value}", "--world-size", "2"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--compress-warmup" in err and "\n" not in err, err


def _fake_checkpoint(path, **config: object) -> str:
    """A checkpoint file with every key ``checkpoint.load`` wants; ``config`` as the run saved it."""
    from trainer import checkpoint

    ckpt = {key: None for key in checkpoint.KEYS}
    ckpt.update(model_name="simplecnn", step=2, epoch=0, config=config)
    torch.save(ckpt, path)
    return str(path)


@pytest.mark.parametrize(
    ("saved", "argv", "needle"),
    [
        (
            {"compress": "powersgd:2", "compress_warmup": 3},
            ["--compress", "powersgd:2"],
            "averaged its first 3 steps uncompressed, this run's --compress-warmup is 10; "
            "resume with --compress-warmup 3",
        ),
        (
            {"compress": "powersgd:2"},  # written before the option existed: the default, 10
            ["--compress", "powersgd:2", "--compress-warmup", "4"],
            "resume with --compress-warmup 10",
        ),
        ({"compress": "topk:0.01"}, ["--compress", "powersgd:2"], "resume with --compress topk:0.01"),
        ({"compress": "powersgd:2", "compress_warmup": 10}, [], "resume with --compress powersgd:2"),
    ],
)
def test_resume_refuses_another_compressor_or_warmup(tmp_path, saved: dict, argv: list[str], needle: str) -> None:
    import launch

    path = _fake_checkpoint(tmp_path / "checkpoint.pt", **saved)
    common = ["--world-size", "2", "--dataset", "synthetic", "--max-steps", "4", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=needle) as info:
        launch.main([*argv, *common, "--resume", path])
    assert "\n" not in str(info.value)


def test_resume_accepts_the_saved_warmup() -> None:
    from trainer import checkpoint
    from trainer.loop import TrainConfig

    saved = {"config": {"compress": "powersgd:2", "compress_warmup": 3}}
    assert checkpoint.mismatch(saved, TrainConfig(compress="powersgd:2", compress_warmup=3)) is None
    assert checkpoint.mismatch({"config": {}}, TrainConfig(compress="bf16")) is None  # bf16 keeps no state


# --- 5: the hook runs each bucket as a job on the comm thread --------------------------------------


class _Bucket:
    """What ``compress_hook`` reads of DDP's ``GradBucket``: its flat buffer, parameters, place."""

    def __init__(self, buffer: torch.Tensor, params: list[torch.nn.Parameter], index: int, last: bool) -> None:
        self._buffer, self._params, self._index, self._last = buffer, params, index, last

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last


def _hook_world(rank: int, p: int, compress: str) -> dict:
    """Four steps of two buckets (the last layer's first, as DDP orders them) through the hook, each
    step's hooks called while a job that waits on a gate holds the comm queue; beside them the same
    gradients through a second compressor, called synchronously as the hook used to."""
    from trainer.compress import CompressState, compress_hook

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 40), torch.nn.ReLU(), torch.nn.Linear(40, 10))
    state = CompressState(compress, model, warmup_steps=1)
    sync = (
        PowerSGD(2, warmup_steps=1) if state.kind == "powersgd"
        else TopK(state.compressor.fraction, warmup_steps=1, sizes=state.compressor.sizes)
    )
    params = list(model.parameters())
    layout = [params[2:], params[:2]]
    pending, differ = [], []
    for step in range(4):
        g = torch.Generator().manual_seed(100 * step + rank)
        bufs = [torch.randn(sum(q.numel() for q in ps), generator=g) for ps in layout]
        gate = threading.Event()
        ringcomm.run_async(lambda g=gate: g.wait(60), what="a job ahead")  # holds the queue until set
        futures = [
            compress_hook(state, _Bucket(buf.clone(), ps, i, i == len(layout) - 1))
            for i, (buf, ps) in enumerate(zip(bufs, layout))
        ]
        pending.append(not any(f.done() for f in futures))
        gate.set()
        for i, (buf, ps, fut) in enumerate(zip(bufs, layout, futures)):
            shapes = [(state.index[id(q)], q.shape) for q in ps]
            if isinstance(sync, PowerSGD):
                sync.reduce(buf, shapes, state.all_reduce, p)
            else:
                sync.reduce(buf, shapes, state.all_gather, p, state.all_reduce)
            if not torch.equal(fut.wait(), buf):
                differ.append(f"step {step} bucket {i}")
        sync.end_step()
    a, b = state.compressor.state_dict(), sync.state_dict()
    same_state = a.keys() == b.keys() and a.get("step") == b.get("step") and all(
        sorted(a[k]) == sorted(b[k]) and all(torch.equal(a[k][i], b[k][i]) for i in a[k])
        for k in ("q", "error") if k in a
    )
    return {"pending": pending, "differ": differ, "same state": same_state, "step": a.get("step")}


@pytest.mark.parametrize("compress", ["powersgd:2", "topk:0.1"])
def test_the_hook_reduces_on_the_comm_thread_as_the_synchronous_compressor(compress: str) -> None:
    for r in run_pooled(_hook_world, 2, (compress,), timeout=TIMEOUT_S):
        assert r["pending"] == [True] * 4, "the hook reduced its bucket before returning"
        assert r["differ"] == [], r["differ"]
        assert r["same state"], r
        assert r["step"] == 4  # counted once a step, in the last bucket's job
