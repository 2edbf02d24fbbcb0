"""epoll for C guests: Linux's errors, interest-list semantics, servers of several
TCP clients, level- and edge-triggered, and what a snapshot keeps.

The guest is tests/c/epollprobe.c (one mode per run).  Needs the ``sdk`` extra.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from supervisor import Exit, Guest, GuestConfig, Supervisor
from supervisor import net as netmod
from supervisor.launcher import epoll, files
from supervisor.launcher.devices import Slot
from supervisor.memory import GuestMemory
from supervisor.pytest_plugin import BuildGuest

HERE = Path(__file__).resolve().parent
LIMIT = 60  # seconds: a bound for failing, never a wait for success


@pytest.fixture
def probe(build_guest: BuildGuest) -> Path:
    return build_guest((HERE / "c" / "epollprobe.c").read_text(), flags=("-O2",))


async def launch(sup: Supervisor, image: Path, name: str, cmdline: str, **extra: object) -> Guest:
    config = GuestConfig(image=image, name=name, cmdline=cmdline, memory="4M", net=True)
    return await sup.launch(config.model_copy(update=extra) if extra else config)


async def output(guest: Guest) -> tuple[list[str], Exit]:
    async with asyncio.timeout(LIMIT):
        lines = [line async for line in guest.console]
        return lines, await guest.wait()


async def test_epoll_errors_and_interest_list_semantics(probe: Path) -> None:
    async with Supervisor() as sup:
        lines, end = await output(await launch(sup, probe, "e", "errors", max_files=64))
    assert end == Exit(0, "power off")
    assert lines == [
        "create0 -1 EINVAL",
        "create1-flags -1 EINVAL",
        "cloexec 1 OK",  # EPOLL_CLOEXEC
        "plain 0 OK",
        "add-badep -1 EBADF",
        "add-badfd -1 EBADF",
        "add-negfd -1 EBADF",
        "add-notep -1 EINVAL",  # epfd is a socket
        "add-self -1 EINVAL",
        "add-null -1 EFAULT",
        "op-bad -1 EINVAL",
        "mod-absent -1 ENOENT",
        "del-absent -1 ENOENT",
        "add 0 OK",
        "add-again -1 EEXIST",
        "add-file -1 EPERM",  # a regular file
        "nest 0 OK",
        "loop -1 ELOOP",
        "nested 1 1:7",  # an instance with an event ready is readable
        "chain 2 OK",
        "chain 3 OK",
        "chain 4 OK",
        "chain 5 OK",
        "chain 6 ELOOP",  # 6 instances in a row
        "below -1 ELOOP",  # so is lengthening a chain of 5 from below
        "below-short 0 OK",
        "wait-badep -1 EBADF",
        "wait-notep -1 EINVAL",
        "wait-zero -1 EINVAL",
        "wait-null -1 EFAULT",
        "read-ep -1 EINVAL",
        "ready 1 4:1122334455667788",  # data.u64 as given
        "after-close 1 4:1122334455667788",  # a dup still holds the description
        "after-last 0",  # its last descriptor closed: the interest is gone
        "del-closed -1 EBADF",
        "oneshot 0 OK",
        "oneshot-1 1 4:2",
        "oneshot-2 0",  # disarmed
        "rearm 0 OK",
        "oneshot-3 1 4:3",
        "mod-et 0 OK",
        "et-1 1 4:4",
        "et-2 0",  # still writable, but no new edge
        "del 0 OK",
        "turn 1 5",
        "turn 1 6",  # the other ready one, not the first again
        "turn 1 5",
        "timeout 0",
        "add-stdout 0 OK",
        "stdout 1 4:9",
        "dup 1 4:9",  # the dup'ed epoll descriptor is the same instance
        "wait-closed -1 EBADF",
        "emfile 1 EMFILE",
    ]


@pytest.mark.parametrize("threads", ["", " threads"])
async def test_epoll_waits_on_console_input_and_sockets_together(probe: Path, threads: str) -> None:
    async with Supervisor() as sup:
        guest = await launch(sup, probe, "con", f"console 7000{threads}")
        await guest.expect("ready", LIMIT)
        guest.send("typed\n")
        await guest.expect("stdin typed", LIMIT)
        reader, writer = await sup.net.open_connection("con", 7000)
        writer.write(b"12345")
        writer.write_eof()
        lines, end = await output(guest)
        assert reader.at_eof() or await reader.read() == b""
    assert lines == ["", "event 200", "client 5", "timeout 0"]
    assert end.ok


async def test_a_guests_epoll_interests_are_bounded(probe: Path) -> None:
    async with Supervisor() as sup:
        lines, end = await output(await launch(sup, probe, "b", "budget", max_files=64))
    assert lines == [
        f"budget {epoll.WATCHES_PER_FILE * 64} ENOSPC",  # of 32 x 31 asked
        "churn 2000 OK",  # interests of closed sockets are swept, never counted
    ]
    assert end.ok


async def test_edge_triggered_hears_of_data_that_came_after_a_drain(probe: Path) -> None:
    async with Supervisor() as sup:
        guest = await launch(sup, probe, "et", "etrace 7100")
        await guest.expect("listening", LIMIT)
        _reader, writer = await sup.net.open_connection("et", 7100)
        writer.write(b"one")
        await guest.expect("drained EAGAIN", LIMIT)
        writer.write(b"two")  # the socket is still readable-flagged from "one"'s edge
        await writer.drain()
        guest.send("go\n")
        lines, end = await output(guest)
        writer.close()
    assert lines == ["", "second 1 1:1", "third 0"]
    assert end.ok


async def _clients(sup: Supervisor, name: str, port: int, count: int) -> list[bytes]:
    """``count`` host connections to the guest, written in turn, each echoed whole."""
    conns = [await sup.net.open_connection(name, port) for _ in range(count)]
    for rnd in range(3):
        for i, (_, writer) in enumerate(conns):
            writer.write(f"client {i} round {rnd};".encode() * (1 + 500 * rnd))
    got: list[bytes] = []
    for reader, writer in conns:
        writer.write_eof()
        got.append(await reader.read())
        writer.close()
    return got


@pytest.mark.parametrize("mode", ["", " et", " et threads"])
async def test_an_epoll_server_serves_several_clients(probe: Path, mode: str) -> None:
    count = 5
    async with Supervisor() as sup:
        guest = await launch(sup, probe, "srv", f"serve 7 {count}{mode}")
        await guest.expect("listening 7", LIMIT)
        async with asyncio.timeout(LIMIT):
            got = await _clients(sup, "srv", 7, count)
        lines, end = await output(guest)
    sent = [
        b"".join(f"client {i} round {r};".encode() * (1 + 500 * r) for r in range(3))
        for i in range(count)
    ]
    assert got == sent  # every byte back, in order, on its own connection
    total = sum(map(len, sent))
    served = f"served {count} accepted {count} bytes {total}"
    assert lines == ["", served, "left 0"]  # "": the rest of the line expect() consumed
    assert end.ok


async def test_a_snapshot_keeps_an_epoll_descriptor_only_as_stale() -> None:
    memory = GuestMemory((1 << 20) + 4096)
    network = netmod.Network()
    dev = files.FilesDevice(net=network.join("saved"))
    again = files.FilesDevice(net=network.join("restored"))
    slot = Slot(memory, 1 << 20, 1 << 20, 3, lambda irq: None, lambda: None)
    try:
        dev.attach(slot)
        slot.set(files.FS_OP, epoll.OP_EPOLL_CREATE)
        slot.set(files.FS_A0, 0)
        await dev.notify(slot)
        assert slot.get(files.FS_RESULT) == 3
        state = dev.state()
        again.attach(slot)
        again.restore(state)
        estale = -errno.ESTALE & 0xFFFFFFFF
        for op, args, want in [
            (epoll.OP_EPOLL_WAIT, [0x1000, 1, 0, 0], estale),
            (epoll.OP_EPOLL_CTL, [epoll.EPOLL_CTL_ADD, 1, 0x1000], estale),
            (files.OP_CLOSE, [], 0),
        ]:
            slot.set(files.FS_OP, op)
            slot.set(files.FS_FD, 3)
            for i, value in enumerate(args):
                slot.set(files.FS_A0 + 4 * i, value)
            await again.notify(slot)
            assert slot.get(files.FS_RESULT) == want
    finally:
        await dev.stop()
        await again.stop()
        memory.close()


async def test_nested_instances_are_each_looked_at_once_a_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A top instance over 3 instances, each over the same 3 below, each of those
    watching the console's input: a wait looks at each bottom one once (3 console
    checks, not 3 x 3), however many paths lead to it."""
    memory = GuestMemory((1 << 20) + 4096)
    dev = files.FilesDevice()
    slot = Slot(memory, 1 << 20, 1 << 20, 3, lambda irq: None, lambda: None)
    looked: list[int] = []
    real = epoll.interest_bits

    def counting(
        device: files.FilesDevice, it: epoll.Interest, console_in: int, memo: dict[int, bool]
    ) -> int:
        if it.target is None:
            looked.append(it.fd)
        return real(device, it, console_in, memo)

    async def request(op: int, fd: int, *args: int) -> int:
        slot.set(files.FS_OP, op)
        slot.set(files.FS_FD, fd)
        for i, value in enumerate(args):
            slot.set(files.FS_A0 + 4 * i, value)
        await dev.notify(slot)
        return int(slot.get(files.FS_RESULT))

    try:
        dev.attach(slot)
        top, *middle = [await request(epoll.OP_EPOLL_CREATE, 0, 0) for _ in range(4)]
        bottom = [await request(epoll.OP_EPOLL_CREATE, 0, 0) for _ in range(3)]
        slot.write(0x2000, bytes(12))
        memory.view[0x2000] = epoll.EPOLLIN
        for b in bottom:
            assert await request(epoll.OP_EPOLL_CTL, b, epoll.EPOLL_CTL_ADD, 0, 0x2000) == 0
        for m in middle:
            for b in bottom:
                assert await request(epoll.OP_EPOLL_CTL, m, epoll.EPOLL_CTL_ADD, b, 0x2000) == 0
            assert await request(epoll.OP_EPOLL_CTL, top, epoll.EPOLL_CTL_ADD, m, 0x2000) == 0
        monkeypatch.setattr(epoll, "interest_bits", counting)
        assert await request(epoll.OP_EPOLL_WAIT, top, 0x3000, 8, 0, 0) == 0  # none ready
        assert looked == [0, 0, 0]
    finally:
        await dev.stop()
        memory.close()
