"""Leaks: create, run and close many guests; memory, threads and descriptors stay flat.

Guests are of several kinds, so that every way a guest ends is repeated many
times: a clean power-off after a notify, a bad hypercall, a spinner closed in
the middle of a slice, a halted guest closed with its clock event armed, and a
guest closed while a Waker waits in ``LHREQ_BREAK``.

Measurements (after ``gc.collect()``): RSS from ``/proc/self/statm``, the number
of threads, the number of open descriptors in ``/proc/self/fd``, and the number
of live ``LgCpu``/``Lguest`` objects.  A warm-up batch (1,000 guests; 2,000 in
the long profile: RSS climbs for about the first 1,000-1,500 guests, then stays
within a few MiB) is run first, so that one-time costs
(Unicorn's lazily built tables, the allocator's arenas, the executor's
threads, the assembler cache) are in the baseline; then the rest, and the
figures must match the baseline:

* threads and descriptors exactly (the device's own worker threads, which its
  executor starts lazily, only up to its worker count);
* live guest objects: no more than before (earlier tests' failures, kept alive
  by their tracebacks, may hold a few);
* RSS within ``RSS_TOLERANCE`` (24 MiB).  Freed memory goes back to malloc's
  free lists and Python's arenas rather than to the kernel, so RSS wobbles by a
  few MiB from batch to batch.  A Unicorn instance that is never freed keeps
  about 2.7 MiB, so even one leaked guest in a hundred shows;
  smaller per-guest leaks of Python objects are caught by the live-object count.

Note: a closed guest's ``Uc`` object is freed by the cyclic garbage collector,
not by reference counting (the Unicorn binding's hook callbacks make reference
cycles), so hundreds of dead Unicorn instances can wait for a collection; RSS
then swings by tens of MiB and malloc keeps the high-water mark (seen: +26 MiB
over 8,000 guests when collecting only at the two measurements).  The test
therefore collects after every 500 guests, which measures real leaks;
``test_closing_a_guest_frees_its_unicorn_at_once`` checks that close() frees
the native instance deterministically (uc_close at close time).

Sizes: 2,000 guests by default, 10,000 with ``LGUEST_FUZZ_PROFILE=long``.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from fuzz_guests import scaled
from guestasm import assemble, load, open_descriptors, until

from supervisor import LguestDevice, _unicorn
from supervisor.abi import LHREQ_BREAK, LHREQ_INITIALIZE, pack_words
from supervisor.cpu import LgCpu
from supervisor.guest import Lguest
from supervisor.launcher.layout import IMAGE_BASE
from supervisor.slicepool import Job

TOTAL = scaled(2_000, 10_000)
WARMUP = scaled(1_000, 2_000)
RSS_TOLERANCE = 24 << 20
RAM = 128 << 10
CONCURRENT = 8  # guests alive at once
TIMEOUT = 60.0  # seconds: a bound for failing (a hang on a loaded machine), never a wait

KINDS = [
    assemble(
        'main:\n LGUEST_INIT\n HCALL 17, 0x42\n HCALL 2, msg, 1, 0\n.data\nmsg: .asciz "bye"\n'
    ),
    assemble("main:\n LGUEST_INIT\n HCALL 99\n"),
    assemble("main:\n LGUEST_INIT\n1: incl counter\n jmp 1b\n.data\ncounter: .long 0\n"),
    # Its clock re-armed at every wake, 4 s ahead: armed whenever the test sees it halted.
    assemble("main:\n LGUEST_INIT\n HCALL 17, 0x42\n1: HCALL 9, 4000000000\n HCALL 10\n jmp 1b\n"),
    assemble("main:\n LGUEST_INIT\n HCALL 17, 0x42\n1: jmp 1b\n"),
]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fds() -> int:
    return open_descriptors()


def live_guests() -> int:
    return sum(isinstance(o, LgCpu | Lguest) for o in gc.get_objects())


def other_threads() -> int:
    """Threads other than the device's workers (those start lazily, up to ``workers``)."""
    return sum(not t.name.startswith("lguest-cpu") for t in threading.enumerate())


def device_threads() -> int:
    return sum(t.name.startswith("lguest-cpu") for t in threading.enumerate())


def describe_live_guests() -> list[str]:
    """What keeps live guests alive (for the failure message)."""
    out = []
    for o in gc.get_objects():
        if isinstance(o, Lguest):
            cpu = o.cpus[0] if o.cpus else None
            state = f"dead={o.dead!r} closing={cpu.run.closing if cpu else None}"
            refs = [type(r).__name__ for r in gc.get_referrers(o)]
            out.append(f"{state} referrers={refs}")
    return out


def figures() -> dict[str, int]:
    gc.collect()
    return {
        "rss": rss(),
        "threads": other_threads(),
        "fds": fds(),
        "guests": live_guests(),
    }


async def one_guest(dev: LguestDevice, i: int) -> None:
    kind = i % len(KINDS)
    memory, layout = load(KINDS[kind], RAM)
    f = dev.open(memory)
    await f.write(
        pack_words(LHREQ_INITIALIZE, memory.address, layout.pfn_limit, layout.pgdir, IMAGE_BASE)
    )
    if kind == 0:  # notify, then power off
        assert await f.read(8) == pack_words(0x42)
        with pytest.raises(FileNotFoundError):
            await f.read(8)
        assert await f.read(8) == b"bye\0"
    elif kind == 1:  # dies of a bad hypercall
        with pytest.raises(FileNotFoundError):
            await f.read(8)
    elif kind == 2:  # closed while it spins
        reader = asyncio.create_task(f.read(8))
        await until(lambda: bool(f.stats and f.stats.slices))
        await f.close()
        with pytest.raises(OSError) as e:
            await reader
        assert e.value.errno == errno.EBADF
    elif kind == 3:  # closed while halted with its clock armed
        assert await f.read(8) == pack_words(0x42)
        reader = asyncio.create_task(f.read(8))
        cpu = f.cpu(0)
        await until(lambda: cpu.halted)
        assert cpu.clock.event is not None
        await f.close()
        assert cpu.clock.event is None
        with pytest.raises(OSError):
            await reader
    else:  # closed while a Waker waits for BREAK 0
        assert await f.read(8) == pack_words(0x42)
        waker = asyncio.create_task(f.waker().write(pack_words(LHREQ_BREAK, 1)))
        with pytest.raises(BlockingIOError):
            await f.read(8)
        await f.close()
        with pytest.raises(OSError) as e:
            await waker
        assert e.value.errno == errno.EBADF
    await f.close()
    memory.close()


