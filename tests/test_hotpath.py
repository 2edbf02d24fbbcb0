"""The notify and hypercall paths do each thing once: what the fast path must keep
doing, and what it must not do twice."""

import asyncio
import contextlib
import importlib
import itertools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from guestasm import Booted, boot, present

from supervisor import LguestDevice, _slicing, _unicorn, abi, hypercalls, run
from supervisor import cpu as cpu_module
from supervisor.cpu import LgCpu
from supervisor.launcher.layout import plan
from supervisor.run import YIELD_TIME

NOTIFY_LOOP = r"""
main:
    LGUEST_INIT
rt: HCALL 17, 1
    jmp rt
"""


@pytest.mark.one_loop
async def test_a_hypercall_trap_reads_the_guest_registers_once(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
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


def _fake_thread_clock(monkeypatch: pytest.MonkeyPatch, look: float) -> list[float]:
    """run's clock made a counter from the real one: each look at it adds ``look``; the
    test adds what else passes to the returned list's one item.  An engine switch
    (``LgCpu.take_engine``, which the ``always`` mode does at every slice) reads the
    same counter without adding to it: it takes no time, so that only the reader's
    looks count."""
    clock = [time.thread_time()]

    class Clock:
        @staticmethod
        def thread_time() -> float:
            clock[0] += look
            return clock[0]

    class Still:
        @staticmethod
        def thread_time() -> float:
            return clock[0]

    monkeypatch.setattr(run, "time", Clock)
    monkeypatch.setattr(cpu_module, "time", Still)
    return clock


async def _reads_between_turns(g: Booted, other: Callable[[], None], limit: float) -> list[int]:
    """200 reads of ``g`` while another task calls ``other`` at each of its turns: how
    many reads were done at each turn."""
    ticks: list[int] = []
    reads = 0

    async def turns() -> None:
        while True:
            ticks.append(reads)
            other()
            await asyncio.sleep(0)

    task = asyncio.create_task(turns())
    await asyncio.sleep(0)
    try:
        async with asyncio.timeout(limit):
            for _ in range(200):
                await g.file.read(abi.WORD_SIZE)
                reads += 1
    finally:
        task.cancel()
    return ticks


async def test_a_reader_that_never_waits_still_lets_the_loop_run(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inline slices need not yield after every notify, but they yield once YIELD_TIME
    has passed since they last did: a Launcher whose reads always return at once cannot
    starve other tasks.  (A fake clock that advances a bit more than a fifth of
    YIELD_TIME per look; a read looks once, and the read that yields once more after
    its yield: exactly a fifth, summed in floating point onto the real clock's value,
    sometimes falls short of YIELD_TIME after five looks.)"""
    g = await boot(dev, NOTIFY_LOOP)
    await g.file.read(abi.WORD_SIZE)
    _fake_thread_clock(monkeypatch, YIELD_TIME / 4.9)
    ticks = await _reads_between_turns(g, lambda: None, 60)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) <= 4, gaps  # the loop ran at least every fourth read
    assert len(ticks) <= 200 // 3, len(ticks)  # and not after every read


async def test_the_other_tasks_turns_do_not_count_as_the_readers_time(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """YIELD_TIME counts from when the CPU's yield ended: the loop time the other tasks
    took meanwhile is not the reader's, so a busy loop does not make it yield (and, with
    an engine pool, give its engine away) at every read.  A fake clock: each of the
    reader's looks adds a tenth of YIELD_TIME, each turn of another task a whole one."""
    g = await boot(dev, NOTIFY_LOOP)
    await g.file.read(abi.WORD_SIZE)
    clock = _fake_thread_clock(monkeypatch, YIELD_TIME / 10)

    def busy() -> None:
        clock[0] += YIELD_TIME

    ticks = await _reads_between_turns(g, busy, 30)  # (yielding at every pass: no reads)
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) <= 11, gaps  # it still yields: at least every eleventh read
    assert len(ticks) <= 200 // 8, len(ticks)  # but not at every read


def test_the_native_code_uses_the_python_sides_numbers() -> None:
    """_fuel.c repeats ABI numbers, gate types, page-table bits and more: each must
    equal its Python twin, so that neither side can change alone."""
    fuel = pytest.importorskip("supervisor._fuel")
    assert len(fuel.constants) >= 29  # (28 numbers in _fuel.c's SHARED table, and the vectors)
    for name, native in fuel.constants.items():
        module, attr = name.split(".")
        python = getattr(importlib.import_module(f"supervisor.{module}"), attr)
        if isinstance(native, tuple):
            assert frozenset(native) == python, name
        else:
            assert native == python, name


def test_a_run_with_no_time_left_does_not_start() -> None:
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


