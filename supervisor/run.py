"""The event-loop half of the run loop: ``run_guest``, lguest's ``run_guest`` for asyncio.

Each pass asks one question, "why can't this CPU simply run?": :func:`pending_exit`
answers with a :class:`RunState` (close, a hypercall the Host
must do, a notify for the Launcher, a Waker's break, a death, a hold, a halt) or
None, and one ``match`` handles the answer; None runs a slice
(:mod:`supervisor.execute`), whose own exit only decides where the next slice
runs: every state change it made is seen by the next pass.

Slices run on the executor; a CPU whose last slice ended on its own (a notify, a
halt, a hypercall the run loop must do) gets a short slice on the event loop
itself, of at most ``INLINE_BUDGET`` blocks, because a thread hand-off costs
more than that.  A busy CPU's executor run is many slices, taking turns with other
guests' on the workers (:mod:`supervisor.slicepool`) until one ends for a reason the
run loop must see.  Everything here runs on the event loop, except
:func:`_may_go_on`, which a worker calls to ask whether a busy run may go on: it
and the :func:`pending_exit` it calls only read fields whose writers all kick the
CPU afterwards, so a stale read costs at most one slice that ends at once (KICK).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, ClassVar

from . import _slicing, hypercalls, interrupts, timers
from .abi import LHCALL_HALT
from .cpu import LgCpu
from .execute import INLINE_BUDGET, ExitValue, SliceExit, run_slice
from .hibernation import Dormitory
from .slicepool import Again, Job, SlicePool
from .virtual import Simulation

# Inline slices let the loop run its other tasks at least this often: seconds of the loop
# thread's CPU time since the CPU's run loop last waited (a yield, a sleep).
YIELD_TIME = 0.0005


# run_guest's answer when the CPU rests: it sleeps in a halt, its registers packed,
# and the read ends instead of waiting (LguestFile.rest_when_idle).
RESTING = -1


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class RunState(ExitValue):
    """Why the run loop cannot simply run a CPU now (:func:`pending_exit`'s answer).

    Kept apart from :class:`~supervisor.execute.SliceExit` (why one slice stopped): a
    slice's exit only decides where the next slice runs; these decide what the loop does.
    """

    __slots__ = ()

    CLOSED: ClassVar[RunState]  # the file was closed: EBADF
    HELD: ClassVar[RunState]  # paused or stopped by a debugger: park
    BREAK: ClassVar[RunState]  # a Waker's break waits to be released: EAGAIN
    NOTIFY: ClassVar[RunState]  # a notify waits for the Launcher: the read returns it
    HYPERCALL: ClassVar[RunState]  # a trapped hypercall the event loop must do
    DEATH: ClassVar[RunState]  # the guest is dead: ENOENT (or its errno)
    OFFLINE: ClassVar[RunState]  # a CPU not started yet (LHCALL_START_CPU): sleep
    HALT: ClassVar[RunState]  # halted with no interrupt it can take: sleep


def pending_exit(cpu: LgCpu) -> RunState | None:
    """What the run loop must handle before the guest may run, in priority order; None if
    the CPU may run.

    Close beats everything.  A held CPU (paused, or stopped by a debugger) does
    nothing, not even a hypercall it trapped with, so its read stays pending; only a
    Waker's break still ends that read (the Launcher's devices want attention; the
    guest does not run either way), and a death ends the hold.  Otherwise a notify is
    handed over first (the async ring produced it: the trapped direct hypercall
    waits for the next read), then a trapped hypercall is done unless the guest
    died (the ring may have killed it), a break before a death is reported (the
    Launcher polls its devices first), and a halt sleeps until an interrupt can be
    delivered.  A CPU not started yet sleeps until it is.  Every answer but None
    changes something or sleeps: each pass of the run loop makes progress.
    """
    run = cpu.run
    if run.closing:
        return RunState.CLOSED
    dead = cpu.lg.dead
    if run.hold is not None and not dead:
        return RunState.BREAK if run.break_out else RunState.HELD
    if cpu.pending_notify:
        return RunState.NOTIFY
    if cpu.hcall is not None and not dead:
        return RunState.HYPERCALL
    if run.break_out:
        return RunState.BREAK
    if dead:
        return RunState.DEATH
    if not cpu.online:
        return RunState.OFFLINE
    if cpu.halted and interrupts.deliverable_irq(cpu) is None:
        return RunState.HALT
    return None


async def run_guest(
    cpu: LgCpu,
    executor: SlicePool,
    dormitory: Dormitory | None = None,
    serve: Callable[[int], bool] | None = None,
) -> int:
    """Run ``cpu`` until the guest notifies; return the notify address.

    ``serve(address)``, if given, is offered each notify first: True means it served
    the notify there and then (no await: nothing else ran meanwhile), and the guest
    goes on in this call; False hands the notify over as usual.  An exception it
    raises ends the call, the notify still pending.

    Returns :data:`RESTING` instead of sleeping once ``cpu.run.rest`` is set and
    :func:`_rests` says so: no guest state changed, and the next wake calls the restart.

    Raises ``OSError``: ``EAGAIN`` when a Waker broke the CPU out, ``ENOENT``
    (or ``ERESTART``) when the guest died, ``EBADF`` when the file was closed.
    Cancelling the caller stops the guest at an instruction boundary; a later
    call resumes it exactly there.  While the CPU is held (paused, or stopped
    by a debugger) the call stays pending without running it.  While it sleeps or
    is held, ``dormitory`` may hibernate it; it thaws before it runs again.
    """
    lg = cpu.lg
    if lg.virtual is not None:
        lg.virtual.reading(cpu)
    if cpu.run.detached is not None:
        # A run a break left going on owns the CPU (registers, hcall, halted...) until
        # it ends: this read takes it over before it looks at the CPU or runs it, so that
        # no slice runs beside it, whatever woke the CPU meanwhile.
        if cpu.run.break_out and not cpu.run.closing:
            raise _oserror(errno.EAGAIN)  # still broken out: the run goes on
        await _run_slice(cpu, executor)
        if cpu.run.detached is not None:  # broken out again: the run goes on
            raise _oserror(errno.EAGAIN)
    waited = cpu.engine.packed or cpu.lguest_data is None
    if dormitory is not None and cpu.engine.frozen is not None:
        # It hibernated waiting for this read: its wake is paid for like a halt's.
        await dormitory.turn(cpu, executor, functools.partial(_urgent, cpu))
    if waited:
        # Its start-up, or its registers were packed while no read ran it (it slept that
        # long before a resting read's restart, or waited that long for its Launcher):
        # the loop's time until now was not its own, so YIELD_TIME counts from here, and
        # its first slice yields to nobody.
        cpu.run.yielded_at = time.thread_time()
    failed: list[Exception] = []
    between = None
    pool = cpu.engine.pool
    forced = pool is not None and pool.always  # (the forced mode: every slice through here)
    # A guest's start-up (a read begun before its LGUEST_INIT) does its hypercalls in the
    # slice too, each notify handed over: one slice from open to the first notify.
    offer = _hand_over if serve is None and cpu.lguest_data is None else serve
    if offer is not None and lg.virtual is None and len(lg.cpus) == 1 and not forced:
        between = functools.partial(_between_entries, cpu, offer, failed)
    # The last pass ended a sleep, whose end YIELD_TIME counts from, so the next slice
    # starts without reading the clock (a system call) to ask whether a yield is due.
    # (The dormitory's turn after a wake may wait further; the slice then runs before
    # the yield rather than after it, which costs the loop at most one slice.)
    woke = False
    while True:
        cpu.fuel.stop = 0  # a kick from here on ends the next slice
        exit = pending_exit(cpu)
        match exit:
            case None if lg.virtual is not None:
                await _quantum(cpu, lg.virtual)
            case None if cpu.run.inline and not woke and _yield_due(cpu):
                await _yield(cpu)  # (then the next pass: anything may have changed meanwhile)
            case None:
                woke = False
                pool = cpu.engine.pool
                if pool is not None and pool.always:
                    cpu.release_engine()  # the forced mode: every slice on a switched engine
                switch = 0.0
                if cpu.engine.frozen is not None and (pool is None or cpu.run.inline):
                    switch = _thaw(cpu, dormitory)  # (with a pool, a step takes its own)
                timers.write_timestamp(cpu)
                if cpu.irqs_pending and interrupts.ready_to_deliver(cpu):
                    cpu.run.inline = True  # deliver it now, not after a trip through the queue
                # Whatever ended it, the next pass sees.  (One CPU: no turns to take.)
                if len(lg.cpus) != 1:
                    await _slice(cpu, executor)
                elif switch and cpu.run.inline and cpu.run.detached is None:
                    await _fresh_slice(cpu, executor, between, switch)
                else:
                    await _run_slice(cpu, executor, between)
                    if cpu.run.detached is not None:
                        # A break left the run going on: until it ends it owns the CPU,
                        # what its slice stopped at (a hypercall, a notify) and the
                        # engine its step is giving back.  This read ends without
                        # another look at them; the next read takes the run over.
                        raise _oserror(errno.EBADF if cpu.run.closing else errno.EAGAIN)
                if failed:
                    raise failed.pop()  # serve's, in the slice: the notify still pending
            case RunState.CLOSED:
                raise _oserror(errno.EBADF)
            case RunState.HYPERCALL:
                if cpu.engine.frozen is not None:
                    _thaw(cpu, dormitory)
                asleep = _asleep_others(cpu) if len(lg.cpus) > 1 else None
                hypercalls.do_hypercalls(cpu)
                if asleep and any(other.run.wakeup.is_set() for other in asleep):
                    # It woke another CPU (an IPI, a start): that CPU's task queues for
                    # the processor before this one takes it again.
                    _let_go(cpu)
                    await asyncio.sleep(0)
            case RunState.NOTIFY:
                if serve is not None and serve(cpu.pending_notify):
                    cpu.pending_notify = 0
                    continue
                return cpu.pending_notify
            case RunState.BREAK:
                raise _oserror(errno.EAGAIN)
            case RunState.DEATH:
                for other in lg.cpus:  # asleep, they would not see it (kill() only kicks)
                    if other is not cpu:
                        other.wake()
                _tell_holder(cpu)
                assert lg.dead is not None
                raise _oserror(lg.dead.errno or errno.ENOENT)
            case RunState.HELD:
                _tell_holder(cpu)
                await _sleep(cpu, dormitory)
            case RunState.HALT | RunState.OFFLINE:
                if _rests(cpu):
                    return RESTING
                woke = await _sleep(cpu, dormitory)
                if _rests(cpu):
                    return RESTING
                if dormitory is not None:
                    await dormitory.turn(cpu, executor, functools.partial(_urgent, cpu))
            case _:  # pragma: no cover - pending_exit returns only the values above
                raise AssertionError(exit)


def _rests(cpu: LgCpu) -> bool:
    """Whether a sleeping CPU's read ends resting: its reader allows it (``run.rest``),
    it is the guest's only CPU, not on virtual time, and halted with nothing it can take,
    its registers packed (it has slept ``hibernation.PACK_AFTER``: the dormitory wakes
    its sleep when it packs them).  Nothing but a wake can change that, and every wake
    goes through :meth:`LgCpu.wake`, which calls the restart."""
    return (
        cpu.run.rest is not None
        and cpu.engine.packed
        and len(cpu.lg.cpus) == 1
        and cpu.lg.virtual is None
        and pending_exit(cpu) is RunState.HALT
    )


async def _quantum(cpu: LgCpu, sim: Simulation) -> None:
    """Deterministic mode: wait for the schedule to give ``cpu`` a turn, then run it for
    the turn's blocks on the event loop (:mod:`supervisor.virtual`).  A CPU with news
    since it asked (held, broken out, closed) runs nothing: the next pass sees it.

    A hypercall the run loop must do is done here and the turn goes on with the blocks
    it has left (no other task runs in between, so nothing else can differ), cut again
    at the next timer, which the call may have armed."""
    blocks = await sim.turn(cpu)
    if not blocks or pending_exit(cpu) is not None:
        return
    if cpu.engine.frozen is not None:
        cpu.thaw()  # (an offline CPU's first run)
    sim.begin(cpu)
    try:
        timers.write_timestamp(cpu)
        while blocks > 0:
            start = cpu.fuel.blocks
            _debug_stop(cpu, run_slice(cpu, blocks, timeless=True))
            blocks = min(blocks - (cpu.fuel.blocks - start), sim.blocks_left(cpu))
            if blocks <= 0 or pending_exit(cpu) is not RunState.HYPERCALL:
                break
            hypercalls.do_hypercalls(cpu)
            if pending_exit(cpu) is not None:
                break
    finally:
        sim.end(cpu)


def _thaw(cpu: LgCpu, dormitory: Dormitory | None) -> float:
    """Give a hibernated CPU a new emulator; the dormitory charges the cost to it.  The
    seconds a switched or new engine took to set up (0.0: none, or its own back)."""
    return (cpu.thaw() if dormitory is None else dormitory.thaw(cpu)) or 0.0


async def _fresh_slice(
    cpu: LgCpu, executor: SlicePool, between: Callable[[], bool] | None, switch: float
) -> None:
    """An inline slice of a one-CPU guest on an engine just switched or made, which took
    ``switch`` seconds: neither the switch nor this slice counts toward YIELD_TIME.

    Both are the cost of sharing engines, not the CPU's own run: the switch, and the
    guest's code translated afresh on the engine, which is most of this first slice's
    time (about 2.5 us a block).  Counted, they (slowest on a loaded machine) would make
    the CPU yield, which gives the engine back, so that its next slice switches and
    translates again.  The slice runs without suspending (inline, no run left going
    on), so the loop thread's time across it is the slice's own."""
    cpu.run.yielded_at += switch
    started = time.thread_time()
    await _run_slice(cpu, executor, between)
    cpu.run.yielded_at += time.thread_time() - started


def _let_go(cpu: LgCpu, runnable: bool = True, step: bool = False) -> None:
    """Before the run loop waits for anything: with an engine pool, the CPU gives its
    engine back (supervisor.engines), so that the loop holds at most one between two
    awaits whatever the guests do; the next slice takes it back, its own if nobody
    took it meanwhile.  ``runnable``: the CPU waits for its next slice, and the pool
    keeps the engine for it if it computes (``Engine.busy``); else it sleeps, and the
    engine is a spare.  ``step``: it waits for an executor step, which takes the
    engine back on its worker: kept for it too, so that a CPU whose inline slices go
    on to the executor takes no other CPU's engine there."""
    engine = cpu.engine
    if engine.pool is not None:
        engine.busy = busy = runnable and engine.busy
        cpu.release_engine(keep=busy or step)


