"""``struct lg_cpu``: one guest CPU, a Unicorn x86-32 instance and its Host state.

Threading contract: while a slice runs, only the executor thread touches this
CPU (registers, IDT, page tables, ``hcall``...).  Between slices only the event
loop does.  The exceptions are :meth:`LgCpu.kick` and :meth:`LgCpu.raise_irq`,
which any thread may call at any time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_MEM_INVALID,
    UC_MODE_32,
    UC_PROT_ALL,
    Uc,
)
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as r

from . import _slicing
from ._registers import Registers
from .abi import IDT_ENTRIES, X86_EFLAGS_IF
from .limits import UNLIMITED, Limits

if TYPE_CHECKING:
    from .guest import Lguest

CR0_PE = 1 << 0
CR0_TS = 1 << 3
CR0_PG = 1 << 31
CR4_PSE = 1 << 4

# Unicorn's default translation buffer is 1 GiB of address space per instance;
# guests are small, so each CPU gets a small one.
DEFAULT_TCG_BUFFER = 1 << 20  # below 2 MiB, where QEMU's buffer turns into a huge page
DEFAULT_BUDGET = 20_000  # blocks in a first slice; adapted to the slice's target length


_ACCESS_KINDS = {
    uc_const.UC_MEM_READ_UNMAPPED: "read",
    uc_const.UC_MEM_WRITE_UNMAPPED: "write",
    uc_const.UC_MEM_FETCH_UNMAPPED: "fetch",
    uc_const.UC_MEM_READ_PROT: "read",
    uc_const.UC_MEM_WRITE_PROT: "write",
    uc_const.UC_MEM_FETCH_PROT: "fetch",
}


@dataclass(slots=True)
class CpuStats:
    """Counters for one CPU; read them from the event loop between slices."""

    blocks: int = 0  # translated blocks started (exact)
    slices: int = 0  # executor slices run
    exits: int = 0  # times emulation stopped for the Host (traps, hypercalls, stops)
    hypercalls: int = 0
    interrupts: int = 0  # interrupts and traps delivered to the guest
    run_time: float = 0.0  # seconds spent inside slices


@dataclass(slots=True)
class Trap:
    """What stopped emulation, recorded by a hook on the executor thread."""

    vector: int | None = None  # an interrupt or exception vector
    bad_access: tuple[str, int] | None = None  # ("read"|"write"|"fetch", address)
    debug: str | None = None  # a debugger's code hook stopped before an instruction: why


@dataclass(eq=False)
class LgCpu:
    """A guest CPU.  Create with :func:`new_cpu`."""

    id: int
    lg: Lguest
    uc: Any
    fuel: _slicing.Fuel
    regs: Registers
    start: int
    irqs_pending: int = 0
    halted: bool = False
    hcall: tuple[int, int, int, int] | None = None  # a direct hypercall not yet done
    next_hcall: int = 0  # next slot of the async ring
    pending_notify: int = 0
    break_out: bool = False
    ts: int = 0
    idt: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)] * IDT_ENTRIES)
    gdt: tuple[int, int] = (0, 0)  # guest-physical table, entries
    tls: bytes = b""
    stack: tuple[int, int, int] = (0, 0, 0)  # ss, esp, pages
    clock: asyncio.TimerHandle | None = None  # the armed clock event, on the event loop
    budget: int = DEFAULT_BUDGET
    inline: bool = True  # the next slice may run on the event loop (see run._slice)
    queued_slice: concurrent.futures.Future[None] | None = None  # submitted, maybe not started
    limits: Limits = UNLIMITED
    stats: CpuStats = field(default_factory=CpuStats)
    trap: Trap = field(default_factory=Trap)
    reading: bool = False
    closing: bool = False  # set by close(): every later pass of the run loop ends with EBADF
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # Beyond the lguest ABI (supervisor.debug): while set, the run loop parks instead of
    # entering the guest; on_debug is told (event loop) each time it parks or sees a death.
    debug_stop: str | None = None
    on_debug: Callable[[], None] | None = None
    break_released: asyncio.Event = field(default_factory=asyncio.Event)
    # Guest-physical ranges the Host wrote since the CPU last ran (supervisor.codecache).
    stale_code: deque[tuple[int, int]] = field(default_factory=deque)
    _irq_lock: threading.Lock = field(default_factory=threading.Lock)
    _hooks: list[Any] = field(default_factory=list)

    # -- any thread -------------------------------------------------------------
    def kick(self) -> None:
        """End the running slice at its next block boundary (or the next one to start)."""
        self.fuel.stop = 1

    def raise_irq(self, irq: int) -> None:
        """Mark ``irq`` pending and kick the CPU so it is seen promptly."""
        with self._irq_lock:
            self.irqs_pending |= 1 << irq
        self.kick()

    def preempt(self) -> None:
        """Something urgent (a break, an irq) happened: end the slice now.

        Event loop only.  A slice still waiting in the executor's queue is
        withdrawn, so the run loop sees the news without waiting its turn, and the
        next slice runs briefly on the event loop; a running one is kicked.
        """
        self.kick()
        queued = self.queued_slice
        if queued is not None and queued.cancel():
            self.inline = True

    def take_irq(self, irq: int) -> None:
        """Clear a pending irq once it has been delivered."""
        with self._irq_lock:
            self.irqs_pending &= ~(1 << irq)

    # -- registers (whoever owns the CPU right now) ------------------------------
    @property
    def closed(self) -> bool:
        return self.uc is None

    @property
    def eip(self) -> int:
        return self.regs.read(r.UC_X86_REG_EIP)

    def reg(self, reg: int) -> int:
        return self.regs.read(reg)

    def set_reg(self, reg: int, value: int) -> None:
        self.regs.write(reg, value)

    def flush_tlb(self) -> None:
        """Drop cached translations; the guest's page tables are read afresh."""
        self.regs.write(r.UC_X86_REG_CR3, self.regs.read(r.UC_X86_REG_CR3))

    def close(self) -> None:
        """Free the Unicorn instance now, not at the next garbage collection.

        Only when no slice runs.  The hooks' closures refer back to this CPU, so
        the instance would otherwise wait for the cyclic collector.
        """
        uc = self.uc
        if uc is None:
            return
        release = getattr(uc, "_Uc__finalizer", None)  # the binding's uc_close, run once
        if release is not None:
            release()
        uc._callbacks.clear()
        self._hooks.clear()
        self.uc = None


