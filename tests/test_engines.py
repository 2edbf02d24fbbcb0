"""The engine pool: CPUs hand warmed Unicorn instances around, exactly."""

from __future__ import annotations

import asyncio
import functools
import gc
import math
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from guestasm import Booted, boot, present, until
from unicorn import UcError
from unicorn import unicorn_const as uc_const

from supervisor import LguestDevice, _slicing, _unicorn, abi, engines, execute, run
from supervisor import cpu as cpu_module
from supervisor.cpu import LgCpu
from supervisor.engines import EnginePool, Taken

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

# Spins and, every 65,536 rounds, re-arms a clock event it never lets fire: a busy
# guest whose slices now and then end with a hypercall.
CALLING_SPIN = r"""
main:
    LGUEST_INIT
1:  incl counter
    testl $0xffff, counter
    jnz 1b
    HCALL 9, 0xfffffff
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
        # Every slice after a guest's first took an engine another CPU had used, and
        # (the guests alike) kept that engine's hooks, pointed at the new CPU; none was
        # stripped (a new CPU takes its first engine at its first slice, like any other).
        assert slices > 3 * 3
        assert pool.switched >= slices - 3
        assert pool.hooked == pool.switched
        assert pool.reused == 0
        assert pool.peak <= pool.bound and pool.overdrafts == 0


# Notifies a value set at assembly: guests alike in kind whose code differs only there.
NOTIFY_VALUE = r"""
main:
    LGUEST_INIT
1:  HCALL 17, {value}
    jmp 1b
"""


async def test_a_switch_between_alike_cpus_leaves_no_translation_and_flushes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two guests alike in kind, whose code differs only in an immediate at the same
    addresses, take turns on switched engines (``always``: every slice): each runs its
    own code (unmapping a guest's memory drops the translations made from it), and no
    switch flushes the whole translation cache on top (it would cost as much again)."""
    flushes = 0
    ctl = _unicorn._CTL

    def counted(handle: Any, request: int, *args: Any) -> int:
        nonlocal flushes
        flushes += request == _unicorn.FLUSH_TB_REQUEST
        status: int = ctl(handle, request, *args)
        return status

    monkeypatch.setattr(_unicorn, "_CTL", counted)
    values = (0x1111, 0x2222)
    async with LguestDevice(engines="always") as dev:
        guests = [await boot(dev, NOTIFY_VALUE.format(value=value)) for value in values]
        pool = pool_of(dev)
        async with asyncio.timeout(LIMIT):
            for _ in range(30):
                for g, value in zip(guests, values, strict=True):
                    assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(value)
        assert pool.hooked >= 2 * 30 and pool.hooked == pool.switched
    assert flushes == 0


def hook_count(uc: Any) -> int:
    """How many hooks (Python and native) ``uc`` has."""
    return len(uc._callbacks) + len(getattr(uc, "_lguest_native_hooks", ()))


async def test_switches_between_unlike_cpus_strip_the_hooks_and_stay_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target = 300_000
    counts: set[int] = set()  # the hooks of each engine a CPU took, once set up
    real_take = LgCpu.take_engine

    def take_engine(cpu: LgCpu) -> float | None:
        spent = real_take(cpu)
        if cpu.engine.uc is not None:
            counts.add(hook_count(cpu.engine.uc))
        return spent

    monkeypatch.setattr(LgCpu, "take_engine", take_engine)
    async with LguestDevice(engines="always", hibernate_after=math.inf) as dev:
        # Memory sizes differ, so does the bad-access hook's range: an engine that served
        # one kind of CPU is stripped for the other, and keeps its hooks within a kind.
        sizes = (1 << 20, 2 << 20, 1 << 20, 2 << 20)
        guests = [await boot(dev, SSE_COUNT.format(target=target), size) for size in sizes]
        pool = pool_of(dev)
        async with asyncio.timeout(LIMIT):
            words = await asyncio.gather(*(g.file.read(abi.WORD_SIZE) for g in guests))
        for g, word in zip(guests, words, strict=True):
            assert word == abi.pack_words(0xC0FFEE)
            assert (g.u32("counter"), g.u32("regcount"), g.u32("ssecount")) == (target,) * 3
        assert 0 < pool.hooked < pool.switched
        assert len(counts) == 1


async def paused_spinner(dev: LguestDevice) -> tuple[Booted, asyncio.Future[bytes]]:
    g = await boot(dev, SPIN)
    reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
    await until(lambda: g.u32("counter") > 1000, LIMIT)
    await g.file.pause()
    return g, reader


def test_a_cpu_gets_its_own_engine_back_untouched_unless_another_took_it() -> None:
    pool = EnginePool(1 << 20, bound=3)
    a, b = object(), object()
    engine, taken = pool.take(a, None)
    assert taken is Taken.BARE and pool.live == 1
    pool.give(a, engine)
    assert pool.take(a, engine) == (engine, Taken.OWN) and pool.reused == 1
    pool.give(a, engine)
    # B takes the only idle engine: switched to it (stripped), not A's any more.
    assert pool.take(b, None) == (engine, Taken.BARE) and pool.switched == 1
    pool.give(b, engine)
    assert pool.take(a, engine) == (engine, Taken.BARE) and pool.switched == 2
    pool.give(a, engine)
    pool.close()
    assert pool.live == 0 and pool.made == 1 and pool.overdrafts == 0