def _yield_due(cpu: LgCpu) -> bool:
    """Stay cooperative: a CPU about to run an inline slice lets the loop run other tasks
    first once it has run ``YIELD_TIME`` since it last waited (a yield, a sleep).  Not
    before every slice: a turn of the loop costs more than a notify round trip, and with
    a pool the CPU gives its engine back to yield, which another CPU may switch away
    meanwhile.  The time counts from when the wait ended: the other tasks' turns are not
    its own.  Only before a slice, with nothing pending: a read cancelled in the yield
    loses nothing (a notify a hypercall made is returned first)."""
    return time.thread_time() - cpu.run.yielded_at >= YIELD_TIME


async def _yield(cpu: LgCpu) -> None:
    _let_go(cpu)
    await asyncio.sleep(0)
    cpu.run.yielded_at = time.thread_time()


def _urgent(cpu: LgCpu) -> bool:
    """Whether something other than a plain wake waits for the run loop (a close, a hold,
    a break, a death...): a wake put off by the dormitory ends at once."""
    return pending_exit(cpu) not in (None, RunState.HALT, RunState.OFFLINE)


def _asleep_others(cpu: LgCpu) -> list[LgCpu]:
    """The guest's other CPUs whose run loops wait for a wake."""
    return [other for other in cpu.lg.cpus if other is not cpu and not other.run.wakeup.is_set()]


