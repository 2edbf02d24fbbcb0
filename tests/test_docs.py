"""Every fenced code block of README.md, CONTRIBUTING.md and docs/*.md runs or is checked.

What each kind of block must do (the fence's language says the kind):

* ``python``: runs as a program in a temporary directory that has the repository's
  ``guests/`` (and a 64 KiB ``disk.img``), and exits 0 within the timeout.  A block
  whose first line is ``# test_NAME.py -- run with: python -m pytest ...`` is a test
  file: it is written under that name and pytest must pass it.
* ``sh``: each line that runs ``python -m supervisor`` or ``lguest-supervisor``
  (alone or at the end of a pipe) runs there, in order, and exits with the status its
  comment states (``# ... exit N``), 0 otherwise; other lines (``pip install``, ``gdb``,
  ``ray start``) are shown, not run.
* ``toml`` / ``json``: a config file, loaded as a :class:`GuestConfig`.
* ``console``: a session; each ``$ python -m supervisor ...`` command in it must parse.
* ``text`` (or no language): output or a diagram, shown as it is.

An HTML comment on the line before a fence adjusts it, ``<!-- doc-test: ... -->`` with
items separated by ``;``: ``fragment`` (Python that is part of a program: it must
compile, top-level ``await`` allowed), ``synopsis`` (a ``text`` block of usage lines:
every option in it exists and every option of each command is in it), ``needs ray``,
``needs gdb``, ``needs zig`` (skipped without it), ``skip REASON``.
Blocks that need Ray or Zig are marked ``slow``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import rayprocs

from supervisor import GuestConfig
from supervisor.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
TIMEOUT = 120  # seconds: a bound for failing, never a wait for success
FENCE = re.compile(r"^```(\S*)\s*$")
MARK = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
RUNS = re.compile(r"(?:^|\|\s*)(?:python -m supervisor|lguest-supervisor)\b")
EXIT = re.compile(r"#.*\bexit (?:status )?(\d+)\b")
PYTEST_FILE = re.compile(r"^# (test_\w+\.py) -- run with: python -m pytest")
KINDS = {"python", "sh", "toml", "json", "console", "text", ""}
NEEDS = {
    "ray": lambda: importlib.util.find_spec("ray") is not None,
    "gdb": lambda: shutil.which("gdb") is not None,
    "zig": lambda: importlib.util.find_spec("ziglang") is not None,
}
HELLO_C = '#include <stdio.h>\nint main(int argc, char **argv) { puts("hi"); return 0; }\n'


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    kind: str
    text: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_marks(comment: str) -> dict[str, str]:
    marks = {}
    for item in filter(None, (part.strip() for part in comment.split(";"))):
        key, _, value = item.partition(" ")
        marks[key] = value.strip()
    return marks


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the marks of the comment above each."""
    found = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        assert end is not None, f"{path}:{i + 1}: a fence that is never closed"
        mark = MARK.match(lines[i - 1]) if i else None
        marks = parse_marks(mark.group(1)) if mark else {}
        found.append(Block(path, i + 1, opening.group(1), "\n".join(lines[i + 1 : end]), marks))
        i = end + 1
    return found


ALL = [b for path in DOCUMENTS if path.exists() for b in blocks(path)]


