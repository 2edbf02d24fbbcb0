"""Guests with several CPUs: INITIALIZE's fifth word, LHCALL_START_CPU and
LHCALL_SEND_IPI (extensions of lguest's ABI), and atomics that hold across CPUs."""

from __future__ import annotations

import asyncio
import errno
import re
import shutil
import threading
from pathlib import Path

import pytest
from guestasm import boot, present, until

from supervisor import GuestConfig, LguestDevice, Supervisor, abi
from supervisor.debug import START, debugger
from supervisor.gdbstub import GdbServer
from supervisor.testing import (
    CPU1_AREAS,
    IPI_PINGER,
    assemble,
    initialize_words,
    load,
    run_cpus_to_end,
)

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
    {check}
    HCALL 2, msg, 1, 0
wrong:
    HCALL 2, msg, 1, 1
park:
    HCALL 10
    jmp park
fail:
    HCALL 2, failmsg, 1, 3
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


def smp(ncpus: int, loops: int, work: str, setup: str = "", check: tuple[str, ...] = ()) -> str:
    """The guest; it powers off with status 1 unless each of ``check`` (symbols) holds
    ``ncpus * loops``."""
    checks = "".join(f"cmpl $NCPUS * LOOPS, {symbol}\n    jne wrong\n    " for symbol in check)
    return SMP.format(ncpus=ncpus, loops=loops, work=work, setup=setup, check=checks)


@pytest.mark.one_loop
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


@pytest.mark.one_loop
@pytest.mark.parametrize("ncpus", [2, 4])
async def test_lock_xadd_is_atomic_across_cpus(dev: LguestDevice, ncpus: int) -> None:
    loops = 1_000_000
    g = await boot(dev, smp(ncpus, loops, XADD), cpus=ncpus)
    assert await run_cpus_to_end(g) == "done"
    assert g.u32("counter") == ncpus * loops
    assert all(g.file.cpu(n).stats.run_time > 0 for n in range(ncpus))


@pytest.mark.one_loop
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


IPI = (
    r"""
main:
    LGUEST_INIT
    IDT 37, ipi_handler
    HCALL_REG 64, $1, $secondary, $stack1_top
    mov %eax, r_start
1:  pause
    cmpl $0, ready
    je 1b
    HCALL 65, 1, 5
    mov %eax, r_ipi
2:  pause
    cmpl $0, got
    je 2b
    HCALL 64, 1, secondary, 0
    mov %eax, r_busy
    HCALL 64, 2, secondary, 0
    mov %eax, r_nocpu
    HCALL 65, 9, 1
    mov %eax, r_ipi_nocpu
    HCALL 65, 1, 32
    mov %eax, r_ipi_noirq
    HCALL 2, msg, 1, 0
secondary:
    mov %eax, cpu_seen
    {first}
    CPU_INIT cpu1_data
    movl $512, cpu1_data        # this CPU's irq_enabled
    movl $1, ready
3:  HCALL 10
    jmp 3b
ipi_handler:
    lock incl got
    movl $512, cpu1_data
    iret
.data
ready: .long 0
got: .long 0
cpu_seen: .long 0
r_start: .long 1
r_ipi: .long 1
r_busy: .long 0
r_nocpu: .long 0
r_ipi_nocpu: .long 0
r_ipi_noirq: .long 0
msg: .asciz "done"
"""
    + CPU1_AREAS
)


def signed(value: int) -> int:
    return value - (1 << 32) if value & (1 << 31) else value


async def test_an_ipi_wakes_a_halted_cpu_and_bad_numbers_return_errors(dev: LguestDevice) -> None:
    g = await boot(dev, IPI.format(first=""), cpus=2)
    assert await run_cpus_to_end(g) == "done"
    assert g.u32("cpu_seen") == 1  # a started CPU finds its number in eax
    assert g.u32("r_start") == 0 and g.u32("r_ipi") == 0
    assert g.u32("got") == 1
    assert signed(g.u32("r_busy")) == -errno.EBUSY
    assert signed(g.u32("r_nocpu")) == -errno.EINVAL
    assert signed(g.u32("r_ipi_nocpu")) == -errno.EINVAL
    assert signed(g.u32("r_ipi_noirq")) == -errno.EINVAL
    assert g.file.cpu(1).stats.interrupts == 1 and g.file.cpu(0).stats.interrupts == 0