def _tell_holder(cpu: LgCpu) -> None:
    """Tell whoever holds the CPU (supervisor.debug) that it parked or died."""
    if cpu.debug.on_hold is not None:
        cpu.debug.on_hold()


async def _sleep(cpu: LgCpu, dormitory: Dormitory | None) -> bool:
    """Wait for :meth:`LgCpu.wake` (an irq, a timer, a break, a release, close); the
    CPU may hibernate meanwhile.  True if it waited (``run.yielded_at`` is now)."""
    cpu.run.wakeup.clear()
    if pending_exit(cpu) not in (RunState.HELD, RunState.HALT, RunState.OFFLINE):
        return False
    if dormitory is not None:
        dormitory.drowsy(cpu)
    sim = cpu.lg.virtual
    if sim is not None:
        sim.sleeping(cpu)
    _let_go(cpu, runnable=False)  # (a pool's CPU gives its engine back while it sleeps)
    try:
        await cpu.run.wakeup.wait()
        # The loop ran every other task meanwhile: YIELD_TIME counts from here, so a
        # woken CPU's first slice does not give up its engine to yield at once.
        cpu.run.yielded_at = time.thread_time()
    finally:
        if dormitory is not None:
            dormitory.awake(cpu)
        if sim is not None:
            sim.awake(cpu)
    return True


