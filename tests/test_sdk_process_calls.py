"""Process-level system calls a database engine makes, in C guests: CPU affinity
(which sizes the C library's allocator arenas), user ids and record locks.

The guest is a small program of its own that repeats the call patterns; each
test runs one mode of it.  Needs the ``sdk`` extra (Zig's C compiler, musl);
without it the tests skip.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
from pathlib import Path

import pytest

from supervisor import Exit, GuestConfig, Supervisor
from supervisor.config import DirGrant
from supervisor.pytest_plugin import BuildGuest

# The subject is the C runtime's process calls, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

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


LOCKS = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

struct flock32 { short type, whence; long start, len; int pid; };

static int lk(int fd, int cmd, short type, long long start, long long len)
{
    struct flock fl = {.l_type = type, .l_whence = SEEK_SET, .l_start = start, .l_len = len};
    return fcntl(fd, cmd, &fl) ? -errno : 0;
}

static void wait_line(void)
{
    char line[16];
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) _exit(3);
}

int main(void)
{
    char data[300];
    memset(data, 'x', sizeof data);
    int a = open("/data/db", O_RDWR | O_CREAT, 0644);
    if (a < 0 || write(a, data, sizeof data) != sizeof data) return 2;
    int b = open("/data/db", O_RDWR), r = open("/data/db", O_RDONLY);
    printf("A wrlock %d\n", lk(a, F_SETLK, F_WRLCK, 0, 100));
    printf("B overlapping wrlock %d\n", lk(b, F_SETLK, F_WRLCK, 50, 100));
    struct flock q = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    fcntl(b, F_GETLK, &q);
    printf("B getlk sees %s\n", q.l_type == F_UNLCK ? "none" : "a lock");
    printf("read-only fd wrlock %d\n", lk(r, F_SETLK, F_WRLCK, 0, 1));
    puts("ready");
    wait_line();
    q = (struct flock){.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    fcntl(a, F_GETLK, &q);
    printf("getlk %d %lld %lld %d\n", q.l_type, (long long)q.l_start, (long long)q.l_len,
           q.l_pid);
    printf("setlk on theirs %d\n", lk(a, F_SETLK, F_RDLCK, 210, 10));
    puts("waiting");
    fflush(stdout);
    printf("setlkw %d\n", lk(a, F_SETLKW, F_WRLCK, 200, 50));
    close(b);
    puts("closed B");
    wait_line();
    lseek(a, 10, SEEK_SET);
    struct flock32 old = {F_RDLCK, SEEK_CUR, -10, 10, 0}; /* 0..9 */
    printf("32-bit rdlock %ld\n", syscall(SYS_fcntl64, a, 6, &old));
    int c = open("/data/db", O_RDWR);
    printf("ofd over process lock %d\n", lk(c, F_OFD_SETLK, F_WRLCK, 0, 10));
    printf("ofd elsewhere %d\n", lk(c, F_OFD_SETLK, F_WRLCK, 20, 10));
    puts("ready");
    wait_line();
    return 0;
}
"""


def _host_lock(fd: int, kind: int, start: int, length: int) -> bool:
    """Take an OFD lock on the host, without waiting: True if it was granted."""
    request = struct.pack("@hhqqi4x", kind, 0, start, length, 0)
    try:
        fcntl.fcntl(fd, 37, request)  # F_OFD_SETLK
    except BlockingIOError:
        return False
    return True


async def test_record_locks_are_the_hosts_and_the_guest_is_one_process(
    build_guest: BuildGuest, tmp_path: Path
) -> None:
    """The guest's fcntl locks hold against a host process and see its locks (GETLK,
    EAGAIN, a SETLKW that waits until the host lets go); its own descriptors never
    conflict; closing any descriptor of the file drops its locks; the 32-bit struct
    flock and OFD locks work."""
    image = build_guest(LOCKS, flags=["-O2", "-Wall", "-Werror"])
    path = tmp_path / "db"
    wr, rd, un = fcntl.F_WRLCK, fcntl.F_RDLCK, fcntl.F_UNLCK
    async with Supervisor() as sup:
        guest = await sup.launch(
            GuestConfig(image=image, memory="8M", dirs=[DirGrant(host=tmp_path, guest="/data")])
        )
        lines = aiter(guest.console)

        async def upto(marker: str) -> list[str]:
            got = []
            while (line := await anext(lines)) != marker:
                got.append(line)
            return got

        async with asyncio.timeout(LIMIT):
            assert await upto("ready") == [
                "A wrlock 0",
                "B overlapping wrlock 0",
                "B getlk sees none",
                f"read-only fd wrlock {-errno.EBADF}",
            ]
            host = os.open(path, os.O_RDWR)
            try:
                assert not _host_lock(host, rd, 0, 10)  # the guest's write lock
                assert not _host_lock(host, wr, 140, 5)  # through its other descriptor
                assert _host_lock(host, wr, 200, 50)
                guest.send("go\n")
                assert await upto("waiting") == [
                    f"getlk {wr} 200 50 -1",
                    f"setlk on theirs {-errno.EAGAIN}",
                ]
                await asyncio.sleep(0.2)  # the guest keeps asking meanwhile
                assert _host_lock(host, un, 200, 50)
                assert await upto("closed B") == ["setlkw 0"]
                assert _host_lock(host, wr, 0, 300)  # every lock went with B's close
                assert _host_lock(host, un, 0, 300)
                guest.send("go\n")
                assert await upto("ready") == [
                    "32-bit rdlock 0",
                    f"ofd over process lock {-errno.EAGAIN}",
                    "ofd elsewhere 0",
                ]
                assert _host_lock(host, rd, 0, 10) and not _host_lock(host, wr, 0, 10)
                assert not _host_lock(host, rd, 25, 1)
                guest.send("go\n")
                assert await guest.wait() == Exit(0, "power off", 0, died=False)
                assert _host_lock(host, wr, 0, 300)  # the guest's end let go of all
            finally:
                os.close(host)
