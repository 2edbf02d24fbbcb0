"""The figures.  Each coroutine measures the supervised case and its raw Unicorn
baseline in the same process, close together in time, and returns Results."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import math
import random
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from supervisor import LguestDevice, _slicing, abi
from supervisor.abi import LHREQ_BREAK, LHREQ_IRQ, pack_words
from supervisor.cpu import DEFAULT_TCG_BUFFER
from supervisor.slicepool import Job

from . import (
    bench_files,
    bench_hibernate,
    bench_net,
    bench_smp,
    bench_state,
    bench_swarm,
    guests,
    isolation,
)
from . import threads as thread_use
from .bench_c import c_compute
from .bench_clock import clock_calls
from .bench_speedtest import speedtest1
from .guests import SMALL_RAM, Booted, assemble, boot
from .harness import (
    Breaker,
    Profile,
    Result,
    ScalingRound,
    cpu_seconds,
    interleave,
    jain,
    median,
    mem_available,
    now,
    paired_ratio,
    percentile,
    poll,
    read_through_breaks,
    rss_bytes,
    scaling,
)
from .raw import RawCpu

_ROOT = Path(__file__).resolve().parent.parent  # where benchmarks.child is importable

MiB = 1 << 20
# Below 2 MiB: QEMU asks for transparent huge pages on its code buffer, and one huge page
# is 2 MiB of RSS per instance as soon as anything is translated.
SMALL_TCG = 1 << 20

# A counted loop between `bench` and `bench_end`, bracketed by notifies so the
# Launcher times exactly the loop.  `{body}` is the work of one iteration.
LOOP = r"""
main:
    LGUEST_INIT
2:  HCALL 17, 1
bench:
    mov iters, %ecx
1:  {body}
    dec %ecx
    jnz 1b
bench_end:
    HCALL 17, 2
    jmp 2b
.data
iters: .long 0
counter: .long 0
acc: .long 0
acc2: .long 0
"""
# The same loop in a guest that takes irq 3: its handler turns interrupts back on and
# returns (raw Unicorn runs the same image from `bench`, where nothing interrupts it).
IRQ_LOOP = LOOP.replace(
    "    LGUEST_INIT\n",
    "    LGUEST_INIT\n    IDT 35, on_irq\n    movl $512, lguest_data\n",
).replace(
    ".data\n",
    "on_irq:\n    movl $512, lguest_data\n    iret\n.data\n",
)
TIGHT_BODY = "inc %ebx"
MEMORY_BODY = "incl counter; addl %ecx, acc; movl acc, %eax; movl %eax, acc2"

# 32 bytes copied per iteration, word by word, between two 16 KiB buffers (.bss).
MEMCPY_BYTES = 32
MEMCPY_BODY = (
    "and $0x3fe0, %ebx; "
    + "".join(f"movl src+{i}(%ebx), %eax; movl %eax, dst+{i}(%ebx); " for i in range(0, 32, 4))
    + "add $32, %ebx"
)
MEMCPY_BUFFERS = ".bss\n.align 4096\nsrc: .space 16384\ndst: .space 16384\n"

HYPERCALL_LOOP = r"""
main:
    LGUEST_INIT
2:  HCALL 17, 1
bench:
    mov iters, %esi
1:  HCALL 6, 40, 0, 0
    dec %esi
    jnz 1b
bench_end:
    HCALL 17, 2
    jmp 2b
.data
iters: .long 0
"""

NOTIFY_LOOP = r"""
main:
    LGUEST_INIT
rt: HCALL 17, 1
    jmp rt
"""

# Spins on a memory counter with interrupts on; irq 3 runs a handler that notifies.
BUSY = r"""
main:
    LGUEST_INIT
    IDT 35, handler
    movl $512, lguest_data
    HCALL 17, 1
spin:
1:  incl counter
    jmp 1b
handler:
    movl $512, lguest_data  # interrupts back on first, so the next irq never waits for us
    HCALL 17, 0x35
    iret
.data
counter: .long 0
"""

# BUSY with a handler that computes about a millisecond before it notifies: more than an
# inline slice, so the rest of it runs on a worker (an urgent run: the pool's front).
LONG_HANDLER = BUSY.replace(
    "    HCALL 17, 0x35", "    movl $100000, %ecx\n2:  decl %ecx\n    jnz 2b\n    HCALL 17, 0x35"
)

PARK = r"""
main:
    LGUEST_INIT
    HCALL 17, 1
ready:
    HCALL 10
parked:
    jmp parked
"""

Figure = Callable[[Profile], Awaitable[list[Result]]]
# BREAK and IRQ p99 with 100 busy guests: at most QUIET_LATENCY_GOAL ms without load
# processes; with them, at most LOADED_LATENCY_GOAL x raw emu_stop's p99 of the same run.
QUIET_LATENCY_GOAL = 1.0
LOADED_LATENCY_GOAL = 1.5
# A loop broken out or interrupted every 1 ms keeps this much of raw's speed: a break or
# an irq costs the guest at most about 70 us.
BREAK_GOAL = 0.93


def _raw_loop_time(cpu: RawCpu, n: int) -> float:
    cpu.set_u32("iters", n)
    t0 = now()
    cpu.run("bench", "bench_end")
    return now() - t0


def _calibrate(cpu: RawCpu, seconds: float) -> int:
    """Iterations that take raw Unicorn about ``seconds`` (best rate of three 0.1 s probes)."""
    n = 100_000
    while _raw_loop_time(cpu, n) < 0.1 and n < 1 << 30:
        n *= 4
    best = min(_raw_loop_time(cpu, n) for _ in range(3))
    return max(1000, min(0xFFFFFFFF, int(n * seconds / best)))


class _Irqs:
    """A task that raises irq 3 every ``period`` seconds (``LHREQ_IRQ``), as a Launcher
    does for a device's interrupts."""

    def __init__(self, g: Booted, period: float) -> None:
        self.g = g
        self.period = period
        self.breaks = 0  # (irqs sent; named as Breaker's count)
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.period)
            if self._stop.is_set():
                break
            await self.g.file.write(pack_words(LHREQ_IRQ, 3))
            self.breaks += 1

    async def stop(self) -> None:
        self._stop.set()
        await self._task


