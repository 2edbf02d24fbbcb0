"""Hibernation: idle guests give back their emulator and come back transparently."""

from __future__ import annotations

import asyncio
import ctypes
import math
import mmap
from pathlib import Path
from typing import Any

import pytest
from guestasm import HALT_COUNTER as COUNTER
from guestasm import Booted, assemble, boot, initialize_words, load, until
from refused import refused_here
from test_state import STEPS, WORKER, worker_to_death

from supervisor import GuestConfig, LguestDevice, Supervisor, _unicorn, abi, engines
from supervisor.config import ConfigError
from supervisor.cpu import CpuStats
from supervisor.debug import debugger
from supervisor.hibernation import TRIM_SLACK
from supervisor.memory import GuestMemory
from supervisor.snapshot import capture, restore
from supervisor.state import Exit

GUESTS = Path(__file__).resolve().parent.parent / "guests"
LIMIT = 30  # seconds: a bound for failing, never a wait for success


async def run_worker(
    dev: LguestDevice,
) -> tuple[bytes, list[int], Exit | None, CpuStats | None]:
    g = await boot(dev, WORKER)
    async with asyncio.timeout(LIMIT):
        memory, output = await worker_to_death(g)
    result = (memory, list(output), g.file.death, g.file.stats)
    await g.file.close()
    g.memory.close()
    return result


async def test_a_guest_hibernated_at_every_halt_and_notify_computes_exactly_the_same() -> None:
    # The reference: one emulator all along (no pool, never given back).
    async with LguestDevice(engines="off", hibernate_after=math.inf) as awake:
        memory, output, death, stats = await run_worker(awake)
    assert stats is not None and stats.hibernations == 0
    # A "pool" engine stays with a CPU whose Launcher serves a notify at once (see
    # test_engines): there, the mode without a pool gives it back at every notify.
    mode = "off" if engines.mode_from_env() == "pool" else None
    async with LguestDevice(hibernate_after=0, engines=mode) as sleepy:
        got_memory, got_output, got_death, got_stats = await run_worker(sleepy)
    assert got_output == output == list(range(1, STEPS + 1))
    assert got_death == death
    assert got_memory == memory
    # Every notify (and every halt) gave the emulator back; each run took a new one.
    assert got_stats is not None and got_stats.hibernations >= STEPS
    assert got_stats.wakes >= got_stats.hibernations - 1


async def test_an_idle_guest_hibernates_after_the_delay_and_costs_no_loop_work() -> None:
    async with LguestDevice(engines="off", hibernate_after=0.05) as dev:
        g = await boot(dev, COUNTER)
        cpu = g.file.cpu(0)
        reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
        await until(lambda: cpu.halted)
        assert not cpu.hibernated  # not yet: it has been idle for less than 50 ms
        await until(lambda: cpu.hibernated, LIMIT)
        assert cpu.engine.uc is None and g.file.stats is not None and g.file.stats.hibernations == 1
        assert len(dev.dormitory) == 0
        await until(lambda: not dev.dormitory.armed)  # then nothing is left to do
        # An interrupt wakes it: a new emulator, the handler runs, nothing is lost.
        await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
        assert await reader == abi.pack_words(0x33)
        assert g.u32("hits") == 1 and g.file.stats.wakes == 1
        await g.file.close()
        g.memory.close()


async def test_timer_break_debugger_and_snapshot_all_see_the_same_guest() -> None:
    async with LguestDevice(hibernate_after=0) as dev:
        g = await boot(
            dev,
            r"""
main:
    LGUEST_INIT
    IDT 32, tick
    HCALL 9, 20000000
1:  HCALL 10
    jmp 1b
tick:
    incl ticks
    movl $0x1234, %esi
    HCALL 17, 0x32
    jmp irq_return
.data
ticks: .long 0
""",
        )
        cpu = g.file.cpu(0)
        reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
        await until(lambda: cpu.hibernated and cpu.halted)  # halted with its timer armed
        # A snapshot needs no emulator: the guest stays asleep, its timer keeps going.
        await g.file.pause()
        snap = capture(g.file)
        assert cpu.hibernated and snap.state.cpus[0].timer_ns is not None
        g.file.resume()
        # The timer wakes it.
        async with asyncio.timeout(LIMIT):
            assert await reader == abi.pack_words(0x32)
        assert g.u32("ticks") == 1 and cpu.hibernated  # back to sleep after the notify
        # A Waker's break is seen without an emulator either.
        reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
        await until(lambda: cpu.hibernated and cpu.halted)
        breaker = asyncio.ensure_future(g.file.waker().brk(True))
        with pytest.raises(BlockingIOError):
            await reader
        await g.file.write(abi.pack_words(abi.LHREQ_BREAK, 0))
        await breaker
        # A debugger reading registers wakes it.
        d = debugger(g.file)
        await d.stop()
        assert cpu.hibernated
        assert d.registers()[6] == 0x1234  # esi, set by the handler before it notified
        assert not cpu.hibernated
        d.resume()
        await g.file.close()
        g.memory.close()
        # The snapshot restores into a guest that goes on from there.
        copy = await restore(snap, dev)
        async with asyncio.timeout(LIMIT):
            assert await copy.read(abi.WORD_SIZE) == abi.pack_words(0x32)
        await copy.close()
        copy.memory.close()


