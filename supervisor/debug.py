"""Debugging a guest: stop it, set breakpoints, single-step exactly, read and write its state.

Beyond the lguest ABI.  A :class:`Debugger` belongs to one open file (one boot
of one guest; get it with :func:`debugger`).  It holds the guest's CPUs through
the file's control surface (:meth:`LguestFile.hold`, ``resume``, ``watch``,
``kill``), the way :meth:`LguestFile.pause` does, with its own reasons
(:class:`~supervisor.device.Hold`): while held, the run loop parks instead of
entering the guest, so a Launcher's read simply stays pending while the guest is
stopped, and every other guest keeps running.  It never touches a CPU itself: it
reads and changes registers and memory and adds code hooks through the file's
:class:`~supervisor.device.DebugPort` for each CPU, only while the guest is stopped.

Exactness comes from Unicorn code hooks that stop emulation from inside the
emulating thread, before an instruction runs:

* a breakpoint is a ``UC_HOOK_CODE`` hook on exactly its address.  Resuming
  from a breakpoint must run that instruction once: the hook ignores a hit at
  the resume address only when it is the first block of the run (the native
  block counter says so), so an interrupt delivered before it, or a loop back
  to it, still stops;
* a single step is a temporary hook on every address that lets one instruction
  run and stops at the next boundary, whatever ended the run in between (a
  hypercall done by the Host, a trap reflected to the guest's handler, an end
  of slice).  ``emu_start(count=1)`` is not used: Unicorn implements ``count``
  with a code hook of its own, which does not step past a breakpoint hook on
  the current instruction (see docs/debugging.md).

Hooks are only added or removed while the guest is stopped, and translated
blocks are flushed each time (Unicorn does not instrument blocks translated
before a hook was added).  Everything here runs on the event loop.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from unicorn import x86_const as r

from .abi import PAGE_SIZE
from .device import DebugPort, Hold, LguestFile
from .flag import Flag
from .state import Exit

# gdb's i386 register order (the 'g' packet), 32 bits each.
REGISTERS = (
    "eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi",
    "eip", "eflags", "cs", "ss", "ds", "es", "fs", "gs",
)  # fmt: skip
_UC_REGS = (
    r.UC_X86_REG_EAX, r.UC_X86_REG_ECX, r.UC_X86_REG_EDX, r.UC_X86_REG_EBX,
    r.UC_X86_REG_ESP, r.UC_X86_REG_EBP, r.UC_X86_REG_ESI, r.UC_X86_REG_EDI,
    r.UC_X86_REG_EIP, r.UC_X86_REG_EFLAGS, r.UC_X86_REG_CS, r.UC_X86_REG_SS,
    r.UC_X86_REG_DS, r.UC_X86_REG_ES, r.UC_X86_REG_FS, r.UC_X86_REG_GS,
)  # fmt: skip
FIRST_SEGMENT = REGISTERS.index("cs")

# Why the guest is stopped: the CPU's hold reasons (supervisor.cpu.Hold).
START = Hold.START  # held before its first instruction
PAUSE = Hold.PAUSE  # stopped on request (gdb's Ctrl-C, a snapshot)
BREAKPOINT = Hold.BREAKPOINT
STEP = Hold.STEP


class DebugError(Exception):
    """The request cannot be done now (guest not stopped, memory not mapped, guest gone)."""


@dataclass(frozen=True)
class Stop:
    """Why the guest stopped: ``reason`` is one of the stop reasons, or ``"dead"``;
    ``cpu`` is the CPU that stopped for it (the others were stopped with it)."""

    reason: str
    death: Exit | None = None
    cpu: int = 0

    @property
    def dead(self) -> bool:
        return self.death is not None


# Each open file's debugger, by the file's id (its `file` is checked: ids are reused).
# Weak: a debugger lives as long as the file's CPUs watch through it (LguestFile.watch).
_DEBUGGERS: weakref.WeakValueDictionary[int, Debugger] = weakref.WeakValueDictionary()


def debugger(file: LguestFile) -> Debugger:
    """The file's debugger, created on first use (the file must be initialized)."""
    file_cpu(file)  # initialized and open
    existing = _DEBUGGERS.get(id(file))
    if existing is not None and existing.file is file:
        return existing
    made = _DEBUGGERS[id(file)] = Debugger(file)
    return made


