"""Where a resting guest's wake goes: the ``hibernated`` figure's wake, in parts.

``python -m benchmarks.wake_trace [N] [WAKES]`` (default 2,000 guests, 300 wakes) sets up
N resting SLEEPER guests as the ``hibernated`` figure does (128 KiB, engines ``pool``,
registers and memory packed, no read in flight), then wakes random ones one at a time
(``LHREQ_IRQ`` until the handler's NOTIFY is read) and records, per wake, with the
same clock:

- ``irq write``: the write's own call (the irq raised, ``LgCpu.wake()``, the restart);
- ``to read``: from the restart to the restarted read's first step (turns of the loop);
- ``to slice``: from that step to the first slice's entry into the guest, less the
  parts below it: the run loop's passes;
- ``memory``: unpacking the memory (``GuestMemory.unpack``: zlib and the page copies);
- ``take``: the engine from the pool (``EnginePool.take``), ``remap``: mapping the
  guest's memory into it (``_unicorn.map_memory``), ``registers``: unpacking the packed
  registers (``_unicorn.unpack_context``), ``restore``: ``_unicorn.load_context_data``;
- ``slice``: the first entry into the guest (``execute._enter_guest``: the irq's
  delivery, the handler's translation afresh and its run to the NOTIFY);
- ``to notify``: from the slice's end to the read's return;
- ``turns``: turns of the event loop from the write to the read's return.

Then the same guests are woken again right after their halt, before they rest (their
own engine back from the pool, translations intact): the ``slice`` part there is the
handler without its translation, so the difference is what translating it costs.

A measurement, not a test: the wrappers cost a microsecond or two each, and nothing
fails.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from supervisor import (
    LguestDevice,
    _unicorn,
    abi,
    device,
    engines,
    execute,
    hibernation,
    memory,
)

from .bench_hibernate import SLEEPER, WAKE_PACK_AFTER, _Sleeper, _sleeper
from .guests import assemble
from .harness import median, percentile, poll

clock = time.perf_counter
spent: dict[str, float] = {}
marks: dict[str, float] = {}


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = clock()
        marks.setdefault(name + "@", t)
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + clock() - t
            marks[name + "$"] = clock()

    return wrapper


def _patch() -> None:
    memory.GuestMemory.unpack = _timed("memory", memory.GuestMemory.unpack)  # type: ignore[method-assign]
    engines.EnginePool.take = _timed("take", engines.EnginePool.take)  # type: ignore[method-assign]
    _unicorn.map_memory = _timed("remap", _unicorn.map_memory)
    _unicorn.unpack_context = _timed("registers", _unicorn.unpack_context)
    _unicorn.load_context_data = _timed("restore", _unicorn.load_context_data)
    execute._enter_guest = _timed("slice", execute._enter_guest)
    read = device.LguestFile._read

    async def traced_read(self: device.LguestFile, *args: Any, **kwargs: Any) -> bytes:
        marks.setdefault("read", clock())
        return await read(self, *args, **kwargs)

    device.LguestFile._read = traced_read  # type: ignore[method-assign]


class _Turns:
    """Counts the event loop's turns while armed (a callback that re-arms itself)."""

    def __init__(self) -> None:
        self.count = 0
        self.armed = False

    def _tick(self) -> None:
        if self.armed:
            self.count += 1
            asyncio.get_running_loop().call_soon(self._tick)

    def start(self) -> None:
        self.count, self.armed = 0, True
        asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> int:
        self.armed = False
        return self.count


async def _wake(s: _Sleeper, turns: _Turns) -> dict[str, float]:
    spent.clear()
    marks.clear()
    turns.start()
    t0 = clock()
    await s.g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
    t1 = clock()
    reader = s.reader
    assert reader is not None
    word = await reader
    t2 = clock()
    n = turns.stop()
    assert abi.unpack_words(word) == (0x33,)
    parts = {k: v * 1e3 for k, v in spent.items()}
    read = marks.get("read", t1)
    entered = marks.get("slice@", read)
    inner = sum(spent.get(k, 0.0) for k in ("memory", "take", "remap", "registers", "restore"))
    parts["irq write"] = (t1 - t0) * 1e3
    parts["to read"] = (read - t1) * 1e3
    parts["to slice"] = (entered - read - inner) * 1e3
    parts["to notify"] = (t2 - marks.get("slice$", t2)) * 1e3
    parts["total"] = (t2 - t0) * 1e3
    parts["turns"] = n
    return parts


async def _run(n: int, wakes: int) -> None:
    image = assemble(SLEEPER)
    async with LguestDevice(engines="pool") as dev:
        sleepers: list[_Sleeper] = []
        while len(sleepers) < n:
            sleepers += await asyncio.gather(
                *(_sleeper(dev, image) for _ in range(min(500, n - len(sleepers))))
            )
        await poll(lambda: all(s.rests for s in sleepers), 0.05)
        hibernation.PACK_AFTER = WAKE_PACK_AFTER
        _patch()
        turns = _Turns()
        rng = random.Random(1)
        rested: list[dict[str, float]] = []
        own: list[dict[str, float]] = []
        for _ in range(wakes):
            s = sleepers[rng.randrange(n)]
            rested.append(await _wake(s, turns))
            hibernation.PACK_AFTER = 60.0  # (this one stays awake: its own engine next)
            s.restart()
            cpu_asleep = s.g.file.asleep
            await poll(lambda: cpu_asleep(0), 0)  # noqa: B023
            own.append(await _wake(s, turns))
            hibernation.PACK_AFTER = WAKE_PACK_AFTER
            s.restart()
            await poll(lambda: s.rests, 0)  # noqa: B023
        _Sleeper.closing = True
        await dev.aclose()
        await asyncio.gather(*(s.reader for s in sleepers if s.reader), return_exceptions=True)
    _report(f"{wakes} wakes of resting guests among {n:,}", rested)
    _report("the same guests woken again at their halt, before resting (own engine)", own)


def _report(title: str, rows: list[dict[str, float]]) -> None:
    print(title)
    keys = ["total", "irq write", "to read", "to slice", "memory", "take", "remap", "registers",
            "restore", "slice", "to notify", "turns"]  # fmt: skip
    for k in keys:
        xs = [r.get(k, 0.0) for r in rows]
        unit = "" if k == "turns" else " ms"
        print(f"  {k:10} p50 {median(xs):7.3f}{unit}  p99 {percentile(xs, 99):7.3f}{unit}"
              f"  max {max(xs):7.3f}{unit}")  # fmt: skip


def main(argv: list[str]) -> None:
    n = int(argv[0]) if argv else 2_000
    wakes = int(argv[1]) if len(argv) > 1 else 300
    try:
        import uvloop

        uvloop.run(_run(n, wakes))
    except ImportError:
        asyncio.run(_run(n, wakes))


if __name__ == "__main__":
    main(sys.argv[1:])
