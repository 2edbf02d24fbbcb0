"""The command line's edges: numbers checked as they are parsed, a reader that goes
away, SIGTERM, the program's name and the swarm's blocks column."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import _slicing, engines, host, sdk
from supervisor import cli as cli_module
from supervisor.cli import main as cli_main
from supervisor.cpu import DEFAULT_TCG_BUFFER

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 60  # seconds: a bound for failing, never a wait for success
ENDLESS = ["guests/ticker.img", "--memory", "1M", "--cmdline", "ticks=10000000 period_ms=1"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=LIMIT, env=env,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "guests/hello.img", "--hibernate-after", "-1"], "--hibernate-after: must be"),
        (["run", "guests/hello.img", "--hibernate-after", "nan"], "--hibernate-after: must be"),
        (["run", "guests/hello.img", "--hibernate-after", "1e300"], "--hibernate-after: must"),
        (["run", "guests/hello.img", "--hibernate-after", "soon"], "not a number: 'soon'"),
        (["run", "guests/hello.img", "--max-run-time", "nan"], "--max-run-time: must be"),
        (["run", "guests/hello.img", "--max-run-time", "0"], "--max-run-time: must be"),
        (["run", "guests/hello.img", "--max-blocks", "0"], "--max-blocks: must be at least 1"),
        (["run", "guests/hello.img", "--console-rate", "-5"], "--console-rate: must be"),
        (["run", "guests/hello.img", "--cpus", "0"], "--cpus: must be from 1 to"),
        (["run", "guests/hello.img", "--cpus", "999"], "--cpus: must be from 1 to"),
        (["snapshot", "guests/hello.img", "-o", "x", "--after", "-1"], "--after: must be"),
        (["snapshot", "guests/hello.img", "-o", "x", "--after-lines", "-1"], "--after-lines"),
        (["swarm", "guests/hello.img", "--launch-rate", "1e-300"], "--launch-rate: must be"),
        (["swarm", "guests/hello.img", "--launch-rate", "inf"], "--launch-rate: must be"),
        (["swarm", "guests/hello.img", "--max-alive", "0"], "--max-alive: must be at least 1"),
        (["swarm", "guests/hello.img", "--tail-lines", "0"], "--tail-lines: must be"),
        (["swarm", "guests/hello.img", "--gdb-guest", "-1"], "--gdb-guest: must be at least 0"),
        (["swarm", "guests/hello.img", "--workers", "0"], "--workers: must be at least 1"),
        (["swarm", "guests/hello.img", "--checkpoint-every", "inf"], "--checkpoint-every"),
    ],
)  # fmt: skip
def test_numbers_are_checked_as_they_are_parsed(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The parser's own checks, in this process (tests/test_cli.py runs bad input
    through ``python -m supervisor`` as a user does)."""
    status = cli_main(args)
    out, err = capsys.readouterr()
    assert (status, out) == (2, ""), err
    assert err.startswith("supervisor: error: argument ")
    assert err.count("\n") == 1 and message in err, err


def test_hibernate_after_off_and_zero_are_accepted() -> None:
    for value in ("off", "0"):
        proc = cli("run", "guests/hello.img", "--hibernate-after", value)
        assert (proc.returncode, proc.stdout) == (0, "Hello from an lguest guest!\n"), proc.stderr


def test_swarm_console_prefix_into_a_closed_pipe_ends_quietly_with_141() -> None:
    swarm = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "swarm", "-n", "3", *ENDLESS, "--console", "prefix"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert swarm.stdout is not None and swarm.stderr is not None
        assert ": tick 1" in swarm.stdout.readline()
        swarm.stdout.close()  # like `| head -1`: the reader goes away
        swarm.wait(timeout=LIMIT)  # guests that tick for hours: only a stop ends it
        err = swarm.stderr.read()
    finally:
        swarm.kill()
    assert (swarm.returncode, err) == (141, "")