def test_a_take_at_the_bound_waits_for_the_engine_being_disowned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In the ``always`` mode a take hands the CPU's last engine to ``disown``, which
    takes that CPU off it outside the pool's lock: it is idle all the same, so another
    take at the bound that finds no other engine waits for it rather than making one
    past the bound."""
    pool = EnginePool(1 << 20, bound=2, always=True, workers=1, spares=2)
    a, b, c = object(), object(), object()
    ea, _ = pool.take(a, None)
    eb, _ = pool.take(b, None)
    pool.give(a, ea, keep=True)
    pool.give(b, eb, keep=True)
    got: list[tuple[Any, Taken]] = []
    taker = threading.Thread(target=lambda: got.append(pool.take(c, None)))
    strip = _unicorn.strip

    def disowning(uc: Any) -> None:
        if uc is ea and not taker.is_alive() and not got:
            taker.start()  # C takes while A's last engine is out of the idle ones
            taker.join(0.5)  # (a take that made one past the bound is back by now)
        strip(uc)

    monkeypatch.setattr(_unicorn, "strip", disowning)
    assert pool.take(a, ea) == (eb, Taken.BARE) and pool.evicted == 1
    taker.join(LIMIT)
    assert got == [(ea, Taken.BARE)]
    assert pool.live == pool.peak == 2 and pool.overdrafts == 0
    pool.give(a, eb)
    pool.give(c, ea)
    pool.close()
    assert pool.live == 0 and pool.made == 2


def test_runnable_cpus_keep_their_engines_until_the_bound_then_the_last_gives_way() -> None:
    pool = EnginePool(1 << 20, bound=4, workers=1, spares=1)
    a, b, c, d, e = (object() for _ in range(5))
    ea, _ = pool.take(a, None)
    eb, _ = pool.take(b, None)
    pool.give(a, ea, keep=True)
    pool.give(b, eb, keep=True)
    # Below the bound a CPU without an engine gets a new one, not a kept one.
    ec, taken = pool.take(c, None)
    assert taken is Taken.BARE and ec not in (ea, eb) and pool.switched == 0
    assert pool.take(a, ea) == (ea, Taken.OWN)
    pool.give(a, ea, keep=True)
    # A sleeping CPU's engine is a spare, switched before anything new is made.
    pool.give(c, ec)
    assert pool.kept == 2 and pool.take(d, None) == (ec, Taken.BARE) and pool.switched == 1
    ee, _ = pool.take(e, None)  # (new: the 4th)
    assert pool.live == pool.bound == 4
    pool.give(d, ec, keep=True)
    # At the bound, the engine kept last (E's) goes to a newcomer; A and B keep theirs.
    pool.give(e, ee, keep=True)
    f = object()
    assert pool.take(f, None) == (ee, Taken.BARE) and pool.evicted == 1
    assert pool.take(b, eb) == (eb, Taken.OWN)
    # Resting turns a kept engine into a spare; spares past `spares` are closed, oldest first.
    pool.rest(d, ec)
    assert pool.kept == 1 and pool.idle == 2  # (A's kept, D's spare)
    pool.give(b, eb)
    assert _unicorn.is_closed(ec) and pool.idle == 2 and pool.live == 3
    assert pool.take(a, ea) == (ea, Taken.OWN) and pool.take(b, eb) == (eb, Taken.OWN)
    pool.give(a, ea)
    pool.give(b, eb)
    pool.give(f, ee, keep=True)
    pool.close()
    assert pool.live == 0 and pool.overdrafts == 0 and pool.peak == 4


def test_a_crowd_taking_new_engines_has_more_made_ahead_up_to_the_reserve() -> None:
    pool = EnginePool(1 << 20, bound=5, workers=1, spares=3)
    asked: list[int] = []
    pool.wanted = lambda: asked.append(pool.live)
    a, b, c, d = (object() for _ in range(4))
    ea, _ = pool.take(a, None)
    assert asked == []  # a lone CPU's new engine: nothing made ahead
    pool.give(a, ea, keep=True)  # A computes: its engine waits for it
    eb, _ = pool.take(b, None)
    assert asked == [2]  # a new engine while a runnable CPU keeps one: asked, once
    ec, _ = pool.take(c, None)
    assert asked == [2] and pool.made == 3
    # The device makes them one at a time, until the bound (here before the reserve).
    assert pool.prepare() and pool.ready == 1
    assert pool.prepare() and pool.ready == 2 and pool.live == pool.bound
    assert not pool.prepare() and pool.prepared == 2 and pool.made == 5
    # A take gets one made ahead: never run, no memory, no hooks; not a switch.
    ed, taken = pool.take(d, None)
    assert taken is Taken.BARE and ed not in (ea, eb, ec) and pool.ready_taken == 1
    assert pool.switched == 0 and pool.made == 5 and hook_count(ed) == 0
    assert list(ed.mem_regions()) == []
    # Spares past the reserve close the engines made ahead first.
    pool.give(b, eb)
    pool.give(c, ec)
    pool.give(d, ed)
    assert pool.ready == 0 and pool.idle == 4 and pool.live == 4 and pool.closed == 1
    assert pool.peak == pool.bound and pool.overdrafts == 0
    pool.close()
    assert not pool.prepare() and pool.live == 0


def test_engines_are_made_ahead_up_to_the_reserve_and_none_after_close() -> None:
    pool = EnginePool(1 << 20, bound=100, workers=1, spares=3)
    asked: list[int] = []
    pool.wanted = lambda: asked.append(pool.live)
    a, b, c, d = (object() for _ in range(4))
    ea, _ = pool.take(a, None)
    pool.give(a, ea, keep=True)
    eb, _ = pool.take(b, None)
    pool.give(b, eb)  # one spare already: two more make the reserve
    made = 0
    while pool.prepare():
        made += 1
    assert made == 2 and pool.ready == 2 and pool.idle == 4 and pool.live == 4
    # Takes find what was made ahead, then the spare; the next new engine asks again.
    assert pool.take(c, None)[0] not in (ea, eb) and pool.take(d, None)[0] not in (ea, eb)
    assert pool.take(b, eb) == (eb, Taken.OWN) and asked == [2]
    pool.take(object(), None)
    assert asked == [2, 5] and pool.made == 5
    pool.close()
    assert not pool.prepare() and pool.made == 5 and pool.idle == 0


async def test_a_crowd_starting_to_compute_takes_engines_made_ahead_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop_thread: set[int] = set()
    real_prepare = EnginePool.prepare

    def prepare(pool: EnginePool) -> bool:
        loop_thread.add(threading.get_ident())
        return real_prepare(pool)

    monkeypatch.setattr(EnginePool, "prepare", prepare)
    async with LguestDevice(engines="pool", workers=1, max_engines=64) as dev:
        pool = pool_of(dev)
        late, *crowd = [await boot(dev, SPIN) for _ in range(9)]
        readers = [asyncio.ensure_future(g.file.read(abi.WORD_SIZE)) for g in crowd]
        await until(lambda: all(g.file.cpu(0).engine.busy for g in crowd), LIMIT)
        # New engines were made while others computed: the loop made more ahead.
        await until(lambda: pool.ready > 0, LIMIT)
        assert loop_thread == {threading.get_ident()} and pool.ready <= pool.spares
        in_takes, taken = pool.made - pool.prepared, pool.ready_taken
        # A latecomer (its own engine long switched away) takes one of them: no switch,
        # nothing made.
        readers.append(asyncio.ensure_future(late.file.read(abi.WORD_SIZE)))
        await until(lambda: late.file.cpu(0).engine.busy, LIMIT)
        assert pool.ready_taken == taken + 1 and pool.made - pool.prepared == in_takes
        assert pool.peak <= pool.bound and pool.overdrafts == 0
        await stop_readers(readers, [*crowd, late])


async def test_a_crowd_within_the_bound_keeps_its_engines_and_never_switches() -> None:
    async with LguestDevice(engines="pool", workers=1, max_engines=16) as dev:
        pool = pool_of(dev)
        spinners = [await boot(dev, SPIN) for _ in range(8)]
        readers = [asyncio.ensure_future(g.file.read(abi.WORD_SIZE)) for g in spinners]
        # Each CPU has computed through an executor slice: its engine is kept for it.
        await until(lambda: all(g.file.cpu(0).engine.busy for g in spinners), LIMIT)
        taken, reused, switched, made = pool.taken, pool.reused, pool.switched, pool.made
        counters = [g.u32("counter") for g in spinners]
        await until(
            lambda: all(moved_on(g, n) for g, n in zip(spinners, counters, strict=True)), LIMIT
        )
        await until(lambda: pool.taken > taken + 5 * len(spinners), LIMIT)
        # Since, every CPU took its own engine back at every turn: none switched or made.
        assert pool.switched == switched and pool.evicted == 0 and pool.made == made
        assert pool.reused - reused == pool.taken - taken
        assert made <= len(spinners) + pool.spares
        await stop_readers(readers, spinners)


async def test_a_cpu_going_on_to_the_executor_takes_its_inline_engine_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crowd starting to compute: each CPU's inline slices use up their time and its
    run goes on to the executor, whose first step takes back the engine the inline
    slices ran on (kept for it meanwhile), not one of another CPU's or a new one."""
    first_steps: dict[int, bool] = {}  # id(CPU) -> its first step got its own engine
    real_take = execute._take_engine

    def take(cpu: LgCpu) -> float | None:
        last = cpu.engine.last
        took = real_take(cpu)
        first_steps.setdefault(id(cpu), last is not None and cpu.engine.uc is last)
        return took

    monkeypatch.setattr(execute, "_take_engine", take)
    async with LguestDevice(engines="pool", workers=1, max_engines=64) as dev:
        pool = pool_of(dev)
        spinners = [await boot(dev, SPIN) for _ in range(8)]
        first_steps.clear()
        readers = [asyncio.ensure_future(g.file.read(abi.WORD_SIZE)) for g in spinners]
        await until(lambda: all(g.file.cpu(0).engine.busy for g in spinners), LIMIT)
        assert first_steps == {id(g.file.cpu(0)): True for g in spinners}
        assert pool.evicted == 0
        await stop_readers(readers, spinners)


