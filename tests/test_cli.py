"""The command lines' mistakes: each one said in one line that names the option, before any work starts.

Issue 15, read as a specification. ``launch.py`` is called in this process
(``launch.main``) with ``run_world`` replaced by a function that fails the test,
so "before any worker starts" is checked, not assumed; a few runs go through a
subprocess, as a user would, where what matters is the whole of stderr (one
line, no traceback) or that torch was never imported. ``ringcomm.bench``'s and
the analysis tools' own mistakes are in test_bench.py and test_analysis.py.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import torch
from procs import run  # a child's own children stopped too

import launch
import ringcomm
import ringcomm.algorithms.registry
import ringcomm.tools.spawn
from ringcomm.tools.spawn import WorldError, run_world
from trainer import checkpoint, data, loop, models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_world(monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_world`` replaced: a launcher that gets as far as starting workers fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("launch.py started workers for a command it should have refused")

    monkeypatch.setattr(ringcomm.tools.spawn, "run_world", refuse)


def _refusal(argv: list[str]) -> str:
    """The one line ``launch.main(argv)`` exits with (status 1), checked to be one line."""
    with pytest.raises(SystemExit) as raised:
        launch.main(argv)
    message = raised.value.code
    assert isinstance(message, str), f"exit status {message!r}, not a message"
    assert "\n" not in message and message.startswith("launch.py: "), message
    return message


# --- the names argparse offers, known without torch ---------------------------------------------


def test_the_launchers_names_are_the_registries() -> None:
    assert launch.ALGO_NAMES == tuple(ringcomm.ALGOS)
    assert launch.TRANSPORT_NAMES == ringcomm.transport_names()
    assert launch.MODEL_NAMES == tuple(models.MODELS)
    assert launch.DATASET_NAMES == data.DATASETS
    assert launch.SCHEDULE_NAMES == loop.SCHEDULES
    assert (launch.CHECKPOINT_NAME, launch.METRICS_NAME) == (checkpoint.CHECKPOINT_NAME, loop.METRICS_NAME)


_WITHOUT_TORCH = """
import runpy, sys
sys.argv = ["launch.py", *sys.argv[1:]]
try:
    runpy.run_path("launch.py", run_name="__main__")
except SystemExit as exc:
    status = exc.code
print("torch imported" if "torch" in sys.modules else "torch not imported", repr(status))
"""


@pytest.mark.fast
@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["--algo", "rign"], 2),
        (["--batch-size", "0"], 2),
        (["--world-size", "0"], 2),
        (["--help"], 0),
        (["--data-dir", "/no/such/folder"], "launch.py: --data-dir /no/such/folder: no such folder"),
        (["--algo", "ddp", "--comm-option", "ps_shards=2"], None),  # a message, checked below
        (
            ["--resume", "/no/such/checkpoint.pt"],
            "launch.py: --resume: no checkpoint at /no/such/checkpoint.pt",
        ),
    ],
)
def test_argument_mistakes_are_said_before_torch_is_imported(argv: list[str], status: object) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.splitlines()[-1].startswith("torch not imported"), proc.stdout + proc.stderr
    got = ast.literal_eval(proc.stdout.splitlines()[-1].removeprefix("torch not imported "))
    if status is None:
        assert got.startswith("launch.py: --comm-option ps_shards=2: --algo ddp"), got
    else:
        assert got == status


@pytest.mark.fast
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        (["--world-size", "0"], "argument --world-size: must be at least 1, got 0"),
        (["--max-steps", "-1"], "argument --max-steps: must be at least 0, got -1"),
        (["--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
        (["--time-limit", "0"], "argument --time-limit: must be a positive number of seconds, got 0"),
        (["--algo", "rign"], "argument --algo: invalid choice: 'rign'"),
    ],
)
def test_argparse_rejections_are_one_line_with_status_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as raised:
        launch.parse_args(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"launch.py: {says}"), err


# --- help ---------------------------------------------------------------------------------------


def _help(argv: list[str], capsys: pytest.CaptureFixture, main: object) -> str:
    with pytest.raises(SystemExit) as raised:
        main(argv)  # type: ignore[operator]
    assert raised.value.code == 0
    return capsys.readouterr().out


@pytest.mark.fast
def test_launch_help_shows_every_default_and_the_out_folder_it_uses(capsys: pytest.CaptureFixture) -> None:
    text = _help(["--help"], capsys, launch.parse_args)
    assert "``" not in text
    for option, default in [
        ("--algo", "ring"),
        ("--transport", "torch"),
        ("--device", "auto"),
        ("--world-size", "4"),
        ("--model", "simplecnn"),
        ("--dataset", "auto"),
        ("--batch-size", "32"),
        ("--warmup-epochs", "0.0"),
        ("--schedule", "cosine"),
        ("--epochs", "1"),
        ("--max-steps", "150"),
        ("--seed", "0"),
        ("--eval-batches", "10"),
        ("--eval-batch-size", "500"),
    ]:
        block = text.split(f"  {option} ", 1)[1].split("\n  --", 1)[0]
        assert f"(default: {default})" in " ".join(block.split()), (option, block)
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    # the --out default the help states is the one the launcher uses
    assert "runs/ring-torch-w4" in " ".join(text.split())
    assert launch.out_dir(launch.parse_args([]), 2) == "runs/ring-torch-w2"
    assert launch.out_dir(launch.parse_args(["--algo", "ddp"]), 4) == "runs/ddp-w4"


# --- the launcher's own checks, before any worker starts ------------------------------------------


@pytest.mark.fast
def test_a_wrong_data_dir_is_refused_not_replaced_by_synthetic_data(no_world: None) -> None:
    """The issue's first item: this trained on synthetic data and exited 0."""
    assert _refusal(["--data-dir", "/wrong/path"]) == "launch.py: --data-dir /wrong/path: no such folder"