async def _sup_loop_time(
    g: Booted, n: int, break_period: float | None, irq: bool = False
) -> tuple[float, dict[str, int]]:
    """Time one pass of the guest's bench loop through the device (the guest is at `2:`)."""
    word = await g.read_word()
    assert word == 1, word
    g.set_u32("iters", n)
    breaker: Breaker | _Irqs | None = None
    if break_period:
        breaker = _Irqs(g, break_period) if irq else Breaker(g, break_period)
    stats = g.file.stats
    slices0 = stats.slices if stats else 0
    running0 = (stats.breaks_running + stats.irqs_in_slice) if stats else 0
    t0 = now()
    word, eagains = await read_through_breaks(g)
    t = now() - t0
    assert word == 2, word
    breaks = 0
    if breaker is not None:
        await breaker.stop()
        breaks = breaker.breaks
    slices = (stats.slices if stats else 0) - slices0
    running = ((stats.breaks_running + stats.irqs_in_slice) if stats else 0) - running0
    return t, {"eagains": eagains, "breaks": breaks, "slices": slices, "in_run": running}


async def _loop_figure(
    p: Profile,
    name: str,
    title: str,
    body: str,
    goal: float,
    break_period: float | None,
    data: str = "",
    irq: bool = False,
) -> Result:
    image = assemble((IRQ_LOOP if irq else LOOP).format(body=body) + data)
    raw = RawCpu(image)
    n = _calibrate(raw, p.loop_seconds)
    info: dict[str, int] = {}
    raw_cpu: list[float] = []  # raw's thread's CPU time, per run
    raw_waited: list[float] = []  # its wait for a core, per run
    worker_cpu: list[float] = []  # the workers' CPU time, per supervised run
    waited: list[float] = []  # the workers' wait for a core, per supervised run
    loop_cpu: list[float] = []  # the event loop's thread's CPU time, per supervised run
    events = 0  # breaks or irqs, in all
    async with LguestDevice() as dev:
        g = await boot(dev, image)
        # Warm both up once (translation) before timing.
        _raw_loop_time(raw, 1000)
        await _sup_loop_time(g, 1000, None)

        def raw_run() -> float:
            start, wait = time.thread_time(), thread_use.own_wait()
            t = _raw_loop_time(raw, n)
            raw_cpu.append(time.thread_time() - start)
            raw_waited.append(thread_use.own_wait() - wait)
            return t

        async def supervised() -> float:
            nonlocal info, events
            before, start = thread_use.snapshot(), time.thread_time()
            t, info = await _sup_loop_time(g, n, break_period, irq)
            loop_cpu.append(time.thread_time() - start)
            workers = thread_use.spent(before, thread_use.snapshot())["workers"]
            worker_cpu.append(workers.cpu)
            waited.append(workers.waited)
            events += info["breaks"]
            return t

        raw_times, sup_times = await interleave(p.pairs, raw_run, supervised)
    raw.close()
    raw_rate = n / median(raw_times) / 1e6
    sup_rate = n / median(sup_times) / 1e6
    rounds = [r / s for r, s in zip(raw_times, sup_times, strict=True)]
    note = (
        f"{n:,} iterations, median of {p.pairs} interleaved rounds (rounds "
        f"{min(rounds):.2f}-{max(rounds):.2f}x); the guest's worker used "
        f"{paired_ratio(worker_cpu, raw_cpu):.2f}x the CPU time of raw's thread and waited "
        f"for a core {sum(waited) / sum(sup_times):.0%} of the time (raw's thread "
        f"{sum(raw_waited) / sum(raw_times):.0%})"
    )
    if break_period and irq:
        note += f"; {info['breaks']} irqs, {info['in_run']} delivered in a running slice"
    elif break_period:
        note += f"; a Waker broke the guest {info['breaks']} times ({info['eagains']} EAGAIN"
        note += f", {info['in_run']} with the run going on)"
    if events:
        note += f"; the event loop's thread used {1e6 * sum(loop_cpu) / events:.0f} us of CPU"
        note += " an irq" if irq else " a break"
    return Result(
        name,
        title,
        "M loops/s",
        sup_rate,
        raw_rate,
        paired_ratio(raw_times, sup_times),  # (rates: the inverse of the times' ratio)
        goal,
        "ratio",
        "higher",
        note,
        {
            "iterations": n,
            **info,
            "raw_times": raw_times,
            "sup_times": sup_times,
            "raw_cpu": raw_cpu,
            "raw_waited": raw_waited,
            "worker_cpu": worker_cpu,
            "worker_waited": waited,
            "loop_cpu": loop_cpu,
            "events": events,
        },
    )


async def _loop_pair(p: Profile, name: str, title: str, body: str, goal: float) -> list[Result]:
    """The loop with a Waker breaking it every 1 ms, with an irq every 1 ms, and alone."""
    return [
        await _loop_figure(p, name, f"{title}, BREAK every 1 ms", body, BREAK_GOAL, 0.001),
        await _loop_figure(
            p, f"{name}_irq", f"{title}, IRQ every 1 ms", body, BREAK_GOAL, 0.001, irq=True
        ),
        await _loop_figure(p, f"{name}_nobreak", f"{title}, no Waker", body, goal, None),
    ]


async def tight_loop(p: Profile) -> list[Result]:
    return await _loop_pair(p, "tight_loop", "tight register loop", TIGHT_BODY, 0.9)


async def memory_loop(p: Profile) -> list[Result]:
    return await _loop_pair(p, "memory_loop", "memory-heavy loop", MEMORY_BODY, 0.97)


