"""A guest with several CPUs, and a snapshot of it taken while they all run.

Runs guests/c/smp.elf (C: every CPU adds to one counter with __atomic_fetch_add
and to another under a spinlock) on 4 CPUs; half-way it is snapshotted, killed,
and restored: the copy, every CPU included, finishes with exact totals.

    python examples/smp.py
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from supervisor import GuestConfig, Supervisor

GUESTS = Path(__file__).resolve().parent.parent / "guests"


async def main() -> None:
    config = GuestConfig(
        image=GUESTS / "c" / "smp.elf", memory="4M", cpus=4, cmdline="loops=3000000"
    )
    async with Supervisor() as sup:
        guest = await sup.launch(config)
        # A guest's run time has no event: poll it.
        while guest.stats.run_time < 0.05 and not guest.done:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # let the four CPUs get going
        snap = await guest.snapshot()
        print(f"snapshot of {len(snap.state.cpus)} CPUs taken mid-count")
        await guest.kill("replaced by its copy")
        copy = await sup.restore(snap, name="copy")
        async for line in copy.console:
            print(f"[copy] {line}")
        result = await copy.wait()
        print(f"[copy] exit status {result.exit_status}, cpu time {copy.stats.run_time:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