async def sleeper(dev: LguestDevice, after: float | None = None) -> tuple[Booted, Any]:
    """A COUNTER guest with its own ``hibernate_after``, asleep in its halt, a read in flight."""
    guest = assemble(COUNTER)
    memory, layout = load(guest, 1 << 20)
    f = dev.open(memory, hibernate_after=after)
    await f.write(initialize_words(memory, layout))
    g = Booted(f, memory, layout, guest)
    reader = asyncio.ensure_future(f.read(abi.WORD_SIZE))
    await until(lambda: f.cpu(0).halted)
    return g, reader


async def close_all(sleepers: list[tuple[Booted, Any]]) -> None:
    for g, reader in sleepers:
        await g.file.close()
        with pytest.raises(OSError):
            await reader
        g.memory.close()


async def test_each_drowsy_cpu_hibernates_at_its_own_time() -> None:
    async with LguestDevice(engines="off") as dev:
        late = await sleeper(dev, after=3600)  # drowsy first, due much later
        soon = await sleeper(dev, after=0.05)
        await until(lambda: soon[0].file.cpu(0).hibernated, LIMIT)
        assert not late[0].file.cpu(0).hibernated and len(dev.dormitory) == 1
        await close_all([late, soon])


async def test_a_cpu_dozing_off_at_every_read_keeps_one_entry_and_hibernates_after_last() -> None:
    async with LguestDevice(engines="off", hibernate_after=0.1) as dev:
        g = await boot(dev, "main:\n LGUEST_INIT\n1: HCALL 17, 1\n jmp 1b\n")
        cpu = g.file.cpu(0)
        loop = asyncio.get_running_loop()
        start = asked = loop.time()
        while asked - start < 0.3:  # past its first entry's time: the sweep runs meanwhile
            asked = loop.time()  # its halt, when it dozes off, comes after this
            assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)
            assert not cpu.hibernated and dev.dormitory.entries <= 1  # not one per read
        await until(lambda: cpu.hibernated, LIMIT)
        assert loop.time() - asked >= 0.095  # from its last read, not its first (timers: ms)
        await g.file.close()
        g.memory.close()


async def test_a_cpu_drowsy_again_when_its_entry_comes_up_hibernates_at_its_new_time() -> None:
    async with LguestDevice(engines="off", hibernate_after=0.1) as dev:
        g = await boot(dev, "main:\n LGUEST_INIT\n1: HCALL 17, 1\n jmp 1b\n")
        cpu = g.file.cpu(0)
        loop = asyncio.get_running_loop()
        for _ in range(8):  # drowsy for 30 ms between reads: its first entry comes up meanwhile
            asked = loop.time()  # its halt, when it dozes off, comes after this
            await g.file.read(abi.WORD_SIZE)
            await asyncio.sleep(0.03)  # (the scenario: time passing, not a wait for a condition)
            assert not cpu.hibernated or loop.time() - asked >= 0.095  # never before its time
        await until(lambda: cpu.hibernated, LIMIT)  # (the sweep moved its entry on)
        assert loop.time() - asked >= 0.095
        assert dev.dormitory.entries == 0
        await g.file.close()
        g.memory.close()


async def test_memory_goes_back_after_a_burst_of_hibernations_not_at_each_wake() -> None:
    async with LguestDevice(engines="off", hibernate_after=0) as dev:
        # A burst: TRIM_SLACK guests hibernate and nothing reuses their instances.
        burst = [await sleeper(dev) for _ in range(TRIM_SLACK)]
        await until(lambda: all(g.file.cpu(0).hibernated for g, _ in burst))
        await until(lambda: not dev.dormitory.armed)
        trims = dev.dormitory.trims
        assert trims >= 1
        # One guest woken and asleep again many times: each thaw reuses what the last
        # hibernation gave back, so there is nothing to give back to the system.
        g, reader = burst[0]
        cpu = g.file.cpu(0)
        for _ in range(3 * TRIM_SLACK):
            await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
            assert await reader == abi.pack_words(0x33)
            reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
            await until(lambda: cpu.halted and cpu.hibernated)
        burst[0] = (g, reader)
        await until(lambda: not dev.dormitory.armed)
        assert dev.dormitory.trims == trims
        assert g.file.stats is not None and g.file.stats.wakes >= 3 * TRIM_SLACK
        await close_all(burst)


