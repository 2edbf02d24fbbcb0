"""``python -m supervisor`` as a user runs it: real subprocesses, real exit statuses."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor.cli import main

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests"


def cli(*args: str, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_run_hello(loop: str) -> None:
    proc = cli("run", "guests/hello.img", "--loop", loop)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "Hello from an lguest guest!\n", "")


def test_run_hello_elf_with_options() -> None:
    proc = cli("run", "guests/hello.elf", "--memory", "2M", "--cmdline", "quiet")
    assert (proc.returncode, proc.stdout) == (0, "Hello from an lguest guest!\n")


def test_run_echo_through_stdin() -> None:
    proc = cli("run", "guests/echo.img", stdin="hi there\nquit\n")
    assert (proc.returncode, proc.stdout) == (0, "hi there\nquit\nbye\n")


def test_run_echo_stdin_eof() -> None:
    proc = cli("run", "guests/echo.img", stdin="no newline")
    assert (proc.returncode, proc.stdout) == (0, "no newline")


def test_run_blockcopy_exit_status_is_the_guests(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(16 * 512))
    proc = cli("run", "guests/blockcopy.img", "--block", str(disk), "--readonly")
    assert (proc.returncode, proc.stdout) == (3, "read-only block device\n")
    proc = cli("run", "guests/blockcopy.img", "--block", str(disk))
    assert (proc.returncode, proc.stdout) == (0, "blockcopy ok\n")


def test_run_with_config_file(tmp_path: Path) -> None:
    config = tmp_path / "ticker.toml"
    config.write_text(f'image = "{GUESTS / "ticker.img"}"\nmemory = "1M"\ncmdline = "ticks=2"\n')
    proc = cli("run", "--config", str(config), "--cmdline", "ticks=1 period_ms=1")
    assert (proc.returncode, proc.stdout) == (0, "tick 1\ndone\n")


def test_dead_guest_reports_reason_and_exits_1() -> None:
    proc = cli("run", "guests/faulty-badcall.img")
    assert proc.returncode == 1
    assert proc.stderr == "supervisor: faulty-badcall died: Bad hypercall 99\n"


def test_swarm_of_200_tickers_all_finish() -> None:
    proc = cli(
        "swarm",
        "-n",
        "200",
        "guests/ticker.img",
        "--memory",
        "1M",
        "--cmdline",
        "ticks=3 period_ms=1",
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "swarm of 200" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if re.search(r"\d\.\d\ds", line))
    assert re.findall(r"[\d,.]+s?", row)[:3] == ["200", "0", "0"]  # finished, failed, died
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    # Blocks: a column where they are counted, a note where they are not (never a 0).
    assert ("blocks/s" in proc.stdout) != ("blocks: not counted" in proc.stdout)


def test_swarm_reports_memory_and_paces_launches() -> None:
    started = time.perf_counter()
    proc = cli(
        "swarm", "-n", "6", "guests/hello.img", "--memory", "128K",
        "--launch-rate", "20", "--hibernate-after", "0",
    )  # fmt: skip
    took = time.perf_counter() - started
    assert proc.returncode == 0, proc.stderr
    head, row = (
        line for line in proc.stdout.splitlines() if "peak" in line or re.search(r"\d\.\d\ds", line)
    )
    assert "peak RSS" in head and "RSS/guest" in head and "peak alive" in head
    cells = [c.strip() for c in re.findall(r"[\d,.]+ ?(?:MiB|KiB|s)?", row)]
    assert cells[0] == "6"  # all finished
    assert any(c.endswith("MiB") for c in cells) and any(c.endswith("KiB") for c in cells)
    assert took >= 5 / 20  # six launches at 20 a second: the last one 0.25 s after the first
    bad = cli("swarm", "-n", "2", "guests/hello.img", "--launch-rate", "0")
    assert bad.returncode == 2
    assert bad.stderr == (
        "supervisor: error: argument --launch-rate: must be at least 0.000278 guests a "
        "second (one an hour) (see --help)\n"
    )


def test_swarm_counts_deaths() -> None:
    proc = cli("swarm", "-n", "3", "guests/faulty-crash.img", "--memory", "1M")
    assert proc.returncode == 1
    assert "died x3: CRASH: guest panic" in proc.stdout


BAD_INPUT = [
    (["run", "missing.img"], "image: no such file: missing.img"),
    (["run", sys.executable], "64-bit ELF images are not supported"),
    (["run", "README.md"], "README.md: not a guest image"),
    (["swarm", "-n", "2", "guests/hello.S"], "hello.S: not a guest image"),
    (["run", "guests/hello.img", "--memory", "lots"], "memory: bad size 'lots'"),
    (["run", "guests/hello.img", "--memory", "1000000"], "not a multiple"),
    (["run", "guests/hello.img", "--block", "nodisk"], "block: no such file: nodisk"),
    (["run", "--config", "nope.toml"], "cannot read config"),
    (["run"], "needs an IMAGE or --config"),
    (["run", "guests/hello.img", "--loop", "trio"], "invalid choice"),
    (["swarm", "-n", "0", "guests/hello.img"], "argument -n: must be at least 1"),
    (["swarm", "-n", "x", "guests/hello.img"], "argument -n: not an integer: 'x'"),
    (["launch"], "invalid choice"),
]
# Through ``python -m supervisor``, as a user runs it: one of each way a refusal is
# made (an image found bad, a config value, the parser); the others in this process,
# where the interpreter's start-up is all a subprocess would add.
AS_A_USER = (0, 4, 9)


@pytest.mark.parametrize(("args", "message"), [BAD_INPUT[i] for i in AS_A_USER])
def test_bad_input_is_one_line_and_status_2(args: list[str], message: str) -> None:
    proc = cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("supervisor: error: ")
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"), [b for i, b in enumerate(BAD_INPUT) if i not in AS_A_USER]
)
def test_more_bad_input_is_one_line_and_status_2(
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    status = main(args)
    out, err = capsys.readouterr()
    assert (status, out) == (2, ""), err
    assert err.count("\n") == 1 and message in err, err
    assert err.startswith("supervisor: error: ")


def test_bad_config_contents(tmp_path: Path) -> None:
    config = tmp_path / "g.toml"
    config.write_text('image = "../nowhere.img"\nspeed = 3\n')
    proc = cli("run", "--config", str(config))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "speed: unknown setting" in proc.stderr and "image: no such file" in proc.stderr


def test_swarm_console_prefix_prints_every_line_with_its_guest() -> None:
    proc = cli(
        "swarm", "-n", "3", "guests/ticker.img", "--memory", "1M",
        "--cmdline", "ticks=2 period_ms=1", "--console", "prefix",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for i in range(3):
        mine = [line for line in lines if line.startswith(f"ticker-{i}: ")]
        assert mine == [f"ticker-{i}: tick 1", f"ticker-{i}: tick 2", f"ticker-{i}: done"]


def test_swarm_console_tail_keeps_the_last_lines_in_a_table() -> None:
    proc = cli(
        "swarm", "-n", "2", "guests/ticker.img", "--memory", "1M",
        "--cmdline", "ticks=4 period_ms=1", "--console", "tail", "--tail-lines", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "last console lines" in proc.stdout
    table = proc.stdout[proc.stdout.index("last console lines") :]
    assert table.count("tick 4") == 2 and table.count("done") == 2
    assert "tick 3" not in table
