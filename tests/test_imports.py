"""The supervisor's modules import without cycles at run time.

A module's run-time imports are its module-level ``import`` statements, outside
``if TYPE_CHECKING:`` blocks (imports inside functions run later, on first use).
Each module also imports by itself, in a fresh interpreter, before any other
supervisor module: no module works only because another one was imported first.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "supervisor"
OPTIONAL = {"supervisor.cluster", "supervisor.__main__"}  # Ray; the CLI runs on import


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
# Extension modules (supervisor._fuel): they import nothing of the package.
NATIVE = {f"supervisor.{p.name.split('.')[0]}" for p in PACKAGE.glob("*.so")}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _run_time_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Module-level statements that run at import, TYPE_CHECKING blocks left out."""
    statements: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                statements += _run_time_statements(node.body)
            statements += _run_time_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                statements += _run_time_statements(block)
            for handler in node.handlers:
                statements += _run_time_statements(handler.body)
        else:
            statements.append(node)
    return statements


def imports_of(name: str) -> set[str]:
    """The supervisor modules ``name`` imports at run time."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _run_time_statements(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # a submodule, or a name defined in ``base``
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES or sub in NATIVE else base)
    return {m for m in found if m in MODULES and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph`` (its modules, in order), or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle is not None:
            return cycle
    return None


def test_the_run_time_import_graph_has_no_cycle() -> None:
    graph = {name: imports_of(name) for name in MODULES}
    assert "supervisor.state" in graph["supervisor.cpu"]  # the walk sees relative imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_walk_leaves_type_checking_imports_out() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nelse:\n    import y\n"
    )
    kept = [n for n in _run_time_statements(tree.body) if isinstance(n, ast.Import)]
    assert [alias.name for n in kept for alias in n.names] == ["y"]


def _fresh_import(name: str, then: str = "") -> subprocess.CompletedProcess[str]:
    probe = f"import sys, importlib\nimportlib.import_module({name!r})\n{then}"
    return subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def package_import() -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``import supervisor`` in a fresh interpreter, and the supervisor modules it loaded."""
    done = _fresh_import("supervisor", "print(*(m for m in sys.modules if m[:10] == 'supervisor'))")
    return done, set(done.stdout.split())


@pytest.mark.parametrize("name", sorted(set(MODULES) - OPTIONAL))
def test_each_module_imports_first_in_a_fresh_interpreter(
    name: str, package_import: tuple[subprocess.CompletedProcess[str], set[str]]
) -> None:
    """Importing ``supervisor.X`` first runs the package's ``__init__``; for a module that
    ``__init__`` imports, that is the whole import, the same in every such fresh
    interpreter, so one run of ``import supervisor`` stands for all of them."""
    package, loaded = package_import
    assert package.returncode == 0, package.stderr[-2000:]
    if name in loaded:
        return
    done = _fresh_import(name)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_package_import_leaves_modules_for_their_own_fresh_import(
    package_import: tuple[subprocess.CompletedProcess[str], set[str]],
) -> None:
    """The shortcut above is sound: ``import supervisor`` did load most modules (the
    list came through), and not those that the package leaves for later use."""
    _, loaded = package_import
    assert {"supervisor", "supervisor.device", "supervisor.memory"} <= loaded
    assert "supervisor.testing" not in loaded and "supervisor.cli" not in loaded