def _hypercall_code(number: int, a1: int = 1, a2: int = 2, a3: int = 3) -> bytes:
    """mov $number, %eax; mov $a1, %edx; mov $a2, %ebx; mov $a3, %ecx; int $0x1f; hlt"""
    return (
        b"\xb8"
        + number.to_bytes(4, "little")
        + b"\xba"
        + a1.to_bytes(4, "little")
        + b"\xbb"
        + a2.to_bytes(4, "little")
        + b"\xb9"
        + a3.to_bytes(4, "little")
        + b"\xcd\x1f\xf4"
    )


def test_the_native_hook_follows_the_hypercall_table() -> None:
    """One place decides which hypercalls are done on the slice's thread without ending
    the run, and which of those C completes itself: the table in hypercalls.py.
    _fuel.c's hook, configured from it, completes exactly the native ones (no Python
    called, counted in native_done), hands exactly the other local ones to the Python
    handler (and only while the async ring is empty) and ends the run, with the
    registers read, at every other one."""
    if not _slicing.NATIVE:
        return  # the fallback's hook is Python and reads the same table
    import ctypes

    from test_slicing import bare_cpu
    from unicorn import x86_const as r

    from supervisor import hypercalls

    assert hypercalls.NATIVE_HYPERCALLS  # the table marks some, and C can do them all
    assert hypercalls.NATIVE_HYPERCALLS <= hypercalls.LOCAL_HYPERCALLS & _slicing.NATIVE_CALLS
    uc, fuel = bare_cpu()
    calls: list[tuple[int, int, int, int]] = []

    def local(number: int, a1: int, a2: int, a3: int) -> bool:
        calls.append((number, a1, a2, a3))
        return False

    ram = (ctypes.c_uint8 * (16 * abi.PAGE_SIZE))()  # what the page-table calls check
    _slicing.trap_interrupts(
        uc,
        fuel,
        local,
        hypercalls.LOCAL_HYPERCALLS,
        hypercalls.NATIVE_HYPERCALLS,
        (ctypes.addressof(ram), 16),
    )
    ring = (ctypes.c_uint8 * 64)(*([abi.HCALL_FREE] * 64))
    # Arguments every native call accepts: IDT entry 0, stack 0/2/0, TS off, SET_PTE of
    # an absent entry at 2 in the page directory at 0, SET_PMD of its entry 2 (absent).
    args = (0, 2, 0)
    size = len(_hypercall_code(0, *args))
    for busy in (False, True):
        ring[5] = 0 if busy else abi.HCALL_FREE
        for number in range(40):
            at = 0x3000 + 32 * number  # (no stale translation of another number's code)
            uc.mem_write(at, _hypercall_code(number, *args))
            uc.reg_write(r.UC_X86_REG_EIP, at)
            fuel.stop = 0
            fuel.budget = 1 << 40
            fuel.left = 10**9
            fuel.mark = 0
            fuel.native_done = 0
            calls.clear()
            stop = _slicing.run(uc, fuel, 1 << 32, ctypes.addressof(ring), 5)
            if number in hypercalls.LOCAL_HYPERCALLS and not busy:
                native = number in hypercalls.NATIVE_HYPERCALLS
                assert calls == ([] if native else [(number, *args)]), number
                assert fuel.native_done == native, number
                assert fuel.vector == -1 and stop == (0, None, None), number  # on to the hlt
                assert _unicorn.eip(uc) == at + size, number
            else:
                assert calls == [] and fuel.native_done == 0, number
                assert fuel.vector == 0x1F and fuel.hcall_read, number
                assert tuple(fuel.hcall) == (number, *args), number
                assert stop == (0, 0x1F, (number, *args)), number
                assert _slicing.last_trap(fuel) == stop[1:], number
                assert _unicorn.eip(uc) == at + size - 1, number  # just after the int


def test_the_native_hook_refuses_calls_it_cannot_complete() -> None:
    """The table cannot mark as native a call _fuel.c has no code for (or a call that
    is not CPU-local): configuring the hook fails instead of silently doing nothing."""
    if not _slicing.NATIVE:
        return
    from test_slicing import bare_cpu

    from supervisor import hypercalls

    uc, fuel = bare_cpu()
    unknown = min(hypercalls.LOCAL_HYPERCALLS - _slicing.NATIVE_CALLS)
    with pytest.raises(ValueError, match="cannot be completed natively"):
        _slicing.trap_interrupts(
            uc, fuel, lambda *a: False, hypercalls.LOCAL_HYPERCALLS, frozenset({unknown})
        )
    with pytest.raises(ValueError, match="cannot be completed natively"):
        _slicing.trap_interrupts(
            uc, fuel, lambda *a: False, frozenset(), hypercalls.NATIVE_HYPERCALLS
        )


# -- the native hypercalls and their Python handlers agree -------------------------------

