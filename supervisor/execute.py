"""The executor half of the run loop: a slice of guest execution, and why it ended.

:func:`run_slice` enters the guest repeatedly until the Host's event-loop half
or the Launcher is needed, and returns that reason as a :class:`SliceExit`.  Each
time emulation stops, :func:`classify` turns what the hooks recorded into a
:class:`SliceExit` (a pure function of fabricated-or-real values, unit-tested
without an emulator), and one ``match`` handles it: a hypercall it may do here,
a trap to reflect to the guest, ``hlt``, a debugger's stop, the end of the
budget, a kick, a death.

It runs on an executor thread (or, for short slices, on the event loop's
thread) and never touches the event loop: no asyncio objects, no timers.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from unicorn import UC_HOOK_INTR, UcError
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as r

from . import _slicing, _unicorn, codecache, hypercalls, interrupts, timers
from .abi import LGUEST_DATA_HCALL_STATUS, LGUEST_TRAP_ENTRY
from .cpu import CpuStats, Hold, LgCpu
from .pagetables import guest_pa
from .slicepool import AGAIN, AGAIN_URGENT, Again

_T = TypeVar("_T")

# emu_start's `until`: ignored, since each CPU runs with an empty exit list (see cpu.py).
_NEVER = 1 << 32
TARGET_SLICE = 0.002  # seconds: the budget adapts so a busy slice lasts about this long
MIN_BUDGET = 1_000
# A slice on the event loop itself runs the guest for at most INLINE_TIME seconds of CPU
# time, and INLINE_BUDGET blocks where blocks are counted (the block hook, the fallback;
# not the default exit-request path, where time is the only bound).
INLINE_BUDGET = 256
INLINE_TIME = 0.0001
# An inline slice may run the guest this long instead (and, where blocks are counted, a
# delivering one this many blocks) unless the CPU's last one used up its time: a handler
# (with the translation of code the delivery made stale), start-up code, or a guest
# that notifies every few microseconds finishes on the loop rather than after a round
# of the executor's queue, while a guest that computes through its inline slices gives
# the loop back after INLINE_TIME.
LONG_INLINE_TIME = 0.0005
LONG_INLINE_BUDGET = 4096
# A crowded executor shortens busy slices so that a round of every waiting job's slice
# takes at most CROWD_ROUND seconds of a worker's CPU time, but not below MIN_SLICE:
# under load, when the workers get a small share of the cores, a round of 1,000
# spinners' 2 ms slices would take longer than a user waits to see each one move.
CROWD_ROUND = 0.05
MIN_SLICE = 0.0005
# An executor slice that had to switch an engine (supervisor.engines) lasts long enough
# that the switch takes at most SWITCH_SHARE of it: with more busy CPUs than engines
# nearly every slice switches, and a crowd's short slices would otherwise spend a
# quarter of the workers' time switching.  But at most CROWD_ROUND, and short enough
# that a round of every waiting job's slice still takes at most SWITCHED_ROUND of a
# worker's CPU time: a crowd of spinners far larger than the engines pays more for its
# switches rather than wait for seconds between turns.  (Not in the "always" mode,
# whose point is as many switches as there are slices.)
SWITCH_SHARE = 0.01
SWITCHED_ROUND = 1.0
# An executor slice that begins while no job waits for a worker (a *lone* slice) lasts
# LONE_SLICE instead of TARGET_SLICE: each slice's end costs the guest a stop and a
# restart, the GIL and the run's bookkeeping in Python, and the slicer thread's wake-ups,
# which take a core from a busy guest when every core runs one.  Once a job waits, the
# pool cuts the lone slice back (`_slicing.cut`): it ends where a slice taken in turn
# would have, so a newcomer waits no longer than it would behind a TARGET_SLICE.  Only on
# the exit-request path (which can move a running slice's end), for a one-CPU guest (a
# sibling CPU waiting for its turn is not a job of the pool) without a run-time limit.
LONE_SLICE = 0.02
_TARGET_NS = int(1e9 * TARGET_SLICE)
_CROWD_ROUND_NS = int(1e9 * CROWD_ROUND)
_MIN_SLICE_NS = int(1e9 * MIN_SLICE)
_SWITCHED_ROUND_NS = int(1e9 * SWITCHED_ROUND)
_INLINE_NS = int(1e9 * INLINE_TIME)
_LONG_INLINE_NS = int(1e9 * LONG_INLINE_TIME)
_LONE_NS = int(1e9 * LONE_SLICE)
FAST_CLOCK_MASK = 255  # fast guests: the slice meter reads the clock every 256 blocks
MAX_BUDGET = 50_000_000
# Deterministic mode's slices end only at a block count: their time never runs out, and
# the block hook never reads the clock (blocks & mask is 0 only at block 0).
_TIMELESS_NS = 1 << 60
_NO_CLOCK = (1 << 64) - 1
INVALID_OPCODE = 6
DOUBLE_FAULT = 8
_MEMORY_ERRORS = frozenset(
    {
        uc_const.UC_ERR_READ_UNMAPPED,
        uc_const.UC_ERR_WRITE_UNMAPPED,
        uc_const.UC_ERR_FETCH_UNMAPPED,
        uc_const.UC_ERR_READ_PROT,
        uc_const.UC_ERR_WRITE_PROT,
        uc_const.UC_ERR_FETCH_PROT,
    }
)


# Protection faults: guest memory is all UC_PROT_ALL, so these are the Host's read-only
# pages (supervisor.hostpages).
_PROTECTION_ERRORS = frozenset(
    {uc_const.UC_ERR_READ_PROT, uc_const.UC_ERR_WRITE_PROT, uc_const.UC_ERR_FETCH_PROT}
)


class ExitValue:
    """A member of a closed set of singletons, compared with ``is`` and ``match``.

    Like an ``enum.Enum`` member, but a plain class attribute: on CPython 3.11 every
    lookup of an Enum member goes through the metaclass, several times slower than
    a class attribute, and the run loop looks these up on every pass and every
    slice (a NOTIFY round trip makes about 16 lookups), where that difference is a
    few per cent of the round trip.  Each ``ClassVar`` of a subclass is a member
    (made when the subclass is); its ``value`` is its name in lower case.
    """

    __slots__ = ("name", "value")

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        for name in inspect.get_annotations(cls):
            setattr(cls, name, cls(name))

    def __init__(self, name: str) -> None:
        self.name = name
        self.value = name.lower().replace("_", " ")

    def __repr__(self) -> str:
        return f"<{type(self).__name__}.{self.name}: {self.value!r}>"


class SliceExit(ExitValue):
    """Why one slice (a :func:`run_slice`) stopped entering the guest."""

    __slots__ = ()

    HYPERCALL: ClassVar[SliceExit]  # the guest trapped with int $0x1f (cpu.hcall holds the call)
    TRAP: ClassVar[SliceExit]  # an exception or software interrupt to reflect to the guest
    BAD_ACCESS: ClassVar[SliceExit]  # a guest access outside its memory: death
    INVALID_OPCODE: ClassVar[SliceExit]  # reflected as trap 6
    EMULATION_ERROR: ClassVar[SliceExit]  # anything else Unicorn gave up on: death
    HALT: ClassVar[SliceExit]  # hlt, or LHCALL_HALT: sleep until an interrupt
    DEBUG_STOP: ClassVar[SliceExit]  # a breakpoint or single step (cpu.trap.debug says which)
    BUDGET: ClassVar[SliceExit]  # the slice's blocks or time are spent
    KICK: ClassVar[SliceExit]  # another task asked for the CPU (break, irq, hold, close)
    INTERRUPT: ClassVar[SliceExit]  # an interrupt was raised: deliver it, go on (one run)
    DEATH: ClassVar[SliceExit]  # the guest is dead


# The exits of a CPU that computes: it used up its executor slice, or was stopped in
# the middle of it (a kick, an interrupt).  An engine pool keeps the engine a CPU gives
# back between slices for it while its last executor slice ended so (Engine.busy), or
# with a hypercall or a trap that the run loop handles on the way to its next slice
# (_PASSING: as busy as before); after any other exit (a halt, a death, a debugger's
# stop) the engine is a spare (supervisor.engines, "Policy").
_RUNNABLE = frozenset((SliceExit.BUDGET, SliceExit.KICK, SliceExit.INTERRUPT))
_PASSING = frozenset((SliceExit.HYPERCALL, SliceExit.TRAP, SliceExit.INVALID_OPCODE))


def classify(
    vector: int | None, debug: Hold | None, fuel_reason: int, error: int | None
) -> SliceExit:
    """Why one ``emu_start`` returned, from what the hooks and the fuel recorded.

    ``vector``: the interrupt hook's vector; ``debug``: a code hook's stop;
    ``fuel_reason``: the block hook's ``REASON_*``; ``error``: the ``UcError``
    number if ``emu_start`` raised.  With nothing recorded, the guest ran ``hlt``
    (Unicorn stops there by itself).
    """
    if error is not None:
        if error == uc_const.UC_ERR_INSN_INVALID:
            return SliceExit.INVALID_OPCODE
        if error in _MEMORY_ERRORS:
            return SliceExit.BAD_ACCESS
        return SliceExit.EMULATION_ERROR
    if vector == LGUEST_TRAP_ENTRY:
        return SliceExit.HYPERCALL
    if vector is not None:
        return SliceExit.TRAP
    if debug is not None:
        return SliceExit.DEBUG_STOP
    if fuel_reason == _slicing.REASON_STOP:
        return SliceExit.KICK
    if fuel_reason == _slicing.REASON_IRQ:
        return SliceExit.INTERRUPT
    if fuel_reason == _slicing.REASON_BUDGET:
        return SliceExit.BUDGET
    return SliceExit.HALT


def attach_interrupt_hook(cpu: LgCpu, hooked: bool = False) -> None:
    """Install the hook that sees every interrupt and exception the guest raises
    (``hooked``: the CPU's instance has it already, or the CPU has none yet; only the
    CPU's own part of it is set up: on the native paths, its slice meter's).

    It runs on the slice's thread.  A CPU-local hypercall with an empty async
    ring is done right there and the guest goes on (the cheap path); anything
    else is recorded and ends the run, exactly at that boundary.  On the native
    paths the hook is ``_fuel.c``'s (no Python runs for a trap, nor for the CPU-local
    hypercalls it completes in C, and for another CPU-local hypercall only its
    handler); the table that says which calls are CPU-local, and which of those the
    native hook completes itself, is ``hypercalls``' either way.
    """
    fuel = cpu.fuel
    local = hypercalls.LOCAL_HYPERCALLS

    if _slicing.NATIVE:

        def local_call(number: int, a1: int, a2: int, a3: int) -> bool:
            """A CPU-local hypercall, from _fuel.c's hook; True: stop the run."""
            try:
                hypercalls.do_hcall(cpu, (number, a1, a2, a3))
            except Exception as exc:  # a Host bug must kill only this guest
                cpu.lg.kill(f"internal error: {type(exc).__name__}: {exc}")
                return True
            return False

        _slicing.trap_interrupts(
            cpu.engine.uc,
            fuel,
            local_call,
            local,
            hypercalls.NATIVE_HYPERCALLS,
            (cpu.engine.host_address, cpu.lg.pfn_limit),
            hooked,
        )
        return
    if hooked:
        return  # (the Python hook finds its CPU through the instance's seat)

    place = _unicorn.seat(cpu.engine.uc)  # (the hook is kept for the instance's next CPUs)

    def on_interrupt(uc: Any, vector: int, _data: object) -> None:
        current: LgCpu = place.cpu
        trap = current.trap
        if (
            vector == LGUEST_TRAP_ENTRY
            and current.hcall is None
            and current.lguest_data is not None
        ):
            args = place.regs.hypercall()
            if args[0] in local and hypercalls.ring_empty(current):
                hypercalls.do_hcall(current, args)
                fuel = current.fuel
                if time.monotonic_ns() >= fuel.deadline:  # the call is done; time is up
                    fuel.reason = _slicing.REASON_BUDGET  # (not a hlt: see classify)
                    uc.emu_stop()
                return
            trap.hcall = args  # read once: _enter_guest takes them from here
        trap.vector = vector
        uc.emu_stop()

    cpu.engine.hooks.append(cpu.engine.uc.hook_add(UC_HOOK_INTR, on_interrupt))


