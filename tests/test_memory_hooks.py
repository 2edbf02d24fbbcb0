"""No memory hook covers guest memory; the bad-access hook still sees every bad address.

Unicorn keeps every store to a page on its slow path (``notdirty_write`` on each
store) while any ``UC_HOOK_MEM_*`` hook's range covers the page, so the CPU's
hooks must leave guest-physical ``[0, limit)`` out.  The bad-access hook covers
exactly what lies past it: a store to the first byte past guest memory is still
reported as a bad page, and one to the last page of guest memory is not.
"""

from __future__ import annotations

import asyncio
import ctypes
from typing import Any

import pytest
from guestasm import assemble, boot, load, run_to_end
from unicorn import unicorn_const as uc_const
from unicorn.unicorn_py3.unicorn import uclib

from supervisor import LguestDevice, abi
from supervisor.cpu import MAX_PHYSICAL

# The subject is Unicorn's hooks over guest memory, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

LIMIT = 30.0
RAM = 1 << 20
# Every UC_HOOK_MEM_* kind: unmapped, protection, read/write/fetch, read-after.
MEMORY_HOOKS = sum(
    getattr(uc_const, name) for name in dir(uc_const) if name.startswith("UC_HOOK_MEM_")
)


def _value(arg: Any) -> int:
    return int(arg.value) if isinstance(arg, ctypes.c_uint64) else int(arg)


async def test_no_memory_hook_covers_guest_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    added: list[tuple[int, int, int]] = []
    original = uclib.uc_hook_add

    def record(*args: Any) -> Any:
        added.append((int(args[2]), _value(args[5]), _value(args[6])))
        return original(*args)

    monkeypatch.setattr(uclib, "uc_hook_add", record)
    body = 'main:\n LGUEST_INIT\n HCALL 2, msg, 3, 0\n.data\nmsg: .asciz "hooked"\n'
    async with LguestDevice() as dev, asyncio.timeout(LIMIT):
        g = await boot(dev, assemble(body), ram_size=RAM)
        assert await run_to_end(g) == "CRASH: hooked"
        await g.file.close()
        g.memory.close()
    limit = g.layout.pfn_limit * abi.PAGE_SIZE
    memory = [(kind, begin, end) for kind, begin, end in added if kind & MEMORY_HOOKS]
    assert memory, "the bad-access hook was not installed"
    assert all((begin, end) == (limit, MAX_PHYSICAL) for _k, begin, end in memory), memory


def _store_through_alias(page: int) -> str:
    """A guest whose own page-table entry for virtual 0x3000 names physical ``page``; it
    stores there, then crashes with "stored" if it is still running."""
    return (
        "main:\n LGUEST_INIT\n"
        " mov 0x14, %eax\n"  # the boot info's free_end: the page directory
        f" movl ${page | 7:#x}, 0x100c(%eax)\n"  # first page table, entry 3
        " mov %cr3, %eax\n mov %eax, %cr3\n"
        " movl $0x5a5a5a5a, 0x3000\n"
        " HCALL 2, msg, 3, 0\n"
        '.data\nmsg: .asciz "stored"\n'
    )


@pytest.mark.parametrize("past", [False, True])
async def test_the_bad_access_hook_starts_at_the_end_of_guest_memory(past: bool) -> None:
    memory, layout = load(assemble("main:\n LGUEST_INIT\n"), RAM)
    memory.close()
    limit = layout.pfn_limit * abi.PAGE_SIZE
    async with LguestDevice() as dev, asyncio.timeout(LIMIT):
        page = limit if past else limit - abi.PAGE_SIZE
        g = await boot(dev, assemble(_store_through_alias(page)), ram_size=RAM)
        got = await run_to_end(g)
        if past:
            assert got.startswith(f"bad page: write at {limit:#x} outside guest memory"), got
        else:
            assert got == "CRASH: stored", got
            assert g.memory.read(page, 4) == b"\x5a" * 4
        await g.file.close()
        g.memory.close()
