"""The synthetic data teaches: deterministic, not trivially separable, and the default run lands in its band.

The README's first command, ``python launch.py --algo ring --world-size 4``,
trains on the synthetic set wherever neither CIFAR-10 nor Debian's
Fashion-MNIST is present. On the earlier data it ended at 100 % test accuracy
after one epoch, and the curves, per-class accuracy and confusion matrix said
nothing. These tests hold the data to what ``make_synthetic``'s docstring
promises:

- the same seed gives the same bytes, in this process and in another one
  (every rank generates its own copy), and another seed gives other bytes;
- the nearest class mean on raw pixels, close to the best a classifier can do
  on this data, stays well below 100 % and well above chance, and its errors
  fall on the pair's partner far more often than by chance;
- the default run itself (4 ranks, same model, steps and test set) ends
  between 60 % and 95 % test accuracy, with errors inside the pairs.

The default run is not shrunk to fewer ranks: simplecnn's BatchNorm layers use
each rank's 32 images for their statistics, and DDP broadcasts rank 0's running
statistics, so 2 ranks of 64 images would be a different run. It takes about a
minute on 2 cores (up to two when the machine is shared), hence ``slow``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import started  # a child's own children stopped too

from trainer.data import make_synthetic

ROOT = Path(__file__).resolve().parents[1]

# What the README says to expect from the default command, and what the issue asks for.
BAND = (0.60, 0.95)


def _digest(seed: int, n_train: int, n_test: int) -> str:
    tr_x, tr_y, te_x, te_y, _ = make_synthetic(n_train, n_test, seed=seed)
    h = hashlib.sha256()
    for t in (tr_x, tr_y, te_x, te_y):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_synthetic_bytes_depend_only_on_the_seed() -> None:
    here = _digest(0, 1000, 200)
    assert _digest(0, 1000, 200) == here
    # another process, as every rank generates its own copy
    code = "import sys; sys.path.insert(0, 'tests'); import test_learner as t; print(t._digest(0, 1000, 200))"
    there = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    assert there == here
    assert _digest(1, 1000, 200) != here


def test_synthetic_classes_overlap_but_are_learnable() -> None:
    # the default sizes: what launch.py's default run trains and tests on
    train_x, train_y, test_x, test_y, classes = make_synthetic(seed=0)
    k = len(classes)
    means = torch.stack([train_x[train_y == c].float().mean(0) for c in range(k)]).flatten(1)
    pred = torch.cdist(test_x.float().flatten(1), means).argmin(1)
    accuracy = float((pred == test_y).float().mean())
    assert 0.5 < accuracy < 0.96, accuracy  # chance is 0.1; the earlier data gave 1.0
    per_class = [float((pred[test_y == c] == c).float().mean()) for c in range(k)]
    assert min(per_class) < 0.9, per_class  # some class is hard, not only noise at the edges
    wrong = pred != test_y
    within_pair = (pred[wrong] == (test_y[wrong] ^ 1)).float().mean()
    # a pair's partner is 1 of the 9 wrong answers; the mixing with random classes spreads the rest
    assert within_pair > 0.3, float(within_pair)


def _default_config(out: str) -> dict:
    """The TrainConfig launch.py makes of the README's command (launch.py is not a package module)."""
    spec = importlib.util.spec_from_file_location("launch", ROOT / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    args = launch.parse_args(["--algo", "ring", "--world-size", "4"])
    config = dataclasses.asdict(launch.config_from_args(args, args.world_size))
    config["out"] = out
    return config


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_the_default_synthetic_run_lands_in_its_band(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    # the README's command; --dataset synthetic only so that a machine with CIFAR-10 or
    # Fashion-MNIST tests the same data (auto falls to it elsewhere), --out to keep runs/ clean
    cmd = [
        sys.executable,
        "launch.py",
        "--algo",
        "ring",
        "--world-size",
        "4",
        "--dataset",
        "synthetic",
        "--out",
        out,
    ]
    with started(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        output, _ = proc.communicate(timeout=420)
    assert proc.returncode == 0, output[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())

    expected = _default_config(out)
    expected["dataset"] = "synthetic"
    assert m["config"] == expected  # the default run, apart from naming its dataset
    assert m["dataset"] == "synthetic" and m["steps"] == 10_000 // 128  # one epoch of the 10,000 images

    accuracy = m["final_test_accuracy"]
    assert BAND[0] <= accuracy <= BAND[1], f"test accuracy {accuracy:.2%} outside {BAND}\n{output[-3000:]}"
    confusion = torch.tensor(m["confusion_matrix"])
    assert int(confusion.sum()) == 2_000  # the whole test split (10 batches of 500 per rank at most)
    per_class = list(m["per_class_accuracy"].values())
    assert max(per_class) > 0.95 and min(per_class) < 0.9, per_class  # learning, unevenly: not flat
    errors = confusion.clone()
    errors.fill_diagonal_(0)
    pairs = sum(int(errors[c, c ^ 1]) for c in range(len(per_class)))
    assert pairs > 0.8 * int(errors.sum()), m["confusion_matrix"]  # confused within pairs, as designed
    assert m["final_train_loss"] < 0.8 * torch.log(torch.tensor(10.0)).item()  # below chance's loss