@pytest.mark.one_loop
async def test_a_started_cpu_must_register_its_own_lguest_data_first(dev: LguestDevice) -> None:
    g = await boot(dev, IPI.format(first="HCALL 10"), cpus=2)
    assert await run_cpus_to_end(g) == "hypercall 10 before INIT"


@pytest.mark.one_loop
async def test_a_two_cpu_guest_paused_captured_and_revived_counts_exactly(
    dev: LguestDevice,
) -> None:
    from supervisor.memory import GuestMemory

    loops = 1_000_000
    g = await boot(dev, smp(2, loops, SPINLOCK + XADD), cpus=2)
    running = asyncio.ensure_future(run_cpus_to_end(g))
    await until(lambda: g.u32("counter2") > loops // 2)
    await asyncio.gather(g.file.pause(0), g.file.pause(1))
    state = g.file.state()
    assert len(state.cpus) == 2 and all(c.online for c in state.cpus)
    assert g.u32("counter2") < 2 * loops  # mid-run
    copy = GuestMemory(g.memory.size)
    copy.write(0, g.memory.read(0, g.memory.size))
    await g.file.close()
    with pytest.raises(ExceptionGroup) as closed:
        await running
    assert all(isinstance(e, OSError) and e.errno == errno.EBADF for e in closed.value.exceptions)
    revived = dev.open(copy, state=state)
    assert revived.cpu_count == 2
    from supervisor.testing import Booted

    again = Booted(revived, copy, g.layout, g.guest)
    assert await run_cpus_to_end(again) == "done"
    assert again.u32("counter2") == 2 * loops
    assert again.u32("counter") == 2 * loops


TWO_LOOPS = (
    r"""
main:
    LGUEST_INIT
    HCALL_REG 64, $1, $secondary, $stack1_top
cpu0_loop:
    inc %esi
    cmpl $0, finish
    je cpu0_loop
    HCALL 2, msg, 1, 0
secondary:
    CPU_INIT cpu1_data
    mov $7, %edi
cpu1_spot:
    inc %edi
    movl $1, finish
cpu1_park:
    HCALL 10
    jmp cpu1_park
cpu0_end:
.data
finish: .long 0
msg: .asciz "done"
"""
    + CPU1_AREAS
)


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
async def test_gdb_sees_each_cpu_as_a_thread(dev: LguestDevice) -> None:
    g = await boot(dev, TWO_LOOPS, cpus=2)
    d = debugger(g.file)
    d.request_stop(START)
    server = GdbServer(d)
    await server.start("127.0.0.1", 0)
    reader = asyncio.create_task(run_cpus_to_end(g))
    spot = g.guest.symbols["cpu1_spot"]
    host, port = present(server.address)
    commands = [
        "set architecture i386",
        f"target remote {host}:{port}",
        f"break *{spot:#x}",
        "continue",
        "info threads",
        "info registers edi",
        "stepi",
        "info registers eip edi",
        "thread 1",
        "info registers eip",
        "delete",
        "continue",
    ]
    args = [shutil.which("gdb") or "gdb", "-batch", "-nx"]
    for command in commands:
        args += ["-ex", command]
    gdb = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(30):
        out = (await gdb.communicate())[0].decode()
        reason = await reader
    assert gdb.returncode == 0, out
    assert f"Thread 2 hit Breakpoint 1, {spot:#010x}" in out, out
    assert "Thread 1 (CPU 0" in out and "Thread 2 (CPU 1" in out, out
    assert "edi            0x7" in out and "edi            0x8" in out, out
    assert f"eip            {spot + 1:#x}" in out, out  # one instruction of CPU 1 only
    # After "thread 1": CPU 0's registers, stopped with CPU 1 somewhere in its own loop.
    after = out.split("[Switching to thread 1", 1)[1]
    eip = int(after.split("eip", 1)[1].split()[0], 16)
    assert g.guest.symbols["cpu0_loop"] <= eip < g.guest.symbols["secondary"], out
    assert reason == "done"
    await server.aclose()


@pytest.mark.one_loop
async def test_a_supervised_smp_guest_snapshotted_mid_run_and_restored_counts_exactly(
    tmp_path: Path,
) -> None:
    loops = 500_000
    image = tmp_path / "smp.img"
    image.write_bytes(assemble(smp(3, loops, SPINLOCK + XADD, check=("counter", "counter2"))).image)
    config = GuestConfig(image=image, memory="1M", cpus=3, console="null")
    async with Supervisor() as sup, asyncio.timeout(60):
        whole = await sup.launch(config)
        assert (await whole.wait()).ok  # every CPU ran, the totals were exact
        g = await sup.launch(config)
        await until(lambda: g.stats.run_time > 0.005)
        snap = await g.snapshot()
        assert len(snap.state.cpus) == 3
        await g.kill("snapshot taken")
        forks = [await sup.restore(snap, name=f"fork{i}") for i in range(2)]
        for fork in forks:
            end = await fork.wait()
            assert end.ok, end


TWO_SPINNERS = (
    r"""
main:
    LGUEST_INIT
    HCALL_REG 64, $1, $secondary, $stack1_top
1:  incl count0
    jmp 1b
secondary:
    CPU_INIT cpu1_data
2:  incl count1
    jmp 2b
.data
count0: .long 0
count1: .long 0
"""
    + CPU1_AREAS
)


async def test_a_busy_cpu_hands_the_processor_over_when_another_cpu_waits(
    dev: LguestDevice,
) -> None:
    # A lone busy CPU's slices go on on their worker (execute.run_slice's `more`), but
    # not while another CPU of the guest waits for its turn: both CPUs advance.
    g = await boot(dev, assemble(TWO_SPINNERS), cpus=2)
    readers = [asyncio.create_task(g.file.read(4, n)) for n in range(2)]
    try:
        for _ in range(3):
            a, b = g.u32("count0"), g.u32("count1")

            def both_advanced(a: int = a, b: int = b) -> bool:
                return g.u32("count0") > a and g.u32("count1") > b

            await until(both_advanced)
    finally:
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


# CPU 0 counts; CPU 1 is never started.
LONE_COUNTER = (
    r"""
main:
    LGUEST_INIT
1:  incl count0
    jmp 1b
.data
count0: .long 0
"""
    + CPU1_AREAS
)


async def test_a_withdrawn_run_of_a_two_cpu_guest_goes_round_in_one_turn() -> None:
    # An irq for a CPU whose executor run waits for a worker withdraws the run, and the
    # read's next pass comes in the loop's next turn (the wake completes what the read
    # waits for), not after the cancellation has travelled through the run's futures.
    async with LguestDevice(workers=1) as device:
        g = await boot(device, assemble(LONE_COUNTER), cpus=2)
        cpu = g.file.cpu(0)
        release = threading.Event()
        blocker = device.executor.submit(release.wait, 60.0)  # the one worker is busy
        reader = asyncio.create_task(g.file.read(4, 0))
        try:
            await until(lambda: cpu.run.queued_slice is not None)  # waits behind the blocker
            withdrawn = cpu.run.queued_slice
            slices = present(g.file.stats).slices
            await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 3))
            assert withdrawn is not None and withdrawn.cancelled()
            await asyncio.sleep(0)  # one turn of the loop
            # The read went round: a slice on the loop, then a new run behind the blocker.
            assert present(g.file.stats).slices == slices + 1
            assert cpu.run.queued_slice is not None and cpu.run.queued_slice is not withdrawn
        finally:
            release.set()
            await asyncio.wrap_future(blocker)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


