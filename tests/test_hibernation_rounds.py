"""Hibernation leaves nothing behind, and a guest's wakes are its own cost.

Each round boots guests that hibernate at every halt (``hibernate_after=0``), wakes them
with interrupts, snapshots one while it hibernates and restores the snapshot, breaks one
out with a Waker, and closes them in every state (asleep and hibernated, with a read in
flight, awake after a wake).  After each round, with the garbage collected, the live
``LgCpu``/``Lguest`` objects, the open Unicorn instances and the dormitory's entries are
counted: after a first round (one-time costs: the instances made ahead) each count must
equal the first round's.  Objects are counted, not RSS: freed memory stays with the
allocator, so RSS wobbles by a few MiB whatever is freed.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest
from guestasm import HALT_COUNTER as SLEEPER
from guestasm import Booted, boot, until

from supervisor import GuestConfig, LguestDevice, Supervisor, _unicorn, abi, engines, hibernation
from supervisor.cpu import LgCpu
from supervisor.guest import Lguest
from supervisor.snapshot import capture, restore

GUEST_DIR = Path(__file__).resolve().parent.parent / "guests"
ROUNDS = 4  # each round ends with the full leak check: a leak shows in its first round
GUESTS = 4
WAKES = 3
LIMIT = 120  # seconds: a bound for failing (a starved machine too), never a wait for success


def live() -> dict[str, int]:
    """What a round may leave behind, counted after a full collection."""
    gc.collect()
    objects = gc.get_objects()
    return {
        "cpus": sum(isinstance(o, LgCpu) for o in objects),
        "guests": sum(isinstance(o, Lguest) for o in objects),
        "unicorns": sum(type(o).__name__ == "Uc" and not _unicorn.is_closed(o) for o in objects),
    }


async def wake(g: Booted) -> None:
    """An interrupt wakes the hibernated guest; its handler's notify ends the read."""
    reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
    await until(lambda: g.file.cpu(0).hibernated)
    await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
    assert await reader == abi.pack_words(0x33)


async def one_round(dev: LguestDevice) -> None:
    guests = [await boot(dev, SLEEPER) for _ in range(GUESTS)]
    for _ in range(WAKES):
        for g in guests:
            await wake(g)
    assert all(g.u32("hits") == WAKES for g in guests)
    first, second, third, fourth = guests
    # A snapshot of a hibernated guest, restored while the original sleeps on.
    reader = asyncio.ensure_future(first.file.read(abi.WORD_SIZE))
    await until(lambda: first.file.cpu(0).hibernated)
    await first.file.pause()
    snap = capture(first.file)
    first.file.resume()
    copy = await restore(snap, dev)
    copy_reader = asyncio.ensure_future(copy.read(abi.WORD_SIZE))
    await copy.write(abi.pack_words(abi.LHREQ_IRQ, 1))
    assert await copy_reader == abi.pack_words(0x33)
    # A Waker's break out of a hibernated halt.
    breaking = asyncio.ensure_future(second.file.read(abi.WORD_SIZE))
    await until(lambda: second.file.cpu(0).hibernated)
    brk = asyncio.ensure_future(second.file.waker().brk(True))
    with pytest.raises(BlockingIOError):
        await breaking
    await second.file.write(abi.pack_words(abi.LHREQ_BREAK, 0))
    await brk
    # Closed asleep with a read in flight, just after a wake, and with no read at all.
    woken = asyncio.ensure_future(third.file.read(abi.WORD_SIZE))
    await until(lambda: third.file.cpu(0).hibernated)
    await third.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
    pending: list[asyncio.Future[Any]] = [reader, woken]
    for f in (first.file, third.file, second.file, fourth.file, copy):
        await f.close()
    await asyncio.gather(*pending, return_exceptions=True)
    for g in guests:
        g.memory.close()
    copy.memory.close()


async def test_rounds_of_wakes_and_races_leave_no_cpu_guest_or_unicorn_behind() -> None:
    # What the process held before this test (in a whole run, an earlier test's failure
    # may keep a few guests alive through its traceback): none of it is this device's.
    before = live()
    async with asyncio.timeout(LIMIT * ROUNDS), LguestDevice(hibernate_after=0) as dev:
        await one_round(dev)
        await asyncio.sleep(0.05)  # (the instances made ahead after the last wakes)
        # Only the instances made ahead, and the engine pool's (at most its bound).
        most = (
            before["unicorns"]
            + _unicorn.BLANKS
            + (dev.engines.bound if dev.engines is not None else 0)
        )
        baseline = live()
        assert baseline["cpus"] <= before["cpus"] and baseline["guests"] <= before["guests"]
        assert baseline["unicorns"] <= most
        for _ in range(ROUNDS):
            await one_round(dev)
            await asyncio.sleep(0.05)
            left = live()
            assert left["cpus"] <= before["cpus"] and left["guests"] <= before["guests"]
            assert left["unicorns"] <= most
            assert dev.engines is not None or left == baseline
            assert dev.dormitory.entries == 0 and len(dev.dormitory) == 0