_IDT, _STACK, _TS, _FLUSH, _PTE, _PMD = (
    abi.LHCALL_LOAD_IDT_ENTRY,
    abi.LHCALL_SET_STACK,
    abi.LHCALL_TS,
    abi.LHCALL_FLUSH_TLB,
    abi.LHCALL_SET_PTE,
    abi.LHCALL_SET_PMD,
)
_LAYOUT = plan(1 << 20)  # the test guests' (guestasm.boot's default memory)


def _valid_calls(seed: int, n: int) -> list[tuple[int, int, int, int]]:
    """Hypercalls the Host accepts, with every corner the handlers distinguish: ignored
    vectors (with any gate), gates present or not of every type (a gate that is not present may have
    any type), TS with any non-zero value, stacks of 0-2 pages, flushes, page-table
    entries absent or naming the last page, SET_PMD of the guest's real page directory's
    entries (the Host's own, 1023, included)."""
    rng = random.Random(seed)
    calls = []
    for _ in range(n):
        kind = rng.choice((_IDT, _IDT, _STACK, _TS, _FLUSH, _PTE, _PMD))
        if kind == _IDT:
            num = rng.choice((2, 8, 15, 31, 0, 255, rng.randrange(256)))
            present = rng.random() < 0.6
            gate = rng.choice((0xE, 0xF)) if present else rng.randrange(16)
            if num in (2, 8, 15, 31):  # ignored, whatever the gate (even a bad type)
                gate = rng.randrange(16)
            hi = rng.getrandbits(16) << 16 | present << 15 | gate << 8 | rng.getrandbits(8)
            calls.append((_IDT, num, rng.getrandbits(32), hi))
        elif kind == _STACK:
            ss = rng.getrandbits(14) << 2 | abi.GUEST_PL
            calls.append((_STACK, ss, rng.getrandbits(32), rng.randrange(3)))
        elif kind == _PTE:
            pgdir = rng.randrange(_LAYOUT.pfn_limit) * abi.PAGE_SIZE
            vaddr = rng.randrange(abi.SWITCHER_ADDR)
            pfn = rng.choice((0, _LAYOUT.pfn_limit - 1, rng.randrange(_LAYOUT.pfn_limit)))
            pte = rng.choice((pfn << 12 | 7, rng.getrandbits(32) & ~1))  # present or absent
            calls.append((_PTE, pgdir, vaddr, pte))
        elif kind == _PMD:
            index = rng.choice((0, 1023, rng.randrange(1024)))
            calls.append((_PMD, _LAYOUT.pgdir, index, rng.getrandbits(32)))
        elif kind == _TS:
            calls.append((_TS, rng.choice((0, 1, 2, 0xFFFFFFFF, rng.getrandbits(32))), 0, 0))
        else:
            calls.append((_FLUSH, 0, 0, 0))
    return calls


# Each kills the guest: lguest's checks (interrupts.load_idt_entry, hypercalls._set_stack).
_HOSTILE = [
    (_IDT, 256, 0, 0x8E00),
    (_IDT, 0xFFFFFFFF, 0, 0x8E00),
    (_IDT, 0x80000000, 0, 0),
    (_IDT, 40, 0, 0x8500),  # present, type 5
    (_IDT, 33, 0, 0x8000),  # present, type 0
    (_STACK, 0x13, 0x8000, 1),
    (_STACK, 0x11, 0x8000, 0),
    (_STACK, 0x10, 0x8000, 3),
    (_STACK, 0x10, 0x8000, 0xFFFFFFFF),
    (_PTE, 0x12345000 + 1, 0x1000, 0),  # an unaligned page directory
    (_PTE, _LAYOUT.pfn_limit * abi.PAGE_SIZE, 0x1000, 0),  # past the guest's memory
    (_PTE, _LAYOUT.pfn_limit * abi.PAGE_SIZE - abi.PAGE_SIZE + 1, 0, 0),
    (_PTE, _LAYOUT.pgdir, abi.SWITCHER_ADDR, 0),  # the Host's mapping
    (_PTE, _LAYOUT.pgdir, 0xFFFFFFFF, 0),
    (_PTE, _LAYOUT.pgdir, 0x1000, _LAYOUT.pfn_limit << 12 | 1),  # a page past the limit
    (_PTE, _LAYOUT.pgdir, 0x1000, 0xFFFFF001),
    (_PMD, _LAYOUT.pgdir, 1024, 0),
    (_PMD, _LAYOUT.pgdir, 0xFFFFFFFF, 0),
    (_PMD, _LAYOUT.pgdir + 8, 0, 0),
    (_PMD, "table", 5, 0),  # entry 5 of `table` names a page past the limit
    (_PMD, "table", 6, 0),  # a 4 MiB page past the limit
]


