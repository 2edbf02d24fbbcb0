"""Hypercalls: what a guest asks of the Host with ``int $0x1f``.

A hypercall trap stores its four registers in ``cpu.hcall``; :func:`do_hypercalls`
runs the async ring first, then that direct call, exactly once each.  Most
calls only touch the CPU and may run on the executor thread inside a slice
(:func:`all_local`); the ones that need the event loop or the Launcher (clock
event, halt, notify, shutdown, LGUEST_INIT, and starting or interrupting another
CPU) wait for the run loop.  One table (``_CALLS``) says what each number does and
whether it is CPU-local; the native interrupt hook (``_fuel.c``) is configured from it
and completes the calls it marks ``native`` in C (see :class:`Hypercall`).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass

from unicorn import x86_const as r

from . import interrupts, pagetables, timers
from .abi import (
    GDT_ENTRIES,
    GUEST_PL,
    HCALL_ARGS_SIZE,
    HCALL_FREE,
    LGUEST_DATA_HCALL_STATUS,
    LGUEST_DATA_HCALLS,
    LGUEST_DATA_KERNEL_ADDRESS,
    LGUEST_DATA_NOIRQ_END,
    LGUEST_DATA_NOIRQ_START,
    LGUEST_DATA_PGDIR,
    LGUEST_DATA_RESERVE_MEM,
    LGUEST_DATA_SIZE,
    LGUEST_DATA_SYSCALL_VEC,
    LGUEST_DATA_TSC_KHZ,
    LGUEST_IRQS,
    LGUEST_SHUTDOWN_POWEROFF,
    LGUEST_SHUTDOWN_RESTART,
    LHCALL_FLUSH_ASYNC,
    LHCALL_FLUSH_TLB,
    LHCALL_HALT,
    LHCALL_LGUEST_INIT,
    LHCALL_LOAD_GDT,
    LHCALL_LOAD_IDT_ENTRY,
    LHCALL_LOAD_TLS,
    LHCALL_NEW_PGTABLE,
    LHCALL_NOTIFY,
    LHCALL_RING_SIZE,
    LHCALL_SEND_IPI,
    LHCALL_SET_CLOCKEVENT,
    LHCALL_SET_PMD,
    LHCALL_SET_PTE,
    LHCALL_SET_STACK,
    LHCALL_SHUTDOWN,
    LHCALL_START_CPU,
    LHCALL_TS,
    SWITCHER_RESERVE,
    SYSCALL_VECTOR,
    TLS_ENTRIES,
)
from .cpu import CR0_TS, LgCpu, start_secondary

Args = tuple[int, int, int, int]  # number, arg1 (edx), arg2 (ebx), arg3 (ecx)
# A handler's result, if not None, is the direct call's return value (eax); the
# async ring has no return values.
Handler = Callable[[LgCpu, int, int, int], int | None]

SHUTDOWN_MESSAGE_MAX = 128
_HCALL = struct.Struct("<IIII")


def _flush_async(cpu: LgCpu, a1: int, a2: int, a3: int) -> None:
    """Nothing: the ring has already run by the time this is seen."""


def _init_again(cpu: LgCpu, a1: int, a2: int, a3: int) -> None:
    cpu.lg.kill("already have lguest_data")


def _shutdown(cpu: LgCpu, message_addr: int, how: int, status: int) -> None:
    message = cpu.lg.read_string(message_addr, SHUTDOWN_MESSAGE_MAX)
    if message == "":
        message = "no reason given"  # a reason is what a dead guest's reads return
    if message is None:
        cpu.lg.kill(f"CRASH: bad shutdown message address {message_addr:#x}")
    elif how == LGUEST_SHUTDOWN_POWEROFF:
        cpu.lg.kill(message, exit_status=status)
    elif how == LGUEST_SHUTDOWN_RESTART:
        cpu.lg.kill(message, err=errno.ERESTART)
    else:
        cpu.lg.kill(f"CRASH: {message}")


def _load_gdt(cpu: LgCpu, table: int, entries: int, _a3: int) -> None:
    if not 0 < entries <= GDT_ENTRIES:
        cpu.lg.kill(f"too many gdt entries {entries}")
        return
    if not cpu.lg.address_ok(table, entries * 8):
        cpu.lg.kill(f"bad GDT address {table:#x}")
        return
    cpu.gdt = (table, entries)
    cpu.emulator.reg_write(r.UC_X86_REG_GDTR, (0, table, entries * 8 - 1, 0))


def _load_tls(cpu: LgCpu, addr: int, _a2: int, _a3: int) -> None:
    tls = cpu.lg.read(addr, TLS_ENTRIES * 8)
    if tls is None:
        cpu.lg.kill(f"bad TLS address {addr:#x}")
        return
    cpu.tls = tls


def _set_stack(cpu: LgCpu, ss: int, esp: int, pages: int) -> None:
    if (ss & 3) != GUEST_PL:
        cpu.lg.kill(f"bad stack segment {ss}")
    elif pages > 2:
        cpu.lg.kill(f"bad stack pages {pages}")
    else:
        cpu.stack = (ss, esp, pages)


def _ts(cpu: LgCpu, on: int, _a2: int, _a3: int) -> None:
    cpu.ts = 1 if on else 0
    cr0 = cpu.reg(r.UC_X86_REG_CR0)
    cpu.set_reg(r.UC_X86_REG_CR0, cr0 | CR0_TS if on else cr0 & ~CR0_TS)


def _halt(cpu: LgCpu, _a1: int, _a2: int, _a3: int) -> None:
    cpu.halted = True


def _notify(cpu: LgCpu, addr: int, _a2: int, _a3: int) -> None:
    cpu.pending_notify = addr


def _other_cpu(cpu: LgCpu, n: int) -> LgCpu | None:
    cpus = cpu.lg.cpus
    return cpus[n] if 0 <= n < len(cpus) else None


def _start_cpu(cpu: LgCpu, n: int, eip: int, esp: int) -> int:
    """LHCALL_START_CPU (an extension): bring offline CPU ``n`` online at ``eip``, ``esp``.

    -EINVAL for a CPU the guest does not have, -EBUSY for one already started;
    see :func:`supervisor.cpu.start_secondary` for what it starts with.
    """
    target = _other_cpu(cpu, n)
    if target is None:
        return -errno.EINVAL
    if target.online:
        return -errno.EBUSY
    start_secondary(target, cpu, eip & 0xFFFFFFFF, esp & 0xFFFFFFFF)
    target.wake()  # its reader sleeps until the CPU is online
    return 0


def _send_ipi(cpu: LgCpu, n: int, irq: int, _a3: int) -> int:
    """LHCALL_SEND_IPI (an extension): raise ``irq`` on CPU ``n`` (itself too), as a
    Launcher's LHREQ_IRQ would.  -EINVAL for no such CPU or irq.  An offline CPU
    keeps it pending until it is started and can take it."""
    target = _other_cpu(cpu, n)
    if target is None or not 0 <= irq < LGUEST_IRQS:
        return -errno.EINVAL
    target.raise_irq(irq)
    return 0


@dataclass(frozen=True, slots=True)
class Hypercall:
    """What one hypercall number does: the one place that decides it.

    ``local``: it touches only the CPU, so it may run on the slice's thread inside a
    slice, with the guest going on afterwards.  ``native``: ``_fuel.c``'s interrupt hook
    completes it itself, without Python, when the handler would accept its arguments
    (for any other it calls the handler, which kills the guest); the handler stays the
    definition, used by the fallback path and the async ring, and tests/test_hotpath.py
    checks the two agree.  ``native`` implies ``local``.
    """

    handler: Handler
    local: bool = False
    native: bool = False


_CALLS: dict[int, Hypercall] = {
    LHCALL_FLUSH_ASYNC: Hypercall(_flush_async, local=True),
    LHCALL_LGUEST_INIT: Hypercall(_init_again),
    LHCALL_SHUTDOWN: Hypercall(_shutdown),
    LHCALL_LOAD_GDT: Hypercall(_load_gdt, local=True),
    LHCALL_NEW_PGTABLE: Hypercall(
        lambda cpu, pgdir, _b, _c: pagetables.new_pgtable(cpu, pgdir), local=True
    ),
    LHCALL_FLUSH_TLB: Hypercall(lambda cpu, _a, _b, _c: cpu.flush_tlb(), local=True, native=True),
    LHCALL_LOAD_IDT_ENTRY: Hypercall(interrupts.load_idt_entry, local=True, native=True),
    LHCALL_SET_STACK: Hypercall(_set_stack, local=True, native=True),
    LHCALL_TS: Hypercall(_ts, local=True, native=True),
    LHCALL_SET_CLOCKEVENT: Hypercall(lambda cpu, delta, _b, _c: timers.set_clockevent(cpu, delta)),
    LHCALL_HALT: Hypercall(_halt),
    LHCALL_SET_PTE: Hypercall(pagetables.set_pte, local=True, native=True),
    LHCALL_SET_PMD: Hypercall(
        lambda cpu, pgdir, index, _c: pagetables.set_pmd(cpu, pgdir, index),
        local=True,
        native=True,
    ),
    LHCALL_LOAD_TLS: Hypercall(_load_tls, local=True),
    LHCALL_NOTIFY: Hypercall(_notify),
    LHCALL_START_CPU: Hypercall(_start_cpu),
    LHCALL_SEND_IPI: Hypercall(_send_ipi),
}
_HANDLERS: dict[int, Handler] = {n: c.handler for n, c in _CALLS.items()}

# Hypercalls that touch only the CPU: safe on the executor thread inside a slice.
LOCAL_HYPERCALLS = frozenset(n for n, c in _CALLS.items() if c.local)
# CPU-local hypercalls the native interrupt hook completes itself (valid arguments only).
NATIVE_HYPERCALLS = frozenset(n for n, c in _CALLS.items() if c.native)
assert NATIVE_HYPERCALLS <= LOCAL_HYPERCALLS


def do_hcall(cpu: LgCpu, args: Args) -> int | None:
    """Carry out one hypercall; an unknown number kills the guest.  Returns the
    call's return value, if it has one."""
    number, a1, a2, a3 = args
    cpu.stats.hypercalls += 1
    handler = _HANDLERS.get(number)
    if handler is None:
        cpu.lg.kill(f"Bad hypercall {number}")
        return None
    return handler(cpu, a1, a2, a3)


