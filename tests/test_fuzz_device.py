"""Device-input fuzzing: random requests from several tasks at once.

Each example builds a fresh device with four files (not initialized, spinning,
halted, dead) and runs a random script split over several tasks: writes of
random bytes, of every request with wrong arguments and random offsets, reads
of random sizes, BREAKs from the file and from Wakers, cancellations of
in-flight reads, breaks and closes, and closes.  Then it closes everything and checks:

* only ``OSError`` with a documented errno ever came out of a read or a write;
* nothing hung (every wait is bounded);
* no task is left, the executor has no queued work, and the only new threads
  are the device's, gone after ``dev.aclose()``;
* nothing reached the loop's exception handler.

Cancellations hit in-flight reads, breaks and closes alike (``close()`` must
finish freeing the guest even when its caller is cancelled).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from fuzz_guests import DOCUMENTED_ERRNOS, FUZZ, LoopErrors, executor_idle, lguest_threads
from guestasm import assemble, load
from hypothesis import given
from hypothesis import strategies as st

from supervisor import GuestMemory, LguestDevice, LguestFile, abi
from supervisor.abi import LHREQ_BREAK, LHREQ_INITIALIZE, LHREQ_IRQ, pack_words
from supervisor.launcher.layout import IMAGE_BASE

OP_TIMEOUT = 60.0  # an op that must not block, or the final clean-up, taking longer: a hang
RAM = 256 << 10
U64 = (1 << 64) - 1

SPIN = assemble("main:\n LGUEST_INIT\n1: incl counter\n jmp 1b\n.data\ncounter: .long 0\n")
HALT = assemble("main:\n LGUEST_INIT\n1: HCALL 10\n HCALL 17, 1\n jmp 1b\n")
DIE = assemble('main:\n LGUEST_INIT\n HCALL 2, msg, 1, 0\n.data\nmsg: .asciz "bye"\n')
FILES = 4  # 0: never initialized, 1: spins, 2: halts, 3: dies at once
TASKS = 3


@dataclass
class Target:
    file: LguestFile
    memory: GuestMemory
    pfn_limit: int
    pgdir: int


async def make_targets(dev: LguestDevice) -> list[Target]:
    targets = []
    for i, guest in enumerate([SPIN, SPIN, HALT, DIE]):
        memory, layout = load(guest, RAM)
        f = dev.open(memory)
        t = Target(f, memory, layout.pfn_limit, layout.pgdir)
        if i:
            await f.write(
                pack_words(
                    LHREQ_INITIALIZE, memory.address, layout.pfn_limit, layout.pgdir, IMAGE_BASE
                )
            )
        targets.append(t)
    return targets


# -- the random script ------------------------------------------------------------------

word = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 31, 32, 33, 0xFFFFFFFF, 1 << 32, U64]),
    st.integers(0, U64),
)
offsets = st.one_of(st.sampled_from([0, 0, 0, 1, -1, 2**31, 2**63]), st.integers(-(2**64), 2**64))
sizes = st.one_of(st.sampled_from([0, 1, 4, 7, 8, 64, 4096]), st.integers(-10, 1 << 20))
buffers = st.one_of(
    st.binary(max_size=32),
    st.binary(min_size=4096, max_size=8192),  # long garbage
    st.lists(word, max_size=8).map(lambda ws: pack_words(*ws)),
)


# LHREQ_INITIALIZE as drawn: "init", how to get base, pfn_limit, pgdir and start (relative
# to the target), how many words to drop, a random word for "any", and the CPU count.
InitSpec = tuple[str, str, str, str, str, int, int, str | int | None]
# An operation drawn from `op`: its kind, then arguments whose types depend on the kind.
Op = tuple[Any, ...]


@st.composite
def init_words(draw: st.DrawFn) -> InitSpec:
    """LHREQ_INITIALIZE with arguments that are mostly wrong, relative to the target."""
    return (
        "init",
        draw(st.sampled_from(["ok", "-page", "+1", "+page", "+size", "zero", "any"])),
        draw(st.sampled_from(["ok", "0", "+1", "huge", "any"])),
        draw(st.sampled_from(["ok", "0", "1", "limit", "any"])),
        draw(st.sampled_from(["ok", "0", "any"])),
        draw(st.integers(0, 3)),  # how many words to drop from the end
        draw(word),
        draw(st.sampled_from([None, None, 1, 2, 0, abi.MAX_CPUS + 1, "any"])),  # CPUs
    )


op = st.one_of(
    st.tuples(st.just("write"), buffers, offsets, st.booleans()),
    init_words(),
    st.tuples(st.just("irq"), word, offsets),
    st.tuples(st.just("break"), st.sampled_from([0, 1, 1, 2, U64]), offsets, st.booleans()),
    st.tuples(st.just("request"), word, st.lists(word, max_size=5), offsets, st.booleans()),
    st.tuples(st.just("read"), sizes, offsets, st.booleans()),
    st.tuples(st.just("cancel"), st.integers(0, 100)),
    st.tuples(st.just("close")),
    st.tuples(st.just("yield"), st.integers(1, 20)),
)
scripts = st.lists(
    st.lists(st.tuples(st.integers(0, FILES - 1), op), max_size=40),
    min_size=TASKS,
    max_size=TASKS,
)


def init_request(t: Target, spec: InitSpec) -> bytes:
    _, base_k, pfn_k, pgdir_k, start_k, drop, anyword, cpus = spec
    base = {
        "ok": t.memory.address,
        "-page": t.memory.address - abi.PAGE_SIZE,
        "+1": t.memory.address + 1,
        "+page": t.memory.address + abi.PAGE_SIZE,
        "+size": t.memory.address + t.memory.size,
        "zero": 0,
        "any": anyword,
    }[base_k]
    pfns = {"ok": t.pfn_limit, "0": 0, "+1": t.pfn_limit + 1, "huge": 1 << 40, "any": anyword}[
        pfn_k
    ]
    pgdir = {
        "ok": t.pgdir,
        "0": 0,
        "1": 1,
        "limit": t.pfn_limit * abi.PAGE_SIZE,
        "any": anyword,
    }[pgdir_k]
    start = {"ok": IMAGE_BASE, "0": 0, "any": anyword}[start_k]
    words = [LHREQ_INITIALIZE] + [w & U64 for w in (base, pfns, pgdir, start)]
    if cpus is not None and not drop:  # the optional fifth word (several CPUs)
        words.append((anyword if isinstance(cpus, str) else cpus) & U64)  # str: "any"
    return pack_words(*words[: len(words) - int(drop)])


def is_break_on(buf: bytes) -> bool:
    """Would this write be ``LHREQ_BREAK`` 1, which blocks until released?"""
    words = abi.unpack_words(buf)
    return len(words) >= 2 and words[0] == LHREQ_BREAK and words[1] != 0


class Fuzz:
    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self.inflight: list[asyncio.Task[None]] = []  # reads, breaks, closes: cancellable
        self.others: list[asyncio.Task[None]] = []  # must finish
        self.errnos: set[int] = set()
        self.cancelled = 0

    async def checked(self, call: Callable[[], Awaitable[object]]) -> None:
        try:
            result = await call()
        except OSError as e:
            assert e.errno in DOCUMENTED_ERRNOS, f"undocumented errno: {e!r}"
            self.errnos.add(e.errno)
            return
        assert isinstance(result, int | bytes), result

    async def step(self, index: int, spec: Op) -> None:
        t = self.targets[index]
        f = t.file
        kind = spec[0]
        blocking = False
        call: Callable[[], Awaitable[object]]
        if kind == "write":
            _, buf, offset, as_bytearray = spec
            call = partial(f.write, bytearray(buf) if as_bytearray else memoryview(buf), offset)
            blocking = is_break_on(bytes(buf))
        elif kind == "init":
            call = partial(f.write, init_request(t, spec))
        elif kind == "irq":
            call = partial(f.write, pack_words(LHREQ_IRQ, spec[1]), spec[2])
        elif kind == "break":
            _, value, offset, waker = spec
            writer = f.waker() if waker else f
            call = partial(writer.write, pack_words(LHREQ_BREAK, value), offset)
            blocking = value != 0
        elif kind == "request":
            _, req, args, offset, waker = spec
            writer = f.waker() if waker else f
            call = partial(writer.write, pack_words(req, *args), offset)
            blocking = is_break_on(pack_words(req, *args))
        elif kind == "read":
            _, size, offset, waker = spec
            call = partial((f.waker() if waker else f).read, size, offset)
            blocking = True
        elif kind == "cancel":
            live = [x for x in self.inflight if not x.done()]
            if live:
                live[spec[1] % len(live)].cancel()
                self.cancelled += 1
            return
        elif kind == "close":
            closing = asyncio.create_task(f.close())
            self.others.append(closing)
            self.inflight.append(closing)  # may be cancelled like a read
            await asyncio.sleep(0)
            return
        else:
            for _ in range(spec[1]):
                await asyncio.sleep(0)
            return
        task = asyncio.create_task(self.checked(call))
        if blocking:
            self.inflight.append(task)
            await asyncio.sleep(0)
        else:
            self.others.append(task)
            async with asyncio.timeout(OP_TIMEOUT):
                await asyncio.shield(task)

    async def worker(self, script: list[tuple[int, Op]]) -> None:
        for index, spec in script:
            await self.step(index, spec)


@FUZZ
@given(script=scripts)
async def test_random_requests_from_many_tasks(script: list[list[tuple[int, Op]]]) -> None:
    tasks_before = set(asyncio.all_tasks())
    threads_before = threading.enumerate()
    with LoopErrors() as loop_errors:
        dev = LguestDevice(workers=2)
        targets = await make_targets(dev)
        fuzz = Fuzz(targets)
        try:
            async with asyncio.timeout(OP_TIMEOUT * 3):
                await asyncio.gather(*(fuzz.worker(s) for s in script))
                lguest_threads(threads_before)  # only the device's threads so far
                for t in targets:
                    await t.file.close()  # releases every break, ends every read
                results = await asyncio.gather(*fuzz.inflight, *fuzz.others, return_exceptions=True)
        finally:
            await executor_idle(dev)
            await dev.aclose()
            for t in targets:
                t.memory.close()  # the device let go of every guest's memory
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
                raise r
        stray = {t for t in asyncio.all_tasks() if t not in tasks_before}
        assert not stray, f"stray tasks: {stray}"
        assert not lguest_threads(threads_before), "threads left after aclose()"
        gc.collect()  # "exception never retrieved" and friends are reported on collection
        await asyncio.sleep(0)
    assert loop_errors.calls == []
    assert not dev.files


async def test_every_request_with_wrong_arguments_gives_its_errno(dev: LguestDevice) -> None:
    """A fixed tour of the bad inputs the fuzzer draws from, with the exact errno."""
    memory, layout = load(SPIN, RAM)
    f = dev.open(memory)

    async def expect(code: int, coro: Awaitable[object]) -> None:
        try:
            await coro
        except OSError as e:
            assert e.errno == code, e
        else:
            raise AssertionError(f"expected errno {errno.errorcode[code]}")

    good = (memory.address, layout.pfn_limit, layout.pgdir, IMAGE_BASE)
    # before INITIALIZE: everything but INITIALIZE is EINVAL, a Waker may not INITIALIZE
    await expect(errno.EINVAL, f.read(8))
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_IRQ, 0)))
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_BREAK, 1)))
    await expect(errno.EPERM, f.waker().write(pack_words(LHREQ_INITIALIZE, *good)))
    await expect(errno.EINVAL, f.write(b""))
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_INITIALIZE, *good[:3])))
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_INITIALIZE, good[0] + 1, *good[1:])))
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_INITIALIZE, good[0], 0, *good[2:])))
    await expect(errno.EFAULT, f.write(pack_words(LHREQ_INITIALIZE, good[0], 1 << 40, *good[2:])))
    await expect(errno.EFAULT, f.write(pack_words(LHREQ_INITIALIZE, 0, *good[1:])))
    await f.write(pack_words(LHREQ_INITIALIZE, *good))
    await expect(errno.EBUSY, f.write(pack_words(LHREQ_INITIALIZE, *good)))
    for req in (abi.LHREQ_GETDMA, 4, 5, 6, 7, U64):
        await expect(errno.EINVAL, f.write(pack_words(req, 0, 0)))
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_IRQ)))
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_IRQ, abi.LGUEST_IRQS)))
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_IRQ, 0), 1))
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_IRQ, 0), -1))
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_BREAK)))
    await expect(errno.EINVAL, f.read(-1))
    await expect(errno.EINVAL, f.read(8, 1))
    await expect(errno.EPERM, f.waker().read(8))
    await expect(errno.EPERM, f.waker().write(pack_words(LHREQ_IRQ, 0)))
    await f.close()
    await expect(errno.EBADF, f.read(8))
    await expect(errno.EBADF, f.write(pack_words(LHREQ_IRQ, 0)))
    await expect(errno.EBADF, f.waker().write(pack_words(LHREQ_BREAK, 1)))
    memory.close()
