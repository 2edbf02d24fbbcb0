"""Fast access to a CPU's 32-bit registers through Unicorn's C API.

The binding's ``reg_read`` costs several microseconds a call (it looks up a
register class per call); the run loop reads eip on every guest entry and four
registers on every hypercall, so it goes through these preallocated ctypes
buffers instead.  Same threading contract as the CPU itself.
"""

from __future__ import annotations

import ctypes
from typing import Any

from unicorn import x86_const as r
from unicorn.unicorn_py3.unicorn import uclib

_MASK = 0xFFFFFFFF
_HYPERCALL_REGS = (r.UC_X86_REG_EAX, r.UC_X86_REG_EDX, r.UC_X86_REG_EBX, r.UC_X86_REG_ECX)
_read = uclib.uc_reg_read
_write = uclib.uc_reg_write
_read_batch = uclib.uc_reg_read_batch


class Registers:
    """Read and write one CPU's general, segment and control registers as ints."""

    def __init__(self, uc: Any) -> None:
        self._handle = uc._uch
        self._value = ctypes.c_uint64()
        self._ref = ctypes.byref(self._value)
        self._ids = (ctypes.c_int * 4)(*_HYPERCALL_REGS)
        self._values = (ctypes.c_uint64 * 4)()
        base = ctypes.addressof(self._values)
        self._pointers = (ctypes.c_void_p * 4)(*(base + 8 * i for i in range(4)))

    def read(self, reg: int) -> int:
        """The register's value (32 bits; segment selectors 16)."""
        self._value.value = 0
        _read(self._handle, reg, self._ref)
        return self._value.value & _MASK

    def write(self, reg: int, value: int) -> None:
        """Set a register; ``value`` is truncated to 32 bits."""
        self._value.value = value & _MASK
        _write(self._handle, reg, self._ref)

    def hypercall(self) -> tuple[int, int, int, int]:
        """eax, edx, ebx, ecx: a hypercall's number and its three arguments."""
        values = self._values
        for i in range(4):
            values[i] = 0
        _read_batch(self._handle, self._ids, self._pointers, 4)
        return (
            values[0] & _MASK,
            values[1] & _MASK,
            values[2] & _MASK,
            values[3] & _MASK,
        )