async def _slice(cpu: LgCpu, executor: SlicePool) -> SliceExit:
    """Run one slice of ``cpu`` (of a guest with several) once it is this CPU's turn (see
    :func:`_take_turn`)."""
    lg = cpu.lg
    if lg.processor is None:
        lg.processor = asyncio.Lock()
    _let_go(cpu)
    _take_turn(cpu, lg.processor, lg.processor_owner)
    lg.waiting_turns += 1
    try:
        await lg.processor.acquire()
    finally:
        lg.waiting_turns -= 1
    try:
        if pending_exit(cpu) is not None:
            return SliceExit.KICK  # held, woken or killed while it waited: the run loop sees
        lg.processor_owner = cpu
        try:
            return await _run_slice(cpu, executor)
        finally:
            lg.processor_owner = None
    finally:
        lg.processor.release()


def _take_turn(cpu: LgCpu, processor: asyncio.Lock, owner: LgCpu | None) -> None:
    """A guest's CPUs take turns on its one processor (FIFO, asyncio.Lock's order).

    Guarantee: no two CPUs of one guest are ever inside a slice at once, so every
    instruction, ``lock``-prefixed or not, is atomic with respect to the guest's
    other CPUs (Unicorn's instances do not make ``lock`` atomic across threads:
    docs/abi.md, "Several CPUs").  A CPU with an interrupt to take does not wait
    out the owner's slice: the owner is kicked and stops at its next block, like
    a hardware interrupt preempting a busy core.  So does a CPU with an irq raised
    since it last asked for a turn (``cpu.run.irq_raised``) that it cannot take this
    instant (its interrupts are off: it stopped at a notify in a handler), once per
    raise: it is about to turn them on, and a busy owner's run may wait for a worker
    behind a whole round of the pool.  ``wake()``, not just a kick: the owner's slice
    may still wait in the executor's queue behind other guests' slices, and is then
    withdrawn instead of waited for.
    """
    raised, cpu.run.irq_raised = cpu.run.irq_raised, False
    if owner is None or not processor.locked():
        return
    if interrupts.ready_to_deliver(cpu) or (raised and interrupts.deliverable_irq(cpu) is not None):
        owner.wake()


