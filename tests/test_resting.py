"""Resting reads: a guest asleep in a halt with its registers packed holds no task.  Its
read ends (``LguestFile.rest_when_idle``), the Launcher's task ends with it, and the
CPU's next wake (an irq, a timer, a device's news, a BREAK, a hold, a kill) starts a
task that reads on, exactly where the waiting read would have gone on.  Counted (tasks,
restarts, objects), never timed."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
from pathlib import Path

import pytest
from guestasm import Booted, assemble
from idleguests import asleep, echoed, echoes_to_the_end, final_memory, forked, halt_counter, wake

from supervisor import GuestConfig, LguestDevice, Supervisor, abi, hibernation, run, testing
from supervisor.cpu import LgCpu
from supervisor.host import Guest

LIMIT = 60  # seconds: a bound for failing, never a wait for success
GUESTS = Path(__file__).resolve().parent.parent / "guests"


def launcher_tasks() -> int:
    """The Launchers' tasks alive (each serves one guest that does not rest)."""
    return sum(t.get_name() == "lguest-launcher" and not t.done() for t in asyncio.all_tasks())


def resting(sup: Supervisor) -> int:
    """How many of ``sup``'s guests rest: asleep, with no read in flight."""
    return sum(1 for f in sup.device.files if f.asleep(0) and not f.reading(0))


async def _counter(dev: LguestDevice, rests: bool) -> tuple[Booted, list[int], asyncio.Event]:
    """A HALT_COUNTER guest, INITIALIZEd; ``restarts`` counts its restart calls, and the
    event is set at each."""
    g = await halt_counter(dev)
    restarts: list[int] = []
    restarted = asyncio.Event()

    def restart() -> None:
        restarts.append(1)
        restarted.set()

    if rests:
        g.file.rest_when_idle(restart)
    return g, restarts, restarted


async def _woken_by_irqs(dev: LguestDevice, rests: bool) -> bytes:
    """Wake the counter twice by an irq (resting first if ``rests``); its memory after."""
    g, restarts, _ = await _counter(dev, rests)
    for hit in (1, 2):
        if rests:
            # it rests: the read ends
            assert await asyncio.wait_for(g.file.read(abi.WORD_SIZE), LIMIT) == b""
            assert not g.file.reading(0) and g.file.asleep(0) and g.memory.packed
            assert restarts == [1] * (hit - 1)
            await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
            assert restarts == [1] * hit  # the irq's wake called the restart, once
            assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(0x33)
            assert g.u32("hits") == hit
        else:
            await wake(g, await asleep(g), hit)
    return await final_memory(g)


async def test_a_resting_read_ends_and_an_irq_restarts_it_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    async with LguestDevice(engines="pool") as dev:
        reference = await _woken_by_irqs(dev, rests=False)
    async with LguestDevice(engines="pool") as dev:
        assert await _woken_by_irqs(dev, rests=True) == reference


async def test_a_break_restarts_a_resting_read_which_rests_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    async with LguestDevice(engines="pool") as dev:
        g, restarts, restarted = await _counter(dev, rests=True)
        assert await asyncio.wait_for(g.file.read(abi.WORD_SIZE), LIMIT) == b""
        breaking = asyncio.ensure_future(g.file.waker().brk(True))
        await asyncio.wait_for(restarted.wait(), LIMIT)  # the break's wake: the reader's turn
        with pytest.raises(BlockingIOError):  # EAGAIN, as for a waiting read
            await g.file.read(abi.WORD_SIZE)
        await g.file.write(abi.pack_words(abi.LHREQ_BREAK, 0))
        await asyncio.wait_for(breaking, LIMIT)
        # still packed: it rests again at once
        assert await asyncio.wait_for(g.file.read(abi.WORD_SIZE), LIMIT) == b""
        assert restarts == [1] and g.u32("hits") == 0
        await g.file.close()
        g.memory.close()


async def _sleepers(sup: Supervisor, image: Path, n: int) -> list[Guest]:
    """``n`` more sleepers, once every guest of ``sup`` rests."""
    config = GuestConfig(image=image, memory="1M", console="null")
    guests = [await sup.launch(config) for _ in range(n)]
    async with asyncio.timeout(LIMIT):
        for guest in sup.guests:
            assert await guest.rested()  # (a sleeper's first rest: it never wakes)
    assert resting(sup) == len(sup.device.files) and launcher_tasks() == 0
    return guests


async def test_idle_guests_hold_no_task_and_a_bounded_count_of_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    image = tmp_path / "sleeper.img"
    image.write_bytes(assemble(testing.SLEEPER).image)
    n = 20
    async with Supervisor(keep_ended=False) as sup:
        await _sleepers(sup, image, 1)  # what every guest shares is made by the first
        gc.collect()
        tasks, objects = len(asyncio.all_tasks()), len(gc.get_objects())
        guests = await _sleepers(sup, image, n)
        gc.collect()
        assert len(asyncio.all_tasks()) == tasks
        # Its Launcher, CPU, memory, devices, console and Guest; no coroutine, no task
        # (a guest whose read waits has about 111).
        assert (len(gc.get_objects()) - objects) / n <= 100
        assert all(g.stats.rests == 1 and not g.done for g in guests)