def ring_empty(cpu: LgCpu) -> bool:
    """True if the guest has queued no async hypercall (``lguest_data`` must be set)."""
    lg = cpu.lg
    assert cpu.lguest_data is not None
    return bool(lg.ram[cpu.lguest_data + LGUEST_DATA_HCALL_STATUS + cpu.next_hcall] == HCALL_FREE)


def all_local(cpu: LgCpu) -> bool:
    """True if the pending direct call and every queued async call are CPU-local."""
    lg = cpu.lg
    if cpu.hcall is None or cpu.lguest_data is None or cpu.hcall[0] not in LOCAL_HYPERCALLS:
        return False
    status = lg.read(cpu.lguest_data + LGUEST_DATA_HCALL_STATUS, LHCALL_RING_SIZE)
    if status is None:
        return False
    for i in range(LHCALL_RING_SIZE):
        n = (cpu.next_hcall + i) % LHCALL_RING_SIZE
        if status[n] == HCALL_FREE:
            return True
        number = lg.read_u32(cpu.lguest_data + LGUEST_DATA_HCALLS + n * HCALL_ARGS_SIZE)
        if number not in LOCAL_HYPERCALLS:
            return False
    return True


def do_async_hcalls(cpu: LgCpu) -> None:
    """Run the guest's queued hypercalls in ring order, stopping early for a notify."""
    lg = cpu.lg
    assert cpu.lguest_data is not None
    status_base = cpu.lguest_data + LGUEST_DATA_HCALL_STATUS
    for _ in range(LHCALL_RING_SIZE):
        n = cpu.next_hcall
        if lg.ram[status_base + n] == HCALL_FREE:
            break
        cpu.next_hcall = (n + 1) % LHCALL_RING_SIZE
        raw = lg.read(cpu.lguest_data + LGUEST_DATA_HCALLS + n * HCALL_ARGS_SIZE, HCALL_ARGS_SIZE)
        assert raw is not None  # lguest_data lies wholly inside guest memory
        # The ring holds eax, edx, ebx, ecx: number and three arguments.
        do_hcall(cpu, _HCALL.unpack(raw))
        lg.ram[status_base + n] = HCALL_FREE
        if cpu.pending_notify or lg.dead:
            break