async def memcpy(p: Profile) -> list[Result]:
    """Guest stores: a word-by-word copy, in MB/s, supervised and in a bare Unicorn."""
    loops = await _loop_figure(
        p, "memcpy", "guest memcpy, 4-byte stores", MEMCPY_BODY, 0.9, None, MEMCPY_BUFFERS
    )
    scale = MEMCPY_BYTES  # M loops/s -> MB/s
    raw = loops.raw * scale if loops.raw is not None else None
    return [dataclasses.replace(loops, unit="MB/s", value=loops.value * scale, raw=raw)]


def _raw_threads(cpus: list[RawCpu], n: int, waits: list[float] | None = None) -> float:
    """The wall time of ``n`` loops on each of ``cpus``, each in a thread of its own; each
    thread's wait for a core (:func:`benchmarks.threads.own_wait`) added to ``waits``."""

    def one(cpu: RawCpu) -> None:
        before = thread_use.own_wait()
        _raw_loop_time(cpu, n)
        if waits is not None:
            waits.append(thread_use.own_wait() - before)

    threads = [threading.Thread(target=one, args=(c,)) for c in cpus]
    t0 = now()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return now() - t0


def _slices(gs: list[Booted]) -> int:
    """The guests' slices so far (CpuStats.slices)."""
    return sum(g.file.stats.slices if g.file.stats else 0 for g in gs)


def _wakes() -> int:
    stats = _slicing.slicer_stats()
    return stats.wakes if stats is not None else 0


def _shares(
    use: dict[str, thread_use.Usage], wakes: int, seconds: float, slices: int = 0, guests: int = 1
) -> str:
    """Per second of a run: the other threads' and the loop's CPU, the slicer's wake-ups,
    the workers' blocks and waits for a core (a guest's share), and each guest's slices
    (each one's end a stop, a restart and the GIL)."""
    if seconds <= 0:
        return "-"
    return (
        f"other threads {use['other'].cpu / seconds:.1%} of a core (slicer "
        f"{wakes / seconds:.0f} wake-ups/s), loop {use['loop'].cpu / seconds:.1%}, "
        f"workers blocked {use['workers'].blocked / seconds:.0f}/s, waited for a core "
        f"{use['workers'].waited / guests / seconds:.1%} of the time, "
        f"{slices / guests / seconds:.0f} slices/s a guest"
    )


async def _sup_together(gs: list[Booted], n: int) -> tuple[float, float]:
    """Every guest's loop at once: the time until the last one ended, and the first."""
    ends: list[float] = []
    t0 = now()

    async def one(g: Booted) -> None:
        await _sup_loop_time(g, n, None)
        ends.append(now() - t0)

    await asyncio.gather(*(one(g) for g in gs))
    return max(ends), min(ends)


def _spread(low_high: tuple[float, float]) -> str:
    return f"{low_high[0]:.2f}-{low_high[1]:.2f}"


async def two_spinners(p: Profile) -> list[Result]:
    """Two spinning guests against one, and raw two threads against one, in one run.

    Each round runs each side one loop alone, two at once, and one alone again (the
    other guest, the other raw instance), back to back, the sides in alternating order;
    a round's scaling is 2 x the mean one-alone time / the two-at-once time
    (:class:`harness.ScalingRound`), and the figure the median of the rounds sound on
    both sides (:func:`harness.scaling`: a round whose one-alone runs disagree, or
    whose scaling is impossible, says the machine changed under it).  The note gives
    the spread, the one-alone baseline against raw's (a slow baseline overstates the
    scaling), and where the supervised side's throughput goes while the guests spin:
    the CPU of the process's other threads (the native slicer) and of the event loop,
    which two busy workers on two cores must share, how often the workers blocked (the
    GIL between slices, the pool's lock), the share of their time they slept, and how
    early the first guest ended (:mod:`benchmarks.threads`).
    """
    image = assemble(LOOP.format(body=TIGHT_BODY))
    raws = [RawCpu(image), RawCpu(image)]
    n = _calibrate(raws[0], p.loop_seconds)
    _raw_loop_time(raws[1], 1000)
    raw_rounds: list[ScalingRound] = []
    sup_rounds: list[ScalingRound] = []
    use1 = {role: thread_use.Usage() for role in thread_use.ROLES}
    use2 = dict(use1)
    wakes1 = wakes2 = slices1 = slices2 = 0
    firsts: list[float] = []  # when the first of two guests ended, over the round's time
    raw_waits1: list[float] = []  # each raw thread's wait for a core, per run
    raw_waits2: list[float] = []

    def raw_round() -> None:
        raw_rounds.append(
            ScalingRound(
                _raw_threads(raws[:1], n, raw_waits1),
                _raw_threads(raws, n, raw_waits2),
                _raw_threads(raws[1:], n, raw_waits1),
            )
        )

    async with LguestDevice() as dev:
        gs = [await boot(dev, image), await boot(dev, image)]
        await asyncio.gather(*(_sup_loop_time(g, 1000, None) for g in gs))

        async def alone(g: Booted) -> float:
            nonlocal wakes1, slices1
            before, woken, sliced = thread_use.snapshot(), _wakes(), _slices(gs)
            t = (await _sup_loop_time(g, n, None))[0]
            for role, spent in thread_use.spent(before, thread_use.snapshot()).items():
                use1[role] = use1[role] + spent
            wakes1 += _wakes() - woken
            slices1 += _slices(gs) - sliced
            return t

        for k in range(p.pairs):
            if k % 2 == 0:  # A/B then B/A rounds, as interleave()
                raw_round()
            one_before = await alone(gs[0])
            before, woken, sliced = thread_use.snapshot(), _wakes(), _slices(gs)
            two, first = await _sup_together(gs, n)
            for role, spent in thread_use.spent(before, thread_use.snapshot()).items():
                use2[role] = use2[role] + spent
            wakes2 += _wakes() - woken
            slices2 += _slices(gs) - sliced
            firsts.append(first / two)
            sup_rounds.append(ScalingRound(one_before, two, await alone(gs[1])))
            if k % 2:
                raw_round()
    for c in raws:
        c.close()
    got = scaling(sup_rounds, raw_rounds)
    sup1 = sum(r.one_before + r.one_after for r in sup_rounds)
    sup2 = sum(r.two for r in sup_rounds)
    raw1 = sum(r.one_before + r.one_after for r in raw_rounds)
    raw2 = sum(r.two for r in raw_rounds)
    chosen = "all" if got.chosen == got.rounds else f"the {got.chosen} sound"
    return [
        Result(
            "two_spinners",
            "2 spinning guests vs 1 (throughput)",
            "x one guest",
            got.sup,
            got.raw,
            got.ratio,
            1.8,
            "value",
            "higher",
            f"median of {chosen} of {got.rounds} rounds ({got.sound} sound on both sides: "
            "each side one guest alone, two at once, the other alone, back to back); "
            f"scalings {_spread(got.sup_spread)} (raw {_spread(got.raw_spread)}); one "
            f"guest alone took {got.baseline:.2f}x the time of raw's one thread "
            f"({_spread(got.baseline_spread)}). "
            "Raw: two bare Unicorn instances in two threads vs one. While 2 spin: "
            f"{_shares(use2, wakes2, sup2, slices2, len(gs))}, workers asleep "
            f"{use2['workers'].asleep(sup2, len(gs)):.1%} of the time, the first guest "
            f"done at {median(firsts):.0%} of it (raw's threads waited for a core "
            f"{sum(raw_waits2) / len(raws) / max(raw2, 1e-9):.1%}); "
            f"while 1 spins: {_shares(use1, wakes1, sup1, slices1)} (raw's thread "
            f"{sum(raw_waits1) / max(raw1, 1e-9):.1%})",
            {
                "iterations": n,
                "raw_rounds": [dataclasses.asdict(r) for r in raw_rounds],
                "sup_rounds": [dataclasses.asdict(r) for r in sup_rounds],
                "scaling": dataclasses.asdict(got),
                "first_done": firsts,
                "threads_one": {k: dataclasses.asdict(v) for k, v in use1.items()},
                "threads_two": {k: dataclasses.asdict(v) for k, v in use2.items()},
                "slicer_wakes_one": wakes1,
                "slicer_wakes_two": wakes2,
                "raw_waits_one": raw_waits1,
                "raw_waits_two": raw_waits2,
                "slices_one": slices1,
                "slices_two": slices2,
            },
        )
    ]


