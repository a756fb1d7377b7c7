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

import ringcomm
from ringcomm import auto
from ringcomm.bench import tune_fits
from ringcomm.cost import COSTS
from ringcomm.world import run_world

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


def test_small_messages_go_to_few_rounds_and_large_ones_to_the_ring() -> None:
    fits = _fits(MADE_UP)
    assert auto.choose(fits, "torch", 4, 4 << 10).algo == "rd"
    assert auto.choose(fits, "torch", 4, 64 << 20).algo == "ring"
    picks = [auto.choose(fits, "torch", 4, 1 << e).algo for e in range(8, 28)]
    assert picks[0] == "rd" and picks[-1] == "ring"
    # the pick only ever moves toward algorithms with fewer bytes per rank as M grows
    order = {a: i for i, a in enumerate(dict.fromkeys(picks))}
    assert [order[a] for a in picks] == sorted(order[a] for a in picks)


def test_the_pick_is_the_smallest_predicted_time_of_the_candidates() -> None:
    fits = _fits(MADE_UP)
    for nbytes in (1, 1000, 65536, 1 << 20, 1 << 26):
        choice = auto.choose(fits, "torch", 4, nbytes)
        for algo, (alpha, beta) in MADE_UP.items():
            if algo in choice.predicted_s:
                model = COSTS[auto.COST_OF[algo]]
                assert choice.predicted_s[algo] == pytest.approx(model.time(4, nbytes, alpha, beta))
        assert choice.predicted_s[choice.algo] == min(choice.predicted_s.values())


def test_a_fit_tuned_at_another_world_size_is_used_and_said_so() -> None:
    choice = auto.choose(_fits(MADE_UP, p=8), "torch", 4, 4096)
    assert "tuned at P=8 (P=4 asked)" in choice.source
    assert auto.choose(_fits(MADE_UP, p=4), "zmq", 4, 4096).source.startswith("defaults")  # no zmq fit


def test_explain_says_what_and_why() -> None:
    choice = ringcomm.explain_auto(16384, torch.float32, "shm", world_size=4)
    text = str(choice)
    assert text.startswith(f"auto picks {choice.algo}: predicted ") and "65536 B over 4 ranks on shm" in text
    assert all(algo in text for algo in choice.predicted_s)


def test_a_tune_file_that_is_not_one_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "tune.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=f"{bad}: not a ringcomm tune file"):
        auto.parse_fits(bad.read_text(), str(bad))
    monkeypatch.setenv("RINGCOMM_TUNE_FILE", str(bad))
    assert auto.tune_path() == bad
    assert auto.load_local().source.startswith("defaults")  # with a warning on stderr


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
    comm.stats.reset()
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
