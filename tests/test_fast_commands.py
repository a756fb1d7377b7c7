"""Commands answer at once (issue 20, item 2): nothing a command needs to parse imports torch.

``--help`` and a mistyped option of every command run here in a subprocess where
``torch``, ``numpy`` and ``matplotlib`` are poisoned (``sys.modules[name] = None``): a
command that imported any of them before parsing would fail with ImportError and a
traceback, not exit 0 or 2. No timing is asserted:
what is checked is the import that would cost the time.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import launch
import ringcomm
import ringcomm.names
import trainer.names
from ringcomm import ops
from ringcomm.tools import cli
from ringcomm.transports import base as transport
from trainer import checkpoint, data, loop, models

ROOT = Path(__file__).resolve().parents[1]

#: Every command a user types, as argv after the interpreter.
COMMANDS = [
    ["launch.py"],
    ["-m", "ringcomm.bench"],
    ["-m", "ringcomm.demo"],
    ["-m", "analysis.benchtable"],
    ["-m", "analysis.cluster"],
    ["-m", "analysis.reliability"],
    ["-m", "analysis.report"],
    ["-m", "analysis.sweep"],
    ["-m", "analysis.timeline"],
]

# Runs a command as `python launch.py ...` / `python -m mod ...` would, with the heavy modules poisoned.
_POISONED = """
import runpy, sys
for heavy in ("torch", "numpy", "matplotlib"):
    sys.modules[heavy] = None  # any import of it raises ImportError
what, *rest = sys.argv[1:]
if what == "-m":
    module, *rest = rest
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
else:
    sys.argv = [what, *rest]
    runpy.run_path(what, run_name="__main__")
"""


def _run_poisoned(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _POISONED, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.fast
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[-1])
def test_help_answers_without_torch(command: list[str]) -> None:
    proc = _run_poisoned([*command, "--help"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ") and "Traceback" not in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.fast
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[-1])
def test_a_bad_option_is_one_line_and_status_2_without_torch(command: list[str]) -> None:
    proc = _run_poisoned([*command, "--no-such-option"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].endswith("(--help lists the options)"), proc.stderr


@pytest.mark.fast
@pytest.mark.parametrize(
    "command",
    [["launch.py", "--max-steps", "1"], ["-m", "ringcomm.bench"], ["-m", "ringcomm.demo"]],
    ids=lambda c: c[-1],
)
def test_a_bad_start_method_is_one_line_before_any_worker_starts(command: list[str]) -> None:
    """RINGCOMM_START (forkserver, the default, or spawn) says how the commands' worlds start their ranks."""
    env = {**os.environ, "RINGCOMM_START": "fork"}
    proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "RINGCOMM_START='fork': expected one of forkserver, spawn" in lines[0], proc.stderr
    assert proc.stdout == "", proc.stdout  # no header, no step: nothing ran


@pytest.mark.fast
def test_import_ringcomm_leaves_torch_out_until_a_collective_is_touched() -> None:
    proc = _python(
        "import sys, ringcomm\n"
        "assert 'torch' not in sys.modules, 'import ringcomm'\n"
        "ringcomm.CommError, ringcomm.PeerError, ringcomm.DEFAULT_TIMEOUT_S\n"  # torch-free names
        "assert 'torch' not in sys.modules, 'the errors'\n"
        "ringcomm.all_reduce\n"
        "assert 'torch' in sys.modules and 'ringcomm.api' in sys.modules\n"
        "print('ok')"
    )
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@pytest.mark.fast
def test_every_public_name_of_the_package_resolves() -> None:
    from ringcomm import api, errors
    from ringcomm.algorithms import registry
    from ringcomm.runtime import comm_queue, session

    expected = {
        "ALGOS": registry.ALGOS,
        "all_reduce": api.all_reduce,
        "all_reduce_async": api.all_reduce_async,
        "comm_stats": api.comm_stats,
        "init": api.init,
        "explain_auto": api.explain_auto,
        "CommStats": comm_queue.CommStats,
        "CommError": errors.CommError,
        "shutdown": session.shutdown,
        "Transport": transport.Transport,
        "transport_names": transport.transport_names,
    }
    for name in ringcomm.__all__:
        assert getattr(ringcomm, name) is not None, name
    for name, value in expected.items():
        assert getattr(ringcomm, name) is value, name
    assert set(ringcomm.__all__) <= set(dir(ringcomm))
    assert ringcomm.runtime.trace.__name__ == "ringcomm.runtime.trace"  # a submodule, as when the root imported it
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        ringcomm.no_such_name  # noqa: B018