async def notify_roundtrip(p: Profile) -> list[Result]:
    image = assemble(NOTIFY_LOOP)
    m = p.roundtrips
    raw = RawCpu(image)
    raw.stop_on_interrupt()
    raw.run("rt")
    for _ in range(100):
        raw.resume()
    t0 = now()
    for _ in range(m):
        raw.resume()
    raw_us = (now() - t0) / m * 1e6
    raw.close()
    async with LguestDevice() as dev:
        g = await boot(dev, image)
        for _ in range(100):
            await g.file.read(abi.WORD_SIZE)
        t0 = now()
        for _ in range(m):
            await g.file.read(abi.WORD_SIZE)
        sup_us = (now() - t0) / m * 1e6
    return [
        Result(
            "notify_roundtrip",
            "NOTIFY round trip (guest -> read returns -> read)",
            "us",
            sup_us,
            raw_us,
            sup_us / raw_us,
            2.5,
            "ratio",
            "lower",
            "raw: int $0x1f, a Python UC_HOOK_INTR hook calls emu_stop, emu_start again",
            {"roundtrips": m},
        )
    ]


async def hypercall_cost(p: Profile) -> list[Result]:
    image = assemble(HYPERCALL_LOOP)
    raw = RawCpu(image)
    raw.on_interrupt(lambda uc, vector, data: None)
    raw_times = []
    sup_times = []
    async with LguestDevice() as dev:
        g = await boot(dev, image)
        _raw_loop_time(raw, 1000)
        # Calibrate on the supervised side: it is the slow one.
        t, _ = await _sup_loop_time(g, 2000, None)
        n = max(2000, int(2000 * p.loop_seconds / 2 / t))
        for _ in range(p.reps):
            raw_times.append(_raw_loop_time(raw, n))
            sup_times.append((await _sup_loop_time(g, n, None))[0])
        hcalls = g.file.stats.hypercalls if g.file.stats else 0
    raw.close()
    raw_us = min(raw_times) / n * 1e6
    sup_us = min(sup_times) / n * 1e6
    return [
        Result(
            "hypercall",
            "hypercall cost (LOAD_IDT_ENTRY in a loop)",
            "us",
            sup_us,
            raw_us,
            sup_us / raw_us,
            3.0,
            "ratio",
            "lower",
            "raw: the same int $0x1f with a Python UC_HOOK_INTR hook that does nothing",
            {"iterations": n, "hypercalls": hcalls},
        )
    ]


def _raw_stop_latency(samples: int) -> list[float]:
    """Bare Unicorn: emu_stop from another thread, until emu_start returns."""
    cpu = RawCpu(assemble(BUSY))
    cpu.on_interrupt(lambda uc, vector, data: None)
    cpu.run("_start", "spin")
    out: list[float] = []
    returned = threading.Event()
    t_end = [0.0]

    def spin() -> None:
        cpu.resume()
        t_end[0] = now()
        returned.set()

    for _ in range(samples):
        returned.clear()
        th = threading.Thread(target=spin)
        th.start()
        time.sleep(0.002 + random.random() * 0.002)
        t0 = now()
        cpu.uc.emu_stop()
        if not returned.wait(2):
            cpu.uc.emu_stop()
            returned.wait()
        th.join()
        out.append(t_end[0] - t0)
    cpu.close()
    return out


