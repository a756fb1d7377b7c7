"""The layout: every import between ringcomm's (and trainer's) modules, wherever it stands, forms no cycle.

Module-level imports and imports inside functions count alike: a late import that dodges a circle
hides the circle, it does not remove it. The only imports left out are those under
``if TYPE_CHECKING:`` (type hints, never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(60)  # reads files only; starts no process


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    # `from pkg import a, b`: a and b may be submodules or names; try both
    return [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in packages for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state:
                found = visit(dep, [*path, dep])
                if found:
                    return found
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            found = visit(name, [name])
            if found:
                return found
    return None


@pytest.mark.fast
@pytest.mark.parametrize("packages", [("ringcomm",), ("trainer",), ("ringcomm", "trainer", "analysis")])
def test_no_import_cycle_even_through_imports_inside_functions(packages: tuple[str, ...]) -> None:
    graph = import_graph(packages)
    assert len(graph) > 5, f"found only {sorted(graph)}"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.fast
def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.fast
def test_the_layers_are_folders() -> None:
    """The architecture reads from `ls`: transports, algorithms, runtime and tools each a folder."""
    for folder, some in {
        "transports": {"base.py", "torch.py", "zmq.py", "shm.py", "segments.py", "wire.py"},
        "algorithms": {"registry.py", "ring.py", "ring_pipelined.py", "rhd.py", "rd.py", "ps.py", "naive.py"},
        "runtime": {"session.py", "check.py", "board.py", "liveness.py", "comm_queue.py", "settings.py"},
        "tools": {"bench.py", "demo.py", "spawn.py", "cli.py"},
    }.items():
        present = {p.name for p in (ROOT / "ringcomm" / folder).glob("*.py")}
        assert some <= present, f"ringcomm/{folder}/ lacks {sorted(some - present)}"
    graph = import_graph(("ringcomm",))
    for name, deps in graph.items():
        if name.split(".")[1:2] in (["algorithms"], ["transports"], ["runtime"]):  # the library
            assert not {d for d in deps if d.startswith("ringcomm.tools")}, f"{name} imports a tool: {deps}"