def _hand_over(address: int) -> bool:
    """A notify handed to the Launcher (:func:`run_guest`'s ``serve`` that serves none)."""
    return False


def _between_entries(cpu: LgCpu, serve: Callable[[int], bool], failed: list[Exception]) -> bool:
    """An inline slice stopped at a hypercall it cannot do itself: on the event loop, do
    what the run loop's passes would, there and then, while each finds a hypercall to
    do or a notify that ``serve`` serves at once (a socket request); True if the guest
    may then go on in the same slice (nothing pending, no yield due), saving the run
    loop's passes and a new slice per request.  Anything else (a notify for the
    Launcher, a halt, a break, a hold, close, a death) ends the slice and the run
    loop's next pass sees it.  An error ``serve`` raises is kept in ``failed`` (the
    notify still pending) for the run loop to raise once the slice has ended.

    Each round starts as a pass does (``fuel.stop`` cleared: a kick from then on
    counts), and runs as the run loop, not the slice (``threads.slice`` None): the
    Host's writes and irqs of the request kick the CPU, and the slice drops stale
    code before it enters the guest again, instead of its next run stopping at once.

    The run loop's work is not the guest's time: when the guest goes on, the CPU time
    this took is given back to the slice (``fuel.left``), so a guest that asks often
    keeps its inline slices (the loop's share is YIELD_TIME's).  Two reads of the
    thread's CPU clock (a system call each, on a round trip's path), one of which also
    tells whether a yield is due; none for a hypercall trapped with a halt, which ends
    the slice unless an irq is deliverable (its time is then the slice's)."""
    owner = cpu.threads.slice
    cpu.threads.slice = None
    hcall = cpu.hcall
    halts = hcall is not None and hcall[0] == LHCALL_HALT
    started = 0.0 if halts else time.thread_time()
    try:
        while True:
            cpu.fuel.stop = 0
            exit = pending_exit(cpu)
            if exit is RunState.HYPERCALL:
                hypercalls.do_hypercalls(cpu)
            elif exit is RunState.NOTIFY:
                try:
                    if not serve(cpu.pending_notify):
                        return False
                except Exception as exc:
                    failed.append(exc)
                    return False
                cpu.pending_notify = 0
            elif exit is not None:
                return False
            else:
                now = time.thread_time()
                if not halts:
                    cpu.fuel.left += int((now - started) * 1e9)
                return now - cpu.run.yielded_at < YIELD_TIME  # (as _yield_due)
    finally:
        cpu.threads.slice = owner


