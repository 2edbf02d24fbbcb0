"""A guest author's test suite, written only with the lguest pytest plugin's fixtures.

tests/test_pytest_plugin.py copies this file into an empty directory and runs
it with pytest-asyncio in strict mode and in auto mode.  It is the README's
example, grown a little.
"""

import asyncio

import pytest

from supervisor import GuestConfig, LguestDevice, Supervisor
from supervisor.pytest_plugin import BuildGuest
from supervisor.testing import AsmGuest, boot, notified

HELLO = r"""
#include <stdio.h>
int main(int argc, char **argv) {
    printf("hello from %s with %d args\n", argv[0], argc - 1);
    return argc - 1;
}
"""

UPPER = r"""
#include <ctype.h>
#include <stdio.h>
int main(void) {
    int c;
    while ((c = getchar()) != EOF) putchar(toupper(c));
    return 0;
}
"""


@pytest.mark.asyncio
async def test_c_guest_prints_and_exits(
    lguest_supervisor: Supervisor, build_guest: BuildGuest
) -> None:
    image = build_guest(HELLO, flags=["-O2"])
    guest = await lguest_supervisor.launch(GuestConfig(image=image, cmdline="a b c"))
    async with asyncio.timeout(60):
        lines = [line async for line in guest.console]
        result = await guest.wait()
    assert lines == [f"hello from {image.stem} with 3 args"]
    assert result.exit_status == 3 and not result.died


@pytest.mark.asyncio
async def test_c_guest_reads_stdin(lguest_supervisor: Supervisor, build_guest: BuildGuest) -> None:
    guest = await lguest_supervisor.launch(GuestConfig(image=build_guest(UPPER)))
    guest.send("shout\nthis\n")
    guest.send_eof()
    async with asyncio.timeout(60):
        assert [line async for line in guest.console] == ["SHOUT", "THIS"]
        assert (await guest.wait()).ok


def test_images_are_cached_by_content(build_guest: BuildGuest) -> None:
    assert build_guest(HELLO, flags=["-O2"]) == build_guest(HELLO, flags=["-O2"])
    assert build_guest(HELLO) != build_guest(HELLO, flags=["-O2"])


@pytest.mark.asyncio
async def test_asm_guest_on_the_device(
    lguest_device: LguestDevice, build_guest: BuildGuest
) -> None:
    image = build_guest("main:\n LGUEST_INIT\n HCALL 17, 0x42\n1: jmp 1b\n", lang="asm")
    booted = await boot(lguest_device, AsmGuest(image.read_bytes(), {}))
    assert await notified(booted) == 0x42
