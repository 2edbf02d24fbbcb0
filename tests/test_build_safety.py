"""``supervisor build`` writes only its output: bad requests are refused before anything
runs, and a build that is interrupted, terminated or too slow leaves nothing behind.

A fake Zig (a ``ziglang`` package first on ``PYTHONPATH``) stands in for the compiler, so
these tests need no toolchain and control how long each step takes.
"""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor import cli, sdk
from supervisor.sdk import libm

ROOT = Path(__file__).resolve().parent.parent
HELLO_ELF = ROOT / "guests" / "hello.elf"
LIMIT = 60  # seconds: a bound for failing, never a wait for success
# The slow-link case's threshold: what it checks is that a link past the threshold says
# so, not the threshold's size; the fake's link runs past it (the build polls each second).
SLOW_LINK_STEP = 0.5
SLOW_STEP_MAIN = (
    "import sys; from supervisor import cli, sdk; sdk.SLOW_STEP = {}; "
    "sys.exit(cli.main(sys.argv[1:]))"
)

FAKE_ZIG = r"""
import os, subprocess, sys, time
args = sys.argv[1:]
if args == ["version"]:
    print("0.0.0-fake")
    sys.exit(0)
if args == ["env"]:
    cache = os.path.join(os.environ["FAKE_ZIG_DIR"], "cache")
    lib = os.path.join(os.environ["FAKE_ZIG_DIR"], "lib")
    print(f'.{{\n    .lib_dir = "{lib}",\n    .global_cache_dir = "{cache}",\n}}')
    sys.exit(0)
if args[0] == "ar":  # ar rcD ARCHIVE OBJECTS...
    open(args[2], "wb").close()
    sys.exit(0)
mode = os.environ["FAKE_ZIG_MODE"]
out = args[args.index("-o") + 1]
linking = "-c" not in args
if mode == "hang":  # a compiler with a child of its own, both stuck
    child = subprocess.Popen(["sleep", "300"])
    pids = os.path.join(os.environ["FAKE_ZIG_DIR"], "pids")
    with open(pids + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    os.replace(pids + ".tmp", pids)
    time.sleep(300)
if mode == "slowlink" and linking:  # past SLOW_LINK_STEP, at a poll of the build's wait
    time.sleep(2)
with open(out, "wb") as f:
    f.write(open(os.environ["FAKE_ZIG_ELF"], "rb").read() if linking else b"")
"""