def _pre_entry_exit(cpu: LgCpu) -> SliceExit | None:
    """Before each entry: a reason not to enter the guest at all, or None."""
    lg = cpu.lg
    if lg.dead:
        return SliceExit.DEATH
    if cpu.run.hold is not None:
        return SliceExit.KICK  # held: the run loop parks it
    if cpu.halted:
        return SliceExit.HALT
    fuel = cpu.fuel
    if fuel.stop or cpu.run.closing:
        return SliceExit.KICK
    if fuel.budget <= 0 or fuel.left <= 0:
        fuel.reason = _slicing.REASON_BUDGET  # out of time: the same as out of blocks
        return SliceExit.BUDGET
    return None


def run_slice(
    cpu: LgCpu,
    budget: int | None = None,
    more: Callable[[], bool] | None = None,
    crowd: Callable[[], float] | None = None,
    timeless: bool = False,
    between: Callable[[], bool] | None = None,
) -> SliceExit | Again:
    """Enter the guest until the run loop or the Launcher is needed; say why.

    Any thread, never two at once for one CPU; it does not touch the event loop.
    ``budget`` caps the slice's blocks; by default the CPU's adaptive budget,
    which is then adjusted so that a busy slice lasts about ``TARGET_SLICE``.

    ``more`` (executor slices, a :class:`~supervisor.slicepool.SlicePool` step): when
    the slice's time is spent and ``more()`` is true, the run loop is not needed and
    the answer is ``AGAIN``: the pool runs the next slice after the other waiting jobs
    have had theirs, or at once, without a trip through the event loop (two thread
    wake-ups, each far longer than a slice's bookkeeping).  Anything that wants the run loop
    kicks the CPU (``fuel.stop``, which only the run loop clears), so the next slice
    ends at once with ``KICK``.

    ``crowd`` (executor slices): how many jobs wait per worker; a crowded pool's
    slices are shorter (:func:`slice_ns`).

    ``timeless`` (deterministic mode, with ``budget``; a CPU on the block hook): the
    slice ends only when its blocks are spent, never for time, so where it ends
    depends on nothing but the guest.

    ``between`` (an inline slice, on the event loop): offered each hypercall the slice
    cannot do itself; True means the run loop's work for it is done there and then (a
    socket request served at once, ``run._between_entries``) and the guest goes on in
    this slice, the CPU time that work took given back to the slice (``fuel.left``);
    False ends the slice with ``HYPERCALL``.
    """
    if more is not None:
        timers.write_timestamp(cpu)  # a step may start long after the run loop wrote it
    pool = cpu.engine.pool
    switch = 0.0
    if pool is not None and cpu.engine.frozen is not None:
        took = _take_engine(cpu)
        if took is None:
            return SliceExit.DEATH
        switch = took
    if cpu.engine.uc is None:
        # A slice enters the guest only on the CPU's engine: it is given back and taken
        # only by whoever owns the CPU (the event loop between runs, a run's step while
        # it goes on), so none can be missing here unless that ownership was broken.
        cpu.lg.kill("internal error: a slice of a CPU with no engine")
        return SliceExit.DEATH
    waiting = crowd() if crowd is not None else 0.0
    busy_ns = slice_ns(waiting) if crowd is not None else _TARGET_NS
    if more is not None and pool is not None and not pool.always and pool.crowded(waiting):
        # Past the pool's bound the crowd's CPUs take each other's engines: every slice is
        # as long, whether this one switched or found its own engine, so that each CPU's
        # share does not depend on who took whose.  (Below it a CPU keeps its engine: a
        # switch or a new engine is paid once, and the slices are the crowd's.)
        busy_ns = switched_slice_ns(busy_ns, max(switch, pool.switch_cost), waiting)
    urgent = cpu.stats.handler_rests + cpu.stats.irqs_held_over
    lone = 0
    if crowd is not None and not waiting and may_be_lone(cpu):
        lone = max(0, _LONE_NS - busy_ns)
    exit: SliceExit | None = None
    try:
        exit = _one_slice(cpu, budget, busy_ns, timeless, lone, crowd, between)
    finally:
        if pool is not None and more is not None:  # a step holds an engine only while it runs
            engine = cpu.engine
            if exit not in _PASSING:
                engine.busy = exit in _RUNNABLE
            _on_this_thread(cpu, functools.partial(cpu.release_engine, engine.busy))
    if exit is SliceExit.BUDGET and more is not None and more():
        cpu.stats.continued += 1
        # A handler this slice delivered, or an irq it had no time left to deliver: the
        # next step goes first, as after an inline slice (slicepool: the front, at most
        # twice per round for the CPU), not behind every busy guest's.
        if cpu.stats.handler_rests + cpu.stats.irqs_held_over != urgent:
            return AGAIN_URGENT
        return AGAIN
    return exit


