"""Running guests through the device: notify, break, cancellation, close."""

import asyncio
import errno
import functools
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from guestasm import COUNT_TO, SPIN, Booted, boot, present, until
from unicorn import Uc

from supervisor import LguestDevice, _slicing, abi, engines
from supervisor.abi import LHREQ_BREAK, LHREQ_IRQ, pack_words
from supervisor.slicepool import Job


async def expect(code: int, coro: Awaitable[object]) -> OSError:
    with pytest.raises(OSError) as e:
        await coro
    assert e.value.errno == code, e.value
    return e.value


async def test_notify_is_one_word_and_cleared_on_next_read(dev: LguestDevice) -> None:
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    HCALL 17, 0x1000
    HCALL 17, 0x2000
    HCALL 2, msg, 1, 0
.data
msg: .asciz "bye"
""",
    )
    assert await g.file.read(abi.WORD_SIZE) == pack_words(0x1000)
    assert await g.file.read(abi.WORD_SIZE) == pack_words(0x2000)
    await expect(errno.ENOENT, g.file.read(8))
    assert await g.file.read(64) == b"bye\0"


async def test_break_makes_the_reader_return_eagain_and_the_waker_wait(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    waker = g.file.waker()
    reader = asyncio.create_task(g.file.read(8))
    breaker = asyncio.create_task(waker.write(pack_words(LHREQ_BREAK, 1)))
    await expect(errno.EAGAIN, reader)
    # The waker stays blocked until the Launcher writes BREAK 0.
    assert not breaker.done()
    # While broken out, every read returns EAGAIN straight away.
    await expect(errno.EAGAIN, g.file.read(8))
    assert not breaker.done()
    assert await g.file.write(pack_words(LHREQ_BREAK, 0)) == 0
    assert await breaker == 0
    # And the guest runs again.
    before = g.u32("counter")
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: g.u32("counter") != before)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


def _differs(g: Booted, name: str, before: int) -> Callable[[], bool]:
    return lambda: g.u32(name) != before


def _handled(g: Booted, n: int) -> bool:
    return g.u32("handled") == n


def _irq_stops(g: Booted) -> int:
    """Runs of CPU 0 stopped for an irq whose slice went on, the ones ``_fuel.c``'s run()
    went on with itself included before its run returns and adds them to the stats."""
    cpu = g.file.cpu(0)
    return cpu.stats.irqs_in_slice + int(cpu.fuel.irq_stops)


def _native_irqs(g: Booted) -> int:
    """Irqs of CPU 0 that ``_fuel.c``'s run() delivered itself (as :func:`_irq_stops`)."""
    cpu = g.file.cpu(0)
    return cpu.stats.irqs_native + int(cpu.fuel.irqs_native)


def _continued(g: Booted, n: int) -> bool:
    return present(g.file.stats).continued == n


def _slices_past(g: Booted, n: int) -> bool:
    return present(g.file.stats).slices > n


# Runs that go on past a break: on the exit-request path, where a slice ends only by its
# time (the tests make it long).  The other paths end a slice by its block budget, so a
# run a break left going on stops within milliseconds there (its next slice wants a read);
# with an engine switched at every slice, a break stops the run (run._detachable).
going_on = pytest.mark.skipif(
    not _slicing.EXIT_REQUEST or engines.mode_from_env() == "always",
    reason="the exit-request path, engines kept: slices end only by time",
)


# Runs of many slices: with an engine switched at every slice, each slice is a run of
# its own through the run loop (run._may_go_on), so no run goes on with a handler's rest.
many_slices = pytest.mark.skipif(
    engines.mode_from_env() == "always", reason="engines kept: a run is many slices"
)


async def _on_a_worker(g: Booted) -> asyncio.Task[bytes]:
    """A read of a spinning guest, once its CPU computes in an executor run."""
    cpu = g.file.cpu(0)
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: cpu.running and cpu.threads.slice is not None)
    return reader


