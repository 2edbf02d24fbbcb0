"""The engine pool: CPUs hand warmed Unicorn instances around, exactly."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from guestasm import Booted, boot, present, until
from unicorn import UcError
from unicorn import unicorn_const as uc_const

from supervisor import LguestDevice, _slicing, _unicorn, abi
from supervisor.engines import EnginePool

LIMIT = 60  # seconds: a bound for failing, never a wait for success

# Counts in memory, in ebx and in xmm0 (SSE), then notifies; every slice boundary in
# between is a chance for a switched engine to lose a register or a write.
SSE_COUNT = r"""
.set TARGET, {target}
main:
    LGUEST_INIT
    xor %ebx, %ebx
    mov $1, %ecx
    movd %ecx, %xmm1
    pxor %xmm0, %xmm0
1:  incl counter
    inc %ebx
    paddd %xmm1, %xmm0
    cmpl $TARGET, counter
    jne 1b
    mov %ebx, regcount
    movd %xmm0, %eax
    mov %eax, ssecount
    HCALL 17, 0xc0ffee
1:  HCALL 10
    jmp 1b
.data
counter: .long 0
regcount: .long 0
ssecount: .long 0
"""

SPIN = r"""
main:
    LGUEST_INIT
1:  incl counter
    jmp 1b
.data
counter: .long 0
"""

HALT = r"""
main:
    LGUEST_INIT
1:  HCALL 10
    jmp 1b
"""


def pool_of(dev: LguestDevice) -> EnginePool:
    return present(dev.engines)


async def test_every_slice_on_a_switched_engine_computes_exactly() -> None:
    target = 400_000
    async with LguestDevice(engines="always", hibernate_after=math.inf) as dev:
        guests = [await boot(dev, SSE_COUNT.format(target=target)) for _ in range(3)]
        async with asyncio.timeout(LIMIT):
            words = await asyncio.gather(*(g.file.read(abi.WORD_SIZE) for g in guests))
        pool = pool_of(dev)
        slices = sum(g.file.cpu(0).stats.slices for g in guests)
        for g, word in zip(guests, words, strict=True):
            assert word == abi.pack_words(0xC0FFEE)
            assert (g.u32("counter"), g.u32("regcount"), g.u32("ssecount")) == (target,) * 3
        # Every slice after a guest's first took an engine another CPU had used.
        assert slices > 3 * 3
        assert pool.switched >= slices - 3
        assert pool.reused == 0
        assert pool.live <= pool.keep + len(guests)


async def paused_spinner(dev: LguestDevice) -> tuple[Booted, asyncio.Future[bytes]]:
    g = await boot(dev, SPIN)
    reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
    await until(lambda: g.u32("counter") > 1000, LIMIT)
    await g.file.pause()
    return g, reader


async def test_a_cpu_gets_its_own_engine_back_untouched_unless_another_took_it() -> None:
    async with LguestDevice(engines="pool", hibernate_after=math.inf) as dev:
        pool = pool_of(dev)
        a, reader_a = await paused_spinner(dev)
        cpu_a = a.file.cpu(0)
        uc_a = cpu_a.engine.uc
        eip = cpu_a.eip
        assert cpu_a.hibernate()
        cpu_a.thaw()
        assert cpu_a.engine.uc is uc_a and pool.reused == 1 and pool.switched == 0
        assert cpu_a.eip == eip
        # Given back again, then taken by a new guest: A gets another engine, switched.
        assert cpu_a.hibernate()
        b, reader_b = await paused_spinner(dev)
        cpu_b = b.file.cpu(0)
        assert cpu_b.engine.uc is uc_a and pool.switched == 1
        counter_a = a.u32("counter")
        cpu_a.thaw()
        assert cpu_a.engine.uc is not uc_a and cpu_a.eip == eip
        # Each computes in its own memory on its new engine.
        a.file.resume()
        b.file.resume()
        counter_b = b.u32("counter")
        await until(lambda: a.u32("counter") > counter_a + 1000, LIMIT)
        await until(lambda: b.u32("counter") > counter_b + 1000, LIMIT)
        for g, reader in ((a, reader_a), (b, reader_b)):
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
            assert g.file.death is None


async def test_the_pool_keeps_at_most_its_bound_of_idle_engines() -> None:
    async with LguestDevice(engines="pool", workers=1, hibernate_after=0) as dev:
        pool = pool_of(dev)
        guests = [await boot(dev, HALT) for _ in range(3 * pool.keep)]
        readers = [asyncio.ensure_future(g.file.read(abi.WORD_SIZE)) for g in guests]
        await until(lambda: all(g.file.cpu(0).hibernated for g in guests), LIMIT)
        assert pool.idle == pool.keep
        assert pool.live == pool.keep  # nobody holds one: every halted CPU gave it back
        assert pool.closed == pool.made - pool.keep
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_an_engine_that_raised_inside_unicorn_is_closed_not_handed_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_run = _slicing.run

    def failing_run(uc: Any, *args: Any) -> Any:
        if uc is doomed:
            raise UcError(uc_const.UC_ERR_EXCEPTION)
        return real_run(uc, *args)

    async with LguestDevice(engines="pool", hibernate_after=math.inf) as dev:
        pool = pool_of(dev)
        g, reader = await paused_spinner(dev)
        doomed = g.file.cpu(0).engine.uc
        monkeypatch.setattr(_slicing, "run", failing_run)
        g.file.resume()
        async with asyncio.timeout(LIMIT):
            with pytest.raises(OSError):
                await reader
        assert "emulation error" in present(g.file.death).reason
        await g.file.close()
        assert _unicorn.is_closed(doomed)
        assert pool.idle == 0 and pool.closed == 1 and pool.live == 0
        # The next guest gets a new engine, and runs.
        h, reader_h = await paused_spinner(dev)
        assert h.file.cpu(0).engine.uc is not doomed
        reader_h.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader_h


WAKER = r"""
main:
    LGUEST_INIT
    IDT 32, tick
    HCALL 9, 50000
1:  HCALL 10
    jmp 1b
tick:
    incl ticks
    HCALL 9, 50000
    jmp irq_return
.data
ticks: .long 0
"""


async def test_no_engine_is_ever_held_by_two_cpus_among_spinners_and_wakers() -> None:
    async with LguestDevice(engines="pool", workers=1, hibernate_after=0) as dev:
        pool = pool_of(dev)
        spinners = [await boot(dev, SPIN) for _ in range(10)]
        wakers = [await boot(dev, WAKER) for _ in range(10)]
        guests = spinners + wakers
        readers = [asyncio.ensure_future(g.file.read(abi.WORD_SIZE)) for g in guests]
        samples = 0

        def check() -> bool:
            nonlocal samples
            held = [g.file.cpu(0).engine.uc for g in guests]
            held = [uc for uc in held if uc is not None]
            assert len({id(uc) for uc in held}) == len(held)  # never one engine for two CPUs
            assert pool.live == len(held) + pool.idle  # every engine made is somewhere
            assert pool.idle <= pool.keep
            samples += 1
            return all(g.u32("ticks") >= 20 for g in wakers) and all(
                g.u32("counter") > 0 for g in spinners
            )

        await until(check, LIMIT)
        assert samples > 1 and pool.switched + pool.reused > 0
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        assert all(g.file.death is None for g in guests)
