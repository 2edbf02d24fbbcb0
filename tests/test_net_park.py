"""Parked socket requests: a blocking ``recvfrom``/``sendto`` asked with ``OP_PARK``
is finished by the file device when the socket changes, so the woken guest has its
result without a second request.  Counted, never timed.

Needs the ``sdk`` extra (Zig's C compiler) for the guests.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from slotrequests import Requests, slot_at_1m

from supervisor import Guest, GuestConfig, Supervisor
from supervisor import net as netmod
from supervisor.launcher import files, sockets
from supervisor.launcher.devices import Slot
from supervisor.memory import GuestMemory
from supervisor.pytest_plugin import BuildGuest

HERE = Path(__file__).resolve().parent
NETBENCH = HERE.parent / "benchmarks" / "c" / "netbench.c"
LIMIT = 60  # seconds: a bound for failing, never a wait for success
ADDR, BUF = 0x1000, 0x2000  # guest addresses of a sockaddr_in and a buffer
CHUNK = 1 << 16


async def _connected(
    network: netmod.Network, dev: files.FilesDevice, request: Requests, memory: GuestMemory
) -> netmod.StreamSocket:
    """Connect the device's descriptor 3 to a listener of member "peer"; the peer's end."""
    peer = network.join("peer")
    listener = peer.socket(netmod.STREAM)
    assert isinstance(listener, netmod.StreamSocket)
    listener.bind(0, 80)
    listener.listen(1)
    assert await request(sockets.OP_SOCKET, 0, 2, 1, 0) == 3
    memory.write(ADDR, sockets.sockaddr((peer.ip, 80)))
    assert await request(sockets.OP_CONNECT, 3, ADDR, 16) == 0
    return listener.accept()


@dataclass
class Parked:
    """A file device on a network, its slot at 1 MiB, and descriptor 3 connected to
    member "peer" (whose end is ``other``)."""

    memory: GuestMemory
    dev: files.FilesDevice
    slot: Slot
    request: Requests
    other: netmod.StreamSocket


@contextlib.asynccontextmanager
async def _parked(irqs: list[int] | None = None) -> AsyncIterator[Parked]:
    """A connected device (``irqs``: where its slot's irqs go; None: nowhere)."""
    memory = GuestMemory((1 << 20) + 4096)
    network = netmod.Network()
    dev = files.FilesDevice(net=network.join("guest"))
    await dev.start()
    try:
        if irqs is None:
            slot = slot_at_1m(memory)
        else:
            slot = Slot(memory, 1 << 20, 1 << 20, 3, irqs.append, lambda: None)
        dev.attach(slot)
        request = Requests(dev, slot)
        other = await _connected(network, dev, request, memory)
        yield Parked(memory, dev, slot, request, other)
    finally:
        await dev.stop()
        memory.close()


async def test_a_parked_receive_is_finished_when_the_data_comes() -> None:
    async with _parked() as p:
        memory, dev, slot, request, other = p.memory, p.dev, p.slot, p.request, p.other
        park = sockets.OP_PARK | sockets.OP_RECVFROM
        assert await request(park, 3, BUF, 100, 0, 0, 0) == sockets.NET_WAIT
        events = slot.get(sockets.FS_EVENTS)
        dev.poll(slot)  # no news yet: nothing finished, nothing counted
        assert slot.get(files.FS_RESULT) == sockets.NET_WAIT & 0xFFFFFFFF
        assert slot.get(sockets.FS_EVENTS) == events
        assert other.send(b"hello") == 5
        dev.poll(slot)
        assert slot.get(files.FS_RESULT) == 5 and slot.get(files.FS_RESULT_HI) == 0
        assert memory.read(BUF, 5) == b"hello"
        assert slot.get(sockets.FS_EVENTS) == events + 1
        assert dev.parked_done == 1
        assert other.send(b"more") == 4  # finished once: the next one is the guest's to ask
        dev.poll(slot)
        assert memory.read(BUF, 5) == b"hello" and slot.get(files.FS_RESULT) == 5
        assert dev.parked_done == 1


async def test_a_parked_receive_is_finished_in_two_writes_of_guest_memory() -> None:
    """The data, then the result and the events counter in one write of the descriptor
    (the words between them as they were): the guest's CPUs drop two ranges of stale
    translations, not three."""
    async with _parked() as p:
        memory, dev, slot, request, other = p.memory, p.dev, p.slot, p.request, p.other
        park = sockets.OP_PARK | sockets.OP_RECVFROM
        slot.set(sockets.FS_SOCKMAP, 0x3000)
        assert await request(park, 3, BUF, 100, 0, 0, 0) == sockets.NET_WAIT
        events = slot.get(sockets.FS_EVENTS)
        writes: list[tuple[int, int]] = []
        memory.watch(lambda addr, n: writes.append((addr, n)))
        assert other.send(b"hi") == 2
        dev.poll(slot)
        desc = slot.address
        assert writes == [
            (BUF, 2),
            (desc + files.FS_RESULT, sockets.FS_EVENTS + 4 - files.FS_RESULT),
        ]
        assert slot.get_words(files.FS_RESULT, 2) == (2, 0)
        assert slot.get(files.FS_MAX_IO) == files.MAX_IO
        assert slot.get(sockets.FS_SOCKMAP) == 0x3000
        assert slot.get(sockets.FS_EVENTS) == events + 1
        writes.clear()
        assert other.send(b"more") == 4  # nothing parked: the counter alone
        dev.poll(slot)
        assert writes == [(desc + sockets.FS_EVENTS, 4)]
        assert slot.get(sockets.FS_EVENTS) == events + 2


async def test_a_request_is_parked_only_if_asked_and_forgotten_at_the_next() -> None:
    async with _parked() as p:
        memory, dev, slot, request, other = p.memory, p.dev, p.slot, p.request, p.other
        wait = sockets.NET_WAIT & 0xFFFFFFFF
        # Without OP_PARK (an older runtime): "wait", and the runtime asks again.
        assert await request(sockets.OP_RECVFROM, 3, BUF, 100, 0, 0, 0) == sockets.NET_WAIT
        other.send(b"a")
        dev.poll(slot)
        assert slot.get(files.FS_RESULT) == wait and memory.read(BUF, 1) == b"\0"
        assert await request(sockets.OP_RECVFROM, 3, BUF, 100, 0, 0, 0) == 1
        # Parked, then another request: the parked one is forgotten.
        park = sockets.OP_PARK | sockets.OP_RECVFROM
        assert await request(park, 3, BUF, 100, 0, 0, 0) == sockets.NET_WAIT
        assert await request(sockets.OP_SOCKNAME, 3, ADDR, ADDR + 16, 0) == 0
        memory.write(ADDR + 16, struct.pack("<I", 16))
        other.send(b"b")
        dev.poll(slot)
        assert slot.get(files.FS_RESULT) == 0 and memory.read(BUF, 1) == b"a"
        # A non-blocking socket never parks: EAGAIN at once.
        assert await request(park, 3, BUF, 100, 0x40, 0, 0) == 1  # the "b"
        assert await request(park, 3, BUF, 100, 0x40, 0, 0) == -11  # MSG_DONTWAIT
        other.send(b"c")
        dev.poll(slot)
        assert slot.get(files.FS_RESULT) == (-11) & 0xFFFFFFFF
        assert dev.parked_done == 0
        # A parked send waits for room, then takes what fits.
        assert await request(sockets.OP_RECVFROM, 3, BUF, 100, 0, 0, 0) == 1  # the "c"
        memory.write(BUF, b"x" * CHUNK)
        send = sockets.OP_PARK | sockets.OP_SENDTO
        while (n := await request(send, 3, BUF, CHUNK, 0, 0, 0)) > 0:
            pass
        assert n == sockets.NET_WAIT
        assert len(other.recv(100)) == 100
        dev.poll(slot)
        assert slot.get(files.FS_RESULT) == 100 and dev.parked_done == 1
        # A new boot forgets a parked request.
        assert await request(park, 3, BUF, 100, 0, 0, 0) == sockets.NET_WAIT
        dev.attach(slot)
        other.send(b"d")
        dev.poll(slot)
        assert slot.get(files.FS_RESULT) == wait and dev.parked_done == 1


async def test_a_request_with_a_halt_behind_it_raises_the_irq_unless_parked() -> None:
    irqs: list[int] = []
    async with _parked(irqs) as p:
        dev, slot, request, other = p.dev, p.slot, p.request, p.other
        irqs.clear()
        halts = sockets.OP_HALTS | sockets.OP_PARK | sockets.OP_RECVFROM
        assert await request(halts, 3, BUF, 100, 0, 0, 0) == sockets.NET_WAIT
        assert irqs == []  # parked: the halt lasts until the data comes
        other.send(b"xy")
        dev.poll(slot)
        assert slot.get(files.FS_RESULT) == 2 and irqs == [3]
        other.send(b"z")
        assert await request(halts, 3, BUF, 100, 0, 0, 0) == 1  # at once: the irq ends it
        assert irqs == [3, 3]
        assert await request(halts, 9, BUF, 100, 0, 0, 0) == -9  # an error, too (EBADF)
        assert irqs == [3, 3, 3]
        assert await request(sockets.OP_PARK | sockets.OP_RECVFROM, 3, BUF, 100, 0, 0, 0) == (
            sockets.NET_WAIT
        )
        assert irqs == [3, 3, 3]  # no halt behind it: no irq


async def _launch(sup: Supervisor, image: Path, name: str, cmdline: str) -> Guest:
    config = GuestConfig(image=image, name=name, cmdline=cmdline, memory="4M", net=True)
    return await sup.launch(config)


async def test_a_guest_round_trip_is_two_requests_two_exits_and_one_wake_a_side(
    build_guest: BuildGuest,
) -> None:
    """A 1-byte ping-pong between two guests: per round trip each side makes its send
    and one receive (finished by the device when the byte comes: asked again, it would
    be three requests), the receive leaves the guest with its halt behind it (one exit,
    not one for the request and one for the halt), and the byte's arrival wakes the
    halted side at once, from the sender's request, without a Waker task."""
    image = build_guest(NETBENCH.read_text(), flags=("-O2",))
    rounds = 300
    # A seeded schedule: the counts below are the same on every run, whatever the
    # machine's load (with wall-clock slices, a side that is still running when the
    # answer comes is woken by a break instead, and the counts drift with the load).
    async with Supervisor(deterministic=True, seed=7) as sup:
        server = await _launch(sup, image, "srv", "echo 7")
        await server.expect("listening", LIMIT)
        client = await _launch(sup, image, "cli", f"ping srv 7 {rounds}")
        await client.expect("start", LIMIT)
        before = (client.stats, server.stats)
        await client.expect("done", LIMIT)
        after = (client.stats, server.stats)
        async with asyncio.timeout(LIMIT):
            assert (await client.wait()).ok and (await server.wait()).ok
    for was, now in zip(before, after, strict=True):
        notifies = now.notifies - was.notifies
        exits = now.exits - was.exits
        interrupts = now.interrupts - was.interrupts
        woken = now.woken_at_once - was.woken_at_once
        counts = (notifies, exits, interrupts, woken)
        # Asking again for the byte would be a third request and exit a round, and a
        # halt of its own a third exit: both far above these bounds.  Some answers are
        # there before the receive (no wake, no irq); quanta of the seeded schedule end
        # a few slices more.  The rest of the wakes are direct.
        assert 2 * rounds - 5 <= notifies <= 2 * rounds + 10, counts
        assert 2 * rounds - 5 <= exits <= 2 * rounds + rounds // 3, counts
        assert interrupts <= rounds + 10, counts
        assert woken >= rounds // 3, counts


def test_a_stream_receive_copies_straight_into_the_buffer_given() -> None:
    network = netmod.Network()
    a, b = network.join("a"), network.join("b")
    listener = b.socket(netmod.STREAM)
    assert isinstance(listener, netmod.StreamSocket)
    listener.bind(0, 80)
    listener.listen(1)
    writer = a.socket(netmod.STREAM)
    assert isinstance(writer, netmod.StreamSocket)
    writer.connect(b.ip, 80)
    reader = listener.accept()
    woken: list[int] = []
    writer.on_change = lambda: woken.append(1)
    block = bytes(range(256)) * 256  # 64 KiB
    while writer.room():
        writer.send(block)  # until the reader's buffer is full
    guest = bytearray(100_000)
    with memoryview(guest) as view:
        assert reader.recv_into(view[:10], peek=True) == 10
        assert guest[:10] == block[:10] and not woken  # a peek takes nothing
        assert reader.recv_into(view[5:70_005]) == 70_000
    assert guest[5:70_005] == (block * 2)[:70_000]
    assert woken == [1]  # room again: the writer hears of it
    assert writer.room() == 70_000
    writer.shutdown(1)
    with memoryview(guest) as view:
        while reader.recv_into(view):
            pass
        assert reader.recv_into(view) == 0  # the end


async def test_a_restored_guest_waiting_on_a_socket_is_told_to_ask_again() -> None:
    """A guest snapshotted while a blocking receive waits (parked: halted until ``events``
    moves) gets its socket back stale, which never changes again: the restore moves the
    counter and raises the irq, so the runtime asks again and gets ESTALE."""
    memory = GuestMemory((1 << 20) + 4096)
    copy_memory = GuestMemory((1 << 20) + 4096)
    network = netmod.Network()
    dev = files.FilesDevice(net=network.join("guest"))
    copy = files.FilesDevice(net=network.join("copy"))
    await dev.start()
    await copy.start()
    try:
        slot = slot_at_1m(memory)
        dev.attach(slot)
        request = Requests(dev, slot)
        await _connected(network, dev, request, memory)
        park = sockets.OP_PARK | sockets.OP_RECVFROM
        assert await request(park, 3, BUF, 100, 0, 0, 0) == sockets.NET_WAIT
        seen = slot.get(sockets.FS_EVENTS)
        saved = dev.state()
        irqs: list[int] = []
        wakes: list[None] = []
        copy_slot = Slot(copy_memory, 1 << 20, 1 << 20, 3, irqs.append, lambda: wakes.append(None))
        copy.attach(copy_slot)
        copy_memory.write(1 << 20, memory.read(1 << 20, 64))  # the descriptor, as saved
        copy.restore(saved)
        assert wakes == [None]  # the Launcher is asked to poll
        copy.poll(copy_slot)
        assert copy_slot.get(sockets.FS_EVENTS) == seen + 1 and irqs == [3]
        again = Requests(copy, copy_slot)
        assert await again(park, 3, BUF, 100, 0, 0, 0) == -errno.ESTALE
    finally:
        await dev.stop()
        await copy.stop()
        memory.close()
        copy_memory.close()
