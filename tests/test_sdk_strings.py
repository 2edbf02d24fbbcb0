"""The runtime's strlen and memchr (supervisor/sdk/runtime/strings.c), 16 bytes a step:
C's results at every alignment and length, and they are the ones a guest links."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from supervisor import GuestConfig, Supervisor
from supervisor.pytest_plugin import BuildGuest

# The subject is the C runtime's string functions, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

LIMIT = 60  # seconds: a bound for failing, never a wait for success

PROBE = r"""
#include <stdio.h>
#include <string.h>

static char buf[4096] __attribute__((aligned(4096)));

static size_t slow_len(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
static const void *slow_chr(const char *s, int c, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] == (unsigned char)c) return s + i;
    return 0;
}

int main(void)
{
    long checks = 0;
    for (int at = 0; at < 48; at++)
        for (int len = 0; len < 100; len++) {
            char *s = buf + at;
            memset(buf, 'x', sizeof buf);
            for (int i = 0; i < len; i++) s[i] = (char)(1 + (i * 37 + at) % 254);
            s[len] = 0;
            if (strlen(s) != slow_len(s)) { printf("strlen at %d len %d\n", at, len); return 1; }
            checks++;
            for (int c = -1; c < 256; c += 17)
                for (int n = 0; n <= len + 1; n += 1 + n / 8) {
                    if (memchr(s, c, (size_t)n) != slow_chr(s, c, (size_t)n)) {
                        printf("memchr at %d len %d c %d n %d\n", at, len, c, n);
                        return 1;
                    }
                    checks++;
                }
        }
    /* the last bytes of the page: a string that ends there, and a search to its end */
    memset(buf, 'y', sizeof buf);
    buf[sizeof buf - 1] = 0;
    for (int back = 1; back < 40; back++) {
        const char *s = buf + sizeof buf - back;
        if (strlen(s) != (size_t)back - 1 || memchr(s, 'z', (size_t)back) != 0 ||
            memchr(s, 0, (size_t)back) != buf + sizeof buf - 1) {
            printf("page end %d\n", back);
            return 1;
        }
        checks++;
    }
    printf("ok %ld\n", checks);
    return 0;
}
"""


async def test_strlen_and_memchr_give_cs_results(build_guest: BuildGuest) -> None:
    image = build_guest(PROBE, flags=("-O2",))
    async with asyncio.timeout(LIMIT), Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=image, memory="4M"))
        lines = [line async for line in guest.console]
        assert (await guest.wait()).ok, lines
    assert len(lines) == 1 and lines[0].startswith("ok ") and int(lines[0][3:]) > 100_000


@pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils missing")
def test_the_guest_links_the_runtimes_strlen_and_memchr(build_guest: BuildGuest) -> None:
    image = Path(build_guest(PROBE, flags=("-O2",)))
    symbols = subprocess.run(
        ["objdump", "-t", str(image)], check=True, capture_output=True, text=True
    ).stdout
    names = {line.split()[-1] for line in symbols.splitlines() if line.strip()}
    assert {"strlen", "memchr"} <= names
    # the C library's byte-at-a-time versions are not linked in
    assert not [n for n in names if n.endswith(".memchr") or n.endswith(".strlen")]
