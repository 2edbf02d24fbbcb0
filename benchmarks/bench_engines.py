"""Engine switches: what handing a Unicorn instance from one CPU to another costs.

    python -m benchmarks.bench_engines [--cycles N] [--seconds S]

Measured in one run, each beside its raw Unicorn counterpart:

* a CPU giving back its engine and taking one again (``LgCpu.hibernate`` +
  ``LgCpu.thaw``, the median of ``--cycles``), with engines off (a new instance each
  time), from the pool (its own engine back untouched) and switched (another CPU's
  engine: strip, remap, hooks, context, TLB); raw: a bare instance's
  ``mem_unmap`` + ``mem_map_ptr`` of 1 MiB + ``context_restore`` + ``ctl_flush_tb``;
* a busy guest (the tight register loop, about ``--seconds`` of raw Unicorn) with
  engines off and with a switch at every slice (``engines="always"``), as ratios to
  raw Unicorn's time for the same loop;
* a crowd (``--guests``, 100) of busy guests sharing the workers, the tight loop and
  the C compute guest (guests/c/sieve.elf), with engines ``off`` (one each) and
  ``pool`` (each busy guest keeps the engine it computes on between its slices, made
  once the crowd starts): the process's CPU time against raw Unicorn's for the same
  work (CPU time, so that other programs on the machine do not count), and the share
  of it that engine switches and new engines took.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Iterator

from unicorn import UC_ARCH_X86, UC_MODE_32, UC_PROT_ALL, Uc

from supervisor import GuestConfig, LguestDevice, Supervisor, engines
from supervisor.memory import GuestMemory

from .bench_c import RAM, SIEVE, RawSieve
from .cases import LOOP, TIGHT_BODY
from .guests import Booted, assemble, boot, close
from .harness import print_table
from .raw import RawCpu

MiB = 1 << 20


def raw_loop(cpu: RawCpu, n: int) -> float:
    cpu.set_u32("iters", n)
    t0 = time.perf_counter()
    cpu.run("bench", "bench_end")
    return time.perf_counter() - t0


def raw_loop_cpu(cpu: RawCpu, n: int) -> float:
    """CPU seconds (this thread's) of the raw bench loop of ``n`` iterations."""
    cpu.set_u32("iters", n)
    t0 = time.thread_time()
    cpu.run("bench", "bench_end")
    return time.thread_time() - t0


def raw_switch(cycles: int) -> float:
    """Median seconds of a bare instance's remap of 1 MiB, context restore and flush."""
    memory = GuestMemory(MiB)
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.ctl_set_tcg_buffer_size(MiB)
    uc.mem_map_ptr(0, MiB, UC_PROT_ALL, memory.address)
    uc.mem_write(0, b"\xf4")  # hlt
    uc.emu_start(0, 1)  # warm: QEMU's lazy set-up is done
    context = uc.context_save()
    times = []
    for _ in range(cycles):
        t0 = time.perf_counter()
        uc.mem_unmap(0, MiB)
        uc.mem_map_ptr(0, MiB, UC_PROT_ALL, memory.address)
        uc.context_restore(context)
        uc.ctl_flush_tb()
        times.append(time.perf_counter() - t0)
    del uc
    memory.close()
    return statistics.median(times)


async def cycle_cost(mode: str, cycles: int) -> float:
    """Median seconds of a paused CPU's hibernate + thaw with engines ``mode``."""
    image = assemble(LOOP.format(body=TIGHT_BODY))
    async with LguestDevice(engines=mode, hibernate_after=math.inf) as dev:
        guests = [await boot(dev, image) for _ in range(2)]
        for g in guests:  # both at their first notify: warm, mapped, translated
            assert await g.read_word() == 1
        cpu = guests[0].file.cpu(0)
        times = []
        for _ in range(cycles):
            t0 = time.perf_counter()
            cpu.hibernate()
            cpu.thaw()
            times.append(time.perf_counter() - t0)
        for g in guests:
            await close(g)
    return statistics.median(times)


async def busy_time(mode: str, image_source: str, n: int) -> tuple[float, int]:
    """Seconds for the guest's bench loop of ``n`` iterations, and the slices it took."""
    image = assemble(image_source)
    async with LguestDevice(engines=mode, hibernate_after=math.inf) as dev:
        g: Booted = await boot(dev, image)
        assert await g.read_word() == 1
        g.set_u32("iters", n)
        slices0 = g.file.cpu(0).stats.slices
        t0 = time.perf_counter()
        assert await g.read_word() == 2
        elapsed = time.perf_counter() - t0
        slices = g.file.cpu(0).stats.slices - slices0
        await close(g)
    return elapsed, slices


async def measure(cycles: int, seconds: float) -> list[tuple[str, str, str]]:
    rows = []
    raw = raw_switch(cycles)
    rows.append(("raw: remap 1 MiB + context + flush", f"{raw * 1e6:.0f} us", "1.00x"))
    for mode, what in (
        ("off", "new instance"),
        ("pool", "own engine back"),
        ("always", "switched"),
    ):
        cost = await cycle_cost(mode, cycles)
        rows.append(
            (f"give back + take ({what})", f"{cost * 1e6:.0f} us", f"{cost / raw:.2f}x raw")
        )
    source = LOOP.format(body=TIGHT_BODY)
    cpu = RawCpu(assemble(source))
    n = 100_000
    while raw_loop(cpu, n) < 0.05:
        n *= 4
    n = int(n * seconds / min(raw_loop(cpu, n) for _ in range(3)))
    raw_time = min(raw_loop(cpu, n) for _ in range(3))
    cpu.close()
    rows.append(("busy guest, raw Unicorn", f"{raw_time:.3f} s", f"{n:,} iterations"))
    for mode in ("off", "always"):
        best, slices = min([await busy_time(mode, source, n) for _ in range(3)])
        rows.append(
            (
                f"busy guest, engines {mode}",
                f"{best:.3f} s",
                f"{raw_time / best:.2f}x raw, {slices} slices",
            )
        )
    return rows


async def crowd_loop(mode: str, image_source: str, guests: int, n: int) -> Crowd:
    """CPU seconds (the process's) for ``guests`` busy guests each running the bench loop
    ``n`` times at once, and what engines it took (:class:`Crowd`)."""
    image = assemble(image_source)
    async with LguestDevice(engines=mode, hibernate_after=math.inf) as dev:
        gs = [await boot(dev, image) for _ in range(guests)]
        for g in gs:
            assert await g.read_word() == 1
            g.set_u32("iters", n)
        pool = dev.engines
        before = _setups(pool)
        c0 = time.process_time()
        words = await asyncio.gather(*(g.read_word() for g in gs))
        cpu = time.process_time() - c0
        assert words == [2] * guests
        after = _setups(pool)
        for g in gs:
            await close(g)
    return _crowd(cpu, before, after)


@dataclasses.dataclass
class Crowd:
    """What a crowd used: CPU seconds in all, the seconds of it that takes spent
    switching and making engines, the switches, the engines made (ahead or in a take),
    those made ahead, and the seconds the event loop spent making those."""

    cpu: float
    setup: float = 0.0
    switches: int = 0
    made: int = 0
    ahead: int = 0
    ahead_time: float = 0.0

    def row(self, raw_time: float) -> str:
        return (
            f"{raw_time / self.cpu:.3f}x raw CPU, {self.switches} switches and {self.made}"
            f" new engines ({self.ahead} made ahead): {self.setup / self.cpu:.2%} in takes,"
            f" {self.ahead_time / self.cpu:.2%} making ahead"
        )


Setups = tuple[float, int, int, int, float]


def _crowd(cpu: float, before: Setups, after: Setups) -> Crowd:
    return Crowd(
        cpu,
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2],
        after[3] - before[3],
        after[4] - before[4],
    )


