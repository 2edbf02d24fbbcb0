"""C guests with several CPUs: lg_start_cpu, lg_cpu_id, lg_send_ipi, lg_spinlock and
the __atomic builtins, through `supervisor run --cpus N` and
GuestConfig(cpus=N).

Needs the ``sdk`` extra (Zig's C compiler) for the tests that build a guest; the
committed guests/c/smp.elf runs without it.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import Exit, GuestConfig, Supervisor
from supervisor.pytest_plugin import BuildGuest
from supervisor.testing import until

# The subject is the C runtime's CPUs and atomics, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

GUESTS = Path(__file__).resolve().parent.parent / "guests"
SMP = GUESTS / "c" / "smp.elf"
LIMIT = 120  # seconds: a bound for failing, never a wait for success
LOOPS = 1_000_000


async def run_guest(
    image: Path, cpus: int, cmdline: str = "", memory: str = "4M"
) -> tuple[list[str], Exit]:
    async with Supervisor() as sup:
        guest = await sup.launch(
            GuestConfig(image=image, memory=memory, cmdline=cmdline, cpus=cpus)
        )
        async with asyncio.timeout(LIMIT):
            lines = [line async for line in guest.console]
            return lines, await guest.wait()


def smp_lines(cpus: int, loops: int) -> list[str]:
    total = cpus * loops
    return [
        f"cpus {cpus}, ids distinct",
        f"atomic {total}, locked {total}, expected {total}",
        "exact",
    ]


def test_smp_guest_counts_exactly_on_two_cpus_from_the_cli() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor",
            "run",
            str(SMP),
            "--cpus",
            "2",
            "--cmdline",
            f"loops={LOOPS}",
        ],
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == smp_lines(2, LOOPS)


async def test_smp_guest_counts_exactly_on_four_cpus() -> None:
    lines, result = await run_guest(SMP, cpus=4, cmdline=f"loops={LOOPS}")
    assert lines == smp_lines(4, LOOPS)
    assert result == Exit(0, "power off", 0, died=False)


async def test_smp_guest_asked_for_fewer_cpus_than_it_has() -> None:
    lines, result = await run_guest(SMP, cpus=3, cmdline="cpus=2 loops=1000")
    assert lines == smp_lines(2, 1000)
    assert result.ok


PROBE = r"""
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <lguest.h>

static _Thread_local int tls_var = 7;
static volatile unsigned ready, cpu1_done, cpu2_done;
static volatile unsigned ipi_cpu = 99, ipi_count;
static volatile int cpu1_tls, cpu1_errno, cpu1_slept, cpu2_id, cpu1_id;
static uint64_t wide;
static lg_spinlock_t print_lock = LG_SPINLOCK_INIT;

static void on_ipi(unsigned irq)
{
    ipi_cpu = lg_cpu_id() * 100 + irq;
    __atomic_fetch_add(&ipi_count, 1, __ATOMIC_SEQ_CST);
}

struct quad {
    unsigned a, b, c, d;
};
static struct quad quad; /* 16 bytes: compiler-rt's lock-table atomics */

static void add_wide(void)
{
    for (int i = 0; i < 100000; i++) __atomic_fetch_add(&wide, 0x100000001ull, __ATOMIC_RELAXED);
    for (int i = 0; i < 10000; i++) {
        struct quad old, new;
        __atomic_load(&quad, &old, __ATOMIC_SEQ_CST);
        do {
            new = (struct quad){old.a + 1, old.b + 1, old.c + 1, old.d + 1};
        } while (!__atomic_compare_exchange(&quad, &old, &new, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST));
    }
}

static void cpu1(void *arg)
{
    cpu1_id = (int)lg_cpu_id() + (int)(uintptr_t)arg;
    cpu1_tls = tls_var;              /* fresh from the TLS image: 7 */
    tls_var = 1000;
    errno = 0;
    link("x", "y");                  /* ENOSYS, in this CPU's errno */
    cpu1_errno = errno;
    uint64_t t0 = lguest_monotonic_ns();
    struct timespec ts = {0, 2000000};
    nanosleep(&ts, 0);               /* this CPU's clock and halt */
    cpu1_slept = lguest_monotonic_ns() - t0 >= 2000000;
    add_wide();
    __atomic_store_n(&ready, 1, __ATOMIC_SEQ_CST);
    while (!ipi_count) lguest_halt(); /* woken by CPU 0's IPI; the handler runs here */
    cpu1_done = 1;
}

static void cpu2(void *arg)
{
    (void)arg;
    cpu2_id = (int)lg_cpu_id();
    static const char msg[] = "hello from cpu 2\n";
    uint32_t was = lg_spin_lock_irqsave(&print_lock);
    write(1, msg, sizeof msg - 1);
    lg_spin_unlock_irqrestore(&print_lock, was);
    cpu2_done = 1;
}