COLLECT_EVERY = 500


async def batch(dev: LguestDevice, start: int, count: int) -> None:
    for base in range(start, start + count, CONCURRENT):
        n = min(CONCURRENT, start + count - base)
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(one_guest(dev, base + i) for i in range(n)))
        if (base - start) % COLLECT_EVERY + n > COLLECT_EVERY:
            gc.collect()  # dead Unicorn instances wait for the cyclic GC (see above)


async def test_many_guests_leave_nothing_behind(dev: LguestDevice) -> None:
    started = time.perf_counter()
    await batch(dev, 0, WARMUP)
    baseline = figures()
    await batch(dev, WARMUP, TOTAL - WARMUP)
    after = figures()
    took = time.perf_counter() - started
    assert not dev.files
    assert after["guests"] <= baseline["guests"], (baseline, after, describe_live_guests())
    assert after["threads"] == baseline["threads"], (baseline, after)
    assert device_threads() <= dev._workers
    assert after["fds"] == baseline["fds"], (baseline, after)
    grown = after["rss"] - baseline["rss"]
    assert grown < RSS_TOLERANCE, (
        f"RSS grew by {grown / 2**20:.1f} MiB over {TOTAL - WARMUP} guests",
        baseline,
        after,
    )
    print(f"{TOTAL} guests in {took:.1f} s; RSS {baseline['rss'] / 2**20:.1f} MiB")


async def test_devices_come_and_go_without_leaking_threads() -> None:
    """A device per batch: each aclose() joins its threads; descriptors stay put."""
    gc.collect()
    threads = threading.active_count()
    descriptors = fds()
    guests = live_guests()
    for _ in range(scaled(20, 200)):
        async with LguestDevice(workers=2) as d:
            await batch(d, 0, 5)
        assert threading.active_count() == threads
    gc.collect()
    assert fds() == descriptors
    assert live_guests() <= guests


async def test_closing_a_guest_frees_its_unicorn_at_once() -> None:
    """Without an engine pool a CPU's instance is its own: closing frees it at once (a
    pool keeps its engines for other CPUs: tests/test_engines.py)."""
    import weakref

    async with LguestDevice(engines="off") as dev:
        memory, layout = load(KINDS[1], RAM)
        f = dev.open(memory)
        await f.write(
            pack_words(LHREQ_INITIALIZE, memory.address, layout.pfn_limit, layout.pgdir, IMAGE_BASE)
        )
        with pytest.raises(FileNotFoundError):
            await f.read(8)
        uc = weakref.ref(f.cpu(0).engine.uc)
        gc.collect()
        gc.disable()
        try:
            await f.close()
            memory.close()
            # The native instance is closed now; the binding's own callback thunks keep
            # the small Python wrapper in a cycle until the next collection.
            alive = uc()
            assert alive is None or _unicorn.is_closed(alive), "uc_close has not run"
        finally:
            gc.enable()


async def close_while_on_the_worker(dev: LguestDevice) -> None:
    """Start a spinner, wait until its executor run is on the worker, then close it."""
    memory, layout = load(KINDS[2], RAM)
    f = dev.open(memory)
    await f.write(
        pack_words(LHREQ_INITIALIZE, memory.address, layout.pfn_limit, layout.pgdir, IMAGE_BASE)
    )
    reader = asyncio.create_task(f.read(8))
    cpu = f.cpu(0)

    def on_the_worker() -> bool:
        run = cpu.run.queued_slice
        return isinstance(run, Job) and not run.queued

    await until(on_the_worker)
    await f.close()
    with pytest.raises(OSError):
        await reader
    memory.close()


async def test_a_closed_guest_is_not_kept_alive_by_its_ended_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run that ended is kept a while: by its worker until it takes the next job, and
    what the worker handed the loop (the callback that settles the read's future) by the
    worker's frames until it is back from ``call_soon_threadsafe``, which may be after the
    read and the close have gone on.  Neither may keep the closed guest's CPU, and
    through it the guest, alive.  One worker, so that the job it keeps is the guest's;
    the callbacks are kept here as the worker's frames may keep them (asyncio's loop: a
    uvloop's methods cannot be wrapped)."""
    loop = asyncio.get_running_loop()
    handed: list[object] = []
    if isinstance(loop, asyncio.BaseEventLoop):
        wake_loop = loop.call_soon_threadsafe

        def keep(callback: Callable[..., object], *args: Any, **kwargs: Any) -> object:
            handed.append(callback)
            return wake_loop(callback, *args, **kwargs)

        monkeypatch.setattr(loop, "call_soon_threadsafe", keep)
    async with LguestDevice(workers=1) as dev:
        gc.collect()
        before = live_guests()
        await close_while_on_the_worker(dev)
        gc.collect()
        assert live_guests() <= before, describe_live_guests()
    assert handed or not isinstance(loop, asyncio.BaseEventLoop)  # (it ended on the worker)
