"""The notify and hypercall paths do each thing once (issue 15): what the fast path
must keep doing, and what it must not do twice."""

import asyncio
import itertools
import time

from guestasm import boot

from supervisor import _slicing, _unicorn, abi, run
from supervisor.execute import INLINE_TIME

NOTIFY_LOOP = r"""
main:
    LGUEST_INIT
rt: HCALL 17, 1
    jmp rt
"""


async def test_a_hypercall_trap_reads_the_guest_registers_once(dev, monkeypatch):
    g = await boot(dev, NOTIFY_LOOP)
    await g.file.read(abi.WORD_SIZE)
    reads = 0
    original = _unicorn.Registers.hypercall

    def counted(self: _unicorn.Registers) -> tuple[int, int, int, int]:
        nonlocal reads
        reads += 1
        return original(self)

    monkeypatch.setattr(_unicorn.Registers, "hypercall", counted)
    for _ in range(50):
        assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)
    # The fallback's Python hook reads them once; on the native paths _fuel.c's hook does.
    assert reads == (0 if _slicing.NATIVE else 50)


async def test_a_reader_that_never_waits_still_lets_the_loop_run(dev, monkeypatch):
    """Inline slices need not yield after every notify, but they yield once INLINE_TIME
    has passed since they last did: a Launcher whose reads always return at once cannot
    starve other tasks.  (A fake clock that advances a bit more than a quarter of
    INLINE_TIME per look: exactly a quarter, summed in floating point onto the real
    clock's value, sometimes falls short of INLINE_TIME after four looks.)"""
    g = await boot(dev, NOTIFY_LOOP)
    await g.file.read(abi.WORD_SIZE)
    clock = [time.monotonic()]

    class Clock:
        @staticmethod
        def monotonic() -> float:
            clock[0] += INLINE_TIME / 3.9
            return clock[0]

    monkeypatch.setattr(run, "time", Clock)
    ticks: list[int] = []
    reads = 0

    async def ticker() -> None:
        while True:
            ticks.append(reads)
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        for _ in range(200):
            await g.file.read(abi.WORD_SIZE)
            reads += 1
    finally:
        task.cancel()
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) <= 4, gaps  # the loop ran at least every fourth read
    assert len(ticks) <= 200 // 3, len(ticks)  # and not after every read


def test_a_run_with_no_time_left_does_not_start():
    if not _slicing.NATIVE:
        return  # the fallback's accounting is the same code in Python; see test_slicing
    from test_slicing import bare_cpu

    uc, fuel = bare_cpu()
    eip = _unicorn.eip(uc)
    fuel.stop = 0
    fuel.budget = 1 << 40
    fuel.reason = _slicing.REASON_NONE
    fuel.left = 1  # one nanosecond: used up by the time the next run starts
    fuel.mark = 0
    _slicing.run(uc, fuel, 1 << 32)  # the first run gets its nanosecond (one block or so)
    fuel.reason = _slicing.REASON_NONE
    before = _unicorn.eip(uc), bytes(uc.mem_read(0x2000, 4))
    assert _slicing.run(uc, fuel, 1 << 32) == (0, None, None)
    assert fuel.reason == _slicing.REASON_BUDGET and fuel.budget == 0
    assert (_unicorn.eip(uc), bytes(uc.mem_read(0x2000, 4))) == before
    assert eip is not None


def _hypercall_code(number: int) -> bytes:
    """mov $number, %eax; mov $1, %edx; mov $2, %ebx; mov $3, %ecx; int $0x1f; hlt"""
    return (
        b"\xb8" + number.to_bytes(4, "little") + b"\xba\x01\0\0\0\xbb\x02\0\0\0\xb9\x03\0\0\0"
        b"\xcd\x1f\xf4"
    )


