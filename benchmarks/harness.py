"""Results, profiles and small measuring helpers shared by the figures."""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from supervisor import abi
from supervisor.abi import LHREQ_BREAK, pack_words

from .guests import Booted


@dataclass(frozen=True)
class Profile:
    name: str
    loop_seconds: float  # raw time a loop figure is calibrated to
    reps: int  # best-of repetitions for loop figures
    roundtrips: int
    latency_guests: int
    latency_seconds: float
    halted_guests: int
    spinners: int
    spin_seconds: float
    startups: int
    revives: int = 500  # pause + state + revive cycles in a row
    hibernate_cycles: int = 10_000  # hibernate/wake cycles of one guest (the goal's count)
    hibernated_guests: int = 2_000
    wakes: int = 200  # random wakes of hibernated guests
    pairs: int = 5  # interleaved raw/supervised rounds of a loop figure (paired_ratio)
    load: int = 0  # CPU-bound load processes running (--load): goals relative to raw
    idle_guests: int = 20_000  # idle guests held at once (--idle-guests: 1,000,000 is the goal's)


QUICK = Profile(
    "quick",
    loop_seconds=0.15,
    reps=3,
    roundtrips=2_000,
    latency_guests=100,
    latency_seconds=2.0,
    halted_guests=300,
    spinners=200,
    spin_seconds=2.0,
    startups=40,
    idle_guests=500,
)
FULL = Profile(
    "full",
    loop_seconds=0.5,
    reps=7,
    roundtrips=20_000,
    latency_guests=100,
    latency_seconds=8.0,
    halted_guests=10_000,
    spinners=1_000,
    spin_seconds=10.0,
    startups=300,
    revives=10_000,
    hibernated_guests=100_000,
    wakes=1_000,
    pairs=9,
)


@dataclass
class Result:
    """One figure: the supervised value, the raw Unicorn value, and their ratio.

    ``better`` says which direction is good for ``value`` against ``goal``:
    "higher" (throughput ratios, fairness) or "lower" (costs, latencies).
    """

    name: str
    title: str
    unit: str
    value: float
    raw: float | None
    ratio: float | None
    goal: float | None
    goal_on: str  # "ratio" or "value": what the goal is compared with
    better: str  # "higher" or "lower"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        got = self.ratio if self.goal_on == "ratio" else self.value
        if got is None:
            return None
        return got >= self.goal if self.better == "higher" else got <= self.goal

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["met"] = self.met
        return d


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def poll(predicate: Callable[[], bool], interval: float) -> None:
    """Wait until ``predicate()`` holds, checking every ``interval`` seconds (0: at every
    turn of the loop): a guest's progress (its memory, counters, CPU state) has no event
    to wait on."""
    while not predicate():  # noqa: ASYNC110 - there is no event to wait on
        await asyncio.sleep(interval)


def jain(xs: Sequence[float]) -> float:
    total = sum(xs)
    squares = sum(x * x for x in xs)
    return (total * total) / (len(xs) * squares) if squares else 0.0


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 4 << 30


def cpu_seconds() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def interleave(
    rounds: int, raw: Callable[[], float], sup: Callable[[], Awaitable[float]]
) -> tuple[list[float], list[float]]:
    """``rounds`` rounds of one raw and one supervised measurement each, back to back,
    in A/B then B/A order (so a drift of the machine's speed hits both sides alike):
    the raw values and the supervised values, round by round."""
    raws: list[float] = []
    sups: list[float] = []
    for k in range(rounds):
        if k % 2:
            sups.append(await sup())
            raws.append(raw())
        else:
            raws.append(raw())
            sups.append(await sup())
    return raws, sups


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float:
    """The median of the round-by-round ratios: each compares two measurements taken
    back to back, so a neighbour's load that slows one round does not set the ratio."""
    return median([a / b for a, b in zip(numerators, denominators, strict=True)])


# A scaling round (two at once against one) is sound when its two one-alone runs agree
# within MAX_DRIFT (the machine gave the side the same share before and after) and its
# scaling is at most MAX_SCALE: two loops cannot do more than twice the work of one in
# the same time, so a value above 2 (measuring error aside) says the one-alone runs
# were slowed by something else, not that two ran faster.
MAX_DRIFT = 1.25
MAX_SCALE = 2.1


