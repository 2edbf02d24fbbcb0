"""Debugging a guest: stop it, set breakpoints, single-step exactly, read and write its state.

Beyond the lguest ABI.  A :class:`Debugger` belongs to one open file (one boot
of one guest; get it with :func:`debugger`).  It holds the guest's CPU the way
:meth:`LguestFile.pause` does (``LgCpu.hold``, with its own reasons): while held,
the run loop parks instead of entering the guest, so a Launcher's read simply
stays pending while the guest is stopped, and every other guest keeps running.
It uses only the file's public surface and the CPU's public methods.

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

import asyncio
from dataclasses import dataclass
from typing import Any

from unicorn import UcError
from unicorn import x86_const as r

from .abi import PAGE_SIZE
from .cpu import LgCpu
from .device import LguestFile
from .guest import Death
from .pagetables import guest_pa

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

# Why the guest is stopped (``LgCpu.hold``).
START = "start"  # held before its first instruction
PAUSE = "pause"  # stopped on request (gdb's Ctrl-C, a snapshot)
BREAKPOINT = "breakpoint"
STEP = "step"


class DebugError(Exception):
    """The request cannot be done now (guest not stopped, memory not mapped, guest gone)."""


@dataclass(frozen=True)
class Stop:
    """Why the guest stopped: ``reason`` is one of the stop reasons, or ``"dead"``."""

    reason: str
    death: Death | None = None

    @property
    def dead(self) -> bool:
        return self.death is not None


def debugger(file: LguestFile) -> Debugger:
    """The file's debugger, created on first use (the file must be initialized).

    It lives as long as the file's CPU does (the CPU's ``on_hold`` is its method).
    """
    existing = getattr(file_cpu(file).on_hold, "__self__", None)
    if isinstance(existing, Debugger) and existing.file is file:
        return existing
    return Debugger(file)


def file_cpu(file: LguestFile) -> LgCpu:
    """CPU 0 of an initialized file (``DebugError`` before INITIALIZE or after close)."""
    if file.closed or file.cpu_count == 0:
        raise DebugError("the guest is not initialized or already closed")
    return file.cpu(0)


class Debugger:
    """Stop, step, inspect and change one guest.  Use :func:`debugger` to get one."""

    def __init__(self, file: LguestFile) -> None:
        self.file = file
        self.cpu = file_cpu(file)
        self.cpu.on_hold = self._on_hold
        self._changed = asyncio.Event()
        self._parked = False
        self._breakpoints: dict[int, Any] = {}
        self._step_hook: Any = None
        self._resume_eip = -1
        self._resume_blocks = -1

    # -- state ------------------------------------------------------------------
    @property
    def death(self) -> Death | None:
        return self.cpu.lg.dead

    @property
    def stop_reason(self) -> str | None:
        """Why the guest is held, or None while it runs."""
        return self.cpu.hold

    @property
    def stopped(self) -> bool:
        """True when the guest is held and no slice of it runs: its state may be touched."""
        cpu = self.cpu
        if self.file.closed or cpu.closed:
            return False
        return cpu.hold is not None and (self._parked or not cpu.reading) and not cpu.running

    @property
    def parked(self) -> bool:
        """True when held inside a read (the Launcher is waiting: a clean point to snapshot)."""
        return self.stopped and self._parked and self.cpu.reading

    def _on_hold(self) -> None:
        self._parked = self.cpu.hold is not None
        if self._parked:
            self._drop_step_hook()
        self._changed.set()

    def _check_stopped(self) -> LgCpu:
        if not self.stopped:
            raise DebugError(
                "the guest is running (stop it first)"
                if not self.file.closed
                else "the guest is closed"
            )
        return self.cpu

    # -- stopping and resuming ----------------------------------------------------
    def request_stop(self, reason: str = PAUSE) -> None:
        """Ask the guest to stop at its next instruction boundary (returns at once)."""
        cpu = self.cpu
        if self.file.closed or cpu.closed or cpu.lg.dead:
            return
        if cpu.hold is None:
            cpu.hold = reason
        cpu.wake()

    async def wait_stop(self, *, parked: bool = False) -> Stop:
        """Wait until the guest is stopped (or dead) and say why.

        With ``parked=True``, also wait until it is held inside a read (see
        :attr:`parked`).  Raises :class:`DebugError` if the file is closed.
        """
        while True:
            if self.file.closed:
                raise DebugError("the guest is closed")
            dead = self.cpu.lg.dead
            if dead is not None:
                return Stop("dead", dead)
            if self.parked if parked else self.stopped:
                self._drop_step_hook()
                assert self.cpu.hold is not None
                return Stop(self.cpu.hold)
            self._changed.clear()
            await self._changed.wait()

    async def stop(self, reason: str = PAUSE, *, parked: bool = False) -> Stop:
        """Stop the guest (if it runs) and wait until it is stopped."""
        self.request_stop(reason)
        return await self.wait_stop(parked=parked)

    def resume(self) -> None:
        """Let a stopped guest run on (a breakpoint at the current address is passed once)."""
        cpu = self._check_stopped()
        self._resume_eip = cpu.eip
        self._resume_blocks = cpu.fuel.blocks
        self._parked = False
        self.file.resume()

    def step(self) -> None:
        """Run exactly one instruction, then stop (``Stop("step")``); returns at once."""
        cpu = self._check_stopped()
        self._drop_step_hook()
        executed = 0
        trap = cpu.trap

        def on_code(uc: Any, _address: int, _size: int, _data: object) -> None:
            nonlocal executed
            executed += 1
            if executed > 1:
                trap.debug = STEP
                uc.emu_stop()

        self._step_hook = cpu.add_code_hook(on_code)
        self.resume()

    async def stepi(self) -> Stop:
        """Run exactly one instruction and wait for the stop."""
        self.step()
        return await self.wait_stop()

    def _drop_step_hook(self) -> None:
        if self._step_hook is not None:
            self.cpu.remove_hook(self._step_hook)
        self._step_hook = None

    def kill(self, reason: str = "killed by the debugger") -> None:
        """Kill the guest: its reader sees ``ENOENT`` and then ``reason``."""
        cpu = self.cpu
        if self.file.closed or cpu.closed:
            return
        cpu.lg.kill(reason)
        cpu.hold = None
        cpu.wake()

    def detach(self) -> None:
        """Remove every breakpoint and let the guest run free."""
        if self.file.closed or self.cpu.closed:
            return
        if self.cpu.hold is not None and not self.stopped:
            self.cpu.hold = None  # asked to stop but not yet stopped: never mind
            return
        for address in list(self._breakpoints):
            self.remove_breakpoint(address)
        self._drop_step_hook()
        if self.stopped:
            self.resume()

    # -- breakpoints ----------------------------------------------------------------
    @property
    def breakpoints(self) -> frozenset[int]:
        return frozenset(self._breakpoints)

    def add_breakpoint(self, address: int) -> None:
        """Stop before the instruction at guest-virtual ``address`` runs (guest stopped)."""
        cpu = self._check_stopped()
        address &= 0xFFFFFFFF
        if address in self._breakpoints:
            return
        trap = cpu.trap
        fuel = cpu.fuel

        def on_code(uc: Any, at: int, _size: int, _data: object) -> None:
            if at == self._resume_eip and fuel.blocks == self._resume_blocks + 1:
                return  # the instruction we resume from runs once
            trap.debug = BREAKPOINT
            uc.emu_stop()

        self._breakpoints[address] = cpu.add_code_hook(on_code, address, address)

    def remove_breakpoint(self, address: int) -> bool:
        """Remove the breakpoint at ``address``; False if there was none."""
        cpu = self._check_stopped()
        hook = self._breakpoints.pop(address & 0xFFFFFFFF, None)
        if hook is None:
            return False
        cpu.remove_hook(hook)
        return True

    # -- registers and memory ----------------------------------------------------------
    def registers(self) -> list[int]:
        """The 16 registers in gdb's i386 order (:data:`REGISTERS`)."""
        uc = self._check_stopped().emulator
        return [uc.reg_read(reg) & 0xFFFFFFFF for reg in _UC_REGS]

    def register(self, index: int) -> int:
        if not 0 <= index < len(_UC_REGS):
            raise DebugError(f"no register {index}")
        value: int = self._check_stopped().emulator.reg_read(_UC_REGS[index])
        return value & 0xFFFFFFFF

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
        if cpu.emulator.reg_read(_UC_REGS[index]) == value:
            return  # gdb's 'G' writes every register back; leave the unchanged ones alone
        try:
            cpu.emulator.reg_write(_UC_REGS[index], value)
        except UcError as exc:
            raise DebugError(f"cannot set {REGISTERS[index]} to {value:#x}: {exc}") from None

    def _pages(self, address: int, size: int) -> list[tuple[int, int]]:
        """Guest-physical (address, length) pieces of a guest-virtual range."""
        cpu = self._check_stopped()
        pieces = []
        while size > 0:
            pa = guest_pa(cpu, address & 0xFFFFFFFF)
            chunk = min(size, PAGE_SIZE - (address & (PAGE_SIZE - 1)))
            if pa is None or not cpu.lg.address_ok(pa, chunk):
                raise DebugError(f"no memory at {address & 0xFFFFFFFF:#x}")
            pieces.append((pa, chunk))
            address += chunk
            size -= chunk
        return pieces

    def read_memory(self, address: int, size: int) -> bytes:
        """Bytes at a guest-virtual address (through the guest's page tables)."""
        lg = self.cpu.lg
        return b"".join(bytes(lg.ram[pa : pa + n]) for pa, n in self._pages(address, size))

    def write_memory(self, address: int, data: bytes) -> None:
        """Store bytes at a guest-virtual address (read-only pages too); code is retranslated."""
        lg = self.cpu.lg
        offset = 0
        for pa, n in self._pages(address, len(data)):
            lg.ram[pa : pa + n] = data[offset : offset + n]
            offset += n
        self.cpu.flush_code()
