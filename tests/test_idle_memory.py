"""What an idle guest keeps in memory: counted in objects and bytes, never timed.

A waiting CPU shares its IDT with every CPU whose IDT has the same bytes, and a run or
a write makes it its own again first, so no guest sees another's gates.  The Python
heap of a resting guest stays within its budget (docs/performance.md, "Memory per
guest"), and reading its stats leaves nothing behind."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path

import pytest
from guestasm import assemble, boot, until
from idleguests import asleep, final_memory

from supervisor import (
    GuestConfig,
    LguestDevice,
    Supervisor,
    _slicing,
    abi,
    hibernation,
    memory,
    testing,
)
from supervisor.cpu import Idt
from supervisor.host import Guest

# The subject is what idle guests hold, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

LIMIT = 60  # seconds: a bound for failing, never a wait for success
# Python heap bytes a resting 1 MiB sleeper holds (tracemalloc): its Launcher, CPU,
# packed memory and registers, devices, console and Guest.  1,000,000 of them must fit
# in 16 KiB each with the process's other memory.
HEAP_BUDGET = 10 * 1024

# Sleeps in a halt; irq 1 (vector 33) counts a hit and sets gate 34 (LOAD_IDT_ENTRY,
# which the native hook completes in C) before it notifies 0x33.
GATE_SETTER = r"""
main:
    LGUEST_INIT
    IDT 33, handler
1:  HCALL 10
    jmp 1b
handler:
    incl hits
    IDT 34, handler
    HCALL 17, 0x33
    jmp irq_return
.data
hits: .long 0
"""


def test_a_shared_idt_is_copied_before_a_write() -> None:
    one, two = _slicing.Fuel(), _slicing.Fuel()
    assert one.gates is two.gates and not one.owns_gates  # new CPUs: the blank table
    Idt(one)[40] = (1, 2)
    assert one.owns_gates and one.gates is not two.gates and Idt(two)[40] == (0, 0)
    Idt(two)[40] = (1, 2)
    _slicing.share_idt(one)
    _slicing.share_idt(two)
    assert one.gates is two.gates and not one.owns_gates and not two.owns_gates
    assert one.idt == two.idt  # (what _fuel.c reads)
    Idt(two)[41] = (3, 4)
    assert Idt(one)[41] == (0, 0) and Idt(two)[41] == (3, 4) and Idt(two)[40] == (1, 2)
    Idt(one)[:] = [(0, 0)] * abi.IDT_ENTRIES
    assert Idt(one)[40] == (0, 0) and Idt(two)[40] == (1, 2)


async def test_packed_cpus_share_their_idt_and_a_woken_one_writes_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    async with LguestDevice(engines="pool") as dev:
        a, b = await boot(dev, GATE_SETTER), await boot(dev, GATE_SETTER)
        reader_a, reader_b = await asleep(a), await asleep(b)
        fuel_a, fuel_b = a.file.cpu(0).fuel, b.file.cpu(0).fuel
        await until(lambda: a.file.cpu(0).engine.packed and b.file.cpu(0).engine.packed, LIMIT)
        assert fuel_a.gates is fuel_b.gates and not fuel_a.owns_gates
        shared = bytes(fuel_b.gates)
        assert b.file.cpu(0).idt[33][1] & 0x8000  # (gate 33 present: the shared bytes)

        await a.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
        assert await reader_a == abi.pack_words(0x33)
        assert a.u32("hits") == 1
        # A's run took a table of its own, and its handler's gate went there alone.
        assert fuel_a.gates is not fuel_b.gates
        assert a.file.cpu(0).idt[34] == a.file.cpu(0).idt[33]
        assert b.file.cpu(0).idt[34] == (0, 0) and bytes(fuel_b.gates) == shared
        reader_a = await asleep(a)
        await until(lambda: a.file.cpu(0).engine.packed, LIMIT)
        assert not fuel_a.owns_gates and bytes(fuel_a.gates) != shared

        # B still wakes with its own gates: its handler runs and sets gate 34.
        await b.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
        assert await reader_b == abi.pack_words(0x33)
        assert b.u32("hits") == 1 and b.file.cpu(0).idt[34] == b.file.cpu(0).idt[33]
        await final_memory(a, reader_a)
        await final_memory(b)


async def _rested(sup: Supervisor, config: GuestConfig, n: int) -> list[Guest]:
    """``n`` more sleepers launched in ``sup``, once each rests with its memory packed."""
    guests = [await sup.launch(config) for _ in range(n)]
    async with asyncio.timeout(LIMIT):
        for guest in guests:
            assert await guest.rested()  # (a sleeper's first rest: it never wakes)
    await until(lambda: memory.packed_memories() >= len(sup.guests), LIMIT)
    return guests


def _sleeper(tmp_path: Path) -> GuestConfig:
    """A 1 MiB sleeper (testing.SLEEPER) without console."""
    image = tmp_path / "sleeper.img"
    image.write_bytes(assemble(testing.SLEEPER).image)
    return GuestConfig(image=image, memory="1M", console="null")


async def test_a_resting_guest_holds_at_most_its_budget_of_python_heap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    config = _sleeper(tmp_path)
    n = 200
    async with Supervisor(keep_ended=False) as sup:
        await _rested(sup, config, 20)  # what every guest shares is made by the first ones
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            guests = await _rested(sup, config, n)
            gc.collect()
            held = (tracemalloc.get_traced_memory()[0] - before) / n
        finally:
            tracemalloc.stop()
        assert all(not g.done for g in guests)
        assert held <= HEAP_BUDGET, f"{held / 1024:.1f} KiB a resting guest"
        # Ended guests are forgotten (keep_ended=False), by the Guest's own done callback.
        await guests[0].kill()
        assert guests[0] not in sup.guests and len(sup.guests) == n + 19


async def test_reading_the_stats_of_resting_guests_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user polling the stats of many guests: each read makes its GuestStats and drops
    # it, with no reference cycle to wait for a collection and nothing kept per read.
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    config = _sleeper(tmp_path)
    passes, n = 50, 200
    async with Supervisor(keep_ended=False) as sup:
        guests = await _rested(sup, config, n)
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(passes):  # (no await: nothing but the reads runs)
                assert sum(g.stats.interrupts >= 1 for g in guests) == n
            cycles = gc.collect()  # (it also empties the free lists the reads filled)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            gc.enable()
        assert cycles == 0
        assert held < 16 * 1024, f"{held / (passes * n):.1f} bytes a read"
