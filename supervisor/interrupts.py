"""Interrupts and traps: the guest's IDT, and delivery onto the guest's stack.

Delivery emulates the hardware: push eflags (IF taken from
``lguest_data.irq_enabled``), cs, eip and, for the traps that have one, an error
code, then jump to the gate's handler; an interrupt gate turns ``irq_enabled``
off.  Our guests run at ring 0, so no stack switch ever happens and the gate's
selector is recorded but CS is left as the guest set it.
"""

from __future__ import annotations

import struct

from unicorn import x86_const as r

from . import _slicing
from .abi import (
    FIRST_EXTERNAL_VECTOR,
    IDT_ENTRIES,
    LGUEST_DATA_BLOCKED_INTERRUPTS,
    LGUEST_DATA_CR2,
    LGUEST_DATA_IRQ_ENABLED,
    LGUEST_IRQS,
    LGUEST_TRAP_ENTRY,
    X86_EFLAGS_IF,
)
from .cpu import LgCpu
from .pagetables import guest_pa

# Vectors the guest may not take over: NMI, double fault, spurious, the hypercall trap.
IGNORED_VECTORS = frozenset({2, 8, 15, LGUEST_TRAP_ENTRY})
# Traps for which the hardware pushes an error code.
ERROR_CODE_TRAPS = frozenset({8, 10, 11, 12, 13, 14, 17})
GATE_INTERRUPT = 0xE
GATE_TRAP = 0xF
GATE_PRESENT = 0x8000  # (the gate descriptor's P bit, in its high word)
PAGE_FAULT = 14


def gate_present(hi: int) -> bool:
    return bool(hi & GATE_PRESENT)


def gate_type(hi: int) -> int:
    return (hi >> 8) & 0xF


def load_idt_entry(cpu: LgCpu, num: int, lo: int, hi: int) -> None:
    """LHCALL_LOAD_IDT_ENTRY: install (or clear) one gate of the guest's IDT."""
    if num >= IDT_ENTRIES:
        cpu.lg.kill(f"Setting idt entry {num}")
        return
    if num in IGNORED_VECTORS:
        return
    if gate_present(hi) and gate_type(hi) not in (GATE_INTERRUPT, GATE_TRAP):
        cpu.lg.kill(f"bad IDT type {gate_type(hi)}")
        return
    cpu.idt[num] = (lo & 0xFFFFFFFF, hi & 0xFFFFFFFF)


def deliverable_irq(cpu: LgCpu) -> int | None:
    """The lowest pending irq the guest has not blocked, or None."""
    lg = cpu.lg
    if cpu.lguest_data is None:
        return None
    pending = cpu.irqs_pending
    if not pending:
        return None
    blocked = lg.read_u32(cpu.lguest_data + LGUEST_DATA_BLOCKED_INTERRUPTS) or 0
    ready = pending & ~blocked & ((1 << LGUEST_IRQS) - 1)
    if not ready:
        return None
    return (ready & -ready).bit_length() - 1


def ready_to_deliver(cpu: LgCpu) -> bool:
    """True if :func:`maybe_do_interrupt` would deliver (or wake for) an irq right now."""
    irq = deliverable_irq(cpu)
    if irq is None:
        return False
    if cpu.halted:
        return True
    lg = cpu.lg
    assert cpu.lguest_data is not None
    if not lg.read_u32(cpu.lguest_data + LGUEST_DATA_IRQ_ENABLED):
        return False
    if lg.noirq_start <= cpu.eip < lg.noirq_end:
        return False
    return gate_present(cpu.idt[FIRST_EXTERNAL_VECTOR + irq][1])


def maybe_do_interrupt(cpu: LgCpu) -> bool:
    """Before entering the guest: deliver the lowest deliverable irq, if the guest can take
    it; True if one was delivered.

    A halted guest with an irq ready is woken first (``irq_enabled`` back on), and
    the irq is delivered straight away, as later lguest kernels do.
    """
    irq = deliverable_irq(cpu)
    if irq is None:
        return False
    lg = cpu.lg
    assert cpu.lguest_data is not None
    if cpu.halted:
        lg.write_u32(cpu.lguest_data + LGUEST_DATA_IRQ_ENABLED, X86_EFLAGS_IF)
        cpu.halted = False
    elif not lg.read_u32(cpu.lguest_data + LGUEST_DATA_IRQ_ENABLED):
        return False
    if lg.noirq_start <= cpu.eip < lg.noirq_end:
        return False
    lo, hi = cpu.idt[FIRST_EXTERNAL_VECTOR + irq]
    if not gate_present(hi):
        return False  # the interrupt waits until the guest installs a handler
    cpu.take_irq(irq)
    set_guest_interrupt(cpu, lo, hi, None)
    return True


