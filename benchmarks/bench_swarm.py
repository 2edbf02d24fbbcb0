"""What a guest costs in a crowd: a swarm of tickers with no flags, and idle guests.

``python -m benchmarks.bench_swarm [tickers N] [idle N] [life N]`` (not in the quick run: it
takes minutes at the issue's scale; pick N for the machine's load):

* ``tickers N``: ``swarm -n N guests/ticker.img --memory 1M --cmdline "ticks=3
  period_ms=1000"`` with no other flag, in a child process: wall time, the child's
  CPU (``wait4``: its shard processes' included), its peak RSS over N and over the
  most guests alive at once (the swarm's own table; by default a swarm of thousands
  runs in a process per CPU, whose peaks the table adds up), per guest.  Goals at
  N = 100,000: all finish within 3 minutes, at most 64 KiB peak RSS a guest.
* ``tickers1 N``: the same in one process (``--processes 1``), to compare.
* ``idle N``: N guests of 1 MiB halted with no clock event armed (a ticker cannot
  wait longer than the clock event's 4.29 s, so ticks would wake them), in a child
  process, measured once every guest's memory is packed (or ``SETTLE`` has passed):
  RSS growth per guest (its touched memory included), the Python heap per guest
  (``tracemalloc``, over up to 1,000 more guests launched after the RSS is read),
  gc-tracked objects and asyncio tasks per guest, how many memories are packed (every
  idle guest's should be) and the process's memory mappings per guest, and the CPU the
  process spends while they all wait (share of one core); then the RSS and the
  mappings 1,000,000 such guests would take at the same cost each.  Goal at
  N = 1,000,000: at most 16 KiB a guest and 1% of a core.
* ``idlewaves N``: the same, launched ``WAVE`` at a time, each wave settled (its guests
  resting, their memories packed) before the next: what N idle guests hold once they
  came over time, without N guests all waiting to be packed at once.  (``idle N``
  launches them in one loop; each launch boots its guest before the next is made,
  ``Supervisor.launch``, so neither holds N boots' transient objects at once.)

* ``life N``: N tickers (the same command line, console ``null``) launched at once
  through a ``Supervisor`` in a child process, no swarm table: the child's CPU over
  the run per guest (a whole life: open, boot, 3 ticks, power-off, close), and with an
  engine pool (``LGUEST_ENGINE_SWITCH=pool``) the engine takes and switches a life.
  Goal: at most 1 ms of CPU a life.

Each figure prints one line of per-guest numbers, with the load average.
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from supervisor import GuestConfig, Supervisor, hibernation, memory, testing
from supervisor.host import Guest

from .guests import assemble

ROOT = Path(__file__).resolve().parent.parent
TICKER = ROOT / "guests" / "ticker.img"
WAIT = 2.0  # seconds the idle guests are watched while they wait
TRACED = 1000  # idle guests whose Python heap is traced (after the RSS is measured)
MILLION = 1_000_000
SETTLE = 60.0  # seconds idle guests may take to have their memories packed
WAVE = 1000  # guests launched at once by ``idlewaves``


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def tickers(n: int, *flags: str) -> str:
    """Run the flagless swarm of ``n`` tickers in a child; its per-guest figures."""
    argv = [sys.executable, "-m", "supervisor", "swarm", "-n", str(n), str(TICKER),
            "--memory", "1M", "--cmdline", "ticks=3 period_ms=1000", *flags]  # fmt: skip
    before = load()
    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout is not None
    out = child.stdout.read()
    _pid, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    cpu = usage.ru_utime + usage.ru_stime
    # KiB: the largest process's (wait4), or the table's sum over the shards' processes
    peak = max(usage.ru_maxrss, _cell(out, -2) * 1024)
    finished = _cell(out, 0)
    alive = _cell(out, -3)
    title = next((line.strip() for line in out.splitlines() if "swarm of" in line), "")
    processes = title.partition(", in ")[2] or "1 process"
    return (
        f"tickers n={n} ({processes}): {finished:,} finished "
        f"(exit {os.waitstatus_to_exitcode(status)}) in {wall:.1f} s wall; "
        f"peak RSS {peak / 1024:,.0f} MiB = {peak / n:,.1f} KiB/guest "
        f"({peak / max(1, alive):,.1f} KiB per guest alive, peak alive {alive:,}); "
        f"CPU {cpu:.1f} s = {cpu / n * 1e3:.2f} ms/guest; {before}"
    )


def _cell(table: str, column: int) -> int:
    """A number from the swarm table's one row (``column``: its index among the cells)."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) > 4 and cells[0].replace(",", "").isdigit():
            return int(re.sub(r"[^0-9]", "", cells[column].split()[0]))
    return 0