async def test_a_busy_guest_keeps_its_engine_through_its_hypercalls() -> None:
    async with LguestDevice(engines="pool", workers=1, max_engines=16) as dev:
        pool = pool_of(dev)
        guests = [await boot(dev, CALLING_SPIN) for _ in range(6)]
        readers = [asyncio.ensure_future(g.file.read(abi.WORD_SIZE)) for g in guests]
        await until(lambda: all(g.file.cpu(0).engine.busy for g in guests), LIMIT)
        calls = [g.file.cpu(0).stats.hypercalls for g in guests]
        idle_seen = 0

        def check() -> bool:
            nonlocal idle_seen
            idle_seen += sum(not g.file.cpu(0).engine.busy for g in guests)
            now = [g.file.cpu(0).stats.hypercalls for g in guests]
            return all(b > a + 20 for a, b in zip(calls, now, strict=True))

        await until(check, LIMIT)
        assert idle_seen == 0 and pool.evicted == 0
        await stop_readers(readers, guests)


async def test_guests_that_wake_and_sleep_share_a_few_engines_however_high_the_bound() -> None:
    """Guests that never compute through an executor slice keep no engine: however many
    wake at once, the pool holds what runs (held ones) and its spares."""
    async with LguestDevice(engines="pool", workers=1, max_engines=200) as dev:
        pool = pool_of(dev)
        wakers = [await boot(dev, WAKER) for _ in range(40)]
        readers = [asyncio.ensure_future(g.file.read(abi.WORD_SIZE)) for g in wakers]
        await until(lambda: all(g.u32("ticks") >= 10 for g in wakers), LIMIT)
        assert pool.kept == 0 and pool.evicted == 0
        # At most one step per worker, two on the loop (a CPU starting another), spares.
        assert pool.peak <= pool.workers + 2 + pool.spares < pool.bound
        await stop_readers(readers, wakers)


