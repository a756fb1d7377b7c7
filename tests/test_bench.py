"""Specification of ``ringcomm.bench``: its size and label grammar, and the JSON document it writes.

The torchrun path is run in this process as a world of one rank (the environment torchrun would
set, a free port): it starts no process.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ringcomm.tools import bench


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def as_torchrun_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The environment torchrun gives rank 0 of a one-rank world."""
    for key, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # bench pins a rank to one thread
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.fast
@pytest.mark.timeout(60)
def test_json_under_torchrun_records_the_world_torchrun_started(
    as_torchrun_rank: None, tmp_path: Path
) -> None:
    # --world-size is not given (torchrun chose the world); its default, 4, is not what ran.
    out = tmp_path / "bench.json"
    argv = ["--sizes", "4K", "--algos", "gloo", "--reps", "2", "--warmup", "0", "--sample-s", "0.001"]
    rows = bench.main([*argv, "--json", str(out)])
    doc = json.loads(out.read_text())
    assert doc["world_size"] == 1
    assert [r["world_size"] for r in doc["rows"]] == [1] == [r["world_size"] for r in rows]
    assert doc["machine"] == bench.machine_info()


@pytest.mark.timeout(60)
def test_a_world_size_that_contradicts_torchrun_is_refused(
    as_torchrun_rank: None, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--world-size", "4", "--sizes", "4K", "--algos", "gloo"])
    err = capsys.readouterr().err
    assert "--world-size 4" in err and "1" in err and "torchrun" in err
    assert not dist.is_initialized()


@pytest.mark.fast
@pytest.mark.parametrize(
    ("text", "default", "spec"),
    [
        ("ring", "torch", bench.AlgoSpec("ring", "ring", "torch")),
        ("ring", "zmq", bench.AlgoSpec("ring@zmq", "ring", "zmq")),  # a row says its transport
        ("ring@zmq", "torch", bench.AlgoSpec("ring@zmq", "ring", "zmq")),
        ("ring@torch", "zmq", bench.AlgoSpec("ring@torch", "ring", "torch")),
        ("ps:2", "torch", bench.AlgoSpec("ps:2", "ps", "torch", 2)),
        ("ps:2@zmq", "torch", bench.AlgoSpec("ps:2@zmq", "ps", "zmq", 2)),
        ("ps", "zmq", bench.AlgoSpec("ps@zmq", "ps", "zmq", None)),
        ("gloo", "zmq", bench.AlgoSpec("gloo", "gloo", "torch")),  # torch.distributed's own
    ],
)
def test_algo_spec_parses_the_label_grammar(text: str, default: str, spec: bench.AlgoSpec) -> None:
    assert bench.AlgoSpec.parse(text, default) == spec
    # A row's label read back (as analysis.fit does, default torch) gives the same entry.
    assert bench.AlgoSpec.parse(spec.label) == spec


@pytest.mark.fast
def test_algo_spec_options_are_what_ringcomm_all_reduce_takes() -> None:
    assert bench.AlgoSpec.parse("ps:3").options == {"ps_shards": 3}
    assert bench.AlgoSpec.parse("ps").options == {} == bench.AlgoSpec.parse("ring@zmq").options


@pytest.mark.fast
@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "NAME[+overlap][:K][@TRANSPORT]"),
        ("@zmq", "NAME[+overlap][:K][@TRANSPORT]"),
        ("ring@", "NAME[+overlap][:K][@TRANSPORT]"),
        ("ring:2", "ps:2"),
        ("ps:0", "K >= 1"),
        ("ps:two", "K >= 1"),
        ("ps:", "K >= 1"),
        ("gloo@zmq", "no transport"),
    ],
)
def test_algo_spec_refuses_bad_labels_and_says_which(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=f"{text!r}.*{re.escape(says)}"):
        bench.AlgoSpec.parse(text)


@pytest.mark.fast
def test_cli_refuses_a_bad_label_before_starting_a_world(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--world-size", "2", "--algos", "gloo,ring:2"])
    assert "--algos: algorithm 'ring:2'" in capsys.readouterr().err


@pytest.mark.fast
@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("64K", 65536), ("1M", 1 << 20), ("1MiB", 1 << 20), ("1.5k", 1536), ("3G", 3 << 30), ("4096", 4096)],
)
def test_parse_size_reads_powers_of_1024(text: str, nbytes: int) -> None:
    assert bench.parse_size(text) == nbytes


