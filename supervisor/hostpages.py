"""The Host's pages in every guest: lguest's boot segments, in a GDT the guest cannot write.

Real lguest maps its Switcher into the top 4 MiB of every guest's address space;
the GDT there holds the guest's kernel code and data segments, which the guest's
first registers already use (``lguest_arch_setup_regs``).  Here the same top
4 MiB (``abi.SWITCHER_ADDR``, page-directory entry 1023) hold two Host pages,
mapped at the same guest-virtual and guest-physical addresses, read-only:

* ``PAGE_TABLE`` (0xFFC00000): the page table behind page-directory entry 1023;
  it maps itself and the GDT page, and nothing else;
* ``BOOT_GDT`` (0xFFC01000): ``GDT_ENTRIES`` descriptors, all null but
  ``KERNEL_CS`` (0x60, flat code) and ``KERNEL_DS`` (0x68, flat data), both ring 0.

The pages are one process-wide block of Host memory, ``mprotect``-ed read-only
and mapped into every Unicorn instance with ``UC_PROT_READ``: a guest store or
instruction fetch there stops emulation with a protection fault and kills only
that guest (supervisor.execute), and no guest can change what another sees.

Invariant: every 32-bit word of the pages that the MMU could take for a present
page-table entry (bit 0 set) already has its accessed and dirty bits set.  The
page walker sets those bits by writing physical memory directly, past Unicorn's
protection; with them set it never writes, whatever a guest points its ``cr3``
or its own entries at.  Descriptors are stored with their accessed bit set for
the same reason (loading a segment would otherwise write it).

The Host keeps entry 1023 in every page directory it is told about: the one
given at INITIALIZE, each ``NEW_PGTABLE``, and a ``SET_PMD`` of that entry
(supervisor.pagetables).  A guest that overwrites the entry by itself, or loads
``cr3`` without telling, only loses the mapping for itself.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Any, Final

from unicorn import UC_PROT_READ
from unicorn import x86_const as r

from .abi import (
    GDT_ENTRIES,
    GDT_ENTRY_KERNEL_CS,
    GDT_ENTRY_KERNEL_DS,
    KERNEL_CS,
    KERNEL_DS,
    PAGE_SIZE,
    SWITCHER_ADDR,
    SWITCHER_PDE,
    SWITCHER_PGD_INDEX,
)

PAGE_TABLE: Final = SWITCHER_ADDR
BOOT_GDT: Final = SWITCHER_ADDR + PAGE_SIZE
SIZE: Final = 2 * PAGE_SIZE
END: Final = SWITCHER_ADDR + SIZE
BOOT_GDT_LIMIT: Final = GDT_ENTRIES * 8 - 1

_U32 = struct.Struct("<I")
_PRESENT, _ACCESSED, _DIRTY = 0x01, 0x20, 0x40
# Present, accessed (and dirty), not writable, not user: the walker never writes these.
PDE: Final = SWITCHER_PDE
assert PDE == PAGE_TABLE | _PRESENT | _ACCESSED
_PTE_FLAGS = _PRESENT | _ACCESSED | _DIRTY

# Flat 4 GiB segments, ring 0, accessed bit set: code execute/read, data read/write.
FLAT_CODE: Final = 0x00CF9B000000FFFF
FLAT_DATA: Final = 0x00CF93000000FFFF


def _contents() -> bytes:
    pages = bytearray(SIZE)
    struct.pack_into("<2I", pages, 0, PAGE_TABLE | _PTE_FLAGS, BOOT_GDT | _PTE_FLAGS)
    struct.pack_into("<Q", pages, PAGE_SIZE + 8 * GDT_ENTRY_KERNEL_CS, FLAT_CODE)
    struct.pack_into("<Q", pages, PAGE_SIZE + 8 * GDT_ENTRY_KERNEL_DS, FLAT_DATA)
    for (word,) in struct.iter_unpack("<I", pages):  # the invariant above
        assert not word & _PRESENT or word & (_ACCESSED | _DIRTY) == _ACCESSED | _DIRTY
    return bytes(pages)


CONTENTS: Final = _contents()


def _read_only_block(data: bytes) -> tuple[mmap.mmap, int]:
    """An anonymous mapping holding ``data``, made read-only; and its address."""
    block = mmap.mmap(-1, len(data), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block[:] = data
    anchor = ctypes.c_char.from_buffer(block)
    address = ctypes.addressof(anchor)
    del anchor
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.mprotect(address, len(data), mmap.PROT_READ) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot make the Host's guest pages read-only: mprotect failed ({err})")
    return block, address


# Never written again, never unmapped: every Unicorn instance in the process maps it.
_BLOCK, _ADDRESS = _read_only_block(CONTENTS)


def map_into(uc: Any) -> None:
    """Map the Host's pages, read-only, into a new Unicorn instance (any thread)."""
    uc.mem_map_ptr(SWITCHER_ADDR, SIZE, UC_PROT_READ, _ADDRESS)


def install(ram: memoryview, pgdir: int) -> int:
    """Make entry 1023 of the page directory at guest-physical ``pgdir`` in ``ram``
    (the guest's memory; the page checked by the caller) point at the Host's page table.

    Returns the entry's guest-physical address: the caller tells the guest's CPUs the
    Host wrote there (``Lguest.host_wrote``), as for any Host write to guest memory.
    An entry that holds it already is not stored again: the page stays unwritten, so a
    directory shared copy-on-write (the Launcher's boot page tables) stays shared.
    """
    entry = pgdir + 4 * SWITCHER_PGD_INDEX
    if _U32.unpack_from(ram, entry)[0] != PDE:
        _U32.pack_into(ram, entry, PDE)
    return entry


def load_boot_segments(uc: Any) -> None:
    """GDTR at the boot GDT; ``cs`` = KERNEL_CS, ``ds``, ``es``, ``ss`` = KERNEL_DS.

    Only with paging off (``CR0.PG`` clear, ``CR0.PE`` set): Unicorn loads a
    segment register written from outside ``emu_start`` by reading the GDT, and
    that read crashes the process if it has to go through the MMU.  The GDT's
    virtual and physical addresses are the same, so GDTR stays right once paging
    is on.
    """
    uc.reg_write(r.UC_X86_REG_GDTR, (0, BOOT_GDT, BOOT_GDT_LIMIT, 0))
    uc.reg_write(r.UC_X86_REG_CS, KERNEL_CS)
    for reg in (r.UC_X86_REG_DS, r.UC_X86_REG_ES, r.UC_X86_REG_SS):
        uc.reg_write(reg, KERNEL_DS)


def contains(address: int) -> bool:
    """True if guest-physical ``address`` is one of the Host's pages."""
    return SWITCHER_ADDR <= address < END


def current() -> bytes:
    """The pages as they are now (tests: nothing ever changes them)."""
    return ctypes.string_at(_ADDRESS, SIZE)
