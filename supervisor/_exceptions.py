"""Work around Unicorn forgetting that an exception was handled (unicorn issue #1883).

QEMU remembers the last exception raised (``old_exception``) so that a second
fault while delivering the first becomes a double fault; it forgets it only
when QEMU itself delivers the exception.  Unicorn hands exceptions to our
``UC_HOOK_INTR`` hook instead, so it never forgets: the guest's *next*
divide error or page fault is reported as a double fault (8).  The Host
delivers every exception itself, so after each one it resets that field.

The field's place in Unicorn's saved context is found once, by experiment, when
this module is imported; :data:`AVAILABLE` says whether that worked.
"""

from __future__ import annotations

import ctypes
from typing import Any

from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, Uc

_UNSET = b"\xff\xff\xff\xff"
# Vectors after which QEMU remembers an exception (contributory ones, page fault).
REMEMBERED = frozenset({0, 8, 10, 11, 12, 13, 14})


def _find_offset() -> int | None:
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.mem_map(0, 0x2000)
    uc.mem_write(0x1000, bytes.fromhex("31c9f7f1"))  # xor ecx, ecx; div ecx

    def stop(uc: Any, _vector: int, _data: object) -> None:
        uc.emu_stop()

    uc.hook_add(UC_HOOK_INTR, stop)
    before = bytes(uc.context_save())
    uc.emu_start(0x1000, 0x1004)
    after = bytes(uc.context_save())
    found = [
        i
        for i in range(0, len(before) - 3, 4)
        if before[i : i + 4] == _UNSET and after[i : i + 4] == b"\0\0\0\0"
    ]
    return found[0] if len(found) == 1 else None


_OFFSET = _find_offset()
AVAILABLE = _OFFSET is not None


def forget_exception(uc: Any) -> None:
    """Tell Unicorn the last exception was delivered (executor thread, between runs)."""
    if _OFFSET is None:
        return
    context = uc.context_save()
    address = ctypes.cast(context.context, ctypes.c_void_p).value
    assert address is not None
    ctypes.memmove(address + _OFFSET, _UNSET, len(_UNSET))
    uc.context_restore(context)