def ticker(**fields: Any) -> GuestConfig:
    """A guest that wakes and sleeps as fast as it can: a 1 ns clock event, re-armed at
    every tick, hibernating at every halt."""
    return GuestConfig(
        image=GUEST_DIR / "ticker.img",
        memory="1M",
        console="null",
        hibernate_after=0,
        **fields,
    )


def _tiny_wake_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wakers' share of the loop and a debt before waiting so small that any wake
    exceeds them: the tests check the mechanism, not this machine's speed."""
    monkeypatch.setattr(hibernation, "WAKE_SHARE", 1e-6)
    monkeypatch.setattr(hibernation, "WAKE_GRACE", 1e-6)


async def test_wakes_are_charged_to_the_waker_and_put_off_while_a_neighbour_computes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a neighbour computing on the workers, a guest whose wakes cost more than its
    share of the loop waits for its share to pay for them (the dormitory puts its wakes
    off); with idle workers, the same guest's wakes are never put off.

    The wakers' share and the debt they may run up before waiting are made tiny, so
    that what a wake costs on this machine (a thaw is cheap when an instance was made
    ahead) always exceeds them after a wake or two: the test checks the mechanism, not
    where this machine's speed puts the defaults, nor how many wakes a loaded machine's
    niced workers let the wakers make."""
    _tiny_wake_share(monkeypatch)
    monkeypatch.setenv(engines.ENV, "off")  # wakes that take new emulators
    async with asyncio.timeout(LIMIT), Supervisor() as sup:
        dormitory = sup.device.dormitory
        # (A wake a tick, or none when the tick's 1 ns event comes before the guest
        # sleeps, which a loaded machine makes more likely: far more wakes than the tiny
        # share pays for, whatever the load.)
        alone = await sup.launch(ticker(cmdline="ticks=100 period_ms=0"))
        assert (await alone.wait()).ok
        assert alone.stats.wakes >= 50 and dormitory.deferred == 0  # nobody else waited
        spinner = await sup.launch(GuestConfig(image=GUEST_DIR / "spinner.img", memory="1M"))
        wakers = [await sup.launch(ticker(cmdline="ticks=1000000 period_ms=0")) for _ in range(4)]
        await until(lambda: dormitory.deferred >= len(wakers), LIMIT)  # each put off
        for guest in (*wakers, spinner):  # a put-off wake ends at once for a kill
            assert (await guest.kill()).reason == "killed"


async def test_a_wake_for_the_launchers_read_is_put_off_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A guest that never halts, but hibernates each time it waits for its Launcher (a
    notify at every step), wakes at each read: while a neighbour computes, those wakes
    are put off like a halt's once it owes more than its grace."""
    _tiny_wake_share(monkeypatch)
    # Hibernation proper: with a pool, a CPU whose Launcher reads again at once keeps its
    # engine (hibernation, "Engines at a notify"), so there is no wake to put off.
    monkeypatch.setenv(engines.ENV, "off")
    async with asyncio.timeout(LIMIT), Supervisor() as sup:
        dormitory = sup.device.dormitory
        spinner = await sup.launch(GuestConfig(image=GUEST_DIR / "spinner.img", memory="1M"))
        # (A rate limit, never reached, so that each console write waits for the
        # Launcher's read loop instead of being served inside the read.)
        flood_config = GuestConfig(
            image=GUEST_DIR / "flood.img",
            memory="1M",
            console="null",
            console_rate=1 << 40,
            hibernate_after=0,
        )
        flood = await sup.launch(flood_config)
        # (Its first wake may be the one put off, its hibernation's cost already past
        # the tiny grace: only the spinner and the flood are on the dormitory's watch,
        # and the spinner never hibernates.)
        await until(lambda: dormitory.deferred >= 1, LIMIT)
        assert flood.stats.hibernations >= 1 and spinner.stats.hibernations == 0
        for guest in (flood, spinner):
            assert (await guest.kill()).reason == "killed"


async def test_a_pooled_guests_wakes_are_never_put_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """With an engine pool a wake takes a warm engine, not a new emulator: the same
    wakers beside the same computing neighbour as above, with the same tiny share, are
    never put off (an interrupt for a halted guest must not wait out a round of the
    crowd), and every tick goes on."""
    _tiny_wake_share(monkeypatch)
    monkeypatch.setenv(engines.ENV, "pool")
    async with asyncio.timeout(LIMIT), Supervisor() as sup:
        dormitory = sup.device.dormitory
        spinner = await sup.launch(GuestConfig(image=GUEST_DIR / "spinner.img", memory="1M"))
        wakers = [await sup.launch(ticker(cmdline="ticks=300 period_ms=0")) for _ in range(4)]
        for guest in wakers:
            assert (await guest.wait()).ok
            assert guest.stats.wakes >= 100
        assert dormitory.deferred == 0
        assert dormitory.debtors == 0  # (no account is kept for what they cannot owe)
        assert (await spinner.kill()).reason == "killed"
