"""The swarm's admission: how many guests stay alive, from fabricated memory readings."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
from guestasm import until

from supervisor import GuestConfig, Supervisor
from supervisor import admission as adm
from supervisor import cli as cli_module
from supervisor.admission import Admission, Reading, read_memory

MiB = 1 << 20
GiB = 1 << 30


class Machine:
    """A fabricated memory source: the test sets what the next reading says."""

    def __init__(self, rss: int, available: int) -> None:
        self.rss = rss
        self.available = available
        self.readings = 0

    def __call__(self) -> Reading:
        self.readings += 1
        return Reading(self.rss, self.available)


def admit(a: Admission, n: int) -> None:
    """Admit ``n`` guests that must fit at once."""

    async def go() -> None:
        for _ in range(n):
            assert a.may_admit(), (a.alive, a.limit)
            await asyncio.wait_for(a.admit(), 1)

    asyncio.run(go())


def test_the_first_guests_are_admitted_before_any_reading() -> None:
    machine = Machine(rss=100 * MiB, available=8 * GiB)
    a = Admission(machine)
    assert (a.limit, a.cost, machine.readings) == (adm.FIRST, 0, 1)
    admit(a, adm.FIRST - 1)
    assert machine.readings == 1  # the next reading comes at the EVERY-th event


def test_the_limit_follows_the_measured_cost_and_grows_at_most_twofold() -> None:
    machine = Machine(rss=100 * MiB, available=8 * GiB)
    a = Admission(machine)
    machine.rss += adm.EVERY * MiB  # each guest alive grew the process by 1 MiB
    admit(a, adm.EVERY)
    assert machine.readings == 2 and a.cost == MiB
    # room: (8 GiB - 2 GiB kept) / (2 x 1 MiB) = 3072 more; doubling caps it at 128.
    assert a.limit == 2 * adm.FIRST
    machine.rss += adm.EVERY * MiB
    admit(a, adm.EVERY)
    assert a.limit == 4 * adm.FIRST
    machine.available = 2 * GiB + 2 * 300 * MiB  # room for 300 more at 2 x 1 MiB
    machine.rss += adm.EVERY * MiB
    admit(a, adm.EVERY)
    assert (a.alive, a.limit) == (3 * adm.EVERY, 3 * adm.EVERY + 300)


def test_the_limit_shrinks_at_once_when_memory_runs_short() -> None:
    machine = Machine(rss=0, available=8 * GiB)
    a = Admission(machine)
    machine.rss = adm.EVERY * 4 * MiB
    admit(a, adm.EVERY)
    assert a.limit == 2 * adm.FIRST
    machine.available = 2 * GiB  # another process took it: nothing beyond the reserve
    a.update(machine())
    assert a.limit == a.alive and not a.may_admit()


def test_a_cheap_guest_costs_at_least_the_floor() -> None:
    machine = Machine(rss=0, available=8 * GiB)
    a = Admission(machine)
    admit(a, adm.EVERY)  # RSS never grew
    assert a.cost == adm.FLOOR


def test_memory_kept_after_guests_ended_does_not_raise_the_cost() -> None:
    machine = Machine(rss=0, available=64 * GiB)
    a = Admission(machine)
    machine.rss = adm.EVERY * MiB
    admit(a, adm.EVERY)
    for _ in range(adm.EVERY - 1):
        a.ended()  # the C heap keeps their memory: the process does not shrink
    a.update(machine())
    assert (a.alive, a.cost) == (1, MiB)  # measured at 64 alive, not 64 MiB for one


def test_an_ended_guest_lets_a_waiting_one_in() -> None:
    machine = Machine(rss=0, available=8 * GiB)
    a = Admission(machine, max_alive=2)
    order: list[str] = []

    async def go() -> None:
        await a.admit()
        await a.admit()
        waiting = asyncio.create_task(a.admit())
        await asyncio.sleep(0)
        order.append(f"waiting {a.alive}")
        a.ended()
        await asyncio.wait_for(waiting, 1)
        order.append(f"admitted {a.alive}")

    asyncio.run(go())
    assert order == ["waiting 2", "admitted 2"]


def test_max_alive_is_the_limit_and_nothing_is_measured() -> None:
    machine = Machine(rss=0, available=0)
    a = Admission(machine, max_alive=3)
    admit(a, 3)
    for _ in range(200):
        a.ended()
        admit(a, 1)
    assert (a.limit, machine.readings) == (3, 1)
    with pytest.raises(ValueError, match="at least 1"):
        Admission(machine, max_alive=0)


def test_unknown_available_memory_keeps_the_limit() -> None:
    machine = Machine(rss=0, available=0)
    a = Admission(machine)
    admit(a, adm.EVERY)
    assert a.limit == adm.FIRST


def test_read_memory_reads_this_process() -> None:
    reading = read_memory()
    assert reading.rss > 0 and reading.available > 0


ENDLESS = GuestConfig(
    image=str(Path(__file__).resolve().parent.parent / "guests" / "ticker.img"),
    memory=1 << 20,
    cmdline="ticks=10000000 period_ms=50",
    console="null",
)
LIMIT = 120.0  # seconds: a bound for failing on a loaded machine, never a wait for success


async def test_a_swarm_stops_launching_once_its_booted_guests_fill_the_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The readings see the guests launched so far running (each launch gives the loop
    a turn): memory that the booted guests fill stops the launches within a reading."""
    made: list[Supervisor] = []
    admissions: list[Admission] = []

    class Watched(Supervisor):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            made.append(self)

    def full_once_booted() -> Reading:
        """4 GiB available until a guest has booted (opened its file), then only the
        quarter kept: a machine whose memory the guests running have filled."""
        booted = len(made[0].device.files) if made else 0
        return Reading(100 * MiB + booted * MiB, GiB if booted else 4 * GiB)

    def admission(**kwargs: Any) -> Admission:
        admissions.append(Admission(full_once_booted, **kwargs))
        return admissions[0]

    monkeypatch.setattr(cli_module, "Supervisor", Watched)
    monkeypatch.setattr(cli_module, "Admission", admission)
    n = 20 * adm.EVERY
    swarm = asyncio.ensure_future(cli_module.run_swarm(ENDLESS, n))
    try:
        await until(lambda: bool(admissions) and admissions[0].alive >= adm.FIRST, LIMIT)
        (a,) = admissions
        # Every guest launched runs; then the launches have stopped, or all n were made.
        await until(lambda: all(g.stats.notifies > 0 for g in made[0].guests), LIMIT)
        await until(lambda: not a.may_admit() or len(made[0].guests) == n, LIMIT)
        assert len(made[0].guests) <= adm.FIRST + adm.EVERY < n
    finally:
        swarm.cancel()
        async with asyncio.timeout(LIMIT):
            with pytest.raises(asyncio.CancelledError):
                await swarm


