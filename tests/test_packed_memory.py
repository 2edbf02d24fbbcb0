"""Packed memory: an idle guest's written pages kept as a few deflated bytes, its RAM
(and its template's mapping) given back to the host, every byte put back at its wake."""

from __future__ import annotations

import asyncio
import math
import os
import struct
import threading
from pathlib import Path

import pytest
from guestasm import until
from idleguests import asleep, echoed, echoes_to_the_end, final_memory, forked, sleeper, wake
from slotrequests import Requests, slot_at_1m
from test_packed_registers import resting_worker
from test_state import WORKER

from supervisor import LguestDevice, Supervisor, abi, hibernation, memory
from supervisor.launcher import files
from supervisor.memory import GuestMemory, MemoryTemplate

# The subject is the pages packed and unpacked, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

LIMIT = 30  # seconds: a bound for failing, never a wait for success
PAGE = abi.PAGE_SIZE
SIZE = 64 * PAGE
GUESTS = Path(__file__).resolve().parent.parent / "guests"


def resident(mem: GuestMemory) -> int:
    """Pages of ``mem`` the host has mapped (present or swapped), from the pagemap."""
    pages = mem.size // PAGE
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        raw = os.pread(fd, 8 * pages, 8 * (mem.address // PAGE))
    finally:
        os.close(fd)
    return sum(1 for (entry,) in struct.iter_unpack("<Q", raw) if entry >> 62)


def fill(view: memoryview) -> None:
    for n in range(0, SIZE // PAGE, 2):  # every other page holds data, the rest are holes
        view[n * PAGE : (n + 1) * PAGE] = bytes([n + 1]) * PAGE


def scribble(mem: GuestMemory) -> None:
    """Writes of every kind: over data, over a hole, the template's own bytes, zeros."""
    mem.write(0, b"new bytes")
    mem.write(3 * PAGE + 5, b"into a hole")
    mem.write(4 * PAGE, bytes([5]) * PAGE)  # what the template holds there already
    mem.write(6 * PAGE, bytes(PAGE))  # zeros over data
    mem.read(10 * PAGE, PAGE)  # read only: the template's page, not the memory's


def test_a_packed_memory_holds_no_page_and_unpacks_exactly() -> None:
    template = MemoryTemplate(SIZE, fill)
    mem = GuestMemory(SIZE, template)
    scribble(mem)
    before = mem.read(0, SIZE)
    assert mem.shared and resident(mem) > 0
    packed = memory.packed_memories()
    assert mem.pack()
    assert mem.packed and not mem.shared and memory.packed_memories() == packed + 1
    assert resident(mem) == 0  # its pages and the template's mapping are gone
    assert 0 < mem.packed_size < PAGE  # three pages differ from the template: deflated
    assert mem.read(0, SIZE) == before  # the first use unpacks
    assert not mem.packed and mem.shared and memory.packed_memories() == packed
    mem.close()
    template.close()


def test_an_anonymous_memory_packs_only_what_is_not_zero() -> None:
    mem = GuestMemory(SIZE)
    mem.write(7 * PAGE, b"seven")
    mem.read(9 * PAGE, PAGE)  # the zero page: nothing to keep
    assert mem.pack() and resident(mem) == 0
    assert mem.read(0, SIZE) == bytes(7 * PAGE) + b"seven" + bytes(SIZE - 7 * PAGE - 5)
    mem.close()


def test_memories_with_the_same_pages_share_their_packed_bytes() -> None:
    template = MemoryTemplate(SIZE, fill)
    mems = [GuestMemory(SIZE, template) for _ in range(3)]
    for mem in mems:
        scribble(mem)
    blobs = memory.shared_blobs()
    assert all(mem.pack() for mem in mems)
    assert memory.shared_blobs() == blobs + 1
    mems[2].write(0, b"different")  # unpacks it, then writes
    assert mems[2].pack() and memory.shared_blobs() == blobs + 2
    for mem in mems:
        mem.close()  # closing a packed memory drops its bytes
    assert memory.shared_blobs() == blobs
    template.close()


def test_a_packed_memory_outlives_its_closed_template() -> None:
    template = MemoryTemplate(SIZE, fill)
    mem = GuestMemory(SIZE, template)
    scribble(mem)
    before = mem.read(0, SIZE)
    assert mem.pack()
    template.close()  # (a Launcher's cache let it go)
    assert template.closed
    with pytest.raises(ValueError):
        GuestMemory(SIZE, template)
    assert mem.read(0, SIZE) == before
    mem.close()


def test_a_pinned_memory_is_not_packed_and_clear_forgets_a_packed_one() -> None:
    template = MemoryTemplate(SIZE, fill)
    mem = GuestMemory(SIZE, template)
    mem.pin()  # (a file read into guest RAM on a thread)
    assert not mem.pack()
    mem.unpin()
    assert mem.pack()
    mem.clear()
    assert not mem.packed and mem.read(0, SIZE) == bytes(SIZE)
    mem.close()
    assert not mem.pack()  # closed
    template.close()


async def test_a_guest_whose_memory_packs_at_every_wait_computes_exactly_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with LguestDevice(engines="off", hibernate_after=math.inf) as awake:
        reference = await resting_worker(awake)
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.0)
    async with LguestDevice(engines="pool") as dev:
        assert await resting_worker(dev) == reference
        assert dev.dormitory.memory_packs >= len(reference[1])  # packed at every notify
    assert WORKER  # (the guest both runs compare)


async def _woken_twice(dev: LguestDevice, packed: bool) -> bytes:
    g, reader = await sleeper(dev)
    for hit in (1, 2):
        if packed:
            await until(lambda: g.memory.packed, LIMIT)
            assert resident(g.memory) == 0
        await wake(g, reader, hit)
        reader = await asleep(g)
    return await final_memory(g, reader)


async def test_a_packed_guest_woken_by_an_irq_has_every_byte_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 3600.0)
    async with LguestDevice(engines="pool") as dev:
        reference = await _woken_twice(dev, packed=False)
        assert dev.dormitory.memory_packs == 0
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    async with LguestDevice(engines="pool") as dev:
        assert await _woken_twice(dev, packed=True) == reference
        assert dev.dormitory.memory_packs >= 2


async def test_a_packed_guest_takes_console_input_snapshots_and_dies_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    async with Supervisor() as sup:

        async def packed_again() -> None:
            packs = sup.device.dormitory.memory_packs
            await until(lambda: sup.device.dormitory.memory_packs > packs, LIMIT)

        guest = await echoed(sup, packed_again)  # console data for a packed guest
        fork = await forked(sup, guest)  # a snapshot of a packed guest
        await packed_again()
        assert (await guest.kill()).reason == "killed"  # a packed guest dies as any other
        await echoes_to_the_end(fork)


async def test_closing_a_packed_guest_leaves_its_memory_packed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    async with LguestDevice(engines="pool") as dev:
        g, reader = await sleeper(dev)
        await until(lambda: g.memory.packed, LIMIT)
        await g.file.close()  # (a kill): no unpacking on the way out
        with pytest.raises(OSError):
            await reader
        assert g.memory.packed
        assert g.u32("hits") == 0  # and still every byte there for whoever reads it
        g.memory.close()


async def test_an_engine_taken_for_a_packed_guest_sees_its_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    async with LguestDevice(engines="pool") as dev:
        g, reader = await sleeper(dev)
        await until(lambda: g.memory.packed, LIMIT)
        cpu = g.file.cpu(0)
        seen = bytes(cpu.emulator.mem_read(0, 32 * PAGE))  # a debugger's way in: no ram read
        assert not g.memory.packed
        assert seen == g.memory.read(0, 32 * PAGE) and any(seen)
        await g.file.close()
        with pytest.raises(OSError):
            await reader
        g.memory.close()


async def test_a_file_read_on_a_thread_keeps_the_memory_from_packing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest waits (its CPU idle) while its read fills guest RAM on a worker thread:
    packing then would lose what the thread writes, so the read pins the memory."""
    entered, release = threading.Event(), threading.Event()
    real_read = files._read

    def slow_read(fd: int, view: memoryview, offset: int | None) -> int:
        entered.set()
        release.wait()
        return real_read(fd, view, offset)

    monkeypatch.setattr(files, "_read", slow_read)
    monkeypatch.setattr(files, "_read_cached", lambda fd, view, offset: 0)
    (tmp_path / "x").write_bytes(b"0123456789")
    mem = GuestMemory((1 << 20) + PAGE)
    dev = files.FilesDevice([files.Grant(tmp_path, "/d")])
    await dev.start()
    try:
        slot = slot_at_1m(mem)
        dev.attach(slot)
        request = Requests(dev, slot)
        mem.write(0x1000, b"/d/x")
        assert await request(files.OP_OPENAT, files.AT_FDCWD & 0xFFFFFFFF, 0x1000, 4, 0, 0) == 3
        reading = asyncio.create_task(request(files.OP_READ, 3, 0x2000, 10))
        await asyncio.to_thread(entered.wait)
        assert not mem.pack()  # pinned while the thread holds its view
        release.set()
        assert await reading == 10
        assert mem.pack()  # (and once it is done, nothing holds it)
        assert mem.read(0x2000, 10) == b"0123456789"
    finally:
        release.set()
        await dev.stop()
        mem.close()