@contextlib.contextmanager
def python_handoffs() -> Iterator[list[int]]:
    """Count the calls marked native that reach their Python handler meanwhile
    (``hypercalls.do_hcall``); yields a one-element list holding the count."""
    handed = [0]
    original = hypercalls.do_hcall

    def counted(cpu: LgCpu, args: hypercalls.Args) -> int | None:
        handed[0] += args[0] in hypercalls.NATIVE_HYPERCALLS
        return original(cpu, args)

    hypercalls.do_hcall = counted
    try:
        yield handed
    finally:
        hypercalls.do_hcall = original


@contextlib.contextmanager
def no_native_hypercalls() -> Iterator[None]:
    """Meanwhile every Unicorn instance a CPU takes (its first, and each new one a switch
    or a thaw gives it) has its interrupt hook hand even the native calls to
    ``hypercalls.do_hcall``: the hook's masks are set again on each new instance."""
    real = _slicing.trap_interrupts

    def python_only(*args: Any, **kwargs: Any) -> None:
        if len(args) > 4:  # (uc, fuel, local, local_calls, native_calls, ...)
            args = (*args[:4], frozenset(), *args[5:])
        else:
            kwargs["native_calls"] = frozenset()
        real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_slicing, "trap_interrupts", python_only)
        yield


# A hypercall as the test guest makes it: number, then each argument as a number or a symbol.
Call = tuple[int, int | str, int | str, int | str]


async def _run_calls(
    dev: LguestDevice, calls: Sequence[Call], native: bool
) -> tuple[tuple[object, ...], int]:
    """Boot a guest that makes ``calls`` then notifies; with ``native`` False, the
    native hook hands even the native calls to their Python handlers.  Returns what
    the Host ended up with, and how many native-numbered calls Python handled."""
    from unicorn import x86_const as r

    def arg(a: int | str) -> str:
        return a if isinstance(a, str) else hex(a)

    body = "main:\n    LGUEST_INIT\n"
    body += "".join(f"    HCALL {n}, {arg(a1)}, {arg(a2)}, {arg(a3)}\n" for n, a1, a2, a3 in calls)
    body += "    HCALL 17, 0x99\n1:  jmp 1b\n"
    body += ".data\n.align 4096\ntable: .long 0, 0, 0, 0, 0\n"
    body += f"    .long {_LAYOUT.pfn_limit << 12 | 1:#x}, {0x400000 | 0x81:#x}\n"
    body += "    .space 4096 - 7 * 4\n"
    with contextlib.ExitStack() as stack:
        if not native:
            stack.enter_context(no_native_hypercalls())
        g = await boot(dev, body)
        cpu = g.file.cpu(0)
        with python_handoffs() as handed:
            try:
                assert abi.unpack_words(await g.file.read(abi.WORD_SIZE))[0] == 0x99
                death = None
            except FileNotFoundError:
                death = (await g.file.read(256)).rstrip(b"\0").decode()
    handled = handed[0]
    state = (
        death,
        list(cpu.idt),
        cpu.ts,
        cpu.stack,
        cpu.reg(r.UC_X86_REG_CR0),
        cpu.reg(r.UC_X86_REG_CR3),
        present(g.file.stats).hypercalls,
    )
    return state, handled


@pytest.mark.one_loop
@pytest.mark.parametrize("hostile", [None, *_HOSTILE])
async def test_native_hypercalls_do_what_their_python_handlers_do(
    dev: LguestDevice, hostile: Call | None
) -> None:
    """The same hypercalls, valid and hostile, through the native hook (C) and through
    the Python handlers: the same IDT, TS flag and CR0, stack, CR3, hypercall count,
    and the same death with the same message.  Natively, Python sees only the one
    call that kills."""
    from supervisor import hypercalls

    calls = _valid_calls(15, 300) + ([hostile] if hostile else [])
    native, native_python = await _run_calls(dev, calls, native=True)
    python, python_python = await _run_calls(dev, calls, native=False)
    assert native == python
    death, idt, ts, *_rest, hypercalls_done = native
    assert (death is None) == (hostile is None)
    assert hypercalls_done == len(calls) + 1 + (hostile is None)  # and INIT, the notify
    assert idt != [(0, 0)] * abi.IDT_ENTRIES and ts in (0, 1)
    ran = sum(n in hypercalls.NATIVE_HYPERCALLS for n, *_ in calls)
    assert python_python == ran
    if _slicing.NATIVE:  # (SET_PMD of the Host's entry, 1023, is Python's: it writes)
        switcher = sum(n == _PMD and index == 1023 for n, _pgdir, index, _ in calls)
        assert native_python == (hostile is not None) + switcher
    else:
        assert native_python == ran


@pytest.mark.one_loop
async def test_the_stats_say_whether_blocks_are_counted(dev: LguestDevice) -> None:
    g = await boot(dev, NOTIFY_LOOP)
    for _ in range(20):
        await g.file.read(abi.WORD_SIZE)
    stats = g.file.stats
    assert stats is not None
    assert stats.blocks_counted == _slicing.COUNTS_BLOCKS
    assert (stats.blocks > 0) == stats.blocks_counted


