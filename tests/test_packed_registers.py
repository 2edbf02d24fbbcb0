"""Packed registers: a CPU that keeps its registers as bytes (hibernated, or its engine
back in the pool) for ``hibernation.PACK_AFTER`` has them packed, about 0.2 KiB instead
of 5.4 KiB, and the guest cannot tell."""

from __future__ import annotations

import asyncio
import math

import pytest
from guestasm import Booted, boot, notified, present, until
from idleguests import sleeper, wake
from test_state import WORKER, comparable

from supervisor import LguestDevice, _unicorn, abi, hibernation
from supervisor.state import Exit

# The subject is the registers packed and unpacked, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

LIMIT = 30  # seconds: a bound for failing, never a wait for success


async def resting_worker(dev: LguestDevice) -> tuple[bytes, list[int], Exit | None]:
    """The worker to its death; after each notify the loop turns a few times before the
    next read, so the dormitory packs the registers of the CPU waiting for its Launcher."""
    g = await boot(dev, WORKER)
    output: list[int] = []
    async with asyncio.timeout(LIMIT):
        while True:
            try:
                await notified(g)
            except FileNotFoundError:
                break
            output.append(g.u32("done"))
            for _ in range(3):
                await asyncio.sleep(0)
    memory = comparable(g.guest.symbols, g.memory.read(0, g.memory.size))
    death = g.file.death
    await g.file.close()
    g.memory.close()
    return memory, output, death


@pytest.mark.parametrize("mode", ["pool", "off"])
async def test_registers_packed_at_every_wait_compute_exactly_the_same(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with LguestDevice(engines="off", hibernate_after=math.inf) as awake:
        reference = await resting_worker(awake)
        assert awake.dormitory.packs == 0  # never gave its registers back: nothing to pack
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.0)
    async with LguestDevice(engines=mode, hibernate_after=0) as dev:
        assert await resting_worker(dev) == reference
        assert dev.dormitory.packs >= len(reference[1])  # packed at every notify


async def test_a_sleeping_cpu_keeps_its_registers_packed_and_wakes_with_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.05)
    async with LguestDevice(engines="pool") as dev:
        g, reader = await sleeper(dev)
        cpu = g.file.cpu(0)
        raw = cpu.capture(None).context
        await until(lambda: cpu.engine.packed, LIMIT)
        kept = cpu.engine.frozen
        assert kept is not None and len(kept) <= 1024 < len(raw)
        assert _unicorn.unpack_context(kept) == raw
        assert cpu.capture(None).context == raw  # a snapshot sees the registers as they are
        assert dev.dormitory.pack_entries == 0
        await until(lambda: not dev.dormitory.armed)  # nothing left to do while it sleeps
        # An interrupt wakes it: the handler runs on the unpacked registers.
        await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
        assert await reader == abi.pack_words(0x33)
        assert g.u32("hits") == 1 and not cpu.engine.packed
        reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
        await g.file.close()
        with pytest.raises(OSError):
            await reader
        g.memory.close()