async def test_a_lone_waking_guest_runs_on_its_own_engine_every_time() -> None:
    async with LguestDevice(engines="pool") as dev:
        pool = pool_of(dev)
        g = await boot(dev, WAKER)
        reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
        await until(lambda: g.u32("ticks") >= 10, LIMIT)
        cpu = g.file.cpu(0)
        # It gave its engine back at every halt and took the same one back at every
        # tick: never switched, never a second engine.
        assert cpu.stats.hibernations >= 9 and pool.reused >= 9
        assert pool.switched == 0 and pool.made == 1
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert g.file.death is None


NOTIFIER = r"""
main:
    LGUEST_INIT
1:  HCALL 17, 1
    jmp 1b
"""


async def test_a_notify_served_at_once_keeps_the_engine_until_the_loops_next_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Launcher that reads again without waiting finds its CPU still on its engine: no
    give back and take at every notify.  It is given back at the loop's next turn, or
    as soon as another CPU's read ends: one CPU at a time keeps one that way.  (No
    yields to the loop: they give the engine back too, see run.YIELD_TIME.)"""
    monkeypatch.setattr(run, "YIELD_TIME", math.inf)
    async with LguestDevice(engines="pool") as dev:
        pool = pool_of(dev)
        a, b = await boot(dev, NOTIFIER), await boot(dev, NOTIFIER)
        cpu_a, cpu_b = a.file.cpu(0), b.file.cpu(0)
        await a.file.read(abi.WORD_SIZE)
        assert not cpu_a.hibernated  # its read ended: the engine waits for the next turn
        taken, releases = pool.taken, cpu_a.stats.hibernations
        for _ in range(50):
            assert await a.file.read(abi.WORD_SIZE) == abi.pack_words(1)
        assert pool.taken == taken and cpu_a.stats.hibernations == releases
        await b.file.read(abi.WORD_SIZE)  # another read ends: A's engine goes back
        assert cpu_a.hibernated and not cpu_b.hibernated and pool.held == 1
        await asyncio.sleep(0)  # the loop's next turn: B's goes back too
        assert cpu_b.hibernated and pool.held == 0
        assert pool.peak <= 2 and pool.overdrafts == 0


def _ticking_clock(clock: list[float]) -> Any:
    """A stand-in for the ``time`` module of run and cpu whose thread clock reads
    ``clock[0]``, each look adding a fiftieth of run.YIELD_TIME (the tests add the rest)."""

    class Clock:
        @staticmethod
        def thread_time() -> float:
            clock[0] += run.YIELD_TIME / 50
            return clock[0]

    return Clock


def _no_inline_deadline(patch: pytest.MonkeyPatch) -> None:
    """Inline slices without their real CPU-time deadline: on a loaded machine a slice
    that outlasts it goes on in an executor step, whose engine is given back after it
    (a take more, by the machine's load, not by the rule a test counts)."""
    patch.setattr(execute, "_INLINE_NS", 10**12)
    patch.setattr(execute, "_LONG_INLINE_NS", 10**12)


@pytest.mark.parametrize("slow", ["switch", "first slice"])
async def test_a_switchs_time_does_not_make_the_cpu_yield(slow: str) -> None:
    """The CPU time a take spends switching an engine, and the first slice on it (which
    translates the guest's code afresh), are not the CPU's own run: they do not count
    toward run.YIELD_TIME, so a slow switch does not make the CPU yield (which gives the
    engine back, so that the next slice switches again).  A fake thread clock shared by
    run and cpu: each look adds a fiftieth of YIELD_TIME, and either each switch or each
    slice a whole one; the ``always`` mode switches the engine at every slice, one slice
    a read."""
    clock = [0.0]
    Clock = _ticking_clock(clock)

    original = EnginePool.take

    def slow_take(self: EnginePool, owner: object, last: Any, kind: object = None) -> Any:
        clock[0] += run.YIELD_TIME
        return original(self, owner, last, kind)

    one_slice = execute.run_slice

    def slow_slice(cpu: LgCpu, *args: Any, **kwargs: Any) -> Any:
        clock[0] += run.YIELD_TIME
        return one_slice(cpu, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "time", Clock)
        patch.setattr(cpu_module, "time", Clock)
        if slow == "switch":
            patch.setattr(EnginePool, "take", slow_take)
        else:
            patch.setattr(run, "run_slice", slow_slice)
        _no_inline_deadline(patch)
        async with LguestDevice(engines="always") as dev:
            g = await boot(dev, NOTIFIER)
            turns = 0
            reads = 0

            async def count_turns() -> None:
                nonlocal turns
                while True:
                    turns += 1
                    await asyncio.sleep(0)

            counter = asyncio.create_task(count_turns())
            await asyncio.sleep(0)
            try:
                async with asyncio.timeout(LIMIT):
                    for _ in range(100):
                        assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)
                        reads += 1
            finally:
                counter.cancel()
            taken = pool_of(dev).taken
    assert taken >= reads  # every slice switched
    # Its own looks make it yield now and then (about every tenth read), never each read.
    assert turns <= reads // 4, (turns, reads)


