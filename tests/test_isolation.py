"""Isolation and prompt shutdown under load (issue 14).

Each test here pins one guarantee of docs/security.md: a killed or closed guest
does not wait for its queued slice, host writes into guest memory are seen by
the guest's code, a snapshot names no host file or socket by itself, the
capture console is bounded by bytes, a flooding console pays for itself.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from guestasm import SPIN, assemble, boot, notified, until
from test_cli import cli

from supervisor import GuestConfig, LguestDevice, Supervisor
from supervisor.config import ConfigError
from supervisor.launcher.console import LineStream


@contextmanager
def blocked_executor(dev: LguestDevice) -> Iterator[threading.Event]:
    """Occupy every executor thread: slices submitted now wait in the queue."""
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        started.release()
        release.wait()

    workers = dev.executor._max_workers
    for _ in range(workers):
        dev.executor.submit(hold)
    for _ in range(workers):
        started.acquire()
    try:
        yield release
    finally:
        release.set()


def queued(dev: LguestDevice) -> int:
    """How many guests have a slice waiting in the executor's queue."""
    return sum(
        1
        for f in dev.files
        if f._lg is not None and any(c.queued_slice is not None for c in f._lg.cpus)
    )


# -- 3. prompt shutdown --------------------------------------------------------------------------
async def test_cancelling_a_read_withdraws_its_queued_slice(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    reader = asyncio.create_task(g.file.read(4))
    with blocked_executor(dev):
        await until(lambda: queued(dev) == 1)
        reader.cancel()
        done, _ = await asyncio.wait({reader}, timeout=5)  # the worker stays blocked meanwhile
        assert done, "the cancelled read waited for its queued slice"
        assert reader.cancelled()
        before = g.u32("counter")
        await asyncio.wait_for(g.file.close(), 5)
    assert g.u32("counter") == before  # the withdrawn slice never ran


@pytest.mark.parametrize("n", [20])
async def test_supervisor_aclose_does_not_wait_for_queued_slices(tmp_path, n: int) -> None:
    image = tmp_path / "spin.img"
    image.write_bytes(assemble(SPIN).image)
    sup = Supervisor(workers=1)
    config = GuestConfig(image=image, memory="128K", console="null")
    guests = [await sup.launch(config) for _ in range(n)]
    with blocked_executor(sup.device) as release:
        await until(lambda: queued(sup.device) == n)
        closing = asyncio.create_task(sup.aclose())
        await until(lambda: all(g.done for g in guests), timeout=5)
        release.set()
        await closing
    assert [(await g.wait()).reason for g in guests] == ["supervisor closed"] * n


async def test_kill_does_not_wait_for_queued_slices(tmp_path) -> None:
    image = tmp_path / "spin.img"
    image.write_bytes(assemble(SPIN).image)
    async with Supervisor(workers=1) as sup:
        config = GuestConfig(image=image, memory="128K", console="null")
        guests = [await sup.launch(config) for _ in range(5)]
        with blocked_executor(sup.device):
            await until(lambda: queued(sup.device) == 5)
            result = await asyncio.wait_for(guests[2].kill(), 5)
            assert result.died and result.reason == "killed"
            assert not any(g.done for g in guests[:2] + guests[3:])


STUBBORN = """
import asyncio, sys
from supervisor.cli import run_coroutine

async def stubborn() -> int:
    print("ready", flush=True)
    while True:  # a shutdown that never ends
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            print("cancelled", flush=True)

sys.exit(run_coroutine(stubborn(), sys.argv[1]))
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_second_ctrl_c_ends_the_process_at_once(loop: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN, loop],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        assert proc.stdout.readline() == "cancelled\n"  # the first asks politely
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        assert proc.stderr is not None and "interrupted" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


# -- 2. the capture console is bounded by bytes -------------------------------------------------
FLOOD = Path(__file__).resolve().parent.parent / "guests" / "flood.img"  # 64 KiB per NOTIFY
FLOOD_LINE = "f"


async def test_capture_console_holds_at_most_console_buffer_and_loses_nothing() -> None:
    async with Supervisor() as sup:
        config = GuestConfig(image=FLOOD, memory="1M", console_buffer=100_000)
        guest = await sup.launch(config)
        full = 100_000 - LineStream.LINE_COST  # what a waiting guest has filled at least
        await until(lambda: guest.console.held > full)  # 32,768 lines per NOTIFY: it waits
        stuck = guest.stats.notifies
        for _ in range(100):  # give it every chance to run on
            await asyncio.sleep(0.001)
            assert full < guest.console.held <= 100_000
        assert guest.stats.notifies == stuck
        lines = []
        async for line in guest.console:  # the reader catches up: the guest goes on
            lines.append(line)
            if len(lines) == 128 * 1024:
                break
        assert lines == [FLOOD_LINE] * len(lines)  # nothing lost, nothing cut
        assert guest.stats.notifies > stuck
        await guest.kill()


def test_console_buffer_is_a_checked_option() -> None:
    with pytest.raises(ConfigError, match="console_buffer"):
        GuestConfig.build(image=FLOOD, console_buffer=0)


# -- 4. code the Host writes runs as written ------------------------------------------------------
CALL_TWICE = r"""
main:
    LGUEST_INIT
    call func
    mov %eax, first
    HCALL 17, 0x100
    call {where}
    mov %eax, second
    HCALL 17, 0x200
1:  jmp 1b
.data
.align 4096
func:
    mov $1, %eax
    ret
.align 4096
first: .long 0
second: .long 0
"""
MOV_2_RET = b"\xb8\x02\x00\x00\x00\xc3"  # mov $2, %eax; ret


@pytest.mark.parametrize("how", ["write", "view", "high alias"])
async def test_code_the_launcher_writes_runs_as_written(dev: LguestDevice, how: str) -> None:
    where = "func + 0xC0000000" if how == "high alias" else "func"
    g = await boot(dev, CALL_TWICE.format(where=where))
    assert await notified(g) == 0x100
    func = g.guest.symbols["func"]
    if how == "view":
        g.memory.view[func : func + len(MOV_2_RET)] = MOV_2_RET
        g.memory.written(func, len(MOV_2_RET))
    else:
        g.memory.write(func, MOV_2_RET)
    assert await notified(g) == 0x200
    assert (g.u32("first"), g.u32("second")) == (1, 2)
    await g.file.close()


# -- 5. a snapshot is data: it opens no file or socket by itself ---------------------------------
ROOT = Path(__file__).resolve().parent.parent
TICKER = ROOT / "guests" / "ticker.img"


async def _crafted_snapshot(tmp_path: Path, victim: Path) -> Path:
    """A ticker with a block device, snapshotted, then edited to name ``victim`` and a
    gdb listener on every interface, and saved (with a valid checksum) again."""
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(16 * 512))
    async with Supervisor() as sup:
        config = GuestConfig(image=TICKER, memory="1M", cmdline="ticks=4 period_ms=20", block=disk)
        guest = await sup.launch(config)
        async for _line in guest.console:
            break
        snap = await guest.snapshot()
    assert snap.launcher is not None
    snap.launcher["config"]["block"] = str(victim)
    snap.launcher["config"]["gdb"] = "0.0.0.0:0"
    path = tmp_path / "crafted.snap"
    snap.save(path)
    return path


async def test_a_crafted_snapshot_opens_no_file_and_no_socket(tmp_path: Path) -> None:
    from supervisor.snapshot import Snapshot, SnapshotError

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1000)
    snap = Snapshot.load(await _crafted_snapshot(tmp_path, victim))
    async with Supervisor() as sup:
        with pytest.raises(SnapshotError, match="block device"):
            await sup.restore(snap)  # it had a block device: the caller must name the file
        mine = tmp_path / "mine"
        mine.write_bytes(bytes(16 * 512))
        guest = await sup.restore(snap, block=mine)
        assert guest.gdb is None  # no listener the caller did not ask for
        assert guest.config.block == mine
        assert (await guest.wait()).ok
    assert victim.read_bytes() == b"precious" * 1000


def test_run_restore_takes_block_and_gdb_from_the_caller_only(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    snap = asyncio.run(_crafted_snapshot(tmp_path, victim))
    proc = cli("run", "--restore", str(snap))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "supervisor: error:" in proc.stderr and "--block" in proc.stderr
    mine = tmp_path / "mine"
    mine.write_bytes(bytes(16 * 512))
    proc = cli("run", "--restore", str(snap), "--block", str(mine))
    assert proc.returncode == 0, proc.stderr
    assert "gdb" not in proc.stderr
    assert victim.read_bytes() == b"precious"
