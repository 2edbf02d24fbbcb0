"""A guest's start-up (open, INITIALIZE, the read to its first NOTIFY): what it does
and what it leaves undone, counted (the time it takes is benchmarks' ``startup``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from guestasm import boot, present
from unicorn import x86_const as r

from supervisor import LguestDevice, _slicing, _unicorn, abi
from supervisor import cpu as cpu_module
from supervisor.abi import PAGE_SIZE
from supervisor.cpu import DEFAULT_TCG_BUFFER
from supervisor.engines import EnginePool
from supervisor.memory import GuestMemory

# Starts as a guest does (its lguest_data, a clock event), then notifies.
STARTER = r"""
main:
    LGUEST_INIT
    HCALL 9, 50000000
1:  HCALL 17, 1
    jmp 1b
"""


def pool_of(dev: LguestDevice) -> EnginePool:
    return present(dev.engines)


def count_flushes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every translation flush :mod:`supervisor._unicorn` asks of Unicorn from now on."""
    flushes: list[int] = []
    ctl = _unicorn._CTL

    def counting(*args: Any) -> Any:
        if args[1] == _unicorn.FLUSH_TB_REQUEST:
            flushes.append(1)
        return ctl(*args)

    monkeypatch.setattr(_unicorn, "_CTL", counting)
    return flushes


async def test_an_engine_a_closed_cpu_left_is_taken_without_a_second_flush(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A closed CPU's engine goes back unbound, its translations dropped with its
    memory; the next CPU that takes it maps its own memory and flushes nothing.  One a
    halted CPU left, its memory still mapped, is unbound as it is taken: the unmap drops
    that memory's translations, and no whole-cache flush follows either."""
    async with LguestDevice(engines="pool") as dev:
        pool = pool_of(dev)
        first = await boot(dev, STARTER)
        assert await first.file.read(abi.WORD_SIZE) == abi.pack_words(1)
        await first.file.close()
        first.memory.close()
        assert pool.idle == pool.live == 1  # its engine, unbound: the one spare
        flushes = count_flushes(monkeypatch)
        hooked, made = pool.hooked, pool.made
        g = await boot(dev, STARTER)
        assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)
        assert (pool.hooked, pool.made) == (hooked + 1, made)
        assert flushes == []
        # Its engine, given back with its memory mapped when its read ended: another CPU
        # taking it unmaps that memory, which drops its translations.
        await asyncio.sleep(0)
        assert g.file.cpu(0).hibernated and pool.idle == pool.live == 1
        other = await boot(dev, STARTER)
        assert await other.file.read(abi.WORD_SIZE) == abi.pack_words(1)
        assert (pool.hooked, pool.made) == (hooked + 2, made)
        assert flushes == []


async def test_a_new_cpu_gets_its_empty_idt_without_converting_each_gate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """INITIALIZE clears the new CPU's IDT in one go; the guest's own gates still go in
    one by one, and a state's whole table is put back."""
    set_gates: list[object] = []
    setitem = cpu_module.Idt.__setitem__

    def counting(self: cpu_module.Idt, index: Any, value: Any) -> None:
        set_gates.append(index)
        setitem(self, index, value)

    monkeypatch.setattr(cpu_module.Idt, "__setitem__", counting)
    async with LguestDevice(engines="pool") as dev:
        g = await boot(dev, STARTER)
        cpu = g.file.cpu(0)
        assert set_gates == []
        assert set(cpu.idt) == {(0, 0)} and len(cpu.idt) == abi.IDT_ENTRIES
        cpu.idt[32] = (0x1234, 0x5678)
        state = cpu.capture(None)
        cpu.idt = cpu_module._idt()
        assert set(cpu.idt) == {(0, 0)}
        cpu.restore(state)
        assert cpu.idt[32] == (0x1234, 0x5678)
        assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)


async def test_a_new_cpu_takes_the_hypercall_masks_made_for_the_first() -> None:
    """The native hook's hypercall sets are checked and turned into masks once, not
    again for each new CPU."""
    if not _slicing.NATIVE:
        pytest.skip("no native interrupt hook")
    async with LguestDevice(engines="pool") as dev:
        await boot(dev, STARTER)
        made = _slicing.call_masks.cache_info().misses
        g = await boot(dev, STARTER)
        assert _slicing.call_masks.cache_info().misses == made
        assert g.file.cpu(0).fuel.local_mask and g.file.cpu(0).fuel.native_mask
        assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)


