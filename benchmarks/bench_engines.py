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
  raw Unicorn's time for the same loop.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time

from unicorn import UC_ARCH_X86, UC_MODE_32, UC_PROT_ALL, Uc

from supervisor import LguestDevice
from supervisor.memory import GuestMemory

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_engines")
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=0.5, help="the busy loop's raw time")
    args = parser.parse_args(argv)
    title = f"engine switches ({args.cycles} cycles; busy loop about {args.seconds} s raw)"
    print_table(title, asyncio.run(measure(args.cycles, args.seconds)))


if __name__ == "__main__":
    main()
