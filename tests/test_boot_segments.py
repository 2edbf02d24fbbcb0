"""lguest's boot segments: a guest starts in the Host's GDT, which it cannot write.

The guests here load no GDT of their own (``assemble(..., own_gdt=False)``): they
``iret``, reload segments and take traps in the segments the Host gave them.
"""

from __future__ import annotations

import asyncio
import errno

import pytest
from guestasm import Booted, assemble, boot, notified, run_to_end, until
from unicorn import x86_const as r

from supervisor import LguestDevice, LguestFile, abi, hostpages
from supervisor.launcher.layout import Layout
from supervisor.memory import GuestMemory
from supervisor.snapshot import capture, restore
from supervisor.testing import initialize_words, run_cpus_to_end

# The subject is the guest's segments, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

LIMIT = 30  # seconds: a bound for failing, never a wait for success

# Reloads ds, es, ss with the boot data selector and returns to 1f with iret, as the
# end of an interrupt handler does.
IRET_AND_RELOAD = r"""
    pushfl
    pushl %cs
    pushl $1f
    iret
1:  mov $0x68, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
"""

BOOTED = (
    r"""
main:
    LGUEST_INIT
    mov %cs, %eax
    mov %eax, seen_cs
    mov %ds, %eax
    mov %eax, seen_ds
    mov %es, %eax
    mov %eax, seen_es
    mov %ss, %eax
    mov %eax, seen_ss
    sgdt seen_gdtr
"""
    + IRET_AND_RELOAD
    + r"""
    ljmp $0x60, $2f
2:  IDT 0x30, handler, 0xf
    int $0x30
    mov 0xffc01060, %eax          # the boot GDT is readable: KERNEL_CS's low word
    mov %eax, gdt_word
    HCALL 17, 0xb007
"""
    + IRET_AND_RELOAD.replace("1", "3")
    + r"""
    int $0x30
    HCALL 17, 0xb008
    HCALL 2, msg, 1, 0
handler:
    incl handled
    iret
.data
seen_cs: .long 0
seen_ds: .long 0
seen_es: .long 0
seen_ss: .long 0
seen_gdtr: .long 0, 0
gdt_word: .long 0
handled: .long 0
msg: .asciz "booted"
"""
)


def gdtr(g: Booted) -> tuple[int, int]:
    raw = g.memory.read(g.guest.symbols["seen_gdtr"], 6)
    return int.from_bytes(raw[:2], "little"), int.from_bytes(raw[2:], "little")


async def finish(file: LguestFile) -> None:
    """Run a BOOTED guest from its first notify to its power-off."""
    assert abi.unpack_words(await file.read(abi.WORD_SIZE))[0] == 0xB008
    with pytest.raises(FileNotFoundError):
        await file.read(abi.WORD_SIZE)
    assert file.death is not None
    assert (file.death.reason, file.death.exit_status) == ("booted", 0)


async def test_a_guest_without_a_gdt_starts_in_the_boot_segments_and_irets() -> None:
    async with LguestDevice() as dev, asyncio.timeout(LIMIT):
        g = await boot(dev, assemble(BOOTED, own_gdt=False))
        assert await notified(g) == 0xB007
        assert (g.u32("seen_cs"), g.u32("seen_ds"), g.u32("seen_es"), g.u32("seen_ss")) == (
            abi.KERNEL_CS,
            abi.KERNEL_DS,
            abi.KERNEL_DS,
            abi.KERNEL_DS,
        )
        assert gdtr(g) == (abi.GDT_ENTRIES * 8 - 1, hostpages.BOOT_GDT)
        assert g.u32("handled") == 1  # a trap gate's handler returned with iret
        assert g.u32("gdt_word") == 0x0000FFFF
        assert g.u32("handled") == 1
        await finish(g.file)
        assert g.u32("handled") == 2
        # INIT told the guest that the top 4 MiB are the Host's, as lguest did.
        data = g.guest.symbols["lguest_data"]
        reserve = g.memory.read(data + abi.LGUEST_DATA_RESERVE_MEM, 4)
        assert int.from_bytes(reserve, "little") == 4 << 20
        await g.file.close()
        g.memory.close()
    assert hostpages.current() == hostpages.CONTENTS