class FullCollections:
    """Counts the full (generation 2) collections that start while it is installed."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            self.count += 1

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


class Node:
    """An object in a reference cycle (as a guest's are): only a collection frees it."""

    __slots__ = ("__weakref__", "me")

    def __init__(self) -> None:
        self.me = self


def _cycles(n: int) -> list[Node]:
    """``n`` long-lived objects in cycles (what guests alive hold)."""
    return [Node() for _ in range(n)]


def test_growing_guests_cost_no_full_collection_in_a_collector() -> None:
    assert gc.isenabled()
    n = 2 * len(gc.get_objects())  # growth by far past CPython's quarter
    with FullCollections() as plain:
        kept = _cycles(n)
    del kept
    gc.collect()
    with adm.Collector() as collector, FullCollections() as paced:
        assert gc.get_freeze_count() > 0  # what was there is never scanned again
        kept = _cycles(n)
        assert collector.collections == 0
    del kept
    assert gc.get_freeze_count() == 0 and gc.get_threshold()[2] != adm.BACKSTOP
    assert plain.count >= 1
    assert paced.count == 0


def test_a_collector_collects_once_per_as_many_ends_as_guests_alive() -> None:
    with adm.Collector() as collector, FullCollections() as full:
        for _ in range(adm.COLLECT_FLOOR - 1):
            collector.ended(alive=10)
        assert (collector.collections, full.count) == (0, 0)
        collector.ended(alive=10)  # the floor: a few guests alive
        assert (collector.collections, full.count) == (1, 1)
        alive = 3 * adm.COLLECT_FLOOR
        for _ in range(alive - 1):
            collector.ended(alive=alive)
        assert collector.collections == 1
        collector.ended(alive=alive)
        assert (collector.collections, full.count) == (2, 2)
        for _ in range(2 * adm.COLLECT_FLOOR):  # every guest launched: memory only falls
            collector.ended(alive=0, more=False)
        assert (collector.collections, full.count) == (2, 2)


def test_garbage_of_ended_guests_is_freed_by_the_paced_collection() -> None:
    with adm.Collector() as collector:
        garbage = Node()
        ref = weakref.ref(garbage)
        gc.collect(1)  # it survives the young collections: now old, as a guest's objects are
        del garbage
        gc.collect(1)
        assert ref() is not None  # only a full collection frees it
        for _ in range(adm.COLLECT_FLOOR):
            collector.ended(alive=0)
        assert ref() is None