async def test_an_ipi_from_a_queued_cpu_reaches_the_halted_cpus_reader_in_two_turns() -> None:
    # The Host's irq withdraws CPU 0's queued run (the one worker is busy) and its read
    # goes round in the next turn of the loop, delivers it there and does the handler's
    # SEND_IPI; CPU 1's run loop wakes in the turn after and its handler's notify ends its
    # read there.  Two turns from the irq to the notify; nothing ran on a worker.
    async with LguestDevice(workers=1) as device:
        g = await boot(device, assemble(IPI_PINGER), cpus=2)
        f = g.file
        readers = [asyncio.create_task(f.read(4, n)) for n in range(2)]
        started, release = threading.Event(), threading.Event()

        def block() -> bool:
            started.set()
            return release.wait(60.0)

        blocker = None
        try:
            await until(lambda: f.asleep(1) and f.reading(1) and g.u32("count0") > 0)
            blocker = device.executor.submit(block)  # CPU 0's run then waits behind it

            def queued() -> bool:  # CPU 0's run waits behind the blocker
                run = f.cpu(0).run.queued_slice
                return started.is_set() and run is not None and not run.done()

            await until(queued)
            slices = f.cpu_stats[1].slices
            await f.write(abi.pack_words(abi.LHREQ_IRQ, 3))
            turns = 0
            while not readers[1].done():
                await asyncio.sleep(0)
                turns += 1
            assert readers[1].result() == abi.pack_words(0x1B1)
            assert turns == 2
            # On the loop (the one worker is still blocked): CPU 1's handler in one slice.
            assert f.cpu_stats[1].slices == slices + 1
        finally:
            release.set()
            if blocker is not None:
                await asyncio.wrap_future(blocker)
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


