"""The guest's request path, counted, never timed: a guest whose every CPU is asleep
(halted until an interrupt) is polled and interrupted for a device's news without the
Waker's break, a running one is broken out (``GuestStats.breaks``); a file request
reads and answers its descriptor once; stdio reads a file in 64 KiB requests.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from supervisor import Guest, GuestConfig, GuestMemory, LguestDevice, Supervisor, _slicing, engines
from supervisor import run as run_loop
from supervisor.launcher import files
from supervisor.launcher.console import Console
from supervisor.launcher.devices import Slot
from supervisor.launcher.launcher import Launcher
from supervisor.pytest_plugin import BuildGuest
from supervisor.testing import until

HERE = Path(__file__).resolve().parent
GUESTS = HERE.parent / "guests"
NETBENCH = HERE.parent / "benchmarks" / "c" / "netbench.c"
READFILE = HERE.parent / "benchmarks" / "c" / "readfile.c"
LIMIT = 60  # seconds: a bound for failing, never a wait for success


async def ping_pair(sup: Supervisor, image: Path, rounds: int) -> tuple[Guest, Guest]:
    """netbench's echo server ``srv`` (listening) and a client pinging it ``rounds`` times."""
    server = await sup.launch(
        GuestConfig(image=image, name="srv", cmdline="echo 7", memory="4M", net=True)
    )
    await server.expect("listening", LIMIT)
    client = await sup.launch(
        GuestConfig(image=image, name="cli", cmdline=f"ping srv 7 {rounds}", memory="4M", net=True)
    )
    return server, client


async def test_input_for_an_asleep_guest_needs_no_break() -> None:
    console = Console()
    async with asyncio.timeout(LIMIT), LguestDevice() as dev:
        launcher = Launcher(dev, GUESTS / "echo.img", ram_size=1 << 20, devices=[console])
        run = asyncio.create_task(launcher.run())
        lines = aiter(console.lines)

        def asleep() -> bool:
            return launcher.file is not None and launcher.file.asleep()

        for n in range(20):
            await until(asleep, LIMIT)  # (the echo is out before the guest halts again)
            console.feed(f"line {n}\n".encode())
            assert await anext(lines) == f"line {n}"
        await until(asleep, LIMIT)
        console.feed(b"quit\n")
        assert [await anext(lines), await anext(lines)] == ["quit", "bye"]
        assert (await run).ok
    assert launcher.stats.breaks == 0
    assert launcher.stats.interrupts >= 20


async def test_a_running_guest_is_broken_out_for_news() -> None:
    async with asyncio.timeout(LIMIT), Supervisor() as sup:
        spinner = await sup.launch(GuestConfig(image=GUESTS / "spinner.img", memory="1M"))
        await until(lambda: spinner.stats.run_time > 0, LIMIT)
        spinner.send("news\n")  # the spinner never halts: only a break lets the console poll
        await until(lambda: spinner.stats.breaks >= 1, LIMIT)
        await spinner.kill()


async def test_guests_waiting_on_sockets_wake_without_breaks(build_guest: BuildGuest) -> None:
    image = build_guest(NETBENCH.read_text(), flags=("-O2",))
    rounds = 200
    async with asyncio.timeout(LIMIT), Supervisor() as sup:
        server, client = await ping_pair(sup, image, rounds)
        assert [line async for line in client.console] == ["start", "done"]
        assert (await client.wait()).ok
        assert [line async for line in server.console][-1] == f"got {rounds}"
        assert (await server.wait()).ok
    # Each round trip wakes each guest once from its wait in recv; asleep there, it is
    # interrupted without a break.  (A wake that finds it between the device's answer
    # and its halt still breaks it out: a few, not one per round trip.)  Not on the
    # count= fallback, whose budgets count instructions, not blocks (its slices on the
    # event loop end before the halt far more often, so a wake finds the guest in an
    # executor run), nor with an engine switched at every slice, whose every slice
    # ends through the run loop: there the exchange above is what is checked.
    if not _slicing.NATIVE or engines.mode_from_env() == "always":
        return
    for guest in (client, server):
        assert guest.stats.breaks <= rounds // 10, guest.stats
        assert guest.stats.interrupts >= rounds // 2