@pytest.fixture
def fake_zig(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI run whose Zig is the fake, with its own TMPDIR."""
    package = tmp_path / "fakepath" / "ziglang"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_ZIG)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp_path / "cache").mkdir()
    math = tmp_path / "lib" / "libc" / "musl" / "src" / "math"  # what sdk/libm.py compiles
    math.mkdir(parents=True)
    for name in libm.LIBM_SOURCES:
        (math / f"{name}.c").write_text("")
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(tmp_path / "fakepath"), str(ROOT)]),
        LGUEST_TOOLCHAIN="zig",
        TMPDIR=str(tmp),
        FAKE_ZIG_DIR=str(tmp_path),
        FAKE_ZIG_ELF=str(HELLO_ELF),
        FAKE_ZIG_MODE="ok",
    )


def source(tmp_path: Path) -> Path:
    src = tmp_path / "prog.c"
    src.write_text("int main(void) { return 0; }\n")
    return src


def build_cli(
    *args: str, env: dict[str, str] | None = None, slow_step: float | None = None
) -> subprocess.CompletedProcess[str]:
    """``supervisor build ARGS`` in a child; ``slow_step``: its sdk.SLOW_STEP instead."""
    start = ["-m", "supervisor"]
    if slow_step is not None:
        start = ["-c", SLOW_STEP_MAIN.format(slow_step)]
    return subprocess.run(
        [sys.executable, *start, "build", *args],
        capture_output=True, text=True, timeout=LIMIT, env=env, cwd=ROOT,
    )  # fmt: skip


def build_main(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """``supervisor build ARGS`` in this process: for requests refused before anything
    runs, where no compiler (fake or real) is reached and the interpreter's start-up
    is all a subprocess would add (the tests above and below run the command line)."""
    capsys.readouterr()
    status = cli.main(["build", *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["build", *args], status, out, err)


def one_error_line(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("supervisor: error: "), proc.stderr
    assert fragment in lines[0], lines[0]


def test_the_fake_zig_builds(tmp_path: Path, fake_zig: dict[str, str]) -> None:
    out = tmp_path / "prog.elf"
    done = build_cli(str(source(tmp_path)), "-o", str(out), env=fake_zig)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:4] == b"\x7fELF"
    assert list(Path(fake_zig["TMPDIR"]).iterdir()) == []


def test_an_output_naming_a_source_is_refused_and_the_source_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = source(tmp_path)
    text = src.read_text()
    one_error_line(build_main(capsys, str(src), "-o", str(src)), "overwrite a source")
    os.link(src, tmp_path / "alias.c")  # the same file under another name
    other = tmp_path / "other.c"
    other.write_text(text)
    one_error_line(
        build_main(capsys, str(other), str(src), "-o", str(tmp_path / "alias.c")),
        "overwrite a source",
    )
    assert src.read_text() == text
    runtime = sdk.SDK_DIR / sdk.RUNTIME_SOURCES[1]
    one_error_line(build_main(capsys, str(other), "-o", str(runtime)), "overwrite a source")


@pytest.mark.parametrize(
    "flag",
    [
        "-Wp,-MD,dep.d", "-Wp,-MF,dep.d", "-Wl,-o,evil", "-Wa,-o,evil", "-Wl,-Map=map",
        "-Wa,-adhln=listing",
    ],
)  # fmt: skip
def test_flags_that_write_files_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    before = set(tmp_path.iterdir())
    proc = build_main(capsys, str(source(tmp_path)), "-o", str(tmp_path / "x.elf"), flag)
    one_error_line(proc, flag)
    assert set(tmp_path.iterdir()) == before | {tmp_path / "prog.c"}


@pytest.mark.parametrize(
    "flag",
    ["-MD", "-MMD", "-MF", "-save-temps", "-save-temps=obj", "-fdump-tree-all", "-o",
     "-Xlinker", "-fstack-usage", "@flags.txt", "-ftime-trace", "-gsplit-dwarf"],
)  # fmt: skip
def test_the_library_refuses_extra_flags_that_write_files(tmp_path: Path, flag: str) -> None:
    options = sdk.BuildOptions(extra_cflags=["-O2", flag])
    with pytest.raises(sdk.BuildInputError, match="write files"):
        sdk.build([source(tmp_path)], tmp_path / "x.elf", options)
    sdk.check_options(sdk.BuildOptions(extra_cflags=["-O2", "-Wall", "-DX=1", "-std=c11"]))


@pytest.mark.parametrize(
    ("stack", "fragment"),
    [("99999G", "outside 4K..256M"), ("junk", "bad size 'junk'"), ("1", "outside"),
     ("-4K", "bad size")],
)  # fmt: skip
def test_a_bad_stack_size_is_one_line_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stack: str, fragment: str
) -> None:
    out = tmp_path / "x.elf"
    proc = build_main(capsys, str(source(tmp_path)), "-o", str(out), f"--stack-size={stack}")
    one_error_line(proc, fragment)
    assert not out.exists()


def test_an_output_in_a_missing_directory_is_refused_not_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nonexistent" / "dir" / "a.elf"
    one_error_line(build_main(capsys, str(source(tmp_path)), "-o", str(out)), "no such dir")
    assert not (tmp_path / "nonexistent").exists()
    one_error_line(build_main(capsys, str(source(tmp_path)), "-o", str(tmp_path)), "directory")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_timeout_is_refused_at_parse_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    proc = build_main(
        capsys, str(source(tmp_path)), "-o", str(tmp_path / "x.elf"), f"--timeout={value}"
    )
    one_error_line(proc, "--timeout")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has been killed


def _started(tmp_path: Path, proc: subprocess.Popen[str]) -> list[int]:
    pids = tmp_path / "pids"
    deadline = time.monotonic() + LIMIT
    while not pids.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the fake compiler never started"
        time.sleep(0.05)
    return [int(p) for p in pids.read_text().split()]


def _gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + LIMIT
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize(
    ("signum", "status", "line"),
    [(signal.SIGTERM, 143, "supervisor: terminated"),
     (signal.SIGINT, 130, "supervisor: interrupted")],
)  # fmt: skip
def test_a_signal_kills_the_compiler_group_and_leaves_no_build_directory(
    tmp_path: Path, fake_zig: dict[str, str], signum: int, status: int, line: str
) -> None:
    fake_zig["FAKE_ZIG_MODE"] = "hang"
    build = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "build", str(source(tmp_path)), "-o",
         str(tmp_path / "x.elf")],
        env=fake_zig, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pids = _started(tmp_path, build)
        (work,) = Path(fake_zig["TMPDIR"]).iterdir()
        assert work.name.startswith("lguest-build-")
        build.send_signal(signum)
        _out, err = build.communicate(timeout=LIMIT)
    finally:
        build.kill()
    assert (build.returncode, err) == (status, line + "\n")
    assert list(Path(fake_zig["TMPDIR"]).iterdir()) == []
    assert _gone(pids), "the compiler or its child outlived the build"
    assert not (tmp_path / "x.elf").exists()


def test_a_build_past_its_timeout_is_one_line_and_kills_the_compiler(
    tmp_path: Path, fake_zig: dict[str, str]
) -> None:
    fake_zig["FAKE_ZIG_MODE"] = "hang"
    proc = build_cli(
        str(source(tmp_path)), "-o", str(tmp_path / "x.elf"), "--timeout", "1", env=fake_zig
    )
    one_error_line(proc, "took longer than 1 seconds (--timeout)")
    assert list(Path(fake_zig["TMPDIR"]).iterdir()) == []
    assert _gone([int(p) for p in (tmp_path / "pids").read_text().split()])


def test_the_first_link_and_a_slow_link_say_what_they_do_and_the_output_is_unchanged(
    tmp_path: Path, fake_zig: dict[str, str]
) -> None:
    src, note = str(source(tmp_path)), f"supervisor: {sdk.LIBC_NOTE}"
    first, quick, slow = (tmp_path / f"{name}.elf" for name in ("first", "quick", "slow"))
    done = build_cli(src, "-o", str(first), env=fake_zig)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0] == note  # before the link: this Zig never linked a guest
    assert len(done.stderr.splitlines()) == 2  # once: stderr is not a terminal
    assert (tmp_path / "cache" / "lguest-guest-libc-0.0.0-fake").exists()
    done = build_cli(src, "-o", str(quick), env=fake_zig)
    assert done.stderr.splitlines() == [f"built {quick} ({HELLO_ELF.stat().st_size} bytes)"]
    fake_zig["FAKE_ZIG_MODE"] = "slowlink"
    done = build_cli(src, "-o", str(slow), env=fake_zig, slow_step=SLOW_LINK_STEP)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0] == note  # a link that runs long says so too
    for out in (first, quick, slow):
        assert out.read_bytes() == HELLO_ELF.read_bytes()  # what the fake linked, as it was


def test_progress_on_a_terminal_updates_the_elapsed_time_in_place(tmp_path: Path) -> None:
    slow = sdk.Toolchain(cc=("sh", "-c", "sleep 2", "sh"), version="fake")
    master, slave = pty.openpty()
    with open(slave, "w") as terminal:  # shown from the start (note_after=0): at 0 s, 1 s, end
        slow.run([], tmp_path, None, "busy", terminal, note_after=0)
    shown = ""
    while not shown.endswith("\n"):  # a pty hands its bytes over asynchronously
        ready, _, _ = select.select([master], [], [], LIMIT)
        assert ready, f"no end of line from the progress: {shown!r}"
        shown += os.read(master, 4096).decode()
    os.close(master)
    assert shown.startswith("\rsupervisor: busy: 0:0") and shown.endswith("\r\n")  # pty: \n->\r\n
    assert shown.count("\r") >= 3  # rewritten each second, then the total
    quiet = io.StringIO()
    sdk.Toolchain(cc=("true",), version="fake").run([], tmp_path, None, "busy", quiet)
    assert quiet.getvalue() == ""  # a quick step says nothing (under the default note_after)


def test_the_library_refuses_the_same_requests(tmp_path: Path) -> None:
    src = source(tmp_path)
    with pytest.raises(sdk.BuildInputError, match="overwrite a source"):
        sdk.build([src], src)
    with pytest.raises(sdk.BuildInputError, match="no such directory"):
        sdk.build([src], tmp_path / "no" / "x.elf")
    with pytest.raises(sdk.BuildInputError, match="stack size"):
        sdk.build([src], tmp_path / "x.elf", sdk.BuildOptions(stack_size=1 << 40))
    with pytest.raises(sdk.BuildInputError, match="levels"):
        sdk.build([src], tmp_path / "x.elf", sdk.BuildOptions(optimize="2 -o x"))
    with pytest.raises(sdk.BuildInputError, match="timeout"):
        sdk.build([src], tmp_path / "x.elf", timeout=float("nan"))
    assert cli.main(["build", str(src), "-o", str(src)]) == 2