async def test_a_cpu_with_a_raised_irq_it_cannot_take_yet_does_not_wait_for_a_worker() -> None:
    # CPU 1 stopped at the notify in its irq handler (interrupts off) and nobody reads it
    # while CPU 0's run waits for the one worker (a blocking job holds it), holding the
    # guest's processor.  Another irq for CPU 1, then a read: CPU 1 takes the processor
    # at once (CPU 0's queued run withdrawn), turns its interrupts on, halts, takes the
    # irq and notifies, all while the worker is still blocked.
    async with LguestDevice(workers=1) as device:
        g = await boot(device, assemble(IPI_PINGER), cpus=2)
        f = g.file
        reader0 = asyncio.create_task(f.read(4, 0))
        started, release = threading.Event(), threading.Event()

        def block() -> bool:
            started.set()
            return release.wait(60.0)

        def queued() -> bool:  # CPU 0's run waits behind the blocker
            run = f.cpu(0).run.queued_slice
            return started.is_set() and run is not None and not run.done()

        blocker = None
        try:
            reader1 = asyncio.create_task(f.read(4, 1))
            await until(lambda: f.asleep(1) and f.reading(1) and g.u32("count0") > 0)
            await f.write(abi.pack_words(abi.LHREQ_IRQ, 4), 1)
            assert await reader1 == abi.pack_words(0x1B1)  # stopped in its handler
            blocker = device.executor.submit(block)
            await until(queued)
            await f.write(abi.pack_words(abi.LHREQ_IRQ, 4), 1)
            # (The timeout only guards against a hang: without the turn it never ends.)
            assert await asyncio.wait_for(f.read(4, 1), 30) == abi.pack_words(0x1B1)
            assert not blocker.done() and f.cpu_stats[1].interrupts == 2
        finally:
            release.set()
            if blocker is not None:
                await asyncio.wrap_future(blocker)
            reader0.cancel()
            await asyncio.gather(reader0, return_exceptions=True)


async def test_a_halted_cpu_hibernates_alone_and_an_ipi_wakes_it() -> None:
    async with LguestDevice(hibernate_after=0) as device:
        g = await boot(device, IPI.format(first=""), cpus=2)
        assert await run_cpus_to_end(g) == "done"
        cpu1 = g.file.cpu(1)
        assert g.u32("got") == 1
        # Born frozen (offline), thawed by START_CPU; frozen again in its halt, thawed by the IPI.
        assert cpu1.stats.hibernations >= 2 and cpu1.stats.wakes >= 2


def test_the_cli_runs_swarms_of_smp_guests_and_refuses_bad_cpu_counts(tmp_path: Path) -> None:
    from test_cli import cli

    image = tmp_path / "smp.img"
    image.write_bytes(assemble(smp(2, 100_000, SPINLOCK, check=("counter2",))).image)
    proc = cli("swarm", "-n", "3", str(image), "--memory", "1M", "--cpus", "2")
    assert proc.returncode == 0, proc.stderr
    assert "swarm of 3, 2 CPUs each" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if re.search(r"\d\.\d\ds", line))
    assert re.findall(r"[\d,.]+s?", row)[:3] == ["3", "0", "0"]  # finished, failed, died
    for bad in ("0", "17"):
        proc = cli("run", str(image), "--cpus", bad)
        assert proc.returncode == 2
        assert proc.stderr.startswith("supervisor: error: ") and "cpus" in proc.stderr
        assert proc.stderr.count("\n") == 1
    # One CPU given to a guest that starts a second: START_CPU says -EINVAL, it fails.
    proc = cli("run", str(image), "--memory", "1M")
    assert proc.returncode == 3, proc.stderr  # the guest's own exit status
