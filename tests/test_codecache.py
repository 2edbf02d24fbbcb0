"""Host writes over code the guest already ran: the guest runs the new bytes.

``codecache.drop_stale`` has three ways to drop a CPU's translations of a range the
Host wrote: in C (``_slicing.drop``, the native paths), in Python (page walks and one
engine call per range) and the whole-cache flush (user mode, or no alias maps the
range).  Each is forced in turn here; each must make the guest run the new code, and
the C one must make no Python page walk or register read.
"""

from __future__ import annotations

from typing import Any

import pytest
from guestasm import boot, notified, present
from unicorn import Uc

from supervisor import LguestDevice, _slicing, codecache, pagetables
from supervisor.cpu import LgCpu

# The subject is the translations dropped after Host writes, not the event loop:
# one loop (conftest).
pytestmark = pytest.mark.one_loop

PATCHED = r"""
main:
    LGUEST_INIT
1:  call func
    mov %eax, result
    HCALL 17, 1
    jmp 1b
.data
result: .long 0
.align 4096
func:
    mov $1, %eax
    ret
    .space 4090
"""
MOV_EAX_RET = b"\xb8%s\xc3"  # mov $imm32, %eax; ret


@pytest.mark.parametrize("way", ["native", "python", "flush"])
async def test_the_guest_runs_code_the_host_wrote_over_code_it_ran(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    if way == "native" and not _slicing.NATIVE:
        pytest.skip("no native slicing here")
    if way != "native":
        forced = None if way == "python" else False
        monkeypatch.setattr(_slicing, "drop", lambda *_args: forced)
    # Python page walks and register reads made inside drop_stale, and its calls.
    walks: list[int] = []
    drops: list[int] = []
    inside: list[bool] = [False]
    real_drop, real_walk, real_reg = codecache.drop_stale, pagetables.guest_pa, LgCpu.reg

    def counting_drop(cpu: LgCpu) -> None:
        drops.append(len(cpu.stale_code))
        inside[0] = True
        try:
            real_drop(cpu)
        finally:
            inside[0] = False

    def counting_walk(*args: Any, **kwargs: Any) -> int | None:
        walks.append(inside[0])
        return real_walk(*args, **kwargs)

    def counting_reg(cpu: LgCpu, reg: int) -> int:
        walks.append(inside[0])
        return real_reg(cpu, reg)

    monkeypatch.setattr(codecache, "drop_stale", counting_drop)
    monkeypatch.setattr(codecache, "guest_pa", counting_walk)
    monkeypatch.setattr(LgCpu, "reg", counting_reg)
    # Whole-cache flushes made inside drop_stale, on whichever engine the CPU holds then
    # (under LGUEST_ENGINE_SWITCH=always a different one at every slice).
    flushes: list[int] = []
    real_flush = Uc.ctl_flush_tb

    def counting_flush(uc: Uc) -> None:
        if inside[0]:
            flushes.append(1)
        real_flush(uc)

    monkeypatch.setattr(Uc, "ctl_flush_tb", counting_flush)
    g = await boot(dev, PATCHED)
    func = g.guest.symbols["func"]
    seen = []
    for value in (1, 2, 3, 0x12345678):
        assert await notified(g) == 1
        seen.append(g.u32("result"))
        g.memory.write(func, MOV_EAX_RET % (value + 1).to_bytes(4, "little"))
    assert await notified(g) == 1
    seen.append(g.u32("result"))
    # Every call after a Host write ran what the Host wrote, not the old translation.
    assert seen == [1, 2, 3, 4, 0x12345679]
    if dev.engines is not None and dev.engines.always:
        return  # (every slice on a switched engine, which holds no translation to drop)
    assert len([n for n in drops if n]) >= 4  # (at least) one drop per Host write
    if way == "native":
        assert True not in walks  # the lookups were made in C
    elif way == "python":
        assert True in walks
    else:
        assert len(flushes) >= 4


async def test_one_write_is_one_range_and_many_are_merged(dev: LguestDevice) -> None:
    """drop_stale takes every recorded range, whichever way it drops them."""
    g = await boot(dev, PATCHED)
    assert await notified(g) == 1
    cpu = g.file.cpu(0)
    cpu.thaw()  # (waiting for its Launcher, it may hold no engine: the drops need one)
    func = g.guest.symbols["func"]
    cpu.stale_code.clear()
    g.memory.write(func, b"\x90")
    assert list(cpu.stale_code) == [(func, func + 1)]
    codecache.drop_stale(cpu)
    assert not cpu.stale_code
    cpu.stale_code.extend([(func + 8, func + 12), (func, func + 8), (func + 0x1000, func + 0x1004)])
    codecache.drop_stale(cpu)
    assert not cpu.stale_code


@pytest.mark.parametrize("mapped", ["identity", "kernel_address", "KERNEL_ALIAS", "nowhere"])
async def test_the_c_lookup_finds_the_alias_the_python_one_finds(
    dev: LguestDevice, mapped: str
) -> None:
    """With the written page mapped at its physical address, at the guest's
    kernel_address, at KERNEL_ALIAS or nowhere, _slicing.drop drops it (True) exactly
    when codecache's Python lookup finds an alias, and else asks for a flush (False)."""
    if not _slicing.NATIVE:
        pytest.skip("no native slicing here")
    from unicorn import x86_const as r

    g = await boot(dev, PATCHED)
    assert await notified(g) == 1
    cpu = g.file.cpu(0)
    lg = cpu.lg
    func = g.guest.symbols["func"]
    assert func < 1 << 22  # (in the first 4 MiB, which one directory entry maps)
    pgdir = cpu.reg(r.UC_X86_REG_CR3) & ~0xFFF
    low = present(lg.read_u32(pgdir))
    if mapped == "kernel_address":
        lg.kernel_address = 0x80000000
        assert lg.write_u32(pgdir + 4 * (lg.kernel_address >> 22), low)
    if mapped == "KERNEL_ALIAS":
        assert lg.write_u32(pgdir + 4 * (codecache.KERNEL_ALIAS >> 22), low)
    else:
        assert lg.write_u32(pgdir + 4 * (codecache.KERNEL_ALIAS >> 22), 0)
    if mapped != "identity":
        assert lg.write_u32(pgdir, 0)
    cpu.flush_tlb()
    cpu.stale_code.clear()
    found = codecache._mapped_at(cpu, func, cpu.control())
    assert (found is not None) == (mapped != "nowhere")
    assert _slicing.drop(cpu.fuel, [(func, func + 6)], lg.kernel_address) is (found is not None)
