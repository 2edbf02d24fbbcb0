"""Guests with several CPUs: what a second CPU buys, and how fast an IPI arrives.

``smp_scaling``: a guest whose CPUs each count ``n`` in a register loop of their
own (no shared data) takes T1 with one CPU and T2 with two; the figure is the
two-CPU guest's throughput over the one-CPU guest's (2 T1 / T2).  The raw
column is the same for bare Unicorn: the same loop in one instance, then in two
instances sharing one ``mem_map_ptr`` mapping, each in a thread of its own.  A
guest's CPUs take turns (docs/abi.md, "Several CPUs": Unicorn's ``lock``
instructions are not atomic across instances), so the supervised figure is
expected near 1.0 while raw Unicorn scales with the cores: the goal of 1.8 is
not met by design, and this row says by how much.

``atomics``: the reason for the turns.  Two bare Unicorn instances sharing one
``mem_map_ptr`` mapping, each in a thread of its own, run the same loop of
``lock xadd`` (count ``n`` each), of a ``lock cmpxchg`` increment (the same), and
of ``xchg`` swaps of a register with one word (three tokens, one in each CPU's
``eax`` and one in memory: atomic swaps only move them).  The figure is the
``lock xadd`` updates lost; the note gives all three.  Zero means the threads
never overlapped (a loaded machine), not that the instructions are atomic:
tests/test_unicorn_atomics.py shows the window deterministically.

``ipi_latency``: CPU 1 of a two-CPU guest halts, its read in flight (each sample
waits for that); CPU 0 computes.  The Host interrupts CPU 0, whose handler sends
CPU 1 an IPI (``SEND_IPI``); CPU 1's handler notifies.  The figure is the p99 from
the Host's ``LHREQ_IRQ`` to that notify reaching CPU 1's reader, with
``latency_guests`` busy one-CPU guests beside it, so it bounds the IPI's own latency
from above (it includes one irq delivery and one NOTIFY exit).
"""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

from unicorn import x86_const as r

from supervisor import LguestDevice
from supervisor.abi import LHREQ_IRQ, pack_words
from supervisor.testing import CPU1_AREAS, IPI_PINGER, run_cpus_to_end, until

from .guests import Booted, assemble, boot
from .harness import Profile, Result, median, now, percentile
from .raw import RawCpu

# CPU 0 starts CPU 1 (if there is one); each CPU counts LOOPS in a register, then
# CPU 0 waits for the others and powers off.
COUNTERS = (
    r"""
.set LOOPS, {loops}
.set NCPUS, {ncpus}
main:
    LGUEST_INIT
    .if NCPUS > 1
    HCALL_REG 64, $1, $secondary, $stack1_top
    .endif
    jmp count
secondary:
    CPU_INIT cpu1_data
    mov $1, %ebp                 # CPU 1 (CPU 0's ebp is 0)
count:
    mov $LOOPS, %ecx
1:  add $3, %edx
    xor %ecx, %edx
    dec %ecx
    jnz 1b
counted:
    lock incl done
    test %ebp, %ebp
    jnz park                     # CPU 1 parks
2:  cmpl $NCPUS, done
    jne 2b
    HCALL 2, msg, 1, 0
park:
    HCALL 10
    jmp park
.data
done: .long 0
msg: .asciz "counted"
"""
    + CPU1_AREAS
)

# The three loops of ``atomics``, each from its label to its ``_end``, on two CPUs at once.
RACES = r"""
main:
    LGUEST_INIT
xadd:
    mov iters, %ecx
1:  mov $1, %eax
    lock xaddl %eax, xadd_count
    dec %ecx
    jnz 1b
xadd_end:
    nop
cmpxchg:
    mov iters, %ecx
1:  mov cmpxchg_count, %eax
2:  lea 1(%eax), %edx
    lock cmpxchgl %edx, cmpxchg_count
    jnz 2b
    dec %ecx
    jnz 1b
cmpxchg_end:
    nop
xchg:
    mov iters, %ecx
1:  xchgl %eax, token
    dec %ecx
    jnz 1b
xchg_end:
    nop
.data
iters: .long 0
xadd_count: .long 0
cmpxchg_count: .long 0
token: .long 4
"""
TOKENS = (1, 2, 4)  # CPU 0's eax, CPU 1's eax, the word in memory


