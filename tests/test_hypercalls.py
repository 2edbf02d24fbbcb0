"""Every hypercall, and every way a guest can die through one."""

import asyncio
import errno
import struct
from typing import Any

import pytest
from guestasm import boot, notified, present, run_to_end, until

from supervisor import LguestDevice, _slicing, abi, execute

# The subject is what each hypercall does to the guest, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop


async def reason(dev: LguestDevice, body: str, ram_size: int = 1 << 20) -> str:
    return await run_to_end(await boot(dev, body, ram_size))


# -- LHCALL_LGUEST_INIT ------------------------------------------------------------


async def test_init_fills_in_the_host_fields(dev: LguestDevice) -> None:
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    HCALL 17, 1
1:  jmp 1b
""",
    )
    assert await notified(g) == 1
    data = g.guest.symbols["lguest_data"]
    tsc, pgdir = struct.unpack_from("<II", g.memory.view, data + abi.LGUEST_DATA_TSC_KHZ)
    assert tsc > 0
    assert pgdir == g.layout.pgdir
    seconds = struct.unpack_from("<I", g.memory.view, data + abi.LGUEST_DATA_TIME)[0]
    assert seconds > 1_600_000_000  # the host wrote the wall clock


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("main:\n HCALL 10\n", "hypercall 10 before INIT"),
        ("main:\n HCALL 17, 5\n", "hypercall 17 before INIT"),
        ("main:\n LGUEST_INIT\n HCALL 1, lguest_data\n", "already have lguest_data"),
        ("main:\n HCALL 1, 0xfffff000\n", "bad lguest_data address 0xfffff000"),
        # 1 MiB of RAM plus the device page end at 0x101000: this one straddles the end
        ("main:\n HCALL 1, 0x100c18\n", "bad lguest_data address 0x100c18"),
        ("main:\n movl $0x81, lguest_data+1132\n HCALL 1, lguest_data\n", "bad syscall vector 129"),
        ("main:\n LGUEST_INIT\n HCALL 99\n", "Bad hypercall 99"),
        ("main:\n LGUEST_INIT\n HCALL 11\n", "Bad hypercall 11"),
    ],
)
async def test_init_rules_and_bad_numbers_kill(dev: LguestDevice, body: str, expected: str) -> None:
    assert await reason(dev, body) == expected


# -- LHCALL_SHUTDOWN ----------------------------------------------------------------


async def test_shutdown_kinds(dev: LguestDevice) -> None:
    msg = '.data\nmsg: .asciz "the reason"\n'
    g = await boot(dev, "main:\n LGUEST_INIT\n HCALL 2, msg, 1, 3\n" + msg)
    assert await run_to_end(g) == "the reason"
    assert present(g.file.death).exit_status == 3
    assert await reason(dev, "main:\n LGUEST_INIT\n HCALL 2, msg, 0\n" + msg) == "CRASH: the reason"
    died = await reason(dev, "main:\n LGUEST_INIT\n HCALL 2, 0x7fffffff, 1\n")
    assert died == "CRASH: bad shutdown message address 0x7fffffff"
    g = await boot(dev, "main:\n LGUEST_INIT\n HCALL 2, msg, 2\n" + msg)
    with pytest.raises(OSError) as e:
        await g.file.read(8)
    assert e.value.errno == errno.ERESTART


async def test_shutdown_message_is_cut_at_128_bytes(dev: LguestDevice) -> None:
    body = "main:\n LGUEST_INIT\n HCALL 2, msg, 1\n.data\nmsg: .fill 300, 1, 0x41\n .byte 0\n"
    assert await reason(dev, body) == "A" * 128


# -- async hypercall ring ---------------------------------------------------------------

RING = r"""
.macro QUEUE slot, nr, a1=0, a2=0, a3=0
    movl $\nr, lguest_data+84+16*\slot
    movl $\a1, lguest_data+84+16*\slot+4
    movl $\a2, lguest_data+84+16*\slot+8
    movl $\a3, lguest_data+84+16*\slot+12
    movb $0, lguest_data+20+\slot
.endm
main:
    LGUEST_INIT
    QUEUE 0, 6, 0x80
    mov $handler, %eax
    and $0xffff, %eax
    or $0x00080000, %eax
    mov %eax, lguest_data+84+8
    mov $handler, %eax
    and $0xffff0000, %eax
    or $0x8e00, %eax
    mov %eax, lguest_data+84+12
    QUEUE 1, 17, 0xa1
    QUEUE 2, 17, 0xa2
    HCALL 17, 0xd1
    movzbl lguest_data+20, %eax
    mov %eax, status0
    int $0x80
    HCALL 17, 0xd2
