"""Socket waits in threaded C guests: a thread blocked in ``recv`` or ``poll`` waits in
the thread scheduler (supervisor/sdk/runtime/net.c and threads.c), so the other
threads keep the CPU, and the file device's irq wakes it on whichever CPU it waited.

Needs the ``sdk`` extra (Zig's C compiler, musl); without it the tests skip.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from supervisor import GuestConfig, Supervisor
from supervisor.pytest_plugin import BuildGuest

LIMIT = 120  # seconds: a bound for failing, never a wait for success
PORT = 5000
ROUNDS = 40  # the computing thread's counted work: ROUNDS chunks of STEPS steps
STEPS = 20000
PAYLOAD = bytes((i * 7 + 3) & 0xFF for i in range(3000))

SOURCE = r"""
/* `recv|poll rounds steps cpus`: the main thread accepts a connection on port
 * 5000 and starts a second thread.  With 2 CPUs the two settle one per CPU and
 * the one on CPU 1 becomes the reader; with 1 CPU the second thread is.  The
 * reader waits in recv (or poll, then recv) for 3000 bytes, which it sends back;
 * meanwhile the other, once the reader is about to wait, computes `rounds`
 * chunks of a counted LCG and prints the result. */
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <lguest.h>

#define WANT 3000
static volatile int a_waiting, a_done, cpu_of[2];
static int poll_mode, rounds, steps, ncpus, conn;
static unsigned a_cpu;
static char buf[WANT];

static void read_role(void)
{
    struct pollfd p = {conn, POLLIN, 0};
    /* nothing is sent before the work is done: the timeout ends this poll */
    int early = poll_mode ? poll(&p, 1, 20) : 0;
    a_cpu = lg_cpu_id();
    a_waiting = 1;
    if (poll_mode) {
        int r = poll(&p, 1, -1);
        printf("poll %d then %d in=%d\n", early, r, (p.revents & POLLIN) != 0);
    }
    long got = recv(conn, buf, WANT, MSG_WAITALL);
    a_done = 1;
    long sent = send(conn, buf, got > 0 ? got : 0, 0);
    printf("a waited on cpu %u, got %ld, sent back %ld\n", a_cpu, got, sent);
    close(conn);
}

static void work_role(void)
{
    while (!a_waiting) sched_yield();
    unsigned x = 1;
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < steps; i++) x = x * 1103515245u + 12345u;
    printf("work %u a_done=%d\n", x, a_done);
    fflush(stdout);
}

/* Thread i (0: main): on 1 CPU thread 1 reads; on 2, the one on CPU 1. */
static void role(int i)
{
    if (ncpus > 1) {
        cpu_of[i] = lg_cpu_id() + 1;
        while (!cpu_of[!i] || cpu_of[!i] == cpu_of[i]) cpu_of[i] = lg_cpu_id() + 1;
        if (cpu_of[i] == 2) read_role();
        else work_role();
    } else if (i) {
        read_role();
    } else {
        work_role();
    }
}

static void *second(void *arg)
{
    (void)arg;
    role(1);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 5) return 2;
    poll_mode = !strcmp(argv[1], "poll");
    rounds = atoi(argv[2]), steps = atoi(argv[3]), ncpus = atoi(argv[4]);
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(5000)};
    if (bind(listener, (struct sockaddr *)&a, sizeof a) || listen(listener, 1)) return 1;
    printf("ready\n");
    fflush(stdout);
    conn = accept(listener, 0, 0);
    if (conn < 0) return 1;
    pthread_t t;
    pthread_create(&t, 0, second, 0);
    role(0);
    pthread_join(t, 0);
    printf("joined\n");
    return 0;
}
"""


@pytest.fixture
def waiter(build_guest: BuildGuest) -> Path:
    return build_guest(SOURCE, flags=["-O2", "-Wall", "-Werror"])


def lcg(n: int) -> int:
    x = 1
    for _ in range(n):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
    return x


@pytest.mark.parametrize(("cpus", "mode"), [(1, "recv"), (2, "recv"), (1, "poll"), (2, "poll")])
async def test_a_thread_waiting_for_the_network_leaves_its_cpu_to_the_others(
    waiter: Path, cpus: int, mode: str
) -> None:
    """The main thread finishes its counted work while thread A waits for data that
    the host sends only afterwards (on one CPU it could not run otherwise; on two, A
    waits on CPU 1, where the device's irq never arrives); A then gets the bytes
    exactly and sends them back."""
    async with Supervisor() as sup:
        cmdline = f"{mode} {ROUNDS} {STEPS} {cpus}"
        config = GuestConfig(image=waiter, memory="8M", cmdline=cmdline, cpus=cpus, net=True)
        guest = await sup.launch(config.model_copy(update={"name": "waiter"}))
        await guest.expect("ready", LIMIT)
        reader, writer = await sup.net.open_connection("waiter", PORT)
        work = await guest.expect(r"work (\d+) a_done=(\d)", LIMIT)
        assert (int(work[1]), work[2]) == (lcg(ROUNDS * STEPS), "0")  # A still waits
        writer.write(PAYLOAD)
        await writer.drain()
        async with asyncio.timeout(LIMIT):
            echoed = await reader.readexactly(len(PAYLOAD))
            assert await reader.read() == b""
            lines = [line async for line in guest.console]
            end = await guest.wait()
        writer.close()
    assert echoed == PAYLOAD
    tail = [line for line in lines if line]
    # A's CPU is read after the early poll, whose timeout may resume A on either CPU of
    # two (the main thread yields on the other until A waits); with recv, A never
    # leaves the CPU it chose.
    waited_on = [cpus - 1] if mode == "recv" else list(range(cpus))
    expect_a = [
        f"a waited on cpu {n}, got {len(PAYLOAD)}, sent back {len(PAYLOAD)}" for n in waited_on
    ]
    assert tail[:-2] == ([] if mode == "recv" else ["poll 0 then 1 in=1"])
    assert tail[-2] in expect_a
    assert tail[-1] == "joined"
    assert end.ok