def test_the_native_hook_follows_the_hypercall_table():
    """One place decides which hypercalls are done on the slice's thread without ending
    the run: hypercalls.LOCAL_HYPERCALLS.  _fuel.c's hook, configured from it, hands
    exactly those to the Python handler (and only while the async ring is empty) and
    ends the run, with the registers read, at every other one."""
    if not _slicing.NATIVE:
        return  # the fallback's hook is Python and reads the same table
    import ctypes

    from test_slicing import bare_cpu
    from unicorn import x86_const as r

    from supervisor import hypercalls

    uc, fuel = bare_cpu()
    calls: list[tuple[int, int, int, int]] = []

    def local(number: int, a1: int, a2: int, a3: int) -> bool:
        calls.append((number, a1, a2, a3))
        return False

    _slicing.trap_interrupts(uc, fuel, local, hypercalls.LOCAL_HYPERCALLS)
    ring = (ctypes.c_uint8 * 64)(*([abi.HCALL_FREE] * 64))
    for busy in (False, True):
        ring[5] = 0 if busy else abi.HCALL_FREE
        for number in range(40):
            at = 0x3000 + 32 * number  # (no stale translation of another number's code)
            uc.mem_write(at, _hypercall_code(number))
            uc.reg_write(r.UC_X86_REG_EIP, at)
            fuel.stop = 0
            fuel.budget = 1 << 40
            fuel.left = 10**9
            fuel.mark = 0
            calls.clear()
            stop = _slicing.run(uc, fuel, 1 << 32, ctypes.addressof(ring), 5)
            if number in hypercalls.LOCAL_HYPERCALLS and not busy:
                assert calls == [(number, 1, 2, 3)], number
                assert fuel.vector == -1 and stop == (0, None, None), number  # on to the hlt
                assert _unicorn.eip(uc) == at + len(_hypercall_code(number)), number
            else:
                assert calls == [], number
                assert fuel.vector == 0x1F and fuel.hcall_read, number
                assert tuple(fuel.hcall) == (number, 1, 2, 3), number
                assert stop == (0, 0x1F, (number, 1, 2, 3)), number
                assert _slicing.last_trap(fuel) == stop[1:], number
                assert _unicorn.eip(uc) == at + 22, number  # just after the int


async def test_the_stats_say_whether_blocks_are_counted(dev):
    g = await boot(dev, NOTIFY_LOOP)
    for _ in range(20):
        await g.file.read(abi.WORD_SIZE)
    stats = g.file.stats
    assert stats is not None
    assert stats.blocks_counted == _slicing.COUNTS_BLOCKS
    assert (stats.blocks > 0) == stats.blocks_counted


def test_a_run_gets_its_whole_share_however_late_it_registers():
    """The exit-request slicer takes a run's deadline when the run registers, not before
    the thread released the GIL: on a loaded machine the thread may wait milliseconds in
    between, and a deadline taken earlier was already past (measured: IRQ handlers'
    inline slices ended before their first instruction, and the next slice waited a
    whole trip through the executor's queue, about a second)."""
    if not (_slicing.NATIVE and _slicing.EXIT_REQUEST):
        return  # the block hook reads the deadline itself; the fallback has none
    from test_slicing import bare_cpu

    uc, fuel = bare_cpu()
    for _ in range(20):
        fuel.stop = 0
        fuel.budget = 1 << 40
        fuel.reason = _slicing.REASON_NONE
        fuel.left = 200_000
        fuel.mark = 0
        _slicing.run(uc, fuel, 1 << 32)
        assert fuel.span == 200_000


def test_cpu_exit_members_are_distinct_named_singletons():
    """CpuExit is a plain class, not an enum.Enum (an Enum member lookup costs about 0.2 us
    on CPython 3.11): it must still behave as one for the run loop's ``is`` and ``match``."""
    from supervisor.execute import CpuExit

    members = [getattr(CpuExit, name) for name in CpuExit.__annotations__]
    assert len(members) == 15 and len({id(m) for m in members}) == 15
    assert all(isinstance(m, CpuExit) for m in members)
    assert [m.name for m in members] == list(CpuExit.__annotations__)
    assert CpuExit.BAD_ACCESS.value == "bad access" and CpuExit.NOTIFY.value == "notify"
    assert repr(CpuExit.DEBUG_STOP) == "<CpuExit.DEBUG_STOP: 'debug stop'>"
    match CpuExit.HALT:
        case CpuExit.NOTIFY:
            matched = "notify"
        case CpuExit.HALT:
            matched = "halt"
        case _:
            matched = "none"
    assert matched == "halt"
