"""Clock calls in a C guest: ``clock_gettime`` served by the runtime without a trap.

Supervised: a guest built by ``supervisor build`` calls
``clock_gettime(CLOCK_MONOTONIC)`` N times; the figure is N over the guest CPU time
the calls took (``GuestStats.run_time`` of that run less a run with N = 0, so boot,
console and the machine's load are out).  Raw: the same C loop built natively
(x86_64-linux-musl, Linux's vDSO) and timed on the host.
"""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

from supervisor import GuestConfig, Supervisor, sdk

from .harness import Profile, Result

SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 0;
    struct timespec t = {0, 0};
    long sum = 0;
    for (long i = 0; i < n; i++) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        sum += t.tv_nsec & 1;
    }
    printf("%ld\n", sum);
    return 0;
}
"""
GOAL = 2_000_000  # calls per second


async def _guest_seconds(image: Path, calls: int) -> float:
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=image, memory="8M", cmdline=str(calls)))
        async for _line in guest.console:
            pass
        result = await guest.wait()
        if not result.ok:
            raise RuntimeError(f"clock guest failed: {result}")
        return guest.stats.run_time


def _native_seconds(binary: Path, calls: int) -> float:
    start = time.perf_counter()
    subprocess.run([binary, str(calls)], check=True, capture_output=True)
    return time.perf_counter() - start


def _build(tmp: Path) -> tuple[Path, Path]:
    """The guest image and the native x86_64 executable of SOURCE (blocking)."""
    tc = sdk.find_toolchain("zig")
    src = tmp / "clocks.c"
    src.write_text(SOURCE)
    image = sdk.build([src], tmp / "clocks.elf", sdk.BuildOptions(optimize="2"), tc)
    native = tmp / "clocks-native"
    subprocess.run(
        [*tc.cc, "-target", "x86_64-linux-musl", "-static", "-O2", str(src), "-o", str(native)],
        check=True, capture_output=True,
    )  # fmt: skip
    return image, native


async def clock_calls(p: Profile) -> list[Result]:
    calls = 2_000_000 if p.name == "full" else 400_000
    with tempfile.TemporaryDirectory(prefix="lguest-bench-clock-") as tmp:
        image, native = await asyncio.to_thread(_build, Path(tmp))
        guest = native_s = float("inf")
        for _ in range(p.reps):
            base = await _guest_seconds(image, 0)
            guest = min(guest, max(1e-9, await _guest_seconds(image, calls) - base))
            base_n = await asyncio.to_thread(_native_seconds, native, 0)
            native_s = min(
                native_s,
                max(1e-9, await asyncio.to_thread(_native_seconds, native, calls) - base_n),
            )
    value, raw = calls / guest, calls / native_s
    return [
        Result(
            "clock_calls",
            "clock_gettime(CLOCK_MONOTONIC) in a C guest, calls per second of guest CPU",
            "calls/s",
            value,
            raw,
            value / raw,
            GOAL,
            "value",
            "higher",
            f"{calls:,} calls, best of {p.reps}; raw: the same loop built natively for "
            "x86_64-linux-musl (the vDSO). No hypercall or trap per call",
            {"goal_ratio": value / GOAL},
        )
    ]


if __name__ == "__main__":  # python -m benchmarks.bench_clock
    from .harness import QUICK

    for r in asyncio.run(clock_calls(QUICK)):
        print(f"{r.name}: {r.value:,.0f} {r.unit} (goal {r.goal:,.0f}: x{r.value / GOAL:.2f}); "
              f"native {r.raw:,.0f} (ratio {r.ratio:.3f})")  # fmt: skip