def may_be_lone(cpu: LgCpu) -> bool:
    """Whether an executor slice of ``cpu`` begun while no job waits may be a lone one
    (LONE_SLICE): the exit-request path, one CPU, no run-time limit, engines not switched
    at every slice."""
    pool = cpu.engine.pool
    return (
        bool(cpu.fuel.exit_request)
        and len(cpu.lg.cpus) == 1
        and cpu.limits.max_run_time is None
        and (pool is None or not pool.always)
    )


def switched_slice_ns(busy_ns: int, switch: float, crowd: float = 0.0) -> int:
    """An executor slice's CPU time in ns after an engine switch that took ``switch``
    seconds (0: none), with ``crowd`` jobs waiting per worker: at least ``busy_ns``, and
    long enough that the switch is at most SWITCH_SHARE of it, but for the switch's sake
    no longer than CROWD_ROUND, nor than a SWITCHED_ROUND shared by the crowd."""
    longest = min(_CROWD_ROUND_NS, int(_SWITCHED_ROUND_NS / max(crowd, 1.0)))
    return max(busy_ns, min(longest, int(1e9 * switch / SWITCH_SHARE)))


def _take_engine(cpu: LgCpu) -> float | None:
    """Take an engine from the device's pool for this slice: the CPU seconds a switch
    took (0.0: its own engine back), or None if that failed (the guest is then killed:
    the Host could not give it an emulator)."""
    try:
        return _on_this_thread(cpu, cpu.take_engine) or 0.0
    except Exception as exc:  # (the failed engine went back tainted: closed)
        cpu.lg.kill(f"internal error: no engine: {type(exc).__name__}: {exc}")
        return None