@dataclasses.dataclass
class _Latencies:
    """One run of the latency workload: seconds per request, by kind and by where the
    CPU's run was when asked (see :func:`_latency_run`)."""

    breaks: list[float] = dataclasses.field(default_factory=list)
    irqs: list[float] = dataclasses.field(default_factory=list)
    on_worker: list[float] = dataclasses.field(default_factory=list)
    elsewhere: list[float] = dataclasses.field(default_factory=list)
    unfinished: int = 0
    pool: dict[str, int] = dataclasses.field(default_factory=dict)  # the executor's counts

    def split(self) -> tuple[str, dict[str, Any]]:
        on_worker, elsewhere = self.on_worker, self.elsewhere
        share = len(on_worker) / max(1, len(on_worker) + len(elsewhere))
        p50 = median(on_worker) * 1e3 if on_worker else None
        others = percentile(elsewhere, 99) * 1e3 if elsewhere else None
        where = {
            "on_worker_share": share,
            "on_worker_p50_ms": p50,
            "on_worker_p99_ms": percentile(on_worker, 99) * 1e3 if on_worker else None,
            "elsewhere_p99_ms": others,
        }
        text = f"BREAK and IRQ samples together: {share:.1%} found the CPU's run on a worker (" + (
            f"median {p50:.2f} ms)" if p50 is not None else "none)"
        )
        if others is not None:
            text += f", the others' p99 {others:.2f} ms"
        return text, where


async def _latency_run(p: Profile, image: guests.Image, **device: Any) -> _Latencies:
    """``p.latency_guests`` busy guests on ``LguestDevice(**device)``; every 5 ms a random
    idle one gets a BREAK or an IRQ (alternately), timed until its reader sees it."""
    n = p.latency_guests
    got = _Latencies()
    async with LguestDevice(**device) as dev:
        gs = [await boot(dev, image) for _ in range(n)]
        for g in gs:
            assert await g.read_word() == 1
        cpus = [g.file.cpu(0) for g in gs]
        pending_break: dict[int, tuple[float, bool]] = {}
        pending_irq: dict[int, tuple[float, bool]] = {}
        running = True

        # Every request, BREAK or IRQ, by where the CPU's run was when asked: on a worker
        # thread, in a slice or between two (the worker must get a core to see the kick
        # and publish the slice's end, like raw's emu_stop), or not (waiting in the
        # pool's queue, or between runs: the loop withdraws or handles it without any
        # worker).
        def done(latencies: list[float], asked: tuple[float, bool] | None) -> None:
            if asked is not None:
                took = now() - asked[0]
                latencies.append(took)
                (got.on_worker if asked[1] else got.elsewhere).append(took)

        async def reader(i: int, g: Booted) -> None:
            while running:
                try:
                    word = await g.read_word()
                except BlockingIOError:
                    done(got.breaks, pending_break.pop(i, None))
                    await g.file.write(pack_words(LHREQ_BREAK, 0))
                    continue
                except OSError:
                    return
                if word == 0x35:
                    done(got.irqs, pending_irq.pop(i, None))

        readers = [asyncio.create_task(reader(i, g)) for i, g in enumerate(gs)]
        wakers = [g.file.waker() for g in gs]
        waker_tasks: set[asyncio.Task[Any]] = set()
        await asyncio.sleep(0.3)  # every guest busy, budgets adapted
        slicer = _slicing.slicer_stats()
        end = now() + p.latency_seconds
        k = 0
        while now() < end:
            await asyncio.sleep(0.005)
            i = random.randrange(n)
            if i in pending_break or i in pending_irq:
                continue
            k += 1
            # (A racy read of the pool's flag, good enough to sort samples.  A BREAK's kick
            # lands a turn of the loop later: its run may have left the queue meanwhile.)
            run = cpus[i].run.queued_slice
            asked = (now(), isinstance(run, Job) and not run.queued and not run.done())
            if k % 2:
                pending_break[i] = asked
                t = asyncio.create_task(wakers[i].write(pack_words(LHREQ_BREAK, 1)))
                waker_tasks.add(t)
                t.add_done_callback(waker_tasks.discard)
            else:
                pending_irq[i] = asked
                await gs[i].file.write(pack_words(LHREQ_IRQ, 3))
        await asyncio.sleep(0.5)  # let outstanding samples finish
        running = False
        got.unfinished = len(pending_break) + len(pending_irq)
        ex = dev.executor
        got.pool = {"jumps": ex.jumps, "refused": ex.refused, "hurried": ex.hurried}
        after = _slicing.slicer_stats()
        if slicer is not None and after is not None:
            # The loop's kicks and irqs that waited for the slicer's lock, holding the GIL.
            got.pool["slicer_lock_waits"] = after.lock_waits - slicer.lock_waits
            got.pool["slicer_lock_wait_us"] = (after.lock_wait_ns - slicer.lock_wait_ns) // 1000
        await stop_all(dev, gs, readers)
        await asyncio.gather(*waker_tasks, return_exceptions=True)
    return got


def latency_goal(p: Profile) -> tuple[float, str]:
    """BREAK and IRQ p99's goal and what it is compared with: at most 1 ms on a quiet
    machine; under load (``--load N``, N > 0) at most 1.5 x raw emu_stop's p99 of the same
    run (requests that land on a descheduled worker wait the way raw's emu_stop waits)."""
    return (LOADED_LATENCY_GOAL, "ratio") if p.load else (QUIET_LATENCY_GOAL, "value")