@pytest.mark.fast
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--data-dir", "{empty}"], "--data-dir {empty}: neither cifar-10-batches-py nor the Fashion-MNIST"),
        (
            ["--dataset", "cifar10", "--data-dir", "{empty}"],
            "--dataset cifar10: no cifar-10-batches-py folder in",
        ),
        (
            ["--dataset", "fashion-mnist", "--data-dir", "{empty}"],
            "--data-dir {empty}: no Fashion-MNIST idx files",
        ),
        (
            ["--dataset", "synthetic", "--data-dir", "{empty}"],
            "--data-dir {empty}: --dataset synthetic is generated and reads no files",
        ),
        (["--download"], "--download: only --dataset cifar10 downloads"),
    ],
)
def test_a_dataset_that_cannot_be_served_as_asked_is_refused(
    argv: list[str], says: str, tmp_path: Path, no_world: None
) -> None:
    empty = str(tmp_path)
    message = _refusal([a.format(empty=empty) for a in argv])
    assert message.startswith(f"launch.py: {says.format(empty=empty)}"), message


@pytest.mark.fast
@pytest.mark.skipif(data.fashion_mnist_dir(None) is not None, reason="Debian's Fashion-MNIST is installed")
def test_fashion_mnist_without_its_files_is_one_line(no_world: None) -> None:
    message = _refusal(["--dataset", "fashion-mnist"])
    assert message.startswith("launch.py: --dataset fashion-mnist: no idx files in /usr/share/datasets")


@pytest.mark.fast
def test_download_offline_is_one_line_that_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_world: None
) -> None:
    class Offline:
        def __init__(self, **kwargs: object) -> None:
            raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(data, "_cifar10", lambda verify_md5=True: Offline)  # what torchvision raises without network, at once
    message = _refusal(["--dataset", "cifar10", "--download", "--data-dir", str(tmp_path)])
    assert message.startswith(f"launch.py: --download: could not download CIFAR-10 into {tmp_path} ("), (
        message
    )
    assert "Name or service not known" in message and "cifar-10-python.tar.gz" in message


@pytest.mark.fast
@pytest.mark.parametrize("folder_was_there", [False, True])
def test_a_failed_download_takes_back_what_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_world: None, folder_was_there: bool
) -> None:
    root = tmp_path / "data"
    if folder_was_there:
        root.mkdir()
        (root / "notes.txt").write_text("mine")  # the user's own file stays

    class CutOff:  # torchvision makes the folder and starts the archive, then the network goes
        def __init__(self, *, root: str, **kwargs: object) -> None:
            Path(root).mkdir(parents=True, exist_ok=True)
            (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b half")
            raise urllib.error.URLError("Connection reset by peer")

    monkeypatch.setattr(data, "_cifar10", lambda verify_md5=True: CutOff)
    message = _refusal(["--dataset", "cifar10", "--download", "--data-dir", str(root)])
    assert "Connection reset by peer" in message, message
    if folder_was_there:
        assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]
    else:
        assert not root.exists(), sorted(root.iterdir())


