"""A swarm: many ticker guests at once in one process, then a tally.

python examples/swarm.py [N]
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

from supervisor import GuestConfig, Supervisor, _slicing

TICKER = Path(__file__).resolve().parent.parent / "guests" / "ticker.img"


async def main(n: int) -> None:
    config = GuestConfig(image=TICKER, memory="1M", cmdline="ticks=3 period_ms=2", console="null")
    start = time.perf_counter()
    async with Supervisor() as sup:
        guests = [await sup.launch(config) for _ in range(n)]
        results = await asyncio.gather(*(g.wait() for g in guests))
        blocks = sum(g.stats.blocks for g in guests)
    wall = time.perf_counter() - start
    tally = Counter("finished" if r.ok else f"ended: {r.reason}" for r in results)
    # Blocks are counted only on the block-hook path (see CpuStats.blocks).
    counted = f"{blocks:,} blocks" if _slicing.COUNTS_BLOCKS else "blocks not counted"
    print(f"{n} guests in {wall:.2f}s, {counted}: {dict(tally)}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