async def test_a_round_trip_between_guests_reads_the_cpu_clock_six_times(
    build_guest: BuildGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read of the thread's CPU clock is a system call that costs as much as a tenth
    of a guest entry: a round trip between two guests makes six in Python (a few more
    when the machine's load makes it yield or break out now and then), per side one
    at the wake (YIELD_TIME counts from there) and two around the send served inside
    the slice (its time given back to the slice, and whether a yield is due).  None
    where nothing is done with the time: the first pass after the wake, a hypercall
    trapped with a halt, an engine taken back untouched, a pool's hibernation.  (No
    yield is ever due here: a loaded machine stretches a round's CPU time past
    YIELD_TIME now and then, and each yield reads the clock again.)"""
    monkeypatch.setattr(run_loop, "YIELD_TIME", math.inf)
    image = build_guest(NETBENCH.read_text(), flags=("-O2",))
    rounds = 200
    reads: Counter[str] = Counter()  # by the reading function
    real = time.thread_time, time.thread_time_ns

    def counted(clock: int) -> float | int:
        reads[sys._getframe(2).f_code.co_name] += 1  # (1: the lambda below)
        return real[clock]()

    async with asyncio.timeout(LIMIT), Supervisor() as sup:
        server, client = await ping_pair(sup, image, rounds)
        lines = aiter(client.console)
        assert await anext(lines) == "start"
        monkeypatch.setattr(time, "thread_time", lambda: counted(0))
        monkeypatch.setattr(time, "thread_time_ns", lambda: counted(1))
        assert await anext(lines) == "done"
        monkeypatch.undo()
        assert (await client.wait()).ok and (await server.wait()).ok
    # The fallback reads the clock at every run in Python; the engines switched at every
    # slice read it at every take.  (A yield, a slice on a worker, a break: once or twice
    # more, a few times a round on a loaded machine; 16 a round, always, read before.)
    if not _slicing.NATIVE or engines.mode_from_env() == "always":
        return
    assert sum(reads.values()) <= 10 * rounds, reads
    # Per side and round, before: two in the slice around the between, one more in it
    # and one before the woken CPU's first slice asking whether a yield was due, one to
    # take its own engine back, one to hibernate into the pool.
    for where in ("_one_slice", "_yield_due", "take_engine", "_hibernate"):
        assert reads[where] <= rounds // 4, reads


async def test_a_file_request_writes_its_result_once(tmp_path: Path) -> None:
    """A request's answer is one write of the descriptor: the guest's CPUs drop one
    range of stale translations per request, not one per word."""
    memory = GuestMemory((1 << 20) + 4096)
    dev = files.FilesDevice([files.Grant(tmp_path, "/d")])
    await dev.start()
    try:
        slot = Slot(memory, 1 << 20, 1 << 20, 3, lambda irq: None, lambda: None)
        dev.attach(slot)
        (tmp_path / "x").write_bytes(b"abcdef")
        memory.write(0x1000, b"/d/x")
        slot.set_words(files.FS_OP, [files.OP_OPENAT, files.AT_FDCWD & 0xFFFFFFFF,
                                     0x1000, 4, 0, 0, 0, 0, 0])  # fmt: skip
        writes: list[tuple[int, int]] = []
        memory.watch(lambda addr, n: writes.append((addr, n)))
        await dev.notify(slot)
        assert slot.get_words(files.FS_RESULT, 2) == (3, 0)
        assert writes == [((1 << 20) + files.FS_RESULT, 8)]
        writes.clear()
        slot.set_words(files.FS_OP, [files.OP_READ, 3, 0x2000, 6, 0, 0, 0, 0, 0])
        writes.clear()
        await dev.notify(slot)
        assert memory.read(0x2000, 6) == b"abcdef"
        assert writes == [(0x2000, 6), ((1 << 20) + files.FS_RESULT, 8)]
        slot.set_words(files.FS_OP, [files.OP_LSEEK, 3, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF])
        await dev.notify(slot)
        assert slot.get_words(files.FS_RESULT, 2) == (0xFFFFFFEA, 0xFFFFFFFF)  # -EINVAL
    finally:
        await dev.stop()
        memory.close()


async def test_fgets_reads_64_kib_per_request(tmp_path: Path, build_guest: BuildGuest) -> None:
    """stdio's 1 KiB refills come from the runtime's read-ahead: reading a file line by
    line costs one file-device request per 64 KiB, not one per line or per refill."""
    image = build_guest(READFILE.read_text(), flags=("-O2",))
    line = bytes(range(48, 48 + 79)) + b"\n"
    (tmp_path / "data").write_bytes(line * 13_107)  # 1 MiB less 16 bytes, 16 x 64 KiB
    console = Console()
    device = files.FilesDevice([files.Grant(tmp_path, "/d", True)])
    device.open()
    async with asyncio.timeout(LIMIT), LguestDevice() as dev:
        launcher = Launcher(dev, image, ram_size=4 << 20, devices=[console, device],
                            cmdline="fgets /d/data")  # fmt: skip
        run = asyncio.create_task(launcher.run())
        lines = aiter(console.lines)
        assert await anext(lines) == "start"
        before = device.requests
        result = await anext(lines)
        during = device.requests - before
        assert (await run).ok
    assert result == f"bytes {len(line) * 13_107} sum {10 * 13_107}"
    # 16 read-ahead fills, the end of file, and the few calls around them
    assert 16 <= during <= 20, during
