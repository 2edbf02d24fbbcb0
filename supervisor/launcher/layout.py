"""Guest-physical layout the Launcher builds: boot info, image, page tables, devices.

::

    0x00000  boot info page (struct below; esi points here; the environment at
             0x100, the command line at 0x800)
    0x10000  flat image (ELF images go where their headers say)
    ...      free for the guest
    free_end page directory and page tables (mapping everything at 0 and 0xC0000000,
             below the Host's top 4 MiB; entries present, writable, user,
             accessed and dirty)
    ram_size device page: device descriptors (see docs/abi.md)

All fields are 32-bit little endian.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ..abi import PAGE_SIZE, SWITCHER_PDE, SWITCHER_PGD_INDEX

BOOT_INFO_MAGIC = 0x5453474C  # "LGST"
BOOT_INFO_VERSION = 1
# magic version ram_size device_page count free_end cmdline len cpus env env_len
BOOT_INFO = struct.Struct("<11I")
ENV_ADDR = 0x100  # inside the boot info page: NAME=VALUE strings, each ending in NUL
ENV_MAX = 0x800 - ENV_ADDR
CMDLINE_ADDR = 0x800  # inside the boot info page
CMDLINE_MAX = PAGE_SIZE - CMDLINE_ADDR
IMAGE_BASE = 0x10000
PAGE_OFFSET = 0xC0000000
MAX_TOTAL = PAGE_OFFSET  # the low mapping must stay below the high one
# present, writable, user, accessed, dirty: with accessed and dirty already set the MMU's
# page walker never writes the boot page tables, so they stay shared between the guests
# that map one boot template (copy-on-write) until a guest changes an entry itself.
PTE_FLAGS = 0x67
DEVICE_PAGES = 1
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class Layout:
    """Where things are in one guest's memory."""

    ram_size: int
    pgdir: int  # == free_end
    device_page: int
    pfn_limit: int

    @property
    def memory_size(self) -> int:
        """Bytes of Launcher memory the guest needs: RAM plus the device page(s)."""
        return self.pfn_limit * PAGE_SIZE

    def reserved(self) -> list[tuple[int, int, str]]:
        """Guest-physical ranges ``[start, end)`` an image may not overlap, with their names."""
        return [
            (0, PAGE_SIZE, "the boot info page"),
            (self.pgdir, self.ram_size, "the page tables"),
            (self.device_page, self.memory_size, "the device page"),
        ]


@functools.lru_cache(maxsize=64)
def plan(ram_size: int) -> Layout:
    """Place page tables at the top of RAM and the device page just above it (one
    Layout, which is frozen, per size: every guest of a size shares it).

    Raises ``ValueError`` if ``ram_size`` is not a page multiple, too small, or
    so large that RAM would reach the kernel mapping at ``PAGE_OFFSET``.
    """
    if ram_size % PAGE_SIZE:
        raise ValueError(f"memory size {ram_size} is not a multiple of {PAGE_SIZE}")
    total = ram_size + DEVICE_PAGES * PAGE_SIZE
    if total > MAX_TOTAL:
        raise ValueError(f"memory size {ram_size} is too large for a guest")
    tables = -(-total // (1024 * PAGE_SIZE))
    pgdir = ram_size - (tables + 1) * PAGE_SIZE
    if pgdir < IMAGE_BASE + PAGE_SIZE:
        raise ValueError(f"memory size {ram_size} is too small for a guest")
    return Layout(ram_size, pgdir, ram_size, total // PAGE_SIZE)


def build_pagetables(ram: memoryview, layout: Layout) -> None:
    """Map every guest-physical page linearly at virtual 0 and at PAGE_OFFSET.

    The high mapping stops below the Host's top 4 MiB (page-directory entry 1023,
    ``abi.SWITCHER_ADDR``), so it covers at most 1 GiB - 4 MiB.  Entry 1023 gets what
    the Host writes there at ``LHREQ_INITIALIZE`` (``abi.SWITCHER_PDE``), so that
    write changes nothing and the directory's page is never written.
    """
    _U32.pack_into(ram, layout.pgdir + 4 * SWITCHER_PGD_INDEX, SWITCHER_PDE)
    pages = layout.pfn_limit
    tables = -(-pages // 1024)
    first_table = layout.pgdir + PAGE_SIZE
    for t in range(tables):
        table = first_table + t * PAGE_SIZE
        entry = table | PTE_FLAGS
        _U32.pack_into(ram, layout.pgdir + 4 * t, entry)
        if (PAGE_OFFSET >> 22) + t < SWITCHER_PGD_INDEX:
            _U32.pack_into(ram, layout.pgdir + 4 * ((PAGE_OFFSET >> 22) + t), entry)
        count = min(1024, pages - t * 1024)
        ptes = struct.pack(
            f"<{count}I", *(((t * 1024 + i) << 12) | PTE_FLAGS for i in range(count))
        )
        ram[table : table + len(ptes)] = ptes


def env_block(env: Mapping[str, str]) -> bytes:
    """The environment as the boot info page carries it: ``NAME=VALUE`` strings in
    order, each ending in NUL.  ``ValueError`` for a name that is empty or holds ``=``
    or NUL, a value with a NUL, or more than ``ENV_MAX`` bytes in all."""
    parts = []
    for name, value in env.items():
        if not name or "=" in name or "\0" in name:
            raise ValueError(f"bad environment variable name {name!r}")
        if "\0" in value:
            raise ValueError(f"environment variable {name} holds a NUL")
        parts.append(f"{name}={value}".encode() + b"\0")
    block = b"".join(parts)
    if len(block) > ENV_MAX:
        raise ValueError(f"environment of {len(block)} bytes, more than the {ENV_MAX} allowed")
    return block


def write_boot_info(
    ram: memoryview,
    layout: Layout,
    devices: int,
    cmdline: bytes,
    cpus: int = 1,
    env: bytes = b"",
) -> None:
    """Fill the boot information page at guest-physical 0 (``cpus``: how many CPUs
    the guest has, an extension at offset 32 that older guests never read; ``env``:
    an :func:`env_block`, at offset 36 and 40, likewise).

    Raises ``ValueError`` if ``cmdline`` or ``env`` does not fit in the page.
    """
    if len(cmdline) >= CMDLINE_MAX:
        raise ValueError(f"command line longer than {CMDLINE_MAX - 1} bytes")
    if len(env) > ENV_MAX:
        raise ValueError(f"environment longer than {ENV_MAX} bytes")
    BOOT_INFO.pack_into(
        ram,
        0,
        BOOT_INFO_MAGIC,
        BOOT_INFO_VERSION,
        layout.ram_size,
        layout.device_page,
        devices,
        layout.pgdir,
        CMDLINE_ADDR if cmdline else 0,
        len(cmdline),
        cpus,
        ENV_ADDR if env else 0,
        len(env),
    )
    ram[CMDLINE_ADDR : CMDLINE_ADDR + len(cmdline)] = cmdline
    ram[ENV_ADDR : ENV_ADDR + len(env)] = env