1:  jmp 1b
handler:
    incl syscalls
    jmp irq_return
.data
status0: .long 0x55
syscalls: .long 0
"""


async def test_async_ring_runs_in_order_and_stops_for_each_notify(dev: LguestDevice) -> None:
    g = await boot(dev, RING)
    # Slot 0 (an IDT entry) runs, slot 1 notifies: the direct call waits.
    assert await notified(g) == 0xA1
    assert await notified(g) == 0xA2
    assert await notified(g) == 0xD1
    assert await notified(g) == 0xD2
    assert g.u32("status0") == abi.HCALL_FREE  # the Host marked the slot done
    assert g.u32("syscalls") == 1  # the gate queued in slot 0 was installed


# -- LHCALL_LOAD_IDT_ENTRY --------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("main:\n LGUEST_INIT\n HCALL 6, 256, 0, 0x8e00\n", "Setting idt entry 256"),
        ("main:\n LGUEST_INIT\n HCALL 6, 0x7fffffff, 0, 0x8e00\n", "Setting idt entry 2147483647"),
        ("main:\n LGUEST_INIT\n HCALL 6, 40, 0, 0x8500\n", "bad IDT type 5"),
    ],
)
async def test_bad_idt_entries_kill(dev: LguestDevice, body: str, expected: str) -> None:
    assert await reason(dev, body) == expected


async def test_not_present_gate_of_any_type_is_accepted(dev: LguestDevice) -> None:
    g = await boot(dev, "main:\n LGUEST_INIT\n HCALL 6, 40, 0, 0x0500\n HCALL 17, 1\n")
    assert await notified(g) == 1


async def test_reserved_vectors_are_ignored(dev: LguestDevice) -> None:
    # A gate for vector 31 would steal the hypercall trap; the Host keeps it.
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    IDT 31, stolen
    IDT 8, stolen
    HCALL 17, 0x31
1:  jmp 1b
stolen:
    HCALL 17, 0xbad
""",
    )
    assert await notified(g) == 0x31
    cpu = g.file.cpu(0)
    assert cpu.idt[31] == (0, 0) and cpu.idt[8] == (0, 0)


# -- traps and software interrupts ----------------------------------------------------


async def test_unhandled_traps_kill_with_the_trap_number(dev: LguestDevice) -> None:
    assert (await reason(dev, "main:\n LGUEST_INIT\n xor %ecx, %ecx\n div %ecx\n")).startswith(
        "unhandled trap 0 at 0x"
    )
    assert (await reason(dev, "main:\n LGUEST_INIT\n ud2\n")).startswith("unhandled trap 6 at")
    assert (await reason(dev, "main:\n LGUEST_INIT\n int $0x80\n")).startswith(
        "unhandled trap 128 at"
    )
    died = await reason(dev, "main:\n LGUEST_INIT\n movl $1, 0x80000000\n")
    assert died.startswith("unhandled trap 14 at 0x1") and died.endswith("(0x80000000)")


PAGE_FAULT = r"""
main:
    LGUEST_INIT
    IDT 14, pf_handler
    movl $0x77, 0x80000123
    HCALL 17, 0x14
1:  jmp 1b
pf_handler:
    mov lguest_data+8, %eax
    mov %eax, seen_cr2
    pop %eax
    mov %eax, seen_error
    pop %eax
    mov %eax, seen_eip
    HCALL 17, 0xf
.data
seen_cr2: .long 0
seen_error: .long 0xffff
seen_eip: .long 0
"""


async def test_page_fault_is_reflected_with_cr2_and_error_code(dev: LguestDevice) -> None:
    g = await boot(dev, PAGE_FAULT)
    assert await notified(g) == 0xF
    assert g.u32("seen_cr2") == 0x80000123
    assert g.u32("seen_error") == 2  # a write, to a page not present, by the kernel
    assert g.u32("seen_eip") > 0x10000


async def test_a_read_fault_has_no_write_bit(dev: LguestDevice) -> None:
    g = await boot(dev, PAGE_FAULT.replace("movl $0x77, 0x80000123", "movl 0x80000123, %eax"))
    assert await notified(g) == 0xF
    assert g.u32("seen_cr2") == 0x80000123
    assert g.u32("seen_error") == 0  # a read, page not present


