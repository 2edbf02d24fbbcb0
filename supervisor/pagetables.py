"""Page tables: the guest's own two-level x86 tables, read where the Host needs them.

Unicorn's MMU walks the guest's tables directly (they play the part of lguest's
shadow tables), so the Host's job is to check what the guest hands it: a page
directory or page-table entry naming a page at or past ``pfn_limit`` kills the
guest, and translation for the Host's own accesses (pushing an interrupt frame)
is done here.  The top 4 MiB of virtual memory are the Host's (supervisor.hostpages):
the Host keeps its entry in every page directory it is told about.
"""

from __future__ import annotations

from unicorn import x86_const as r

from . import hostpages
from .abi import PAGE_SIZE, SWITCHER_ADDR, SWITCHER_PGD_INDEX
from .cpu import CR0_PG, CR4_PSE, LgCpu

PTE_PRESENT = 0x1
PTE_WRITE = 0x2
PTE_USER = 0x4
PTE_PSE = 0x80
CR4_SMEP = 1 << 20
PTRS_PER_TABLE = 1024


def pgdir_ok(cpu: LgCpu, pgdir: int) -> bool:
    """True if ``pgdir`` is a page-aligned page inside guest memory."""
    return pgdir % PAGE_SIZE == 0 and cpu.lg.address_ok(pgdir, PAGE_SIZE)


def guest_pa(
    cpu: LgCpu, vaddr: int, write: bool = False, control: tuple[int, int, int] | None = None
) -> int | None:
    """Translate a guest-virtual address, or None if the guest has no such mapping.

    ``control``: the CPU's (cr0, cr3, cr4) if the caller has just read them
    (:meth:`LgCpu.control`), for several walks in a row."""
    cr0, cr3, cr4 = cpu.control() if control is None else control
    if not cr0 & CR0_PG:
        return vaddr
    lg = cpu.lg
    pgdir = cr3 & ~0xFFF
    pde = lg.read_u32(pgdir + 4 * (vaddr >> 22))
    if pde is None or not pde & PTE_PRESENT:
        return None
    if pde & PTE_PSE and cr4 & CR4_PSE:
        if write and not pde & PTE_WRITE:
            return None
        return (pde & 0xFFC00000) | (vaddr & 0x3FFFFF)
    pte = lg.read_u32((pde & ~0xFFF) + 4 * ((vaddr >> 12) & 0x3FF))
    if pte is None or not pte & PTE_PRESENT:
        return None
    if write and not pte & PTE_WRITE:
        return None
    return (pte & ~0xFFF) | (vaddr & 0xFFF)


def fetchable(cpu: LgCpu, vaddr: int, control: tuple[int, int, int] | None = None) -> bool:
    """Whether the CPU in supervisor mode may run code at ``vaddr``: mapped, and not a
    user page while ``CR4.SMEP`` is set (x86-32 without PAE has no other no-execute
    bit).  ``control`` as for :func:`guest_pa`."""
    cr0, cr3, cr4 = cpu.control() if control is None else control
    if not cr0 & CR0_PG:
        return True
    lg = cpu.lg
    pde = lg.read_u32((cr3 & ~0xFFF) + 4 * (vaddr >> 22))
    if pde is None or not pde & PTE_PRESENT:
        return False
    user = pde & PTE_USER
    if not (pde & PTE_PSE and cr4 & CR4_PSE):
        pte = lg.read_u32((pde & ~0xFFF) + 4 * ((vaddr >> 12) & 0x3FF))
        if pte is None or not pte & PTE_PRESENT:
            return False
        user &= pte
    return not (user and cr4 & CR4_SMEP)


def check_entry(cpu: LgCpu, entry: int, big: bool = False) -> str | None:
    """The death reason for a present entry naming a page past the limit, else None."""
    if not entry & PTE_PRESENT:
        return None
    pfn = (entry & (0xFFC00000 if big else ~0xFFF)) >> 12
    if pfn >= cpu.lg.pfn_limit:
        return f"bad page {pfn}"
    return None


def new_pgtable(cpu: LgCpu, pgdir: int) -> None:
    """LHCALL_NEW_PGTABLE: switch to the tables at ``pgdir``."""
    if not pgdir_ok(cpu, pgdir):
        cpu.lg.kill(f"bad page directory {pgdir:#x}")
        return
    cpu.lg.host_wrote(hostpages.install(cpu.lg.ram, pgdir), 4)
    cpu.set_reg(r.UC_X86_REG_CR3, pgdir)


def set_pte(cpu: LgCpu, pgdir: int, vaddr: int, pte: int) -> None:
    """LHCALL_SET_PTE: the guest changed one page-table entry."""
    if not pgdir_ok(cpu, pgdir):
        cpu.lg.kill(f"bad page directory {pgdir:#x}")
        return
    if vaddr >= SWITCHER_ADDR:  # lguest's words: the Host's mapping is not the guest's
        cpu.lg.kill(f"attempt to access switcher pages (SET_PTE at {vaddr:#x})")
        return
    reason = check_entry(cpu, pte)
    if reason:
        cpu.lg.kill(reason)
        return
    cpu.flush_tlb()


def set_pmd(cpu: LgCpu, pgdir: int, index: int) -> None:
    """LHCALL_SET_PMD: the guest changed top-level entry ``index`` of ``pgdir``."""
    if not pgdir_ok(cpu, pgdir) or not 0 <= index < PTRS_PER_TABLE:
        cpu.lg.kill(f"bad page directory {pgdir:#x} index {index}")
        return
    if index >= SWITCHER_PGD_INDEX:  # the guest's change is ignored: the entry is the Host's
        cpu.lg.host_wrote(hostpages.install(cpu.lg.ram, pgdir), 4)
        cpu.flush_tlb()
        return
    pde = cpu.lg.read_u32(pgdir + 4 * index)
    assert pde is not None  # pgdir_ok covers the whole page
    reason = check_entry(cpu, pde, big=bool(pde & PTE_PSE))
    if reason:
        cpu.lg.kill(reason)
        return
    cpu.flush_tlb()