def _setups(pool: engines.EnginePool | None) -> Setups:
    """Seconds spent switching and making engines in takes, switches, engines made,
    engines made ahead and the seconds that took (0 if no pool)."""
    if pool is None:
        return 0.0, 0, 0, 0, 0.0
    return pool.switch_time, pool.switched, pool.made, pool.prepared, pool.prepare_time


@contextlib.contextmanager
def engine_mode(mode: str) -> Iterator[None]:
    """Devices made meanwhile (a Supervisor's) use engines ``mode``."""
    before = os.environ.get(engines.ENV)
    os.environ[engines.ENV] = mode
    try:
        yield
    finally:
        if before is None:
            del os.environ[engines.ENV]
        else:
            os.environ[engines.ENV] = before


async def crowd_sieve(mode: str, guests: int, n: int, rounds: int) -> Crowd:
    """CPU seconds for ``guests`` sieve guests computing at once (from the last one's
    start line to the last result), and what engines it took (:class:`Crowd`)."""
    with engine_mode(mode):
        sup = Supervisor()
    async with sup:
        launched = [
            await sup.launch(GuestConfig(image=SIEVE, memory=RAM, cmdline=f"n={n} rounds={rounds}"))
            for _ in range(guests)
        ]
        lines = [aiter(g.console) for g in launched]
        for line in lines:
            assert (await anext(line)).startswith("sieve ")
        pool = sup.device.engines
        before = _setups(pool)
        c0 = time.process_time()
        results = await asyncio.gather(*(anext(line) for line in lines))
        cpu = time.process_time() - c0
        assert len(set(results)) == 1 and results[0].startswith("primes up to"), results[:2]
        after = _setups(pool)
        for g in launched:
            assert (await g.wait()).ok
    return _crowd(cpu, before, after)