@pytest.mark.fast
def test_a_transport_module_imported_alone_still_finds_every_transport() -> None:
    """The root no longer imports the transports; the registry does, when it is first asked."""
    proc = _python(
        "from ringcomm.transports.base import transport_kind, transport_names\n"
        "print(transport_names(), transport_kind('shm').name)"
    )
    assert proc.stdout.split() == ["('shm',", "'torch',", "'zmq')", "shm"], proc.stdout + proc.stderr


# --- one source for every name a command offers -------------------------------------------------


@pytest.mark.fast
def test_the_registries_are_built_from_the_torch_free_names() -> None:
    assert tuple(ringcomm.ALGOS) == ringcomm.names.ALGO_NAMES
    assert ringcomm.transport_names() == ringcomm.names.TRANSPORT_NAMES
    assert ops.OPS is ringcomm.names.OP_NAMES
    assert tuple(models.MODELS) == trainer.names.MODEL_NAMES
    assert data.DATASETS is trainer.names.DATASET_NAMES
    assert loop.SCHEDULES is trainer.names.SCHEDULE_NAMES
    assert checkpoint.CHECKPOINT_NAME is trainer.names.CHECKPOINT_NAME
    assert loop.METRICS_NAME is trainer.names.METRICS_NAME


@pytest.mark.fast
def test_the_builtin_transports_are_the_names_the_commands_offer() -> None:
    """A user's own transport registers beside them (test_api); the built-ins are exactly the list."""
    assert set(transport._builtin_kinds()) == set(ringcomm.names.TRANSPORT_NAMES)


def test_launch_keeps_no_copy_of_a_registry() -> None:
    """launch.py's names are the torch-free modules' own objects, and it assigns none of them itself."""
    for name, source in [
        ("ALGO_NAMES", ringcomm.names),
        ("TRANSPORT_NAMES", ringcomm.names),
        ("MODEL_NAMES", trainer.names),
        ("DATASET_NAMES", trainer.names),
        ("SCHEDULE_NAMES", trainer.names),
        ("CHECKPOINT_NAME", trainer.names),
        ("METRICS_NAME", trainer.names),
    ]:
        assert getattr(launch, name) is getattr(source, name), name
    tree = ast.parse((ROOT / "launch.py").read_text())
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
    assert not assigned & {"ALGO_NAMES", "TRANSPORT_NAMES", "MODEL_NAMES", "DATASET_NAMES", "SCHEDULE_NAMES"}


@pytest.mark.fast
def test_every_command_uses_the_one_parser() -> None:
    """No command defines its own ArgumentParser or HelpFormatter: ringcomm/tools/cli.py is the one."""
    files = [ROOT / "launch.py", ROOT / "ringcomm" / "bench.py", ROOT / "ringcomm" / "demo.py"]
    files += sorted((ROOT / "analysis").glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert not any("ArgumentParser" in b or "HelpFormatter" in b for b in bases), (path, node.name)
    assert issubclass(cli.Parser, argparse.ArgumentParser)


@pytest.mark.fast
def test_the_analysis_parses_labels_without_torch_and_training_imports_neither_bench_nor_torchvision() -> None:
    proc = _python(
        "import sys\n"
        "import analysis.cluster_report, analysis.fit, analysis.results, analysis.tables\n"
        "from ringcomm.names import AlgoSpec\n"
        "assert AlgoSpec.parse('ps:2', 'zmq').label == 'ps:2@zmq'\n"
        "assert 'torch' not in sys.modules, 'analysis'\n"
        "import trainer.loop\n"
        "assert 'ringcomm.bench' not in sys.modules, 'trainer.loop imports the bench'\n"
        "from trainer.data import load_dataset\n"
        "from trainer.models import build_model\n"
        "load_dataset('synthetic', None, synthetic_size=(20, 5)).train[0]\n"
        "build_model('simplecnn')\n"
        "assert 'torchvision' not in sys.modules, 'a synthetic SimpleCNN run imports torchvision'\n"
        "print('ok')"
    )
    assert proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@pytest.mark.fast
def test_machine_info_names_the_same_torch_with_or_without_importing_it() -> None:
    proc = _python(
        "import sys\n"
        "from ringcomm.tools.machine import machine_info\n"
        "before = machine_info()['torch']\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "print(before == torch.__version__ == machine_info()['torch'], before)"
    )
    assert proc.stdout.startswith("True "), proc.stdout + proc.stderr