def deliver_trap(cpu: LgCpu, vector: int, error_code: int = 0) -> bool:
    """Reflect a trap to the guest's handler.  False if the guest has none."""
    if vector >= IDT_ENTRIES:
        return False
    lo, hi = cpu.idt[vector]
    if not gate_present(hi):
        return False
    set_guest_interrupt(cpu, lo, hi, error_code if vector in ERROR_CODE_TRAPS else None)
    return True


def report_page_fault(cpu: LgCpu, address: int) -> None:
    """Tell the guest where its last page fault was (``lguest_data.cr2``)."""
    lg = cpu.lg
    if cpu.lguest_data is not None:
        lg.write_u32(cpu.lguest_data + LGUEST_DATA_CR2, address)


def set_guest_interrupt(cpu: LgCpu, lo: int, hi: int, error_code: int | None) -> None:
    """Push an interrupt frame on the guest's stack and jump to the gate's handler.

    On the native paths the common case is done in C (``_slicing.deliver``), which
    also drops this CPU's translations of what it wrote; the other CPUs hear of the
    writes as of any Host write.  The rest (no lguest_data yet, user mode, a frame
    across a page or one the guest may not write: a death) is done here."""
    lg = cpu.lg
    data = cpu.lguest_data
    if _slicing.NATIVE and data is not None and not cpu.hibernated:
        cpu.check_thread()
        done = _slicing.deliver(
            cpu.fuel, lo, hi, error_code, data + LGUEST_DATA_IRQ_ENABLED, lg.kernel_address
        )
        if done is not None:
            frame_pa, size, frame_dropped, data_written, data_dropped = done
            lg.host_wrote(frame_pa, size, cpu if frame_dropped else None)
            if data_written:
                lg.host_wrote(data + LGUEST_DATA_IRQ_ENABLED, 4, cpu if data_dropped else None)
            cpu.stats.interrupts += 1
            return
    irq_enabled = X86_EFLAGS_IF
    if data is not None:
        irq_enabled = lg.read_u32(data + LGUEST_DATA_IRQ_ENABLED) or 0
    eflags, cs, eip, esp = cpu.frame()
    if not irq_enabled & X86_EFLAGS_IF:
        eflags &= ~X86_EFLAGS_IF
    frame = [eflags, cs, eip]
    if error_code is not None:
        frame.append(error_code)
    pushed = _push(cpu, esp, frame)
    if pushed is None:
        return
    cpu.set_reg(r.UC_X86_REG_ESP, pushed)
    cpu.set_reg(r.UC_X86_REG_EIP, (lo & 0xFFFF) | (hi & 0xFFFF0000))
    if gate_type(hi) == GATE_INTERRUPT and data is not None:
        lg.write_u32(data + LGUEST_DATA_IRQ_ENABLED, 0)
    cpu.stats.interrupts += 1


def _push(cpu: LgCpu, esp: int, words: list[int]) -> int | None:
    """Push ``words`` in order on the guest's stack as the CPU would; the new esp, or
    None if the guest died (a push its page tables do not let it write).

    A frame within one page is one Host write (one translation to look up, one
    range for the code cache to drop: supervisor.codecache); one that crosses a page
    is pushed word by word, so the death names the first push that fails either way.
    """
    lg = cpu.lg
    low = (esp - 4 * len(words)) & 0xFFFFFFFF
    if low < esp and low >> 12 == (esp - 1) >> 12:
        pa = guest_pa(cpu, low, write=True)
        if pa is not None and lg.write(pa, struct.pack(f"<{len(words)}I", *reversed(words))):
            return low
    for value in words:  # across a page (or not writable: the same death either way)
        esp = (esp - 4) & 0xFFFFFFFF
        pa = guest_pa(cpu, esp, write=True)
        if pa is None or not lg.write_u32(pa, value):
            lg.kill(f"cannot push interrupt frame: stack at {esp:#x} is not writable")
            return None
    return esp