def test_a_run_gets_its_whole_share_however_late_it_registers() -> None:
    """The exit-request slicer takes a run's deadline when the run registers, not before
    the thread released the GIL: on a loaded machine the thread may wait milliseconds in
    between, and a deadline taken earlier could already be past (an IRQ handler's inline
    slice would end before its first instruction, and the next slice wait a whole trip
    through the executor's queue)."""
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


def test_exit_values_are_distinct_named_singletons() -> None:
    """SliceExit and RunState are plain classes, not enum.Enum (an Enum member lookup goes
    through the metaclass): they must still behave as enums for ``is`` and ``match``."""
    from supervisor.execute import SliceExit
    from supervisor.run import RunState

    for cls, count in ((SliceExit, 11), (RunState, 8)):
        members = [getattr(cls, name) for name in cls.__annotations__]
        assert len(members) == count and len({id(m) for m in members}) == count
        assert all(type(m) is cls for m in members)
        assert [m.name for m in members] == list(cls.__annotations__)
    assert SliceExit.BAD_ACCESS.value == "bad access" and RunState.NOTIFY.value == "notify"
    assert repr(SliceExit.DEBUG_STOP) == "<SliceExit.DEBUG_STOP: 'debug stop'>"
    assert SliceExit.HALT is not RunState.HALT  # type: ignore[comparison-overlap]  # two sets
    match SliceExit.HALT:
        case SliceExit.KICK:
            matched = "kick"
        case SliceExit.HALT:
            matched = "halt"
        case _:
            matched = "none"
    assert matched == "halt"


NATIVE_STATE = r"""
main:
    LGUEST_INIT
    HCALL 6, 40, 0x1234, 0x8e00
    HCALL 8, 1
    HCALL 7, 0x68, 0x7000, 2
    HCALL 17, 1
    HCALL 6, 41, 0x5678, 0x8f00
    HCALL 8, 0
    HCALL 5
    HCALL 17, 2
1:  jmp 1b
"""


@pytest.mark.one_loop
async def test_natively_set_state_is_the_cpus_state_everywhere() -> None:
    """What the native hook sets (IDT, TS, stack) is the CPU's one copy: the state value
    captures it and a revived guest has it, and after hibernation (a new Unicorn
    instance) the hook completes the calls natively again."""
    import dataclasses

    from unicorn import x86_const as r

    from supervisor import LguestDevice
    from supervisor.memory import GuestMemory
    from supervisor.state import GuestState
    from supervisor.testing import until

    async with LguestDevice(hibernate_after=0) as dev:
        g = await boot(dev, NATIVE_STATE)
        assert abi.unpack_words(await g.file.read(abi.WORD_SIZE))[0] == 1
        cpu = g.file.cpu(0)
        await until(lambda: cpu.hibernated)
        assert cpu.idt[40] == (0x1234, 0x8E00) and cpu.idt[41] == (0, 0)
        assert cpu.ts == 1 and cpu.reg(r.UC_X86_REG_CR0) & 8
        assert cpu.stack == (0x68, 0x7000, 2)
        state = g.file.state()
        assert GuestState.from_bytes(state.to_bytes()) == state
        assert (state.cpus[0].idt[40], state.cpus[0].ts) == ((0x1234, 0x8E00), 1)
        assert state.cpus[0].stack == (0x68, 0x7000, 2)
        copy = GuestMemory(g.memory.size)
        copy.write(0, g.memory.read(0, g.memory.size))
        revived = dev.open(copy, state=state)
        again = revived.state().cpus[0]  # (its stats: it may have hibernated already)
        assert dataclasses.replace(again, stats=()) == dataclasses.replace(state.cpus[0], stats=())
        other = revived.cpu(0)
        assert (list(other.idt), other.ts, other.stack) == (list(cpu.idt), cpu.ts, cpu.stack)

        with python_handoffs() as handed:
            for f in (g.file, revived):
                assert abi.unpack_words(await f.read(abi.WORD_SIZE))[0] == 2
        handled = handed[0]
        for c in (cpu, other):
            assert c.idt[41] == (0x5678, 0x8F00) and c.ts == 0
            assert not c.reg(r.UC_X86_REG_CR0) & 8
        assert g.file.stats is not None and g.file.stats.wakes >= 1
        # INIT and 8 more
        assert present(g.file.stats).hypercalls == present(revived.stats).hypercalls == 9
        assert handled == (0 if _slicing.NATIVE else 6)
        for f, memory in ((g.file, g.memory), (revived, copy)):
            await f.close()
            memory.close()