async def test_rested_waits_for_a_count_of_rests_or_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Guest.rested(n)``: True once the guest's read has rested n times in all, False
    once it ended short of that; a guest that never rests is False at its end."""
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    image = tmp_path / "sleeper.img"
    image.write_bytes(assemble(testing.SLEEPER).image)
    async with Supervisor() as sup, asyncio.timeout(LIMIT):
        hello = await sup.launch(GuestConfig(image=GUESTS / "hello.img", memory="1M"))
        assert not await hello.rested() and hello.done and hello.stats.rests == 0
        sleeper = await sup.launch(GuestConfig(image=image, memory="1M", console="null"))
        assert await sleeper.rested() and sleeper.stats.rests == 1
        assert await sleeper.rested()  # (at once: it has)
        second = asyncio.ensure_future(sleeper.rested(2))  # a sleeper never wakes by itself
        await asyncio.sleep(0)
        assert not second.done()
        await sleeper.kill()
        assert not await second and sleeper.stats.rests == 1


async def test_a_resting_guest_ticks_exactly_as_one_that_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = GuestConfig(image=GUESTS / "ticker.img", memory="1M", cmdline="ticks=3 period_ms=150")
    ends = []
    for pack_after in (3600.0, 0.02):
        monkeypatch.setattr(hibernation, "PACK_AFTER", pack_after)
        async with Supervisor() as sup:
            guest = await sup.launch(config)
            async with asyncio.timeout(LIMIT):
                lines = [line async for line in guest.console]
                end = await guest.wait()
            ends.append((lines, end.exit_status, guest.stats.interrupts, guest.stats.rests))
    ticked = ["tick 1", "tick 2", "tick 3", "done"]
    assert ends[0][:2] == ends[1][:2] == (ticked, 0)
    assert ends[0][2] == ends[1][2] and ends[0][3] == 0
    assert ends[1][3] == 3  # each tick's timer woke it resting (150 ms apart: it packs)


async def test_a_resting_guest_wakes_by_input_pauses_snapshots_and_dies_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    async with Supervisor() as sup:
        settled = 0

        async def rests() -> None:
            """Until the guest's next rest: each time it settles, it rests once more."""
            nonlocal settled
            settled += 1
            async with asyncio.timeout(LIMIT):
                assert await sup.guests[0].rested(settled)
            assert resting(sup) == 1 and launcher_tasks() == 0

        guest = await echoed(sup, rests)  # a device's news: the resting guest wakes
        await guest.pause()  # held inside its read (a debugger's stop: the same hold)
        (f,) = sup.device.files
        assert f.reading(0) and f.paused(0) and launcher_tasks() == 1
        guest.resume()
        await rests()
        fork = await forked(sup, guest)  # of a resting guest (its pause: a wake, a rest)
        async with asyncio.timeout(LIMIT):
            assert await guest.rested(settled + 1) and await fork.rested()
        assert resting(sup) == 2 and launcher_tasks() == 0
        async with asyncio.timeout(LIMIT):  # a resting guest dies as any other
            assert (await guest.kill()).reason == "killed"
        assert len(sup.device.files) == 1 and launcher_tasks() == 0
        await echoes_to_the_end(fork)


# A program that returns from asyncio.run with a guest resting and no Supervisor.aclose.
LEFT_RESTING = r"""
import asyncio, sys
from supervisor import GuestConfig, Supervisor, hibernation
from supervisor.launcher.devices import Device

hibernation.PACK_AFTER = 0.02

class Marker(Device):
    type = 0x42

    async def stop(self) -> None:
        print("device stopped", flush=True)

sups = []

async def main() -> None:
    sup = Supervisor()
    sups.append(sup)
    config = GuestConfig(image=sys.argv[1], memory="1M", console="null")
    guest = await sup.launch(config, devices=[Marker()])
    if await guest.rested():
        print("rested", flush=True)

asyncio.run(main())
(sup,) = sups
print(f"ended {sup.guests[0].done}, files {len(sup.device.files)}", flush=True)
"""


def test_a_guest_left_resting_is_closed_as_asyncio_run_ends(tmp_path: Path) -> None:
    image = tmp_path / "sleeper.img"
    image.write_bytes(assemble(testing.SLEEPER).image)
    # (Warnings are errors; not -X dev, whose slow-callback reports a loaded machine makes.)
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", LEFT_RESTING, str(image)],
        capture_output=True, text=True, timeout=LIMIT, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, "")
    # Its device stopped, its file closed: as a guest whose task the run cancelled.
    assert done.stdout.splitlines() == ["rested", "device stopped", "ended True, files 0"]


async def test_a_resting_guests_wake_runs_its_first_slice_without_a_yield(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rest is a wait: the restarted read's first slice does not first yield the loop
    (run.YIELD_TIME counts from the read's start, not from when the CPU went to rest)."""
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    yields: list[int] = []
    real_yield = run._yield

    async def counted(cpu: LgCpu) -> None:
        yields.append(cpu.id)
        await real_yield(cpu)

    monkeypatch.setattr(run, "_yield", counted)
    async with LguestDevice(engines="pool") as dev:
        g, restarts, _ = await _counter(dev, rests=True)
        for hit in (1, 2):
            assert await asyncio.wait_for(g.file.read(abi.WORD_SIZE), LIMIT) == b""
            # (the loop thread computes past YIELD_TIME while the guest rests)
            spin_until = time.thread_time() + 2 * run.YIELD_TIME
            while time.thread_time() < spin_until:
                pass
            yields.clear()
            await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
            assert restarts == [1] * hit
            assert await g.file.read(abi.WORD_SIZE) == abi.pack_words(0x33)
            assert yields == [] and g.u32("hits") == hit
        await g.file.close()
        g.memory.close()
