"""Process-level system calls a database engine makes, in C guests: CPU affinity
(which sizes the C library's allocator arenas) and user ids.

The guest is a small program of its own that repeats the call patterns; each
test runs one mode of it.  Needs the ``sdk`` extra (Zig's C compiler, musl);
without it the tests skip.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from supervisor import Exit, GuestConfig, Supervisor
from supervisor.pytest_plugin import BuildGuest

LIMIT = 120  # seconds: a bound for failing, never a wait for success

SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int mode_affinity(void)
{
    unsigned char mask[128];
    memset(mask, 0xAA, sizeof mask);
    long n = syscall(SYS_sched_getaffinity, 0, sizeof mask, mask);
    printf("bytes %ld mask %02x%02x%02x%02x next %02x\n", n, mask[3], mask[2], mask[1],
           mask[0], mask[4]);
    cpu_set_t set;
    CPU_ZERO(&set);
    int r = sched_getaffinity(0, sizeof set, &set);
    printf("libc %d count %d nprocs %ld\n", r, CPU_COUNT(&set), sysconf(_SC_NPROCESSORS_ONLN));
    errno = 0;
    long small = syscall(SYS_sched_getaffinity, 0, 2, mask);
    int small_errno = errno;
    errno = 0;
    long other = syscall(SYS_sched_getaffinity, 4242, sizeof mask, mask);
    printf("short %ld %s, no such pid %ld %s\n", small, strerror(small_errno), other,
           strerror(errno));
    return 0;
}

/* Blocks of two sizes allocated and freed in rounds of growing size, as a
 * database's page cache does: the live memory never passes 1 MiB. */
static int mode_churn(void)
{
    static void *big[256], *small[256];
    for (int round = 0; round < 200; round++) {
        int n = 32 + round % 200;
        for (int i = 0; i < n; i++) {
            big[i] = malloc(4000), small[i] = malloc(100);
            if (!big[i] || !small[i]) return printf("out of memory in round %d\n", round), 1;
            memset(big[i], 1, 4000), memset(small[i], 2, 100);
        }
        for (int i = 0; i < n; i++) free(big[i]), free(small[i]);
    }
    puts("churn ok");
    return 0;
}

static int mode_ids(void)
{
    printf("uid %ld gid %ld euid %ld egid %ld\n", (long)getuid(), (long)getgid(),
           (long)geteuid(), (long)getegid());
    printf("16-bit %ld %ld %ld %ld\n", syscall(SYS_getuid), syscall(SYS_getgid),
           syscall(SYS_geteuid), syscall(SYS_getegid));
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) return 2;
    if (!strcmp(argv[1], "affinity")) return mode_affinity();
    if (!strcmp(argv[1], "churn")) return mode_churn();
    if (!strcmp(argv[1], "ids")) return mode_ids();
    return 2;
}
"""


@pytest.fixture
def probe(build_guest: BuildGuest) -> Path:
    return build_guest(SOURCE, flags=["-O2", "-Wall", "-Werror"])


async def run_guest(
    image: Path, cmdline: str, cpus: int = 1, memory: str = "16M"
) -> tuple[list[str], Exit]:
    async with Supervisor() as sup:
        guest = await sup.launch(
            GuestConfig(image=image, memory=memory, cmdline=cmdline, cpus=cpus)
        )
        async with asyncio.timeout(LIMIT):
            lines = [line async for line in guest.console]
            return lines, await guest.wait()


@pytest.mark.parametrize("cpus", [1, 3])
async def test_sched_getaffinity_is_the_guests_cpus(probe: Path, cpus: int) -> None:
    """One long of mask (bytes past it untouched), one bit per CPU of the guest;
    a buffer shorter than a long is EINVAL and a pid that is no thread ESRCH."""
    lines, result = await run_guest(probe, "affinity", cpus=cpus)
    mask = (1 << cpus) - 1
    assert lines == [
        f"bytes 4 mask {mask:08x} next aa",
        f"libc 0 count {cpus} nprocs {cpus}",
        "short -1 Invalid argument, no such pid -1 No such process",
    ]
    assert result.ok


async def test_malloc_reuses_freed_memory_in_a_small_guest(probe: Path) -> None:
    """The C library's allocator keeps one arena per CPU that sched_getaffinity
    reports; blocks freed in rounds come back, so a 16 MiB guest (about 7.8 MiB
    of heap) never runs out with 1 MiB live."""
    lines, result = await run_guest(probe, "churn")
    assert lines == ["churn ok"]
    assert result.ok


async def test_user_and_group_ids_are_root(probe: Path) -> None:
    """getuid, getgid, geteuid, getegid (the 32-bit calls musl makes and the
    16-bit ones) are 0: the guest's only user."""
    lines, result = await run_guest(probe, "ids")
    assert lines == ["uid 0 gid 0 euid 0 egid 0", "16-bit 0 0 0 0"]
    assert result.ok
