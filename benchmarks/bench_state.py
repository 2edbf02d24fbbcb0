"""Pause, capture and revive: one guest moved into a new file 10,000 times in a row.

Supervised: ``await f.pause()`` (a read in flight), ``f.state()``, close the old
file, ``dev.open(memory, state=...)`` and a read that runs it on to its next
notify.  Raw: the same guest in bare Unicorn, ``context_save``, a new ``Uc``
with the same setup (translation buffer, ``mem_map_ptr``, no exits), the
context restored and the old instance closed, then run on to the same point.
The guest's memory stays where it is in both.  At the end the counter the guest
keeps must say it ran every step exactly once (a read that got its notify before
the pause, as a read that never waits may, is one more step).
"""

from __future__ import annotations

import asyncio

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, UC_PROT_ALL, Uc

from supervisor import LguestDevice, abi

from .guests import assemble, boot
from .harness import Profile, Result, now
from .raw import RawCpu

# Counts steps in `counter`, notifying 0x77 after each (the revive point).
STEPPER = r"""
main:
    LGUEST_INIT
1:  incl counter
    HCALL 17, 0x77
    jmp 1b
.data
counter: .long 0
"""


def _raw_cycles(n: int) -> float:
    image = assemble(STEPPER)
    cpu = RawCpu(image)
    size = cpu.layout.pfn_limit * abi.PAGE_SIZE
    address = cpu.memory.address

    def stop_at_hypercall(uc: object, vector: int, _data: object) -> None:
        cpu.uc.emu_stop()

    cpu.on_interrupt(stop_at_hypercall)
    cpu.uc.emu_start(image.symbols["_start"], 1 << 32)  # to LGUEST_INIT's hypercall
    t0 = now()
    for _ in range(n):
        context = cpu.uc.context_save()
        uc = Uc(UC_ARCH_X86, UC_MODE_32)
        uc.ctl_set_tcg_buffer_size(1 << 20)
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        uc.mem_map_ptr(0, size, UC_PROT_ALL, address)
        uc.context_restore(context)
        cpu.uc = uc
        uc.hook_add(UC_HOOK_INTR, stop_at_hypercall)
        eip = uc.reg_read(0x1A)  # UC_X86_REG_EIP
        uc.emu_start(eip, 1 << 32)
    elapsed = now() - t0
    assert cpu.u32("counter") == n, "the raw stepper lost or repeated a step"
    cpu.close()
    return elapsed / n


async def _sup_cycles(n: int) -> float:
    async with LguestDevice() as dev:
        g = await boot(dev, STEPPER)
        f, memory = g.file, g.memory
        assert abi.unpack_words(await f.read(abi.WORD_SIZE)) == (0x77,)
        t0 = now()
        finished = 0  # reads that got their notify before the pause: a step each
        for _ in range(n):
            read = asyncio.ensure_future(f.read(abi.WORD_SIZE))
            await asyncio.sleep(0)
            await f.pause()
            state = f.state()
            await f.close()
            read.cancel()
            (outcome,) = await asyncio.gather(read, return_exceptions=True)
            finished += outcome == abi.pack_words(0x77)
            f = dev.open(memory, state=state)
            assert abi.unpack_words(await f.read(abi.WORD_SIZE)) == (0x77,)
        elapsed = now() - t0
        assert g.u32("counter") == n + 1 + finished, "a step was lost or repeated"
        await f.close()
        memory.close()
    return elapsed / n


async def revive(p: Profile) -> list[Result]:
    n = p.revives
    raw = _raw_cycles(n)
    sup = await _sup_cycles(n)
    return [
        Result(
            "revive",
            f"pause + state() + revive, {n:,} times in a row",
            "us",
            sup * 1e6,
            raw * 1e6,
            sup / raw,
            2.0,
            "ratio",
            "lower",
            "raw: context_save + new Uc (same setup) + context_restore; each cycle then "
            "runs the guest to its next notify",
        )
    ]
