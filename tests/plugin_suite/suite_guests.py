"""A guest author's test suite, written only with the lguest pytest plugin's fixtures.

tests/test_pytest_plugin.py copies this file into an empty directory and runs
it with pytest-asyncio in strict mode and in auto mode.  It is the README's
example, grown a little.
"""

import asyncio
import random

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


SHOUTER = r"""
#include <ctype.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(7000)};
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) || listen(lfd, 1)) return 1;
    puts("listening");
    fflush(stdout);
    int c = accept(lfd, 0, 0);
    char buf[256];
    ssize_t got = read(c, buf, sizeof buf);
    for (ssize_t i = 0; i < got; i++) buf[i] = toupper((unsigned char)buf[i]);
    if (got > 0) write(c, buf, got);
    close(c);
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


@pytest.mark.asyncio
async def test_networked_guest_serves_the_host(
    lguest_net_supervisor: Supervisor, build_guest: BuildGuest
) -> None:
    sup = lguest_net_supervisor
    server = await sup.launch(GuestConfig(image=build_guest(SHOUTER), name="shouter"))
    alone = await sup.launch(GuestConfig(image=build_guest(UPPER), name="alone", net=False))
    async with asyncio.timeout(60):
        await server.expect("listening")
        assert [member.name for member in sup.net.members] == ["host", "shouter"]
        reader, writer = await sup.net.open_connection("shouter", 7000)
        writer.write(b"over the network\n")
        await writer.drain()
        assert await reader.read() == b"OVER THE NETWORK\n"
        writer.close()
        assert (await server.wait()).ok
        alone.send_eof()
        assert (await alone.wait()).ok


@pytest.mark.lguest_network(seed=7, connect_timeout=2.0)
@pytest.mark.asyncio
async def test_the_marker_makes_the_network(lguest_net_supervisor: Supervisor) -> None:
    assert lguest_net_supervisor.net.connect_timeout == 2.0
    assert lguest_net_supervisor.net.random.random() == random.Random(7).random()