def race(n: int) -> dict[str, int]:
    """Lost updates when two bare instances run each loop of ``RACES`` ``n`` times at once."""
    image = assemble(RACES)
    first = RawCpu(image)
    cpus = [first, RawCpu(image, memory=(first.memory, first.layout))]
    first.set_u32("iters", n)
    for cpu, token in zip(cpus, TOKENS, strict=False):
        cpu.uc.reg_write(r.UC_X86_REG_EAX, token)
    lost: dict[str, int] = {}
    for loop in ("xadd", "cmpxchg", "xchg"):
        barrier = threading.Barrier(len(cpus))

        def run(cpu: RawCpu, start: str = loop, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            cpu.run(start, f"{start}_end")

        threads = [threading.Thread(target=run, args=(c,)) for c in cpus]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if loop == "xchg":
            held = [c.uc.reg_read(r.UC_X86_REG_EAX) for c in cpus] + [first.u32("token")]
            lost[loop] = len(set(TOKENS) - set(held))  # tokens no longer anywhere
        else:
            lost[loop] = 2 * n - first.u32(f"{loop}_count")
    for cpu in reversed(cpus):
        cpu.uc = None
    first.close()
    return lost


async def atomics(p: Profile) -> list[Result]:
    loop = asyncio.get_running_loop()
    n = 1_000_000
    lost = await loop.run_in_executor(None, race, n)
    return [
        Result(
            "atomics",
            "lock xadd updates lost by 2 bare instances on shared memory",
            "updates",
            lost["xadd"],
            None,
            None,
            None,
            "value",
            "lower",
            f"{n:,} per thread; lost by lock cmpxchg: {lost['cmpxchg']:,}, xchg tokens lost: "
            f"{lost['xchg']} of 3. Not atomic across instances: a guest's CPUs take turns",
            {"iterations": n, **lost},
        )
    ]


async def _supervised_seconds(loops: int, ncpus: int) -> float:
    image = assemble(COUNTERS.format(loops=loops, ncpus=ncpus))
    async with LguestDevice() as dev:
        g = await boot(dev, image, cpus=ncpus)
        t0 = now()
        reason = await run_cpus_to_end(g)
        elapsed = now() - t0
        assert reason == "counted", reason
    return elapsed


def _raw_seconds(loops: int, ncpus: int) -> float:
    """The counting loop in ``ncpus`` bare instances sharing one mapping, one thread each."""
    image = assemble(COUNTERS.format(loops=loops, ncpus=ncpus))
    first = RawCpu(image)
    cpus = [first] + [RawCpu(image, memory=(first.memory, first.layout)) for _ in range(ncpus - 1)]
    barrier = threading.Barrier(ncpus + 1)

    def run(cpu: RawCpu) -> None:
        barrier.wait()
        cpu.run("count", "counted")

    threads = [threading.Thread(target=run, args=(c,)) for c in cpus]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = now()
    for t in threads:
        t.join()
    elapsed = now() - t0
    for cpu in reversed(cpus):
        cpu.uc = None
    first.close()
    return elapsed


async def smp_scaling(p: Profile) -> list[Result]:
    loop = asyncio.get_running_loop()
    calibrate = 2_000_000
    per_second = calibrate / await loop.run_in_executor(None, _raw_seconds, calibrate, 1)
    loops = max(1_000_000, int(per_second * p.loop_seconds * 2))
    best: dict[str, float] = {}
    for _ in range(p.reps):
        for key, fn in (
            ("raw1", lambda: loop.run_in_executor(None, _raw_seconds, loops, 1)),
            ("raw2", lambda: loop.run_in_executor(None, _raw_seconds, loops, 2)),
            ("sup1", lambda: _supervised_seconds(loops, 1)),
            ("sup2", lambda: _supervised_seconds(loops, 2)),
        ):
            seconds = await fn()
            best[key] = min(best.get(key, seconds), seconds)
    sup = 2 * best["sup1"] / best["sup2"]
    raw = 2 * best["raw1"] / best["raw2"]
    return [
        Result(
            "smp_scaling",
            "2-CPU guest, independent work: throughput over 1 CPU",
            "x",
            sup,
            raw,
            sup / raw,
            1.8,
            "value",
            "higher",
            f"{loops:,} iterations per CPU, best of {p.reps}; raw: 2 Unicorn instances sharing "
            "one mapping in 2 threads. A guest's CPUs take turns (atomics: docs/abi.md)",
            {k: v for k, v in best.items()},
        )
    ]


async def ipi_latency(p: Profile) -> list[Result]:
    from .cases import BUSY, stop_all  # the busy neighbours of the latency figure

    n = p.latency_guests
    samples: list[float] = []
    async with LguestDevice() as dev:
        busy = [await boot(dev, assemble(BUSY)) for _ in range(n)]
        for g in busy:
            assert await g.read_word() == 1
        pinger = await boot(dev, assemble(IPI_PINGER), cpus=2)
        f = pinger.file
        running = True

        async def spin(g: Booted) -> None:
            while running:
                try:
                    await g.read_word()
                except OSError:
                    return

        readers = [asyncio.create_task(spin(g)) for g in busy]
        cpu0 = asyncio.create_task(_read_forever(f, 0))
        notified: asyncio.Future[float] | None = None

        async def cpu1_reader() -> None:
            """CPU 1's Launcher: its read is in flight whenever the CPU halts."""
            while True:
                try:
                    word = await f.read(4, 1)
                except OSError:
                    return
                assert int.from_bytes(word[:4], "little") == 0x1B1
                if notified is not None and not notified.done():
                    notified.set_result(now())

        cpu1 = asyncio.create_task(cpu1_reader())

        def halted() -> bool:
            return f.asleep(1) and f.reading(1)  # CPU 1 halted, its read waiting

        await asyncio.sleep(0.3)  # every guest busy, budgets adapted
        await until(halted)  # (its start-up waited for CPU 0's turn in the crowded pool)
        end = now() + p.latency_seconds
        while now() < end:
            await asyncio.sleep(0.005 + random.random() * 0.005)
            await until(halted)
            notified = asyncio.get_running_loop().create_future()
            t0 = now()
            await f.write(pack_words(LHREQ_IRQ, 3))
            samples.append(await asyncio.wait_for(notified, 5) - t0)
        running = False
        for task in (cpu0, cpu1):
            task.cancel()
        await asyncio.gather(cpu0, cpu1, return_exceptions=True)
        await stop_all(dev, [*busy, pinger], readers)
    p99 = percentile(samples, 99) * 1e3
    return [
        Result(
            "ipi_latency",
            f"IRQ -> IPI -> halted CPU's handler p99, {n} busy guests",
            "ms",
            p99,
            None,
            None,
            2.0,
            "value",
            "lower",
            f"{len(samples)} samples, median {median(samples) * 1e3:.3f} ms; includes one irq "
            "delivery to CPU 0 and one NOTIFY exit of CPU 1",
            {"samples": len(samples), "p50_ms": median(samples) * 1e3},
        )
    ]


async def _read_forever(f: Any, cpu: int) -> None:
    while True:
        try:
            await f.read(4, cpu)
        except OSError:
            return