def params() -> Sequence[object]:
    out = []
    for b in ALL:
        slow = b.marks.get("needs") in ("ray", "zig") or "slow" in b.marks
        out.append(pytest.param(b, id=b.name, marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """What the docs' examples assume: the repository's guests, a disk, a C source."""
    (tmp_path / "guests").symlink_to(ROOT / "guests")
    (tmp_path / "disk.img").write_bytes(bytes(64 << 10))
    (tmp_path / "prog.c").write_text(HELLO_C)
    (tmp_path / "hello.c").write_text(HELLO_C)
    return tmp_path


@pytest.fixture(scope="module")
def shared_ray() -> Iterator[dict[str, str]]:
    """One Ray (``ray start --head``, two CPUs) that the blocks on a cluster join in turn:
    each block's driver, with no address, joins it as a driver on a machine where
    ``ray start`` ran does, instead of starting a Ray of its own (most of such a
    block's time).  tests/test_cluster_ray.py checks that a driver starts its own."""
    pytest.importorskip("ray")
    with rayprocs.head_node(cpus=2) as env:
        yield env


def uses_ray(block: Block) -> bool:
    """Whether ``block`` runs a driver on a Ray cluster (joining one, or starting its own)."""
    return block.marks.get("needs") == "ray" or "supervisor.cluster" in block.text


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``python`` and ``lguest-supervisor`` are this interpreter's, as in its venv."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PYTEST_ADDOPTS", None)
    return env


def shell_commands(text: str) -> list[tuple[str, int]]:
    """The runnable lines of a ``sh`` block (continuations joined), with their status."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not RUNS.search(line.split("#", 1)[0]):
            continue
        status = EXIT.search(line)
        commands.append((line, int(status.group(1)) if status else 0))
    return commands


def help_options(command: str) -> list[set[str]]:
    """The options ``python -m supervisor COMMAND --help`` lists, each with its aliases."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    groups = []
    for line in out.getvalue().partition("options:")[2].splitlines():
        if line.startswith("  -"):
            names = {item.split()[0] for item in line.strip().split("  ")[0].split(", ")}
            groups.append(names - {"-h", "--help"})
    return [g for g in groups if g]


def check_synopsis(block: Block) -> None:
    documented: dict[str, set[str]] = {}
    commands: list[str] = []
    for line in block.text.splitlines():  # an indented line goes on the one above
        if line[:1].isspace() and commands:
            commands[-1] += " " + line
        else:
            commands.append(line)
    for line in commands:
        words = line.split()
        if words[:3] == ["python", "-m", "supervisor"] and len(words) > 3:
            options = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", " ".join(words[4:])))
            documented.setdefault(words[3], set()).update(options)
    assert documented, f"{block.name}: a synopsis with no command"
    for command, options in documented.items():
        groups = help_options(command)
        real = set().union(*groups)
        assert options <= real, f"{block.name}: {command} has no {sorted(options - real)}"
        lacking = [sorted(g) for g in groups if not g & options]
        assert not lacking, f"{block.name}: the {command} synopsis lacks {lacking}"


def check_console(block: Block) -> None:
    for line in block.text.replace("\\\n", " ").splitlines():
        if line.startswith("$ python -m supervisor "):
            args = shlex.split(line[len("$ python -m supervisor ") :])
            build_parser().parse_args(args)  # SystemExit(2) fails the test


def run_python(block: Block, workdir: Path, env: dict[str, str]) -> None:
    test_file = PYTEST_FILE.match(block.text)
    if test_file:
        (workdir / test_file.group(1)).write_text(block.text + "\n")
        command = [sys.executable, "-m", "pytest", "-q", test_file.group(1)]
    else:
        (workdir / "doc_example.py").write_text(block.text + "\n")
        command = [sys.executable, "doc_example.py"]
    done = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, f"{block.name}: exit {done.returncode}\n{done.stdout}{done.stderr}"


def run_shell(block: Block, workdir: Path, env: dict[str, str]) -> None:
    for command, status in shell_commands(block.text):
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == status, (
            f"{block.name}: `{command}` exited {done.returncode}, not {status}\n"
            f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )


def load_config(block: Block, workdir: Path) -> None:
    path = workdir / f"guest.{block.kind}"
    path.write_text(block.text + "\n")
    GuestConfig.load(path)  # ConfigError fails the test


def test_the_documents_have_blocks_of_every_runnable_kind() -> None:
    kinds = {b.kind for b in ALL}
    assert {"python", "sh", "toml"} <= kinds, kinds
    assert any(shell_commands(b.text) for b in ALL if b.kind == "sh")


@pytest.mark.parametrize("block", params())
def test_doc_block(block: Block, workdir: Path, request: pytest.FixtureRequest) -> None:
    assert block.kind in KINDS, f"{block.name}: unknown block kind {block.kind!r}"
    if "skip" in block.marks:
        pytest.skip(block.marks["skip"] or "marked skip")
    need = block.marks.get("needs")
    if need:
        assert need in NEEDS, f"{block.name}: unknown need {need!r}"
        if not NEEDS[need]():
            pytest.skip(f"needs {need}, which is not installed")
    if "fragment" in block.marks:
        assert block.kind == "python", f"{block.name}: only Python can be a fragment"
        compile(block.text, block.name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    elif "synopsis" in block.marks:
        check_synopsis(block)
    elif block.kind in ("python", "sh"):
        ray = uses_ray(block) and (block.kind == "python" or bool(shell_commands(block.text)))
        env = environment(request.getfixturevalue("shared_ray") if ray else None)
        (run_python if block.kind == "python" else run_shell)(block, workdir, env)
    elif block.kind in ("toml", "json"):
        load_config(block, workdir)
    elif block.kind == "console":
        check_console(block)


def test_the_ci_script_runs_the_readmes_test_command() -> None:
    two = next(b for b in ALL if b.path.name == "README.md" and "pytest -q" in b.text)
    command = next(line for line in two.text.splitlines() if "pytest" in line)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, f"{command!r} is not a line of .ci/run"


def test_the_first_command_needs_neither_ray_nor_zig() -> None:
    """``run guests/hello.img`` with the base dependencies: it imports no extra."""
    extras = {"ray", "ziglang"}
    code = (
        "import atexit, runpy, sys\n"
        f"atexit.register(lambda: print('LOADED', sorted({extras!r} & set(sys.modules)),"
        " file=sys.stderr))\n"
        "sys.argv = ['supervisor', 'run', 'guests/hello.img']\n"
        "runpy.run_module('supervisor', run_name='__main__', alter_sys=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Hello from an lguest guest!\n"
    assert "LOADED []" in done.stderr, done.stderr


SECTION_REF = re.compile(r"\b((?:docs/\w+|README|CONTRIBUTING)\.md),? \"([^\"]+)\"")
# A heading, or a paragraph's bold lead-in ("- **Guest stores.**  A store costs ...").
HEADING = re.compile(r"^(?:#+\s+(.*?)\s*|(?:[-*]\s+)?\*\*([^*]+)\*\*.*)$", re.MULTILINE)


def section_refs(text: str) -> list[tuple[str, str]]:
    """The ``docs/NAME.md, "Section"`` references in ``text``, across line breaks and
    the ``#`` of comment lines."""
    flat = " ".join(re.sub(r"\n\s*(?:#|\*|//)?\s*", " ", text).split())
    return SECTION_REF.findall(flat)


def test_every_reference_to_a_section_names_a_heading_of_that_document() -> None:
    """A reader sent to ``docs/X.md, "Section"`` finds a heading that contains it."""
    sources = [*DOCUMENTS, *(ROOT / "docs").glob("*.md")]
    for folder in ("supervisor", "examples", "benchmarks", "guests", "tests"):
        sources += [p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".c", ".h", ".S"}]
    missing = []
    for source in sorted(set(sources) - {Path(__file__).resolve()}):
        for document, section in section_refs(source.read_text(errors="replace")):
            target = ROOT / document
            found = HEADING.findall(target.read_text()) if target.exists() else []
            headings = [(heading or lead).replace("`", "") for heading, lead in found]
            if not any(section in heading for heading in headings):
                missing.append(f"{source.relative_to(ROOT)}: {document}, {section!r}")
    assert not missing, "\n".join(missing)


def test_the_section_reference_check_reads_wrapped_references() -> None:
    text = '(docs/performance.md,\n    # "Exact\n    # slices") and README.md "Two commands"'
    assert section_refs(text) == [
        ("docs/performance.md", "Exact slices"),
        ("README.md", "Two commands"),
    ]