async def test_a_new_cpu_counts_its_time_on_the_loop_from_its_making() -> None:
    """A new CPU has not run: its first slice owes the loop no turn for what ran before it
    was made (run.YIELD_TIME counts from its making, as from a wait)."""
    async with LguestDevice(engines="pool") as dev:
        before = time.thread_time()
        g = await boot(dev, STARTER)
        assert before <= g.file.cpu(0).run.yielded_at <= time.thread_time()


@pytest.mark.usefixtures("whole_inline_slices")
async def test_a_start_up_is_one_slice_that_keeps_the_loop_to_the_first_notify() -> None:
    """The read from INITIALIZE to the first NOTIFY runs on the event loop in one slice:
    LGUEST_INIT and the clock event are done between two entries of that slice, and no
    other callback runs before the read returns, as long as the slice has the time: a
    start-up that uses up LONG_INLINE_TIME (the first translations of a process beside
    CPU-bound processes can) or runs longer than run.YIELD_TIME goes on on a worker, and
    the loop runs other callbacks meanwhile.  Here the slice has all the time it takes."""
    async with LguestDevice(engines="pool") as dev:
        g = await boot(dev, STARTER)
        others: list[int] = []
        asyncio.get_running_loop().call_soon(others.append, 1)
        assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)
        assert others == []
        stats = present(g.file.stats)
        assert (stats.slices, stats.hypercalls) == (1, 3)
        # Once it has started, a read with nobody serving notifies ends its slice at a
        # hypercall the run loop does, as before.
        assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)
        assert present(g.file.stats).slices == 2


def test_mapping_memory_anew_leaves_no_tlb_entry_of_the_old_memory() -> None:
    """Unicorn flushes the TLB when the memory map changes, so an engine that takes off
    one CPU's memory and maps another's (:func:`_unicorn.unbind`, then
    :func:`_unicorn.map_memory`) reads the new memory with no cr3 written in between:
    what :meth:`LgCpu.take_engine` relies on."""
    code = bytes.fromhex("a1 00 08 00 00 f4")  # mov 0x800, %eax; hlt
    memories = [GuestMemory(PAGE_SIZE), GuestMemory(PAGE_SIZE)]
    for n, memory in enumerate(memories):
        memory.write(0, code)
        memory.write(0x800, (0x1111 * (n + 1)).to_bytes(4, "little"))
    uc = _unicorn.new_instance(DEFAULT_TCG_BUFFER)
    try:
        for memory in memories:
            _unicorn.map_memory(uc, PAGE_SIZE, memory.address)
            uc.reg_write(r.UC_X86_REG_EIP, 0)
            uc.emu_start(0, PAGE_SIZE)
            assert uc.reg_read(r.UC_X86_REG_EAX) == int.from_bytes(memory.read(0x800, 4), "little")
            _unicorn.unbind(uc)
    finally:
        _unicorn.close(uc)
        for memory in memories:
            memory.close()


async def test_a_cpu_taking_an_engine_writes_no_cr3(monkeypatch: pytest.MonkeyPatch) -> None:
    """A start-up's engine, another CPU's before, gets the new CPU's registers and
    memory and nothing more: no cr3 write to flush a TLB the mapping flushed already."""
    written: list[int] = []
    write = _unicorn.Registers.write

    def counting(self: _unicorn.Registers, reg: int, value: int) -> None:
        written.append(reg)
        write(self, reg, value)

    async with LguestDevice(engines="pool") as dev:
        pool = pool_of(dev)
        first = await boot(dev, STARTER)
        assert await first.file.read(abi.WORD_SIZE) == abi.pack_words(1)
        await first.file.close()
        monkeypatch.setattr(_unicorn.Registers, "write", counting)
        switched = pool.switched
        g = await boot(dev, STARTER)
        assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)
        assert pool.switched == switched + 1
        assert r.UC_X86_REG_CR3 not in written