# Ticks three times, 1 ms apart, halted in between, then notifies: a ticker's life.
TICKER = r"""
main:
    LGUEST_INIT
    IDT 32, tick
    HCALL 9, 1000000
1:  HCALL 10
    cmpl $3, ticks
    jne 1b
    HCALL 17, 0x3
2:  HCALL 10
    jmp 2b
tick:
    incl ticks
    cmpl $3, ticks
    je 3f
    HCALL 9, 1000000
3:  jmp irq_return
.data
ticks: .long 0
"""


async def test_a_crowd_of_tickers_takes_an_engine_once_a_wake() -> None:
    """20 tickers alive at once, each halting between its three ticks: each life takes
    an engine at most four times that is not its own (its first slice and its three
    wakes), always one of its kind (hooks kept, nothing stripped), however slow the
    switches and the slices after them are.  A fake thread clock shared by run and
    cpu: each look adds a fiftieth of run.YIELD_TIME, each switch and the slice after it
    (which translates the code afresh) a whole one (the yields that time would cause
    give the engine back)."""
    clock = [0.0]
    fresh: set[object] = set()  # the owner tokens of CPUs whose next slice is the first
    Clock = _ticking_clock(clock)

    original = EnginePool.take

    def slow_take(self: EnginePool, owner: object, last: Any, kind: object = None) -> Any:
        clock[0] += run.YIELD_TIME
        uc, taken = original(self, owner, last, kind)
        if taken is not Taken.OWN:
            fresh.add(owner)
        return uc, taken

    one_slice = execute.run_slice

    def slow_slice(cpu: LgCpu, *args: Any, **kwargs: Any) -> Any:
        if cpu.engine.token in fresh:
            fresh.discard(cpu.engine.token)
            clock[0] += run.YIELD_TIME
        return one_slice(cpu, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run, "time", Clock)
        patch.setattr(cpu_module, "time", Clock)
        patch.setattr(EnginePool, "take", slow_take)
        patch.setattr(run, "run_slice", slow_slice)
        _no_inline_deadline(patch)
        async with LguestDevice(engines="pool") as dev:
            pool = pool_of(dev)
            tickers = [await boot(dev, TICKER) for _ in range(20)]
            async with asyncio.timeout(LIMIT):
                words = await asyncio.gather(*(g.file.read(abi.WORD_SIZE) for g in tickers))
            assert words == [abi.pack_words(3)] * 20
            assert all(g.u32("ticks") == 3 for g in tickers)
            assert pool.taken - pool.reused <= 4 * 20
            assert pool.hooked == pool.switched  # (nothing stripped)


async def test_a_new_cpu_takes_no_engine_until_its_first_slice() -> None:
    """INITIALIZE touches no engine: the CPU's registers wait as the boot context, the
    same bytes a new instance of its own gets (engines "off"), and its first slice
    takes a spare with its hooks kept, as any wake does: nothing stripped, nothing made."""
    async with LguestDevice(engines="pool") as dev, LguestDevice(engines="off") as own:
        pool = pool_of(dev)
        warm = await boot(dev, NOTIFIER)
        await warm.file.read(abi.WORD_SIZE)
        await until(lambda: warm.file.cpu(0).hibernated, LIMIT)  # its engine: a spare
        taken, switched, hooked, made = pool.taken, pool.switched, pool.hooked, pool.made
        g = await boot(dev, NOTIFIER)
        cpu = g.file.cpu(0)
        assert pool.taken == taken and pool.held == 0 and cpu.hibernated
        if _slicing.NATIVE:  # its meter is set up for the interrupt hook it will inherit
            assert cpu.fuel.ram == g.memory.address and cpu.fuel.local_mask
        reference = (await boot(own, NOTIFIER)).file.cpu(0)
        assert not reference.hibernated
        assert cpu.capture(None).context == reference.capture(None).context
        assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)
        assert (pool.switched, pool.hooked, pool.made) == (switched + 1, hooked + 1, made)