def test_machine_info_describes_this_machine_without_a_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_subprocess(*a: object, **k: object) -> None:
        raise AssertionError("machine_info must not start a process (it runs beside a live world)")

    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    info = bench.machine_info()
    assert info["cpus"] == os.cpu_count() and info["torch"] == torch.__version__
    assert info["python"] == platform.python_version() and info["platform"].startswith(platform.system())


@pytest.mark.fast
def test_the_overlapped_parameter_server_has_a_label_of_its_own() -> None:
    spec = bench.AlgoSpec.parse("ps+overlap:4", "shm")
    assert (spec.label, spec.algo, spec.transport) == ("ps+overlap:4@shm", "ps", "shm")
    assert spec.options == {"ps_shards": 4, "ps_overlap": True}
    for text in ("ring+overlap", "ps+fast"):
        with pytest.raises(ValueError, match=re.escape("the one modifier is ps+overlap")):
            bench.AlgoSpec.parse(text)


# --- command-line mistakes (issue 15): one line, status 2, before any worker starts ---------------


@pytest.mark.fast
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--sizes", "1X"], "--sizes: '1X' is not a size"),
        (["--sizes", "0"], "--sizes: '0': a size must be at least 1 byte"),
        (["--sizes", ","], "--sizes: the list is empty"),
        (["--world-size", "0"], "--world-size must be at least 1, got 0"),
        (["--algos", "gloo,rign"], "--algos: algorithm 'rign': unknown 'rign'; expected one of gloo, ring"),
        (["--algos", "ring@tcp"], "--algos: algorithm 'ring@tcp': unknown transport 'tcp'"),
        (["--reps", "0"], "--reps must be at least 1, got 0"),
        (["--json", "/no/such/folder/b.json"], "--json /no/such/folder/b.json: no folder"),
        # --transports is --tune's: without it, it used to be ignored (a full default run followed)
        (["--transports", "zmq,foo"], "--transports zmq,foo: unknown foo"),
        (["--transports", "zmq"], "--transports zmq: only --tune reads it"),
        (["--tune", "--algos", "ring"], "--algos ring: --tune times auto's own candidates"),
        (["--tune", "--transport", "zmq"], "--transport zmq: --tune times auto's own candidates"),
    ],
)
def test_command_line_mistakes_are_one_line_before_any_worker_starts(
    argv: list[str], says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import ringcomm.tools.spawn

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("bench started workers for a command it should have refused")

    monkeypatch.setattr(ringcomm.tools.spawn, "run_world", refuse)
    with pytest.raises(SystemExit) as raised:
        bench.main(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"python -m ringcomm.bench: {says}"), err
    assert "Traceback" not in err


def test_a_near_miss_algorithm_gets_a_suggestion(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--algos", "gloo,rign"])
    assert "did you mean ring?" in capsys.readouterr().err


@pytest.mark.fast
def test_help_shows_every_default_and_no_backticks(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as raised:
        bench.main(["--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())
    assert "``" not in text
    for option, default in [
        ("--sizes", "64K,1M,16M,64M"),
        ("--algos", "gloo,ring,naive"),
        ("--transport", "torch"),
        ("--dtype", "float32"),
        ("--reps", "15"),
        ("--warmup", "3"),
        ("--sample-s", "0.02"),
        ("--time-limit", "1800"),  # also --timeout
        ("--transports", "torch,zmq,shm"),
    ]:
        block = " ".join(out.split(f"\n  {option} ", 1)[1].split("\n  --", 1)[0].split())
        assert f"(default: {default})" in block, (option, block)
    assert "(default: None)" not in text and "(default: False)" not in text


# --- --collective (issue 22): every collective timed against Gloo's own, busbw by nccl-tests ------


def test_busbw_factors_are_nccl_tests() -> None:
    from ringcomm.cost import busbw, busbw_factor

    assert busbw_factor(4, "all_reduce") == 2 * 3 / 4
    assert busbw_factor(4, "all_gather") == busbw_factor(4, "reduce_scatter") == 3 / 4
    assert busbw_factor(4, "broadcast") == 1.0
    assert busbw(4, 8e9, 2.0) == busbw(4, 8e9, 2.0, "all_reduce") == 4.0 * 1.5  # all_reduce's, as before
    with pytest.raises(ValueError, match="'gather'"):
        busbw_factor(4, "gather")


def test_the_command_lines_collective_names_are_the_registrys() -> None:
    from ringcomm.algorithms.collectives import COLLECTIVE_ALGOS, POWER_OF_TWO_ONLY
    from ringcomm.algorithms.registry import ALGOS
    from ringcomm.names import COLLECTIVE_ALGO_NAMES

    assert COLLECTIVE_ALGO_NAMES == {"all_reduce": tuple(ALGOS)} | {c: tuple(a) for c, a in COLLECTIVE_ALGOS.items()}
    assert bench._POWER_OF_TWO_ONLY == set(POWER_OF_TWO_ONLY)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--collective", "broadcast", "--algos", "gloo,rd"],
         "--algos: algorithm 'rd': unknown 'rd' for broadcast; expected one of gloo, ring, tree, auto"),
        (["--collective", "all_gather", "--algos", "ps:2"], "--algos: algorithm 'ps:2': unknown 'ps' for all_gather"),
        (["--collective", "all_gather", "--world-size", "3", "--algos", "gloo,rd"],
         "--algos: all_gather algo 'rd' needs a power-of-two world size, not 3"),
        (["--collective", "gather"], "argument --collective: invalid choice: 'gather'"),
        (["--collective", "broadcast", "--tune"], "--collective broadcast: --tune fits all_reduce's algorithms only"),
    ],
)  # fmt: skip
def test_a_collectives_mistakes_are_one_line_before_any_worker_starts(
    argv: list[str], says: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import ringcomm.tools.spawn

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("bench started workers for a command it should have refused")

    monkeypatch.setattr(ringcomm.tools.spawn, "run_world", refuse)
    with pytest.raises(SystemExit) as raised:
        bench.main(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"python -m ringcomm.bench: {says}"), err


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("collective", "other", "factor"),
    [("all_gather", "rd", 1 / 2), ("reduce_scatter", "rhd", 1 / 2), ("broadcast", "tree", 1.0)],
)
def test_each_collective_is_timed_against_gloos_own_in_one_world(
    collective: str, other: str, factor: float, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """P = 2, 64 bytes per rank: every row right (#wrong 0 against Gloo's), M and busbw by nccl-tests."""
    out = tmp_path / "b.json"
    argv = ["--collective", collective, "--world-size", "2", "--sizes", "64,96", "--reps", "1", "--warmup", "0",
            "--sample-s", "0", "--algos", f"gloo,ring,{other}@shm,auto", "--json", str(out), "--timeout", "240"]  # fmt: skip
    bench.main(argv)
    doc = json.loads(out.read_text())
    assert doc["collective"] == collective and doc["world_size"] == 2
    rows = doc["rows"]
    assert [(r["size_bytes"], r["algo"]) for r in rows] == [
        (s, a) for s in (64, 96) for a in ("gloo", "ring", f"{other}@shm", "auto")
    ]
    per_rank = {"all_gather": 2, "reduce_scatter": 2, "broadcast": 1}[collective]  # M over the bytes per rank
    for r in rows:
        assert r["collective"] == collective and r["wrong"] == 0, r
        assert r["count"] == r["size_bytes"] // 4 and r["total_bytes"] == per_rank * r["size_bytes"], r
        assert r["algbw_gbs"] == pytest.approx(r["total_bytes"] / (r["time_us"] * 1e-6) / 1e9)
        assert r["busbw_gbs"] == pytest.approx(r["algbw_gbs"] * factor)
    autos = [r for r in rows if r["algo"] == "auto"]
    assert all(r["choice"] in ("ring", other) and r["predicted_us"] > 0 for r in autos), autos
    printed = capfd.readouterr().out  # rank 0's table comes from its own process
    assert f"# ringcomm.bench: {collective} world_size=2" in printed
    assert printed.count("# auto took ") == 2
