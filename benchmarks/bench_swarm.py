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
* ``_idle N [LAUNCH_FOR [WAIT]]``: ``idle N`` in this process, launching for at most
  LAUNCH_FOR seconds, the CPU watched for WAIT seconds while they wait (default
  ``WAIT``): the run for N = 1,000,000.

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
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from supervisor import GuestConfig, Supervisor, hibernation, memory, testing
from supervisor.host import Guest

from .guests import assemble
from .harness import Profile, Result

ROOT = Path(__file__).resolve().parent.parent
TICKER = ROOT / "guests" / "ticker.img"
WAIT = 2.0  # seconds the idle guests are watched while they wait
TRACED = 1000  # idle guests whose Python heap is traced (after the RSS is measured)
MILLION = 1_000_000
SETTLE = 60.0  # seconds idle guests may take to have their memories packed
WAVE = 1000  # guests launched at once by ``idlewaves``
MIN_AVAILABLE = 2 << 30  # bytes: launching idle guests stops if the machine has less
MEMORY_LOW = f"available memory below {MIN_AVAILABLE >> 30} GiB"  # why it stopped
CHECK_EVERY = 1000  # launches between two looks at the available memory


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


async def _idle(
    n: int, wave: int | None = None, launch_for: float | None = None, wait: float = WAIT
) -> str:
    figures = await idle_figures(n, wave, launch_for, wait)
    how = "" if wave is None else f" in waves of {wave:,}"
    stopped = f" (STOPPED at {figures['n']:,}: {figures['stopped']})" if figures["stopped"] else ""
    per = figures["rss_per_guest"]
    return (
        f"idle{how} n={n}{stopped}: RSS {per / 1024:,.1f} KiB/guest, Python heap "
        f"{figures['heap_per_guest'] / 1024:,.1f} KiB/guest ({figures['traced']:,} traced), "
        f"{figures['objects_per_guest']:.0f} gc objects and {figures['tasks_per_guest']:.2f} "
        f"tasks a guest; {figures['packed']:,} memories packed, "
        f"{figures['mappings_per_guest']:.3f} mappings a guest; "
        f"{figures['cpu_share']:.2%} of a core while they wait ({figures['wait_s']:.0f} s); "
        f"set-up "
        f"{figures['setup_s']:,.0f} s wall, {figures['setup_cpu_s']:,.0f} s CPU "
        f"({figures['setup_cpu_s'] / figures['n'] * 1e3:.2f} ms a guest); at 1,000,000 "
        f"(linear): {per * MILLION / 2**30:,.1f} GiB, "
        f"{figures['mappings_per_guest'] * MILLION:,.0f} more mappings (vm.max_map_count "
        f"{memory.map_count_limit():,}); {figures['load']}"
    )


async def idle_figures(
    n: int, wave: int | None = None, launch_for: float | None = None, wait: float = WAIT
) -> dict[str, Any]:
    """``n`` idle sleepers of 1 MiB in this process, launched in one loop (or ``wave``
    at a time, each settled before the next), measured once every memory is packed:
    the figures ``idle`` prints.  Launching stops early (``stopped`` says why; ``n`` is
    then the guests launched) if the machine's available memory falls below
    :data:`MIN_AVAILABLE`, or after ``launch_for`` seconds.  The CPU is watched for
    ``wait`` seconds while they wait.  Progress goes to stderr
    every :data:`CHECK_EVERY` launches."""
    image = Path(tempfile.mkdtemp(prefix="bench-swarm-")) / "sleeper.img"
    image.write_bytes(assemble(testing.SLEEPER).image)
    config = GuestConfig(image=image, memory="1M", console="null")
    async with Supervisor(keep_ended=False) as sup:
        guests = [await sup.launch(config)]  # the first guest pays for what every one shares
        await asyncio.sleep(1)
        gc.collect()
        rss0, objects0, tasks0 = _rss(), len(gc.get_objects()), len(asyncio.all_tasks())
        maps0 = _mappings()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        until = math.inf if launch_for is None else time.monotonic() + launch_for
        stopped = ""
        for first in range(0, n, wave or n):
            stopped = await _launch_idle(sup, config, guests, min(wave or n, n - first), until)
            if stopped:
                break
        setup_cpu, setup = time.process_time() - cpu0, time.perf_counter() - wall0
        n = len(guests) - 1
        rss = _rss() - rss0
        objects = len(gc.get_objects()) - objects0
        tasks = len(asyncio.all_tasks()) - tasks0
        packed = memory.packed_memories()
        mappings = _mappings() - maps0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(wait)
        share = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        # The Python heap of more guests, traced apart: tracemalloc's own records would
        # count in the RSS above.
        traced = 0 if stopped == MEMORY_LOW else min(n, TRACED)
        heap = 0
        if traced:
            tracemalloc.start()
            heap0 = tracemalloc.get_traced_memory()[0]
            await _launch_idle(sup, config, guests, traced)
            heap = tracemalloc.get_traced_memory()[0] - heap0
            tracemalloc.stop()
        return {
            "n": n,
            "stopped": stopped,
            "rss_per_guest": rss / n,
            "heap_per_guest": heap / max(1, traced),
            "traced": traced,
            "objects_per_guest": objects / n,
            "tasks_per_guest": tasks / n,
            "packed": packed,
            "mappings_per_guest": mappings / n,
            "cpu_share": share,
            "wait_s": wait,
            "setup_s": setup,
            "setup_cpu_s": setup_cpu,
            "load": load(),
        }