async def test_the_boot_segments_survive_snapshot_restore_and_hibernation() -> None:
    async with LguestDevice() as dev, LguestDevice() as other, asyncio.timeout(LIMIT):
        g = await boot(dev, assemble(BOOTED, own_gdt=False))
        assert await notified(g) == 0xB007
        snap = capture(g.file)
        await g.file.close()
        g.memory.close()
        revived = await restore(snap, other)  # a new Unicorn instance on another device
        try:
            await finish(revived)
        finally:
            await revived.close()
            revived.memory.close()
    async with LguestDevice(hibernate_after=0) as sleepy, asyncio.timeout(LIMIT):
        g = await boot(sleepy, assemble(BOOTED, own_gdt=False))
        assert await notified(g) == 0xB007
        cpu = g.file.cpu(0)
        await until(lambda: cpu.hibernated)  # its emulator is gone; a new one takes over
        await finish(g.file)
        assert g.file.stats is not None and g.file.stats.wakes >= 1
        await g.file.close()
        g.memory.close()


SMP = (
    r"""
main:
    LGUEST_INIT
    mov $64, %eax                 # LHCALL_START_CPU 1 at secondary
    mov $1, %edx
    mov $secondary, %ebx
    mov $stack1_top, %ecx
    int $0x1f
2:  pause
    cmpl $1, done
    jne 2b
    HCALL 2, msg, 1, 0
secondary:
"""
    + IRET_AND_RELOAD
    + r"""
    mov %cs, %eax
    mov %eax, cs1
    lock incl done
3:  pause
    jmp 3b
.data
done: .long 0
cs1: .long 0
msg: .asciz "smp booted"
.bss
.align 16
stack1: .space 4096
stack1_top:
"""
)


async def test_a_secondary_cpu_starts_in_the_boot_segments_too() -> None:
    async with LguestDevice() as dev, asyncio.timeout(LIMIT):
        g = await boot(dev, assemble(SMP, own_gdt=False), cpus=2)
        assert await run_cpus_to_end(g) == "smp booted"
        assert g.u32("cs1") == abi.KERNEL_CS
        await g.file.close()
        g.memory.close()