@pytest.mark.parametrize("mode", ["pool", "always"])
async def test_host_writes_to_a_sleeper_are_dropped_only_on_its_own_engine(mode: str) -> None:
    """The Host's writes to a CPU without an engine wait in ``stale_code``: its own
    engine, back untouched, still holds translations of the old bytes; any other has
    none (a switch flushes them), so the take forgets them."""
    async with LguestDevice(engines=mode) as dev:
        g = await boot(dev, HALT)
        reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
        cpu = g.file.cpu(0)
        await until(lambda: cpu.halted and cpu.hibernated, LIMIT)
        at = g.guest.symbols["main"]
        g.memory.write(at, g.memory.read(at, 4))  # a Host write (of the same bytes): noted
        assert cpu.stale_code
        cpu.take_engine()
        assert bool(cpu.stale_code) == (mode == "pool")  # (alone: its own engine, in pool)
        assert (pool_of(dev).reused > 0) == (mode == "pool")
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def test_the_pool_never_makes_more_than_its_bound_for_halted_guests() -> None:
    async with LguestDevice(engines="pool", workers=1, max_engines=1) as dev:
        pool = pool_of(dev)
        guests = [await boot(dev, HALT) for _ in range(3 * pool.bound)]
        readers = [asyncio.ensure_future(g.file.read(abi.WORD_SIZE)) for g in guests]
        await until(lambda: all(g.file.cpu(0).hibernated for g in guests), LIMIT)
        assert pool.held == 0  # nobody holds one: every halted CPU gave it back
        assert pool.peak <= pool.bound and pool.overdrafts == 0
        assert pool.live == pool.idle == pool.made - pool.closed
        assert pool.kept == 0 and pool.idle <= pool.spares  # (nothing runs: spares only)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_an_engine_that_raised_inside_unicorn_is_closed_not_handed_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_run = _slicing.run
    doomed: list[Any] = []

    def failing_run(uc: Any, fuel: Any, *args: Any) -> Any:
        if fuel is victim_fuel:
            doomed.append(uc)
            raise UcError(uc_const.UC_ERR_EXCEPTION)
        return real_run(uc, fuel, *args)

    async with LguestDevice(engines="pool", workers=1, max_engines=1) as dev:
        pool = pool_of(dev)
        g, reader = await paused_spinner(dev)
        victim_fuel = g.file.cpu(0).fuel
        monkeypatch.setattr(_slicing, "run", failing_run)
        g.file.resume()
        async with asyncio.timeout(LIMIT):
            with pytest.raises(OSError):
                await reader
        assert "emulation error" in present(g.file.death).reason
        await g.file.close()
        (engine,) = doomed
        assert _unicorn.is_closed(engine) and pool.closed == 1
        # The next guests get other engines, and run.
        others = [await paused_spinner(dev) for _ in range(pool.bound)]
        assert all(o.file.cpu(0).engine.last is not engine for o, _ in others)
        for _o, other_reader in others:
            other_reader.cancel()
        await asyncio.gather(*(r for _, r in others), return_exceptions=True)


async def test_an_engine_whose_switch_failed_is_closed_not_handed_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Mapping a guest's memory into a switched engine fails on a worker: that guest dies
    (no engine for it), the engine is closed, and the other guests never get it."""
    real_map = _unicorn.map_memory
    doomed: list[Any] = []

    def failing_map(uc: Any, size: int, host_address: int) -> None:
        on_worker = threading.current_thread() is not threading.main_thread()
        if host_address == victim.memory.address and on_worker and not doomed:
            doomed.append(uc)
            raise UcError(uc_const.UC_ERR_NOMEM)
        real_map(uc, size, host_address)

    async with LguestDevice(engines="always", workers=1) as dev:
        pool = pool_of(dev)
        victim, other = await boot(dev, SPIN), await boot(dev, SPIN)
        monkeypatch.setattr(_unicorn, "map_memory", failing_map)
        doomed_reader = asyncio.ensure_future(victim.file.read(abi.WORD_SIZE))
        reader = asyncio.ensure_future(other.file.read(abi.WORD_SIZE))
        async with asyncio.timeout(LIMIT):
            with pytest.raises(OSError):
                await doomed_reader
        assert "no engine" in present(victim.file.death).reason
        (engine,) = doomed
        assert _unicorn.is_closed(engine) and pool.closed >= 1
        counter, takes = other.u32("counter"), pool.taken
        await until(lambda: other.u32("counter") > counter and pool.taken > takes + 5, LIMIT)
        assert other.file.death is None and other.file.cpu(0).engine.last is not engine
        assert pool.peak <= pool.bound and pool.overdrafts == 0
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def stop_readers(readers: Sequence[asyncio.Future[bytes]], guests: Iterable[Booted]) -> None:
    """Cancel a crowd's reads and check that none of its guests died meanwhile."""
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    assert all(g.file.death is None for g in guests)


def moved_on(g: Booted, counter: int) -> bool:
    return g.u32("counter") > counter


def check_engines(pool: EnginePool, guests: list[Booted]) -> None:
    """No engine is held by two CPUs, and the pool never made more than its bound."""
    held = [g.file.cpu(0).engine.uc for g in guests if not g.file.closed]
    held = [uc for uc in held if uc is not None]
    assert len({id(uc) for uc in held}) == len(held)
    assert pool.peak <= pool.bound and pool.overdrafts == 0


async def test_no_engine_is_ever_held_by_two_cpus_among_spinners_and_wakers() -> None:
    async with LguestDevice(engines="pool", workers=1) as dev:
        pool = pool_of(dev)
        spinners = [await boot(dev, SPIN) for _ in range(10)]
        wakers = [await boot(dev, WAKER) for _ in range(10)]
        guests = spinners + wakers
        readers = [asyncio.ensure_future(g.file.read(abi.WORD_SIZE)) for g in guests]
        samples = 0

        def check() -> bool:
            nonlocal samples
            check_engines(pool, guests)
            samples += 1
            return all(g.u32("ticks") >= 20 for g in wakers) and all(
                g.u32("counter") > 0 for g in spinners
            )

        await until(check, LIMIT)
        assert samples > 1 and pool.switched > 0
        await stop_readers(readers, guests)