async def _run_slice(
    cpu: LgCpu, executor: SlicePool, between: Callable[[], bool] | None = None
) -> SliceExit:
    """Run one slice; if the caller is cancelled meanwhile, stop it and then re-raise.

    A CPU whose last slice ended on its own gets a short slice on the event loop
    itself (``execute.INLINE_TIME``); one that uses it up goes back to the executor,
    where its run is many slices (:mod:`supervisor.slicepool`).  A run withdrawn from
    the executor's queue, before its first slice or between two (:meth:`LgCpu.wake`),
    ends as a ``KICK``.  ``between``: an inline slice's (:func:`_between_entries`).
    """
    if cpu.run.inline and cpu.run.detached is None:
        pending = cpu.irqs_pending  # (only the event loop raises irqs: none come meanwhile)
        ended = run_slice(cpu, INLINE_BUDGET, between=between)
        assert isinstance(ended, SliceExit)  # (AGAIN only with `more`)
        _debug_stop(cpu, ended)
        cpu.run.inline = ended is not SliceExit.BUDGET
        # Its handler took longer than an inline slice: the rest runs before the queue's.
        cpu.run.urgent = not cpu.run.inline and bool(pending & ~cpu.irqs_pending)
        return ended
    future = cpu.run.detached
    if future is not None:  # a break left the run going on: this read takes it over
        cpu.run.detached = None
        queued = cpu.run.queued_slice
        assert queued is not None
    else:
        _let_go(cpu, step=True)  # the step takes it back on its worker
        queued = executor.submit(
            run_slice,
            cpu,
            None,
            functools.partial(_may_go_on, cpu),
            executor.crowd,
            hurry=functools.partial(_slicing.hurry, cpu.fuel),
            shorten=functools.partial(_slicing.cut, cpu.fuel),
            urgent=cpu if cpu.run.urgent else None,
            owner=cpu,
        )
        cpu.run.urgent = False
        cpu.run.idle.clear()  # until the run is finished or withdrawn: pause() waits for it
        cpu.run.queued_slice = queued
        future = _loop_future(cpu, queued)
    waiter = _run_waiter(cpu, future)
    try:
        await waiter
        if queued.cancelled():  # withdrawn (LgCpu.wake): go round again
            return SliceExit.KICK
        if not future.done():  # a Waker's break (break_out): the run goes on meanwhile
            _detach(cpu, future)
            return SliceExit.KICK
        exit: SliceExit = future.result()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if queued.cancelled() and task is not None and not task.cancelling():
            # Withdrawn while it waited for a worker, or ended after a slice, by a wake()
            # (which also put the next slice on the loop): go round again.
            return SliceExit.KICK
        if not queued.cancel():  # already running: stop it at its next block and wait
            cpu.kick()
            await wait_quietly(future)
        # else withdrawn from the executor's queue: no slice runs, nothing to wait for
        raise
    finally:
        cpu.run.on_break = None
        # The loop ran every other task while this CPU's run was the executor's: a wait,
        # so YIELD_TIME counts from here (a withdrawn run's irq goes in at once).
        cpu.run.yielded_at = time.thread_time()
        if cpu.run.detached is not future:
            cpu.run.queued_slice = None
            if future.done() or queued.cancelled():
                if future.done() and not future.cancelled() and future.exception() is None:
                    _debug_stop(cpu, future.result())  # (also when the read was cancelled)
                cpu.run.idle.set()
    cpu.run.inline = exit is not SliceExit.BUDGET
    return exit


