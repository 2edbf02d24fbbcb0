"""Threads in C guests: musl's pthread_create/join, mutexes, condition variables and
TLS on the runtime's clone, futex and scheduler (supervisor/sdk/runtime/threads.c),
with one CPU and several, more threads than CPUs, time slices, halting waits and
snapshots.

Needs the ``sdk`` extra (Zig's C compiler, musl); without it the tests skip.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import Exit, GuestConfig, Supervisor
from supervisor.host import GuestStats
from supervisor.pytest_plugin import BuildGuest
from supervisor.testing import until

# The subject is the C runtime's threads, run in the guest, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

LIMIT = 120  # seconds: a bound for failing, never a wait for success
EXAMPLE = Path(__file__).resolve().parent.parent / "guests" / "c" / "threads.elf"

SOURCE = r"""
/* Threads in a C guest: `mode args...` on the command line. */
#include <errno.h>
#include <fenv.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <lguest.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static long counter, loops;
static _Thread_local int tls_index = -1;
static __thread long tls_sum = 7;
static int tids[64];
static unsigned cpus_used, cpus_started;
static int hold; /* `count N LOOPS hold`: threads wait for a second CPU */

static void *count(void *arg)
{
    int i = (int)(long)arg;
    tids[i] = (int)syscall(SYS_gettid);
    /* No thread counts before a second CPU has taken one: the runtime must move
     * threads onto the CPUs it starts, however late the host runs them. */
    unsigned want = hold && lg_cpu_count() > 1 ? 2 : 1;
    __atomic_or_fetch(&cpus_started, 1u << lg_cpu_id(), __ATOMIC_SEQ_CST);
    while ((unsigned)__builtin_popcount(__atomic_load_n(&cpus_started, __ATOMIC_SEQ_CST)) < want)
        sched_yield();
    for (long k = 0; k < loops; k++) {
        pthread_mutex_lock(&lock);
        counter++;
        cpus_used |= 1u << lg_cpu_id();
        pthread_mutex_unlock(&lock);
    }
    return (void *)(long)(1000 + i);
}

static int mode_count(int n)
{
    pthread_t t[64];
    for (int i = 0; i < n; i++)
        if (pthread_create(&t[i], 0, count, (void *)(long)i)) return printf("create failed\n"), 1;
    long values = 0;
    for (int i = 0; i < n; i++) {
        void *r;
        pthread_join(t[i], &r);
        values += (long)r == 1000 + i;
    }
    int distinct = 1, main_tid = (int)syscall(SYS_gettid);
    for (int i = 0; i < n; i++) {
        if (tids[i] == main_tid || tids[i] <= 0) distinct = 0;
        for (int j = 0; j < i; j++) distinct &= tids[i] != tids[j];
    }
    printf("counter %ld expected %ld, %ld joined values right, tids %s\n", counter,
           n * loops, values, distinct ? "distinct" : "SHARED");
    printf("ran on %d cpu(s)\n", __builtin_popcount(cpus_used | cpus_started));
    return 0;
}

/* A bounded buffer of 4: the consumer must see 1..items in order. */
static int buf[4], head, tail, used, items;
static pthread_cond_t not_full = PTHREAD_COND_INITIALIZER;

static void *produce(void *arg)
{
    (void)arg;
    for (int v = 1; v <= items; v++) {
        pthread_mutex_lock(&lock);
        while (used == 4) pthread_cond_wait(&not_full, &lock);
        buf[tail] = v, tail = (tail + 1) % 4, used++;
        pthread_cond_signal(&changed);
        pthread_mutex_unlock(&lock);
    }
    return 0;
}

static int mode_pc(void)
{
    pthread_t p;
    pthread_create(&p, 0, produce, 0);
    int expect = 1, in_order = 1;
    long sum = 0;
    for (int k = 0; k < items; k++) {
        pthread_mutex_lock(&lock);
        while (!used) pthread_cond_wait(&changed, &lock);
        int v = buf[head];
        head = (head + 1) % 4, used--;
        pthread_cond_signal(&not_full);
        pthread_mutex_unlock(&lock);
        in_order &= v == expect++;
        sum += v;
    }
    pthread_join(p, 0);
    printf("consumed %d, sum %ld, %s\n", items, sum, in_order ? "in order" : "OUT OF ORDER");
    return 0;
}