async def test_hostile_guests_never_grow_the_pool_past_its_bound() -> None:
    """Many spinners and wakers, some killed, paused and captured mid-slice, more
    booted meanwhile: the pool's bound holds and every survivor computes on."""
    async with LguestDevice(engines="pool", workers=2, max_engines=1) as dev:
        pool = pool_of(dev)  # (bounded by what runs at once: fewer than the spinners)
        spinners = [await boot(dev, SPIN) for _ in range(8)]
        wakers = [await boot(dev, WAKER) for _ in range(8)]
        readers = {
            id(g): asyncio.ensure_future(g.file.read(abi.WORD_SIZE)) for g in spinners + wakers
        }
        killed: list[Booted] = []
        for round_ in range(3):
            await until(lambda: all(g.u32("counter") > 0 for g in spinners), LIMIT)
            check_engines(pool, spinners + wakers)
            victim = spinners.pop(0)  # killed mid-slice
            victim.file.kill(f"round {round_}")
            killed.append(victim)
            paused = spinners[0]  # paused and captured mid-slice, then resumed
            await paused.file.pause()
            counter = paused.u32("counter")
            state = paused.file.state()
            assert state.cpus[0].context and paused.file.cpu(0).hibernated
            paused.file.resume()
            await until(functools.partial(moved_on, paused, counter), LIMIT)
            fresh = await boot(dev, SPIN)
            spinners.append(fresh)
            readers[id(fresh)] = asyncio.ensure_future(fresh.file.read(abi.WORD_SIZE))
        await until(lambda: all(g.u32("ticks") >= 10 for g in wakers), LIMIT)
        for g in killed:
            with pytest.raises(OSError):
                await readers.pop(id(g))
        check_engines(pool, spinners + wakers)
        assert pool.switched > 0 and pool.peak == pool.bound < len(spinners)
        for reader in readers.values():
            reader.cancel()
        await asyncio.gather(*readers.values(), return_exceptions=True)
        assert all(g.file.death is None for g in spinners + wakers)


def test_a_slice_after_a_switch_is_long_enough_for_the_switch_to_be_a_small_share() -> None:
    target = execute._TARGET_NS
    assert execute.switched_slice_ns(target, 0.0) == target  # its own engine: as before
    # A 200 us switch: a slice of 20 ms, so that the switch is 1% of it.
    assert execute.switched_slice_ns(target, 0.0002) == int(0.0002 / execute.SWITCH_SHARE * 1e9)
    # Never shorter than the crowd's slice, never longer than a crowd's round for it.
    assert execute.switched_slice_ns(30_000_000, 0.0001) == 30_000_000
    assert execute.switched_slice_ns(target, 1.0) == int(execute.CROWD_ROUND * 1e9)
    # A crowd of 500 jobs a worker: their round of switched slices stays SWITCHED_ROUND.
    assert execute.switched_slice_ns(target, 1.0, 500) == int(execute.SWITCHED_ROUND / 500 * 1e9)
    assert execute.switched_slice_ns(target, 1.0, 5000) == target


async def test_executor_slices_that_switched_engines_run_longer_past_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_take, real_slice = execute._take_engine, execute._one_slice
    real_crowded = EnginePool.crowded
    steps: list[tuple[float, int]] = []  # (the switch's seconds, the slice's ns), crowded
    switch: list[float | None] = [None]
    crowded: list[bool] = [False]

    def take(cpu: Any) -> float | None:
        switch[0] = real_take(cpu)
        return switch[0]

    def is_crowded(pool: EnginePool, waiting: float) -> bool:
        crowded[0] = real_crowded(pool, waiting)
        return crowded[0]

    def one_slice(cpu: Any, budget: int | None, busy_ns: int, *rest: Any) -> Any:
        if budget is None and switch[0] is not None and crowded[0]:
            steps.append((switch[0], busy_ns))
        switch[0] = None
        crowded[0] = False
        return real_slice(cpu, budget, busy_ns, *rest)

    monkeypatch.setattr(execute, "_take_engine", take)
    monkeypatch.setattr(execute, "_one_slice", one_slice)
    monkeypatch.setattr(EnginePool, "crowded", is_crowded)
    async with LguestDevice(engines="pool", workers=1, max_engines=1) as dev:
        # More spinners than engines: their own engines are taken between their turns.
        guests = [await boot(dev, SPIN) for _ in range(present(dev.engines).bound + 2)]
        readers = [asyncio.ensure_future(g.file.read(abi.WORD_SIZE)) for g in guests]
        await until(lambda: sum(seconds > 0 for seconds, _ in steps) >= 6, LIMIT)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    # Every executor slice that took a switched engine while more CPUs computed than
    # the pool's bound got the time that pays for it.
    shortest = execute.slice_ns(len(guests))  # (at most that many jobs wait per worker)
    for seconds, busy_ns in steps:
        assert busy_ns >= execute.switched_slice_ns(shortest, seconds, len(guests)) > 0
        assert busy_ns == execute.switched_slice_ns(busy_ns, seconds, len(guests))


async def closed_waker(dev: LguestDevice) -> tuple[weakref.ref[LgCpu], Any]:
    """A guest that ticked and halted, then closed: its CPU, weakly, and the engine it
    gave back at its last halt."""
    g = await boot(dev, WAKER)
    reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
    await until(lambda: g.u32("ticks") >= 2, LIMIT)
    cpu = g.file.cpu(0)
    engine = cpu.engine.last  # given back at its halt, waiting for it
    assert engine is not None and cpu.hibernated
    await g.file.close()
    with pytest.raises(OSError):
        await reader
    g.memory.close()
    return weakref.ref(cpu), engine