async def latency(p: Profile) -> list[Result]:
    image = assemble(BUSY)
    n = p.latency_guests
    loop = asyncio.get_running_loop()
    # Raw's samples just before and just after the run the goals judge, so that its p99
    # covers the machine as that run found it (a load that changes meanwhile included).
    raw = await loop.run_in_executor(None, _raw_stop_latency, 100)
    got = await _latency_run(p, image)
    raw += await loop.run_in_executor(None, _raw_stop_latency, 100)
    # The same with the workers under SCHED_IDLE (LguestDevice(idle_workers=True)): for
    # a machine that runs nothing else; under load its guests all but stop (no goal).
    idle = await _latency_run(p, image, idle_workers=True)
    long = await _latency_run(p, assemble(LONG_HANDLER))
    raw_p99 = percentile(raw, 99) * 1e3
    goal, goal_on = latency_goal(p)
    b99 = percentile(got.breaks, 99) * 1e3
    i99 = percentile(got.irqs, 99) * 1e3
    split, where = got.split()
    common = (
        f"{n} busy guests; raw: emu_stop from another thread until emu_start returns "
        f"({len(raw)} samples, half just before and half just after the first run)"
    )
    results = [
        Result(
            "break_latency",
            f"BREAK latency p99, {n} busy guests",
            "ms",
            b99,
            raw_p99,
            b99 / raw_p99,
            goal,
            goal_on,
            "lower",
            f"{len(got.breaks)} samples, median {median(got.breaks) * 1e3:.3f} ms; {common}; "
            f"{split}",
            {
                "samples": len(got.breaks),
                "p50_ms": median(got.breaks) * 1e3,
                "max_ms": max(got.breaks, default=0) * 1e3,
                "unfinished": got.unfinished,
                **where,
            },
        ),
        Result(
            "irq_latency",
            f"IRQ -> handler latency p99, {n} busy guests",
            "ms",
            i99,
            raw_p99,
            i99 / raw_p99,
            goal,
            goal_on,
            "lower",
            f"{len(got.irqs)} samples, median {median(got.irqs) * 1e3:.3f} ms; the handler "
            f"notifies, so this includes one NOTIFY exit; {split}; the pool and the "
            f"slicer's lock: {got.pool}",
            {
                "samples": len(got.irqs),
                "p50_ms": median(got.irqs) * 1e3,
                "max_ms": max(got.irqs, default=0) * 1e3,
                **where,
            },
        ),
    ]
    l99 = percentile(long.irqs, 99) * 1e3
    results.append(
        Result(
            "long_handler_latency",
            f"IRQ -> 1 ms handler's NOTIFY p99, {n} busy guests",
            "ms",
            l99,
            raw_p99,
            l99 / raw_p99,
            None,
            "value",
            "lower",
            f"{len(long.irqs)} samples, median {median(long.irqs) * 1e3:.2f} ms; the handler "
            "outlasts its inline slice, so its rest is an urgent run (front of the pool's "
            f"queue, at most twice per round per CPU): {long.pool}",
            {
                "samples": len(long.irqs),
                "p50_ms": median(long.irqs) * 1e3,
                "unfinished": long.unfinished,
                **long.pool,
            },
        )
    )
    for kind, name, lat in (("BREAK", "break", idle.breaks), ("IRQ", "irq", idle.irqs)):
        value = percentile(lat, 99) * 1e3
        results.append(
            Result(
                f"{name}_latency_idle_workers",
                f"{kind} latency p99, idle_workers=True",
                "ms",
                value,
                raw_p99,
                value / raw_p99,
                None,
                "value",
                "lower",
                f"{len(lat)} samples; the workers under SCHED_IDLE, for a machine that runs "
                "nothing else (no goal: under load its guests get almost no CPU)",
                {"samples": len(lat), "unfinished": idle.unfinished},
            )
        )
    return results


async def _park(dev: LguestDevice, image: guests.Image) -> tuple[Booted, asyncio.Task[Any]]:
    g = await boot(dev, image, SMALL_RAM)
    assert await g.read_word() == 1
    task = asyncio.create_task(g.file.read(abi.WORD_SIZE))  # runs into HCALL 10 and sleeps
    return g, task


async def stop_all(dev: LguestDevice, gs: list[Booted], readers: list[asyncio.Task[Any]]) -> None:
    """Break every guest out first, then close the device.

    ``dev.aclose()`` closes files one by one and each close waits for that
    guest's queued slice, so with many busy guests it takes N x (queue length x
    slice) seconds.  A Launcher-side BREAK to everyone first ends every queued
    slice at its first block (see docs/performance.md).
    """
    wakers = [asyncio.create_task(g.file.waker().write(pack_words(LHREQ_BREAK, 1))) for g in gs]
    await asyncio.gather(*readers, return_exceptions=True)
    await dev.aclose()
    await asyncio.gather(*wakers, return_exceptions=True)


def _halted(g: Booted) -> bool:
    return bool(g.file.cpu_count and g.file.cpu(0).halted)


def _raw_halted(n: int, tcg_buffer: int) -> dict[str, Any]:
    """Child process: bare instances that ran the same code up to the halt."""
    image = assemble(PARK)
    gc.collect()
    base = rss_bytes()
    raws = []
    for _ in range(n):
        c = RawCpu(image, SMALL_RAM, tcg_buffer=tcg_buffer)
        c.on_interrupt(lambda uc, vector, data: None)
        c.run("_start", "parked")
        raws.append(c)
    gc.collect()
    return {"guests": n, "per_guest": (rss_bytes() - base) / n}


