"""The page-fault error code Unicorn computed (present, write, user bits), as hardware pushes it.

QEMU keeps the error code of the exception it raised in ``CPUX86State.error_code``;
Unicorn hands the page fault to our interrupt hook without saying it.  The
field's place in Unicorn's saved context is found once, by experiment, when this
module is imported (three faults whose codes differ: read of a page not
present = 0, write to it = 2, write to a present read-only page with CR0.WP = 3).
:data:`AVAILABLE` says whether that worked.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, Uc, UcError
from unicorn import x86_const as r

_CR0_PE_PG_WP = 1 | (1 << 31) | (1 << 16)


def _fault_context(code: bytes) -> bytes:
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.ctl_set_tcg_buffer_size(1 << 20)
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, struct.pack("<I", 0x2000 | 7))  # page directory: one table
    table = [0] * 1024
    table[3] = 0x3000 | 3  # code: present, writable
    table[5] = 0x5000 | 1  # present, read-only; page 4 is not present
    uc.mem_write(0x2000, struct.pack("<1024I", *table))
    uc.mem_write(0x3000, code)
    uc.reg_write(r.UC_X86_REG_CR3, 0x1000)
    uc.reg_write(r.UC_X86_REG_CR0, _CR0_PE_PG_WP)
    seen: list[bytes] = []

    def on_intr(uc: Any, vector: int, _data: object) -> None:
        if vector == 14 and not seen:
            seen.append(bytes(uc.context_save()))
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, on_intr)
    with contextlib.suppress(UcError):  # the fault ends emulation
        uc.emu_start(0x3000, 0x3000 + len(code))
    return seen[0] if seen else b""


def _find_offset() -> int | None:
    try:
        read_np = _fault_context(bytes.fromhex("a100400000"))  # mov eax, [0x4000]
        write_np = _fault_context(bytes.fromhex("a300400000"))  # mov [0x4000], eax
        write_ro = _fault_context(bytes.fromhex("a300500000"))  # mov [0x5000], eax
    except UcError:
        return None
    size = min(len(read_np), len(write_np), len(write_ro))
    found = [
        i
        for i in range(0, size - 3, 4)
        if read_np[i : i + 4] == b"\0\0\0\0"
        and write_np[i : i + 4] == b"\2\0\0\0"
        and write_ro[i : i + 4] == b"\3\0\0\0"
    ]
    return found[0] if len(found) == 1 else None


_OFFSET = _find_offset()
AVAILABLE = _OFFSET is not None


def page_fault_error_code(uc: Any) -> int | None:
    """The error code of the page fault just reported, or None if unknown."""
    if _OFFSET is None:
        return None
    context = bytes(uc.context_save())
    code: int = struct.unpack_from("<I", context, _OFFSET)[0]
    return code & 0x1F