async def measure_crowd(guests: int, seconds: float) -> list[tuple[str, str, str]]:
    """The crowd rows: ``guests`` busy guests, about ``seconds`` of raw work in all."""
    rows = []
    source = LOOP.format(body=TIGHT_BODY)
    cpu = RawCpu(assemble(source))
    n = 100_000
    while raw_loop_cpu(cpu, n) < 0.05:
        n *= 4
    n = max(1, int(n * seconds / guests / raw_loop_cpu(cpu, n)))
    raw_each = min(raw_loop_cpu(cpu, n) for _ in range(3))
    cpu.close()
    raw_time = raw_each * guests
    rows.append((f"{guests} busy tight loops, raw Unicorn", f"{raw_time:.3f} s", f"{n:,} each"))
    for mode in ("off", "pool"):
        crowd = await crowd_loop(mode, source, guests, n)
        rows.append(
            (
                f"{guests} busy tight loops, engines {mode}",
                f"{crowd.cpu:.3f} s",
                crowd.row(raw_time),
            )
        )
    sieve = RawSieve()
    sieve.run(1_000_000, 1)  # translated once
    t0 = time.thread_time()
    sieve.run(1_000_000, 1)
    one = time.thread_time() - t0
    rounds = max(1, round(seconds / guests / one))
    t0 = time.thread_time()
    sieve.run(1_000_000, rounds)
    raw_time = (time.thread_time() - t0) * guests
    sieve.close()
    rows.append(
        (f"{guests} C guests (sieve), raw Unicorn", f"{raw_time:.3f} s", f"{rounds} rounds each")
    )
    for mode in ("off", "pool"):
        crowd = await crowd_sieve(mode, guests, 1_000_000, rounds)
        rows.append(
            (
                f"{guests} C guests (sieve), engines {mode}",
                f"{crowd.cpu:.3f} s",
                crowd.row(raw_time),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_engines")
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=0.5, help="the busy loop's raw time")
    parser.add_argument("--guests", type=int, default=100, help="the crowd (0: none)")
    parser.add_argument(
        "--crowd-seconds", type=float, default=5.0, help="the crowd's raw work in all"
    )
    parser.add_argument("--crowd-only", action="store_true", help="only the crowd rows")
    args = parser.parse_args(argv)
    title = f"engine switches ({args.cycles} cycles; busy loop about {args.seconds} s raw)"
    rows = [] if args.crowd_only else asyncio.run(measure(args.cycles, args.seconds))
    if args.guests:
        rows += asyncio.run(measure_crowd(args.guests, args.crowd_seconds))
    print_table(title, rows)


if __name__ == "__main__":
    main()
