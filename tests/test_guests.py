"""Every toy guest in guests/ behaves as guests/README.md says, run through Supervisor."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from supervisor import Exit, Guest, GuestConfig, Supervisor, _slicing
from supervisor.testing import until

# The subject is what each toy guest prints and returns, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

GUESTS = Path(__file__).resolve().parent.parent / "guests"
SECTOR = 512
LIMIT = 60  # seconds: a bound for failing (a hang on a loaded machine), never a wait


@pytest.fixture
async def sup() -> AsyncIterator[Supervisor]:
    async with Supervisor() as s:
        yield s


async def run(sup: Supervisor, image: str, **fields: object) -> tuple[list[str], Exit]:
    """Launch guests/<image>, collect its console lines and how it ended."""
    guest = await sup.launch(GuestConfig(image=GUESTS / image, memory="1M", **fields))
    async with asyncio.timeout(LIMIT):  # a hung guest fails the test instead of hanging it
        lines = [line async for line in guest.console]
        return lines, await guest.wait()


async def next_line(guest: Guest) -> str:
    async for line in guest.console:
        return line
    raise AssertionError("console ended")


async def test_hello(sup: Supervisor) -> None:
    lines, result = await run(sup, "hello.img")
    assert lines == ["Hello from an lguest guest!"]
    assert result == Exit(0, "power off", 0, died=False)
    assert result.ok


async def test_hello_elf(sup: Supervisor) -> None:
    lines, result = await run(sup, "hello.elf")
    assert lines == ["Hello from an lguest guest!"]
    assert result.ok


async def test_ticker_ticks(sup: Supervisor) -> None:
    lines, result = await run(sup, "ticker.img", cmdline="ticks=3 period_ms=1")
    assert lines == ["tick 1", "tick 2", "tick 3", "done"]
    assert result.ok


async def test_ticker_zero_ticks(sup: Supervisor) -> None:
    lines, result = await run(sup, "ticker.img", cmdline="ticks=0")
    assert lines == ["done"]
    assert result.ok


async def test_echo_one_chunk(sup: Supervisor) -> None:
    guest = await sup.launch(GuestConfig(image=GUESTS / "echo.img", memory="1M"))
    guest.send("hello\nquit\nmore\n")
    assert [line async for line in guest.console] == ["hello", "quit", "more", "bye"]
    assert (await guest.wait()).ok


async def test_echo_interactive(sup: Supervisor) -> None:
    """Input sent while the guest is halted wakes it (Waker -> EAGAIN -> irq)."""
    guest = await sup.launch(GuestConfig(image=GUESTS / "echo.img", memory="1M"))
    for word in ("one", "two", "three"):
        guest.send(word + "\n")
        assert await next_line(guest) == word
    guest.send("quit\n")
    assert [line async for line in guest.console] == ["quit", "bye"]
    assert (await guest.wait()).ok


async def test_echo_eof(sup: Supervisor) -> None:
    guest = await sup.launch(GuestConfig(image=GUESTS / "echo.img", memory="1M"))
    guest.send("partial")
    guest.send_eof()
    assert [line async for line in guest.console] == ["partial"]
    assert (await guest.wait()).ok


async def test_echo_null_console_is_eof(sup: Supervisor) -> None:
    lines, result = await run(sup, "echo.img", console="null")
    assert lines == []
    assert result.ok


def disk(tmp_path: Path, sectors: int) -> tuple[Path, bytes]:
    data = os.urandom(sectors * SECTOR)
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


async def test_blockcopy_copies(sup: Supervisor, tmp_path: Path) -> None:
    path, data = disk(tmp_path, 20)
    lines, result = await run(sup, "blockcopy.img", block=path)
    assert lines == ["blockcopy ok"]
    assert result.ok
    after = path.read_bytes()
    assert after[8 * SECTOR : 16 * SECTOR] == data[: 8 * SECTOR]
    assert after[: 8 * SECTOR] == data[: 8 * SECTOR]
    assert after[16 * SECTOR :] == data[16 * SECTOR :]


async def test_blockcopy_readonly_fails_cleanly(sup: Supervisor, tmp_path: Path) -> None:
    path, data = disk(tmp_path, 20)
    lines, result = await run(sup, "blockcopy.img", block=path, block_readonly=True)
    assert lines == ["read-only block device"]
    assert (result.exit_status, result.died) == (3, False)
    assert path.read_bytes() == data


async def test_blockcopy_without_device(sup: Supervisor) -> None:
    lines, result = await run(sup, "blockcopy.img")
    assert lines == ["no block device"]
    assert result.exit_status == 2


async def test_blockcopy_small_device(sup: Supervisor, tmp_path: Path) -> None:
    path, _ = disk(tmp_path, 8)
    lines, result = await run(sup, "blockcopy.img", block=path)
    assert lines == ["block device too small"]
    assert result.exit_status == 4


async def test_spinner_runs_until_killed(sup: Supervisor) -> None:
    guest = await sup.launch(GuestConfig(image=GUESTS / "spinner.img", memory="1M"))
    await until(lambda: guest.stats.exits >= 10, LIMIT)  # ten slices ended, not by an end
    assert not guest.done  # it never ends by itself
    assert guest.stats.run_time > 0
    # Blocks are counted where the block hook meters slices (see _slicing.COUNTS_BLOCKS).
    assert guest.stats.blocks > 1000 or not _slicing.COUNTS_BLOCKS
    result = await guest.kill()
    assert result.died and result.reason == "killed"
    assert guest.done
    assert [line async for line in guest.console] == []


FAULTY = {
    "faulty-badcall": "Bad hypercall 99",
    "faulty-noinit": "hypercall 10 before INIT",
    "faulty-doubleinit": "already have lguest_data",
    "faulty-badidt": "idt entry 300",
    "faulty-crash": "guest panic",
    "faulty-badinit": "bad lguest_data address 0xfffff000",
    "faulty-divide": "trap 0 ",
    "faulty-pagefault": "trap 14 ",
}


@pytest.mark.parametrize("name", list(FAULTY))
async def test_faulty_guest_dies_with_reason(sup: Supervisor, name: str) -> None:
    lines, result = await run(sup, f"{name}.img")
    assert result.died and result.exit_status is None
    assert FAULTY[name] in result.reason
    assert lines == []


@pytest.mark.skipif(shutil.which("as") is None, reason="binutils (as, ld, objcopy) missing")
def test_build_check_reproduces_committed_images() -> None:
    proc = subprocess.run(
        [sys.executable, str(GUESTS / "build.py"), "--check", "--only", "asm"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