def new_cpu(
    lg: Lguest,
    cpu_id: int,
    host_address: int,
    start: int,
    pgdir: int,
    tcg_buffer: int,
    limits: Limits = UNLIMITED,
) -> LgCpu:
    """Create CPU ``cpu_id`` of ``lg``: guest memory mapped at 0, paging on at ``pgdir``.

    The CPU starts at ring 0 with flat segments, ``eip = start``, ``eflags = 0x202``
    and ``esi = 0`` (the boot information page).  The guest loads its own GDT.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.ctl_set_tcg_buffer_size(tcg_buffer)
    uc.ctl_exits_enabled(True)  # no exit address: emu_start's `until` is ignored
    uc.ctl_set_exits([])
    uc.mem_map_ptr(0, lg.limit, UC_PROT_ALL, host_address)
    fuel = _slicing.attach(uc)
    cpu = LgCpu(
        id=cpu_id, lg=lg, uc=uc, fuel=fuel, regs=Registers(uc), start=start, limits=limits
    )
    cpu.break_released.set()
    setup_regs(cpu, start, pgdir)
    trap = cpu.trap

    def on_bad_access(uc: Any, access: int, address: int, *_rest: object) -> bool:
        trap.bad_access = (_ACCESS_KINDS.get(access, "access"), address)
        return False

    cpu._hooks.append(uc.hook_add(UC_HOOK_MEM_INVALID, on_bad_access))
    return cpu


def setup_regs(cpu: LgCpu, start: int, pgdir: int) -> None:
    """The registers a guest starts with (``lguest_arch_setup_regs``)."""
    uc = cpu.uc
    uc.reg_write(r.UC_X86_REG_CR3, pgdir)
    uc.reg_write(r.UC_X86_REG_CR4, uc.reg_read(r.UC_X86_REG_CR4) | CR4_PSE)
    uc.reg_write(r.UC_X86_REG_CR0, uc.reg_read(r.UC_X86_REG_CR0) | CR0_PE | CR0_PG)
    uc.reg_write(r.UC_X86_REG_EFLAGS, X86_EFLAGS_IF | 0x2)
    uc.reg_write(r.UC_X86_REG_ESI, 0)
    uc.reg_write(r.UC_X86_REG_EIP, start)
