"""The lguest interface as numbers: requests, hypercalls, lguest_data offsets.

Numbers are those of Linux 2.6.25's lguest.  Words written to and read from the
device are host ``unsigned long`` (struct format ``"L"``, native size and order).
Guest-side structures (``lguest_data``, gate descriptors) are 32-bit little endian.
"""

from __future__ import annotations

import struct
from typing import Final

# --- Requests a Launcher writes (enum lguest_req) -------------------------------
LHREQ_INITIALIZE: Final = 0
LHREQ_GETDMA: Final = 1  # retired: rejected like any unknown request
LHREQ_IRQ: Final = 2
LHREQ_BREAK: Final = 3

WORD: Final = struct.Struct("L")
WORD_SIZE: Final = WORD.size


def pack_words(*words: int) -> bytes:
    """Pack integers as native ``unsigned long`` words, as a Launcher writes them.

    Raises ``struct.error`` for a value that does not fit an unsigned long.
    """
    return struct.pack(f"{len(words)}L", *words)


def unpack_words(data: bytes | bytearray | memoryview) -> tuple[int, ...]:
    """Unpack as many whole native words as ``data`` holds (a trailing part is ignored)."""
    n = len(data) // WORD_SIZE
    return struct.unpack_from(f"{n}L", data)


# --- Hypercalls (guest: int $0x1f, eax = number, edx/ebx/ecx = arguments) --------
LGUEST_TRAP_ENTRY: Final = 0x1F

LHCALL_FLUSH_ASYNC: Final = 0
LHCALL_LGUEST_INIT: Final = 1
LHCALL_SHUTDOWN: Final = 2
LHCALL_LOAD_GDT: Final = 3
LHCALL_NEW_PGTABLE: Final = 4
LHCALL_FLUSH_TLB: Final = 5
LHCALL_LOAD_IDT_ENTRY: Final = 6
LHCALL_SET_STACK: Final = 7
LHCALL_TS: Final = 8
LHCALL_SET_CLOCKEVENT: Final = 9
LHCALL_HALT: Final = 10
LHCALL_SET_PTE: Final = 14
LHCALL_SET_PMD: Final = 15
LHCALL_LOAD_TLS: Final = 16
LHCALL_NOTIFY: Final = 17
# Extensions of lguest's ABI (lguest never finished SMP): numbers from 64 on.
LHCALL_START_CPU: Final = 64  # edx: cpu, ebx: eip, ecx: esp; eax <- 0 or -errno
LHCALL_SEND_IPI: Final = 65  # edx: cpu, ebx: irq; eax <- 0 or -errno
MAX_CPUS: Final = 16  # CPUs one guest may have (INITIALIZE's optional fifth word)

LGUEST_SHUTDOWN_POWEROFF: Final = 1
LGUEST_SHUTDOWN_RESTART: Final = 2

LG_CLOCK_MIN_DELTA: Final = 100  # nanoseconds

# --- Interrupts ------------------------------------------------------------------
LGUEST_IRQS: Final = 32
FIRST_EXTERNAL_VECTOR: Final = 32
IDT_ENTRIES: Final = 256
SYSCALL_VECTOR: Final = 0x80
X86_EFLAGS_IF: Final = 0x200
GDT_ENTRIES: Final = 32
TLS_ENTRIES: Final = 3
GUEST_PL: Final = 0  # our guests run at ring 0 (real lguest: ring 1)
# lguest's segments (Linux i386 GDT entries 12 and 13), which the Host's boot GDT holds.
GDT_ENTRY_KERNEL_CS: Final = 12
GDT_ENTRY_KERNEL_DS: Final = 13
KERNEL_CS: Final = GDT_ENTRY_KERNEL_CS * 8 | GUEST_PL  # 0x60 (lguest: 0x61, ring 1)
KERNEL_DS: Final = GDT_ENTRY_KERNEL_DS * 8 | GUEST_PL  # 0x68 (lguest: 0x69)
# The top 4 MiB of every guest's virtual address space belong to the Host (lguest's
# Switcher): it maps its read-only pages there (supervisor.hostpages) and tells the
# guest so in lguest_data.reserve_mem.
SWITCHER_ADDR: Final = 0xFFC00000
SWITCHER_PGD_INDEX: Final = SWITCHER_ADDR >> 22  # 1023: the page-directory entry it uses
# What the Host writes into that entry: its page table; present, accessed, read-only,
# supervisor (so the MMU's page walker never writes it).
SWITCHER_PDE: Final = SWITCHER_ADDR | 0x21
SWITCHER_RESERVE: Final = 0x100000000 - SWITCHER_ADDR  # 4 MiB

# --- struct lguest_data (32-bit guest layout) --------------------------------------
LHCALL_RING_SIZE: Final = 64
LGUEST_DATA_IRQ_ENABLED: Final = 0
LGUEST_DATA_BLOCKED_INTERRUPTS: Final = 4
LGUEST_DATA_CR2: Final = 8
LGUEST_DATA_TIME: Final = 12
LGUEST_DATA_HCALL_STATUS: Final = 20
LGUEST_DATA_HCALLS: Final = 84
HCALL_ARGS_SIZE: Final = 16
LGUEST_DATA_RESERVE_MEM: Final = 1108
LGUEST_DATA_TSC_KHZ: Final = 1112
LGUEST_DATA_PGDIR: Final = 1116
LGUEST_DATA_NOIRQ_START: Final = 1120
LGUEST_DATA_NOIRQ_END: Final = 1124
LGUEST_DATA_KERNEL_ADDRESS: Final = 1128
LGUEST_DATA_SYSCALL_VEC: Final = 1132
LGUEST_DATA_SIZE: Final = 1136

HCALL_FREE: Final = 0xFF

PAGE_SIZE: Final = 4096
PAGE_SHIFT: Final = 12

HYPERCALL_NAMES: Final[dict[int, str]] = {
    LHCALL_FLUSH_ASYNC: "FLUSH_ASYNC",
    LHCALL_LGUEST_INIT: "LGUEST_INIT",
    LHCALL_SHUTDOWN: "SHUTDOWN",
    LHCALL_LOAD_GDT: "LOAD_GDT",
    LHCALL_NEW_PGTABLE: "NEW_PGTABLE",
    LHCALL_FLUSH_TLB: "FLUSH_TLB",
    LHCALL_LOAD_IDT_ENTRY: "LOAD_IDT_ENTRY",
    LHCALL_SET_STACK: "SET_STACK",
    LHCALL_TS: "TS",
    LHCALL_SET_CLOCKEVENT: "SET_CLOCKEVENT",
    LHCALL_HALT: "HALT",
    LHCALL_SET_PTE: "SET_PTE",
    LHCALL_SET_PMD: "SET_PMD",
    LHCALL_LOAD_TLS: "LOAD_TLS",
    LHCALL_NOTIFY: "NOTIFY",
    LHCALL_START_CPU: "START_CPU",
    LHCALL_SEND_IPI: "SEND_IPI",
}