@pytest.mark.fast
def test_the_cifar_message_speaks_to_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()  # there, but without its files
    with pytest.raises(RuntimeError) as raised:
        data.load_cifar10(tmp_path)
    assert "download=True" not in str(raised.value) and "--download" in str(raised.value)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["--algo", "ps", "--comm-option", "shards=2"],
            "--comm-option shards=2: algo='ps' takes no option 'shards'; its options are: ps_rank, ps_shards",
        ),
        (
            ["--algo", "ps", "--comm-option", "ps_shards=8"],
            "--comm-option ps_shards=8 is out of range",  # named once, not "ps_shards=8: ps_shards=8"
        ),
        (["--algo", "ring", "--comm-option", "window=0"], "--comm-option window=0: expected an integer >= 1"),
        (
            ["--algo", "auto", "--comm-option", "window=2"],
            "--comm-option window=2: algo='auto' takes no option",
        ),
        (["--comm-option", "window"], "--comm-option expects KEY=VALUE, got 'window'"),
        (
            ["--algo", "ddp", "--comm-option", "ps_shards=2"],
            "--comm-option ps_shards=2: --algo ddp uses DDP's",
        ),
        (
            ["--algo", "ddp", "--transport", "zmq"],
            "--transport zmq: --algo ddp uses DDP's built-in all-reduce",
        ),
        (["--algo", "ddp", "--comm-timeout", "5"], "--comm-timeout 5: --algo ddp uses DDP's built-in"),
        (["--backend", "nccl", "--device", "cpu"], "--backend nccl needs CUDA devices"),
    ],
)
def test_options_the_algo_refuses_or_ignores_are_refused(argv: list[str], says: str, no_world: None) -> None:
    message = _refusal(["--dataset", "synthetic", *argv])
    assert message.startswith(f"launch.py: {says}"), message


def test_a_refused_option_is_one_line_on_stderr_and_nothing_is_written(tmp_path: Path) -> None:
    """As a user sees it: the issue's ps example failed 14 s in, at the first backward, with a traceback."""
    start = time.monotonic()
    proc = run(
        [
            sys.executable,
            "launch.py",
            "--algo",
            "ps",
            "--comm-option",
            "shards=2",
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    options = ", ".join(ringcomm.algorithms.registry.ALGOS["ps"].defaults)  # the registry's list, in its order
    assert proc.stderr.splitlines() == [
        f"launch.py: --comm-option shards=2: algo='ps' takes no option 'shards'; its options are: {options}"
    ], proc.stderr
    assert proc.stdout == "" and not (tmp_path / "o").exists()
    assert time.monotonic() - start < 60


def _fake_checkpoint(path: Path, *, step: int, epoch: int, model: str = "simplecnn") -> None:
    """A file with every key ``checkpoint.load`` asks for (the launcher reads no more than those)."""
    ckpt = {key: None for key in checkpoint.KEYS}
    ckpt.update(model_name=model, step=step, epoch=epoch, batch_in_epoch=0)
    torch.save(ckpt, path)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["--max-steps", "6"],
            "nothing left to train: the checkpoint is at step 6 and --max-steps is 6; raise --max-steps",
        ),
        (["--max-steps", "4"], "nothing left to train: the checkpoint is at step 6 and --max-steps is 4"),
        (
            ["--max-steps", "0", "--epochs", "1"],
            "nothing left to train: the checkpoint has finished 1 epoch and --epochs is 1; raise --epochs",
        ),
        (["--model", "resnet18"], "the checkpoint is of --model simplecnn, not resnet18"),
    ],
)
def test_a_checkpoint_with_nothing_left_to_train_is_said_before_starting(
    argv: list[str], says: str, tmp_path: Path, no_world: None
) -> None:
    """The issue: this printed the old run's summary as new and named a checkpoint it had not written."""
    path = tmp_path / "checkpoint.pt"
    _fake_checkpoint(path, step=6, epoch=1)
    message = _refusal(["--dataset", "synthetic", "--resume", str(path), *argv])
    assert message.startswith(f"launch.py: --resume {path}: {says}"), message


@pytest.mark.fast
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path: Path, no_world: None) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    message = _refusal(["--dataset", "synthetic", "--resume", str(path)])
    assert message.startswith(f"launch.py: --resume {path}: not a trainer checkpoint (torch.load: "), message


def test_nothing_left_is_the_one_rule_for_the_launcher_and_the_loop() -> None:
    assert checkpoint.nothing_left(5, 0, epochs=1, max_steps=8) is None
    assert checkpoint.nothing_left(8, 1, epochs=2, max_steps=None) is None  # mid-way: epoch 1 of 2 next
    assert "at step 8 and --max-steps is 8" in (checkpoint.nothing_left(8, 0, epochs=1, max_steps=8) or "")
    assert "finished 2 epochs and --epochs is 2" in (
        checkpoint.nothing_left(8, 2, epochs=2, max_steps=None) or ""
    )