static void *tls_worker(void *arg)
{
    int i = (int)(long)arg;
    long fresh = tls_sum; /* the TLS image's value in every new thread */
    tls_index = i;
    for (int k = 0; k < 200; k++) {
        tls_sum += i;
        sched_yield();
        if (tls_index != i) return (void *)-1L;
    }
    return (void *)(fresh == 7 && tls_sum == 7 + 200L * i ? (long)i : -2L);
}

static int mode_tls(int n)
{
    pthread_t t[16];
    tls_index = 100;
    for (int i = 0; i < n; i++) pthread_create(&t[i], 0, tls_worker, (void *)(long)(i + 1));
    int ok = 0;
    for (int i = 0; i < n; i++) {
        void *r;
        pthread_join(t[i], &r);
        ok += (long)r == i + 1;
    }
    printf("tls %d of %d threads own theirs, main %d %ld\n", ok, n, tls_index, tls_sum);
    return 0;
}

static volatile int stop;
static volatile unsigned long spins;

static void *spin(void *arg)
{
    (void)arg;
    while (!stop) spins++;
    return 0;
}

/* The main thread spins while a thread that yields after each step needs the
 * CPU back: every step needs the main thread preempted again. */
static volatile int steps;

static void *stepper(void *arg)
{
    (void)arg;
    for (int k = 0; k < 5; k++) {
        steps++;
        sched_yield();
    }
    return 0;
}

static int mode_spinmain(void)
{
    pthread_t t;
    pthread_create(&t, 0, stepper, 0);
    while (steps < 5) spins++;
    pthread_join(t, 0);
    printf("main preempted for all %d steps\n", steps);
    return 0;
}

static int mode_spin(void)
{
    pthread_t s, w;
    pthread_create(&s, 0, spin, 0);
    while (!spins) sched_yield(); /* the spinner has the CPU */
    pthread_create(&w, 0, count, 0);
    pthread_join(w, 0);
    stop = 1;
    pthread_join(s, 0);
    printf("spinner stopped, worker counted %ld\n", counter);
    return 0;
}

/* Every thread waits on a timed condition variable nobody signals. */
static void *timed_wait(void *arg)
{
    int rounds = (int)(long)arg, timeouts = 0;
    for (int r = 0; r < rounds; r++) {
        struct timespec at;
        clock_gettime(CLOCK_REALTIME, &at);
        at.tv_nsec += 50000000;
        if (at.tv_nsec >= 1000000000) at.tv_sec++, at.tv_nsec -= 1000000000;
        pthread_mutex_lock(&lock);
        timeouts += pthread_cond_timedwait(&changed, &lock, &at) == ETIMEDOUT;
        pthread_mutex_unlock(&lock);
    }
    return (void *)(long)timeouts;
}

extern unsigned long __lguest_idle_halts; /* the runtime's count of idle CPUs' halts */

static int mode_wait(int rounds)
{
    unsigned long before = __lguest_idle_halts;
    pthread_t t[2];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], 0, timed_wait, (void *)(long)rounds);
    long timeouts = (long)timed_wait((void *)(long)rounds);
    for (int i = 0; i < 2; i++) {
        void *r;
        pthread_join(t[i], &r);
        timeouts += (long)r;
    }
    unsigned long halts = __lguest_idle_halts - before;
    printf("timed out %ld of %d waits\n", timeouts, 3 * rounds);
    printf("%s\n", halts >= (unsigned long)rounds ? "idle CPUs halted" : "NOT HALTED");
    return 0;
}

/* Read-write locks, barriers, once, semaphores, detached threads, cancellation. */
static pthread_rwlock_t rw = PTHREAD_RWLOCK_INITIALIZER;
static pthread_barrier_t bar;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static sem_t sem;
static int inits, value, after_barrier;