def initialize(cpu: LgCpu) -> None:
    """A CPU's first hypercall must be LHCALL_LGUEST_INIT: register its ``lguest_data``.

    The guest-wide values (the no-interrupt range, the kernel's address) are taken
    from the first CPU's (CPU 0's); another CPU's registers only its own page."""
    assert cpu.hcall is not None
    number, addr = cpu.hcall[0], cpu.hcall[1]
    lg = cpu.lg
    cpu.stats.hypercalls += 1
    if number != LHCALL_LGUEST_INIT:
        lg.kill(f"hypercall {number} before INIT")
        return
    if not lg.address_ok(addr, LGUEST_DATA_SIZE):
        lg.kill(f"bad lguest_data address {addr:#x}")
        return
    syscall_vec = lg.read_u32(addr + LGUEST_DATA_SYSCALL_VEC)
    if syscall_vec != SYSCALL_VECTOR:
        lg.kill(f"bad syscall vector {syscall_vec}")
        return
    if cpu.id == 0:
        lg.noirq_start = lg.read_u32(addr + LGUEST_DATA_NOIRQ_START) or 0
        lg.noirq_end = lg.read_u32(addr + LGUEST_DATA_NOIRQ_END) or 0
        lg.kernel_address = lg.read_u32(addr + LGUEST_DATA_KERNEL_ADDRESS) or 0
    lg.write_u32(addr + LGUEST_DATA_RESERVE_MEM, SWITCHER_RESERVE)  # the Host's top 4 MiB
    lg.write_u32(addr + LGUEST_DATA_TSC_KHZ, timers.guest_tsc_khz(cpu))
    lg.write_u32(addr + LGUEST_DATA_PGDIR, lg.pgdir)
    cpu.lguest_data = addr
    timers.write_timestamp(cpu)


def do_hypercalls(cpu: LgCpu) -> None:
    """Handle the hypercall the guest trapped with (and the async ring before it).

    If the ring produced a notify, the direct call stays pending until the
    Launcher has seen the notify and reads again.
    """
    if cpu.lguest_data is None:
        initialize(cpu)
        cpu.hcall = None
        return
    do_async_hcalls(cpu)
    if not cpu.pending_notify and not cpu.lg.dead and cpu.hcall is not None:
        call, cpu.hcall = cpu.hcall, None
        result = do_hcall(cpu, call)
        if result is not None:
            cpu.set_reg(r.UC_X86_REG_EAX, result & 0xFFFFFFFF)
