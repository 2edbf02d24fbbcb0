"""Cancellation at any point leaves nothing pending, and loses or repeats nothing.

After each cancellation the test asserts (``fuzz_guests.quiescent``): no new task
is alive, the device's executor runs a sentinel promptly (no queued or stuck
slice), the only new threads are the device's, and no CPU is still marked as
being read.
"""

from __future__ import annotations

import asyncio
import errno
import threading

import pytest
from fuzz_guests import FUZZ, executor_idle, quiescent
from guestasm import SPIN, Booted, boot, until
from hypothesis import given
from hypothesis import strategies as st

from supervisor import LguestDevice, abi
from supervisor.abi import LHREQ_BREAK, LHREQ_INITIALIZE, pack_words
from supervisor.cpu import LgCpu

TIMEOUT = 60.0  # seconds: a bound for failing (a hang on a loaded machine), never a wait

# Notifies 1, 2, ... N, with local hypercalls (done inside slices) in between.
SEQUENCE = r"""
.set N, {n}
main:
    LGUEST_INIT
1:  incl seq
    HCALL 8, 1
    HCALL 5, 1
    HCALL 8, 0
    mov $17, %eax
    mov seq, %edx
    int $0x1f
    cmpl $N, seq
    jne 1b
    HCALL 2, msg, 1, 0
.data
seq: .long 0
msg: .asciz "done"
"""

# Halts; the clock event (armed first) wakes it and its handler notifies.
TIMER = r"""
main:
    LGUEST_INIT
    IDT 32, tick
    HCALL 9, 20000000
1:  HCALL 10
    jmp 1b
tick:
    HCALL 17, 0x71c
    jmp irq_return
"""


def snapshot() -> tuple[set[asyncio.Task[object]], list[threading.Thread]]:
    return set(asyncio.all_tasks()), threading.enumerate()


async def cancelled(task: asyncio.Task[object]) -> None:
    """Cancel ``task`` and check that it ends with CancelledError, promptly."""
    task.cancel()
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(asyncio.CancelledError):
            await task


def cpu0(g: Booted) -> LgCpu:
    return g.file.cpu(0)


async def test_cancel_during_a_slice(dev: LguestDevice) -> None:
    before = snapshot()
    g = await boot(dev, SPIN)
    for _ in range(20):
        reader = asyncio.create_task(g.file.read(8))
        start = g.u32("counter")
        await until(lambda: g.u32("counter") > start, TIMEOUT)  # noqa: B023 - inside a slice
        await cancelled(reader)
        await quiescent(dev, *before)
        stopped = g.u32("counter")
        await asyncio.sleep(0)
        assert g.u32("counter") == stopped, "the guest ran on after its read was cancelled"
    await g.file.close()
    g.memory.close()
    await quiescent(dev, *before)


@FUZZ
@given(delays=st.lists(st.integers(0, 40), min_size=1, max_size=40))
async def test_cancelling_reads_anywhere_loses_and_repeats_no_notify(
    dev: LguestDevice, delays: list[int]
) -> None:
    """Cancel the read after a random number of loop turns, again and again."""
    before = snapshot()
    n = 200
    g = await boot(dev, SEQUENCE.format(n=n))
    received = []
    i = 0
    async with asyncio.timeout(TIMEOUT):
        while True:
            reader = asyncio.create_task(g.file.read(abi.WORD_SIZE))
            for _ in range(delays[i % len(delays)]):
                await asyncio.sleep(0)
            i += 1
            if i % 4 and not reader.done():  # every fourth read runs to its end: progress
                reader.cancel()
            try:
                received.append(abi.unpack_words(await reader)[0])
            except asyncio.CancelledError:
                await quiescent(dev, *before)
            except FileNotFoundError:
                break
    assert received == list(range(1, n + 1))
    assert g.file.death is not None and g.file.death.reason == "done"
    await g.file.close()
    g.memory.close()
    await quiescent(dev, *before)


async def test_cancel_while_halted_keeps_the_timer(dev: LguestDevice) -> None:
    before = snapshot()
    g = await boot(dev, TIMER)
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: cpu0(g).halted, TIMEOUT)
    await cancelled(reader)  # cancelled in the wakeup wait
    await quiescent(dev, *before)
    async with asyncio.timeout(TIMEOUT):
        assert await g.file.read(8) == pack_words(0x71C)  # the armed clock still fires
    await g.file.close()
    g.memory.close()
    await quiescent(dev, *before)


async def test_cancel_during_a_break_wait(dev: LguestDevice) -> None:
    before = snapshot()
    g = await boot(dev, SPIN)
    reader = asyncio.create_task(g.file.read(8))
    waker = asyncio.create_task(g.file.waker().write(pack_words(LHREQ_BREAK, 1)))
    async with asyncio.timeout(TIMEOUT):
        with pytest.raises(BlockingIOError):
            await reader
    assert not waker.done()
    await cancelled(waker)  # cancelled while waiting for BREAK 0
    await quiescent(dev, *before)
    # The break stays on (as documented) until the Launcher releases it.
    with pytest.raises(BlockingIOError):
        await g.file.read(8)
    await g.file.write(pack_words(LHREQ_BREAK, 0))
    reader = asyncio.create_task(g.file.read(8))
    start = g.u32("counter")
    await until(lambda: g.u32("counter") > start, TIMEOUT)
    await cancelled(reader)
    await g.file.close()
    g.memory.close()
    await quiescent(dev, *before)


