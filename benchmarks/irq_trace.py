"""Where an IRQ's latency goes: the latency figure's workload, each request traced.

``python -m benchmarks.irq_trace`` runs the ``latency`` figure's workload (100 busy
guests, every 5 ms an ``LHREQ_IRQ`` to a random one whose handler notifies; with
``--handler long`` the handler computes about 1 ms first, the ``long_handler_latency``
row) and records, for each request, when each step happened (one clock, any thread):

- the write, and whether the CPU's run was in a slice on a worker then;
- each slice of that CPU (on the event loop or a worker) and how it ended (``AGAIN``,
  ``AGAIN_URGENT``, a hypercall...), with the delivery of the irq (one ``_fuel.run``
  made itself, without Python, is noted as the slice ends: ``CpuStats.irqs_native``);
- each executor run submitted for it (urgent or not, refused a jump or not) and each
  hurry sent to it;
- the NOTIFY's hypercall on the event loop, and the read's return;
- how long the loop's calls that may wait for another thread took: the irq's
  ``_slicing.raise_irq`` and ``kick`` (the slicer's lock, taken holding the GIL) and the
  withdrawal from the pool's queue (the pool's lock);
- per slice and per request, what the thread did meanwhile: ran, or was off its core,
  and how many times it blocked (the GIL, a lock, a wait for events) or was preempted
  (the machine's load), from ``getrusage``, which keeps the GIL;
- the slicer's counts over the run (``_slicing.slicer_stats``: its wake-ups, and the
  loop's waits for its lock).

It prints how many requests took each way (delivered on the loop or on a worker, sent
to the back of the queue, refused a jump, hurried), each step's percentiles by way,
and the ``--show`` slowest requests step by step.  A measurement, not a test: the
wrappers cost a few microseconds per slice, and nothing fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import random
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

from supervisor import LguestDevice, _slicing, hypercalls, interrupts
from supervisor import run as run_loop
from supervisor.cpu import LgCpu
from supervisor.slicepool import AGAIN, AGAIN_URGENT, Job, SlicePool

from .cases import BUSY, LONG_HANDLER
from .guests import assemble, boot
from .harness import percentile

now = time.perf_counter
Step = tuple[float, str]


def _thread_use() -> tuple[float, float, int, int]:
    """This thread's wall clock, CPU time, voluntary context switches (it blocked: the
    GIL, a lock, a wait for events) and involuntary ones (the kernel preempted it) so
    far.  (``getrusage`` keeps the GIL: reading ``/proc`` would let it go, and a worker
    take it, which is what is measured.)"""
    use = resource.getrusage(resource.RUSAGE_THREAD)
    return now(), use.ru_utime + use.ru_stime, use.ru_nvcsw, use.ru_nivcsw


def _use_text(before: tuple[float, float, int, int]) -> str:
    """What the thread did since ``before`` (:func:`_thread_use`): ran, or was off its
    core (blocked, or preempted and waiting for a core)."""
    after = _thread_use()
    wall, cpu = after[0] - before[0], after[1] - before[1]
    blocked, preempted = after[2] - before[2], after[3] - before[3]
    return (
        f" (wall {wall * 1e3:.3f} ms: ran {cpu * 1e3:.3f}, off the core "
        f"{(wall - cpu) * 1e3:.3f}: blocked {blocked}x, preempted {preempted}x)"
    )


class Tracer:
    """Timelines of the CPUs with a request in flight, from wrappers around the run loop's
    steps (installed by :meth:`install`, removed by :meth:`remove`)."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.watched: dict[int, list[Step]] = {}  # id(cpu) -> its steps
        self.hurries: dict[int, list[Step]] = collections.defaultdict(list)  # by fuel address
        self._undo: list[Callable[[], None]] = []
        self.cpus: dict[int, LgCpu] = {}  # id -> CPU, for by_fuel

    def where(self) -> str:
        return "loop" if threading.get_ident() == self.loop_thread else "worker"

    def note(self, cpu: object, what: str) -> None:
        steps = self.watched.get(id(cpu))
        if steps is not None:
            steps.append((now(), what))

    def by_fuel(self, fuel: _slicing.Fuel, what: str) -> None:
        """Note ``what`` for the watched CPU whose fuel is ``fuel``, if any."""
        for key, cpu in self.cpus.items():
            if cpu.fuel is fuel and key in self.watched:
                self.watched[key].append((now(), what))

    def _patch(self, owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
        real = getattr(owner, name)
        setattr(owner, name, wrapper(real))
        self._undo.append(functools.partial(setattr, owner, name, real))

    def install(self) -> None:
        tracer = self

        def slices(real: Callable[..., Any]) -> Callable[..., Any]:
            def run_slice(cpu: LgCpu, *args: Any, **kwargs: Any) -> Any:
                tracer.note(cpu, f"slice starts on the {tracer.where()}")
                native = cpu.stats.irqs_native
                watched = id(cpu) in tracer.watched
                before = _thread_use() if watched else None
                ended = real(cpu, *args, **kwargs)
                use = _use_text(before) if before is not None else ""
                how = {id(AGAIN): "AGAIN", id(AGAIN_URGENT): "AGAIN_URGENT"}.get(id(ended))
                if cpu.stats.irqs_native != native:  # (when is not known: at a block boundary)
                    tracer.note(cpu, "delivered natively in the slice (counted as it ended)")
                tracer.note(cpu, f"slice ends on the {tracer.where()}: {how or ended.name}{use}")
                return ended

            return run_slice

        def deliveries(real: Callable[[LgCpu], bool]) -> Callable[[LgCpu], bool]:
            def maybe_do_interrupt(cpu: LgCpu) -> bool:
                done = real(cpu)
                if done:
                    tracer.note(cpu, f"delivered on the {tracer.where()}")
                return done

            return maybe_do_interrupt

        def calls(real: Callable[[LgCpu], None]) -> Callable[[LgCpu], None]:
            def do_hypercalls(cpu: LgCpu) -> None:
                tracer.note(cpu, f"hypercall {cpu.hcall} on the {tracer.where()}")
                real(cpu)

            return do_hypercalls

        def submits(real: Callable[..., Job[Any]]) -> Callable[..., Job[Any]]:
            def submit(pool: SlicePool, *args: Any, **kwargs: Any) -> Job[Any]:
                refused = pool.refused
                job = real(pool, *args, **kwargs)
                urgent = "urgent" if kwargs.get("urgent") is not None else "plain"
                refusal = ", refused a jump" if pool.refused != refused else ""
                tracer.note(kwargs.get("owner"), f"{urgent} run submitted{refusal}")
                return job

            return submit

        def hurries(real: Callable[[_slicing.Fuel], bool]) -> Callable[[_slicing.Fuel], bool]:
            def hurry(fuel: _slicing.Fuel) -> bool:
                sent = real(fuel)
                tracer.hurries[fuel.address].append((now(), "hurried" if sent else "hurry: none"))
                return sent

            return hurry

        def withdrawals(real: Callable[[SlicePool, Job[Any]], bool]) -> Any:
            def _withdraw(pool: SlicePool, job: Job[Any]) -> bool:
                t0 = now()
                withdrawn = real(pool, job)
                took = (now() - t0) * 1e3
                what = "withdrawn from the queue" if withdrawn else "not withdrawn (in a step)"
                tracer.note(job.owner, f"{what} in {took:.3f} ms (the pool's lock)")
                return withdrawn

            return _withdraw

        def natives(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
            def wrap(real: Callable[..., Any]) -> Callable[..., Any]:
                def call(fuel: _slicing.Fuel, *args: Any) -> Any:
                    t0 = now()
                    out = real(fuel, *args)
                    tracer.by_fuel(fuel, f"_slicing.{name} took {(now() - t0) * 1e3:.3f} ms")
                    return out

                return call

            return wrap

        self._patch(SlicePool, "_withdraw", withdrawals)
        self._patch(_slicing, "raise_irq", natives("raise_irq"))
        self._patch(_slicing, "kick", natives("kick"))
        self._patch(run_loop, "run_slice", slices)
        self._patch(interrupts, "maybe_do_interrupt", deliveries)
        self._patch(hypercalls, "do_hypercalls", calls)
        self._patch(SlicePool, "submit", submits)
        self._patch(_slicing, "hurry", hurries)

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def ways(steps: list[Step]) -> list[str]:
    """Which ways a request took, from its steps."""
    text = "\n".join(what for _, what in steps)
    found = []
    for way, sign in (
        ("on a worker when asked", "asked while on a worker"),
        ("delivered on the loop", "delivered on the loop"),
        ("delivered on a worker", "delivered on the worker"),
        ("delivered natively (_fuel.run)", "delivered natively"),
        ("refused a jump", "refused a jump"),
        ("hurried", "hurried"),
        ("back of the queue", ": AGAIN\n"),
        ("went first (AGAIN_URGENT)", "AGAIN_URGENT"),
    ):
        if sign in text + "\n":
            found.append(way)
    return found


def stages(steps: list[Step]) -> dict[str, float]:
    """Seconds between the steps every request has."""
    t0 = steps[0][0]
    first: dict[str, float] = {}
    for t, what in steps:
        for key in ("delivered", "run submitted", "slice starts on the worker", "hypercall"):
            if key in what and key not in first:
                first[key] = t
    out = {}
    if "delivered" in first:
        out["write -> delivered"] = first["delivered"] - t0
        if "hypercall" in first:
            out["delivered -> NOTIFY on the loop"] = first["hypercall"] - first["delivered"]
    if "run submitted" in first and "slice starts on the worker" in first:
        out["submitted -> on a worker"] = (
            first["slice starts on the worker"] - first["run submitted"]
        )
    if "hypercall" in first:
        out["NOTIFY on the loop -> read returns"] = steps[-1][0] - first["hypercall"]
    out["total"] = steps[-1][0] - t0
    return out


async def trace(handler: str, seconds: float, guests: int) -> list[tuple[float, list[Step]]]:
    """The workload, traced: (latency, steps) of every request that finished."""
    tracer = Tracer()
    tracer.install()
    done: list[tuple[float, list[Step]]] = []
    try:
        async with LguestDevice() as dev:
            image = assemble(LONG_HANDLER if handler == "long" else BUSY)
            gs = [await boot(dev, image) for _ in range(guests)]
            for g in gs:
                assert await g.read_word() == 1
            cpus = [g.file.cpu(0) for g in gs]
            tracer.cpus = {id(cpu): cpu for cpu in cpus}
            running = True
            # The loop thread's use from each request's write on (_thread_use).
            loop_use: dict[int, tuple[float, float, int, int]] = {}

            async def reader(i: int) -> None:
                while running:
                    try:
                        word = await gs[i].read_word()
                    except OSError:
                        return
                    steps = tracer.watched.pop(id(cpus[i]), None) if word == 0x35 else None
                    if steps is not None:
                        use = loop_use.pop(i, None)
                        text = (
                            f" (the loop thread since the write:{_use_text(use)[6:]}" if use else ""
                        )
                        steps.append((now(), "read returns" + text))
                        extra = tracer.hurries.pop(cpus[i].fuel.address, [])
                        steps = sorted(steps + [s for s in extra if s[0] >= steps[0][0]])
                        done.append((steps[-1][0] - steps[0][0], steps))

            readers = [asyncio.create_task(reader(i)) for i in range(guests)]
            await asyncio.sleep(0.3)  # every guest busy, budgets adapted
            slicer = _slicing.slicer_stats()
            end = now() + seconds
            while now() < end:
                await asyncio.sleep(0.005)
                i = random.randrange(guests)
                if id(cpus[i]) in tracer.watched:
                    continue
                tracer.hurries.pop(cpus[i].fuel.address, None)
                on_worker = cpus[i].threads.slice is not None
                where = "asked while on a worker" if on_worker else "asked"
                loop_use[i] = _thread_use()
                tracer.watched[id(cpus[i])] = [(now(), f"LHREQ_IRQ {where}")]
                gs[i].file.send_irq(3)
            await asyncio.sleep(0.5)  # let outstanding requests finish
            after = _slicing.slicer_stats()
            if slicer is not None and after is not None:
                fields = zip(after._fields, slicer, after, strict=True)
                counts = (f"{k} {b - a}" for k, a, b in fields)
                print(f"the slicer, while traced: {', '.join(counts)}")
            running = False
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    finally:
        tracer.remove()
    return done


def report(done: list[tuple[float, list[Step]]], show: int) -> None:
    latencies = sorted(took for took, _ in done)
    print(
        f"{len(done)} requests: p50 {percentile(latencies, 50) * 1e3:.2f} ms, "
        f"p99 {percentile(latencies, 99) * 1e3:.2f} ms, max {latencies[-1] * 1e3:.2f} ms"
    )
    slow = percentile(latencies, 90)
    counts: collections.Counter[str] = collections.Counter()
    slow_counts: collections.Counter[str] = collections.Counter()
    by_stage: dict[str, list[float]] = collections.defaultdict(list)
    for took, steps in done:
        for way in ways(steps):
            counts[way] += 1
            slow_counts[way] += took >= slow
        path = "worker" if "delivered on a worker" in ways(steps) else "loop"
        for stage, seconds in stages(steps).items():
            by_stage[f"{path}: {stage}"].append(seconds)
    print(f"ways taken (all requests / the slowest tenth, >= {slow * 1e3:.2f} ms):")
    for way, n in counts.most_common():
        print(f"  {way:28s} {n:5d} {slow_counts[way]:5d}")
    print("steps (ms): p50, p90, p99")
    for stage in sorted(by_stage):
        v = by_stage[stage]
        p = [percentile(v, q) * 1e3 for q in (50, 90, 99)]
        print(f"  {stage:45s} n={len(v):4d} {p[0]:8.3f} {p[1]:8.3f} {p[2]:8.3f}")
    for took, steps in sorted(done, key=lambda d: d[0])[-show:] if show else []:
        print(f"-- {took * 1e3:.2f} ms")
        for t, what in steps:
            print(f"  {(t - steps[0][0]) * 1e3:9.3f} {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    ap.add_argument("--handler", choices=["short", "long"], default="long")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--guests", type=int, default=100)
    ap.add_argument("--show", type=int, default=3, help="the slowest requests to print")
    args = ap.parse_args()
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if args.loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        done = runner.run(trace(args.handler, args.seconds, args.guests))
    report(done, args.show)


if __name__ == "__main__":
    main()