static void init_once(void) { inits++; }

static void *misc_worker(void *arg)
{
    pthread_once(&once, init_once);
    pthread_rwlock_wrlock(&rw);
    value += (int)(long)arg;
    pthread_rwlock_unlock(&rw);
    pthread_barrier_wait(&bar);
    __atomic_fetch_add(&after_barrier, 1, __ATOMIC_SEQ_CST);
    sem_post(&sem);
    return 0;
}

static void *sleep_forever(void *arg)
{
    (void)arg;
    for (;;) usleep(1000); /* a cancellation point */
}

static int mode_misc(void)
{
    pthread_barrier_init(&bar, 0, 5);
    sem_init(&sem, 0, 0);
    for (int i = 0; i < 4; i++) {
        pthread_t t;
        pthread_create(&t, 0, misc_worker, (void *)(long)(i + 1));
        pthread_detach(t);
    }
    pthread_barrier_wait(&bar);
    for (int i = 0; i < 4; i++) sem_wait(&sem);
    pthread_rwlock_rdlock(&rw);
    printf("once %d, sum %d, past the barrier %d\n", inits, value, after_barrier);
    pthread_rwlock_unlock(&rw);
    pthread_t f;
    void *r;
    pthread_create(&f, 0, sleep_forever, 0);
    int c = pthread_cancel(f), j = pthread_join(f, &r);
    printf("cancel %d, join %d, %s\n", c, j, r == PTHREAD_CANCELED ? "canceled" : "NOT CANCELED");
    return 0;
}

/* Threads that wait until released, with small stacks, until creation fails. */
static int released;

static void *wait_release(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&lock);
    while (!released) pthread_cond_wait(&changed, &lock);
    pthread_mutex_unlock(&lock);
    return 0;
}

static int mode_limit(void)
{
    static pthread_t t[300];
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 8192);
    int n = 0, err = 0;
    while (n < 300 && !(err = pthread_create(&t[n], &attr, wait_release, 0))) n++;
    pthread_mutex_lock(&lock);
    released = 1;
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < n; i++) pthread_join(t[i], 0);
    int again = pthread_create(&t[0], &attr, wait_release, 0) == 0;
    if (again) pthread_join(t[0], 0);
    printf("created %d, then %s; after joining, %s\n", n, err == EAGAIN ? "EAGAIN" : strerror(err),
           again ? "created again" : "STILL FULL");
    return 0;
}

/* Two threads sum doubles in different rounding modes, preempted on one CPU;
 * then each alone.  The sums and the modes must be each thread's own. */
static volatile double fp_out[2];

static void *fp_sum(void *arg)
{
    int i = (int)(long)arg;
    int mode = i ? FE_UPWARD : FE_TONEAREST;
    fesetround(mode);
    double x = 0;
    for (long k = 1; k <= 2000000; k++) x += 1.0 / (double)(k + i);
    fp_out[i] = x;
    return (void *)(long)(fegetround() == mode);
}

