"""Hibernation: how many idle guests fit, what waking one costs, and that it is exact.

* ``hibernated``: N guests of 128 KiB RAM, each asleep in ``LHCALL_HALT`` and at rest
  (``LguestFile.rest_when_idle``: registers and memory packed, no engine, no read in
  flight; engines ``pool``), in a fresh process: RSS per guest (its touched memory
  included) against a bare Unicorn instance run to the same ``hlt``; CPU while all
  sleep; then random wakes (``LHREQ_IRQ`` until the guest's handler's NOTIFY is read
  by the read its restart started, as a Launcher's task reads on), one at a time: each
  starts once the guest woken before it rests again (packed after ``WAKE_PACK_AFTER``,
  not the default ``hibernation.PACK_AFTER``, so 1,000 wakes take seconds), so a figure
  is one wake, not one wake plus the previous guest going back to sleep.  With the
  wall time, the loop thread's CPU time a wake takes (the whole wake runs there: a
  woken CPU's first slice is inline), which the machine's load does not stretch.
* ``hibernate_cycles``: one guest that counts and notifies, hibernated after
  every notify and woken by every read, 10,000 times in a row; its counter and
  checksum must equal an uninterrupted run's.  The raw figure is a bare
  ``context_save`` + new ``Uc`` + ``context_restore`` + run to the next stop.
* ``wakers_beside_sieve`` (``python -m benchmarks.bench_hibernate``; not in the
  quick run): the C sieve (n=2,000,000) alone, then beside 20 guests that wake and
  sleep as fast as they can (``ticker`` with a 1 ns clock event, ``hibernate_after``
  0); the figure is the sieve's time beside them over its time alone, goal <= 1.5 (a
  guest's wakes are its own cost).  The same with the wakers never hibernating, and
  where the process's threads spent the run (CPU and run-queue wait, from
  ``/proc/self/task/*/schedstat``), are recorded with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import random
import resource
import time
from pathlib import Path
from typing import Any

from supervisor import GuestConfig, LguestDevice, Supervisor, abi, hibernation

from .bench_state import _raw_cycles
from .guests import SMALL_RAM, Booted, assemble, boot
from .harness import Profile, Result, cpu_seconds, median, now, percentile, poll, rss_bytes

MiB = 1 << 20
NEVER_HIBERNATE = math.inf

# Notifies 1 when ready, then sleeps; irq 1 (vector 33) makes it notify 0x33.
SLEEPER = r"""
main:
    LGUEST_INIT
    IDT 33, handler
    HCALL 17, 1
1:  HCALL 10
    jmp 1b
handler:
    movl $512, lguest_data
    HCALL 17, 0x33
    iret
"""

# Counts and mixes a checksum, notifying after each step.
STEPPER = r"""
main:
    LGUEST_INIT
1:  incl counter
    mov sum, %eax
    imul $31, %eax, %eax
    add counter, %eax
    mov %eax, sum
    HCALL 17, 0x77
    jmp 1b