# --- a failed world: which rank first, and why ---------------------------------------------------


def _fail_in_turn(rank: int, world_size: int, delays: dict[int, float], messages: dict[int, str]) -> None:
    """Rank r sleeps ``delays[r]`` seconds, then raises ValueError(messages[r])."""
    time.sleep(delays[rank])
    raise ValueError(messages[rank])


@pytest.mark.timeout(120)
def test_the_rank_that_failed_first_is_named_first_and_not_said_to_have_died() -> None:
    """Rank 0 fails, rank 1 half a second later. Before: "rank 1 died with exit code 1 (then rank 0 ...)"."""
    with pytest.raises(WorldError) as raised:
        run_world(_fail_in_turn, 2, ({0: 0.0, 1: 0.5}, {0: "first", 1: "second"}), timeout=60)
    err = raised.value
    assert err.summary == "rank 0 failed: ValueError: first; then rank 1 failed: ValueError: second"
    assert err.rank == 0 and "Traceback" in err.traceback and "first" in err.traceback
    assert "died" not in str(err)


@pytest.mark.timeout(120)
def test_ranks_that_fail_alike_are_summed_up_once() -> None:
    with pytest.raises(WorldError) as raised:
        run_world(_fail_in_turn, 2, ({0: 0.3, 1: 0.0}, {0: "same", 1: "same"}), timeout=60)
    assert raised.value.summary == "rank 1 failed: ValueError: same; then rank 0 failed the same way"


def _die_or_wait(rank: int, world_size: int) -> None:
    """Rank 1 exits at once without a report (as if killed); rank 0 then fails on its own."""
    if rank == 1:
        os._exit(17)
    time.sleep(1.5)
    raise RuntimeError("peer gone")


@pytest.mark.timeout(120)
def test_a_rank_that_died_without_a_report_comes_first() -> None:
    with pytest.raises(WorldError) as raised:
        run_world(_die_or_wait, 2, timeout=60)
    summary = raised.value.summary
    assert summary.startswith("rank 1 died with exit code 17 (no error report)"), summary
    assert raised.value.rank == 1 and raised.value.traceback == ""


# --- the run summary names what it reports -------------------------------------------------------


def _metrics_for_summary(stopped: str | None) -> dict[str, object]:
    return {
        "algo": "ring",
        "world_size": 2,
        "model": "simplecnn",
        "dataset": "synthetic",
        "steps": 12,
        "global_batch_size": 32,
        "train_time_s": 3.0,
        "throughput_img_s": 128.0,
        "comm_time_s": 0.6,
        "comm_share": 0.2,
        "history": [
            {
                "epoch": 0,
                "step": 8,
                "complete": True,
                "train_steps": 8,
                "train_loss": 2.0,
                "test_accuracy": 0.3,
            },
            {
                "epoch": 1,
                "step": 12,
                "complete": False,
                "train_steps": 4,
                "train_loss": 1.5,
                "test_accuracy": 0.5,
            },
        ],
        "confusion_matrix": [[30, 2], [3, 29]],
        "checkpoint": "runs/x/checkpoint.pt",
        "stopped": stopped,
    }


@pytest.mark.fast
def test_the_summary_says_the_loss_is_the_last_epochs_mean_and_what_was_tested() -> None:
    text = launch.summary(_metrics_for_summary(None))
    assert "final train loss" not in text
    assert "epoch 1 (partial, to step 12): mean train loss 1.5000 over steps 9-12 |" in text
    assert "test accuracy 50.00% on 64 test images" in text
    assert text.startswith("done: ring x2") and "--resume" not in text
    assert "wrote runs/x/metrics.json and runs/x/checkpoint.pt (step 12)" in text


@pytest.mark.fast
def test_the_summary_of_a_run_resumed_mid_epoch_says_which_steps_its_mean_is_over() -> None:
    """Resumed at step 10 in epoch 1, the mean is over steps 11-12 only; it said "over its 2 steps"."""
    metrics = _metrics_for_summary(None)
    metrics["history"].insert(1, {**metrics["history"][1], "step": 10, "train_steps": 2})  # the first run's
    metrics["history"][-1]["train_steps"] = 2
    text = launch.summary(metrics)
    assert "mean train loss 1.5000 over steps 11-12 (since the resume at step 10) |" in text


@pytest.mark.fast
def test_the_summary_of_a_stopped_run_says_so_and_how_to_go_on() -> None:
    text = launch.summary(_metrics_for_summary("interrupted"))
    assert text.startswith("stopped early (Ctrl-C): ring x2")
    assert text.splitlines()[-1] == "  to continue: the same command with --resume runs/x/checkpoint.pt"