@going_on
async def test_a_break_ends_the_read_while_the_executor_run_goes_on(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A break on a CPU computing on a worker ends the read at once (EAGAIN) without
    # stopping the guest: no slice ends for it, and the next read takes the run over.
    from supervisor import execute

    monkeypatch.setattr(execute, "_TARGET_NS", 600 * 10**9)  # one slice for the whole test
    g = await boot(dev, SPIN)
    cpu = g.file.cpu(0)
    reader = await _on_a_worker(g)
    run = cpu.run.queued_slice
    slices = present(g.file.stats).slices
    waker = g.file.waker()
    for n in range(1, 11):
        breaker = asyncio.create_task(waker.write(pack_words(LHREQ_BREAK, 1)))
        await expect(errno.EAGAIN, reader)
        before = g.u32("counter")
        await until(_differs(g, "counter", before))  # it computes, no read in flight
        assert await g.file.write(pack_words(LHREQ_BREAK, 0)) == 0
        assert await breaker == 0
        reader = asyncio.create_task(g.file.read(8))
        await asyncio.sleep(0)
        assert cpu.run.queued_slice is run
        assert present(g.file.stats).breaks_running == n
    assert present(g.file.stats).slices == slices
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert present(g.file.stats).slices == slices + 1  # the cancel stopped the one slice


@pytest.mark.skipif(
    engines.mode_from_env() == "always",
    reason="engines switched at every slice: a break stops the run",
)
async def test_a_read_takes_over_a_run_a_break_left_going_on_before_any_slice(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wake while a run a break left going on is still in its slice (an irq on the
    # count= fallback, which cannot stop that run for it; a hold): the next read must
    # wait for that run, never start a slice of the CPU beside it on the event loop
    # (two threads in one Unicorn instance corrupt the guest and the Host).
    from supervisor import execute, run

    real = execute.run_slice
    loop_thread = threading.get_ident()
    hold = threading.Event()
    release = threading.Event()
    lock = threading.Lock()
    active = [0]
    overlaps: list[str] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        with lock:
            active[0] += 1
            if active[0] > 1:
                overlaps.append("loop" if threading.get_ident() == loop_thread else "worker")
        try:
            result = real(*args, **kwargs)
            if hold.is_set() and threading.get_ident() != loop_thread:
                release.wait(60)  # the run stays in its slice until the test lets it end
            return result
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(run, "run_slice", counted)
    g = await boot(dev, SPIN)
    cpu = g.file.cpu(0)
    reader = await _on_a_worker(g)
    hold.set()
    breaker = asyncio.create_task(g.file.waker().write(pack_words(LHREQ_BREAK, 1)))
    await expect(errno.EAGAIN, reader)
    try:
        assert cpu.running
        await g.file.write(pack_words(LHREQ_BREAK, 0))
        await breaker
        cpu.wake()  # kicks the run, and would have the next slice run on the loop
        reader = asyncio.create_task(g.file.read(8))
        for _ in range(20):
            await asyncio.sleep(0)
        assert overlaps == []
        assert cpu.running and not reader.done()  # the read waits for the run to end
    finally:
        hold.clear()
        release.set()
    before = g.u32("counter")
    await until(_differs(g, "counter", before))  # the read took the run over: it computes
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert overlaps == []


@going_on
@pytest.mark.parametrize("then", ["pause", "close", "irq"])
async def test_a_run_a_break_left_going_on_stops_when_the_cpu_is_needed(
    dev: LguestDevice, then: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor import execute

    monkeypatch.setattr(execute, "_TARGET_NS", 600 * 10**9)  # it would end only by them
    g = await boot(dev, SPIN)
    cpu = g.file.cpu(0)
    reader = await _on_a_worker(g)
    breaker = asyncio.create_task(g.file.waker().write(pack_words(LHREQ_BREAK, 1)))
    await expect(errno.EAGAIN, reader)
    assert cpu.running  # still computing
    if then == "pause":
        await g.file.pause()
        assert g.file.paused() and not cpu.running
        assert cpu.run.queued_slice is None  # ended before a read took it over: let go
        assert g.file.state().cpus  # stopped: its state can be taken
        g.file.resume()
    elif then == "irq":  # the run sees it (the guest takes none) and goes on
        await g.file.write(pack_words(LHREQ_IRQ, 3))
        await until(lambda: _irq_stops(g) == 1)
        assert cpu.running and _native_irqs(g) == 0
    else:
        await g.file.close()
        assert not cpu.running
        await expect(errno.EBADF, breaker)
        return
    await g.file.write(pack_words(LHREQ_BREAK, 0))
    await breaker
    before = g.u32("counter")
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: g.u32("counter") != before)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)


# Spins on a worker and, every 2**20 rounds, re-arms a clock event it never lets fire:
# a hypercall the run loop does, which ends the executor step that trapped it.
SPIN_AND_CALL = r"""
main:
    LGUEST_INIT
1:  incl counter
    testl $0xfffff, counter
    jnz 1b
    HCALL 9, 0xfffffff
    jmp 1b
.data
counter: .long 0
"""


@pytest.mark.skipif(
    engines.mode_from_env() == "always",
    reason="engines switched at every slice: a break stops the run",
)
async def test_a_break_leaves_a_stopping_run_its_hypercall_and_its_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A break while the executor step that trapped a hypercall gives its engine back (its
    # registers kept, the instance not yet let go): the read ends (EAGAIN) without doing
    # the hypercall or taking an engine for the CPU, both still the run's.  A take there
    # would be undone by the step's release, and the next inline slice would enter the
    # guest with no engine at all (the guest killed by an internal error).
    from supervisor import cpu as cpu_module

    real = cpu_module._give_back
    loop_thread = threading.get_ident()
    stopping = threading.Event()  # a step that trapped a hypercall is giving back
    release = threading.Event()
    cpus: list[Any] = []  # the guest's CPU, once booted; empty once the hold is done

    def give_back(engine: Any, uc: Any, kind: object, keep: bool = False) -> None:
        if cpus and threading.get_ident() != loop_thread and cpus[0].hcall is not None:
            cpus.clear()
            stopping.set()
            release.wait(60)  # the step stays in its release until the test lets it go
        real(engine, uc, kind, keep)

    monkeypatch.setattr(cpu_module, "_give_back", give_back)
    async with LguestDevice(engines="pool") as dev:
        g = await boot(dev, SPIN_AND_CALL)
        cpu = g.file.cpu(0)
        cpus.append(cpu)
        reader = asyncio.create_task(g.file.read(8))
        try:
            await until(stopping.is_set)
            assert cpu.hcall is not None and cpu.running
            calls = cpu.stats.hypercalls
            waker = g.file.waker()
            breaker = asyncio.create_task(waker.write(pack_words(LHREQ_BREAK, 1)))
            await expect(errno.EAGAIN, reader)
            # The read left both to the run: the hypercall pending, no engine taken.
            assert cpu.hcall is not None and cpu.stats.hypercalls == calls
            assert cpu.engine.frozen is not None and cpu.running
        finally:
            release.set()
        assert await g.file.write(pack_words(LHREQ_BREAK, 0)) == 0
        assert await breaker == 0
        reader = asyncio.create_task(g.file.read(8))
        # The read takes the run over, does its hypercall and runs the guest on.
        await until(lambda: cpu.stats.hypercalls >= calls + 3 or reader.done())
        assert not reader.done() and g.file.death is None
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        assert g.file.death is None


HANDLES = r"""
main:
    LGUEST_INIT
    IDT 35, handler
    movl $512, lguest_data
    HCALL 17, 1
1:  incl counter
    jmp 1b
handler:
    incl handled
    movl $512, lguest_data
    iret
.data
counter: .long 0
handled: .long 0
"""


@going_on
async def test_an_irq_raised_into_a_running_slice_is_delivered_there(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LHREQ_IRQ into a slice computing on a worker: the run stops at a block boundary,
    # _fuel.c's run() delivers the interrupt there and runs on; no slice ends for it, and
    # no run returns to Python (exits), so the irq costs no GIL.
    from supervisor import execute

    monkeypatch.setattr(execute, "_TARGET_NS", 600 * 10**9)  # one slice for the whole test
    g = await boot(dev, HANDLES)
    assert await g.file.read(8) == pack_words(1)
    cpu = g.file.cpu(0)
    reader = await _on_a_worker(g)
    stats = present(g.file.stats)
    slices, interrupts, exits = stats.slices, stats.interrupts, stats.exits
    for n in range(1, 11):
        assert await g.file.write(pack_words(LHREQ_IRQ, 3)) == 0
        await until(functools.partial(_handled, g, n))
        assert (_irq_stops(g), _native_irqs(g)) == (n, n)
    assert (stats.slices, stats.exits) == (slices, exits)
    assert cpu.fuel.irqs_pending == 0
    assert not reader.done() and cpu.running
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert (stats.irqs_in_slice, stats.irqs_native) == (10, 10)  # counted as the run ended
    assert stats.interrupts == interrupts + 10


@going_on
async def test_an_irq_the_guest_cannot_take_yet_stays_pending_and_its_run_goes_on(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # run() stops for an irq without a gate (irq 5: vector 37), finds it not deliverable,
    # as maybe_do_interrupt would, and runs on without Python; the irq stays pending.  A
    # deliverable irq raised later is delivered first (the lowest of the two pending).
    from supervisor import execute

    monkeypatch.setattr(execute, "_TARGET_NS", 600 * 10**9)  # one slice for the whole test
    g = await boot(dev, HANDLES)
    assert await g.file.read(8) == pack_words(1)
    cpu = g.file.cpu(0)
    reader = await _on_a_worker(g)
    stats = present(g.file.stats)
    slices, exits = stats.slices, stats.exits
    assert await g.file.write(pack_words(LHREQ_IRQ, 5)) == 0
    await until(lambda: _irq_stops(g) == 1)
    assert (_native_irqs(g), cpu.irqs_pending, g.u32("handled")) == (0, 1 << 5, 0)
    before = g.u32("counter")
    await until(lambda: g.u32("counter") != before)  # it runs on
    assert await g.file.write(pack_words(LHREQ_IRQ, 3)) == 0
    await until(functools.partial(_handled, g, 1))
    assert (_irq_stops(g), _native_irqs(g), cpu.irqs_pending) == (2, 1, 1 << 5)
    assert (stats.slices, stats.exits) == (slices, exits)
    assert not reader.done() and cpu.running
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)


# HANDLES with irq 3 blocked (lguest_data.blocked_interrupts) until irq 4's handler
# unblocks it.
BLOCKED = r"""
main:
    LGUEST_INIT
    IDT 35, handler
    IDT 36, unblock
    movl $512, lguest_data
    movl $8, lguest_data+4
    HCALL 17, 1
1:  incl counter
    jmp 1b
handler:
    incl handled
    movl $512, lguest_data
    iret
unblock:
    movl $0, lguest_data+4
    movl $512, lguest_data
    iret
.data
counter: .long 0
handled: .long 0
"""


@going_on
async def test_an_irq_the_guest_blocks_waits_in_the_run_for_the_next_stop(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # run() checks the blocked irqs as maybe_do_interrupt does: a blocked irq stays
    # pending and the run goes on; an unblocked one raised meanwhile is delivered (its
    # handler unblocks irq 3), and the next stop for an irq delivers irq 3.
    from supervisor import execute

    monkeypatch.setattr(execute, "_TARGET_NS", 600 * 10**9)  # one slice for the whole test
    g = await boot(dev, BLOCKED)
    assert await g.file.read(8) == pack_words(1)
    cpu = g.file.cpu(0)
    reader = await _on_a_worker(g)
    assert await g.file.write(pack_words(LHREQ_IRQ, 3)) == 0
    await until(lambda: _irq_stops(g) == 1)
    before = g.u32("counter")
    await until(lambda: g.u32("counter") != before)  # it runs on
    assert (_native_irqs(g), cpu.irqs_pending, g.u32("handled")) == (0, 1 << 3, 0)
    assert await g.file.write(pack_words(LHREQ_IRQ, 4)) == 0
    await until(lambda: _native_irqs(g) == 1)
    await until(
        lambda: g.memory.read(g.guest.symbols["lguest_data"], 8) == bytes([0, 2, 0, 0] + [0] * 4)
    )
    assert (_irq_stops(g), cpu.irqs_pending, g.u32("handled")) == (2, 1 << 3, 0)
    assert await g.file.write(pack_words(LHREQ_IRQ, 3)) == 0
    await until(functools.partial(_handled, g, 1))
    assert (_irq_stops(g), _native_irqs(g), cpu.irqs_pending) == (3, 2, 0)
    assert not reader.done() and cpu.running
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)


def test_irq_bits_change_under_a_lock_without_the_extension(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without _fuel (no C compiler) the bits are set and cleared in Python, and nothing
    # is stopped: the caller wakes the CPU.
    monkeypatch.setattr(_slicing, "_fuel", None)
    fuel = _slicing.Fuel()
    assert not _slicing.raise_irq(fuel, 3, True)
    assert not _slicing.raise_irq(fuel, 31, False)
    assert fuel.irqs_pending == 1 << 3 | 1 << 31
    _slicing.take_irq(fuel, 3)
    assert fuel.irqs_pending == 1 << 31


@going_on
async def test_an_irq_raised_between_two_runs_of_a_slice_stops_the_next_at_once(
    dev: LguestDevice,
) -> None:
    # Between two runs of a slice nothing is running to stop: the next run stops before
    # its first block, and the slice delivers the interrupt and goes on.
    g = await boot(dev, HANDLES)
    assert await g.file.read(8) == pack_words(1)
    fuel = g.file.cpu(0).fuel
    assert not _slicing.interrupt(fuel, False)  # no run, no slice: the caller wakes it
    assert _slicing.interrupt(fuel, True)
    assert fuel.irq == 1
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: present(g.file.stats).irqs_in_slice == 1)
    assert fuel.irq == 0
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)


@going_on
async def test_an_irq_raised_as_a_run_ends_for_its_time_waits_for_the_next_step(
    dev: LguestDevice,
) -> None:
    # A run the slicer already stopped for its slice's time (or a hurry did) ends so: its
    # slice's step ends (AGAIN_URGENT: an irq waits) and the next step delivers it before
    # its first run.  The CPU is not woken, so its run is not taken off its worker for
    # the event loop to deliver it there.
    g = await boot(dev, HANDLES)
    assert await g.file.read(8) == pack_words(1)
    fuel = g.file.cpu(0).fuel
    fuel.running = 1  # (what the slicer's lock guards, as during such a run's last block)
    fuel.reason = _slicing.REASON_BUDGET
    try:
        assert _slicing.interrupt(fuel, True)
        assert (fuel.reason, fuel.irq, fuel.stop) == (_slicing.REASON_BUDGET, 0, 0)
        fuel.reason = _slicing.REASON_STOP  # a kick's stop: the run loop sees to it
        assert not _slicing.interrupt(fuel, True)
    finally:
        fuel.running = 0
        fuel.reason = _slicing.REASON_NONE


@going_on
async def test_an_irq_for_a_run_waiting_in_the_queue_is_taken_in_one_turn_of_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A CPU whose run waits for a worker: the irq withdraws the run, and the read waiting
    # for it goes on in the next turn of the loop and delivers the irq there, not after
    # the withdrawal has reached its asyncio future (two more turns).
    from supervisor import execute

    monkeypatch.setattr(execute, "_TARGET_NS", 600 * 10**9)  # the spinner keeps the worker
    async with LguestDevice(workers=1) as dev:
        spinner = await boot(dev, SPIN)
        g = await boot(dev, HANDLES)
        assert await g.file.read(8) == pack_words(1)
        spinning = await _on_a_worker(spinner)
        cpu = g.file.cpu(0)
        reader = asyncio.create_task(g.file.read(8))
        await until(lambda: isinstance(cpu.run.queued_slice, Job) and cpu.run.queued_slice.queued)
        loop = asyncio.get_running_loop()
        hops = 0
        if isinstance(loop, asyncio.BaseEventLoop):  # (uvloop's methods cannot be wrapped)
            wake_loop = loop.call_soon_threadsafe

            def counted(*args: Any, **kwargs: Any) -> Any:
                nonlocal hops
                hops += 1
                return wake_loop(*args, **kwargs)

            monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
        g.file.send_irq(3)
        await asyncio.sleep(0)
        assert g.u32("handled") == 1
        assert hops == 0  # the withdrawal reached the read without the loop's self-pipe
        for task in (reader, spinning):
            task.cancel()
        await asyncio.gather(reader, spinning, return_exceptions=True)


COMPUTES = r"""
main:
    LGUEST_INIT
    HCALL 17, 1
1:  movl $2000000, %ecx
2:  decl %ecx
    jnz 2b
    HCALL 17, 2
    jmp 1b
"""


@going_on
async def test_a_run_that_ends_on_a_worker_wakes_its_read_in_one_turn_of_the_loop(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The run's end reaches the loop in one call_soon_threadsafe, whose callback settles
    # the run's future and ends the read's wait there: the read goes on in the next turn
    # of the loop, not after the future's own callbacks have had a turn (each turn of the
    # loop lets go of the GIL, which a worker may take).
    from supervisor.execute import SliceExit

    g = await boot(dev, COMPUTES)
    assert await g.file.read(8) == pack_words(1)
    loop = asyncio.get_running_loop()
    turns = 0
    ticking = True
    jobs: list[Job[Any]] = []
    ends: dict[int, int] = {}  # id(job) -> the turn its end on a worker reached the loop in

    def tick() -> None:
        nonlocal turns
        turns += 1
        if ticking:
            loop.call_soon(tick)

    def on_worker(job: object) -> None:  # (after the run loop's callback: the same turn or later)
        if threading.get_ident() != loop_thread:
            loop.call_soon_threadsafe(lambda: ends.setdefault(id(job), turns))

    real = dev.executor.submit

    def watched(fn: Callable[..., object], *args: object, **options: Any) -> object:
        job = real(fn, *args, **options)
        jobs.append(job)
        loop.call_soon(job.add_done_callback, on_worker)  # (once the run loop has its own)
        return job

    monkeypatch.setattr(dev.executor, "submit", watched)
    loop_thread = threading.get_ident()
    reader = asyncio.create_task(g.file.read(8))
    tick()
    try:
        assert await reader == pack_words(2)
        returned = turns
    finally:
        ticking = False
    last = jobs[-1] if jobs else None
    if last is None or id(last) not in ends or last.result() is not SliceExit.HYPERCALL:
        pytest.skip("the notify came in a slice on the event loop")
    # One turn for the read's task, one for this task awaiting it.
    assert returned - ends[id(last)] <= 2, (ends, returned)


PATCHED = r"""
main:
    LGUEST_INIT
    HCALL 17, 1
1:  call patch
    incl counter
    jmp 1b
patch:
    movl $1, value
    ret
.data
value: .long 0
counter: .long 0
"""


@going_on
async def test_code_the_launcher_rewrites_under_a_run_a_break_left_going_on_is_not_stale(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Launcher rewrites an instruction the running guest executes over and over:
    # the run stops at its next block, drops the stale translation and goes on.
    from supervisor import execute

    monkeypatch.setattr(execute, "_TARGET_NS", 600 * 10**9)  # one slice for the whole test
    g = await boot(dev, PATCHED)
    assert await g.file.read(8) == pack_words(1)
    reader = await _on_a_worker(g)
    await until(lambda: g.u32("value") == 1)
    breaker = asyncio.create_task(g.file.waker().write(pack_words(LHREQ_BREAK, 1)))
    await expect(errno.EAGAIN, reader)
    g.memory.write(g.guest.symbols["patch"] + 6, (2).to_bytes(4, "little"))  # movl $2
    await until(lambda: g.u32("value") == 2)
    await g.file.write(pack_words(LHREQ_BREAK, 0))
    await breaker
    await g.file.close()


async def test_break_before_any_read_is_not_lost(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    breaker = asyncio.create_task(g.file.waker().write(pack_words(LHREQ_BREAK, 1)))
    await asyncio.sleep(0)  # let the waker set the flag; nobody runs the guest yet
    await expect(errno.EAGAIN, g.file.read(8))
    await g.file.write(pack_words(LHREQ_BREAK, 0))
    await breaker


async def test_cancelled_waker_leaves_the_break_set(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    breaker = asyncio.create_task(g.file.waker().write(pack_words(LHREQ_BREAK, 1)))
    await asyncio.sleep(0)
    breaker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await breaker
    await expect(errno.EAGAIN, g.file.read(8))


async def test_many_wakers_are_released_by_one_break_zero(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    wakers = [
        asyncio.create_task(g.file.waker().write(pack_words(LHREQ_BREAK, 1))) for _ in range(5)
    ]
    await expect(errno.EAGAIN, g.file.read(8))
    await g.file.write(pack_words(LHREQ_BREAK, 0))
    assert await asyncio.gather(*wakers) == [0] * 5


async def test_cancelling_a_read_resumes_exactly_where_it_stopped(dev: LguestDevice) -> None:
    g = await boot(dev, COUNT_TO.format(target=3_000_000))
    for _ in range(200):
        reader = asyncio.create_task(g.file.read(8))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
    assert await g.file.read(8) == pack_words(0xC0FFEE)
    assert g.u32("counter") == 3_000_000
    assert g.u32("regcount") == 3_000_000


async def test_twenty_million_increments_survive_a_break_every_millisecond(
    dev: LguestDevice,
) -> None:
    """Breaks and resumes never lose or repeat a write."""
    g = await boot(dev, COUNT_TO.format(target=20_000_000))
    waker = g.file.waker()
    done = asyncio.Event()
    breaks = 0

    async def waker_loop() -> None:
        nonlocal breaks
        while not done.is_set():
            await asyncio.sleep(0.001)
            if done.is_set():
                break
            await waker.write(pack_words(LHREQ_BREAK, 1))
            breaks += 1

    waker_task = asyncio.create_task(waker_loop())
    eagains = 0
    while True:
        try:
            word = await g.file.read(8)
        except BlockingIOError:
            eagains += 1
            await g.file.write(pack_words(LHREQ_BREAK, 0))
            continue
        break
    done.set()
    await g.file.write(pack_words(LHREQ_BREAK, 0))
    await waker_task
    assert word == pack_words(0xC0FFEE)
    assert g.u32("counter") == 20_000_000
    assert g.u32("regcount") == 20_000_000
    assert eagains > 10, "the waker should have broken the guest out many times"


async def test_irq_write_returns_zero_and_wakes_a_halted_guest(dev: LguestDevice) -> None:
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    IDT 35, handler
    movl $0, lguest_data
    HCALL 10
    HCALL 17, 0x35
1:  jmp 1b
handler:
    incl hits
    jmp irq_return
.data
hits: .long 0
""",
    )
    reader = asyncio.create_task(g.file.read(8))
    # The guest halts: it stops costing slices.
    await until(lambda: g.file.cpu(0).halted)
    slices = present(g.file.stats).slices
    for _ in range(20):
        await asyncio.sleep(0)
    assert present(g.file.stats).slices == slices
    assert await g.file.write(pack_words(LHREQ_IRQ, 3)) == 0
    assert await reader == pack_words(0x35)
    assert g.u32("hits") == 1


async def test_close_while_running_never_hangs(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    reader = asyncio.create_task(g.file.read(8))
    breaker = asyncio.create_task(g.file.waker().write(pack_words(LHREQ_BREAK, 1)))
    await expect(errno.EAGAIN, reader)
    reader = asyncio.create_task(g.file.read(8))  # EAGAIN again: break still on
    await expect(errno.EAGAIN, reader)
    await g.file.write(pack_words(LHREQ_BREAK, 0))
    await breaker
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: g.u32("counter") != 0)
    breaker = asyncio.create_task(g.file.waker().write(pack_words(LHREQ_BREAK, 1)))
    await asyncio.wait_for(g.file.close(), 60)
    await expect(errno.EBADF, breaker)
    with pytest.raises(OSError) as e:
        await reader
    assert e.value.errno in (errno.EBADF, errno.EAGAIN)


async def test_close_while_halted_and_while_reading_ends_the_read_with_ebadf(
    dev: LguestDevice,
) -> None:
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    HCALL 10
1:  jmp 1b
""",
    )
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: g.file.cpu(0).halted)
    await asyncio.wait_for(g.file.close(), 60)
    await expect(errno.EBADF, reader)


async def test_device_aclose_stops_every_guest(dev: LguestDevice) -> None:
    guests = [await boot(dev, SPIN) for _ in range(4)]
    readers = [asyncio.create_task(g.file.read(8)) for g in guests]
    await until(lambda: all(g.u32("counter") for g in guests))
    await asyncio.wait_for(dev.aclose(), 60)
    for r in readers:
        with pytest.raises(OSError) as e:
            await r
        assert e.value.errno == errno.EBADF
    assert all(g.file.closed for g in guests)


async def test_close_waits_for_the_read_not_for_the_readers_whole_task(dev: LguestDevice) -> None:
    """A reader that goes on to need the Big Lguest lock must not deadlock close()."""
    g = await boot(dev, SPIN)
    other = await boot(dev, SPIN)

    async def reader() -> None:
        with pytest.raises(OSError):
            await g.file.read(8)
        await other.file.close()  # takes the Big Lguest lock, which close(g) holds

    task = asyncio.create_task(reader())
    await until(lambda: g.u32("counter") != 0)
    await asyncio.wait_for(g.file.close(), 60)
    await asyncio.wait_for(task, 60)


def submissions(dev: LguestDevice, monkeypatch: pytest.MonkeyPatch) -> list[Callable[..., object]]:
    """Every job given to the device's executor from now on."""
    jobs: list[Callable[..., object]] = []
    real = dev.executor.submit

    def recording(fn: Callable[..., object], *args: object, **options: Any) -> object:
        jobs.append(fn)
        return real(fn, *args, **options)

    monkeypatch.setattr(dev.executor, "submit", recording)
    return jobs


async def test_a_spinning_guest_runs_on_the_executor_not_the_event_loop(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor import execute, run
    from supervisor.cpu import LgCpu
    from supervisor.slicepool import Again

    where: list[tuple[bool, int]] = []
    real = execute.run_slice  # the function run.py calls, which the test replaces there

    def recording(
        cpu: LgCpu,
        budget: int | None = None,
        more: Callable[[], bool] | None = None,
        crowd: Callable[[], float] | None = None,
        **options: Any,
    ) -> execute.SliceExit | Again:
        where.append((threading.current_thread() is threading.main_thread(), budget or 0))
        return real(cpu, budget, more, crowd, **options)

    monkeypatch.setattr(run, "run_slice", recording)
    g = await boot(dev, SPIN)
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: present(g.file.stats).slices > 20)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    on_loop = [budget for on_main, budget in where if on_main]
    # Start-up may run on the loop, in short slices only; the spin loop never does.
    assert all(0 < budget <= execute.INLINE_BUDGET for budget in on_loop)
    assert len(on_loop) <= 2
    assert not where[-1][0]


@pytest.mark.own_engines
async def test_a_lone_busy_guest_goes_on_on_its_worker_without_the_event_loop(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nobody waits for a worker and nothing is pending: when a slice's time is spent, the
    # next one starts on the same worker, not after a round trip through the event loop.
    jobs = submissions(dev, monkeypatch)
    g = await boot(dev, SPIN)
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: present(g.file.stats).slices > 30)
    stats = present(g.file.stats)
    assert stats.continued >= stats.slices - len(jobs) - 2  # (start-up's inline slices)
    assert len(jobs) <= 3
    # A break still ends it at once: the kick ends the continued slice.
    waker = g.file.waker()
    breaker = asyncio.create_task(waker.write(pack_words(LHREQ_BREAK, 1)))
    await expect(errno.EAGAIN, reader)
    assert await g.file.write(pack_words(LHREQ_BREAK, 0)) == 0
    await breaker


@pytest.mark.own_engines
async def test_a_slice_goes_on_only_while_no_other_guest_waits_for_the_worker() -> None:
    # One worker: a spinner whose slices go on by themselves must hand the worker over
    # as soon as another guest's slice waits for it (at the end of its current slice).
    async with LguestDevice(workers=1) as dev:
        first = await boot(dev, SPIN)
        readers = [asyncio.create_task(first.file.read(8))]
        await until(lambda: present(first.file.stats).continued > 5)
        second = await boot(dev, SPIN)
        readers.append(asyncio.create_task(second.file.read(8)))
        await until(lambda: present(second.file.stats).slices > 5 and first.u32("counter") > 0)
        # From now on they take turns: both advance.
        a, b = first.u32("counter"), second.u32("counter")
        await until(lambda: first.u32("counter") > a and second.u32("counter") > b)
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


@pytest.mark.own_engines  # (a switched engine translates afresh: its slice may run out)
async def test_a_notifying_guest_is_served_without_a_thread_hand_off(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = submissions(dev, monkeypatch)
    g = await boot(dev, "main:\n LGUEST_INIT\n1: HCALL 17, 5\n jmp 1b\n")
    for _ in range(100):
        assert await g.file.read(8) == pack_words(5)
    assert jobs == []


@pytest.mark.own_engines
async def test_busy_guests_take_turns_on_a_worker_without_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One worker, two spinners: their slices alternate on the worker (each spinner's
    # executor run goes to the back of the pool's queue when its time is spent), and
    # the run loop submits each spinner's run once, not once per slice.
    async with LguestDevice(workers=1) as dev:
        jobs = submissions(dev, monkeypatch)
        first, second = await boot(dev, SPIN), await boot(dev, SPIN)
        readers = [asyncio.create_task(g.file.read(8)) for g in (first, second)]
        await until(
            lambda: min(present(first.file.stats).slices, present(second.file.stats).slices) > 20
        )
        a, b = first.u32("counter"), second.u32("counter")
        await until(lambda: first.u32("counter") > a and second.u32("counter") > b)
        assert len(jobs) <= 6  # (start-up's few; no round trip per slice)
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_an_interrupt_handler_gets_a_long_inline_slice(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A busy guest's interrupt is delivered on the event loop, and its handler may run
    # there for LONG_INLINE_TIME (not only INLINE_TIME, here shrunk to 1 µs so that any
    # handler outlasts it): it notifies without a trip through the executor's queue.
    from supervisor import execute

    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    IDT 35, handler
    movl $512, lguest_data
    HCALL 17, 1
1:  incl counter
    jmp 1b
handler:
    movl $512, lguest_data
    movl $2000, %ecx
2:  loop 2b
    HCALL 17, 0x35
    jmp irq_return
.data
counter: .long 0
""",
    )
    assert await g.file.read(8) == pack_words(1)
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: g.u32("counter") > 1000)
    monkeypatch.setattr(execute, "_INLINE_NS", 1_000)
    jobs = submissions(dev, monkeypatch)
    assert await g.file.write(pack_words(LHREQ_IRQ, 3)) == 0
    assert await reader == pack_words(0x35)
    assert jobs == []


async def test_inline_slices_are_short_only_for_a_cpu_that_computes_through_them(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A guest that notifies every few instructions gets LONG_INLINE_TIME on the loop (a
    # deadline that needs no wake-up of the slicer thread); one whose last inline slice
    # used up its time gets only INLINE_TIME before it goes back to a worker.
    from supervisor import _slicing, execute

    lefts: list[int] = []
    real = _slicing.run

    def recording(uc: Uc, fuel: _slicing.Fuel, *args: int) -> _slicing.Stop:
        if threading.current_thread() is threading.main_thread():
            lefts.append(fuel.left)
        return real(uc, fuel, *args)

    monkeypatch.setattr(_slicing, "run", recording)
    chatty = await boot(dev, "main:\n LGUEST_INIT\n1: HCALL 17, 5\n jmp 1b\n")
    for _ in range(20):
        assert await chatty.file.read(8) == pack_words(5)
    assert lefts[-10:] == [execute._LONG_INLINE_NS] * 10
    busy = await boot(dev, SPIN)
    reader = asyncio.create_task(busy.file.read(8))
    for _ in range(2):  # the first resume runs out its long slice; the second is short
        slices = present(busy.file.stats).slices
        await until(functools.partial(_slices_past, busy, slices + 3))
        await busy.file.pause()  # (a wake: the next slice runs on the loop)
        lefts.clear()
        busy.file.resume()
    await until(lambda: bool(lefts))
    assert lefts[0] == execute._INLINE_NS
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)


LONG_HANDLER = r"""
main:
    LGUEST_INIT
    IDT 35, handler
    movl $512, lguest_data
    HCALL 17, 1
1:  incl counter
    jmp 1b
handler:
    movl $512, lguest_data
    movl $3000000, %ecx  # (milliseconds: longer than any stop of a slice takes to land)
2:  loop 2b
    HCALL 17, 0x35
    jmp irq_return
.data
counter: .long 0
"""


@many_slices
async def test_a_handler_that_outlasts_its_inline_slice_goes_first_in_the_queue(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An interrupt delivered on the event loop whose handler needs more than the inline
    # slice: the rest of the handler is an urgent run (the front of the pool's queue),
    # not one that waits behind every busy guest.  The guest's plain computing is not.
    from supervisor import execute

    g = await boot(dev, LONG_HANDLER)
    assert await g.file.read(8) == pack_words(1)
    cpu = g.file.cpu(0)
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: g.u32("counter") > 1000)
    reader.cancel()  # no read in flight: the irq waits, and the next read delivers it inline
    await asyncio.gather(reader, return_exceptions=True)
    monkeypatch.setattr(execute, "_INLINE_NS", 1_000)
    monkeypatch.setattr(execute, "_LONG_INLINE_NS", 1_000)
    urgent: list[object] = []
    real = dev.executor.submit

    def recording(fn: Callable[..., object], *args: object, **options: Any) -> object:
        urgent.append(options.get("urgent"))
        return real(fn, *args, **options)

    monkeypatch.setattr(dev.executor, "submit", recording)
    jumps = dev.executor.jumps
    assert await g.file.write(pack_words(LHREQ_IRQ, 3)) == 0
    assert await g.file.read(8) == pack_words(0x35)
    assert urgent == [cpu] and dev.executor.jumps == jumps + 1
    reader = asyncio.create_task(g.file.read(8))  # back to computing: a plain run
    await until(lambda: len(urgent) == 2)
    assert urgent[1] is None and not cpu.run.urgent
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)


@going_on
async def test_a_handler_that_outlasts_its_executor_slice_goes_first_in_the_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An irq delivered in a running executor slice whose time then runs out inside the
    # handler: the handler's rest is the run's next step, urgent (the front of the pool's
    # queue, ahead of the other busy guest's run), not a step at the back of the queue.
    from supervisor import execute

    monkeypatch.setattr(execute, "_TARGET_NS", 100_000)  # short slices: the handler outlasts
    async with LguestDevice(workers=1) as dev:
        g = await boot(dev, LONG_HANDLER)
        other = await boot(dev, LONG_HANDLER)
        assert await g.file.read(8) == pack_words(1)
        assert await other.file.read(8) == pack_words(1)
        spinner = asyncio.create_task(other.file.read(8))  # its run waits while g's runs
        cpu = g.file.cpu(0)
        stats = present(g.file.stats)
        ex = dev.executor
        for _ in range(50):  # until an irq lands in a running slice (else it went inline)
            reader = await _on_a_worker(g)
            before = (stats.irqs_in_slice, stats.handler_rests, ex.jumps + ex.refused)
            assert await g.file.write(pack_words(LHREQ_IRQ, 3)) == 0
            assert await reader == pack_words(0x35)
            if stats.irqs_in_slice > before[0]:
                break
        else:
            pytest.fail("no irq was delivered in a running slice")
        assert stats.handler_rests > before[1]
        assert ex.jumps + ex.refused > before[2] and not cpu.run.urgent
        spinner.cancel()
        await asyncio.gather(spinner, return_exceptions=True)


@going_on
async def test_an_irq_raised_as_a_slice_runs_out_and_its_handler_go_first(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An executor step whose time runs out just as an irq is raised (between its last
    # run and its end) cannot deliver it; its next step does, first in the queue
    # (AGAIN_URGENT), not after a round of every busy guest's step.  That step
    # delivers it before its first run, with all of its time left; if its time runs
    # out in the handler, the handler's rest goes first too.
    from supervisor import execute
    from supervisor.slicepool import AGAIN_URGENT

    g = await boot(dev, LONG_HANDLER)
    assert await g.file.read(8) == pack_words(1)  # no read in flight from here on
    cpu = g.file.cpu(0)
    stats = present(g.file.stats)
    real = execute._enter_guest
    raised: list[object] = []

    def enter_then_irq(c: Any) -> object:
        exit = real(c)
        if not raised:  # as the run ended for its time: too late to stop it
            raised.append(exit)
            c.raise_irq(3)
        return exit

    monkeypatch.setattr(execute, "_enter_guest", enter_then_irq)
    monkeypatch.setattr(execute, "_TARGET_NS", 200_000)
    interrupts = stats.interrupts
    assert execute.run_slice(cpu, None, lambda: True) is AGAIN_URGENT
    assert raised == [execute.SliceExit.BUDGET] and cpu.irqs_pending == 1 << 3
    assert (stats.irqs_held_over, stats.handler_rests, stats.interrupts) == (1, 0, interrupts)
    # The next step delivers it with more than LONG_INLINE_TIME left; the handler (many
    # milliseconds) outlasts the slice.
    monkeypatch.setattr(execute, "_TARGET_NS", 4 * execute._LONG_INLINE_NS)
    assert execute.run_slice(cpu, None, lambda: True) is AGAIN_URGENT
    assert (stats.irqs_held_over, stats.handler_rests, stats.interrupts) == (1, 1, interrupts + 1)
    assert cpu.irqs_pending == 0


@going_on
async def test_a_hurried_slice_ends_as_if_its_time_were_spent_and_its_run_goes_on(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the pool asks of the longest-running step for an urgent job: the slice ends at
    # a block boundary with BUDGET, and the run goes on (AGAIN), not back to the run loop.
    from supervisor import execute

    monkeypatch.setattr(execute, "_TARGET_NS", 600 * 10**9)  # one slice unless hurried
    g = await boot(dev, SPIN)
    cpu = g.file.cpu(0)
    assert not _slicing.hurry(cpu.fuel)  # nothing running
    reader = await _on_a_worker(g)
    run = cpu.run.queued_slice
    stats = present(g.file.stats)
    slices, continued = stats.slices, stats.continued
    hurried = 0
    for _ in range(1000):  # (a hurry between two runs of the slice asks nothing: False)
        if hurried == 3:
            break
        await until(lambda: cpu.fuel.running == 1)
        if _slicing.hurry(cpu.fuel):
            hurried += 1
            await until(functools.partial(_continued, g, continued + hurried))
    assert hurried == 3 and stats.slices - slices == 3
    assert cpu.run.queued_slice is run and not reader.done()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)


@going_on
@pytest.mark.own_engines
async def test_a_lone_slice_is_cut_back_once_another_guest_waits_for_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One worker.  A spinner alone on it runs lone slices (here so long that one never
    # ends by its time); a second spinner's run, queued behind it, cuts the slice back to
    # a slice in turn, and from then on they take turns in slices in turn.
    from supervisor import execute

    monkeypatch.setattr(execute, "_LONE_NS", 600 * 10**9)
    async with LguestDevice(workers=1) as dev:
        first = await boot(dev, SPIN)
        cpu = first.file.cpu(0)
        readers = [asyncio.create_task(first.file.read(8))]
        await until(lambda: cpu.fuel.running == 1 and cpu.fuel.lone > 0)
        assert cpu.fuel.lone == execute._LONE_NS - execute._TARGET_NS
        slices = present(first.file.stats).slices
        second = await boot(dev, SPIN)
        readers.append(asyncio.create_task(second.file.read(8)))
        # (Without the cut the second guest would wait 600 s for the worker.)
        await until(lambda: present(second.file.stats).slices > 3)
        assert dev.executor.shortened >= 1
        assert present(first.file.stats).slices > slices
        a, b = first.u32("counter"), second.u32("counter")
        await until(lambda: first.u32("counter") > a and second.u32("counter") > b)
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


@going_on
async def test_only_a_one_cpu_guest_without_a_run_time_limit_runs_lone_slices(
    dev: LguestDevice,
) -> None:
    from supervisor import Limits, execute

    g = await boot(dev, SPIN)
    assert execute.may_be_lone(g.file.cpu(0))
    two = await boot(dev, SPIN, cpus=2)  # (a sibling waiting for its turn is no pool job)
    assert not any(execute.may_be_lone(two.file.cpu(i)) for i in range(2))
    async with LguestDevice(limits=Limits(max_run_time=60.0)) as limited:
        h = await boot(limited, SPIN)
        assert not execute.may_be_lone(h.file.cpu(0))