def _on_this_thread(cpu: LgCpu, action: Callable[[], _T]) -> _T:
    """``action()`` with this thread marked as the CPU's owner (the threading contract's
    check), as a slice is."""
    owner = cpu.threads.slice
    cpu.threads.slice = threading.get_ident()
    try:
        return action()
    finally:
        cpu.threads.slice = owner


def slice_ns(crowd: float) -> int:
    """A busy slice's CPU time in ns, with ``crowd`` jobs waiting per worker: TARGET_SLICE,
    or less, so that a round of them takes at most CROWD_ROUND, but at least MIN_SLICE."""
    if crowd * _TARGET_NS <= _CROWD_ROUND_NS:
        return _TARGET_NS
    return max(_MIN_SLICE_NS, int(_CROWD_ROUND_NS / crowd))


def _one_slice(
    cpu: LgCpu,
    budget: int | None,
    busy_ns: int = _TARGET_NS,
    timeless: bool = False,
    lone: int = 0,
    crowd: Callable[[], float] | None = None,
    between: Callable[[], bool] | None = None,
) -> SliceExit:
    """One slice of :func:`run_slice`: until the run loop is needed or its time is spent
    (``busy_ns`` of CPU time for an executor slice, budget None, and ``lone`` ns more for a
    lone slice until the pool cuts it; never, if ``timeless``).  ``crowd``: the pool's jobs
    waiting per worker, looked at again once the lone slice is set up (a job queued since
    the caller looked found nothing to cut).  ``between``: as :func:`run_slice`'s."""
    fuel = cpu.fuel
    lg = cpu.lg
    cpu.threads.slice = threading.get_ident()
    start = time.perf_counter()
    blocks_before = fuel.blocks
    # A slice's length is CPU time from its first run on (see _slicing.run): Host work
    # before that (delivering an interrupt, which a loaded machine can stretch) must not
    # use it up, or the guest's handler would wait for a whole trip through the
    # executor's queue (docs/performance.md, "Latency and fairness under load").
    if budget is None:
        fuel.left = busy_ns + lone
        fuel.lone = lone
        if lone and crowd is not None and crowd():
            _slicing.cut(fuel)
    else:
        # Short only for a CPU known to compute through its inline slices: a longer
        # deadline than the slicer's tick costs no wake-up of the slicer thread, which
        # a notify round trip (ending by itself in microseconds) would otherwise pay.
        fuel.left = _INLINE_NS if cpu.inline_spent else _LONG_INLINE_NS
    if timeless:
        fuel.left = _TIMELESS_NS
        fuel.clock_mask = _NO_CLOCK
    elif budget is None:
        _deliver_natively(cpu, fuel)
    delivered = False
    # An executor slice that delivered an interrupt: if its time runs out, it may be in
    # the handler (given at least LONG_INLINE_TIME here), whose rest then goes first.
    handler_bound = False
    fuel.mark = 0
    fuel.reason = _slicing.REASON_NONE
    wanted = cpu.budget if budget is None else budget
    if budget is None and busy_ns > _TARGET_NS:  # a longer slice (after a switch): more blocks
        wanted = min(MAX_BUDGET, wanted * busy_ns // _TARGET_NS)
    left = cpu.limits.blocks_left(blocks_before)
    fuel.budget = wanted if left is None else min(wanted, left)
    # (The adaptive block budget is sized for TARGET_SLICE: another length leaves it alone.)
    full_budget = budget is None and fuel.budget == cpu.budget and busy_ns == _TARGET_NS
    exit = SliceExit.KICK
    try:
        while True:
            if cpu.hcall is not None:
                if hypercalls.all_local(cpu):
                    hypercalls.do_hypercalls(cpu)
                elif between is None or not between():  # (it gives its time back)
                    exit = SliceExit.HYPERCALL
                    break
            if lg.dead:
                exit = SliceExit.DEATH
                break
            # An interrupt is delivered where its handler will run: not by a kicked slice,
            # or one whose time is spent, which ends before the next entry, but by the
            # next slice (the run loop's, on the event loop, gives its handler up to
            # LONG_INLINE_TIME).
            if (
                cpu.run.hold is None
                and cpu.irqs_pending  # (none pending: nothing to deliver)
                and not fuel.stop
                and fuel.left > 0
                and fuel.budget > 0
                and interrupts.maybe_do_interrupt(cpu)
            ):
                delivered = True
                if budget is not None and not timeless:
                    _lengthen_for_handler(cpu, fuel.blocks - blocks_before)
                elif fuel.mark:
                    keep_time_for_handler(fuel)
                    handler_bound = budget is None
                elif budget is None:  # (before its first run: all its time is left)
                    handler_bound = True
            early = _pre_entry_exit(cpu)
            if early is not None:
                exit = early
                break
            fuel.wrote = 0  # (a write noted after this is in stale_code by the next entry)
            if cpu.stale_code:  # the Host wrote guest memory: no stale translation may run
                codecache.drop_stale(cpu)
            # Record what the stop means; the checks above decide whether to go on.
            match _enter_guest(cpu):
                case SliceExit.HALT:
                    cpu.halted = True  # the guest executed hlt: same as LHCALL_HALT
                case SliceExit.DEBUG_STOP:
                    # Before an instruction, cpu.trap.debug saying why: the run loop
                    # holds the CPU (it owns the hold), so the slice ends here.
                    exit = SliceExit.DEBUG_STOP
                    break
                case SliceExit.INTERRUPT:
                    # (Raised while it ran, LgCpu.raise_irq: delivered at the top, in this
                    # slice, with no trip through the run loop.)
                    cpu.stats.irqs_in_slice += 1
                case _:
                    pass  # handled by _enter_guest, or seen by the checks (fuel, death)
        if (
            exit is SliceExit.BUDGET
            and budget is None
            and cpu.irqs_pending
            and interrupts.ready_to_deliver(cpu)
        ):
            # Raised as the slice's time ran out (too late for the run to stop for it):
            # the next step delivers it, first in the queue (run_slice).
            cpu.stats.irqs_held_over += 1
    except Exception as exc:  # a Host bug must kill only this guest
        cpu.engine.tainted = True  # (the engine's state is unknown: never handed on)
        lg.kill(f"internal error: {type(exc).__name__}: {exc}")
        exit = SliceExit.DEATH
    finally:
        cpu.threads.slice = None
        fuel.lone = 0  # (over: nothing left to cut)
        fuel.irq_native = 0
        if fuel.handler_bound:  # an irq run() delivered got the slice's last handler time
            fuel.handler_bound = 0
            handler_bound = True
        if budget is not None and not delivered:
            cpu.inline_spent = fuel.reason == _slicing.REASON_BUDGET
        if handler_bound and fuel.reason == _slicing.REASON_BUDGET:
            cpu.stats.handler_rests += 1
        elapsed = time.perf_counter() - start
        stats = cpu.stats
        stats.slices += 1
        stats.run_time += elapsed
        stats.blocks = blocks = fuel.blocks
        stats.blocks_counted = fuel.counts_blocks
        exhausted = cpu.limits.exceeded(stats.blocks, stats.run_time)
        if exhausted:
            lg.kill(exhausted)
            exit = SliceExit.DEATH
        # Blocks slower than a microsecond on average: read the clock at every block.
        ran = blocks - blocks_before
        fuel.clock_mask = 0 if elapsed * 1e6 > ran else FAST_CLOCK_MASK
        if fuel.reason == _slicing.REASON_BUDGET and full_budget and elapsed > 0:
            scaled = int(cpu.budget * TARGET_SLICE / elapsed)
            if elapsed < 2 * TARGET_SLICE:
                scaled = (cpu.budget + scaled) // 2  # smooth small corrections only
            cpu.budget = max(MIN_BUDGET, min(MAX_BUDGET, scaled))
    return exit


def _deliver_natively(cpu: LgCpu, fuel: _slicing.Fuel) -> None:
    """Let ``_slicing.run`` deliver an irq raised while this executor slice runs itself,
    where its stop lands, and run on without the GIL (``_fuel.c``'s ``irq_in_run``: the
    checks of ``interrupts.maybe_do_interrupt`` and the frame of ``_slicing.deliver``),
    for a one-CPU guest with its ``lguest_data`` on the exit-request path: the other
    CPUs of a guest would have to hear of the frame's write (``Lguest.host_wrote``).
    What it reads is fixed while the slice runs (only LGUEST_INIT, which ends a slice,
    sets it); the slice clears the flag when it ends."""
    lg = cpu.lg
    data = cpu.lguest_data
    if not fuel.exit_request or data is None or len(lg.cpus) != 1 or cpu.run.hold is not None:
        return
    fuel.irq_data = data
    fuel.noirq_start = lg.noirq_start
    fuel.noirq_end = lg.noirq_end
    fuel.kernel = lg.kernel_address
    fuel.handler_ns = _LONG_INLINE_NS
    fuel.irq_native = 1


def _lengthen_for_handler(cpu: LgCpu, spent: int) -> None:
    """An inline slice that has ``spent`` blocks and just delivered an interrupt may run
    the handler for LONG_INLINE_TIME and LONG_INLINE_BUDGET blocks (the CPU's block limit
    still holds)."""
    fuel = cpu.fuel
    fuel.left = max(fuel.left, _LONG_INLINE_NS)
    longer = LONG_INLINE_BUDGET - spent
    allowed = cpu.limits.blocks_left(fuel.blocks)
    fuel.budget = max(fuel.budget, longer if allowed is None else min(longer, allowed))


def keep_time_for_handler(fuel: _slicing.Fuel) -> bool:
    """An interrupt delivered in the middle of an executor slice (raised while it ran):
    its handler gets at least LONG_INLINE_TIME of CPU time in this slice, as it would
    on the event loop, rather than wait for the slice's next turn in a crowded pool.
    The slice's account (``fuel.left`` since ``fuel.mark``, as ``_slicing.run`` keeps
    it) is brought up to now first.  True if the handler's time is what is left of the
    slice (a slice that then runs out of time ends inside the handler, or just after)."""
    now = time.thread_time_ns()
    left: int = fuel.left - (now - fuel.mark)
    fuel.left = max(left, _LONG_INLINE_NS)
    fuel.mark = now
    return left <= _LONG_INLINE_NS


def _enter_guest(cpu: LgCpu) -> SliceExit:
    """Run the guest once; handle what can be handled here and return why it stopped.

    A hypercall is left in ``cpu.hcall`` (done by the slice loop or the run loop),
    a trap is reflected to the guest's handler (or kills it), a bad access or an
    emulation error kills.
    """
    trap = cpu.trap
    fuel = cpu.fuel
    exit = SliceExit.EMULATION_ERROR
    count = 0  # the fallback's instruction count (see _slicing.run)
    # What the native interrupt hook needs to do CPU-local hypercalls itself.
    data = cpu.lguest_data
    ring = 0
    if data is not None and cpu.hcall is None:
        ring = cpu.engine.host_address + data + LGUEST_DATA_HCALL_STATUS
    for _attempt in range(2):
        trap.vector = None
        trap.bad_access = None
        trap.debug = None
        trap.hcall = None
        error: UcError | None = None
        try:
            count, vector, hcall = _slicing.run(cpu.engine.uc, fuel, _NEVER, ring, cpu.next_hcall)
        except UcError as exc:
            error = exc
            cpu.engine.tainted = True  # never handed to another CPU (supervisor.engines)
            vector, hcall = _slicing.last_trap(fuel)
        finally:
            if fuel.native_done:  # hypercalls the native hook completed count like any other
                cpu.stats.hypercalls += fuel.native_done
                fuel.native_done = 0
            if fuel.irq_stops:  # runs stopped for an irq that run() went on with
                _count_native_irqs(cpu.stats, fuel)
        if vector is not None:  # the native hook's (the fallback's hook sets trap itself)
            trap.vector = vector
            if hcall is not None:
                trap.hcall = hcall
        cpu.stats.exits += 1
        exit = classify(
            trap.vector, trap.debug, fuel.reason, None if error is None else error.errno
        )
        if exit is SliceExit.HALT and count and not _after_hlt(cpu):
            _slicing.count_spent(fuel, count)  # the fallback's count ran out
            exit = SliceExit.BUDGET
        if trap.vector != DOUBLE_FAULT or not _spurious_double_fault(cpu):
            break
    if trap.vector in _unicorn.REMEMBERED:
        _unicorn.forget_exception(cpu.engine.uc)
    match exit:
        case SliceExit.HYPERCALL:
            cpu.hcall = trap.hcall if trap.hcall is not None else cpu.engine.regs.hypercall()
        case SliceExit.TRAP:
            assert trap.vector is not None
            _reflect_trap(cpu, trap.vector)
        case SliceExit.INVALID_OPCODE:
            _reflect_trap(cpu, INVALID_OPCODE)
        case SliceExit.BAD_ACCESS if trap.bad_access is not None:
            kind, address = trap.bad_access
            where = "outside guest memory"
            if error is not None and error.errno in _PROTECTION_ERRORS:  # only the Host's pages
                where = "in the Host's read-only pages (the boot GDT)"
            cpu.lg.kill(f"bad page: {kind} at {address:#x} {where} (eip {cpu.eip:#x})")
        case SliceExit.BAD_ACCESS | SliceExit.EMULATION_ERROR:
            cpu.lg.kill(f"emulation error at {cpu.eip:#x}: {error}")
        case _:
            pass
    return exit


def _count_native_irqs(stats: CpuStats, fuel: _slicing.Fuel) -> None:
    """Add what ``_slicing.run`` did for irqs by itself to the CPU's counters."""
    stats.irqs_in_slice += fuel.irq_stops
    stats.irqs_native += fuel.irqs_native
    stats.interrupts += fuel.irqs_native
    fuel.irq_stops = fuel.irqs_native = 0


def _after_hlt(cpu: LgCpu) -> bool:
    """Whether the instruction just before ``eip`` is ``hlt`` (the fallback's test).

    On the fallback a quiet stop is either a ``hlt`` (eip is just past it) or the
    count running out, which stops before an instruction.  Only a count running
    out exactly on a jump target that directly follows a ``hlt`` byte looks the
    same; that is taken for a ``hlt``.
    """
    where = guest_pa(cpu, (cpu.eip - 1) & 0xFFFFFFFF)
    return where is not None and cpu.lg.read(where, 1) == bytes([_slicing.HLT])


def _spurious_double_fault(cpu: LgCpu) -> bool:
    """A double fault here is Unicorn's stale exception state (see ``_unicorn``).

    Our guests never have faults delivered by the CPU, so a genuine double fault
    cannot happen; unless the guest executed ``int $8`` itself, forget the stale
    state so that re-running the faulting instruction reports its real trap.
    """
    if not _unicorn.can_forget_exception():
        return False
    eip = cpu.eip
    where = guest_pa(cpu, (eip - 2) & 0xFFFFFFFF)
    if where is not None and cpu.lg.read(where, 2) == b"\xcd\x08":
        return False
    _unicorn.forget_exception(cpu.engine.uc)
    return True


def _reflect_trap(cpu: LgCpu, vector: int) -> None:
    """Hand a trap (or a software interrupt) to the guest's handler, or kill it."""
    detail = 0
    error_code = 0
    if vector == interrupts.PAGE_FAULT:
        detail = cpu.reg(r.UC_X86_REG_CR2)
        interrupts.report_page_fault(cpu, detail)
        code = _unicorn.page_fault_error_code(cpu.engine.uc)  # present, write, user: the MMU's
        error_code = code if code is not None else int(guest_pa(cpu, detail) is not None)
    if not interrupts.deliver_trap(cpu, vector, error_code):
        cpu.lg.kill(f"unhandled trap {vector} at {cpu.eip:#x} ({detail:#x})")