def test_the_idt_view_reads_and_writes_the_whole_table_in_order() -> None:
    # Bulk reads and writes (a capture, a restore) convert the table in one go: every
    # entry lands in its own slot, lo before hi, and agrees with single-entry access.
    from supervisor.cpu import Idt

    idt = Idt(_slicing.Fuel())
    gates = [(i * 0x01010101 & 0xFFFFFFFF, 0xFFFFFFFF - i) for i in range(256)]
    idt[:] = gates
    assert list(idt) == gates
    assert [idt[i] for i in range(256)] == gates
    assert idt[10:13] == gates[10:13]
    idt[7] = (1, 2)
    assert list(idt)[7] == (1, 2) and idt[6] == gates[6]
    with pytest.raises(ValueError):
        idt[:] = gates[:-1]


@pytest.mark.one_loop
@pytest.mark.skipif(not _slicing.NATIVE, reason="hypercalls are completed in C on the native paths")
async def test_natively_completed_hypercalls_are_counted_even_if_the_run_then_fails(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Five IDT loads done in C, then the run ends with an error the slice did not expect
    # (a Host bug: the guest dies): the five still count.
    g = await boot(dev, "main:\n LGUEST_INIT\n" + " HCALL 6, 40, 0, 0\n" * 5 + " HCALL 17, 1\n")
    real = _slicing.run
    runs = 0

    def failing(
        uc: Any, fuel: _slicing.Fuel, until: int, ring: int = 0, next_hcall: int = 0
    ) -> _slicing.Stop:
        nonlocal runs
        runs += 1
        result = real(uc, fuel, until, ring, next_hcall)
        if runs == 2:  # the run after LGUEST_INIT: the five loads, then the notify
            raise RuntimeError("injected")
        return result

    monkeypatch.setattr(_slicing, "run", failing)
    with pytest.raises(OSError):
        await g.file.read(8)
    assert "injected" in (await g.file.read(256)).decode()
    assert present(g.file.stats).hypercalls == 1 + 5


def test_no_host_write_range_is_lost_while_another_thread_records_more() -> None:
    # codecache.note() appends from any thread while the CPU's thread takes the ranges.
    import sys
    import threading

    from supervisor import codecache

    stale: list[tuple[int, int]] = []  # (as LgCpu.stale_code)
    n = 50_000
    taken: list[tuple[int, int]] = []
    interval = sys.getswitchinterval()

    def write() -> None:
        for i in range(n):
            stale.append((i * 16, i * 16 + 4))

    sys.setswitchinterval(1e-6)
    try:
        writer = threading.Thread(target=write)
        writer.start()
        while writer.is_alive() or stale:
            taken.extend(codecache._merged(stale))
        writer.join()
    finally:
        sys.setswitchinterval(interval)
    assert sorted(taken) == [(i * 16, i * 16 + 4) for i in range(n)]


# -- native interrupt delivery and its Python path agree ---------------------------------

DELIVERY_GUEST = r"""
main:
    LGUEST_INIT
    HCALL 17, 1
1:  jmp 1b
.bss
.align 4096
pages: .space 3 * 4096
"""


def _delivery_state(g: Booted) -> tuple[object, ...]:
    from unicorn import x86_const as r

    cpu = g.file.cpu(0)
    regs = tuple(
        cpu.reg(x)
        for x in (r.UC_X86_REG_EFLAGS, r.UC_X86_REG_CS, r.UC_X86_REG_EIP, r.UC_X86_REG_ESP)
    )
    ram = bytearray(cpu.lg.ram)
    # (the Host's clock when each booted)
    time_field = present(cpu.lguest_data) + abi.LGUEST_DATA_TIME
    ram[time_field : time_field + 8] = bytes(8)
    return regs, bytes(ram), cpu.stats.interrupts, cpu.lg.dead


def _stack_entry(cpu: LgCpu, vaddr: int) -> int:
    """The guest-physical address of the page-table entry mapping ``vaddr`` (4 KiB pages)."""
    from unicorn import x86_const as r

    pgdir = cpu.reg(r.UC_X86_REG_CR3) & ~0xFFF
    pde = present(cpu.lg.read_u32(pgdir + 4 * (vaddr >> 22)))
    return (pde & ~0xFFF) + 4 * ((vaddr >> 12) & 0x3FF)


@pytest.mark.one_loop
@pytest.mark.parametrize("seed", range(4))
async def test_native_delivery_does_what_the_python_path_does(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Interrupts and traps delivered to two identical guests, through _fuel.c's
    deliver() and through interrupts.py's own code, from random valid states: esp at
    every kind of offset in a page (frames across a page boundary are Python's on both),
    paging on and off, interrupt and trap gates, irq_enabled on or off, error codes or
    none.  The registers, all of guest memory and the interrupt count agree after each;
    natively, the common cases never reach the Python path.  The last delivery of a
    run pushes onto a page the guest may not write (read-only or unmapped): the same
    death, with the same message."""
    from unicorn import x86_const as r

    from supervisor import codecache, interrupts
    from supervisor.cpu import CR0_PG

    native, python = await boot(dev, DELIVERY_GUEST), await boot(dev, DELIVERY_GUEST)
    for g in (native, python):
        assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)
    assert _delivery_state(native) == _delivery_state(python)
    pages = native.guest.symbols["pages"]
    data = native.file.cpu(0).lguest_data
    assert data is not None
    real_deliver = _slicing.deliver
    in_c = 0

    def through(g: Booted) -> Callable[..., _slicing.Delivered | None]:
        nonlocal in_c
        if g is python:
            return lambda *_args: None  # the Python path

        def counted(
            fuel: _slicing.Fuel,
            lo: int,
            hi: int,
            error_code: int | None,
            irq_enabled: int,
            kernel_address: int,
        ) -> _slicing.Delivered | None:
            nonlocal in_c
            done = real_deliver(fuel, lo, hi, error_code, irq_enabled, kernel_address)
            in_c += done is not None
            return done

        return counted

    rng = random.Random(seed)
    n = 150
    for i in range(n):
        offset = rng.choice(
            (0, 4, 8, 12, 16, 20, 4092, 4096, rng.randrange(0, 4097, 4), rng.randrange(4097))
        )
        esp = pages + 4096 + offset
        eflags = (rng.getrandbits(32) & 0xED5) | 0x2  # (arithmetic flags, IF, DF)
        eip = rng.getrandbits(32)
        irq_enabled = rng.choice((0, abi.X86_EFLAGS_IF, rng.getrandbits(32)))
        gate = rng.choice((interrupts.GATE_INTERRUPT, interrupts.GATE_TRAP))
        lo, hi = rng.getrandbits(32), rng.getrandbits(16) << 16 | 0x8000 | gate << 8
        error_code = rng.choice((None, 0, rng.getrandbits(32)))
        paging = rng.random() < 0.7
        hostile = None
        if i == n - 1:
            hostile = ("read-only", "unmapped")[seed % 2]
            if hostile == "unmapped":
                esp = 0x3FF00000 + offset  # past the guest's memory and its page tables
        for g in (native, python):
            cpu = g.file.cpu(0)
            cpu.set_reg(r.UC_X86_REG_ESP, esp)
            cpu.set_reg(r.UC_X86_REG_EFLAGS, eflags)
            cpu.set_reg(r.UC_X86_REG_EIP, eip)
            cr0 = cpu.reg(r.UC_X86_REG_CR0)
            cpu.set_reg(r.UC_X86_REG_CR0, cr0 | CR0_PG if paging or hostile else cr0 & ~CR0_PG)
            assert cpu.lg.write_u32(data + abi.LGUEST_DATA_IRQ_ENABLED, irq_enabled)
            if hostile == "read-only":
                entry = _stack_entry(cpu, esp - 4)
                cpu.lg.write_u32(entry, present(cpu.lg.read_u32(entry)) & ~2)
                cpu.flush_tlb()
            cpu.stale_code.clear()
            with monkeypatch.context() as m:
                m.setattr(_slicing, "deliver", through(g))
                interrupts.set_guest_interrupt(cpu, lo, hi, error_code)
            # As before the guest runs again (the engine's own lookups then set the
            # accessed bit of the page-table entries it reads, on both paths alike).
            codecache.drop_stale(cpu)
        assert _delivery_state(native) == _delivery_state(python), (i, offset, paging)
    death = native.file.cpu(0).lg.dead
    assert death is not None and "cannot push interrupt frame" in death.reason
    assert native.file.cpu(0).stats.interrupts == n - 1
    if _slicing.NATIVE:  # all but frames across a page, and the death
        assert in_c > n // 2
    else:
        assert in_c == 0


@pytest.mark.one_loop
async def test_native_delivery_tells_the_other_cpus_of_its_writes(dev: LguestDevice) -> None:
    """The delivering CPU drops its own translations of the frame and of irq_enabled;
    every other CPU of the guest records both ranges, as for any Host write."""
    from supervisor import interrupts

    g = await boot(dev, "main:\n LGUEST_INIT\n IDT 0x30, 1f\n HCALL 17, 1\n1: jmp 1b\n", cpus=2)
    assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)
    cpu, other = g.file.cpu(0), g.file.cpu(1)
    data = cpu.lguest_data
    assert data is not None
    cpu.lg.write_u32(data + abi.LGUEST_DATA_IRQ_ENABLED, abi.X86_EFLAGS_IF)
    cpu.thaw()  # (as before a slice: with an engine pool it holds none between them)
    cpu.stale_code.clear()
    other.stale_code.clear()
    assert interrupts.deliver_trap(cpu, 0x30)  # an interrupt gate: irq_enabled is written
    esp = cpu.reg(__import__("unicorn.x86_const").x86_const.UC_X86_REG_ESP)
    frame = (esp, esp + 12)  # (linear = physical in these guests)
    irq_enabled = (data, data + 4)
    assert sorted(other.stale_code) == sorted([frame, irq_enabled])
    assert cpu.lg.read_u32(data + abi.LGUEST_DATA_IRQ_ENABLED) == 0
    assert list(cpu.stale_code) == ([] if _slicing.NATIVE else [frame, irq_enabled])


@pytest.mark.one_loop
@pytest.mark.skipif(not _slicing.NATIVE, reason="the native delivery is not built here")
@pytest.mark.parametrize("mapped", ["kernel_address", "KERNEL_ALIAS", "nowhere"])
async def test_native_delivery_drops_irq_enabled_through_the_alias_that_maps_it(
    dev: LguestDevice, mapped: str
) -> None:
    """With paging on and no identity mapping of lguest_data, the native delivery finds
    irq_enabled where codecache would (at the guest's kernel_address, or at
    KERNEL_ALIAS) and drops this CPU's translations there itself; mapped nowhere, the
    range is left to codecache.drop_stale like any Host write.  The frame, pushed at a
    mapped esp, is dropped natively either way.  (What is checked is what the delivery
    reports and records, not that a translation at the alias was really dropped:
    test_a_frame_pushed_over_translated_code_is_executed_as_written runs the frame's
    case through the same remove_cache.)"""
    from unicorn import x86_const as r

    from supervisor import codecache, interrupts
    from supervisor.cpu import CR0_PG

    g = await boot(dev, DELIVERY_GUEST)
    assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)
    cpu = g.file.cpu(0)
    lg = cpu.lg
    data = cpu.lguest_data
    assert data is not None and data < 1 << 22  # (in the first 4 MiB, like everything)
    irq_enabled = data + abi.LGUEST_DATA_IRQ_ENABLED
    pgdir = cpu.reg(r.UC_X86_REG_CR3) & ~0xFFF
    low = present(lg.read_u32(pgdir))  # the identity mapping of the first 4 MiB
    # The stack, through a mapping that is none of the three aliases.
    stack_base = 0x40000000
    lg.write_u32(pgdir + 4 * (stack_base >> 22), low)
    if mapped == "kernel_address":
        lg.kernel_address = 0x80000000
        lg.write_u32(pgdir + 4 * (lg.kernel_address >> 22), low)
    if mapped != "KERNEL_ALIAS":
        lg.write_u32(pgdir + 4 * (codecache.KERNEL_ALIAS >> 22), 0)
    lg.write_u32(pgdir, 0)
    cpu.set_reg(r.UC_X86_REG_CR0, cpu.reg(r.UC_X86_REG_CR0) | CR0_PG)
    cpu.flush_tlb()
    esp = stack_base + g.guest.symbols["pages"] + 4096
    cpu.set_reg(r.UC_X86_REG_ESP, esp)
    assert lg.write_u32(irq_enabled, abi.X86_EFLAGS_IF)
    cpu.stale_code.clear()
    hi = 0x8000 | interrupts.GATE_INTERRUPT << 8
    interrupts.set_guest_interrupt(cpu, 0x1234, hi, None)
    assert cpu.reg(r.UC_X86_REG_ESP) == esp - 12  # delivered, natively (nothing else left)
    assert lg.read_u32(irq_enabled) == 0
    left = [] if mapped != "nowhere" else [(irq_enabled, irq_enabled + 4)]
    assert list(cpu.stale_code) == left


@pytest.mark.one_loop
async def test_a_frame_pushed_over_translated_code_is_executed_as_written(
    dev: LguestDevice,
) -> None:
    """codecache's guarantee for the frame: the guest has run (translated) the block
    at `spin` many times; a trap's frame is then pushed over its nops, and the gate's
    handler is `spin` itself.  The error code is the code `mov $0x42, %al; jmp +12`
    (over the frame's other words, to the notify): the guest must run those bytes, not
    the nops it translated, and so notify 0x142, not 0x100."""
    from unicorn import x86_const as r

    from supervisor import interrupts

    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    IDT 0x30, spin, 0xf
spin:
    mov $0x100, %eax
spot:
    .fill 16, 1, 0x90
    mov %eax, %edx
    mov $17, %eax
    int $0x1f
    jmp spin
""",
    )
    for _ in range(3):
        assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(0x100)
    cpu = g.file.cpu(0)
    cpu.set_reg(r.UC_X86_REG_ESP, g.guest.symbols["spot"] + 16)
    error_code = int.from_bytes(bytes((0xB0, 0x42, 0xEB, 0x0C)), "little")
    lo, hi = cpu.idt[0x30]
    interrupts.set_guest_interrupt(cpu, lo, hi, error_code)  # (as for a trap with a code)
    assert cpu.stats.interrupts == 1
    assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(0x142)
