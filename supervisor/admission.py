"""How many guests a swarm keeps alive: as many as the machine's memory holds, at what a
guest is measured to cost.

:class:`Admission` counts the guests alive and, every few admissions and ends, reads
two numbers: the process's resident memory and the memory the host still has
available.  A guest's cost is the resident memory grown over the start divided by
the guests alive, taken when the most guests were alive (the best-averaged figure;
memory an ended guest left in the C heap is reused by the next, so the figure at
the peak is the truest).  The limit is the guests alive plus as many more as
fit in what the host has available beyond a reserve, at ``SAFETY`` times that cost
(a swarm's shard, one of ``shares`` processes admitting at once, counts only its
share of that room);
it at most doubles from one reading to the next, since guests just launched have
not touched their memory yet, and it shrinks at once when memory runs short (other
processes count too).  Nothing here reads a clock: the readings come from
the two functions given, so a test can fabricate them.

:class:`Collector` paces the garbage collector's full collections by the guests that
end, the only source of old garbage in a swarm.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

SAFETY = 2  # a guest is admitted as if it cost twice what was measured
FIRST = 64  # guests admitted before the first reading
EVERY = 64  # admissions and ends between readings
RESERVE = 4  # the host keeps a quarter of what it had available at the start
FLOOR = 16 << 10  # the least a guest is taken to cost (bytes)


@dataclass(frozen=True, slots=True)
class Reading:
    """One look at memory: the process's resident bytes, the host's available bytes."""

    rss: int
    available: int


def read_memory() -> Reading:
    """The process's resident memory (``/proc/self/statm``) and the host's available
    memory (``MemAvailable`` in ``/proc/meminfo``); 0 for what cannot be read."""
    rss = available = 0
    try:
        with open("/proc/self/statm") as statm:
            rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    return Reading(rss, available)


class Admission:
    """Admits guests while the host's memory holds them (see the module's docstring).

    :meth:`admit` waits for room and counts the guest alive; :meth:`ended` counts one
    out.  ``measure`` gives the readings (default :func:`read_memory`); ``max_alive``,
    if given, is the limit instead of the measured one; ``shares``: how many processes
    admit guests into the same host memory at once, this one among them.
    """

    __slots__ = (
        "_base",
        "_cost",
        "_events",
        "_keep",
        "_measure",
        "_most",
        "_room",
        "_shares",
        "alive",
        "limit",
        "max_alive",
    )

    def __init__(
        self,
        measure: Callable[[], Reading] = read_memory,
        *,
        max_alive: int | None = None,
        shares: int = 1,
    ) -> None:
        if max_alive is not None and max_alive < 1:
            raise ValueError(f"max_alive must be at least 1, not {max_alive}")
        if shares < 1:
            raise ValueError(f"shares must be at least 1, not {shares}")
        self._shares = shares
        self._measure = measure
        start = measure()
        self._base = start.rss
        self._keep = start.available // RESERVE
        self._cost = 0  # bytes a guest costs; 0 until the first reading with guests alive
        self._most = 0  # guests alive at the reading the cost comes from
        self._events = 0
        self._room = asyncio.Event()
        self.alive = 0
        self.max_alive = max_alive
        self.limit = max_alive if max_alive is not None else FIRST

    @property
    def cost(self) -> int:
        """What a guest is measured to cost, in bytes (0 before the first reading)."""
        return self._cost

    def may_admit(self) -> bool:
        return self.alive < self.limit

    async def admit(self) -> None:
        """Wait until one more guest fits, then count it alive."""
        while not self.may_admit():
            self._room.clear()
            await self._room.wait()
        self.alive += 1
        self._event()

    def ended(self) -> None:
        """Count a guest out (it ended, or its launch failed)."""
        self.alive -= 1
        self._event()
        if self.may_admit():
            self._room.set()

    def _event(self) -> None:
        self._events += 1
        if self.max_alive is None and self._events % EVERY == 0:
            self.update(self._measure())

    def update(self, reading: Reading) -> None:
        """Take a reading: the cost (at the most guests alive so far) and the limit."""
        if self.alive > 0 and self.alive >= self._most:
            self._most = self.alive
            self._cost = max(FLOOR, (reading.rss - self._base) // self.alive)
        if self._cost == 0 or reading.available <= 0:  # nothing to go by: keep the limit
            return
        room = max(0, reading.available - self._keep) // (SAFETY * self._cost * self._shares)
        self.limit = max(1, min(self.alive + room, 2 * self.limit))
        if self.may_admit():
            self._room.set()


COLLECT_FLOOR = 1000  # guests ended between two full collections at least
BACKSTOP = 1000  # young (generation 1) collections between CPython's own full ones


class Collector:
    """Full garbage collections paced by a swarm's ends, not by its launches.

    A guest's Python objects (about 120) live as long as it does, so they reach the
    oldest generation, and CPython collects that generation in full each time it has
    grown by a quarter: a swarm launching tens of thousands of guests pays a full
    collection, every object of every guest alive scanned, each time its guests grow
    by 25%, though none of them is garbage.  An ended guest leaves its objects in
    reference cycles (the Launcher, its tasks, its devices point at each other), so a
    full collection is what frees them.

    Inside ``with Collector():`` the objects already there are frozen (never scanned
    again; they are unfrozen at the end), CPython's own full collections come only
    after :data:`BACKSTOP` young collections, and :meth:`ended` runs one after every
    ``max(COLLECT_FLOOR, alive)`` ends while guests are still to be launched: each
    scans about the objects of the guests alive and of as many ended ones, so a guest
    costs a bounded amount of collection work however many are alive, and what ended
    guests left stays about what the guests alive hold.  Young collections go on as
    ever.  With the collector disabled (``gc.disable()``) it changes nothing.
    ``collections``: the full collections it ran.
    """

    __slots__ = ("_ended", "_saved", "collections")

    def __init__(self) -> None:
        self._ended = 0
        self._saved: tuple[int, int, int] | None = None
        self.collections = 0

    def __enter__(self) -> Collector:
        if gc.isenabled():
            gc.collect()
            gc.freeze()
            self._saved = gc.get_threshold()
            gc.set_threshold(self._saved[0], self._saved[1], BACKSTOP)
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            gc.unfreeze()
            self._saved = None

    async def __aenter__(self) -> Collector:  # (beside a Supervisor in one ``async with``)
        return self.__enter__()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(et, e, tb)

    def ended(self, alive: int, more: bool = True) -> None:
        """A guest ended; ``alive``: how many are alive now; ``more``: whether guests are
        still to be launched.  Once none is, nothing is collected: what an ended guest
        leaves (its Python objects) is less than what its end freed (its memory), so the
        process only shrinks, and no later guest would reuse the memory a collection
        frees."""
        if self._saved is None or not more:
            return
        self._ended += 1
        if self._ended >= max(COLLECT_FLOOR, alive):
            self._ended = 0
            self.collections += 1
            gc.collect()