def available() -> int:
    """The machine's available memory now, in bytes (``MemAvailable``)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


async def _launch_idle(
    sup: Supervisor, config: GuestConfig, guests: list[Guest], n: int, until: float = math.inf
) -> str:
    """Launch ``n`` more idle guests and wait until they have settled: each has taken
    the console's irq, and a second more (hibernation, packing, trims) has passed.
    Why it stopped launching early, if it did (the guests launched settle all the same):
    the available memory fell below :data:`MIN_AVAILABLE`, or the clock passed ``until``
    (``time.monotonic``)."""
    stopped = ""
    started = time.perf_counter()
    for i in range(n):
        if i % CHECK_EVERY == 0:
            if available() < MIN_AVAILABLE:
                stopped = MEMORY_LOW
            elif time.monotonic() > until:
                stopped = "its time for launching ran out"
            if stopped:
                break
            if i:
                print(
                    f"{len(guests):,} guests, RSS {_rss() >> 20:,} MiB, "
                    f"{time.perf_counter() - started:,.0f} s; {load()}",
                    file=sys.stderr,
                    flush=True,
                )
        guests.append(await sup.launch(config))
    # A guest's memory is packed once it rests, after its boot and its irq: the count of
    # packed memories (one number, however many guests) says when all have settled, where
    # a pass over every guest's stats would cost a million reads a look.  Every memory
    # packed (on a loaded machine the dormitory's timer runs late), up to a bound after
    # the last launch: the figure then says how many were.
    await asyncio.sleep(1 + hibernation.PACK_AFTER)
    settled = time.monotonic() + SETTLE
    while memory.packed_memories() < len(guests) and time.monotonic() < settled:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    await asyncio.sleep(hibernation.PACK_TRIM_EVERY)
    gc.collect()
    return stopped


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


async def idle_guests(p: Profile) -> list[Result]:
    """``python -m benchmarks``' figure: ``p.idle_guests`` idle guests (``--idle-guests
    N``) in a fresh child process, their memory each and the CPU while they wait; raw:
    a bare instance run to the same ``hlt``, per instance."""
    from .cases import SMALL_TCG, _child  # (cases imports this module)

    n = p.idle_guests
    raw = await _child("raw-halted", "300", str(SMALL_TCG))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.bench_swarm", "_idle_json", str(n),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(ROOT),
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench_swarm _idle_json {n} failed:\n{err.decode()[-2000:]}")
    sup: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    per, raw_per = sup["rss_per_guest"] / 1024, raw["per_guest"] / 1024
    stopped = f" (stopped: {sup['stopped']})" if sup["stopped"] else ""
    launched = f"{sup['n']:,}{stopped}"
    return [
        Result(
            "idle_guest_rss",
            f"{launched} idle guests of 1 MiB (halted, memory packed): memory each",
            "KiB",
            per,
            raw_per,
            per / raw_per,
            16.0,
            "value",
            "lower",
            f"RSS delta / N in a fresh process, touched pages included; Python heap "
            f"{sup['heap_per_guest'] / 1024:.1f} KiB a guest ({sup['traced']:,} traced), "
            f"{sup['objects_per_guest']:.0f} gc objects, {sup['mappings_per_guest']:.3f} "
            f"mappings a guest; set-up {sup['setup_s']:,.0f} s wall, "
            f"{sup['setup_cpu_s'] / sup['n'] * 1e3:.2f} ms of CPU a guest; {sup['load']}; "
            "raw: a bare instance run to the same hlt",
            sup,
        ),
        Result(
            "idle_guest_cpu",
            f"{launched} idle guests: CPU while they wait",
            "% of a core",
            sup["cpu_share"] * 100,
            None,
            None,
            1.0,
            "value",
            "lower",
            f"process CPU over {WAIT:.0f} s once every memory is packed; {sup['load']}",
        ),
    ]


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
        launch_for = float(argv[2]) if len(argv) > 2 else None  # seconds
        wait = float(argv[3]) if len(argv) > 3 else WAIT  # seconds
        print(asyncio.run(_idle(int(argv[1]), launch_for=launch_for, wait=wait)))
        return
    if argv[:1] == ["_idle_json"]:
        print(json.dumps(asyncio.run(idle_figures(int(argv[1])))))
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
