"""Prompt shutdown and isolation under load: the timing goals.

* ``shutdown_aclose``: ``Supervisor.aclose()`` with N busy guests (goal < 1 s for 1,000);
* ``shutdown_kill``: ``Guest.kill()`` of one guest beside N busy neighbours (goal < 10 ms);
* ``flood_neighbour``: a guest counting beside a console flooder, against the same
  count alone (goal: within 3x).

The raw baseline of the first two is closing as many bare Unicorn instances.
"""

from __future__ import annotations

import asyncio
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


async def flood_neighbour(p: Profile) -> list[Result]:
    """A counting guest alone, then beside a console flooder (null console)."""
    with tempfile.TemporaryDirectory() as tmp:
        counter = Path(tmp) / "count.img"
        counter.write_bytes(assemble(COUNTER).image)
        flooder = FLOOD_IMAGE
        async with Supervisor() as sup:
            alone = min([await _count(sup, counter) for _ in range(3)])
            flood = await sup.launch(GuestConfig(image=flooder, memory="1M", console="null"))
            await poll(lambda: flood.stats.notifies >= 20, 0.01)
            beside = min([await _count(sup, counter) for _ in range(3)])
            await flood.kill()
    ratio = beside / alone
    return [
        Result(
            "flood_neighbour",
            "counting to 3M beside a console flooder vs alone",
            "s",
            beside,
            alone,
            ratio,
            3.0,
            "ratio",
            "lower",
            "raw: the same guest alone on the same Supervisor (best of 3 each)",
        )
    ]