def _start(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert "tick 1" in proc.stdout.readline()  # running
    return proc


@pytest.mark.parametrize(
    ("signum", "status", "line"),
    [(signal.SIGTERM, 143, "supervisor: terminated\n"),
     (signal.SIGINT, 130, "supervisor: interrupted\n")],
)  # fmt: skip
def test_a_stopped_swarm_prints_its_table(signum: int, status: int, line: str) -> None:
    swarm = _start("swarm", "-n", "3", *ENDLESS, "--console", "prefix", "--max-alive", "2")
    try:
        swarm.send_signal(signum)
        out, err = swarm.communicate(timeout=LIMIT)
    finally:
        swarm.kill()
    assert (swarm.returncode, err) == (status, line)
    assert "swarm of 3" in out
    assert "interrupted: 2 guests stopped, 1 never launched" in out


def test_sigterm_stops_run_with_143() -> None:
    run = _start("run", *ENDLESS)
    try:
        run.send_signal(signal.SIGTERM)
        _out, err = run.communicate(timeout=LIMIT)
    finally:
        run.kill()
    assert (run.returncode, err) == (143, "supervisor: terminated\n")


def test_sigterm_works_where_sigint_is_ignored() -> None:
    """A background job of a non-interactive shell ignores SIGINT; SIGTERM must not care."""
    run = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", *ENDLESS],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        assert run.stdout is not None and "tick 1" in run.stdout.readline()
        run.send_signal(signal.SIGTERM)
        _out, err = run.communicate(timeout=LIMIT)
    finally:
        run.kill()
    assert (run.returncode, err) == (143, "supervisor: terminated\n")


def test_help_names_the_console_script_and_explains_gdb_guest() -> None:
    for args in (["--help"], ["swarm", "--help"], ["build", "--help"]):
        proc = cli(*args)
        assert proc.returncode == 0
        assert proc.stdout.startswith(f"usage: lguest-supervisor {' '.join(args[:-1])}".rstrip())
    help_text = " ".join(cli("swarm", "--help").stdout.split())
    assert "--gdb-guest INDEX with --gdb: which guest gdb gets, 0 to N-1" in help_text


def test_build_help_states_the_stack_range_and_default_the_build_uses() -> None:
    help_text = " ".join(cli("build", "--help").stdout.split())
    low, high = sdk.MIN_STACK_SIZE >> 10, sdk.MAX_STACK_SIZE >> 20
    assert f"--stack-size STACK_SIZE CPU 0's stack, {low}K..{high}M" in help_text
    assert "(default 8M if that leaves 4M for the heap, else half the free memory)" in help_text


def test_the_swarm_table_counts_blocks_or_says_plainly_that_it_does_not() -> None:
    hook = cli(
        "swarm", "-n", "2", "guests/hello.img", "--memory", "128K",
        env=dict(os.environ, LGUEST_SLICING="hook"),
    )  # fmt: skip
    assert hook.returncode == 0, hook.stderr
    assert "blocks/s" in hook.stdout and "not counted" not in hook.stdout
    default = cli("swarm", "-n", "2", "guests/hello.img", "--memory", "128K")
    assert default.returncode == 0, default.stderr
    if _slicing.COUNTS_BLOCKS:
        assert "blocks/s" in default.stdout
    else:
        assert "blocks: not counted (LGUEST_SLICING=hook counts them)\n" in default.stdout
        assert "blocks/s" not in default.stdout and "exit request" not in default.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "guests/hello.img", "--max-engines", "0"], "--max-engines 0: Input should be"),
        (["run", "guests/hello.img", "--max-engines", "many"], "--max-engines many: Input"),
        (["swarm", "guests/hello.img", "--max-engines", "1.5"], "--max-engines 1.5: Input"),
        (["swarm", "guests/hello.img", "--max-engines", "9999999"], "less than or equal"),
        (["run", "guests/hello.img", "--max-engines", "8", "--deterministic"], "has none"),
        (["swarm", "guests/hello.img", "--max-engines", "8", "--cluster", "local"], "--cluster"),
    ],
)  # fmt: skip
def test_max_engines_is_checked_in_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("supervisor: error: --max-engines")
    assert err.count("\n") == 1 and message in err, err


def test_max_engines_bounds_the_engine_pool_of_run_and_swarm(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bounds: list[int | None] = []

    class Recording(host.Supervisor):
        async def __aexit__(self, *exc: object) -> None:
            pool = self.device.engines
            bounds.append(None if pool is None else pool.bound)
            await super().__aexit__(*exc)

    monkeypatch.setenv(engines.ENV, "pool")
    monkeypatch.setattr(cli_module, "Supervisor", Recording)
    assert cli_main(["run", "guests/hello.img", "--max-engines", "40", "--loop", "asyncio"]) == 0
    swarm = ["swarm", "-n", "2", "guests/hello.img", "--max-engines", "41", "--loop", "asyncio"]
    assert cli_main(swarm) == 0
    assert cli_main(["run", "guests/hello.img", "--loop", "asyncio"]) == 0
    assert bounds == [40, 41, engines.default_bound(DEFAULT_TCG_BUFFER)]
    capsys.readouterr()
