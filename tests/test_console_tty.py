"""Whether the guest's standard input is a terminal (``isatty(0)``) is the truth: a
``run`` whose standard input is a terminal says so, a piped or /dev/null one does not,
and a library console's input is not one unless ``GuestConfig.input_tty`` asks.  Its
output is always a terminal (line buffered).

The guest is tests/c/fsprobe.c (its ``isatty N`` command); needs the ``sdk`` extra.
"""

from __future__ import annotations

import asyncio
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from supervisor import GuestConfig, Supervisor
from supervisor.pytest_plugin import BuildGuest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIMIT = 60  # seconds: a bound for failing, never a wait for success
ASK = ["isatty 0", "isatty 1", "isatty 2"]


@pytest.fixture
def fsprobe(build_guest: BuildGuest) -> Path:
    return build_guest((HERE / "c" / "fsprobe.c").read_text(), flags=("-O2",))


async def answers(image: Path, **config: Any) -> list[str]:
    async with Supervisor() as sup, asyncio.timeout(LIMIT):
        guest = await sup.launch(GuestConfig(image=image, memory="4M", **config))
        guest.send("".join(c + "\n" for c in ASK))
        guest.send_eof()
        lines = [line async for line in guest.console]
        assert (await guest.wait()).ok
        return lines


async def test_a_library_consoles_input_is_a_terminal_only_if_asked(fsprobe: Path) -> None:
    assert await answers(fsprobe) == ["err ENOTTY", "ok", "ok"]
    assert await answers(fsprobe, input_tty=False) == ["err ENOTTY", "ok", "ok"]
    assert await answers(fsprobe, input_tty=True) == ["ok", "ok", "ok"]


async def test_a_restored_guest_is_told_its_restorers_console(fsprobe: Path) -> None:
    async with Supervisor() as sup, asyncio.timeout(LIMIT):
        g = await sup.launch(GuestConfig(image=fsprobe, memory="4M", input_tty=True))
        g.send("isatty 0\n")
        assert await anext(aiter(g.console)) == "ok"
        await g.pause()
        snap = await g.snapshot()
        await g.kill("snapshot taken")
        for tty, answer in ((False, "err ENOTTY"), (True, "ok")):
            copy = await sup.restore(snap, input_tty=tty)
            copy.send("isatty 0\n")
            copy.send_eof()
            assert [line async for line in copy.console] == [answer]


def run_probe(image: Path, stdin: int) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", str(image), "--memory", "4M"],
        stdin=stdin, capture_output=True, text=True, cwd=ROOT, timeout=LIMIT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_run_tells_the_guest_whether_its_stdin_is_a_terminal(fsprobe: Path, tmp_path: Path) -> None:
    piped = tmp_path / "commands"
    piped.write_text("".join(c + "\n" for c in ASK))
    with piped.open() as f:
        assert run_probe(fsprobe, f.fileno()) == "err ENOTTY\nok\nok\n"

    master, slave = pty.openpty()
    try:
        # The terminal holds the commands and then its end of file (^D on an empty line).
        os.write(master, "".join(c + "\n" for c in ASK).encode() + b"\x04")
        assert run_probe(fsprobe, slave) == "ok\nok\nok\n"
    finally:
        os.close(master)
        os.close(slave)