async def test_packing_a_sleeping_cpu_takes_it_off_the_engine_it_gave_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine a CPU gave back at its halt waits for it; once the CPU has slept long
    enough to have its registers packed, it is taken off that engine (its memory
    unmapped, no CPU in the seat), which waits as the first spare to switch: the wake
    that takes it next has nothing to unmap."""
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.05)
    async with LguestDevice(engines="pool") as dev:
        pool = present(dev.engines)
        g, reader = await sleeper(dev)
        cpu = g.file.cpu(0)
        engine = cpu.engine.last
        assert engine is not None and _unicorn.seat(engine).cpu is cpu
        assert _unicorn.seat(engine).memory == g.memory.size
        await until(lambda: cpu.engine.packed, LIMIT)
        seat = _unicorn.seat(engine)
        assert cpu.engine.last is None and seat.cpu is None and seat.memory == 0
        assert [begin for begin, _end, _perms in engine.mem_regions()] == [abi.SWITCHER_ADDR]
        reused, switched = pool.reused, pool.switched
        await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
        assert await reader == abi.pack_words(0x33) and g.u32("hits") == 1
        # Its wake switched the engine it let go of back to it (not its own: it has none).
        assert (pool.reused, pool.switched) == (reused, switched + 1)
        assert cpu.engine.last is engine and _unicorn.seat(engine).cpu is cpu
        reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
        await g.file.close()
        with pytest.raises(OSError):
            await reader
        g.memory.close()


async def test_a_cpu_that_sleeps_and_wakes_often_keeps_one_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 3600.0)  # (never due in this test)
    async with LguestDevice(engines="pool") as dev:
        g, reader = await sleeper(dev)
        cpu = g.file.cpu(0)
        for hit in range(1, 21):
            await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
            assert await reader == abi.pack_words(0x33) and g.u32("hits") == hit
            reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
            await until(lambda: cpu.halted and cpu.hibernated)
            assert dev.dormitory.pack_entries == 1
        assert not cpu.engine.packed and dev.dormitory.packs == 0
        await g.file.close()
        with pytest.raises(OSError):
            await reader
        g.memory.close()
        assert dev.dormitory.pack_entries == 1  # (a closed CPU's entry goes at its time)


async def test_packs_bring_a_malloc_trim_at_most_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.0)
    monkeypatch.setattr(hibernation, "PACK_TRIM", 2)
    monkeypatch.setattr(hibernation, "PACK_TRIM_EVERY", 3600.0)
    trims: list[int] = []
    monkeypatch.setattr(hibernation, "_GIVE_BACK", lambda: trims.append(1))
    async with LguestDevice(engines="pool") as dev:
        sleepers = [await sleeper(dev)]
        await until(lambda: dev.dormitory.packs == 1)
        await asyncio.sleep(2 * hibernation.TRIM_DELAY)
        assert trims == []  # one pack: not worth a walk of the heap
        sleepers += [await sleeper(dev) for _ in range(3)]
        await until(lambda: dev.dormitory.packs == 4 and dev.dormitory.trims == 1, LIMIT)
        sleepers += [await sleeper(dev) for _ in range(2)]
        await until(lambda: dev.dormitory.packs == 6, LIMIT)
        await asyncio.sleep(2 * hibernation.TRIM_DELAY)
        assert len(trims) == 1  # the next only PACK_TRIM_EVERY after the first
        for g, reader in sleepers:
            await g.file.close()
            with pytest.raises(OSError):
                await reader
            g.memory.close()


async def test_a_trim_the_packs_put_off_does_not_delay_one_after_hibernations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 4 * hibernation.TRIM_DELAY)
    monkeypatch.setattr(hibernation, "PACK_TRIM", 1)
    monkeypatch.setattr(hibernation, "PACK_TRIM_EVERY", 3600.0)
    monkeypatch.setattr(hibernation, "TRIM_SLACK", 1)
    trims: list[int] = []
    monkeypatch.setattr(hibernation, "_GIVE_BACK", lambda: trims.append(1))
    async with LguestDevice(engines="off", hibernate_after=0) as dev:
        # Hibernated (a trim TRIM_DELAY later), then packed: the packs' trim is an hour off.
        sleepers = [await sleeper(dev)]
        await until(lambda: len(trims) == 1 and dev.dormitory.packs == 1, LIMIT)
        assert dev.dormitory.armed
        sleepers.append(await sleeper(dev))  # a hibernation: its trim TRIM_DELAY after it
        await until(lambda: len(trims) == 2, LIMIT)
        for g, reader in sleepers:
            await g.file.close()
            with pytest.raises(OSError):
                await reader
            g.memory.close()


async def test_a_guest_that_wakes_and_packs_in_turn_brings_no_malloc_trim(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each wake unpacks what the last pack packed: the heap does not grow, and a trim (a
    # walk of the whole heap) would only stand in some wake's way.
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.0)
    monkeypatch.setattr(hibernation, "PACK_TRIM", 2)
    monkeypatch.setattr(hibernation, "PACK_TRIM_EVERY", 0.0)
    trims: list[int] = []
    monkeypatch.setattr(hibernation, "_GIVE_BACK", lambda: trims.append(1))
    async with LguestDevice(engines="pool") as dev:
        g, reader = await sleeper(dev)
        await until(lambda: dev.dormitory.packs == 1, LIMIT)
        for hit in range(1, 6):
            reader = await rewoken(g, reader, hit)
            await until(lambda: dev.dormitory.packs == hit + 1, LIMIT)  # noqa: B023
        await asyncio.sleep(2 * hibernation.TRIM_DELAY)
        assert dev.dormitory.packs == 6 and trims == []
        await g.file.close()
        with pytest.raises(OSError):
            await reader
        g.memory.close()


async def rewoken(g: Booted, reader: asyncio.Future[bytes], hit: int) -> asyncio.Future[bytes]:
    """Wake ``g`` (its handler's notify ends ``reader``) and read on: the next reader."""
    await wake(g, reader, hit)
    return asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
