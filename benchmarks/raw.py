"""The baseline: the same image in a bare Unicorn instance, no supervisor.

The raw CPU gets the same mapping as a supervised guest (guest memory mapped at
0 with ``mem_map_ptr``, paging on with the Launcher's page tables, flat
segments, the same stack) and the same translation-buffer size as the device,
so the only difference left is the supervisor: the block hook, the slices, the
executor, the event loop and the device protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, UC_PROT_ALL, Uc
from unicorn import x86_const as r

from supervisor.cpu import CR0_PE, CR0_PG, CR4_PSE, DEFAULT_TCG_BUFFER
from supervisor.memory import GuestMemory

from .guests import Image, Layout, load

NEVER = 1 << 32  # an eip the guest never reaches: emu_start runs until stopped


class RawCpu:
    """A bare Unicorn CPU over a loaded image."""

    def __init__(
        self,
        image: Image,
        ram_size: int = 1 << 20,
        tcg_buffer: int = DEFAULT_TCG_BUFFER,
        memory: tuple[GuestMemory, Layout] | None = None,
    ) -> None:
        self.image = image
        self.memory, self.layout = memory or load(image, ram_size)
        uc = Uc(UC_ARCH_X86, UC_MODE_32)
        if tcg_buffer:
            uc.ctl_set_tcg_buffer_size(tcg_buffer)
        uc.mem_map_ptr(0, self.layout.pfn_limit * 4096, UC_PROT_ALL, self.memory.address)
        uc.reg_write(r.UC_X86_REG_CR3, self.layout.pgdir)
        uc.reg_write(r.UC_X86_REG_CR4, uc.reg_read(r.UC_X86_REG_CR4) | CR4_PSE)
        uc.reg_write(r.UC_X86_REG_CR0, uc.reg_read(r.UC_X86_REG_CR0) | CR0_PE | CR0_PG)
        uc.reg_write(r.UC_X86_REG_EFLAGS, 0x202)
        uc.reg_write(r.UC_X86_REG_ESP, image.symbols["stack_top"])
        self.uc = uc
        self._hooks: list[Any] = []

    def sym(self, name: str) -> int:
        return self.image.symbols[name]

    def u32(self, name: str) -> int:
        return int.from_bytes(self.memory.read(self.sym(name), 4), "little")

    def set_u32(self, name: str, value: int) -> None:
        self.memory.write(self.sym(name), value.to_bytes(4, "little"))

    def on_interrupt(self, fn: Callable[[Any, int, object], None]) -> None:
        self._hooks.append(self.uc.hook_add(UC_HOOK_INTR, fn))

    def stop_on_interrupt(self) -> None:
        """A Python UC_HOOK_INTR hook that ends emu_start (the bare "exit to the host")."""

        def hook(uc: Any, _vector: int, _data: object) -> None:
            uc.emu_stop()

        self.on_interrupt(hook)

    def run(self, start: str | int, until: str | int = NEVER, **kw: Any) -> None:
        begin = self.sym(start) if isinstance(start, str) else start
        end = self.sym(until) if isinstance(until, str) else until
        self.uc.emu_start(begin, end, **kw)

    def resume(self, **kw: Any) -> None:
        self.uc.emu_start(self.uc.reg_read(r.UC_X86_REG_EIP), NEVER, **kw)

    @property
    def eip(self) -> int:
        value: int = self.uc.reg_read(r.UC_X86_REG_EIP)
        return value

    def close(self) -> None:
        self._hooks.clear()
        self.uc = None
        with contextlib.suppress(BufferError):
            self.memory.close()