def resident_pages(memory: GuestMemory) -> int:
    """How many pages of ``memory`` the host kernel has backed (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pages = memory.size // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    assert libc.mincore(memory.address, memory.size, vector) == 0
    return sum(v & 1 for v in vector)


async def test_guest_memory_costs_only_the_pages_the_guest_touched() -> None:
    async with LguestDevice(hibernate_after=0) as dev:
        g = await boot(dev, COUNTER, ram_size=16 << 20)
        reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
        await until(lambda: g.file.cpu(0).hibernated)
        touched = resident_pages(g.memory)
        # Image, page directory and tables, boot info, lguest_data, stack: a few dozen
        # pages of the 4,096 the guest has.
        assert 0 < touched <= 40, touched
        await g.file.close()
        with pytest.raises(OSError):
            await reader
        g.memory.close()


async def test_supervisor_option_and_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(engines.ENV, "off")  # (hibernate_after only matters without a pool)
    config = GuestConfig(image=GUESTS / "ticker.img", memory="1M", cmdline="ticks=3 period_ms=20")
    async with Supervisor(hibernate_after=0) as sup, asyncio.timeout(LIMIT):
        guest = await sup.launch(config)
        lines = [line async for line in guest.console]
        assert lines == ["tick 1", "tick 2", "tick 3", "done"]
        assert (await guest.wait()).ok
        assert guest.stats.hibernations >= 3 and guest.stats.wakes >= 3
        never = await sup.launch(config.model_copy(update={"hibernate_after": math.inf}))
        assert [line async for line in never.console][-1] == "done"
        assert never.stats.hibernations == 0


def test_config_accepts_seconds_or_off() -> None:
    image = GUESTS / "hello.img"
    assert GuestConfig.build(image=image, hibernate_after="off").hibernate_after == math.inf
    assert GuestConfig.build(image=image, hibernate_after=0).hibernate_after == 0
    assert GuestConfig.build(image=image).hibernate_after is None  # the device's default
    with pytest.raises(ConfigError, match="hibernate_after"):
        GuestConfig.build(image=image, hibernate_after=-1)
    with pytest.raises(ValueError, match="hibernate_after"):
        LguestDevice(hibernate_after=-1)


def test_cli_option() -> None:
    """A delay runs (``0`` and ``off``: tests/test_cli_edges.py); a bad one is refused
    in one line; the help says where the flag applies."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", str(GUESTS / "hello.img"),
         "--memory", "1M", "--hibernate-after", "2.5"],
        cwd=GUESTS.parent, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Hello from an lguest guest!"
    bad = refused_here("run", str(GUESTS / "hello.img"), "--hibernate-after", "soon")
    assert bad.returncode == 2
    assert bad.stderr.startswith("supervisor: error:") and "--hibernate-after" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    # The flag still parses with the engine pool, and its help says where it applies.
    usage = refused_here("run", "--help")
    assert usage.returncode == 0
    text = " ".join(usage.stdout.split())
    assert "LGUEST_ENGINE_SWITCH=off" in text and "holds no emulator" in text


async def test_a_thawed_instance_is_configured_like_a_new_one() -> None:
    async with LguestDevice(hibernate_after=0) as dev:
        g, reader = await sleeper(dev)
        cpu = g.file.cpu(0)
        await until(lambda: cpu.hibernated)
        uc = cpu.emulator  # a new instance
        assert not cpu.hibernated
        # Exits on, none set (uc_ctl raises UC_ERR_ARG when exits are off).
        assert uc.ctl_get_exits_cnt() == 0
        await close_all([(g, reader)])


async def test_a_wake_makes_instances_ahead_and_the_next_wake_takes_one() -> None:
    _unicorn.drop_blanks()
    async with LguestDevice(engines="off", hibernate_after=0) as dev:
        g, reader = await sleeper(dev)
        cpu = g.file.cpu(0)
        await until(lambda: cpu.hibernated)
        assert _unicorn.blank_count() == 0
        await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
        assert await reader == abi.pack_words(0x33)
        # Made in idle time after the wake, up to the bound and no further.
        await until(lambda: not dev.dormitory.armed)
        assert _unicorn.blank_count() == _unicorn.BLANKS
        assert not _unicorn.prepare(cpu.engine.tcg_buffer)
        await until(lambda: cpu.hibernated)
        assert cpu.emulator is not None  # a thaw, which takes one of them
        assert _unicorn.blank_count() == _unicorn.BLANKS - 1
        reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
        await close_all([(g, reader)])
    _unicorn.drop_blanks()
    assert _unicorn.blank_count() == 0
