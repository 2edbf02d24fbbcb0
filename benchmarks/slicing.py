"""How to cut a Unicorn CPU into exact slices: the candidates, measured side by side.

``python -m benchmarks.slicing`` runs the benchmark suite's two loops (the tight
register loop and the memory-heavy loop, same image and page tables as
``python -m benchmarks``) on a bare Unicorn CPU, interleaved, best of ``--reps``:

- ``raw``: ``emu_start`` alone (no slicing at all);
- ``block hook``: the supervisor's native ``UC_HOOK_BLOCK`` hook (``supervisor/_fuel.c``),
  with a budget it never reaches;
- ``no_exit_request``: raw, with Unicorn's translation-time flag ``no_exit_request``
  set (see docs/performance.md, "Where the per-block cost and the replays come from");
- ``stops``: another thread calls ``uc_emu_stop`` every ``--period`` seconds and the
  loop is resumed where it stopped, with and without ``no_exit_request``.

Exactness is judged on the memory-heavy loop: each iteration does ``incl counter``
once, so after ``n`` iterations ``counter`` must be exactly ``n``.  A stop that
replays a write makes it larger.  Times are the emulating thread's CPU time
(``time.thread_time``), which other processes on a shared machine move less than wall
time.  This is a measurement, not a test: nothing fails.
"""

from __future__ import annotations

import argparse
import threading
import time

from supervisor import _slicing, _unicorn

from .cases import LOOP, MEMORY_BODY, TIGHT_BODY
from .guests import assemble
from .raw import RawCpu


def run_loop(cpu: RawCpu, n: int, period: float | None) -> tuple[float, int]:
    """Run ``n`` iterations; with ``period``, stopped from another thread that often."""
    cpu.set_u32("iters", n)
    cpu.set_u32("counter", 0)
    done = threading.Event()
    stops = 0

    def stopper() -> None:
        nonlocal stops
        while not done.wait(period):
            cpu.uc.emu_stop()
            stops += 1

    thread = threading.Thread(target=stopper) if period else None
    t0 = time.thread_time()
    if thread is not None:
        thread.start()
    cpu.run("bench", "bench_end")
    while cpu.eip != cpu.sym("bench_end"):
        cpu.run(cpu.eip, "bench_end")
    elapsed = time.thread_time() - t0
    done.set()
    if thread is not None:
        thread.join()
    return elapsed, stops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.3, help="raw time of one loop run")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--period", type=float, default=0.0005, help="seconds between stops")
    args = ap.parse_args()
    offset = _unicorn.find_no_exit_request()
    print(f"no_exit_request offset: {offset}")
    for label, body in (("tight", TIGHT_BODY), ("memory", MEMORY_BODY)):
        image = assemble(LOOP.format(body=body))
        variants: dict[str, tuple[RawCpu, float | None]] = {}
        for name, hooked, no_exit, period in (
            ("raw", False, False, None),
            ("block hook", True, False, None),
            ("no_exit_request", False, True, None),
            ("stops", False, False, args.period),
            ("stops + no_exit_request", False, True, args.period),
        ):
            if no_exit and offset is None:
                continue
            cpu = RawCpu(image)
            if hooked:
                fuel = _slicing.attach(cpu.uc, count_blocks=True)  # the block hook
                fuel.budget = 1 << 62
                fuel.deadline = 1 << 62
                fuel.clock_mask = (1 << 64) - 1
                cpu._hooks.append(fuel)
            if no_exit and offset is not None:
                _unicorn.set_no_exit_request(cpu.uc, True)
            run_loop(cpu, 1000, None)
            variants[name] = (cpu, period)
        raw = variants["raw"][0]
        raw.set_u32("iters", 100_000)
        t0 = time.thread_time()
        raw.run("bench", "bench_end")
        n = max(1000, int(100_000 * args.seconds / (time.thread_time() - t0)))
        best = {name: float("inf") for name in variants}
        replays = dict.fromkeys(variants, 0)
        stops = dict.fromkeys(variants, 0)
        for _ in range(args.reps):
            for name, (cpu, period) in variants.items():
                t, s = run_loop(cpu, n, period)
                best[name] = min(best[name], t)
                stops[name] += s
                replays[name] += cpu.u32("counter") - n
        base = best["raw"]
        for name in variants:
            rate = n / best[name] / 1e6
            extra = ""
            if label == "memory":
                extra = f"; counter - n = {replays[name]}"
            if variants[name][1]:
                extra += f"; {stops[name]} stops"
            ratio = base / best[name]
            print(f"{label:6s} {name:24s} {rate:8.1f} M loops/s  {ratio:.3f}x raw{extra}")
        for cpu, _ in variants.values():
            cpu.close()


if __name__ == "__main__":
    main()