.data
counter: .long 0
sum: .long 7
"""


class _Sleeper:
    """A resting SLEEPER and its read in flight, if any; its restart reads on, as a
    Launcher's task does once the CPU's wake calls it back."""

    __slots__ = ("g", "read_at", "reader")
    closing = False  # the device closes: its close wakes every CPU, and reads fail

    def __init__(self, g: Booted) -> None:
        self.g = g
        self.reader: asyncio.Future[bytes] | None = None
        self.read_at = 0.0  # when the last read returned, in the reader's task

    def restart(self) -> None:
        if _Sleeper.closing:
            return
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> bytes:
        word = await self.g.file.read(abi.WORD_SIZE)
        self.read_at = now()
        return word

    @property
    def rests(self) -> bool:
        """Its read ended resting, its memory packed: no engine, no task, no read."""
        reader = self.reader
        return (
            reader is not None and reader.done() and reader.result() == b"" and self.g.memory.packed
        )


async def _sleeper(dev: LguestDevice, image: Any) -> _Sleeper:
    g = await boot(dev, image, SMALL_RAM)
    assert await g.read_word() == 1
    sleeper = _Sleeper(g)
    g.file.rest_when_idle(sleeper.restart)
    sleeper.restart()
    return sleeper


WAKE_PACK_AFTER = 0.005  # seconds asleep before a woken guest's registers pack (it rests)


async def sup_hibernated(n: int, wakes: int) -> dict[str, Any]:
    """Child process: ``n`` resting sleepers; RSS, CPU, and ``wakes`` random wakes."""
    image = assemble(SLEEPER)
    gc.collect()
    async with LguestDevice(engines="pool") as dev:
        base = rss_bytes()
        t0 = now()
        sleepers: list[_Sleeper] = []
        batch = 500
        while len(sleepers) < n:
            sleepers += await asyncio.gather(
                *(_sleeper(dev, image) for _ in range(min(batch, n - len(sleepers))))
            )
        await poll(lambda: all(s.rests for s in sleepers), 0.05)
        setup = now() - t0
        gc.collect()
        await asyncio.sleep(0.5)
        per_guest = (rss_bytes() - base) / n
        c0, w0 = cpu_seconds(), now()
        await asyncio.sleep(2.0)
        cpu = (cpu_seconds() - c0) / (now() - w0)
        hibernation.PACK_AFTER = WAKE_PACK_AFTER
        rng = random.Random(1)
        latencies = []
        returned: list[float] = []  # to the read's return, in the reader's own task
        loop_cpu: list[float] = []
        causes: list[tuple[int, int, int]] = []  # per wake: preemptions, collections, trims
        collecting = _GcCount()
        gc.callbacks.append(collecting)
        trims, collections = dev.dormitory.trims, _collections()
        for _ in range(wakes):
            sleeper = sleepers[rng.randrange(n)]
            g = sleeper.g
            preempted, collected, trimmed = _preemptions(), collecting.count, dev.dormitory.trims
            t, c = now(), time.thread_time()
            await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
            assert sleeper.reader is not None and not sleeper.reader.done()  # restarted
            word = await sleeper.reader
            latencies.append(now() - t)
            returned.append(sleeper.read_at - t)
            loop_cpu.append(time.thread_time() - c)  # (the wake runs on the loop's thread)
            causes.append(
                (
                    _preemptions() - preempted,
                    collecting.count - collected,
                    dev.dormitory.trims - trimmed,
                )
            )
            assert abi.unpack_words(word) == (0x33,)
            sleeper.restart()
            async with asyncio.timeout(10):  # (a bound for failing, not a wait for success)
                await poll(lambda: sleeper.rests, 0)  # noqa: B023 - awaited here
        gc.callbacks.remove(collecting)
        trims = dev.dormitory.trims - trims
        collections = [b - a for a, b in zip(collections, _collections(), strict=True)]
        t_close = now()
        _Sleeper.closing = True
        await dev.aclose()
        close = now() - t_close
        await asyncio.gather(*(s.reader for s in sleepers if s.reader), return_exceptions=True)
    return {
        "guests": n,
        "per_guest": per_guest,
        "cpu": cpu,
        "setup_s": setup,
        "close_s": close,
        "wake_p50": median(latencies),
        "wake_p99": percentile(latencies, 99),
        "wake_max": max(latencies, default=math.nan),
        "read_p50": median(returned),
        "read_p99": percentile(returned, 99),
        "wake_cpu_p50": median(loop_cpu),
        "wake_cpu_p99": percentile(loop_cpu, 99),
        "wakes": len(latencies),
        **_tail(latencies, causes),
        "trims_during_wakes": trims,
        "gc_during_wakes": collections,
    }


class _GcCount:
    """A ``gc.callbacks`` entry: how many collections (any generation) have started."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.count += 1


