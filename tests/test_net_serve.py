"""Socket requests served inside the guest's read: a ``sendto`` or ``recvfrom`` is
answered on the run loop where the notify arrives (``LguestFile.serve_notifies``,
``Device.notify_now``), so the guest goes on without the read returning to the
Launcher's read loop.  Counted, never timed.

Needs the ``sdk`` extra (Zig's C compiler) for the guests.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest
from slotrequests import Requests, slot_at_1m

from supervisor import Guest, GuestConfig, Supervisor, _slicing, engines, execute, run
from supervisor import net as netmod
from supervisor.cpu import LgCpu
from supervisor.launcher import files, sockets
from supervisor.launcher.devices import Slot
from supervisor.memory import GuestMemory
from supervisor.pytest_plugin import BuildGuest

HERE = Path(__file__).resolve().parent
NETBENCH = HERE.parent / "benchmarks" / "c" / "netbench.c"
LIMIT = 60  # seconds: a bound for failing, never a wait for success
ADDR, BUF, PATH = 0x1000, 0x2000, 0x3000  # guest addresses: a sockaddr_in, a buffer, a path


async def _launch(sup: Supervisor, image: Path, name: str, cmdline: str) -> Guest:
    config = GuestConfig(image=image, name=name, cmdline=cmdline, memory="4M", net=True)
    return await sup.launch(config)


async def _ping_pong(image: Path, rounds: int, **options: object) -> list[tuple[int, int]]:
    """Each side's (notifies, notifies served inside the read) over ``rounds`` round
    trips of 1 byte between two guests."""
    async with Supervisor(**options) as sup:  # type: ignore[arg-type]
        server = await _launch(sup, image, "srv", "echo 7")
        await server.expect("listening", LIMIT)
        client = await _launch(sup, image, "cli", f"ping srv 7 {rounds}")
        await client.expect("start", LIMIT)
        before = (client.stats, server.stats)
        await client.expect("done", LIMIT)
        after = (client.stats, server.stats)
        async with asyncio.timeout(LIMIT):
            assert (await client.wait()).ok and (await server.wait()).ok
    return [
        (now.notifies - was.notifies, now.served_in_read - was.served_in_read)
        for was, now in zip(before, after, strict=True)
    ]


async def test_a_round_trip_never_passes_through_the_read_loop(build_guest: BuildGuest) -> None:
    """A 1-byte ping-pong: every send and receive of both sides is served inside the
    guest's read, none by a pass of the Launcher's read loop, whatever the machine's
    load (a single-CPU guest's requests never find the device busy)."""
    image = build_guest(NETBENCH.read_text(), flags=("-O2",))
    rounds = 200
    for notifies, served in await _ping_pong(image, rounds):
        # A send and a receive a round (the first may come before the "start" line is
        # seen, the last after "done"); the read loop saw none of them: only the few
        # other notifies (the client's close, its console line).
        assert served >= 2 * rounds - 5 and notifies - served <= 10, (notifies, served)


async def test_a_request_served_at_once_goes_on_in_the_same_slice(
    build_guest: BuildGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1-byte ping-pong: a side woken by the byte runs one inline slice per round,
    its handler, its echo's send and its next receive's halt all in it: the send is
    served between two entries of that slice (``run._between_entries``), not by the run
    loop's passes after the slice ended at the notify, which would start a second slice
    a round.  Counted by what ended each slice: an inline slice ends at a notify only
    for one the Launcher serves (a console line, the close), never at a send or a
    receive.  (Not the number of slices: a loaded machine may end some for their time,
    whose rest then runs on the executor, which serves no request in its slice.)"""
    # (Not with an engine switched at every slice: there every slice ends at a request.)
    monkeypatch.setenv(engines.ENV, "pool")
    image = build_guest(NETBENCH.read_text(), flags=("-O2",))
    rounds = 200
    at_notify = 0  # inline slices of either side that ended at a notify
    counting = False

    def counted(cpu: LgCpu, budget: int | None = None, *args: Any, **kw: Any) -> object:
        nonlocal at_notify
        exit = execute.run_slice(cpu, budget, *args, **kw)
        inline = budget is not None
        at_notify += counting and inline and run.pending_exit(cpu) is run.RunState.NOTIFY
        return exit

    monkeypatch.setattr(run, "run_slice", counted)
    async with Supervisor() as sup:
        server = await _launch(sup, image, "srv", "echo 7")
        await server.expect("listening", LIMIT)
        client = await _launch(sup, image, "cli", f"ping srv 7 {rounds}")
        await client.expect("start", LIMIT)
        before = (client.stats, server.stats)
        counting = True
        await client.expect("done", LIMIT)
        counting = False
        after = (client.stats, server.stats)
        async with asyncio.timeout(LIMIT):
            assert (await client.wait()).ok and (await server.wait()).ok
    for was, now in zip(before, after, strict=True):
        slices, served = now.slices - was.slices, now.served_in_read - was.served_in_read
        assert served >= 2 * rounds - 5, (slices, served)
        assert slices >= rounds, (slices, served)
    # A round's send and receive, served by the run loop after the slice ended, would end
    # two slices at a notify each round: a few ended so (the console lines, the close).
    assert at_notify <= 10, at_notify


async def test_serving_in_the_slice_does_not_use_up_the_guests_time(
    build_guest: BuildGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests that take the loop longer than an inline slice's time, served between
    two entries of the slice: that time is the run loop's, not the guest's, so no slice
    of the ping-pong ends for its time and none goes to the executor (every slice is
    inline, each ending by itself: a halt), but for the few that translate code run
    for the first time.  Two such requests a slice would use its time up otherwise."""
    if not _slicing.EXIT_REQUEST:
        pytest.skip("inline slices are bounded by INLINE_BUDGET blocks here, not by time")
    image = build_guest(NETBENCH.read_text(), flags=("-O2",))
    serve = files.FilesDevice.notify_now

    def slow_serve(dev: files.FilesDevice, slot: Slot) -> bool:
        until = time.thread_time() + 0.8 * execute.LONG_INLINE_TIME
        while time.thread_time() < until:
            pass
        return serve(dev, slot)

    ended: list[tuple[bool, object]] = []
    monkeypatch.setenv(engines.ENV, "pool")  # (as above)

    def counted(cpu: LgCpu, budget: int | None = None, *args: Any, **kw: Any) -> object:
        exit = execute.run_slice(cpu, budget, *args, **kw)
        ended.append((budget is not None, exit))
        return exit

    async with Supervisor() as sup:
        server = await _launch(sup, image, "srv", "echo 7")
        await server.expect("listening", LIMIT)
        client = await _launch(sup, image, "cli", "ping srv 7 30")
        await client.expect("start", LIMIT)
        monkeypatch.setattr(files.FilesDevice, "notify_now", slow_serve)
        monkeypatch.setattr(run, "YIELD_TIME", 0.05)  # (no yield ends a slice first)
        monkeypatch.setattr(run, "run_slice", counted)
        await client.expect("done", LIMIT)
        monkeypatch.undo()
        async with asyncio.timeout(LIMIT):
            assert (await client.wait()).ok and (await server.wait()).ok
    # (A few slices run code for the first time, the first echo or the exit: their
    # translation may use their time up, whatever the requests cost.  Charged with the
    # requests' time, about every other slice would.)
    out_of_time = [exit for _, exit in ended].count(execute.SliceExit.BUDGET)
    on_executor = [inline for inline, _ in ended].count(False)
    assert len(ended) >= 60, ended
    assert out_of_time <= len(ended) // 5 and on_executor <= len(ended) // 5, ended


async def test_the_schedule_of_a_deterministic_run_serves_them_inside_the_read_too(
    build_guest: BuildGuest,
) -> None:
    image = build_guest(NETBENCH.read_text(), flags=("-O2",))
    rounds = 50
    for notifies, served in await _ping_pong(image, rounds, deterministic=True, seed=3):
        assert served >= 2 * rounds - 5 and notifies - served <= 10, (notifies, served)


async def test_notify_now_serves_sends_and_receives_only_and_never_beside_another() -> None:
    memory = GuestMemory((1 << 20) + 4096)
    network = netmod.Network()
    dev = files.FilesDevice(net=network.join("guest"))
    await dev.start()
    try:
        slot = slot_at_1m(memory)
        dev.attach(slot)
        request = Requests(dev, slot)
        peer = network.join("peer")
        listener = peer.socket(netmod.STREAM)
        assert isinstance(listener, netmod.StreamSocket)
        listener.bind(0, 80)
        listener.listen(1)

        def ask(op: int, fd: int, *args: int) -> bool:
            slot.set(files.FS_RESULT, 0x5A5A5A5A)
            slot.set(files.FS_OP, op)
            slot.set(files.FS_FD, fd)
            for i, value in enumerate([*args, 0, 0, 0, 0, 0, 0, 0][:7]):
                slot.set(files.FS_A0 + 4 * i, value)
            return dev.notify_now(slot)

        # Not a send or a receive: left for notify() (nothing done, no result written).
        assert not ask(sockets.OP_SOCKET, 0, 2, 1, 0)
        assert slot.get(files.FS_RESULT) == 0x5A5A5A5A and dev.open_files == 0
        assert await request(sockets.OP_SOCKET, 0, 2, 1, 0) == 3
        memory.write(ADDR, sockets.sockaddr((peer.ip, 80)))
        assert await request(sockets.OP_CONNECT, 3, ADDR, 16) == 0
        other = listener.accept()
        requests = dev.requests

        memory.write(BUF, b"hi")
        assert ask(sockets.OP_SENDTO, 3, BUF, 2, 0, 0, 0)
        assert slot.get(files.FS_RESULT) == 2 and other.recv(10) == b"hi"
        assert ask(sockets.OP_PARK | sockets.OP_RECVFROM, 3, BUF, 10, 0, 0, 0)
        assert slot.get(files.FS_RESULT) == sockets.NET_WAIT & 0xFFFFFFFF  # parked
        other.send(b"yo")
        dev.poll(slot)  # (the socket's news: the parked receive completes)
        assert slot.get(files.FS_RESULT) == 2 and memory.read(BUF, 2) == b"yo"
        assert ask(sockets.OP_RECVFROM, 9, BUF, 10, 0, 0, 0)
        assert slot.get(files.FS_RESULT) == -9 & 0xFFFFFFFF  # EBADF, as notify() says
        assert dev.requests == requests + 3 and dev.served_now == 3

        # Another request being served (another CPU's, awaiting a worker thread): this
        # one waits its turn, in notify().
        memory.write(PATH, b"/tmp/f")
        create = files.G_CREAT | 2
        ask(files.OP_OPENAT, files.AT_FDCWD & 0xFFFFFFFF, PATH, 6, create, 0o600)
        opening = asyncio.create_task(dev.notify(slot))
        await asyncio.sleep(0)  # (it holds the device now, until its thread is done)
        assert not ask(sockets.OP_SENDTO, 3, BUF, 2, 0, 0, 0)
        assert slot.get(files.FS_RESULT) == 0x5A5A5A5A and not other.rx
        await opening
        assert dev.served_now == 3 and dev.open_files == 2
    finally:
        await dev.stop()
        memory.close()


async def test_a_hostile_request_served_inside_the_read_kills_with_a_reason(
    build_guest: BuildGuest,
) -> None:
    source = """
#include <lguest.h>
#include <stdint.h>
#include <sys/socket.h>
int main(void)
{
    int s = socket(AF_INET, SOCK_STREAM, 0);
    volatile uint32_t *d = (volatile uint32_t *)lguest_find_device(3, 0);
    d[2] = 27;          /* sendto */
    d[3] = (uint32_t)s;
    d[4] = 0x1000;
    d[5] = 0x7fffffff;  /* a length no runtime sends */
    lguest_notify((const void *)d);
    return 0;
}
"""
    image = build_guest(source)
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=image, memory="4M", net=True))
        async with asyncio.timeout(LIMIT):
            end = await guest.wait()
        assert end.died
        assert re.search(r"FilesDevice failed: transfer of \d+ bytes", end.reason), end.reason
        assert guest.stats.served_in_read == 0