async def test_syscall_vector_goes_to_the_guest_handler(dev: LguestDevice) -> None:
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    IDT 0x80, handler, 0xf
    mov $5, %esi
    int $0x80
    HCALL 17, 0x80
1:  jmp 1b
handler:
    inc %esi
    iret
""",
    )
    assert await notified(g) == 0x80
    assert g.file.cpu(0).reg(__import__("unicorn.x86_const").x86_const.UC_X86_REG_ESI) == 6


@pytest.mark.parametrize("offset", [64, 8, 4])  # within a page; across one (two ways)
async def test_an_interrupt_frame_is_pushed_whole_at_and_across_a_page_boundary(
    dev: LguestDevice, offset: int
) -> None:
    # int $0x30 from `after - 2` pushes eflags, cs and eip below `esp`; the handler copies
    # the frame (from its own stack) to `frame` and notifies.
    g = await boot(
        dev,
        rf"""
main:
    LGUEST_INIT
    IDT 0x30, handler, 0xf
    mov $stack_page + {offset}, %esp
    int $0x30
after:
1:  jmp 1b
handler:
    mov 0(%esp), %eax
    mov %eax, frame
    mov 4(%esp), %eax
    mov %eax, frame + 4
    mov 8(%esp), %eax
    mov %eax, frame + 8
    mov %esp, frame + 12
    HCALL 17, 0x30
.data
frame: .space 16
.bss
.align 4096
    .space 4096
stack_page: .space 4096
""",
    )
    assert await notified(g) == 0x30
    frame = g.guest.symbols["frame"]
    eip, cs, eflags, esp = struct.unpack("<4I", g.memory.read(frame, 16))
    cpu = g.file.cpu(0)
    assert eip == g.guest.symbols["after"]
    assert cs == cpu.reg(__import__("unicorn.x86_const").x86_const.UC_X86_REG_CS)
    assert eflags & 0x2  # the always-one bit: a real eflags value
    assert esp == g.guest.symbols["stack_page"] + offset - 12


async def test_delivery_leaves_one_stale_range_per_frame_and_merges_neighbours(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    from supervisor import _slicing, _unicorn, codecache, interrupts

    g = await boot(dev, "main:\n LGUEST_INIT\n IDT 0x30, h, 0xf\n HCALL 17, 1\nh: iret\n")
    assert await notified(g) == 1
    cpu = g.file.cpu(0)
    cpu.thaw()  # (as before a slice: with an engine pool it holds none between them)
    cpu.stale_code.clear()
    assert interrupts.deliver_trap(cpu, 0x30)
    # Natively the delivering CPU dropped its own translations of the frame at once.
    assert len(cpu.stale_code) == (0 if _slicing.NATIVE else 1)
    cpu.stale_code.clear()
    with monkeypatch.context() as m:
        m.setattr(_slicing, "deliver", lambda *_args: None)  # the Python path
        assert interrupts.deliver_trap(cpu, 0x30)
    assert len(cpu.stale_code) == 1  # the frame: one Host write, not one per word
    # Ranges are merged before the engine is asked: overlapping and adjacent ones in a
    # page become one call, in C (given the merged list) or from Python (here: the C
    # call is made to decline, so the Python path's engine calls can be seen).
    calls: list[tuple[int, int]] = []
    given: list[list[tuple[int, int]]] = []
    real = _unicorn.remove_cache

    def recording(uc: Any, start: int, end: int) -> None:
        calls.append((start, end))
        return real(uc, start, end)

    def declining(_fuel: Any, ranges: list[tuple[int, int]], _kernel: int) -> None:
        given.append(list(ranges))

    monkeypatch.setattr(_unicorn, "remove_cache", recording)
    monkeypatch.setattr(_slicing, "drop", declining)
    cpu.stale_code.clear()
    cpu.stale_code.extend([(0x2008, 0x200C), (0x2000, 0x2008), (0x2004, 0x2006), (0x3000, 0x3004)])
    codecache.drop_stale(cpu)
    assert given == [[(0x2000, 0x200C), (0x3000, 0x3004)]]
    assert calls == [(0x2000, 0x200C), (0x3000, 0x3004)]
    assert not cpu.stale_code


# -- descriptor tables, stack, TS ------------------------------------------------------


async def test_load_gdt_sets_the_gdtr(dev: LguestDevice) -> None:
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    HCALL 3, gdt, 3
    sgdt saved
    HCALL 17, 3
1:  jmp 1b
.data
saved: .word 0
       .long 0
""",
    )
    assert await notified(g) == 3
    raw = g.memory.read(g.guest.symbols["saved"], 6)
    limit, base = struct.unpack("<HI", raw)
    assert (base, limit) == (g.guest.symbols["gdt"], 23)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("main:\n LGUEST_INIT\n HCALL 3, gdt, 33\n", "too many gdt entries 33"),
        ("main:\n LGUEST_INIT\n HCALL 3, 0xfffffff0, 3\n", "bad GDT address 0xfffffff0"),
        ("main:\n LGUEST_INIT\n HCALL 16, 0xfffffff0\n", "bad TLS address 0xfffffff0"),
        ("main:\n LGUEST_INIT\n HCALL 7, 0x13, 0x8000, 1\n", "bad stack segment 19"),
        ("main:\n LGUEST_INIT\n HCALL 7, 0x10, 0x8000, 3\n", "bad stack pages 3"),
    ],
)
async def test_bad_tables_and_stacks_kill(dev: LguestDevice, body: str, expected: str) -> None:
    assert await reason(dev, body) == expected


