"""Snapshot and restore of a 16 MiB guest, and 1,000 restores from one snapshot.

    python -m benchmarks.bench_snapshot [--restores N] [--dirty MIB]

The guest fills ``--dirty`` MiB of its RAM with non-zero words (pages that a
snapshot must carry), notifies, and spins.  Measured, best of a few runs:

* capture: stop the running guest, copy CPU, Host state and non-zero pages, resume;
* save / load: the versioned, checksummed file (its size is shown);
* restore: fresh memory, a new Unicorn CPU, INITIALIZE, state applied;
* N restores (and closes) from one snapshot, run back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from supervisor import LguestDevice
from supervisor.snapshot import Snapshot, restore, snapshot

from .guests import assemble, boot, close
from .harness import print_table

RAM = 16 << 20
FILL = r"""
.set FILL_START, 0x100000
.set FILL_WORDS, {words}
main:
    LGUEST_INIT
    mov $FILL_START, %edi
    mov $FILL_WORDS, %ecx
    mov $0x9e3779b9, %eax
    rep stosl
    HCALL 17, 0x5000
1:  incl counter
    jmp 1b
.data
counter: .long 0
"""


async def best_of(reps: int, action: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        await action()
        times.append(time.perf_counter() - start)
    return min(times)


async def measure(restores: int, dirty_mib: int) -> list[tuple[str, str, str]]:
    words = (dirty_mib << 20) // 4
    rows: list[tuple[str, str, str]] = []
    async with LguestDevice() as dev:
        g = await boot(dev, assemble(FILL.format(words=words)), ram_size=RAM)
        assert await g.read_word() == 0x5000
        runner = asyncio.create_task(g.file.read(8))  # spins from here on
        snap: Snapshot | None = None

        async def take() -> None:
            nonlocal snap
            snap = await snapshot(g.file)

        t = await best_of(5, take)
        assert snap is not None
        mib = snap.page_count() * 4096 / (1 << 20)
        rows.append(("capture (running guest)", f"{t * 1e3:.2f} ms", f"{mib:.1f} MiB of pages"))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "guest.snap"
            s = snap
            t = await best_of(3, lambda: asyncio.to_thread(s.save, path))
            size = path.stat().st_size / (1 << 20)
            rows.append(("save to file", f"{t * 1e3:.2f} ms", f"{size:.1f} MiB file"))
            t = await best_of(3, lambda: asyncio.to_thread(Snapshot.load, path))
            rows.append(("load from file (checksum)", f"{t * 1e3:.2f} ms", ""))

        async def one_restore() -> None:
            f = await restore(s, dev)
            await f.close()
            with contextlib.suppress(BufferError):
                f.memory.close()

        t = await best_of(5, one_restore)
        rows.append(("restore + close", f"{t * 1e3:.2f} ms", "new memory, CPU, state"))
        per = []
        start = time.perf_counter()
        for _ in range(restores):
            t0 = time.perf_counter()
            await one_restore()
            per.append(time.perf_counter() - t0)
        total = time.perf_counter() - start
        rows.append(
            (
                f"{restores:,} restores from one snapshot",
                f"{total:.2f} s",
                f"{restores / total:,.0f}/s, median {statistics.median(per) * 1e3:.2f} ms",
            )
        )
        # A restored guest really runs: it continues the spin loop.
        f = await restore(s, dev)
        reader = asyncio.create_task(f.read(8))
        await asyncio.sleep(0.01)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await f.close()
        f.memory.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await close(g)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_snapshot")
    parser.add_argument("--restores", type=int, default=1000)
    parser.add_argument("--dirty", type=int, default=4, help="MiB of guest RAM made non-zero")
    args = parser.parse_args(argv)
    title = f"snapshot of a 16 MiB guest ({args.dirty} MiB dirtied)"
    print_table(title, asyncio.run(measure(args.restores, args.dirty)))


if __name__ == "__main__":
    main()
