"""algo="auto": the cost model's pick, the same on every rank (rank 0's fit), explained, and tuned.

The picks are tested on fits made up for the test, so that what "small" and
"large" mean is known: there auto must take a latency-bound algorithm for
small messages and the ring for large ones. A world whose ranks hold
different tune files must follow rank 0's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from traffic import count_from_zero  # tests/traffic.py

import ringcomm
from ringcomm import auto
from ringcomm.cost import COSTS
from ringcomm.tools.bench import tune_fits
from ringcomm.tools.spawn import run_world

# alpha (s) and beta (s/B) per algorithm, P = 4: the ring is the bandwidth champion, rd the latency one
MADE_UP = {
    "rd": (50e-6, 2.0e-9),
    "rhd": (80e-6, 1.2e-9),
    "ring": (100e-6, 0.5e-9),
    "ps": (150e-6, 1.0e-9),
    "naive": (120e-6, 1.0e-9),
}


def _fits(table: dict[str, tuple[float, float]], p: int = 4, transport: str = "torch") -> auto.Fits:
    doc = {t: {str(p): {a: {"alpha_s": ab[0], "beta_s_per_byte": ab[1]} for a, ab in table.items()}} for t in [transport]}
    return auto.parse_fits(json.dumps({"fits": doc}), "made up")


@pytest.mark.fast
def test_small_messages_go_to_few_rounds_and_large_ones_to_the_ring() -> None:
    fits = _fits(MADE_UP)
    assert auto.choose(fits, "torch", 4, 4 << 10).algo == "rd"
    assert auto.choose(fits, "torch", 4, 64 << 20).algo == "ring"
    picks = [auto.choose(fits, "torch", 4, 1 << e).algo for e in range(8, 28)]
    assert picks[0] == "rd" and picks[-1] == "ring"
    # the pick only ever moves toward algorithms with fewer bytes per rank as M grows
    order = {a: i for i, a in enumerate(dict.fromkeys(picks))}
    assert [order[a] for a in picks] == sorted(order[a] for a in picks)


@pytest.mark.fast
def test_the_pick_is_the_smallest_predicted_time_of_the_candidates() -> None:
    fits = _fits(MADE_UP)
    for nbytes in (1, 1000, 65536, 1 << 20, 1 << 26):
        choice = auto.choose(fits, "torch", 4, nbytes)
        for algo, (alpha, beta) in MADE_UP.items():
            if algo in choice.predicted_s:
                model = COSTS[auto.COST_OF[algo]]
                assert choice.predicted_s[algo] == pytest.approx(model.time(4, nbytes, alpha, beta))
        assert choice.predicted_s[choice.algo] == min(choice.predicted_s.values())


@pytest.mark.fast
def test_a_fit_tuned_at_another_world_size_is_used_and_said_so() -> None:
    choice = auto.choose(_fits(MADE_UP, p=8), "torch", 4, 4096)
    assert "torch on cpu tuned at P=8" in choice.source
    assert choice.notes == ("P=4 is outside the tuned range P=8: the fit of P=8 carried over",)
    assert "note: P=4 is outside the tuned range P=8" in str(choice)
    no_zmq = auto.choose(_fits(MADE_UP, p=4), "zmq", 4, 4096)
    assert no_zmq.source.startswith("defaults (ringcomm/auto.py): made up has no fit for zmq on cpu")


def _tuned_at(ps: tuple[int, ...]) -> auto.Fits:
    doc = {"torch": {str(p): {a: {"alpha_s": ab[0], "beta_s_per_byte": ab[1]} for a, ab in MADE_UP.items()} for p in ps}}
    return auto.parse_fits(json.dumps({"fits": doc}), "made up")


@pytest.mark.fast
def test_between_tuned_world_sizes_the_nearest_fit_is_used_and_said_so() -> None:
    fits = _tuned_at((2, 8))
    assert auto.choose(fits, "torch", 4, 4096).source.endswith("tuned at P=2")  # |4-2| < |4-8|
    assert auto.choose(fits, "torch", 6, 4096).source.endswith("tuned at P=8")
    assert auto.choose(fits, "torch", 5, 4096).source.endswith("tuned at P=2")  # a tie: the smaller
    assert auto.choose(fits, "torch", 6, 4096).notes == ("P=6 was not tuned: the fit of the nearest tuned P=8 (P=2..8)",)
    assert auto.choose(fits, "torch", 8, 4096).notes == ()


@pytest.mark.fast
def test_beyond_the_tuned_range_the_central_algorithms_are_not_extrapolated() -> None:
    """naive and ps would win at P = 64 on these fits (their alpha is tiny); measured at P <= 4 only, they are
    left out there, and the answer says P is outside the tuned range and what was left out."""
    central_wins = dict(MADE_UP, ps=(1e-7, 1e-12), naive=(1e-7, 1e-12))
    fits = _fits(central_wins, p=4)
    assert auto.choose(fits, "torch", 4, 4096).algo == "ps"  # tuned there: weighed like the others
    choice = auto.choose(fits, "torch", 64, 4096)
    assert choice.algo == "rd" and set(choice.predicted_s) == {"rd", "rhd", "ring"}
    (note,) = choice.notes
    assert note.startswith("P=64 is outside the tuned range P=4: the model's counts carry the fit of P=4 over")
    assert note.endswith("naive and ps left out (their root's incast was measured at P<=4 only)")
    # tuned at 64, they are weighed at 64
    assert auto.choose(_fits(central_wins, p=64), "torch", 64, 4096).algo == "ps"


SIZES = [0, 1, 1 << 10, 4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


@pytest.mark.fast
@pytest.mark.parametrize("transport", list(auto.DEFAULT_FITS))
def test_the_shipped_defaults_pick_sensibly_at_every_world_size(transport: str) -> None:
    """P = 2..64, sizes 0..64 MiB, the fits auto ships with: no central server (a (P-1)-way incast) beyond
    the world sizes it was tuned at, one of the ring's bytes (ring, rhd) at 64 MiB, and as the tensor grows
    the pick only ever moves to an algorithm with fewer bytes per rank on its critical path."""
    tuned = max(auto.DEFAULT_FITS[transport])
    assert tuned <= 8  # "small": what the project's machine could run
    for p in range(2, 65):
        picks = [auto.choose(auto.Fits(), transport, p, size) for size in SIZES]
        algos = [c.algo for c in picks]
        if p > tuned:
            assert not auto.CENTRAL & set(algos), (p, algos)
        assert algos[-1] in ("ring", "rhd"), (p, algos)
        slopes = []  # seconds per tensor byte of each pick: the bytes term of its line
        for c in picks:
            fit = auto.DEFAULT_FITS[transport][min(auto.DEFAULT_FITS[transport], key=lambda q: (abs(q - p), q))]
            slopes.append(COSTS[auto.COST_OF[c.algo]].critical_path(p, 1.0)[1] * fit[c.algo][1])
        assert slopes == sorted(slopes, reverse=True), (p, algos)
        times = [c.predicted_s[c.algo] for c in picks]
        assert times == sorted(times), (p, algos)


@pytest.mark.fast
def test_64_ranks_and_4_kib_over_torch_is_not_a_63_way_incast() -> None:
    choice = auto.choose(auto.Fits(), "torch", 64, 4 << 10)
    assert choice.algo not in auto.CENTRAL and "ps" not in choice.predicted_s
    assert "P=64 is outside the tuned range P=2..4" in str(choice)


# --- keyed by device: NCCL is not Gloo ---


@pytest.mark.fast
def test_a_cuda_pick_never_uses_a_cpu_fit() -> None:
    naive_wins = {a: (1.0, 1.0) for a in auto.CANDIDATES}
    naive_wins["naive"] = (1e-9, 1e-15)
    cpu_only = _fits(naive_wins, p=4)
    assert auto.choose(cpu_only, "torch", 4, 1 << 20).algo == "naive"
    on_cuda = auto.choose(cpu_only, "torch", 4, 1 << 20, device="cuda")
    alpha, beta = auto.MODEL_DEFAULT
    assert on_cuda.source.startswith("model defaults: no fit for torch on cuda in made up or ringcomm/auto.py")
    for algo, seconds in on_cuda.predicted_s.items():
        assert seconds == pytest.approx(COSTS[auto.COST_OF[algo]].time(4, 1 << 20, alpha, beta))
    assert on_cuda.algo != "naive" and "on torch on cuda" in on_cuda.reason
    # and without any file: the shipped defaults are CPU measurements, not used for CUDA either
    assert auto.choose(auto.Fits(), "torch", 4, 4096, device="cuda").source.startswith("model defaults")


@pytest.mark.fast
def test_a_cuda_fit_is_used_for_cuda_only() -> None:
    ring_wins = {a: (1.0, 1.0) for a in auto.CANDIDATES}
    ring_wins["ring"] = (1e-9, 1e-15)
    doc = {
        "torch:cuda": {"4": {a: {"alpha_s": ab[0], "beta_s_per_byte": ab[1]} for a, ab in ring_wins.items()}},
        "torch:cpu": {"4": {a: {"alpha_s": ab[0], "beta_s_per_byte": ab[1]} for a, ab in MADE_UP.items()}},
    }
    fits = auto.parse_fits(json.dumps({"fits": doc}), "made up")
    assert set(fits.by_world) == {"torch", "torch:cuda"}  # "torch:cpu" is plain "torch"
    assert auto.choose(fits, "torch", 4, 4096, device="cuda").algo == "ring"
    assert auto.choose(fits, "torch", 4, 4096).algo == "rd"  # MADE_UP's pick, as on cpu above
    with pytest.raises(ValueError, match="fits key 'torch:xpu'"):
        auto.parse_fits(json.dumps({"fits": {"torch:xpu": doc["torch:cuda"]}}), "odd")


@pytest.mark.fast
def test_a_rank_remembers_its_picks_per_device() -> None:
    """WorldTuning.pick caches by (transport, device, size): a CPU pick is not reused for a CUDA tensor."""
    from ringcomm.runtime.tuning import WorldTuning

    naive_wins = {a: (1.0, 1.0) for a in auto.CANDIDATES}
    naive_wins["naive"] = (1e-9, 1e-15)
    tune = WorldTuning(store=None, key="unused", rank=0, world_size=4)
    tune._fits = _fits(naive_wins, p=4)  # as if read from rank 0's publication
    assert tune.pick("torch", 1 << 20, 1e18) == "naive"
    assert tune.pick("torch", 1 << 20, 1e18, "cuda") != "naive"


@pytest.mark.fast
def test_explain_says_what_and_why() -> None:
    choice = ringcomm.explain_auto(16384, torch.float32, "shm", world_size=4)
    text = str(choice)
    assert text.startswith(f"auto picks {choice.algo}: predicted ") and "65536 B over 4 ranks on shm" in text
    assert all(algo in text for algo in choice.predicted_s)


@pytest.mark.fast
def test_explain_refuses_what_all_reduce_refuses() -> None:
    with pytest.raises(ValueError, match=r"unknown transport 'nccl'.*transport='torch' with device='cpu' \(Gloo\) or device='cuda' \(NCCL\)"):
        ringcomm.explain_auto(1000, transport="nccl", world_size=4)
    with pytest.raises(ValueError, match="transport='zmq' carries tensors on cpu; the tensor is on cuda"):
        ringcomm.explain_auto(1000, transport="zmq", world_size=4, device="cuda")
    with pytest.raises(ValueError, match="device 'gpu' is not a torch device"):
        ringcomm.explain_auto(1000, world_size=4, device="gpu")
    with pytest.raises(ValueError, match="numel must be an integer >= 0, got -1"):
        ringcomm.explain_auto(-1, world_size=4)
    with pytest.raises(ValueError, match="world_size must be an integer >= 1, got 0"):
        ringcomm.explain_auto(10, world_size=0)
    on_cuda = ringcomm.explain_auto(1000, transport="torch", world_size=4, device="cuda:0")
    assert on_cuda.device == "cuda" and on_cuda.source.startswith("model defaults")


@pytest.mark.fast
@pytest.mark.parametrize(("dtype", "size"), [("float32", 4), ("torch.float64", 8), ("bfloat16", 2), (torch.int8, 1)])
def test_explain_takes_a_dtype_or_its_name(dtype: object, size: int) -> None:
    assert ringcomm.explain_auto(1000, dtype, world_size=4).nbytes == 1000 * size


@pytest.mark.fast
@pytest.mark.parametrize("dtype", ["float33", "Tensor", 4, None])
def test_explain_refuses_a_dtype_that_is_not_one_by_name(dtype: object) -> None:
    with pytest.raises(ValueError, match=f"dtype={dtype!r} is not a torch dtype; pass e.g. torch.float32 or 'float32'"):
        ringcomm.explain_auto(1000, dtype, world_size=4)


@pytest.mark.fast
def test_one_rank_moves_nothing_and_consults_no_fit() -> None:
    choice = ringcomm.explain_auto(1000, world_size=1)
    assert set(choice.predicted_s.values()) == {0.0}
    assert choice.source == "one rank: nothing travels, every candidate takes 0 s; no fit consulted"
    assert "tuned" not in str(choice)


@pytest.mark.fast
def test_a_tune_file_named_but_missing_is_said_not_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "tnue.json"
    monkeypatch.setenv("RINGCOMM_TUNE_FILE", str(missing))
    fits = auto.load_local()
    said = f"RINGCOMM_TUNE_FILE={missing} does not exist"
    assert f"ringcomm: {said}; auto uses its defaults" in capsys.readouterr().err
    assert fits.source == f"defaults (ringcomm/auto.py): {said}"
    assert said in str(ringcomm.explain_auto(1000, world_size=4))
    monkeypatch.setenv("RINGCOMM_TUNE_FILE", str(tmp_path))  # a folder
    assert "is not a file" in auto.load_local().source
    monkeypatch.delenv("RINGCOMM_TUNE_FILE")
    monkeypatch.setenv("HOME", str(tmp_path))  # no file where none was asked for: the defaults, quietly
    capsys.readouterr()
    assert auto.load_local().source == "defaults (ringcomm/auto.py)" and capsys.readouterr().err == ""


@pytest.mark.fast
def test_a_tune_file_that_is_not_one_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "tune.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"{bad}: not a ringcomm tune file"):
        auto.parse_fits(bad.read_text(), str(bad))
    monkeypatch.setenv("RINGCOMM_TUNE_FILE", str(bad))
    assert auto.tune_path() == bad
    assert auto.load_local().source.startswith("defaults")  # with a warning on stderr


@pytest.mark.fast
def test_tune_fits_recover_alpha_and_beta_from_clean_rows() -> None:
    alpha, beta, p = 120e-6, 0.8e-9, 4
    rows = []
    for size in (4096, 65536, 1 << 20, 16 << 20):
        messages, path_bytes = COSTS["ring"].critical_path(p, size)
        rows.append({"algo": "ring@shm", "transport": "shm", "size_bytes": size, "time_us": (messages * alpha + path_bytes * beta) * 1e6})
    fit = tune_fits(rows, p)["shm"]["ring"]
    assert fit["alpha_s"] == pytest.approx(alpha, rel=1e-6) and fit["beta_s_per_byte"] == pytest.approx(beta, rel=1e-6)
    assert fit["median_rel_err"] < 1e-9


# --- in a world: every rank takes rank 0's pick ---


def _pick_rank(rank: int, p: int, files: list[str]) -> dict:
    os.environ["RINGCOMM_TUNE_FILE"] = files[rank]  # before this process's first ringcomm call
    comm = ringcomm.init("torch")
    x = torch.full((10_000,), float(rank))
    count_from_zero(comm.stats)
    ringcomm.all_reduce(x, algo="auto", check=True)
    return {
        "explained": ringcomm.explain_auto(10_000).algo,
        "sends_to": dict(comm.stats.sends_to),
        "ok": bool((x == sum(range(p))).all()),
    }


def test_every_rank_takes_rank_0s_pick(tmp_path: Path) -> None:
    """Rank 0's file makes naive the pick; the others' make the ring the pick. naive it is, everywhere."""
    p = 3
    naive_wins = {a: (1.0, 1.0) for a in auto.CANDIDATES}
    naive_wins["naive"] = (1e-6, 1e-12)
    ring_wins = {a: (1.0, 1.0) for a in auto.CANDIDATES}
    ring_wins["ring"] = (1e-6, 1e-12)
    files = []
    for rank in range(p):
        path = tmp_path / f"tune{rank}.json"
        table = naive_wins if rank == 0 else ring_wins
        doc = {"torch": {str(p): {a: {"alpha_s": ab[0], "beta_s_per_byte": ab[1]} for a, ab in table.items()}}}
        path.write_text(json.dumps({"version": 1, "fits": doc}))
        files.append(str(path))
    results = run_world(_pick_rank, p, (files,), timeout=120)
    for rank, r in enumerate(results):
        assert r["ok"], r
        assert r["explained"] == "naive", r
        # naive: every other rank sends its tensor to rank 0 only; the root sends the result to all
        assert r["sends_to"] == ({1: 1, 2: 1} if rank == 0 else {0: 1}), (rank, r)


# --- hier: weighed only where the world has several nodes of several ranks ---

# shared memory fast, the network slow (500 Mbit/s-ish): per P, per transport
_NET = {a: (100e-6, 16e-9) for a in auto.CANDIDATES}
_SHM = {a: (5e-6, 0.2e-9) for a in auto.CANDIDATES}


def _node_fits(net: dict = _NET, shm: dict = _SHM) -> auto.Fits:
    plain = {a: {"alpha_s": ab[0], "beta_s_per_byte": ab[1]} for a, ab in net.items()}
    fast = {a: {"alpha_s": ab[0], "beta_s_per_byte": ab[1]} for a, ab in shm.items()}
    doc = {"torch": {str(p): plain for p in (2, 4, 8)}, "shm": {str(p): fast for p in (2, 4)}}
    return auto.parse_fits(json.dumps({"fits": doc}), "made up")


@pytest.mark.fast
@pytest.mark.parametrize(("nodes", "weighed"), [(None, False), ((1, 4), False), ((4, 1), False), ((2, 2), True)])
def test_hier_is_weighed_only_with_several_nodes_of_several_ranks(nodes: tuple[int, int] | None, weighed: bool) -> None:
    choice = auto.choose(_node_fits(), "torch", 4, 16 << 20, nodes=nodes)
    assert ("hier" in choice.predicted_s) is weighed, choice
    assert (choice.algo == "hier") is weighed, choice  # where weighed, these fits make it the fastest


@pytest.mark.fast
def test_hiers_prediction_is_shm_inside_plus_the_cross_pick_across() -> None:
    m = 16 << 20
    choice = auto.choose(_node_fits(), "torch", 8, m, nodes=(4, 2))
    # in the node: shm's ring at P = 2 (2 messages of M/2: M in all); across: what auto picks on 4 nodes
    # for each rank's M/2 (these fits cost every algorithm alike per message and byte, so rhd: the
    # ring's 1.5 M at a power of two in 2 log2(4) = 4 messages), timed on the whole M
    assert auto.choose(_node_fits(), "torch", 4, m // 2).algo == "rhd"
    want = 2 * 5e-6 + m * 0.2e-9 + 4 * 100e-6 + 1.5 * m * 16e-9
    assert choice.predicted_s["hier"] == pytest.approx(want)
    assert choice.predicted_s["ring"] == pytest.approx(14 * 100e-6 + 1.75 * m * 16e-9)
    assert any("4 nodes × 2 ranks" in note for note in choice.notes), choice.notes


@pytest.mark.fast
def test_hier_loses_where_shared_memory_is_no_faster_than_the_network() -> None:
    slow_shm = {a: (1e-3, 40e-9) for a in auto.CANDIDATES}
    choice = auto.choose(_node_fits(shm=slow_shm), "torch", 4, 16 << 20, nodes=(2, 2))
    assert "hier" in choice.predicted_s and choice.algo != "hier", choice
    assert choice.predicted_s["hier"] > min(choice.predicted_s.values())


@pytest.mark.fast
def test_hier_is_left_out_on_cuda_and_said_so() -> None:
    choice = auto.choose(_node_fits(), "torch", 4, 16 << 20, "cuda", nodes=(2, 2))
    assert "hier" not in choice.predicted_s
    assert any("hier left out" in note for note in choice.notes), choice.notes


@pytest.mark.fast
def test_nodes_that_are_not_the_world_are_refused() -> None:
    with pytest.raises(ValueError, match=r"nodes=\(2, 3\): 2 nodes of 3 ranks are not the 4 ranks"):
        auto.choose(_node_fits(), "torch", 4, 1024, nodes=(2, 3))
    with pytest.raises(ValueError, match="ranks per node must be an integer >= 1"):
        auto.choose(_node_fits(), "torch", 4, 1024, nodes=(4, 0))


@pytest.mark.fast
def test_a_rank_remembers_its_picks_per_node_shape() -> None:
    from ringcomm.runtime.tuning import WorldTuning

    tune = WorldTuning(store=None, key="unused", rank=0, world_size=4)
    tune._fits = _node_fits()
    assert tune.pick("torch", 16 << 20, 1e18, "cpu", (2, 2)) == "hier"
    assert tune.pick("torch", 16 << 20, 1e18, "cpu") != "hier"
    assert tune.pick("torch", 16 << 20, 1e18, "cpu", (1, 4)) != "hier"