static int mode_fp(void)
{
    pthread_t t[2];
    void *kept[2];
    double together[2];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], 0, fp_sum, (void *)(long)i);
    for (int i = 0; i < 2; i++) pthread_join(t[i], &kept[i]);
    for (int i = 0; i < 2; i++) together[i] = fp_out[i];
    int same = 1;
    for (int i = 0; i < 2; i++) {
        pthread_create(&t[i], 0, fp_sum, (void *)(long)i);
        pthread_join(t[i], 0);
        same &= fp_out[i] == together[i];
    }
    printf("sums %s, modes kept %ld %ld, main's %s\n", same ? "as alone" : "DIFFER",
           (long)kept[0], (long)kept[1], fegetround() == FE_TONEAREST ? "kept" : "CHANGED");
    return 0;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    int n = argc > 2 ? atoi(argv[2]) : 4;
    loops = argc > 3 ? atol(argv[3]) : 10000;
    items = 1000;
    if (!strcmp(mode, "count")) return hold = argc > 4 && !strcmp(argv[4], "hold"), mode_count(n);
    if (!strcmp(mode, "pc")) return items = n, mode_pc();
    if (!strcmp(mode, "tls")) return mode_tls(n);
    if (!strcmp(mode, "spin")) return mode_spin();
    if (!strcmp(mode, "spinmain")) return mode_spinmain();
    if (!strcmp(mode, "wait")) return mode_wait(n);
    if (!strcmp(mode, "misc")) return mode_misc();
    if (!strcmp(mode, "fp")) return mode_fp();
    if (!strcmp(mode, "limit")) return mode_limit();
    if (!strcmp(mode, "fork")) {
        errno = 0;
        pid_t pid = fork();
        printf("fork %d %s\n", (int)pid, errno == ENOSYS ? "ENOSYS" : strerror(errno));
        return 0;
    }
    printf("modes: count N LOOPS [hold], pc ITEMS, tls N, spin LOOPS, wait ROUNDS\n");
    return 2;
}
"""


@pytest.fixture
def threads_guest(build_guest: BuildGuest) -> Path:
    return build_guest(SOURCE, flags=["-O2", "-Wall", "-Werror"])


async def run_guest(
    image: Path, cpus: int, cmdline: str, memory: str = "8M", **config: object
) -> tuple[list[str], Exit, GuestStats]:
    """The guest's console lines, its Exit and its counters."""
    async with Supervisor() as sup:
        guest = await sup.launch(
            GuestConfig(image=image, memory=memory, cmdline=cmdline, cpus=cpus, **config)
        )
        async with asyncio.timeout(LIMIT):
            lines = [line async for line in guest.console]
            return lines, await guest.wait(), guest.stats


@pytest.mark.parametrize("cpus", [1, 2, 4])
async def test_threads_increment_a_mutex_protected_counter_exactly(
    threads_guest: Path, cpus: int
) -> None:
    """Eight threads, more than CPUs: the count is exact, each join returns its
    thread's value, tids differ, and with several CPUs the threads used more than one
    (the guest holds its threads back until a second CPU has taken one)."""
    lines, result, _ = await run_guest(threads_guest, cpus, "count 8 4000 hold")
    assert lines[0] == "counter 32000 expected 32000, 8 joined values right, tids distinct"
    used = int(lines[1].split()[2])
    assert (used == 1) if cpus == 1 else (1 < used <= cpus)
    assert result == Exit(0, "power off", 0, died=False)


@pytest.mark.parametrize("cpus", [1, 2])
async def test_a_condition_variable_producer_and_consumer_keep_the_sequence(
    threads_guest: Path, cpus: int
) -> None:
    lines, result, _ = await run_guest(threads_guest, cpus, "pc 2000")
    assert lines == ["consumed 2000, sum 2001000, in order"]
    assert result.ok


@pytest.mark.parametrize("cpus", [1, 3])
async def test_thread_local_variables_are_per_thread(threads_guest: Path, cpus: int) -> None:
    """Each thread starts from the TLS image (7), keeps its own values across yields
    and moves between CPUs; the main thread's are untouched."""
    lines, result, _ = await run_guest(threads_guest, cpus, "tls 6")
    assert lines == ["tls 6 of 6 threads own theirs, main 100 7"]
    assert result.ok


async def test_a_spinning_thread_does_not_starve_others_on_one_cpu(
    threads_guest: Path,
) -> None:
    """The spinner never yields; only the clock's time slice lets the worker (and main,
    which joins it and then stops the spinner) run at all."""
    lines, result, _ = await run_guest(threads_guest, 1, "spin 1 3000")
    assert lines == ["spinner stopped, worker counted 3000"]
    assert result.ok


async def test_a_spinning_main_thread_is_preempted_again_and_again(
    threads_guest: Path,
) -> None:
    """The main thread keeps its interrupts (and so its time slices) after creating a
    thread: the stepper needs the CPU back five times while main spins."""
    lines, result, _ = await run_guest(threads_guest, 1, "spinmain")
    assert lines == ["main preempted for all 5 steps"]
    assert result.ok


