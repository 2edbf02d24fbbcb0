"""A ticker's life (boot, ticks, power-off) costs as few wakes and yields as it can: a
``null`` console's end of input reaches the guest before its first slice instead of
waking it after its first halt, and a resting read's restart does not yield at once
for the loop's work done while it slept.  Counted (sleeps, yields, rests), never timed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from supervisor import GuestConfig, Supervisor, hibernation, run
from supervisor.cpu import LgCpu
from supervisor.execute import SliceExit
from supervisor.hibernation import Dormitory

LIMIT = 60  # seconds: a bound for failing, never a wait for success
TICKER = Path(__file__).resolve().parent.parent / "guests" / "ticker.img"


def count_calls(monkeypatch: pytest.MonkeyPatch, counts: Counter[str]) -> None:
    """Count the run loop's sleeps (a CPU halted until a wake) and yields, and the
    yields of a read that starts a CPU packed (a rest's restart, a boot's first read)
    before it has run a slice."""
    run_guest, run_slice, sleep, yield_ = run.run_guest, run._run_slice, run._sleep, run._yield
    unsliced: set[int] = set()  # the CPUs whose such read has run no slice yet

    async def counted_run_guest(cpu: LgCpu, *args: Any) -> int:
        if cpu.engine.packed or cpu.lguest_data is None:
            unsliced.add(id(cpu))
        return await run_guest(cpu, *args)

    async def counted_run_slice(cpu: LgCpu, *args: Any) -> SliceExit:
        unsliced.discard(id(cpu))
        return await run_slice(cpu, *args)

    async def counted_sleep(cpu: LgCpu, dormitory: Dormitory | None) -> None:
        counts["sleep"] += 1
        await sleep(cpu, dormitory)

    async def counted_yield(cpu: LgCpu) -> None:
        counts["yield"] += 1
        if id(cpu) in unsliced:
            counts["yield before its first slice"] += 1
        await yield_(cpu)

    monkeypatch.setattr(run, "run_guest", counted_run_guest)
    monkeypatch.setattr(run, "_run_slice", counted_run_slice)
    monkeypatch.setattr(run, "_sleep", counted_sleep)
    monkeypatch.setattr(run, "_yield", counted_yield)


async def test_a_null_consoles_end_of_input_costs_no_wake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The console irq that says input has ended is pending before the guest first
    runs (the Launcher polls its devices then, no Waker task polls them later), so the
    ticker takes it at its first halt and sleeps once per tick: one sleep in a one-tick
    life, not a second one for that irq alone."""
    counts: Counter[str] = Counter()
    count_calls(monkeypatch, counts)
    create_task = asyncio.create_task

    def counted_create_task(coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        counts[kwargs.get("name") or "task"] += 1
        return create_task(coro, **kwargs)

    monkeypatch.setattr(asyncio, "create_task", counted_create_task)
    config = GuestConfig(image=TICKER, memory="1M", cmdline="ticks=1 period_ms=50", console="null")
    async with Supervisor() as sup:
        guest = await sup.launch(config)
        async with asyncio.timeout(LIMIT):
            end = await guest.wait()
    assert end.exit_status == 0
    assert guest.stats.interrupts == 2  # the console's end of input, then the tick
    assert counts["sleep"] == 1 and counts["lguest-waker"] == 0, counts


async def test_a_resting_guests_wake_does_not_yield_for_others_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each time the ticker rests the loop's thread works (as a crowd's other guests would)
    for longer than ``run.YIELD_TIME`` before the tick's timer wakes it: that was not the
    ticker's time, so its wake does not yield before it has run anything (its own slices'
    time may still make it yield later, on a loaded machine)."""
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    counts: Counter[str] = Counter()
    count_calls(monkeypatch, counts)
    config = GuestConfig(image=TICKER, memory="1M", cmdline="ticks=3 period_ms=150", console="null")

    def busy() -> None:  # the loop's thread computes, as other guests' wakes would
        until = time.thread_time() + 4 * run.YIELD_TIME
        while time.thread_time() < until:
            pass

    async with Supervisor() as sup:
        guest = await sup.launch(config)
        async with asyncio.timeout(LIMIT):
            for rest in (1, 2, 3):  # before each tick (150 ms apart: it packs and rests)
                assert await guest.rested(rest)
                busy()  # on the loop's thread: the timer's wake comes after it
            end = await guest.wait()
    assert end.exit_status == 0
    assert guest.stats.rests == 3  # each tick's timer woke it resting
    assert counts["yield before its first slice"] == 0, counts
