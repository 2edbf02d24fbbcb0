"""The per-CPU run loop: ``run_guest`` on the event loop, slices on the executor.

One pass of :func:`run_guest` mirrors lguest's ``run_guest``: do the pending
hypercalls, hand a notify to the Launcher, honour a cancelled read (the signal
case) or a Waker's break, sleep while halted, otherwise run a slice.  A slice
(:func:`run_slice`) enters the guest repeatedly and handles each exit in one
place: a hypercall it may do locally, a trap to reflect, a memory error that
kills, ``hlt``, or the end of the slice (budget spent or a kick).  It never
touches the event loop.  Slices run on the executor; a CPU that keeps exiting
early (notifies, hypercalls) gets short slices on the event loop itself, of at
most ``INLINE_BUDGET`` blocks, because a thread hand-off costs more than that.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from concurrent.futures import Executor
from typing import Any

from unicorn import UC_HOOK_INTR, UcError
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as r

from . import _exceptions, _slicing, codecache, hypercalls, interrupts, timers
from .abi import LGUEST_TRAP_ENTRY
from .cpu import LgCpu
from .pagetables import guest_pa

# emu_start's `until`: ignored, since each CPU runs with an empty exit list (see cpu.py;
# a real `until` makes Unicorn probe that address and leave a stale page fault behind).
_NEVER = 1 << 32
TARGET_SLICE = 0.002  # seconds: the budget adapts so a busy slice lasts about this long
MIN_BUDGET = 1_000
INLINE_BUDGET = 256  # blocks a slice on the event loop itself may run
INLINE_TIME = 0.0005  # seconds, the same for time
FAST_CLOCK_MASK = 255  # fast guests: the slice meter reads the clock every 256 blocks
MAX_BUDGET = 50_000_000
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


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


async def run_guest(cpu: LgCpu, executor: Executor) -> int:
    """Run ``cpu`` until the guest notifies; return the notify address.

    Raises ``OSError``: ``EAGAIN`` when a Waker broke the CPU out, ``ENOENT``
    (or ``ERESTART``) when the guest died, ``EBADF`` when the file was closed.
    Cancelling the caller stops the guest at an instruction boundary; a later
    call resumes it exactly there.
    """
    lg = cpu.lg
    while True:
        cpu.fuel.stop = 0  # a kick from here on ends the next slice
        if cpu.closing:
            raise _oserror(errno.EBADF)
        if cpu.hcall is not None:
            hypercalls.do_hypercalls(cpu)
        if cpu.pending_notify:
            return cpu.pending_notify
        if cpu.break_out:
            raise _oserror(errno.EAGAIN)
        if lg.dead:
            break
        if cpu.debug_stop is not None:  # held by a debugger (supervisor.debug)
            if cpu.on_debug is not None:
                cpu.on_debug()
            cpu.wakeup.clear()
            await cpu.wakeup.wait()
            continue
        timers.write_timestamp(cpu)
        if cpu.halted and interrupts.deliverable_irq(cpu) is None:
            cpu.wakeup.clear()
            await cpu.wakeup.wait()
            continue
        if cpu.irqs_pending and interrupts.ready_to_deliver(cpu):
            cpu.inline = True  # deliver it now, not after a trip through the executor's queue
        await _slice(cpu, executor)
    if cpu.on_debug is not None:
        cpu.on_debug()
    raise _oserror(lg.dead.errno or errno.ENOENT)


async def _slice(cpu: LgCpu, executor: Executor) -> None:
    """Run one slice; if the caller is cancelled meanwhile, stop it and then re-raise.

    A CPU whose last slice ended on its own (a notify, a halt, a hypercall the
    run loop must do) gets a short slice of at most ``INLINE_BUDGET`` blocks on
    the event loop itself: handing work to a thread and back costs far more
    than such a slice.  One that uses up that budget goes back to the executor.
    """
    if cpu.inline:
        run_slice(cpu, INLINE_BUDGET)
        cpu.inline = cpu.fuel.reason != _slicing.REASON_BUDGET
        await asyncio.sleep(0)  # stay cooperative between short slices
        return
    queued = executor.submit(run_slice, cpu)
    cpu.queued_slice = queued
    future = asyncio.wrap_future(queued)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if queued.cancelled() and task is not None and not task.cancelling():
            return  # withdrawn before it started (LgCpu.preempt): go round again
        if not queued.cancel():  # already running: stop it at its next block and wait
            cpu.kick()
            await wait_quietly(future)
        # else withdrawn from the executor's queue unstarted: nothing ran, nothing to wait for
        raise
    finally:
        cpu.queued_slice = None
    cpu.inline = cpu.fuel.reason != _slicing.REASON_BUDGET


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


def attach_interrupt_hook(cpu: LgCpu) -> None:
    """Install the hook that sees every interrupt and exception the guest raises.

    It runs on the thread running the slice.  A CPU-local hypercall with an empty async
    ring is done right there and the guest goes on (the cheap path); anything
    else is recorded in ``cpu.trap`` and ends the run, exactly at that boundary.
    """
    trap = cpu.trap
    lg = cpu.lg
    regs = cpu.regs
    fuel = cpu.fuel
    local = hypercalls.LOCAL_HYPERCALLS

    def on_interrupt(uc: Any, vector: int, _data: object) -> None:
        if vector == LGUEST_TRAP_ENTRY and cpu.hcall is None and lg.lguest_data is not None:
            args = regs.hypercall()
            if args[0] in local and hypercalls.ring_empty(cpu):
                hypercalls.do_hcall(cpu, args)
                if time.monotonic_ns() >= fuel.deadline:  # the call is done; time is up
                    fuel.reason = _slicing.REASON_BUDGET  # (not a hlt: see _enter_guest)
                    uc.emu_stop()
                return
        trap.vector = vector
        uc.emu_stop()

    cpu._hooks.append(cpu.uc.hook_add(UC_HOOK_INTR, on_interrupt))


def run_slice(cpu: LgCpu, budget: int | None = None) -> None:
    """Enter the guest until the Host or the Launcher is needed (any thread but
    never two at once for one CPU; it does not touch the event loop).

    ``budget`` caps the slice's blocks; by default the CPU's adaptive budget,
    which is then adjusted so that a busy slice lasts about ``TARGET_SLICE``.
    """
    fuel = cpu.fuel
    lg = cpu.lg
    start = time.perf_counter()
    blocks_before = fuel.blocks
    length = TARGET_SLICE if budget is None else INLINE_TIME
    fuel.deadline = time.monotonic_ns() + int(1e9 * length)
    fuel.reason = _slicing.REASON_NONE
    wanted = cpu.budget if budget is None else budget
    left = cpu.limits.blocks_left(fuel.blocks)
    fuel.budget = wanted if left is None else min(wanted, left)
    full_budget = budget is None and fuel.budget == cpu.budget
    try:
        while True:
            if cpu.hcall is not None:
                if not hypercalls.all_local(cpu):
                    break
                hypercalls.do_hypercalls(cpu)
            if lg.dead:
                break
            if cpu.debug_stop is not None:
                break
            interrupts.maybe_do_interrupt(cpu)
            if cpu.halted or lg.dead or fuel.stop or fuel.budget <= 0 or cpu.closing:
                break
            if time.monotonic_ns() >= fuel.deadline:
                fuel.reason = _slicing.REASON_BUDGET  # out of time: the same as out of blocks
                break
            if cpu.stale_code:  # the Host wrote guest memory: no stale translation may run
                codecache.drop_stale(cpu)
            _enter_guest(cpu)
    except Exception as exc:  # a Host bug must kill only this guest
        lg.kill(f"internal error: {type(exc).__name__}: {exc}")
    finally:
        elapsed = time.perf_counter() - start
        stats = cpu.stats
        stats.slices += 1
        stats.run_time += elapsed
        stats.blocks = fuel.blocks
        exhausted = cpu.limits.exceeded(stats.blocks, stats.run_time)
        if exhausted:
            lg.kill(exhausted)
        # Blocks slower than a microsecond on average: read the clock at every block.
        ran = fuel.blocks - blocks_before
        fuel.clock_mask = 0 if elapsed * 1e6 > ran else FAST_CLOCK_MASK
        if fuel.reason == _slicing.REASON_BUDGET and full_budget and elapsed > 0:
            scaled = int(cpu.budget * TARGET_SLICE / elapsed)
            if elapsed < 2 * TARGET_SLICE:
                scaled = (cpu.budget + scaled) // 2  # smooth small corrections only
            cpu.budget = max(MIN_BUDGET, min(MAX_BUDGET, scaled))


def _enter_guest(cpu: LgCpu) -> None:
    """Run the guest once and handle why it stopped."""
    trap = cpu.trap
    for _attempt in range(2):
        trap.vector = None
        trap.bad_access = None
        trap.debug = None
        cpu.fuel.reason = _slicing.REASON_NONE
        try:
            cpu.uc.emu_start(cpu.eip, _NEVER)
        except UcError as exc:
            cpu.stats.exits += 1
            _emulation_error(cpu, exc)
            return
        cpu.stats.exits += 1
        if trap.vector != DOUBLE_FAULT or not _spurious_double_fault(cpu):
            break
    if trap.vector in _exceptions.REMEMBERED:
        _exceptions.forget_exception(cpu.uc)
    if trap.vector == LGUEST_TRAP_ENTRY:
        cpu.hcall = cpu.regs.hypercall()
    elif trap.vector is not None:
        _reflect_trap(cpu, trap.vector)
    elif trap.debug is not None:  # a breakpoint or a single step, before an instruction
        cpu.debug_stop = trap.debug
    elif cpu.fuel.reason == _slicing.REASON_NONE:
        cpu.halted = True  # the guest executed hlt: same as LHCALL_HALT


def _spurious_double_fault(cpu: LgCpu) -> bool:
    """A double fault here is Unicorn's stale exception state (see ``_exceptions``).

    Our guests never have faults delivered by the CPU, so a genuine double fault
    cannot happen; unless the guest executed ``int $8`` itself, forget the stale
    state so that re-running the faulting instruction reports its real trap.
    """
    if not _exceptions.AVAILABLE:
        return False
    eip = cpu.eip
    where = guest_pa(cpu, (eip - 2) & 0xFFFFFFFF)
    if where is not None and cpu.lg.read(where, 2) == b"\xcd\x08":
        return False
    _exceptions.forget_exception(cpu.uc)
    return True


def _reflect_trap(cpu: LgCpu, vector: int) -> None:
    """Hand a trap (or a software interrupt) to the guest's handler, or kill it."""
    detail = 0
    error_code = 0
    if vector == interrupts.PAGE_FAULT:
        detail = cpu.reg(r.UC_X86_REG_CR2)
        interrupts.report_page_fault(cpu, detail)
        error_code = 1 if guest_pa(cpu, detail) is not None else 0
    if not interrupts.deliver_trap(cpu, vector, error_code):
        cpu.lg.kill(f"unhandled trap {vector} at {cpu.eip:#x} ({detail:#x})")


def _emulation_error(cpu: LgCpu, exc: UcError) -> None:
    if exc.errno == uc_const.UC_ERR_INSN_INVALID:
        _reflect_trap(cpu, INVALID_OPCODE)
    elif exc.errno in _MEMORY_ERRORS and cpu.trap.bad_access is not None:
        kind, address = cpu.trap.bad_access
        cpu.lg.kill(f"bad page: {kind} at {address:#x} outside guest memory (eip {cpu.eip:#x})")
    else:
        cpu.lg.kill(f"emulation error at {cpu.eip:#x}: {exc}")