@pytest.mark.parametrize("cpus", [1, 2])
async def test_futex_waits_halt_the_cpu(threads_guest: Path, cpus: int) -> None:
    """Three threads wait on timed condition variables nobody signals, 6 rounds of
    50 ms: in every round each CPU runs out of threads and its idle loop halts (the
    runtime counts those halts: at least one a round).  Halted, a CPU makes no
    hypercalls however long the wait, so their count is bounded by the rounds (an
    idle loop that polled, re-arming its clock, made thousands); and it hibernates
    (here at once: hibernate_after=0) and thaws with its threads intact.  (A wait
    whose deadline has passed before it begins returns at once: 50 ms leaves room
    for a loaded host.)"""
    lines, result, stats = await run_guest(threads_guest, cpus, "wait 6", hibernate_after=0)
    assert lines == ["timed out 18 of 18 waits", "idle CPUs halted"]
    assert result.ok
    assert stats.hypercalls < 100 + 40 * 6
    assert stats.hibernations > 0


@pytest.mark.parametrize("cpus", [1, 2])
async def test_rwlocks_barriers_once_semaphores_detach_and_cancel(
    threads_guest: Path, cpus: int
) -> None:
    lines, result, _ = await run_guest(threads_guest, cpus, "misc")
    assert lines == ["once 1, sum 10, past the barrier 4", "cancel 0, join 0, canceled"]
    assert result.ok


async def test_thread_creation_stops_at_the_limit_and_slots_are_reused(
    threads_guest: Path,
) -> None:
    lines, result, _ = await run_guest(threads_guest, 2, "limit", memory="32M")
    assert lines == ["created 255, then EAGAIN; after joining, created again"]
    assert result.ok


async def test_each_thread_keeps_its_own_floating_point_state(threads_guest: Path) -> None:
    """x87/SSE registers, control word and MXCSR are saved at every switch: two
    threads in different rounding modes, preempted on one CPU, get the sums they
    get alone and keep their modes."""
    lines, result, _ = await run_guest(threads_guest, 1, "fp")
    assert lines == ["sums as alone, modes kept 1 1, main's kept"]
    assert result.ok


async def test_fork_is_not_provided(threads_guest: Path) -> None:
    lines, result, _ = await run_guest(threads_guest, 1, "fork")
    assert lines == ["fork -1 ENOSYS"]
    assert result.ok


async def test_a_snapshot_of_running_threads_restores_and_counts_exactly(
    threads_guest: Path,
) -> None:
    """The scheduler's state (threads, run queue, futex waiters) is guest memory, the
    CPUs' registers and TLS slots the CPU state: a copy restored mid-count finishes
    with the exact count."""
    async with Supervisor() as sup:
        guest = await sup.launch(
            GuestConfig(image=threads_guest, memory="8M", cmdline="count 6 600000", cpus=2)
        )
        async with asyncio.timeout(LIMIT):
            await until(lambda: guest.stats.exits > 200, timeout=LIMIT)
            snap = await guest.snapshot()
            assert not guest.done
            await guest.kill()
            copy = await sup.restore(snap, name="copy")
            lines = [line async for line in copy.console]
            result = await copy.wait()
    assert lines[0] == "counter 3600000 expected 3600000, 6 joined values right, tids distinct"
    assert result.ok


@pytest.mark.parametrize("cpus", ["1", "3"])
def test_the_threads_example_counts_primes_from_the_cli(cpus: str) -> None:
    """guests/c/threads.elf (committed: runs without Zig): a work queue on a mutex
    and two condition variables, six workers returning _Thread_local tallies."""
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", str(EXAMPLE), "--cpus", cpus,
         "--cmdline", "threads=6 n=5000"],
        capture_output=True,
        text=True,
        timeout=LIMIT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["6 threads: 669 primes up to 5000"]