int main(void)
{
    lguest_set_irq_handler(5, on_ipi);
    tls_var = 10;
    int a = lg_start_cpu(cpu1, (void *)(uintptr_t)40);
    int b = lg_start_cpu(cpu2, 0);
    int c = lg_start_cpu(cpu2, 0);
    int d = lg_start_cpu(cpu2, 0);
    errno = 0;
    add_wide();
    while (!ready) __builtin_ia32_pause();
    int bad_cpu = lg_send_ipi(9, 5), bad_irq = lg_send_ipi(1, 32);
    int ipi = lg_send_ipi(1, 5);
    while (!cpu1_done || !cpu2_done) __builtin_ia32_pause();
    uint32_t was = lg_spin_lock_irqsave(&print_lock);
    printf("start %d %d %d %d, ids %u %d %d\n", a, b, c, d, lg_cpu_id(), cpu1_id, cpu2_id);
    printf("ipi %d %d %d: ran on %u, %u time(s)\n", ipi, bad_cpu, bad_irq, ipi_cpu, ipi_count);
    printf("tls cpu0 %d cpu1 %d; errno cpu0 %d cpu1 %s; slept %d\n", tls_var, cpu1_tls,
           errno, cpu1_errno == ENOSYS ? "ENOSYS" : "?", cpu1_slept);
    printf("wide %s\n", wide == 2 * 100000 * 0x100000001ull ? "exact" : "WRONG");
    printf("quad %u %u %u %u\n", quad.a, quad.b, quad.c, quad.d);
    lg_spin_unlock_irqrestore(&print_lock, was);
    return 0;
}
"""


async def test_cpu_ids_start_past_the_last_cpu_ipis_tls_errno_and_atomics(
    build_guest: BuildGuest,
) -> None:
    image = build_guest(PROBE, flags=["-O2", "-Wall", "-Werror", "-Wno-atomic-alignment"])
    lines, result = await run_guest(image, cpus=3)
    assert lines == [
        "hello from cpu 2",
        "start 1 2 -1 -1, ids 0 41 2",
        "ipi 0 -1 -1: ran on 105, 1 time(s)",
        "tls cpu0 10 cpu1 7; errno cpu0 0 cpu1 ENOSYS; slept 1",
        "wide exact",
        "quad 20000 20000 20000 20000",
    ]
    assert result.ok


async def test_lg_start_cpu_on_a_one_cpu_guest_returns_minus_one(
    build_guest: BuildGuest,
) -> None:
    image = build_guest(
        r"""
#include <stdio.h>
#include <lguest.h>
static void never(void *arg) { (void)arg; }
int main(void) {
    int a = lg_start_cpu(never, 0), b = lg_start_cpu(never, 0);
    printf("%d %d %u of %u\n", a, b, lg_cpu_id(), lg_cpu_count());
    return 0;
}
"""
    )
    lines, result = await run_guest(image, cpus=1)
    assert lines == ["-1 -1 0 of 1"]
    assert result.ok
    lines, result = await run_guest(image, cpus=3)  # the boot info says how many
    assert lines == ["1 2 0 of 3"]
    assert result.ok


async def test_a_crash_on_a_started_cpu_kills_the_guest_with_its_reason(
    build_guest: BuildGuest,
) -> None:
    image = build_guest(
        r"""
#include <lguest.h>
static void boom(void *arg) { (void)arg; *(volatile int *)0 = 1; }
int main(void) {
    lg_start_cpu(boom, 0);
    for (;;) lguest_halt();
}
"""
    )
    _, result = await run_guest(image, cpus=2)
    assert result.died
    assert result.reason.startswith("CRASH: NULL pointer dereference: write at 0x00000000")


async def test_a_started_cpu_s_stack_has_a_guard_page(build_guest: BuildGuest) -> None:
    """CPU 1's stack (256 KiB without --stack-size, from free memory) sits above an
    unmapped page."""
    image = build_guest(
        r"""
#include <stdio.h>
#include <lguest.h>
static volatile unsigned long sp1;
static volatile int go;
static int deep(int n) {
    volatile char pad[512];
    pad[0] = (char)n;
    return n ? deep(n - 1) + pad[0] : 0;
}
static void cpu1(void *arg) {
    volatile int here;
    sp1 = (unsigned long)&here;
    while (!go) __builtin_ia32_pause();
    deep(100000);
}
int main(void) {
    lg_start_cpu(cpu1, 0);
    while (!sp1) __builtin_ia32_pause();
    extern unsigned __lguest_stack_guard_page;  /* CPU 0's */
    printf("%#lx %#x\n", sp1, __lguest_stack_guard_page);
    fflush(stdout);
    go = 1;
    for (;;) lguest_halt();
}
""",
        flags=["-O1"],
    )
    lines, result = await run_guest(image, cpus=2)
    assert result.died
    match = re.fullmatch(
        r"cannot push interrupt frame: stack at (0x[0-9a-f]+) is not writable", result.reason
    )
    assert match, result.reason
    sp1, guard = (int(word, 16) for word in lines[0].split())
    fault = int(match[1], 16)
    assert not guard <= fault < guard + 4096  # not CPU 0's guard page
    assert 0 < sp1 - fault <= 256 * 1024 + 4096  # just below CPU 1's 256 KiB stack


async def test_a_snapshot_mid_run_restores_every_cpu_and_its_percpu_segment() -> None:
    """Restored mid-count, the copy still finishes exactly; its printf goes through
    lg_cpu_data() (%fs), which would fault on page 0 had %fs been lost."""
    loops = 15_000_000  # a few hundred slices: the snapshot lands mid-count
    async with Supervisor() as sup:
        guest = await sup.launch(
            GuestConfig(image=SMP, memory="4M", cmdline=f"loops={loops}", cpus=2)
        )
        async with asyncio.timeout(LIMIT):
            await until(lambda: guest.stats.exits > 40, timeout=LIMIT)  # slices
            snap = await guest.snapshot()
            assert not guest.done
            await guest.kill()
            copy = await sup.restore(snap, name="copy")
            lines = [line async for line in copy.console]
            result = await copy.wait()
    assert lines == smp_lines(2, loops)
    assert result.ok