@dataclass(frozen=True)
class ScalingRound:
    """One side's round of a scaling figure: the time of one loop alone, of two at once
    (each the same work), and of one alone again, back to back."""

    one_before: float
    two: float
    one_after: float

    @property
    def scale(self) -> float:
        """Two loops' throughput over one's: 2 x the one-alone time (the mean of the two
        runs, so a drift of the machine's speed across the round cancels) / two's."""
        return (self.one_before + self.one_after) / self.two

    @property
    def one(self) -> float:
        return (self.one_before + self.one_after) / 2

    @property
    def sound(self) -> bool:
        """The one-alone runs agree and the scaling is possible (MAX_DRIFT, MAX_SCALE)."""
        low, high = sorted((self.one_before, self.one_after))
        return high <= MAX_DRIFT * low and self.scale <= MAX_SCALE


@dataclass(frozen=True)
class Scaling:
    """The summary of paired scaling rounds, supervised and raw (:func:`scaling`)."""

    sup: float  # median of the chosen rounds' scalings
    raw: float
    ratio: float  # median of the chosen rounds' sup / raw scalings
    sup_spread: tuple[float, float]  # lowest and highest of the chosen rounds
    raw_spread: tuple[float, float]
    baseline: float  # median of the chosen rounds' one-alone times, sup / raw
    baseline_spread: tuple[float, float]
    chosen: int  # rounds the figures are of
    sound: int  # rounds sound on both sides (the chosen ones, if at least half)
    rounds: int


def scaling(sup: Sequence[ScalingRound], raw: Sequence[ScalingRound]) -> Scaling:
    """Summarise rounds measured in pairs (round k of each side back to back): the figures
    are of the rounds sound on both sides, if at least half are, else of all (and
    ``sound`` says how few were).  ``baseline`` compares the one-alone times: a
    supervised guest alone runs about as fast as raw's one thread, so a baseline far
    above 1 means the one-alone runs were slowed, and the scaling overstated."""
    pairs = list(zip(sup, raw, strict=True))
    good = [(s, r) for s, r in pairs if s.sound and r.sound]
    chosen = good if 2 * len(good) >= len(pairs) else pairs
    sups = [s.scale for s, _ in chosen]
    raws = [r.scale for _, r in chosen]
    bases = [s.one / r.one for s, r in chosen]
    return Scaling(
        median(sups),
        median(raws),
        paired_ratio(sups, raws),
        (min(sups), max(sups)),
        (min(raws), max(raws)),
        median(bases),
        (min(bases), max(bases)),
        len(chosen),
        len(good),
        len(pairs),
    )


def print_table(title: str, rows: Sequence[tuple[str, str, str]]) -> None:
    """A stand-alone benchmark's figures: ``title``, then one line per (figure, value,
    note), the names padded to one column and the values right-aligned."""
    width = max(len(r[0]) for r in rows)
    print(title)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>10}  {note}")


class Breaker:
    """A Waker coroutine that breaks a guest out every ``period`` seconds."""

    def __init__(self, g: Booted, period: float) -> None:
        self.g = g
        self.period = period
        self.breaks = 0
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        waker = self.g.file.waker()
        while not self._stop.is_set():
            await asyncio.sleep(self.period)
            if self._stop.is_set():
                break
            await waker.write(pack_words(LHREQ_BREAK, 1))
            self.breaks += 1

    async def stop(self) -> None:
        self._stop.set()
        await self.g.file.write(pack_words(LHREQ_BREAK, 0))
        await self._task
        await self.g.file.write(pack_words(LHREQ_BREAK, 0))


async def read_through_breaks(g: Booted) -> tuple[int, int]:
    """Read until the guest notifies, answering each EAGAIN with BREAK 0 as a Launcher does."""
    eagains = 0
    while True:
        try:
            return abi.unpack_words(await g.file.read(abi.WORD_SIZE))[0], eagains
        except BlockingIOError:
            eagains += 1
            await g.file.write(pack_words(LHREQ_BREAK, 0))


def now() -> float:
    return time.perf_counter()
