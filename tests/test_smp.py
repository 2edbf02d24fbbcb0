"""Guests with several CPUs: INITIALIZE's fifth word, LHCALL_START_CPU and
LHCALL_SEND_IPI (extensions of lguest's ABI), and atomics that hold across CPUs."""

from __future__ import annotations

import errno

import pytest
from guestasm import boot, until

from supervisor import LguestDevice, abi
from supervisor.testing import assemble, initialize_words, load, run_cpus_to_end

# Starts CPUs 1..NCPUS-1 at `secondary`, each on its own stack and with its own
# lguest_data (cpu_data + id * 1136), then every CPU runs WORK; CPU 0 waits for
# the others (`done`) and powers off with "done".
SMP = r"""
.set NCPUS, {ncpus}
.set LOOPS, {loops}
main:
    LGUEST_INIT
    {setup}
    mov $1, %esi
start_next:
    cmp $NCPUS, %esi
    je cpu0_work
    mov %esi, %ecx
    shl $12, %ecx
    add $stacks, %ecx
    HCALL_REG 64, %esi, $secondary, %ecx
    mov %eax, start_result
    test %eax, %eax
    jnz fail
    inc %esi
    jmp start_next
secondary:
    mov %eax, %ebp
    imul $1136, %eax, %edi
    add $cpu_data, %edi
    mov %edi, %ebx
    movl $0x80, 1132(%ebx)
    lea 20(%ebx), %edi
    push %eax
    mov $0xff, %al
    mov $64, %ecx
    rep stosb
    pop %eax
    mov %ebx, %edx
    mov $1, %eax
    int $0x1f
    mov %ebp, %eax
    jmp work
cpu0_work:
    xor %eax, %eax
work:
    mov %eax, %ebp            # this CPU's number
    {work}
    lock incl done
    test %ebp, %ebp
    jnz park
1:  pause
    cmpl $NCPUS, done
    jne 1b
    HCALL 2, msg, 1, 0
park:
    HCALL 10
    jmp park
fail:
    HCALL 2, failmsg, 1, 0
.macro HCALL_REG nr, a1, a2, a3
    mov \a3, %ecx
    mov \a2, %ebx
    mov \a1, %edx
    mov $\nr, %eax
    int $0x1f
.endm
.data
counter: .long 0
counter2: .long 0
spin: .long 0
go: .long 0
done: .long 0
start_result: .long 0
msg: .asciz "done"
failmsg: .asciz "start failed"
.bss
.align 4096
cpu_data: .space 1136 * NCPUS
.align 4096
stacks: .space 4096 * NCPUS
"""

XADD = r"""
    mov $LOOPS, %ecx
2:  mov $1, %eax
    lock xaddl %eax, counter
    dec %ecx
    jnz 2b
"""

SPINLOCK = r"""
    mov $LOOPS, %ecx
2:  mov $1, %edx
3:  xor %eax, %eax
    lock cmpxchgl %edx, spin
    jz 4f
    pause
    jmp 3b
4:  mov counter2, %eax        # a plain increment: only the lock makes it exact
    inc %eax
    mov %eax, counter2
    movl $0, spin
    dec %ecx
    jnz 2b
"""


def smp(ncpus: int, loops: int, work: str, setup: str = "") -> str:
    # The macro must precede its first use: move it to the top.
    body = SMP.format(ncpus=ncpus, loops=loops, work=work, setup=setup)
    head, macro = body.split(".macro HCALL_REG", 1)
    macro, tail = macro.split(".endm", 1)
    return ".macro HCALL_REG" + macro + ".endm\n" + head + tail


async def test_initialize_takes_the_number_of_cpus(dev: LguestDevice) -> None:
    guest = assemble(smp(1, 1, XADD))
    for bad in (0, abi.MAX_CPUS + 1):
        memory, layout = load(guest)
        f = dev.open(memory)
        with pytest.raises(OSError) as err:
            await f.write(initialize_words(memory, layout, cpus=bad))
        assert err.value.errno == errno.EINVAL
        assert f.cpu_count == 0
        await f.close()
    g = await boot(dev, guest, cpus=3)
    assert g.file.cpu_count == 3
    for request in (
        lambda: g.file.read(4, 3),
        lambda: g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1), 3),
    ):
        with pytest.raises(OSError) as err:
            await request()
        assert err.value.errno == errno.EINVAL


@pytest.mark.parametrize("ncpus", [2, 4])
async def test_lock_xadd_is_atomic_across_cpus(dev: LguestDevice, ncpus: int) -> None:
    loops = 1_000_000
    g = await boot(dev, smp(ncpus, loops, XADD), cpus=ncpus)
    assert await run_cpus_to_end(g) == "done"
    assert g.u32("counter") == ncpus * loops
    assert all(g.file.cpu(n).stats.run_time > 0 for n in range(ncpus))


@pytest.mark.parametrize("ncpus", [2, 3])
async def test_a_cmpxchg_spinlock_keeps_a_plain_counter_exact(
    dev: LguestDevice, ncpus: int
) -> None:
    loops = 1_000_000
    g = await boot(dev, smp(ncpus, loops, SPINLOCK), cpus=ncpus)
    assert await run_cpus_to_end(g) == "done"
    assert g.u32("counter2") == ncpus * loops
    assert g.u32("spin") == 0


async def test_an_offline_cpu_reads_nothing_until_started(dev: LguestDevice) -> None:
    # CPU 0 waits for `go` before starting CPU 1: until then CPU 1's read stays pending.
    g = await boot(dev, smp(2, 10, XADD, setup="1: pause\n cmpl $0, go\n je 1b"), cpus=2)
    import asyncio

    reader1 = asyncio.ensure_future(g.file.read(4, 1))
    reader0 = asyncio.ensure_future(g.file.read(4, 0))
    await until(lambda: g.file.cpu(0).lguest_data is not None)
    assert not g.file.cpu(1).online and not reader1.done()
    assert g.file.cpu(1).hibernated  # an offline CPU holds no emulator
    g.set_u32("go", 1)
    for reader in (reader0, reader1):
        with pytest.raises(FileNotFoundError):
            await reader
    assert g.file.death is not None and g.file.death.reason == "done"
    assert g.file.cpu(1).online and g.u32("counter") == 20