async def test_good_tls_and_stack_are_recorded(dev: LguestDevice) -> None:
    g = await boot(
        dev, "main:\n LGUEST_INIT\n HCALL 16, gdt\n HCALL 7, 0x10, 0x7000, 2\n HCALL 17, 1\n"
    )
    assert await notified(g) == 1
    cpu = g.file.cpu(0)
    assert cpu.stack == (0x10, 0x7000, 2)
    assert cpu.tls == g.memory.read(g.guest.symbols["gdt"], 24)


async def test_task_switched_flag_makes_the_fpu_trap(dev: LguestDevice) -> None:
    body = r"""
main:
    LGUEST_INIT
    HCALL 8, 0
    fninit
    HCALL 17, 1
    HCALL 8, 1
    fninit
    HCALL 17, 2
"""
    g = await boot(dev, body)
    assert await notified(g) == 1
    assert (await run_to_end(g)).startswith("unhandled trap 7 at")


# -- page tables ----------------------------------------------------------------------

REMAP = r"""
# Map virtual 0x80000000 onto the page holding `target`, via a new page table.
main:
    LGUEST_INIT
    mov lguest_data+1116, %edi        # the page directory the Launcher built
    mov $table, %eax
    or $7, %eax
    mov %eax, 512*4(%edi)
    HCALL 15, 0, 512
    mov %edi, %edx                    # SET_PMD above took pgdir in edx: redo properly
    mov $15, %eax
    mov %edi, %edx
    mov $512, %ebx
    int $0x1f
    mov $target, %eax
    and $0xfffff000, %eax
    or $7, %eax
    mov %eax, table
    mov $14, %eax
    mov %edi, %edx
    mov $0x80000000, %ebx
    mov table, %ecx
    int $0x1f
    mov $target, %eax
    and $0xfff, %eax
    mov 0x80000000(%eax), %eax
    mov %eax, seen
    HCALL 17, 1
    # unmap and flush: the next access faults
    movl $0, table
    HCALL 5, 1
    IDT 14, pf
    mov 0x80000000, %eax
    HCALL 17, 2
pf: HCALL 17, 0x14
.data
target: .long 0x5eed
seen: .long 0
.bss
.align 4096
table: .space 4096
"""


async def test_set_pmd_set_pte_and_flush_tlb(dev: LguestDevice) -> None:
    g = await boot(dev, REMAP)
    assert await notified(g) == 1
    assert g.u32("seen") == 0x5EED
    assert await notified(g) == 0x14  # the unmapped page faults after FLUSH_TLB


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("main:\n LGUEST_INIT\n HCALL 4, 0x12345\n", "bad page directory 0x12345"),
        ("main:\n LGUEST_INIT\n HCALL 4, 0x40000000\n", "bad page directory 0x40000000"),
        ("main:\n LGUEST_INIT\n HCALL 14, 0x1000, 0, 0x40000007\n", "bad page 262144"),
        ("main:\n LGUEST_INIT\n HCALL 14, 0x1001, 0, 7\n", "bad page directory 0x1001"),
        ("main:\n LGUEST_INIT\n HCALL 15, 0x1000, 1024\n", "bad page directory 0x1000 index 1024"),
    ],
)
async def test_bad_page_tables_kill(dev: LguestDevice, body: str, expected: str) -> None:
    assert await reason(dev, body) == expected