def _loop_future(cpu: LgCpu, job: Job[SliceExit | Again]) -> asyncio.Future[SliceExit]:
    """``job``'s outcome as a future of the running loop, as ``asyncio.wrap_future`` gives
    it but in fewer turns of the loop, since each turn and each system call of the loop's
    thread lets go of the GIL, which a worker between two slices may then take (what an
    irq's or a break's p99 is made of, docs/performance.md).

    A job that ends on the loop's own thread (withdrawn by :meth:`LgCpu.wake`) settles
    the future there and then, without ``call_soon_threadsafe`` (under asyncio a write to
    the loop's self-pipe, and a turn of the loop to read it back).  One that ends on a
    worker settles it in one ``call_soon_threadsafe`` callback that also ends the wait of
    the read waiting for it (``cpu.run.on_break``), instead of in a turn of the loop
    after the future's own callbacks."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[SliceExit] = loop.create_future()
    thread = threading.get_ident()
    # The CPU, let go of once the future is settled: the worker that reported the end may
    # still be returning from call_soon_threadsafe, its frames referring to settle, when
    # the read, and the guest's close, have gone on.
    owner = [cpu]

    def settle(done: Job[SliceExit | Again]) -> None:
        if future.done():  # pragma: no cover - only this callback settles it
            return
        if done.cancelled():
            future.cancel()
        elif (error := done.exception()) is not None:
            future.set_exception(error)
        else:
            result = done.result()
            assert isinstance(result, SliceExit)  # (a step's AGAIN never ends its job)
            future.set_result(result)
        control = owner.pop().run
        waiter = control.on_break
        if waiter is not None and not waiter.done() and control.queued_slice is done:
            waiter.set_result(None)

    def ended(done: Future[SliceExit | Again]) -> None:
        assert isinstance(done, Job)
        if threading.get_ident() == thread:
            settle(done)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(settle, done)

    job.add_done_callback(ended)
    return future


def _run_waiter(cpu: LgCpu, future: asyncio.Future[Any]) -> asyncio.Future[None]:
    """What the read waits for instead of its executor run alone (``cpu.run.on_break``):
    the run's end, its withdrawal (:meth:`LgCpu.wake` completes it at once: the read
    goes round again in the loop's next turn, not after the cancellation has travelled
    through ``future``), or, where a break may leave the run going on
    (:func:`_detachable`), a Waker's break (:func:`break_out`), whichever comes first."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def ended(_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(ended)
    cpu.run.on_break = waiter
    return waiter