async def test_a_closed_guests_engine_waits_in_the_pool_holding_nothing_of_it() -> None:
    async with LguestDevice(engines="pool") as dev:
        pool = pool_of(dev)
        cpu, engine = await closed_waker(dev)
        # Still in the pool for any CPU, but with nothing of the closed one: its hooks
        # stay for the next CPU of its kind, pointing at no CPU; only the Host's pages
        # stay mapped.
        assert not _unicorn.is_closed(engine) and pool.idle == pool.live
        seat = _unicorn.seat(engine)
        assert seat.cpu is None and seat.cell.value is None and seat.kind is not None
        assert [begin for begin, _end, _perms in engine.mem_regions()] == [abi.SWITCHER_ADDR]
        gc.collect()
        assert cpu() is None


async def test_engines_a_cpu_switched_away_from_hold_nothing_of_it() -> None:
    """Under ``always`` a CPU never takes back the engine it gave last: each one it
    leaves behind at a switch waits in the pool pointing at no CPU, so a closed guest is
    freed whichever engines it passed through."""
    async with LguestDevice(engines="always", hibernate_after=math.inf) as dev:
        pool = pool_of(dev)
        cpu, engine = await closed_waker(dev)
        assert pool.switched >= 2  # (each tick's slice on another engine)
        gc.collect()
        assert cpu() is None
        assert _unicorn.seat(engine).cpu is None


async def test_the_pool_is_the_default_and_the_environment_chooses_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(engines.ENV, raising=False)
    async with LguestDevice() as dev:
        assert dev.engines is not None and not dev.engines.always
    monkeypatch.setenv(engines.ENV, "pool")
    floor = 3 + 1 + engines.RESERVE
    async with LguestDevice(workers=3) as dev:
        pool = pool_of(dev)
        assert not pool.always and pool.spares == floor
        assert pool.bound == max(floor, engines.default_bound(dev.tcg_buffer))
    async with LguestDevice(workers=3, max_engines=100) as dev:
        assert pool_of(dev).bound == 100
    async with LguestDevice(workers=3, max_engines=1) as dev:  # never below what runs
        assert pool_of(dev).bound == floor
    with pytest.raises(ValueError, match="max_engines"):
        LguestDevice(max_engines=0)
    monkeypatch.setenv(engines.ENV, "always")
    async with LguestDevice(workers=3, max_engines=100) as dev:
        pool = pool_of(dev)
        assert pool.always and pool.bound == floor  # (its engines switch among the CPUs)
    monkeypatch.setenv(engines.ENV, "off")
    async with LguestDevice() as dev:
        assert dev.engines is None
    monkeypatch.setenv(engines.ENV, "sometimes")
    with pytest.raises(ValueError, match="LGUEST_ENGINE_SWITCH"):
        LguestDevice()


@pytest.mark.one_loop
async def test_a_slice_of_a_cpu_left_with_no_engine_kills_only_its_guest(
    dev: LguestDevice,
) -> None:
    # The invariant run_slice checks: a slice enters the guest only on its CPU's engine.
    # A CPU left with neither an engine nor its kept registers (an ownership bug) is
    # killed with a reason that says so, before anything runs; the device goes on.
    g = await boot(dev, SPIN)
    other = await boot(dev, HALT)
    cpu = g.file.cpu(0)
    cpu.hibernate()
    assert cpu.engine.uc is None
    cpu.engine.frozen = None  # (the registers lost, as a take undone by a release left them)
    assert execute.run_slice(cpu, 100) is execute.SliceExit.DEATH
    assert "a slice of a CPU with no engine" in present(g.file.death).reason
    assert g.u32("counter") == 0
    assert other.file.death is None
    await g.file.close()


async def test_a_take_whose_engine_another_took_meanwhile_counts_the_switch() -> None:
    """A CPU's take that finds its own engine gone (another thread's take picked it
    between the CPU's look and its take) counts the switch that follows in the seconds
    it returns and charges: the CPU clock is read before any of the switch, whatever
    the moment another thread takes the engine.  A fake thread clock: the switch adds a
    whole second; its own engine back costs nothing."""
    clock = [0.0]
    stolen: list[object] = []
    original = EnginePool.take

    def stealing_take(self: EnginePool, owner: object, last: Any, kind: object = None) -> Any:
        if last is not None and not stolen:
            self.disown(owner, last)  # (as another thread's take does: the engine is gone)
            stolen.append(last)
        clock[0] += 1.0  # the switch
        return original(self, owner, last, kind)

    async with LguestDevice(engines="pool", hibernate_after=math.inf) as dev:
        pool = pool_of(dev)
        g = await boot(dev, NOTIFIER)
        assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(1)
        cpu = g.file.cpu(0)
        if cpu.engine.uc is not None:
            assert cpu.release_engine(keep=True)
        last = cpu.engine.last
        assert last is not None
        charged = pool.switch_time
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cpu_module, "time", _ticking_clock(clock))
            patch.setattr(EnginePool, "take", stealing_take)
            spent = cpu.take_engine()
        assert spent is not None
        if stolen:  # (a switch: not its own engine back)
            assert spent >= 1.0 and pool.switch_time - charged >= 1.0, spent
        else:
            assert cpu.engine.uc is last and spent == 0.0 and pool.switch_time == charged