async def _sup_halted(want: int, tcg_buffer: int) -> dict[str, Any]:
    """Child process: ``want`` guests parked in LHCALL_HALT (fewer if memory is short)."""
    image = assemble(PARK)
    gc.collect()
    # Awake: hibernation has its own figures (bench_hibernate).
    async with LguestDevice(tcg_buffer=tcg_buffer, hibernate_after=math.inf) as dev:
        gs: list[Booted] = []
        tasks: list[asyncio.Task[Any]] = []
        base = rss_bytes()
        t_setup = now()
        target = want
        batch = 100
        while len(gs) < target:
            got = await asyncio.gather(
                *(_park(dev, image) for _ in range(min(batch, target - len(gs))))
            )
            gs.extend(g for g, _ in got)
            tasks.extend(t for _, t in got)
            await poll(lambda: all(_halted(g) for g in gs[-batch:]), 0.001)
            if len(gs) == batch:  # first batch: make sure the whole run fits in memory
                per = (rss_bytes() - base) / len(gs)
                fits = int(0.4 * mem_available() / max(per, 1)) + len(gs)
                if fits < target:
                    target = max(batch, fits // batch * batch)
        setup = now() - t_setup
        await poll(lambda: all(_halted(g) for g in gs), 0.01)
        gc.collect()
        await asyncio.sleep(0.2)
        per_guest = (rss_bytes() - base) / len(gs)
        slices0 = sum(g.file.stats.slices for g in gs if g.file.stats)
        c0, w0 = cpu_seconds(), now()
        await asyncio.sleep(1.0)
        cpu = (cpu_seconds() - c0) / (now() - w0)
        slices = sum(g.file.stats.slices for g in gs if g.file.stats) - slices0
        t_close = now()
        await dev.aclose()
        close_time = now() - t_close
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "guests": len(gs),
        "per_guest": per_guest,
        "cpu": cpu,
        "slices": slices,
        "setup_s": setup,
        "close_s": close_time,
    }


async def _child(*args: str) -> dict[str, Any]:
    """Run ``python -m benchmarks.child ARGS`` in a fresh interpreter (a clean heap for RSS)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.child",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(_ROOT),
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks.child {' '.join(args)} failed:\n{err.decode()}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def halted_guests(p: Profile) -> list[Result]:
    want = p.halted_guests
    loop = (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )
    n_raw = str(min(want, 300))
    raw = await _child("raw-halted", n_raw, str(DEFAULT_TCG_BUFFER))
    raw_small = await _child("raw-halted", n_raw, str(SMALL_TCG))
    sup = await _child("sup-halted", str(want), str(DEFAULT_TCG_BUFFER), loop)
    small = await _child("sup-halted", str(want), str(SMALL_TCG), loop)
    out = []
    for key, s, r, tcg in (
        ("", sup, raw, DEFAULT_TCG_BUFFER),
        ("_small_tcg", small, raw_small, SMALL_TCG),
    ):
        n = s["guests"]
        scaled = f" (scaled down from {want:,} to fit memory)" if n < want else ""
        per, raw_per = s["per_guest"] / MiB, r["per_guest"] / MiB
        out.append(
            Result(
                f"halted_rss{key}",
                f"{n:,} halted guests, tcg_buffer {tcg / MiB:g} MiB: memory each{scaled}",
                "MiB",
                per,
                raw_per,
                per / raw_per if raw_per > 0 else None,
                1.0,
                "value",
                "lower",
                f"{SMALL_RAM >> 10} KiB guests; RSS delta / N in a fresh process; set-up "
                f"{s['setup_s']:.1f} s, close {s['close_s']:.1f} s; raw: {r['guests']} bare "
                "instances (same tcg_buffer) run to the same hlt",
                {**s, "raw_guests": r["guests"]},
            )
        )
        out.append(
            Result(
                f"halted_cpu{key}",
                f"{n:,} halted guests, tcg_buffer {tcg / MiB:g} MiB: CPU while halted",
                "% of a core",
                s["cpu"] * 100,
                0.0,
                None,
                1.0,
                "value",
                "lower",
                f"process CPU over a 1 s window; {s['slices']} slices ran in it (goal: none)",
                {"guests": n, "slices_in_window": s["slices"]},
            )
        )
    return out


async def _lag_probe(stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        t0 = now()
        await asyncio.sleep(0.01)
        out.append(now() - t0 - 0.01)


async def _raw_spinners(
    image: guests.Image, n: int, seconds: float
) -> tuple[list[int], list[float]]:
    """No supervisor: N bare instances round-robin on a 2-thread pool, ~2 ms ``count=`` slices.

    ``emu_start(timeout=)`` is not usable here: besides replaying writes, it now and then
    never returns (its watchdog thread is gone and the guest spins on), which hung this
    baseline.  ``count=`` is exact and always returns, at a per-instruction cost.
    """
    cpus = []
    for _ in range(n):
        c = RawCpu(image, SMALL_RAM)
        c.on_interrupt(lambda uc, vector, data: None)
        c.run("_start", "spin")
        cpus.append(c)
    t0 = now()
    cpus[0].resume(count=100_000)
    count = max(1000, int(100_000 * 0.002 / max(now() - t0, 1e-6)))
    loop = asyncio.get_running_loop()
    running = True
    with ThreadPoolExecutor(2) as pool:

        async def drive(c: RawCpu) -> None:
            while running:
                await loop.run_in_executor(pool, lambda: c.resume(count=count))

        drivers = [asyncio.create_task(drive(c)) for c in cpus]
        await asyncio.sleep(0.3)
        c0 = [c.u32("counter") for c in cpus]
        lag: list[float] = []
        stop = asyncio.Event()
        probe = asyncio.create_task(_lag_probe(stop, lag))
        await asyncio.sleep(seconds)
        c1 = [c.u32("counter") for c in cpus]
        stop.set()
        running = False
        await probe
        await asyncio.gather(*drivers)
    for c in cpus:
        c.close()
    return [b - a for a, b in zip(c0, c1, strict=True)], lag


async def spinners(p: Profile) -> list[Result]:
    image = assemble(BUSY)
    n = p.spinners
    raw_prog, raw_lag = await _raw_spinners(image, n, p.spin_seconds)
    async with LguestDevice() as dev:
        gs = []
        for _ in range(n):
            g = await boot(dev, image, SMALL_RAM)
            assert await g.read_word() == 1
            gs.append(g)
        readers = [asyncio.create_task(g.file.read(abi.WORD_SIZE)) for g in gs]
        await asyncio.sleep(0.3)
        c0 = [g.u32("counter") for g in gs]
        lag: list[float] = []
        stop = asyncio.Event()
        probe = asyncio.create_task(_lag_probe(stop, lag))
        await asyncio.sleep(p.spin_seconds)
        c1 = [g.u32("counter") for g in gs]
        stop.set()
        await probe
        await stop_all(dev, gs, readers)
    for g in gs:
        with contextlib.suppress(BufferError):
            g.memory.close()
    prog = [b - a for a, b in zip(c0, c1, strict=True)]
    j, rj = jain(prog), jain(raw_prog)
    lag99, raw_lag99 = percentile(lag, 99) * 1e3, percentile(raw_lag, 99) * 1e3
    total, raw_total = sum(prog) / p.spin_seconds / 1e6, sum(raw_prog) / p.spin_seconds / 1e6
    return [
        Result(
            "spinners_fairness",
            f"{n:,} spinners: Jain fairness",
            "index",
            j,
            rj,
            j / rj if rj else None,
            0.95,
            "value",
            "higher",
            f"per-guest progress over {p.spin_seconds:g} s; total {total:.1f} M loops/s vs "
            f"raw {raw_total:.1f}; raw: bare instances round-robin on 2 threads, "
            f"emu_start(count=) of about 2 ms",
            {
                "min": min(prog),
                "max": max(prog),
                "starved": sum(1 for x in prog if x == 0),
                "total_mloops_s": total,
                "raw_total_mloops_s": raw_total,
            },
        ),
        Result(
            "spinners_lag",
            f"{n:,} spinners: event loop lag p99",
            "ms",
            lag99,
            raw_lag99,
            lag99 / raw_lag99 if raw_lag99 > 0 else None,
            50.0,
            "value",
            "lower",
            f"sleep(10 ms) overshoot, {len(lag)} samples, median {median(lag) * 1e3:.2f} ms",
            {"samples": len(lag), "p50_ms": median(lag) * 1e3, "max_ms": max(lag, default=0) * 1e3},
        ),
    ]


def _raw_startup(image: guests.Image) -> tuple[float, float]:
    """Wall and this thread's CPU seconds of a raw start-up."""
    mem = guests.load(image, SMALL_RAM)
    t0, c0 = now(), time.thread_time()
    c = RawCpu(image, SMALL_RAM, memory=mem)
    c.on_interrupt(lambda uc, vector, data: None)
    c.run("_start", "ready")
    t, cpu = now() - t0, time.thread_time() - c0
    c.close()
    return t, cpu