async def _idle(n: int, wave: int | None = None) -> str:
    image = Path(tempfile.mkdtemp(prefix="bench-swarm-")) / "sleeper.img"
    image.write_bytes(assemble(testing.SLEEPER).image)
    config = GuestConfig(image=image, memory="1M", console="null")
    async with Supervisor(keep_ended=False) as sup:
        guests = [await sup.launch(config)]  # the first guest pays for what every one shares
        await asyncio.sleep(1)
        gc.collect()
        rss0, objects0, tasks0 = _rss(), len(gc.get_objects()), len(asyncio.all_tasks())
        maps0 = _mappings()
        for first in range(0, n, wave or n):
            await _launch_idle(sup, config, guests, min(wave or n, n - first))
        rss = _rss() - rss0
        objects = len(gc.get_objects()) - objects0
        tasks = len(asyncio.all_tasks()) - tasks0
        packed = memory.packed_memories()
        mappings = _mappings() - maps0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(WAIT)
        share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        # The Python heap of more guests, traced apart: tracemalloc's own records would
        # count in the RSS above.
        traced = min(n, TRACED)
        tracemalloc.start()
        heap0 = tracemalloc.get_traced_memory()[0]
        await _launch_idle(sup, config, guests, traced)
        heap = tracemalloc.get_traced_memory()[0] - heap0
        tracemalloc.stop()
        how = "" if wave is None else f" in waves of {wave:,}"
        return (
            f"idle{how} n={n}: RSS {rss / n / 1024:,.1f} KiB/guest, Python heap "
            f"{heap / traced / 1024:,.1f} KiB/guest ({traced:,} traced), {objects / n:.0f} gc "
            f"objects and {tasks / n:.2f} tasks a guest; {packed:,} memories packed, "
            f"{mappings / n:.3f} mappings a guest; {share:.1%} of a core while they wait; "
            f"at 1,000,000 (linear): {rss / n * MILLION / 2**30:,.1f} GiB, "
            f"{mappings / n * MILLION:,.0f} more mappings (vm.max_map_count "
            f"{memory.map_count_limit():,}); {load()}"
        )


async def _launch_idle(sup: Supervisor, config: GuestConfig, guests: list[Guest], n: int) -> None:
    """Launch ``n`` more idle guests and wait until they have settled: each has taken
    the console's irq, and a second more (hibernation, packing, trims) has passed."""
    for _ in range(n):
        guests.append(await sup.launch(config))
    # (The stats are counters, with nothing to wait on.)
    while sum(g.stats.interrupts >= 1 for g in guests) < len(guests):  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    await asyncio.sleep(1 + hibernation.PACK_AFTER)
    # Every memory packed (on a loaded machine the dormitory's timer runs late), up to
    # a bound: the figure then says how many were.
    settled = time.monotonic() + SETTLE
    while memory.packed_memories() < len(guests) and time.monotonic() < settled:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    await asyncio.sleep(hibernation.PACK_TRIM_EVERY)
    gc.collect()


def _mappings() -> int:
    """The process's memory mappings now (each counts against ``vm.max_map_count``)."""
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def idle(n: int) -> str:
    """Run ``n`` idle guests in a fresh child process; its per-guest figures."""
    return _child("idle", n)


def idlewaves(n: int) -> str:
    """``idle`` with the guests launched in waves of ``WAVE``."""
    return _child("idlewaves", n)


def life(n: int) -> str:
    """Run ``n`` tickers' lives in a fresh child process; the CPU a life."""
    return _child("life", n)


def _child(figure: str, n: int) -> str:
    argv = [sys.executable, "-m", "benchmarks.bench_swarm", f"_{figure}", str(n)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip() or f"{figure} n={n}: failed: {done.stderr.strip()[-300:]}"


async def _life(n: int) -> str:
    config = GuestConfig(
        image=TICKER, memory="1M", cmdline="ticks=3 period_ms=1000", console="null"
    )
    ended = asyncio.Event()
    left = n
    guests: list[Guest] = []

    def end() -> None:
        nonlocal left
        left -= 1
        if not left:
            ended.set()

    async with Supervisor(keep_ended=False) as sup:
        await sup.launch(config.model_copy(update={"name": "warm"}))  # what all share
        await asyncio.sleep(0.5)
        pool = sup.device.engines
        taken, switched, spent = (
            (pool.taken, pool.switched, pool.switch_time) if pool is not None else (0, 0, 0.0)
        )
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(n):
            guest = await sup.launch(config.model_copy(update={"name": f"ticker-{i}"}))
            guest.when_done(end)
            guests.append(guest)
        await ended.wait()
        cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
        failed = sum([(await guest.wait()).exit_status != 0 for guest in guests])
        engines = "no pool"
        if pool is not None:
            engines = (
                f"{(pool.taken - taken) / n:.1f} engine takes and "
                f"{(pool.switched - switched) / n:.1f} switches a life "
                f"({(pool.switch_time - spent) / max(1, pool.switched - switched) * 1e6:.0f} "
                "µs a switch)"
            )
    return (
        f"life n={n}: {cpu / n * 1e3:.2f} ms of CPU a guest ({failed} failed), "
        f"{wall:.1f} s wall; {engines}; {load()}"
    )


def main(argv: list[str]) -> None:
    if argv[:1] == ["_idle"]:
        print(asyncio.run(_idle(int(argv[1]))))
        return
    if argv[:1] == ["_idlewaves"]:
        print(asyncio.run(_idle(int(argv[1]), WAVE)))
        return
    if argv[:1] == ["_life"]:
        print(asyncio.run(_life(int(argv[1]))))
        return
    figures = {
        "tickers": tickers,
        "tickers1": lambda n: tickers(n, "--processes", "1"),
        "idle": idle,
        "idlewaves": idlewaves,
        "life": life,
    }
    pairs = list(zip(argv[::2], argv[1::2], strict=False)) or [
        ("tickers", "5000"),
        ("idle", "5000"),
    ]
    for name, count in pairs:
        if name not in figures:
            raise SystemExit(f"bench_swarm: unknown figure {name!r} ({', '.join(figures)})")
        print(figures[name](int(count)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