async def init_task(dev: LguestDevice) -> tuple[Booted, asyncio.Task[int]]:
    from guestasm import assemble, load

    from supervisor.launcher.layout import IMAGE_BASE

    guest = assemble(SPIN)
    memory, layout = load(guest)
    f = dev.open(memory)
    words = pack_words(LHREQ_INITIALIZE, memory.address, layout.pfn_limit, layout.pgdir, IMAGE_BASE)
    return Booted(f, memory, layout, guest), asyncio.create_task(f.write(words))


async def test_cancel_initialize_before_it_starts_and_while_it_waits(dev: LguestDevice) -> None:
    before = snapshot()
    # Before it ever runs.
    g, init = await init_task(dev)
    await cancelled(init)
    assert g.file.stats is None and g.file.death is None  # nothing was created
    # While it waits for the Big Lguest lock.
    h, init2 = await init_task(dev)
    async with dev.lock:
        await asyncio.sleep(0)
        assert not init2.done()
        await cancelled(init2)
    assert h.file.stats is None
    await quiescent(dev, *before)
    # Both files are still usable: INITIALIZE works now, and the guests run.
    for b in (g, h):
        words = pack_words(
            LHREQ_INITIALIZE, b.memory.address, b.layout.pfn_limit, b.layout.pgdir, 0x10000
        )
        await b.file.write(words)
        reader = asyncio.create_task(b.file.read(8))
        await until(lambda: b.u32("counter") > 0, TIMEOUT)  # noqa: B023 - awaited at once
        await cancelled(reader)
        await b.file.close()
        b.memory.close()
    await quiescent(dev, *before)


async def test_cancelled_close_still_frees_everything(dev: LguestDevice) -> None:
    """close() cancelled while it waits for the running read: the guest is still freed."""
    before = snapshot()
    g = await boot(dev, SPIN)
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: g.u32("counter") > 0, TIMEOUT)
    closer = asyncio.create_task(g.file.close())
    await asyncio.sleep(0)  # close() has kicked the CPU and waits for the read to end
    closer.cancel()
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(closer, return_exceptions=True)
        with pytest.raises(OSError) as e:
            await reader
        await g.file.close()  # waits for the release the cancelled close started
    assert e.value.errno == errno.EBADF
    assert g.file.closed and g.file not in dev.files
    g.memory.close()  # the device let go of the memory
    await quiescent(dev, *before)


async def test_cancelled_close_reraises_cancelled_error(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: g.u32("counter") > 0, TIMEOUT)
    closer = asyncio.create_task(g.file.close())
    await asyncio.sleep(0)
    closer.cancel()
    try:
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(asyncio.CancelledError):
                await closer
    finally:
        await asyncio.gather(reader, return_exceptions=True)
        g.memory.close()


async def test_close_cancelled_while_waiting_for_the_lock_still_stops_the_guest(
    dev: LguestDevice,
) -> None:
    g = await boot(dev, SPIN)
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: g.u32("counter") > 0, TIMEOUT)
    try:
        async with dev.lock:  # someone else's INITIALIZE or close holds the lock
            closer = asyncio.create_task(g.file.close())
            await asyncio.sleep(0)
            closer.cancel()
            await asyncio.gather(closer, return_exceptions=True)
        assert g.file.closed
        # A closed file's guest must not run: its read must end with EBADF.
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(OSError) as e:
                await asyncio.shield(reader)
        assert e.value.errno == errno.EBADF
        await g.file.close()  # the freeing the cancelled close started ends
        g.memory.close()  # and its memory must be released
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def test_aclose_while_another_close_waits_for_the_lock(dev: LguestDevice) -> None:
    """aclose() stops every guest at once, even one whose close() waits for the lock;
    the freeing, which needs the lock, finishes when the lock is free."""
    g = await boot(dev, SPIN)
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: g.u32("counter") > 0, TIMEOUT)
    await dev.lock.acquire()
    closer = asyncio.create_task(g.file.close())
    await asyncio.sleep(0)
    closing = asyncio.create_task(dev.aclose())
    try:
        async with asyncio.timeout(TIMEOUT):
            # The guest stops while the lock is still held.
            with pytest.raises(OSError) as e:
                await asyncio.shield(reader)
            assert e.value.errno == errno.EBADF
            assert not closing.done()
            dev.lock.release()
            await closing
            await closer
        assert not dev.files
    finally:
        if dev.lock.locked():
            dev.lock.release()
        await asyncio.gather(closer, reader, closing, return_exceptions=True)
        g.memory.close()


async def test_cancel_device_aclose_then_aclose_again(dev: LguestDevice) -> None:
    before = snapshot()
    guests = [await boot(dev, SPIN) for _ in range(3)]
    readers = [asyncio.create_task(g.file.read(8)) for g in guests]
    await until(lambda: all(g.u32("counter") for g in guests), TIMEOUT)
    closing = asyncio.create_task(dev.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(closing, return_exceptions=True)
        await dev.aclose()
        results = await asyncio.gather(*readers, return_exceptions=True)
    assert all(isinstance(r, OSError) and r.errno == errno.EBADF for r in results), results
    assert not dev.files
    for g in guests:
        g.memory.close()
    stray = {t for t in asyncio.all_tasks() if t not in before[0]}
    assert not stray
    assert not [t for t in threading.enumerate() if t not in before[1]]


async def test_executor_is_idle_after_many_cancelled_slices(dev: LguestDevice) -> None:
    before = snapshot()
    guests = [await boot(dev, SPIN) for _ in range(6)]
    for _ in range(30):
        readers = [asyncio.create_task(g.file.read(8)) for g in guests]
        await asyncio.sleep(0)
        for r in readers:
            r.cancel()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*readers, return_exceptions=True)
        await executor_idle(dev)
    await quiescent(dev, *before)
    for g in guests:
        await g.file.close()
        g.memory.close()