def _preemptions() -> int:
    """The loop thread's involuntary context switches so far: the kernel gave its core to
    another thread or process (``RUSAGE_THREAD``, Linux)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw


def _tail(latencies: list[float], causes: list[tuple[int, int, int]]) -> dict[str, Any]:
    """What the slowest 1 % of wakes had in them: how many lost the core meanwhile, saw a
    garbage collection, a ``malloc_trim``, or none of those; and the p99 of the wakes
    that never lost the core (what the supervisor's own work makes of the tail)."""
    order = sorted(range(len(latencies)), key=latencies.__getitem__, reverse=True)
    slowest = order[: max(1, len(order) // 100)]
    kept = [latencies[i] for i in range(len(latencies)) if not causes[i][0]]
    return {
        "tail_wakes": len(slowest),
        "tail_preempted": sum(1 for i in slowest if causes[i][0]),
        "tail_collected": sum(1 for i in slowest if causes[i][1]),
        "tail_trimmed": sum(1 for i in slowest if causes[i][2]),
        "tail_none": sum(1 for i in slowest if not any(causes[i])),
        "preempted_wakes": len(latencies) - len(kept),
        "unpreempted_p99": percentile(kept, 99) if kept else math.nan,
    }


def _collections() -> list[int]:
    """How many garbage collections of each generation ran so far."""
    return [generation["collections"] for generation in gc.get_stats()]


async def _stepper(dev: LguestDevice, steps: int) -> tuple[bytes, list[int], float]:
    """Run STEPPER for ``steps`` notifies: its whole memory at the end (the Host's clock
    fields blanked), every notify it made, and the time a step took."""
    g = await boot(dev, STEPPER)
    output = [await g.read_word()]
    t0 = now()
    for _ in range(steps):
        output.append(await g.read_word())
    elapsed = now() - t0
    memory = bytearray(g.memory.read(0, g.memory.size))
    for field, size in ((abi.LGUEST_DATA_TIME, 8), (abi.LGUEST_DATA_TSC_KHZ, 4)):
        at = g.guest.symbols["lguest_data"] + field
        memory[at : at + size] = bytes(size)
    await g.file.close()
    g.memory.close()
    return bytes(memory), output, elapsed / steps


async def hibernate_cycles(p: Profile) -> list[Result]:
    n = p.hibernate_cycles
    async with LguestDevice(hibernate_after=math.inf) as awake:
        expected = await _stepper(awake, n)
    async with LguestDevice(hibernate_after=0) as sleepy:
        trims = sleepy.dormitory.trims
        got = await _stepper(sleepy, n)
        trims = sleepy.dormitory.trims - trims
        # (a file's stats are gone once closed: count the cycles from what the guest did)
    assert got[1] == expected[1] == [0x77] * (n + 1), "hibernation changed the output"
    assert got[0] == expected[0], "hibernation changed the guest's memory"
    raw = _raw_cycles(min(n, 2_000))
    return [
        Result(
            "hibernate_cycles",
            f"{n:,} hibernate/wake cycles of one guest (exact: same memory and output)",
            "us",
            got[2] * 1e6,
            raw * 1e6,
            got[2] / raw,
            None,
            "ratio",
            "lower",
            "each cycle: a notify, hibernation, a read that wakes it; raw: context_save + "
            f"new Uc + context_restore + run; awake it costs {expected[2] * 1e6:.1f} us; "
            f"{trims} malloc_trim",
            {"awake_us": expected[2] * 1e6, "trims": trims},
        )
    ]


async def hibernated(p: Profile) -> list[Result]:
    from .cases import SMALL_TCG, _child  # (cases imports this module)

    loop = (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )
    n = p.hibernated_guests
    raw = await _child("raw-halted", "300", str(SMALL_TCG))
    sup = await _child("sup-hibernated", str(n), str(p.wakes), loop)
    per, raw_per = sup["per_guest"] / 1024, raw["per_guest"] / 1024
    return [
        Result(
            "hibernated_rss",
            f"{n:,} resting guests of 128 KiB: memory each, touched pages included",
            "KiB",
            per,
            raw_per,
            per / raw_per,
            100.0,
            "value",
            "lower",
            f"RSS delta / N in a fresh process; set-up {sup['setup_s']:.0f} s, close "
            f"{sup['close_s']:.1f} s; raw: a bare instance run to the same hlt",
            sup,
        ),
        Result(
            "hibernated_cpu",
            f"{n:,} resting guests: CPU while all sleep",
            "% of a core",
            sup["cpu"] * 100,
            0.0,
            None,
            1.0,
            "value",
            "lower",
            "process CPU over a 2 s window",
        ),
        Result(
            "hibernated_wake_p99",
            f"wake a resting guest (IRQ -> its NOTIFY), p99 of {sup['wakes']:,} among {n:,}",
            "ms",
            sup["wake_p99"] * 1e3,
            None,
            None,
            0.3,
            "value",
            "lower",
            f"p50 {sup['wake_p50'] * 1e3:.2f} ms, max {sup['wake_max'] * 1e3:.2f} ms; to the "
            f"read's return in its own task p50 {sup['read_p50'] * 1e3:.2f} ms, p99 "
            f"{sup['read_p99'] * 1e3:.2f} ms; the "
            f"loop thread's CPU a wake p50 {sup['wake_cpu_p50'] * 1e3:.2f} ms, p99 "
            f"{sup['wake_cpu_p99'] * 1e3:.2f} ms; "
            f"during the wakes {sup['trims_during_wakes']} malloc_trim, garbage collections "
            f"by generation {sup['gc_during_wakes']}; of the {sup['tail_wakes']} slowest, "
            f"{sup['tail_preempted']} lost the loop's core meanwhile, {sup['tail_collected']} "
            f"saw a collection, {sup['tail_trimmed']} a malloc_trim, {sup['tail_none']} none "
            f"of those; p99 of the {sup['wakes'] - sup['preempted_wakes']:,} wakes that never "
            f"lost the core {sup['unpreempted_p99'] * 1e3:.2f} ms",
        ),
    ]


# -- wakers beside a computing neighbour --------------------------------------------------------
GUEST_DIR = Path(__file__).resolve().parent.parent / "guests"
WAKERS = 20
WAKERS_GOAL = 1.5  # the sieve beside the wakers / alone


def _threads() -> dict[str, tuple[float, float]]:
    """Each thread's CPU seconds and run-queue wait so far (Linux schedstat)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run_ns, wait_ns, _ = map(int, f.read().split())
            out[tid] = (run_ns / 1e9, wait_ns / 1e9)
    return out


async def _sieve_seconds(sup: Supervisor) -> float:
    guest = await sup.launch(
        GuestConfig(image=GUEST_DIR / "c" / "sieve.elf", memory="4M", cmdline="n=2000000")
    )
    lines = aiter(guest.console)
    first = await anext(lines)
    assert first.startswith("sieve "), first
    t0 = now()
    rest = [line async for line in lines]
    elapsed = now() - t0
    assert rest and "148933, checksum 1179908154" in rest[0], rest
    return elapsed


async def _beside_wakers(hibernate_after: float) -> dict[str, Any]:
    async with Supervisor() as sup:
        alone = min([await _sieve_seconds(sup) for _ in range(2)])
        config = GuestConfig(
            image=GUEST_DIR / "ticker.img",
            memory="1M",
            cmdline="ticks=4000000000 period_ms=0",
            hibernate_after=hibernate_after,
            console="null",
        )
        wakers = [await sup.launch(config) for _ in range(WAKERS)]
        await asyncio.sleep(1.0)
        wakes0 = sum(w.stats.notifies for w in wakers)
        threads0, t0 = _threads(), now()
        beside = await _sieve_seconds(sup)
        elapsed = now() - t0
        threads1 = _threads()
        wakes = sum(w.stats.notifies for w in wakers) - wakes0
        deferred = sup.device.dormitory.deferred
        for waker in wakers:
            await waker.kill()
    use = sorted(
        (
            (cpu - threads0.get(tid, (0.0, 0.0))[0]) / elapsed,
            (wait - threads0.get(tid, (0.0, 0.0))[1]) / elapsed,
        )
        for tid, (cpu, wait) in threads1.items()
    )[::-1]
    return {
        "alone_s": alone,
        "beside_s": beside,
        "ratio": beside / alone,
        "notifies_per_s_each": wakes / elapsed / WAKERS,
        "deferred": deferred,
        "threads_cpu_wait": [(round(c, 2), round(w, 2)) for c, w in use if c + w > 0.01],
    }


async def wakers_beside_sieve(p: Profile) -> list[Result]:
    hibernating = await _beside_wakers(0.0)
    awake = await _beside_wakers(NEVER_HIBERNATE)
    return [
        Result(
            "wakers_beside_sieve",
            f"C sieve beside {WAKERS} guests waking as fast as they can (hibernate_after=0)",
            "s",
            hibernating["beside_s"],
            hibernating["alone_s"],
            hibernating["ratio"],
            WAKERS_GOAL,
            "ratio",
            "lower",
            f"raw: the sieve alone; {hibernating['notifies_per_s_each']:.0f} notifies/s each; "
            f"never hibernating: x{awake['ratio']:.2f} "
            f"({awake['notifies_per_s_each']:.0f} notifies/s each); threads (CPU, run-queue "
            f"wait) {hibernating['threads_cpu_wait']}; wakes put off "
            f"{hibernating['deferred']}",
            {"hibernating": hibernating, "never_hibernating": awake},
        )
    ]


def main() -> None:
    from .harness import QUICK

    for result in asyncio.run(wakers_beside_sieve(QUICK)):
        met = {None: "-", True: "met", False: "NOT met"}[result.met]
        print(f"{result.title}: x{result.ratio:.2f} (goal <= {result.goal}) {met}")
        print(f"  {result.value:.2f} s beside, {result.raw:.2f} s alone; {result.note}")


if __name__ == "__main__":
    main()