async def test_set_pmd_with_a_bad_entry_kills(dev: LguestDevice) -> None:
    body = r"""
main:
    LGUEST_INIT
    mov lguest_data+1116, %edi
    movl $0x7fc00087, 600*4(%edi)
    mov $15, %eax
    mov %edi, %edx
    mov $600, %ebx
    int $0x1f
"""
    assert await reason(dev, body) == f"bad page {0x7FC00}"


async def test_new_pgtable_switches_tables(dev: LguestDevice) -> None:
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    mov lguest_data+1116, %edx
    mov $4, %eax
    int $0x1f
    mov %cr3, %eax
    mov %eax, seen
    HCALL 17, 1
.data
seen: .long 0
""",
    )
    assert await notified(g) == 1
    assert g.u32("seen") == g.layout.pgdir


async def test_page_table_entry_past_the_limit_kills_on_use(dev: LguestDevice) -> None:
    body = r"""
main:
    LGUEST_INIT
    mov lguest_data+1116, %edi
    mov 4(%edi), %esi                 # page table for 4M..8M is absent in 1 MiB: use entry 0
    mov (%edi), %esi
    and $0xfffff000, %esi
    movl $0x7ff00007, 0x3fc(%esi)     # pte for virtual 0xff000 -> physical 0x7ff00000
    invlpg 0xff000
    movl $1, 0xff000
"""
    assert (await reason(dev, body)).startswith("bad page: write at 0x")


# -- clock event and halt -------------------------------------------------------------

TICKS = r"""
main:
    LGUEST_INIT
    IDT 32, tick
    HCALL 9, 1000000
1:  movl $0, lguest_data
    cmpl $5, ticks
    je 2f
    HCALL 10
    jmp 1b
2:  HCALL 17, 5
    HCALL 9, 4000000000
    HCALL 9, 0
    movl $0, lguest_data
    HCALL 10
    HCALL 17, 6
tick:
    incl ticks
    cmpl $5, ticks
    jae 3f
    mov $9, %eax
    mov $1000000, %edx
    int $0x1f
3:  jmp irq_return
.data
ticks: .long 0
"""


async def test_clock_event_raises_irq0_and_wakes_a_halted_guest(dev: LguestDevice) -> None:
    g = await boot(dev, TICKS)
    assert await notified(g) == 5
    assert g.u32("ticks") == 5
    assert present(g.file.stats).interrupts == 5


async def test_cancelled_clock_event_never_fires(dev: LguestDevice) -> None:
    g = await boot(dev, TICKS)
    assert await notified(g) == 5
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: g.file.cpu(0).halted)
    assert g.file.cpu(0).clock.event is None  # the cancel disarmed it
    await asyncio.sleep(0.01)  # ten timer periods: no irq arrives, the guest stays halted
    assert not reader.done()
    assert g.u32("ticks") == 5
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


async def test_cpu_local_hypercalls_do_not_end_the_run(dev: LguestDevice) -> None:
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    mov $1000, %esi
1:  HCALL 5, 0
    HCALL 6, 40, 0, 0
    dec %esi
    jnz 1b
    HCALL 17, 1
""",
    )
    assert await notified(g) == 1
    stats = present(g.file.stats)
    assert stats.hypercalls >= 2001
    if _slicing.NATIVE:  # (the count= fallback also stops whenever a count runs out)
        assert stats.exits < 20  # done inside the interrupt hook, not by stopping Unicorn


async def test_a_slice_that_ends_after_a_local_hypercall_is_not_a_halt(
    dev: LguestDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local hypercalls as fast as possible, for many slices: the guest never halts.
    (Slices of TARGET_SLICE: a lone slice would hold all of them in a few.)"""
    monkeypatch.setattr(execute, "_LONE_NS", 0)
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    mov $200000, %esi
1:  HCALL 8, 0
    dec %esi
    jnz 1b
    HCALL 17, 1
""",
    )
    assert await asyncio.wait_for(notified(g), 60) == 1
    assert present(g.file.stats).slices > 3