# Each hostile body runs after LGUEST_INIT in a guest with no GDT of its own.
HOSTILE = {
    "store into the boot GDT": (
        "movl $0, 0xffc01060\n",
        "bad page: write at 0xffc01060 in the Host's read-only pages (the boot GDT)",
    ),
    "jump into the Host's pages": (
        "mov $0xffc01000, %eax\n jmp *%eax\n",
        "bad page: fetch at 0xffc01000 in the Host's read-only pages (the boot GDT)",
    ),
    # Its own page-table entry for virtual 0x3000 names the GDT's physical page.
    "store through an alias of the GDT page": (
        "mov 0x14, %eax\n"  # the boot info's free_end: the page directory
        " movl $0xffc01007, 0x100c(%eax)\n"  # first page table, entry 3
        " mov %cr3, %eax\n mov %eax, %cr3\n"
        " movl $0, 0x3060\n",
        "bad page: write at 0xffc01060 in the Host's read-only pages (the boot GDT)",
    ),
    "SET_PTE in the Host's 4 MiB": (
        "mov 0x14, %edx\n mov $14, %eax\n mov $0xffc01000, %ebx\n mov $0x7, %ecx\n int $0x1f\n",
        "attempt to access switcher pages (SET_PTE at 0xffc01000)",
    ),
    # The MMU walks the Host's page table as a page directory: it must not write it.
    "cr3 at the Host's page table": (
        "mov $0xffc00000, %eax\n mov %eax, %cr3\n nop\n",
        "unhandled trap 14",
    ),
    # ... and the GDT page as a page table (virtual 0x418000 is its word 24).
    "the GDT page as a page table": (
        "mov 0x14, %eax\n movl $0xffc01007, 4(%eax)\n"
        " mov %cr3, %eax\n mov %eax, %cr3\n"
        " incl 0x418000\n movl 0x418004, %eax\n"
        " HCALL 2, msg, 3, 0\n"
        '.data\nmsg: .asciz "walked"\n.text\n',
        "CRASH: walked",
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_a_guest_cannot_change_the_hosts_pages(name: str) -> None:
    body, reason = HOSTILE[name]
    hostile = assemble("main:\n LGUEST_INIT\n " + body, own_gdt=False)
    async with LguestDevice() as dev, asyncio.timeout(LIMIT):
        neighbour = await boot(dev, assemble(BOOTED, own_gdt=False))
        h = await boot(dev, hostile)
        got = await run_to_end(h)
        assert got.startswith(reason), got
        assert hostpages.current() == hostpages.CONTENTS
        assert await notified(neighbour) == 0xB007  # boots after it, on the same device
        await finish(neighbour.file)
        for b in (h, neighbour):
            await b.file.close()
            b.memory.close()


# The Host keeps its page-directory entry in every directory it is told about.
KEPT = {
    # The guest wipes entry 1023, then tells the Host with SET_PMD: the Host restores it.
    "SET_PMD of entry 1023": "mov 0x14, %esi\n movl $0, 4092(%esi)\n"
    " mov %cr3, %eax\n mov %eax, %cr3\n"
    " mov %esi, %edx\n mov $15, %eax\n mov $1023, %ebx\n int $0x1f\n",
    # A new directory without it (a copy of the first one, entry 1023 zeroed).
    "NEW_PGTABLE": "mov 0x14, %esi\n mov $newdir, %edi\n mov $1023, %ecx\n rep movsl\n"
    " movl $0, (%edi)\n mov $4, %eax\n mov $newdir, %edx\n int $0x1f\n"
    ".bss\n.align 4096\nnewdir: .space 4096\n.text\n",
    # Its own GDT (LOAD_GDT), used; then back to the Host's with lgdt.
    "LOAD_GDT, then lgdt of the boot GDT": "mov $3, %eax\n mov $gdt, %edx\n mov $3, %ebx\n"
    " int $0x1f\n ljmp $0x08, $5f\n5: mov $0x10, %eax\n mov %eax, %ds\n mov %eax, %ss\n"
    " pushfl\n pushl %cs\n pushl $6f\n iret\n"
    "6: lgdt boot_gdtr\n ljmp $0x60, $7f\n7:\n"
    ".data\nboot_gdtr: .word 255\n .long 0xffc01000\n.text\n",
}


@pytest.mark.parametrize("name", sorted(KEPT))
async def test_the_boot_gdt_stays_mapped(name: str) -> None:
    body = "main:\n LGUEST_INIT\n " + KEPT[name] + IRET_AND_RELOAD + " HCALL 17, 0xb007\n"
    async with LguestDevice() as dev, asyncio.timeout(LIMIT):
        g = await boot(dev, assemble(body, own_gdt=False))
        assert await notified(g) == 0xB007, g.file.death
        assert g.file.cpu(0).reg(r.UC_X86_REG_CS) == abi.KERNEL_CS
        await g.file.close()
        g.memory.close()
    assert hostpages.current() == hostpages.CONTENTS


async def test_guest_memory_must_end_below_the_hosts_pages() -> None:
    pages = hostpages.PAGE_TABLE // abi.PAGE_SIZE + 1
    try:
        memory = GuestMemory(pages * abi.PAGE_SIZE)  # address space only: nothing touched
    except OSError:
        pytest.skip("cannot reserve 4 GiB of address space here")
    # Everything else about it is right: the memory holds it, pgdir is inside.
    layout = Layout(ram_size=(pages - 1) * abi.PAGE_SIZE, pgdir=0x20000, device_page=0,
                    pfn_limit=pages)  # fmt: skip
    async with LguestDevice() as dev:
        f = dev.open(memory)
        with pytest.raises(OSError) as exc:
            await f.write(initialize_words(memory, layout))
        assert exc.value.errno == errno.EINVAL
        await f.close()
    memory.close()
