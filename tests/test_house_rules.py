"""The house rules that the import graph cannot show, checked on the syntax tree.

The layering itself is a set of import-linter contracts (pyproject.toml,
``[tool.importlinter]``; ``lint-imports`` in .ci/run).  These tests check what is
not an import: a module reads no private attribute of another module, and only
``supervisor/_unicorn.py`` touches Unicorn's insides.
"""

from __future__ import annotations

import ast
from pathlib import Path

SUPERVISOR = Path(__file__).resolve().parent.parent / "supervisor"
# Standard-library names that start with an underscore and are public API.
PUBLIC_UNDERSCORED = frozenset({"_exit", "_getframe", "_fields_", "_replace", "_asdict", "_make"})
# Known breaches, each (file, attribute): none may be added without a reason beside it.
KNOWN_BREACHES: frozenset[tuple[str, str]] = frozenset()
# Unicorn's insides: its C library handle, an instance's native handle and bookkeeping,
# and the saved-context layout.
UNICORN_INTERNALS = frozenset(
    {"uclib", "_uch", "_Uc__finalizer", "_callbacks", "_hook_exception"}
    | {"context_save", "context_restore"}
)
UNICORN_PUBLIC_MODULES = frozenset({"unicorn", "unicorn.unicorn_const", "unicorn.x86_const"})


def modules() -> list[Path]:
    return sorted(SUPERVISOR.rglob("*.py"))


def own_names(tree: ast.Module) -> set[str]:
    """Every name the module defines: functions, classes, assigned names, and the
    attributes it assigns on ``self`` or ``cls``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    return names


def foreign_private_reads(path: Path) -> list[tuple[str, str]]:
    """``x._name`` where ``x`` is not ``self`` or ``cls`` and the module does not define
    ``_name``; ``from .module import _name`` of anything but a private module.  Each as
    (the name, where and how it is read)."""
    tree = ast.parse(path.read_text(), str(path))
    own = own_names(tree)
    private_modules = {p.stem for p in path.parent.glob("_*.py")} | {"_fuel"}
    found: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
            if not name.startswith("_") or name.startswith("__") or name in PUBLIC_UNDERSCORED:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if name not in own:
                found.append((name, f"{path.name}:{node.lineno}: {ast.unparse(node)}"))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            for alias in node.names:
                name = alias.name
                if name.startswith("_") and not name.startswith("__"):
                    if node.module is None and name in private_modules:
                        continue  # a private module of this package, imported whole
                    where = f"{path.name}:{node.lineno}: from {node.module} import {name}"
                    found.append((name, where))
    return found


def test_no_module_reads_a_private_attribute_of_another_module() -> None:
    found = []
    for path in modules():
        if path.name == "_unicorn.py":
            continue  # Unicorn's insides are its job (the next test)
        found += [
            where
            for name, where in foreign_private_reads(path)
            if (path.name, name) not in KNOWN_BREACHES
        ]
    assert found == []


def test_the_private_attribute_check_sees_reads_and_imports(tmp_path: Path) -> None:
    source = tmp_path / "tool.py"
    source.write_text(
        "from .cpu import _helper\n"
        "from . import _unicorn\n"
        "class Tool:\n"
        "    def __init__(self, file):\n"
        "        self._mine = file\n"
        "        self._mine._theirs = 1\n"
        "    def run(self, cpu):\n"
        "        return cpu._lg, self._mine, cpu.__class__, cpu._mine, _unicorn.handle\n"
    )
    (tmp_path / "_unicorn.py").write_text("")
    assert [where for _, where in foreign_private_reads(source)] == [
        "tool.py:1: from cpu import _helper",
        "tool.py:6: self._mine._theirs",
        "tool.py:8: cpu._lg",
    ]


def imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement names (``from unicorn import x86_const`` names
    ``unicorn.x86_const``; ``from unicorn import Uc`` names only ``unicorn``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    module = node.module or ""
    return [module] + [f"{module}.{a.name}" for a in node.names if a.name.islower()]


def unicorn_internals(path: Path) -> list[str]:
    """Imports of Unicorn's non-public modules, and uses of its internal names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            found += [
                f"{path.name}:{node.lineno}: imports {name}"
                for name in imported_modules(node)
                if name.split(".")[0] == "unicorn" and name not in UNICORN_PUBLIC_MODULES
            ]
        elif isinstance(node, ast.Attribute) and node.attr in UNICORN_INTERNALS:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Name) and node.id in UNICORN_INTERNALS:
            found.append(f"{path.name}:{node.lineno}: {node.id}")
    return found


def test_only_one_module_touches_unicorn_internals() -> None:
    found = [f for p in modules() if p.name != "_unicorn.py" for f in unicorn_internals(p)]
    assert found == []
    assert unicorn_internals(SUPERVISOR / "_unicorn.py")  # the check sees them there


def test_the_unicorn_check_sees_imports_and_names(tmp_path: Path) -> None:
    source = tmp_path / "engine.py"
    source.write_text(
        "import unicorn.unicorn_py3.unicorn\n"
        "from unicorn import Uc, UcError, x86_const, unicorn_py3\n"
        "from unicorn.unicorn_py3.unicorn import uclib\n"
        "from unicorn import unicorn_const as c\n"
        "def f(uc):\n"
        "    return uc._uch, uc.context_save(), uc.reg_read(1)\n"
    )
    assert unicorn_internals(source) == [
        "engine.py:1: imports unicorn.unicorn_py3.unicorn",
        "engine.py:2: imports unicorn.unicorn_py3",
        "engine.py:3: imports unicorn.unicorn_py3.unicorn",
        "engine.py:3: imports unicorn.unicorn_py3.unicorn.uclib",
        "engine.py:6: uc._uch",
        "engine.py:6: uc.context_save",
    ]