async def _sup_startup(dev: LguestDevice, image: guests.Image) -> tuple[float, float]:
    """Wall and the event loop thread's CPU seconds of a start-up (everything of it
    runs there: the first slice is an inline one)."""
    memory, layout = guests.load(image, SMALL_RAM)
    t0, c0 = now(), time.thread_time()
    f = dev.open(memory)
    await f.write(guests.initialize_words(memory, layout))
    word = await f.read(abi.WORD_SIZE)
    t, cpu = now() - t0, time.thread_time() - c0
    assert abi.unpack_words(word)[0] == 1
    await f.close()
    with contextlib.suppress(BufferError):
        memory.close()
    return t, cpu


async def startup(p: Profile) -> list[Result]:
    image = assemble(PARK)
    m = p.startups
    raw: list[tuple[float, float]] = []
    sup: list[tuple[float, float]] = []
    async with LguestDevice() as dev:
        await _sup_startup(dev, image)  # the executor's threads exist from here on
        _raw_startup(image)
        for _ in range(m):  # interleaved, so that noise hits both alike
            raw.append(_raw_startup(image))
            sup.append(await _sup_startup(dev, image))
    raw_times = [t for t, _ in raw]
    sup_times = [t for t, _ in sup]
    s, r = median(sup_times) * 1e3, median(raw_times) * 1e3
    return [
        Result(
            "startup",
            "guest start-up (open + INITIALIZE + first NOTIFY)",
            "ms",
            s,
            r,
            s / r,
            0.2,
            "value",
            "lower",
            f"median of {m}; raw: Uc() + map + registers + run to the same point; "
            f"CPU {median([c for _, c in sup]) * 1e3:.3f} ms "
            f"(raw {median([c for _, c in raw]) * 1e3:.3f} ms)",
            {
                "p90_ms": percentile(sup_times, 90) * 1e3,
                "raw_p90_ms": percentile(raw_times, 90) * 1e3,
                # The event loop thread's CPU time (median): what a loaded machine's
                # waits for a core leave out.
                "cpu_ms": median([c for _, c in sup]) * 1e3,
                "raw_cpu_ms": median([c for _, c in raw]) * 1e3,
            },
        )
    ]


FIGURES: dict[str, Figure] = {
    "tight_loop": tight_loop,
    "memory_loop": memory_loop,
    "memcpy": memcpy,
    "two_spinners": two_spinners,
    "notify_roundtrip": notify_roundtrip,
    "hypercall": hypercall_cost,
    "latency": latency,
    "halted": halted_guests,
    "spinners": spinners,
    "startup": startup,
    "revive": bench_state.revive,
    "hibernate_cycles": bench_hibernate.hibernate_cycles,
    "hibernated": bench_hibernate.hibernated,
    "idle_guests": bench_swarm.idle_guests,
    "c_compute": c_compute,
    "c_speedtest1": speedtest1,
    "clock_calls": clock_calls,
    "shutdown": isolation.shutdown,
    "flood": isolation.flood_neighbour,
    "hogs": isolation.hogs_neighbour,
    "smp_scaling": bench_smp.smp_scaling,
    "ipi_latency": bench_smp.ipi_latency,
    "atomics": bench_smp.atomics,
    "file_read": bench_files.file_read,
    "network": bench_net.network,
}
