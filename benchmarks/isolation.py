"""Prompt shutdown and isolation under load: the timing goals.

* ``shutdown_aclose``: ``Supervisor.aclose()`` with N busy guests (goal < 1 s for 1,000);
* ``shutdown_kill``: ``Guest.kill()`` of one guest beside N busy neighbours (goal < 10 ms);
* ``flood_neighbour`` (``null`` console) and ``flood_neighbour_capture`` (nobody reads):
  a guest counting beside a console flooder, against the same count alone (goal:
  within 3x);
* ``hogs_neighbour``: a guest counting to 200,000 beside as many hostile hogs as the
  pool has threads, the slowest of three kinds of hog (goal: 0.3 s).

tests/test_hostile.py checks the mechanisms behind the last two by counting (the
neighbour runs to its end, the flood's cost is per NOTIFY or stops at the buffer,
the hogs give their threads back); these figures are how long it takes.

The raw baseline of the first two is closing as many bare Unicorn instances.
"""

from __future__ import annotations

import asyncio
import functools
import tempfile
import time
from pathlib import Path

from supervisor import Guest, GuestConfig, Supervisor
from supervisor.testing import SPIN

from .guests import SMALL_RAM, assemble
from .harness import Profile, Result, median, now, poll
from .raw import RawCpu

# Counts to 3,000,000 in memory, then powers off with "counted" (a Launcher-ready COUNT_TO).
COUNTER = r"""
main:
    LGUEST_INIT
1:  incl counter
    cmpl $3000000, counter
    jne 1b
    HCALL 2, msg, 1, 0
.data
counter: .long 0
msg: .asciz "counted"
"""
FLOOD_IMAGE = Path(__file__).resolve().parent.parent / "guests" / "flood.img"


def _raw_close(n: int) -> float:
    image = assemble(SPIN)
    cpus = [RawCpu(image, SMALL_RAM) for _ in range(n)]
    t0 = now()
    for c in cpus:
        c.close()
    return now() - t0


async def _busy(sup: Supervisor, image: Path, n: int) -> list[Guest]:
    config = GuestConfig(image=image, memory=SMALL_RAM, console="null")
    guests = [await sup.launch(config) for _ in range(n)]
    await poll(lambda: sum(g.stats.run_time > 0 for g in guests) >= n, 0.01)  # every one ran
    await asyncio.sleep(0.2)  # and the executor's queue is full of their slices
    return list(guests)


async def shutdown(p: Profile) -> list[Result]:
    n = p.spinners
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "spin.img"
        image.write_bytes(assemble(SPIN).image)
        sup = Supervisor()
        guests = await _busy(sup, image, n)
        kills = []
        for victim in guests[:5]:
            t0 = now()
            await victim.kill()
            kills.append(now() - t0)
        t0 = now()
        await sup.aclose()
        closing = now() - t0
    raw = _raw_close(n)
    kill_ms = median(kills) * 1e3
    return [
        Result(
            "shutdown_aclose",
            f"Supervisor.aclose() of {n:,} busy guests",
            "s",
            closing,
            raw,
            closing / raw if raw > 0 else None,
            1.0,
            "value",
            "lower",
            f"raw: closing {n:,} bare Unicorn instances",
        ),
        Result(
            "shutdown_kill",
            f"Guest.kill() beside {n - 1:,} busy neighbours",
            "ms",
            kill_ms,
            None,
            None,
            10.0,
            "value",
            "lower",
            f"median of {len(kills)}, max {max(kills) * 1e3:.1f} ms",
        ),
    ]


async def _count(sup: Supervisor, image: Path) -> float:
    guest = await sup.launch(GuestConfig(image=image, memory=SMALL_RAM, console="null"))
    t0 = time.perf_counter()
    result = await guest.wait()
    assert result.reason == "counted", result
    return time.perf_counter() - t0


async def _flood_beside(counter: Path, console: str) -> tuple[float, float]:
    """The counter alone, then beside a flooder: best of 3 seconds each."""
    async with Supervisor() as sup:
        alone = min([await _count(sup, counter) for _ in range(3)])
        flood = await sup.launch(GuestConfig(image=FLOOD_IMAGE, memory="1M", console=console))
        await poll(lambda: flood.stats.notifies >= (20 if console == "null" else 1), 0.01)
        beside = min([await _count(sup, counter) for _ in range(3)])
        await flood.kill()
    return beside, alone


async def flood_neighbour(p: Profile) -> list[Result]:
    """A counting guest alone, then beside a console flooder (null and capture consoles)."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        counter = Path(tmp) / "count.img"
        counter.write_bytes(assemble(COUNTER).image)
        for console, name, what in [
            ("null", "flood_neighbour", "a console flooder"),
            ("capture", "flood_neighbour_capture", "a flooder nobody reads"),
        ]:
            beside, alone = await _flood_beside(counter, console)
            results.append(
                Result(
                    name,
                    f"counting to 3M beside {what} vs alone",
                    "s",
                    beside,
                    alone,
                    beside / alone,
                    3.0,
                    "ratio",
                    "lower",
                    "raw: the same guest alone on the same Supervisor (best of 3 each)",
                )
            )
    return results


# Hostile guests that try to keep their CPU thread (tests/test_hostile.py's HOGS).
HOGS = {
    "spin": "main:\n LGUEST_INIT\n1: jmp 1b\n",
    "local hypercalls": "main:\n LGUEST_INIT\n1: HCALL 8, 1\n jmp 1b\n",
    "reflected traps": "main:\n LGUEST_INIT\n IDT 3, handler, 0xf\n1: int $3\n jmp 1b\n"
    "handler: iret\n",
}
HOG_WORKERS = 2
NEIGHBOUR = COUNTER.replace("3000000", "200000")


def all_ran(guests: list[Guest]) -> bool:
    return all(g.stats.run_time > 0 for g in guests)


async def hogs_neighbour(p: Profile) -> list[Result]:
    """A neighbour counting to 200,000 beside as many hogs as the pool has threads."""
    took: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        counter = Path(tmp) / "neighbour.img"
        counter.write_bytes(assemble(NEIGHBOUR).image)
        async with Supervisor(workers=HOG_WORKERS) as sup:
            alone = min([await _count(sup, counter) for _ in range(3)])
        for kind, source in HOGS.items():
            hog = Path(tmp) / "hog.img"
            hog.write_bytes(assemble(source).image)
            async with Supervisor(workers=HOG_WORKERS) as sup:
                config = GuestConfig(image=hog, memory=SMALL_RAM, console="null")
                hogs = [await sup.launch(config) for _ in range(HOG_WORKERS)]
                await poll(functools.partial(all_ran, hogs), 0.001)
                took[kind] = await _count(sup, counter)  # arrives during their first slices
    worst = max(took.values())
    return [
        Result(
            "hogs_neighbour",
            f"counting to 200,000 beside {HOG_WORKERS} hogs on {HOG_WORKERS} threads",
            "s",
            worst,
            alone,
            worst / alone,
            0.3,
            "value",
            "lower",
            "the slowest of: "
            + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in took.items())
            + f"; raw: alone, {alone * 1e3:.0f} ms",
            {"by_hog_s": took},
        )
    ]