def _detachable(cpu: LgCpu) -> bool:
    """Whether a break may end the read while its executor run goes on (:func:`_detach`):
    not for a guest with several CPUs (the run holds the processor) nor with an engine
    switched at every slice; a break stops those runs."""
    pool = cpu.engine.pool
    return len(cpu.lg.cpus) == 1 and not (pool is not None and pool.always)


def _detach(cpu: LgCpu, future: asyncio.Future[Any]) -> None:
    """A break ends the read while its executor run goes on: the run stays the CPU's
    (``queued_slice``, ``idle`` cleared until it ends) for the next read to take over.

    No read is in flight, so the run goes on only until its current slice ends
    (``_may_go_on`` sees the break, or no read) or anything that needs the CPU
    stopped wakes it (an irq, a hold, close, a kill): at most one slice past the
    break, and nothing waits for it to stop.
    """
    cpu.run.detached = future
    cpu.stats.breaks_running += 1

    def ended(done: asyncio.Future[Any]) -> None:
        """It ended before a read took it over: the next read starts a run, as after any
        run's end (a debugger's stop held, the next slice on the loop unless it ended by
        its time; an error cannot come: run_slice turns one into the guest's death)."""
        if cpu.run.detached is not done:
            return
        cpu.run.detached = None
        cpu.run.queued_slice = None
        if not done.cancelled() and done.exception() is None:
            exit: SliceExit = done.result()
            _debug_stop(cpu, exit)
            cpu.run.inline = exit is not SliceExit.BUDGET
        cpu.run.idle.set()

    future.add_done_callback(ended)


def break_out(cpu: LgCpu) -> None:
    """A Waker's ``LHREQ_BREAK 1``: the CPU's read ends with ``EAGAIN``.

    A read waiting for its executor run ends at once, one pass of the run loop, while
    the run goes on (:func:`_detach`): the guest loses no time to the break, and the
    next read takes the run over.  Anything else is woken (:meth:`LgCpu.wake`).
    """
    cpu.run.break_out = True
    breaker = cpu.run.on_break
    if breaker is not None and not breaker.done() and _detachable(cpu):
        breaker.set_result(None)
    else:
        cpu.wake()


def _debug_stop(cpu: LgCpu, exit: SliceExit | Again) -> None:
    """A debugger's code hook stopped the slice before an instruction: hold the CPU
    there, for the reason the hook recorded (the next pass parks it; the hook's reason
    wins over a pause asked for during the slice: the debugger reports what stopped it)."""
    if exit is SliceExit.DEBUG_STOP:
        cpu.run.hold = cpu.trap.debug


def _may_go_on(cpu: LgCpu) -> bool:
    """Whether a busy CPU's executor run may go on with another slice without the run
    loop (:func:`~supervisor.execute.run_slice`'s ``more``; on a worker, reads only).

    Only if the run loop's next pass would start a slice anyway (nothing pending), a
    read is in flight (a run a break left going on ends with its slice unless the next
    read took it over) and no other CPU of the guest waits for its turn on the
    processor.  The pool then runs that slice in its FIFO turn
    (:mod:`supervisor.slicepool`).
    """
    pool = cpu.engine.pool
    if pool is not None and pool.always:
        return False  # every slice through the run loop, each on a switched engine
    return cpu.lg.waiting_turns == 0 and cpu.run.reading and pending_exit(cpu) is None


async def wait_quietly(future: asyncio.Future[Any]) -> None:
    """Wait for ``future`` to finish even if the waiting task is cancelled meanwhile;
    its result or error is ignored.  A cancellation that arrived during the wait
    is raised (``CancelledError``) once the future is done.

    Every CPU is kicked before this is awaited, so the wait is one short slice.
    """
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:
            break
    if cancelled:
        raise asyncio.CancelledError
