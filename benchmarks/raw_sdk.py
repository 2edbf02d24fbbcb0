"""A C guest (``supervisor build``) run whole on a bare Unicorn: the raw baseline of a
real program.

The SDK's runtime is part of the image: it serves every system call musl makes
inside the guest (brk and mmap in guest memory, the clocks from the TSC, console
writes, TLS), and reaches the Host only through hypercalls.  So the raw run executes
exactly the guest instructions a supervised run executes, if something answers those
hypercalls as the Host does.  :class:`RawSdkGuest` does that with the least it can:

* the memory a Launcher boots from (the image loaded, its page tables, the boot info
  page and one console descriptor) mapped at 0 as the device maps it, the Host's
  read-only pages at the top, the same translation buffer, the registers of
  ``setup_regs`` (boot segments, paging, the FPU and SSE as after reset);
* with ``block_exits``, Unicorn's exit requests checked only at the start of each
  translated block, as the supervisor's exit-request slicer has it (the flag it sets,
  ``supervisor._unicorn.set_no_exit_request``): both runs then translate the same code;
* a Python ``UC_HOOK_INTR`` hook for ``int $0x1f``: ``LGUEST_INIT`` writes what the
  Host writes into ``lguest_data`` (the reserved top, ``tsc_khz``, the page directory,
  the time); ``LOAD_GDT`` sets GDTR; the page-table calls flush the TLB; ``NOTIFY`` of
  the console takes its bytes; ``SHUTDOWN`` ends the run; ``LOAD_IDT_ENTRY`` is
  recorded for the one trap reflected, musl's few ``int $0x80`` (a same-privilege
  trap gate: eflags, cs and eip pushed, the guest's handler entered); TLS, the kernel
  stack and TS need nothing here (the guest's GDT is in its own memory, which Unicorn
  reads directly).

Anything else (a fault, a halt, a clock event, another device, a second CPU) stops the
run with :class:`RawGuestError`: the raw runner serves programs that only compute and
print.  No slices, no block hook, no event loop, no executor: one ``emu_start`` from
the entry point to power-off.  Its time against a supervised run of the same image is
the supervisor's overhead (docs/performance.md, "A real program against raw
Unicorn").
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, UC_PROT_ALL, Uc
from unicorn import x86_const as r

from supervisor import _unicorn, hostpages, timers
from supervisor.abi import (
    LGUEST_DATA_PGDIR,
    LGUEST_DATA_RESERVE_MEM,
    LGUEST_DATA_TIME,
    LGUEST_DATA_TSC_KHZ,
    LGUEST_SHUTDOWN_POWEROFF,
    LHCALL_FLUSH_TLB,
    LHCALL_LGUEST_INIT,
    LHCALL_LOAD_GDT,
    LHCALL_LOAD_IDT_ENTRY,
    LHCALL_LOAD_TLS,
    LHCALL_NOTIFY,
    LHCALL_SET_PMD,
    LHCALL_SET_PTE,
    LHCALL_SET_STACK,
    LHCALL_SHUTDOWN,
    LHCALL_TS,
    SWITCHER_RESERVE,
)
from supervisor.cpu import CR0_PE, CR0_PG, CR4_PSE, DEFAULT_TCG_BUFFER
from supervisor.launcher.devices import DEV_TYPE_CONSOLE, write_descriptors
from supervisor.launcher.layout import build_pagetables, plan, write_boot_info
from supervisor.launcher.loader import load_image, read_image
from supervisor.memory import GuestMemory

HYPERCALL_VECTOR = 0x1F
NEVER = 1 << 32  # an eip never reached: emu_start runs until the hook stops it
# The console descriptor's fields (supervisor/sdk/include/lguest.h, struct lguest_console).
_OUT_ADDR, _OUT_LEN, _OUT_STREAM = 8, 12, 32
# CR4.OSFXSR | CR4.OSXMMEXCPT, FCW and MXCSR after reset: SSE2 on, as Linux and the Host
# start a process.
_CR4_SSE = (1 << 9) | (1 << 10)
_FCW_RESET, _MXCSR_RESET = 0x37F, 0x1F80
# The hypercalls whose Host side is bookkeeping this runner does not need.
_NOTHING_TO_DO = frozenset({LHCALL_LOAD_TLS, LHCALL_SET_STACK, LHCALL_TS})
SYSCALL_VECTOR = 0x80  # musl's few `int $0x80` (before it knows AT_SYSINFO)
_FLUSH = frozenset({LHCALL_SET_PTE, LHCALL_SET_PMD, LHCALL_FLUSH_TLB})
_U32 = struct.Struct("<I")


class RawGuestError(RuntimeError):
    """The guest did something the raw runner does not serve (or crashed)."""


@dataclass
class RawRun:
    """What one raw run produced."""

    status: int  # the power-off status (main's return value)
    stdout: bytes
    stderr: bytes
    seconds: float  # wall-clock time of the emu_start, boot to power-off
    hypercalls: dict[int, int] = field(default_factory=dict)  # number -> count


class RawSdkGuest:
    """One boot of a C guest image on a bare Unicorn (see the module docstring)."""

    def __init__(
        self,
        image: Path,
        memory: int,
        cmdline: str,
        tcg_buffer: int = DEFAULT_TCG_BUFFER,
        *,
        block_exits: bool = False,
    ) -> None:
        self.image = read_image(image)
        self.layout = plan(memory)
        self.memory = GuestMemory(self.layout.memory_size)
        view = self.memory.view
        load_image(self.image, view, self.layout)
        build_pagetables(view, self.layout)
        write_boot_info(view, self.layout, 1, cmdline.encode())
        write_descriptors(view, self.layout.device_page, [DEV_TYPE_CONSOLE])
        self.console = self.layout.device_page
        uc = Uc(UC_ARCH_X86, UC_MODE_32)
        if tcg_buffer:
            uc.ctl_set_tcg_buffer_size(tcg_buffer)
        if block_exits:
            _unicorn.set_no_exit_request(uc, True)
        uc.mem_map_ptr(0, self.layout.memory_size, UC_PROT_ALL, self.memory.address)
        hostpages.map_into(uc)
        uc.reg_write(r.UC_X86_REG_CR3, self.layout.pgdir)
        uc.reg_write(r.UC_X86_REG_CR4, uc.reg_read(r.UC_X86_REG_CR4) | CR4_PSE | _CR4_SSE)
        uc.reg_write(r.UC_X86_REG_FPCW, _FCW_RESET)
        uc.reg_write(r.UC_X86_REG_FPTAG, 0xFFFF)
        uc.reg_write(r.UC_X86_REG_MXCSR, _MXCSR_RESET)
        uc.reg_write(r.UC_X86_REG_CR0, uc.reg_read(r.UC_X86_REG_CR0) | CR0_PE)
        hostpages.load_boot_segments(uc)  # before paging, as setup_regs does
        uc.reg_write(r.UC_X86_REG_CR0, uc.reg_read(r.UC_X86_REG_CR0) | CR0_PG)
        uc.reg_write(r.UC_X86_REG_EFLAGS, 0x202)
        uc.reg_write(r.UC_X86_REG_ESI, 0)
        self.uc: Any = uc
        self.tsc_khz = timers.tsc_khz()
        self._data: int | None = None
        self._out: dict[int, bytearray] = {0: bytearray(), 1: bytearray()}
        self._status: int | None = None
        self._error: str | None = None
        self._counts: dict[int, int] = {}
        self._idt: dict[int, tuple[int, int]] = {}  # vector -> (handler, code selector)
        self._hook = uc.hook_add(UC_HOOK_INTR, self._on_interrupt)

    # -- the Host's side, minimal ----------------------------------------------------------
    def _u32(self, address: int) -> int:
        value: int = _U32.unpack_from(self.memory.view, address)[0]
        return value

    def _put_u32(self, address: int, value: int) -> None:
        _U32.pack_into(self.memory.view, address, value & 0xFFFFFFFF)

    def _write_time(self) -> None:
        if self._data is not None:
            sec, nsec = divmod(time.time_ns(), 1_000_000_000)
            self._put_u32(self._data + LGUEST_DATA_TIME, sec)
            self._put_u32(self._data + LGUEST_DATA_TIME + 4, nsec)

    def _stop(self, uc: Any, error: str | None = None) -> None:
        if error is not None and self._error is None:
            self._error = error
        uc.emu_stop()

    def _on_interrupt(self, uc: Any, vector: int, _data: object) -> None:
        if vector == SYSCALL_VECTOR and vector in self._idt:
            self._reflect(uc, self._idt[vector])
            return
        if vector != HYPERCALL_VECTOR:
            eip = uc.reg_read(r.UC_X86_REG_EIP)
            self._stop(uc, f"trap {vector} at eip {eip:#x} (the raw runner reflects only 0x80)")
            return
        call = uc.reg_read(r.UC_X86_REG_EAX)
        a1 = uc.reg_read(r.UC_X86_REG_EDX)
        a2 = uc.reg_read(r.UC_X86_REG_EBX)
        a3 = uc.reg_read(r.UC_X86_REG_ECX)
        self._counts[call] = self._counts.get(call, 0) + 1
        if call in _NOTHING_TO_DO:
            return
        if call == LHCALL_LOAD_IDT_ENTRY:
            self._idt[a1] = (a2 & 0xFFFF) | (a3 & 0xFFFF0000), a2 >> 16
        elif call in _FLUSH:  # a cr3 write drops the cached translations, as the Host's does
            uc.reg_write(r.UC_X86_REG_CR3, uc.reg_read(r.UC_X86_REG_CR3))
        elif call == LHCALL_NOTIFY:
            if a1 != self.console:
                self._stop(uc, f"notify of {a1:#x}: the raw runner has only a console")
                return
            stream = self._u32(a1 + _OUT_STREAM)
            address, length = self._u32(a1 + _OUT_ADDR), self._u32(a1 + _OUT_LEN)
            self._out[1 if stream else 0] += self.memory.read(address, length)
            self._put_u32(a1 + _OUT_LEN, 0)
            self._write_time()
        elif call == LHCALL_LOAD_GDT:
            uc.reg_write(r.UC_X86_REG_GDTR, (0, a1, a2 * 8 - 1, 0))
        elif call == LHCALL_LGUEST_INIT:
            self._data = a1
            self._put_u32(a1 + LGUEST_DATA_RESERVE_MEM, SWITCHER_RESERVE)
            self._put_u32(a1 + LGUEST_DATA_TSC_KHZ, self.tsc_khz)
            self._put_u32(a1 + LGUEST_DATA_PGDIR, self.layout.pgdir)
            self._write_time()
        elif call == LHCALL_SHUTDOWN:
            if a2 == LGUEST_SHUTDOWN_POWEROFF:
                self._status = a3
                self._stop(uc)
            else:
                reason = self.memory.read(a1, 200).split(b"\0")[0].decode(errors="replace")
                self._stop(uc, f"guest crashed: {reason}")
        else:
            self._stop(uc, f"hypercall {call} is not served by the raw runner")

    def _reflect(self, uc: Any, gate: tuple[int, int]) -> None:
        """Enter a trap gate from the same privilege level, as the CPU does: push eflags,
        cs and the return eip (the instruction after ``int``) on the current stack."""
        handler, selector = gate
        esp = uc.reg_read(r.UC_X86_REG_ESP) - 12
        frame = struct.pack(
            "<3I",
            uc.reg_read(r.UC_X86_REG_EIP),
            uc.reg_read(r.UC_X86_REG_CS),
            uc.reg_read(r.UC_X86_REG_EFLAGS),
        )
        self.memory.write(esp, frame)  # the low mapping: virtual == physical
        uc.reg_write(r.UC_X86_REG_ESP, esp)
        if selector != uc.reg_read(r.UC_X86_REG_CS):
            uc.reg_write(r.UC_X86_REG_CS, selector)
        uc.reg_write(r.UC_X86_REG_EIP, handler)

    # -- running --------------------------------------------------------------------------
    def run(self) -> RawRun:
        """Boot the image and run it to power-off (once per instance)."""
        t0 = time.perf_counter()
        self.uc.emu_start(self.image.entry, NEVER)
        seconds = time.perf_counter() - t0
        if self._error is not None:
            raise RawGuestError(self._error)
        if self._status is None:
            eip = self.uc.reg_read(r.UC_X86_REG_EIP)
            raise RawGuestError(f"emulation ended without a power-off (eip {eip:#x})")
        return RawRun(
            self._status, bytes(self._out[0]), bytes(self._out[1]), seconds, dict(self._counts)
        )

    def close(self) -> None:
        self.uc = None
        self.memory.close()