def file_cpu(file: LguestFile) -> DebugPort:
    """CPU 0 of an initialized file (``DebugError`` before INITIALIZE or after close)."""
    if file.closed or file.cpu_count == 0:
        raise DebugError("the guest is not initialized or already closed")
    return file.debug_port(0)


class _Watch:
    """What the debugger keeps for one CPU; :meth:`on_hold` is the CPU's watcher."""

    def __init__(self, debugger: Debugger, index: int) -> None:
        self.debugger = debugger
        self.index = index
        self.cpu = debugger.file.debug_port(index)
        self.parked = False  # held inside its run loop (told by on_hold)
        # The breakpoint at resume_eip is passed once, if nothing (an interrupt, a trap)
        # was delivered since the resume: blocks are not counted on every path.
        self.resume_eip = -1
        self.pass_once = False
        self.resume_interrupts = -1
        self.breakpoints: dict[int, Any] = {}  # address -> this CPU's hook

    def on_hold(self) -> None:
        self.debugger._on_hold(self)

    @property
    def stopped(self) -> bool:
        file, n = self.debugger.file, self.index
        return file.paused(n) and (self.parked or not file.reading(n))

    @property
    def reason(self) -> Hold | None:
        return self.debugger.file.hold_reason(self.index)


class Debugger:
    """Stop, step, inspect and change one guest.  Use :func:`debugger` to get one.

    All-stop, like gdb's default: when one CPU stops (a breakpoint, a step), the
    others are stopped with it, and resuming lets them all go.  Registers are the
    selected CPU's (:meth:`select`, gdb's ``Hg``); a step runs the selected CPU
    alone, the others staying stopped.
    """

    def __init__(self, file: LguestFile) -> None:
        self.file = file
        file_cpu(file)  # initialized and open
        self._watches = [_Watch(self, n) for n in range(file.cpu_count)]
        for watch in self._watches:
            file.watch(watch.index, watch.on_hold)
        self._selected = 0
        self._event: int | None = None  # the CPU whose stop stopped the others
        self._changed = Flag()
        self._step_hook: Any = None

    # -- CPUs ------------------------------------------------------------------------
    @property
    def cpu_count(self) -> int:
        return len(self._watches)

    @property
    def cpu(self) -> DebugPort:
        """The selected CPU (CPU 0 unless :meth:`select` chose another)."""
        return self._watches[self._selected].cpu

    @property
    def selected(self) -> int:
        return self._selected

    def select(self, n: int) -> None:
        """Inspect and step CPU ``n`` from now on."""
        if not 0 <= n < len(self._watches):
            raise DebugError(f"no CPU {n}")
        self._selected = n

    def cpu_summary(self, n: int) -> str:
        """A few words on CPU ``n`` (gdb's ``info threads``)."""
        cpu = self._watches[n].cpu
        state = "offline" if not cpu.online else "halted" if cpu.halted else "online"
        return f"CPU {n} ({state})"

    # -- state ------------------------------------------------------------------
    @property
    def death(self) -> Exit | None:
        return self.cpu.death

    @property
    def stop_reason(self) -> Hold | None:
        """Why the guest is held (the stopping CPU's reason), or None while it runs."""
        if self._event is not None:
            reason = self._watches[self._event].reason
            if reason is not None:
                return reason
        return self._watches[self._selected].reason

    @property
    def stop_cpu(self) -> int:
        """The CPU whose stop stopped the guest (the selected one if none did)."""
        return self._selected if self._event is None else self._event

    @property
    def stopped(self) -> bool:
        """True when every CPU is held and no slice of any runs: the state may be touched."""
        if self.file.closed or self.cpu.closed:
            return False
        return all(w.stopped for w in self._watches)

    @property
    def parked(self) -> bool:
        """True when stopped and every CPU is held inside a read (the Launcher waits on
        each of them, serving none: a clean point to snapshot)."""
        return self.stopped and all(w.parked and self.file.reading(w.index) for w in self._watches)

    def _on_hold(self, watch: _Watch) -> None:
        reason = watch.reason
        watch.parked = reason is not None
        if watch.parked:
            if watch.cpu is self._step_cpu():
                self._drop_step_hook()
            if reason in (BREAKPOINT, STEP, START) and self._event is None:
                self._event = self._watches.index(watch)
                self._hold_all(PAUSE)  # all-stop: the others stop with it
        self._changed.set()

    def _step_cpu(self) -> DebugPort | None:
        return None if self._step_hook is None else self._step_hook[0]

    def _check_stopped(self) -> DebugPort:
        if not self.stopped:
            raise DebugError(
                "the guest is running (stop it first)"
                if not self.file.closed
                else "the guest is closed"
            )
        return self.cpu

    # -- stopping and resuming ----------------------------------------------------
    def _hold_all(self, reason: Hold) -> None:
        for watch in self._watches:
            self.file.hold(watch.index, reason)

    def request_stop(self, reason: Hold = PAUSE) -> None:
        """Ask every CPU to stop at its next instruction boundary (returns at once)."""
        cpu = self.cpu
        if self.file.closed or cpu.closed or cpu.death:
            return
        self._hold_all(reason)

    async def wait_stop(self, *, parked: bool = False) -> Stop:
        """Wait until the guest is stopped (or dead) and say why.

        With ``parked=True``, also wait until it is held inside a read (see
        :attr:`parked`).  Raises :class:`DebugError` if the file is closed.
        """
        while True:
            if self.file.closed:
                raise DebugError("the guest is closed")
            dead = self.cpu.death
            if dead is not None:
                return Stop("dead", dead)
            if self.parked if parked else self.stopped:
                self._drop_step_hook()
                reason = self.stop_reason
                assert reason is not None
                if self._event is not None:
                    self._selected = self._event  # gdb looks at the CPU that stopped
                return Stop(reason, cpu=self.stop_cpu)
            self._changed.clear()
            await self._changed.wait()

    async def stop(self, reason: Hold = PAUSE, *, parked: bool = False) -> Stop:
        """Stop the guest (if it runs) and wait until it is stopped."""
        self.request_stop(reason)
        return await self.wait_stop(parked=parked)

    def _let_go(self, watch: _Watch) -> None:
        cpu = watch.cpu
        watch.resume_eip = cpu.eip if cpu.online else -1  # (an offline CPU stays frozen)
        watch.pass_once = True
        watch.resume_interrupts = cpu.interrupts
        watch.parked = False
        self.file.resume(watch.index)

    def resume(self) -> None:
        """Let a stopped guest run on, every CPU (a breakpoint at a CPU's current
        address is passed once)."""
        self._check_stopped()
        self._event = None
        for watch in self._watches:
            self._let_go(watch)

    def step(self) -> None:
        """Run exactly one instruction of the selected CPU, then stop
        (``Stop("step")``); the other CPUs stay stopped.  Returns at once."""
        cpu = self._check_stopped()
        self._drop_step_hook()
        executed = 0

        def on_code(uc: Any, _address: int, _size: int, _data: object) -> None:
            nonlocal executed
            executed += 1
            if executed > 1:
                cpu.stop_here(uc, STEP)

        self._step_hook = (cpu, cpu.add_code_hook(on_code))
        self._event = None
        self._let_go(self._watches[self._selected])

    async def stepi(self) -> Stop:
        """Run exactly one instruction and wait for the stop."""
        self.step()
        return await self.wait_stop()

    def _drop_step_hook(self) -> None:
        if self._step_hook is not None:
            cpu, hook = self._step_hook
            cpu.remove_hook(hook)
        self._step_hook = None

    def kill(self, reason: str = "killed by the debugger") -> None:
        """Kill the guest: its reader sees ``ENOENT`` and then ``reason``."""
        self.file.kill(reason)

    def detach(self) -> None:
        """Remove every breakpoint and let the guest run free."""
        if self.file.closed or self.cpu.closed:
            return
        if not self.stopped:  # asked to stop but not yet stopped: never mind
            self._event = None
            for watch in self._watches:
                watch.parked = False
                self.file.resume(watch.index)
            return
        for address in list(self.breakpoints):
            self.remove_breakpoint(address)
        self._drop_step_hook()
        self.resume()

    # -- breakpoints ----------------------------------------------------------------
    @property
    def breakpoints(self) -> frozenset[int]:
        return frozenset(self._watches[0].breakpoints)

    def add_breakpoint(self, address: int) -> None:
        """Stop before the instruction at guest-virtual ``address`` runs, on any CPU
        (guest stopped)."""
        self._check_stopped()
        address &= 0xFFFFFFFF
        for watch in self._watches:
            if address not in watch.breakpoints:
                watch.breakpoints[address] = watch.cpu.add_code_hook(
                    _breakpoint_hook(watch), address, address
                )

    def remove_breakpoint(self, address: int) -> bool:
        """Remove the breakpoint at ``address``; False if there was none."""
        self._check_stopped()
        found = False
        for watch in self._watches:
            hook = watch.breakpoints.pop(address & 0xFFFFFFFF, None)
            if hook is not None:
                watch.cpu.remove_hook(hook)
                found = True
        return found

    # -- registers and memory ----------------------------------------------------------
    def registers(self) -> list[int]:
        """The 16 registers in gdb's i386 order (:data:`REGISTERS`)."""
        cpu = self._check_stopped()
        return [cpu.reg(reg) & 0xFFFFFFFF for reg in _UC_REGS]

    def register(self, index: int) -> int:
        if not 0 <= index < len(_UC_REGS):
            raise DebugError(f"no register {index}")
        return self._check_stopped().reg(_UC_REGS[index]) & 0xFFFFFFFF

    def set_register(self, index: int | str, value: int) -> None:
        """Change one register (by gdb index or name).  Segment registers are reloaded."""
        cpu = self._check_stopped()
        if isinstance(index, str):
            if index not in REGISTERS:
                raise DebugError(f"no register {index!r}")
            index = REGISTERS.index(index)
        if not 0 <= index < len(_UC_REGS):
            raise DebugError(f"no register {index}")
        value &= 0xFFFF if index >= FIRST_SEGMENT else 0xFFFFFFFF
        if cpu.reg(_UC_REGS[index]) == value:
            return  # gdb's 'G' writes every register back; leave the unchanged ones alone
        try:
            cpu.set_reg(_UC_REGS[index], value)
        except ValueError as exc:
            raise DebugError(f"cannot set {REGISTERS[index]} to {value:#x}: {exc}") from None

    def _pages(self, address: int, size: int) -> list[tuple[int, int]]:
        """Guest-physical (address, length) pieces of a guest-virtual range."""
        cpu = self._check_stopped()
        pieces = []
        while size > 0:
            chunk = min(size, PAGE_SIZE - (address & (PAGE_SIZE - 1)))
            pa = cpu.physical(address, chunk)
            if pa is None:
                raise DebugError(f"no memory at {address & 0xFFFFFFFF:#x}")
            pieces.append((pa, chunk))
            address += chunk
            size -= chunk
        return pieces

    def read_memory(self, address: int, size: int) -> bytes:
        """Bytes at a guest-virtual address (through the guest's page tables)."""
        cpu = self.cpu
        return b"".join(cpu.read(pa, n) for pa, n in self._pages(address, size))

    def write_memory(self, address: int, data: bytes) -> None:
        """Store bytes at a guest-virtual address (read-only pages too); code is retranslated."""
        cpu = self.cpu
        offset = 0
        for pa, n in self._pages(address, len(data)):
            cpu.write(pa, data[offset : offset + n])
            offset += n
        self.cpu.flush_code()


def _breakpoint_hook(watch: _Watch) -> Any:
    """A code hook that stops ``watch``'s CPU before the instruction (slice thread)."""
    cpu = watch.cpu

    def on_code(uc: Any, at: int, _size: int, _data: object) -> None:
        if at == watch.resume_eip and watch.pass_once and cpu.interrupts == watch.resume_interrupts:
            watch.pass_once = False
            return  # the instruction we resume from runs once
        cpu.stop_here(uc, BREAKPOINT)

    return on_code
