"""``/dev/lguest`` for asyncio: the device, its open files, and Waker handles.

The file's semantics are lguest's: the first write must be ``LHREQ_INITIALIZE``;
a read runs the guest until it notifies, dies, or a Waker breaks it out; later
writes send interrupts and breaks; close frees everything.  Errors are
``OSError`` with lguest's errno (so ``FileNotFoundError`` for ``ENOENT``,
``PermissionError`` for ``EPERM``, ``BlockingIOError`` for ``EAGAIN``...).

Ownership is a capability: any task holding the file may use it.  A
:class:`Waker` handle may only write ``LHREQ_BREAK``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import math
import os
import random
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from unicorn import UcError

from . import _slicing, _unicorn, codecache, run, timers
from .abi import (
    LGUEST_IRQS,
    LHREQ_BREAK,
    LHREQ_INITIALIZE,
    LHREQ_IRQ,
    MAX_CPUS,
    PAGE_SIZE,
    SWITCHER_ADDR,
    WORD,
    WORD_SIZE,
    pack_words,
    unpack_words,
)
from .cpu import DEFAULT_TCG_BUFFER, CpuStats, Hold, LgCpu, new_cpu, revive_cpu
from .engines import MODES, EnginePool, mode_from_env
from .execute import attach_interrupt_hook
from .guest import Lguest
from .hibernation import DEFAULT_HIBERNATE_AFTER, Dormitory
from .limits import UNLIMITED, Limits
from .memory import GuestMemory
from .pagetables import guest_pa
from .slicepool import DEFAULT_NICE as DEFAULT_WORKER_NICE
from .slicepool import SlicePool
from .state import MAX_CLOCK_NS, Exit, GuestState, StateError
from .virtual import Simulation

__all__ = ["PAUSE", "DebugPort", "Hold", "LguestDevice", "LguestFile", "Waker"]

PAUSE = Hold.PAUSE  # the hold reason of LguestFile.pause()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """``callback`` at ``loop``'s next turn, from any thread; nothing once it is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


async def _join(executor: SlicePool) -> None:
    """``executor.shutdown(wait=True)`` on a thread of its own, the event loop staying free."""
    loop = asyncio.get_running_loop()
    joined: asyncio.Future[None] = loop.create_future()

    def join() -> None:
        executor.shutdown(wait=True)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(_settle, joined)

    joiner = threading.Thread(target=join, name="lguest-cpu-join", daemon=True)
    joiner.start()
    await joined
    joiner.join()  # it has only its return left: no thread outlives aclose()


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class LguestDevice:
    """The device: owns the executor that runs guest slices and the Big Lguest lock.

    Create one per process or per test, inside a running event loop or not; use it
    from one event loop.  ``await dev.aclose()`` (or ``async with``) closes every
    file it opened and stops its threads.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        tcg_buffer: int = DEFAULT_TCG_BUFFER,
        max_guests: int | None = None,
        max_memory: int | None = None,
        limits: Limits = UNLIMITED,
        hibernate_after: float = DEFAULT_HIBERNATE_AFTER,
        worker_nice: int = DEFAULT_WORKER_NICE,
        idle_workers: bool = False,
        engines: str | None = None,
        max_engines: int | None = None,
        deterministic: bool = False,
        seed: int | None = None,
    ):
        """``max_guests``/``max_memory`` (bytes of guest memory) bound the live guests:
        an INITIALIZE past them fails with ``ENOMEM``.  ``limits`` are the per-guest
        defaults; :meth:`open` may override them.  ``workers`` is the number of
        executor threads (default: one per core), which run ``worker_nice`` steps below
        the event loop's priority (Linux: 0 to 19; 0 lets guests' emulation compete
        with the loop, and with other programs, as an equal; see
        :mod:`supervisor.slicepool`).  ``idle_workers`` runs them under ``SCHED_IDLE``
        instead (Linux): the event loop then always gets a core at once (a waking
        normal thread preempts them), which shortens the BREAK and IRQ latency tail
        (docs/performance.md), but the guests get almost no CPU while any other
        program is busy.  ``engines``: ``"pool"`` (the device owns a bounded
        :class:`~supervisor.engines.EnginePool`: a runnable CPU's emulator waits for it
        between its slices, a sleeping CPU's is a spare for anyone, and past
        ``max_engines`` emulators (default: what an eighth of the memory holds, at
        least one per worker, one for the event loop and a small reserve) runnable
        CPUs take each other's), ``"always"`` (the pool,
        and every take switches an emulator from another CPU: the exactness check) or
        ``"off"`` (each CPU makes and keeps its own; one that has slept in a halt, been
        held or waited for its Launcher for ``hibernate_after`` seconds gives it back
        until it is needed again: 0 at once, ``math.inf`` never; see
        :mod:`supervisor.hibernation`); default: the ``LGUEST_ENGINE_SWITCH``
        environment variable, else :data:`supervisor.engines.DEFAULT_MODE`.  With a
        pool ``hibernate_after`` has no effect: a CPU gives its engine back whenever it
        sleeps.  A ``deterministic`` device has no pool.

        ``deterministic``: run every guest of the device on a virtual clock and a
        schedule drawn from ``seed`` (an integer from 0 to 2**64-1; default: a random
        one, in :attr:`seed`), so that the same seed gives the same run
        (:mod:`supervisor.virtual`, docs/determinism.md).  Guests then run one
        quantum at a time on the event loop, every CPU counts its blocks, and nothing
        hibernates.  Off, none of this costs anything."""
        if seed is not None and not deterministic:
            raise ValueError("seed is for deterministic=True")
        self.virtual: Simulation | None = None
        if deterministic:
            chosen = random.SystemRandom().getrandbits(32) if seed is None else seed
            self.virtual = Simulation(chosen)
            hibernate_after = math.inf
        mode = mode_from_env() if engines is None else engines
        if mode not in MODES:
            raise ValueError(f"engines must be one of {', '.join(MODES)}, not {engines!r}")
        if deterministic:
            mode = "off"  # (nothing hibernates there: every CPU keeps its own engine)
        if not hibernate_after >= 0:
            raise ValueError(f"hibernate_after must be >= 0 seconds, not {hibernate_after!r}")
        if max_engines is not None and max_engines < 1:
            raise ValueError(f"max_engines must be at least 1, not {max_engines!r}")
        if not 0 <= worker_nice <= 19:
            raise ValueError(f"worker_nice must be 0 to 19, not {worker_nice!r}")
        self._workers = workers or os.cpu_count() or 1
        self._worker_nice = worker_nice
        self._idle_workers = idle_workers
        self._executor: SlicePool | None = None
        self._lock: asyncio.Lock | None = None
        self._files: set[LguestFile] = set()
        # Initialized guests not yet released, and their memory: what max_guests and
        # max_memory bound (kept as counts: admission must not cost O(guests)).
        self._live = 0
        self._used = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the one loop using the device
        self.tcg_buffer = tcg_buffer
        self.max_guests = max_guests
        self.max_memory = max_memory
        self.limits = limits
        self.hibernate_after = hibernate_after
        self.dormitory = Dormitory()
        self.engines = EnginePool.for_workers(tcg_buffer, self._workers, mode, max_engines)

    def _bind_loop(self) -> None:
        """The device serves one event loop at a time (its lock and events belong to it).

        Raises ``RuntimeError`` at the first call from a second loop while the first
        one is still open, instead of corrupting state across threads.
        """
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError(
                "this LguestDevice is in use by another event loop: use one device per loop"
            )
        if self._loop is not None:
            self._lock = None  # the closed loop's lock belongs to it
        self._loop = loop
        if self.engines is not None:  # engines made ahead, on this loop (engines.py)
            self.engines.wanted = functools.partial(_call_soon, loop, self._make_engines)

    def _make_engines(self) -> None:
        """Make one engine ahead for the pool, and again at the loop's next turn until it
        wants no more (:meth:`EnginePool.prepare`)."""
        if self.engines is not None and not self._closed and self.engines.prepare():
            asyncio.get_running_loop().call_soon(self._make_engines)

    @property
    def seed(self) -> int | None:
        """The seed of a deterministic device (None otherwise)."""
        return None if self.virtual is None else self.virtual.seed

    @property
    def lock(self) -> asyncio.Lock:
        """The Big Lguest lock: held for initialization, close and inter-guest work."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @property
    def executor(self) -> SlicePool:
        """The worker threads that run guest slices (created at first use)."""
        if self._executor is None:
            self._executor = SlicePool(
                self._workers, nice=self._worker_nice, idle=self._idle_workers
            )
        return self._executor

    def open(
        self,
        memory: GuestMemory,
        *,
        limits: Limits | None = None,
        state: GuestState | None = None,
        hibernate_after: float | None = None,
        tcg_buffer: int | None = None,
    ) -> LguestFile:
        """Open the device: one file is one (not yet initialized) guest in ``memory``.

        ``limits`` replaces the device's per-guest limits for this guest.  With
        ``state`` (from :meth:`LguestFile.state`, in this process or another), the
        file is a guest revived from it, already initialized: ``memory`` must be
        the same size as the original's and hold its bytes, and the first read
        runs it on exactly as the original would have gone on (its limits are the
        state's unless ``limits`` is given).  Raises ``OSError``: ``ENODEV`` once
        the device is closed; with ``state``, ``EINVAL`` for memory of another size
        (or a state this build cannot revive), ``ENOMEM`` past the device's limits.
        ``hibernate_after`` replaces the device's for this guest; ``tcg_buffer`` the size
        of its CPUs' translation buffers (a guest whose translated code outgrows the
        buffer has it all thrown away and translated again, over and over).
        """
        if self._closed:
            raise _error(errno.ENODEV)
        if hibernate_after is not None and not hibernate_after >= 0:
            raise ValueError(f"hibernate_after must be >= 0 seconds, not {hibernate_after!r}")
        if tcg_buffer is not None and not tcg_buffer > 0:
            raise ValueError(f"tcg_buffer must be > 0 bytes, not {tcg_buffer!r}")
        file = LguestFile(
            self,
            memory,
            self.limits if limits is None else limits,
            self.hibernate_after if hibernate_after is None else hibernate_after,
            self.tcg_buffer if tcg_buffer is None else tcg_buffer,
        )
        if state is not None:
            file._revive(state, limits)
        self._files.add(file)
        return file

    @property
    def files(self) -> frozenset[LguestFile]:
        """The files open right now."""
        return frozenset(self._files)

    async def aclose(self) -> None:
        """Close every open file and stop the executor.  Safe to call twice."""
        self._bind_loop()
        self._closed = True
        if self.virtual is not None:
            self.virtual.close()
        self.dormitory.close()
        for file in self._files:  # stop every CPU first, so closing them one by one is quick
            file._stop_cpus()
        for file in list(self._files):
            await file.close()
        if self.engines is not None:
            self.engines.close()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=False, cancel_futures=True)
            # Slices still running end at their next block (every CPU was kicked); wait for
            # their threads off the event loop, which stays free meanwhile.
            await _join(executor)

    async def __aenter__(self) -> LguestDevice:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _forget(self, file: LguestFile) -> None:
        self._files.discard(file)

    def _admit(self, size: int) -> bool:
        """True if one more guest of ``size`` bytes fits the device's limits."""
        if self.max_guests is not None and self._live >= self.max_guests:
            return False
        return self.max_memory is None or self._used + size <= self.max_memory

    def _count(self, size: int, guests: int) -> None:
        """A guest of ``size`` bytes was admitted (``guests`` 1) or released (-1)."""
        self._live += guests
        self._used += guests * size


def _hooks_for(sim: Simulation | None) -> Callable[[LgCpu, bool], None]:
    """What each Unicorn instance of a CPU gets installed: the interrupt hook, and in
    deterministic mode the block hook (blocks counted: virtual time) and a ``rdtsc``
    that reads the virtual clock (``hooked``: only the CPU's own part, cpu.InstallHooks)."""
    if sim is None:
        return attach_interrupt_hook

    def install(cpu: LgCpu, hooked: bool) -> None:
        attach_interrupt_hook(cpu, hooked)
        if hooked:
            return  # (the rest is the instance's: no other CPU's hooks are of this kind)
        _slicing.count_blocks(cpu.engine.uc, cpu.fuel)
        place = _unicorn.seat(cpu.engine.uc)  # (the instance's CPU: hooks are kept)
        _unicorn.hook_rdtsc(cpu.engine.uc, lambda: sim.tsc(place.cpu))

    return install


class LguestFile:
    """One open ``/dev/lguest``: one guest.  Get it from :meth:`LguestDevice.open`."""

    def __init__(
        self,
        device: LguestDevice,
        memory: GuestMemory,
        limits: Limits,
        hibernate_after: float,
        tcg_buffer: int,
    ) -> None:
        self._device = device
        self._memory = memory
        self._limits = limits
        self._hibernate_after = hibernate_after
        self._tcg_buffer = tcg_buffer
        self._lg: Lguest | None = None
        self._base = 0  # where the guest's window starts in memory (INITIALIZE's base)
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        # CPU id -> its read in flight: None, or the future close() waits for (set when
        # the read ends; made only when close() needs it, not for every read).
        self._running: dict[int, asyncio.Future[None] | None] = {}
        self._serve: Callable[[int], bool] | None = None  # serve_notifies()'s handler
        self._rest: Callable[[], None] | None = None  # rest_when_idle()'s restart

    # -- the device interface ----------------------------------------------------
    async def write(self, buf: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Write a request: ``LHREQ_*`` followed by its words; ``offset`` selects the CPU.

        Returns the number of bytes consumed (INITIALIZE) or 0 (IRQ, BREAK).
        """
        return await self._write(bytes(buf), offset, waker=False)

    def send_irq(self, irq: int, offset: int = 0) -> None:
        """Write ``LHREQ_IRQ irq`` to CPU ``offset`` without awaiting (that request never
        waits), for a caller that must not give the loop up in between; the same errors
        as :meth:`write`'s."""
        self._device._bind_loop()
        if self._closed:
            raise _error(errno.EBADF)
        cpu = self._cpu(offset)
        assert self._lg is not None
        if self._lg.dead:
            raise _error(errno.ENOENT)
        self._send_irq(cpu, (irq,))

    async def read(self, size: int, offset: int = 0) -> bytes:
        """Run CPU ``offset`` until the guest notifies; return the address as one word.

        For a dead guest, return the reason NUL-terminated and cut to ``size``.
        Raises ``EAGAIN`` when broken out by a Waker, ``ENOENT`` (``ERESTART``)
        on the read during which the guest dies, ``EBUSY`` if that CPU is
        already being read.  Cancelling the read stops the guest exactly where
        it was; the next read resumes it.  ``b""``: the CPU rests
        (:meth:`rest_when_idle`).
        """
        return await self._read(size, offset, waker=False)

    def serve_notifies(self, handler: Callable[[int], bool] | None) -> None:
        """Offer every notify to ``handler(address)`` inside the read, before the read
        returns it (None: stop).  A handler that serves the notify there and then, on
        the event loop and without awaiting, returns True: the read goes on running the
        guest, and the Launcher's task never sees the notify (as lguest's
        ``LHREQ_EVENTFD`` let the Host answer a notify without the Launcher's read
        returning).  False: the read returns the address as usual.  An exception from
        the handler ends the read with it, the notify not handed over."""
        self._serve = handler

    def rest_when_idle(self, restart: Callable[[], None] | None) -> None:
        """Let a read of a guest with one CPU end, returning ``b""``, instead of waiting
        while the CPU sleeps in a halt with nothing it can take and its registers packed
        (it has slept ``hibernation.PACK_AFTER``); None: reads wait (the default).

        Nothing of the guest changes while no read is in flight: ``restart()`` is called
        once, on the event loop, at the CPU's next wake (an irq, a timer, a hold, a
        Waker's break, close, a kill), and the reader reads again, which goes on exactly
        as the waiting read would have.  So a reader that lets it rest needs no task of its own
        while the guest sleeps.  Not in deterministic mode (reads wait there)."""
        self._rest = restart

    async def close(self) -> None:
        """Free the guest: stop its CPUs (never hangs), cancel timers, release memory.

        Reads, writes and waiting Wakers then fail with ``EBADF``.  The CPUs stop
        at once; the freeing runs to completion even if the caller is cancelled
        (which then still gets ``CancelledError``).  Closing twice is harmless:
        the second call waits for the first to finish.
        """
        self._device._bind_loop()
        if self._closing is None:
            self._closed = True
            self._stop_cpus()
            self._closing = asyncio.ensure_future(self._release())
        await asyncio.shield(self._closing)

    def _stop_cpus(self) -> None:
        """Every later pass of every CPU's run loop ends with EBADF; Wakers are released."""
        sim = self._device.virtual
        for cpu in self._lg.cpus if self._lg is not None else ():
            if sim is not None:
                sim.remove(cpu)
            cpu.run.closing = True
            timers.cancel(cpu)
            self._device.dormitory.awake(cpu)
            cpu.wake()
            cpu.run.break_released.set()

    async def _release(self) -> None:
        try:
            lg = self._lg
            if lg is None:
                return
            async with self._device.lock:
                for cpu_id in list(self._running):  # the reads in flight: wait for each
                    if cpu_id not in self._running:
                        continue  # it ended meanwhile
                    future = self._running[cpu_id]
                    if future is None:
                        future = self._running[cpu_id] = asyncio.get_running_loop().create_future()
                    await run.wait_quietly(future)
                for cpu in lg.cpus:  # a run a break left going on (woken: it ends at once)
                    if cpu.run.detached is not None:
                        await run.wait_quietly(cpu.run.detached)
                self._memory.unwatch(self._host_wrote)
                for cpu in lg.cpus:
                    cpu.close()
                lg.release_ram()
        finally:
            if self._lg is not None:
                self._device._count(self._lg.limit, -1)
            self._device._forget(self)

    def waker(self) -> Waker:
        """A handle that may only write ``LHREQ_BREAK`` (anything else: ``EPERM``)."""
        return Waker(self)

    async def __aenter__(self) -> LguestFile:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- inspection, beyond the lguest ABI ----------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def death(self) -> Exit | None:
        """How the guest died, or None while it lives (or before INITIALIZE)."""
        return None if self._lg is None else self._lg.dead

    @property
    def stats(self) -> CpuStats | None:
        """CPU 0's counters, or None before INITIALIZE."""
        return None if self._lg is None else self._lg.cpus[0].stats

    @property
    def cpu_stats(self) -> tuple[CpuStats, ...]:
        """Every CPU's counters, by CPU number (empty before INITIALIZE)."""
        return () if self._lg is None else tuple(c.stats for c in self._lg.cpus)

    @property
    def memory(self) -> GuestMemory:
        return self._memory

    @property
    def tcg_buffer(self) -> int:
        """The size of this guest's CPUs' translation buffers, in bytes."""
        return self._tcg_buffer

    def _engines(self) -> EnginePool | None:
        """Where this guest's CPUs take their engines: the device's pool if its engines
        have this guest's translation buffer, else none (each CPU keeps instances of its
        own, as with ``engines="off"``)."""
        pool = self._device.engines
        return pool if pool is not None and pool.tcg_buffer == self._tcg_buffer else None

    # -- the control surface, beyond the lguest ABI ---------------------------------------
    async def pause(self, cpu: int = 0) -> None:
        """Hold CPU ``cpu`` at an instruction boundary; return once it is stopped there.

        A read in flight stays pending: it neither returns nor loses its place,
        and :meth:`resume` lets it go on.  A CPU that is not running (no read, or
        sleeping in a halt) is held at once and will not run until resumed, even
        if an interrupt arrives.  Raises ``OSError``: ``EBADF`` once closed,
        ``EINVAL`` before INITIALIZE or for a CPU that does not exist, ``ENOENT``
        for a dead guest (also when it dies while being paused).
        """
        c = self._live_cpu(cpu)
        self._hold(c, PAUSE)
        await c.run.idle.wait()  # the slice in flight (if any) has ended or been withdrawn
        if c.lg.dead:
            raise _error(errno.ENOENT)

    def resume(self, cpu: int = 0) -> None:
        """Let a held CPU run on (whoever held it: a pause or a debugger's stop).

        No effect on a CPU that is not held.  ``EBADF`` once closed, ``EINVAL`` for
        a CPU that does not exist.
        """
        if self._closed:
            raise _error(errno.EBADF)
        c = self._cpu(cpu)
        if c.run.hold is not None:
            c.run.hold = None
            c.wake()

    def hold(self, cpu: int, reason: Hold) -> None:
        """Ask CPU ``cpu`` to stop at its next instruction boundary; return at once.

        Like :meth:`pause` without the wait (a debugger's stop): the run loop parks the
        CPU, tells its watcher (:meth:`watch`), and runs it again only after
        :meth:`resume`.  A CPU already held keeps its first reason.  ``EBADF`` once
        closed, ``EINVAL`` for a CPU that does not exist; no effect on a dead guest.
        """
        if self._closed:
            raise _error(errno.EBADF)
        c = self._cpu(cpu)
        if not c.lg.dead:
            self._hold(c, reason)

    @staticmethod
    def _hold(c: LgCpu, reason: Hold) -> None:
        if c.run.hold is None:
            c.run.hold = reason
        c.wake()

    def watch(self, cpu: int, on_hold: Callable[[], None] | None) -> None:
        """Call ``on_hold()`` (on the event loop) each time CPU ``cpu`` parks held and
        when its run loop finds the guest dead; None: nobody.  One watcher per CPU (a
        debugger); a new one replaces the old.  ``EBADF`` once closed, ``EINVAL`` for a
        CPU that does not exist."""
        if self._closed:
            raise _error(errno.EBADF)
        self._cpu(cpu).debug.on_hold = on_hold

    def kill(self, reason: str) -> None:
        """End the guest now: holds are released and every CPU's read ends with
        ``ENOENT``, the next one returning ``reason`` (the first end counts).  No
        effect once closed or before INITIALIZE."""
        lg = self._lg
        if self._closed or lg is None:
            return
        lg.kill(reason)
        for c in lg.cpus:
            c.run.hold = None
            c.wake()

    def paused(self, cpu: int = 0) -> bool:
        """True while CPU ``cpu`` is held and no slice of it runs."""
        c = self._cpu(cpu)
        return c.run.hold is not None and not c.running

    def hold_reason(self, cpu: int = 0) -> Hold | None:
        """Why CPU ``cpu`` is held (:class:`Hold`, a ``str``: ``"pause"``...), or None."""
        return self._cpu(cpu).run.hold

    def asleep(self, cpu: int = 0) -> bool:
        """True while CPU ``cpu`` is halted, waiting for an interrupt, and no slice of it
        is queued or runs: it touches no guest memory until an interrupt wakes it."""
        c = self._cpu(cpu)
        return c.halted and not c.running

    def reading(self, cpu: int = 0) -> bool:
        """True while a read of CPU ``cpu`` is in flight (paused or not)."""
        return self._cpu(cpu).run.reading

    @property
    def cpu_count(self) -> int:
        """How many CPUs the guest has (0 before INITIALIZE)."""
        return 0 if self._lg is None else len(self._lg.cpus)

    def cpu(self, cpu: int = 0) -> LgCpu:
        """The CPU itself, for white-box tests and benchmarks that follow its threading
        contract.  Tools use :meth:`debug_port` and the control requests (:meth:`hold`,
        :meth:`resume`, :meth:`watch`, :meth:`kill`), never the CPU's fields.  ``EINVAL``
        before INITIALIZE or for no such CPU."""
        if self._closed:
            raise _error(errno.EBADF)
        return self._cpu(cpu)

    def debug_port(self, cpu: int = 0) -> DebugPort:
        """What a debugger may read and change of CPU ``cpu`` (see :class:`DebugPort`).
        ``EBADF`` once closed, ``EINVAL`` before INITIALIZE or for no such CPU."""
        if self._closed:
            raise _error(errno.EBADF)
        return DebugPort(self._cpu(cpu))

    def state(self) -> GuestState:
        """The guest's whole state except its memory, as one immutable value.

        Only while every CPU is paused or idle (no read in flight): otherwise
        ``EBUSY``.  ``EBADF`` once closed, ``EINVAL`` before INITIALIZE.  A dead
        guest's state holds its death.
        """
        if self._closed:
            raise _error(errno.EBADF)
        lg = self._lg
        if lg is None:
            raise _error(errno.EINVAL)
        for c in lg.cpus:
            if c.running or (c.run.reading and c.run.hold is None):
                raise _error(errno.EBUSY)
        sim = lg.virtual
        return GuestState(
            memory_size=self._memory.size,
            base=self._base,
            cpus=tuple(c.capture(timers.remaining(c)) for c in lg.cpus),
            unicorn=_unicorn.VERSION,
            # (a restored clock may have started near the top of what a state holds:
            # the snapshot still succeeds, at that top)
            clock_ns=None if sim is None else min(sim.guest_ns(lg.cpus[0]), MAX_CLOCK_NS),
            **lg.saved_values(),
        )

    def _live_cpu(self, cpu: int) -> LgCpu:
        if self._closed:
            raise _error(errno.EBADF)
        c = self._cpu(cpu)
        if c.lg.dead:
            raise _error(errno.ENOENT)
        return c

    def _revive(self, state: GuestState, limits: Limits | None) -> None:
        """Become the guest ``state`` describes (from :meth:`LguestDevice.open`)."""
        mem = self._memory
        if mem.closed or mem.size != state.memory_size:
            raise _error(errno.EINVAL)
        if not self._device._admit(state.limit):
            raise _error(errno.ENOMEM)
        first = state.base
        lg = Lguest(
            ram=mem.view[first : first + state.limit], pfn_limit=state.pfn_limit, memory=mem
        )
        lg.restore(state)
        lg.virtual = sim = self._device.virtual
        try:
            for st in state.cpus:
                cpu = revive_cpu(
                    lg, st, mem.address + first, self._tcg_buffer, _hooks_for(sim),
                    self._hibernate_after, self._engines(),
                )  # fmt: skip
                if limits is not None:
                    cpu.limits = limits
                lg.cpus.append(cpu)
                timers.restore(cpu, st.timer_ns)
                if sim is None:
                    self._device.dormitory.drowsy(cpu)  # nobody reads it yet
        except Exception as exc:  # a context this Unicorn cannot load, no memory, ...
            for cpu in lg.cpus:
                timers.cancel(cpu)
                cpu.close()
            lg.ram.release()
            reason = str(exc) if isinstance(exc, StateError) else f"{type(exc).__name__}: {exc}"
            raise OSError(errno.EINVAL, f"cannot revive the guest: {reason}") from None
        self._lg = lg
        self._base = first
        self._device._count(state.limit, 1)
        mem.watch(self._host_wrote)
        if sim is not None:
            for cpu in lg.cpus:
                sim.add(cpu, state.clock_ns)

    # -- request handling ------------------------------------------------------
    async def _write(self, buf: bytes, offset: int, *, waker: bool) -> int:
        self._device._bind_loop()
        if self._closed:
            raise _error(errno.EBADF)
        if len(buf) < WORD_SIZE:
            raise _error(errno.EINVAL)
        words = unpack_words(buf)
        req, args = words[0], words[1:]
        if req == LHREQ_INITIALIZE:
            if waker:
                raise _error(errno.EPERM)
            return await self._initialize(args)
        cpu = self._cpu(offset)
        assert self._lg is not None
        if self._lg.dead:
            raise _error(errno.ENOENT)
        if waker and req != LHREQ_BREAK:
            raise _error(errno.EPERM)
        if req == LHREQ_IRQ:
            return self._send_irq(cpu, args)
        if req == LHREQ_BREAK:
            return await self._break(cpu, args)
        raise _error(errno.EINVAL)

    def _cpu(self, offset: int) -> LgCpu:
        lg = self._lg
        if lg is None or not 0 <= offset < len(lg.cpus):
            raise _error(errno.EINVAL)
        return lg.cpus[offset]

    async def _initialize(self, args: tuple[int, ...]) -> int:
        device = self._device
        async with device.lock:
            if self._closed:
                raise _error(errno.EBADF)
            if self._lg is not None:
                raise _error(errno.EBUSY)
            if len(args) < 4:
                raise _error(errno.EINVAL)
            base, pfn_limit, pgdir, start = args[:4]
            ncpus = args[4] if len(args) > 4 else 1  # an extension: lguest had one CPU
            mem = self._memory
            if base % PAGE_SIZE or pgdir % PAGE_SIZE or pfn_limit == 0:
                raise _error(errno.EINVAL)
            if not 1 <= ncpus <= MAX_CPUS:
                raise _error(errno.EINVAL)
            if start >> 32:  # the entry point is a 32-bit guest address (eip)
                raise _error(errno.EINVAL)
            limit = pfn_limit * PAGE_SIZE
            first = base - mem.address
            if mem.closed or first < 0 or first + limit > mem.size:
                raise _error(errno.EFAULT)
            if pgdir + PAGE_SIZE > limit:
                raise _error(errno.EFAULT)
            if limit > SWITCHER_ADDR:  # guest-physical memory ends below the Host's pages
                raise _error(errno.EINVAL)
            if not device._admit(limit):
                raise _error(errno.ENOMEM)
            lg = Lguest(
                ram=mem.view[first : first + limit], pfn_limit=pfn_limit, pgdir=pgdir, memory=mem
            )
            lg.virtual = sim = device.virtual
            try:
                for n in range(ncpus):
                    cpu = new_cpu(
                        lg, n, base, start, pgdir, self._tcg_buffer, self._limits,
                        _hooks_for(sim), self._hibernate_after, self._engines(),
                    )  # fmt: skip
                    lg.cpus.append(cpu)
                    if n:  # offline until CPU 0 starts it: its emulator waits in the freezer
                        cpu.online = False
                        cpu.hibernate()
            except Exception:
                for cpu in lg.cpus:
                    cpu.close()
                lg.ram.release()
                raise _error(errno.ENOMEM) from None
            self._lg = lg
            self._base = first
            device._count(limit, 1)
            mem.watch(self._host_wrote)
            if sim is not None:
                for cpu in lg.cpus:
                    sim.add(cpu)
        return 4 * WORD_SIZE

    def rank(self, rank: int) -> None:
        """Deterministic mode: the place of this guest's CPUs in the order the seed
        chooses from (e.g. its launch order), which the order guests happen to
        initialize in must not decide.  No effect otherwise."""
        sim = self._device.virtual
        if sim is not None and self._lg is not None:
            sim.rank(self._lg.cpus, rank)

    def _host_wrote(self, addr: int, n: int) -> None:
        """The Launcher wrote its memory: the guest must not run stale code from there."""
        lg = self._lg
        if lg is None or lg.dead or self._closed:
            return
        start, end = max(addr - self._base, 0), min(addr + n - self._base, lg.pfn_limit * PAGE_SIZE)
        if start < end:
            for cpu in lg.cpus:
                codecache.note(cpu, start, end)

    def _send_irq(self, cpu: LgCpu, args: tuple[int, ...]) -> int:
        if not args:
            raise _error(errno.EINVAL)
        irq = args[0]
        if irq >= LGUEST_IRQS:
            raise _error(errno.EINVAL)
        cpu.raise_irq(irq)
        return 0

    async def _break(self, cpu: LgCpu, args: tuple[int, ...]) -> int:
        if not args:
            raise _error(errno.EINVAL)
        if not args[0]:
            cpu.run.break_out = False
            cpu.run.break_released.set()
            return 0
        cpu.run.break_released.clear()
        run.break_out(cpu)
        await cpu.run.break_released.wait()
        if self._closed:
            raise _error(errno.EBADF)
        return 0

    async def _read(self, size: int, offset: int, *, waker: bool) -> bytes:
        self._device._bind_loop()
        if self._closed:
            raise _error(errno.EBADF)
        if size < 0:
            raise _error(errno.EINVAL)
        cpu = self._cpu(offset)
        lg = cpu.lg
        if waker:
            raise _error(errno.EPERM)
        if lg.dead:
            if lg.dead.errno is not None:
                raise _error(lg.dead.errno)
            return (lg.dead.reason.encode() + b"\0")[:size]
        if cpu.run.reading:
            raise _error(errno.EBUSY)
        cpu.pending_notify = 0
        cpu.run.reading = True
        cpu.run.resting = False
        cpu.run.rest = self._rest
        self._running[cpu.id] = None  # (close() puts a future here to wait for the read)
        # (Deterministic mode: nothing hibernates, and nothing waits for wall time.)
        dormitory = self._device.dormitory if lg.virtual is None else None
        if dormitory is not None:
            dormitory.awake(cpu)
        try:
            address = await run.run_guest(cpu, self._device.executor, dormitory, self._serve)
            if address == run.RESTING:
                cpu.run.resting = True  # (nothing runs before the caller sees b"")
                return b""
        finally:
            cpu.run.reading = False
            finished = self._running.pop(cpu.id)
            if not self._running:
                self._running.clear()  # (frees its table: a resting guest keeps none)
            if finished is not None:
                finished.set_result(None)  # close() waits for the read, not the reader's task
            if not cpu.run.closing and dormitory is not None:
                dormitory.drowsy(cpu)  # waiting for the Launcher now
        return WORD.pack(address)  # one word: pack_words without its generality


class DebugPort:
    """One CPU as an in-process debugger sees it (:mod:`supervisor.debug`).

    Reads of its registers and memory, code hooks, and guest-virtual translation;
    no control state (the file's requests hold, release and watch the CPU).  Registers,
    memory and hooks only while the CPU is held and no slice runs (the threading
    contract: the event loop owns the CPU then); a register read of a hibernated CPU
    takes it a new emulator.  A hook's callback runs on the slice's thread and stops
    there with :meth:`stop_here`.
    """

    __slots__ = ("_cpu",)

    def __init__(self, cpu: LgCpu) -> None:
        self._cpu = cpu

    @property
    def index(self) -> int:
        return self._cpu.id

    @property
    def online(self) -> bool:
        return self._cpu.online

    @property
    def halted(self) -> bool:
        return self._cpu.halted

    @property
    def closed(self) -> bool:
        return self._cpu.closed

    @property
    def death(self) -> Exit | None:
        return self._cpu.lg.dead

    @property
    def interrupts(self) -> int:
        """Interrupts and traps delivered so far (the slice's thread may read it)."""
        return self._cpu.stats.interrupts

    @property
    def eip(self) -> int:
        return self._cpu.eip

    def reg(self, reg: int) -> int:
        """A register (a ``unicorn.x86_const`` number)."""
        value: int = self._cpu.emulator.reg_read(reg)
        return value

    def set_reg(self, reg: int, value: int) -> None:
        """Change a register; ``ValueError`` if Unicorn refuses the value."""
        try:
            self._cpu.emulator.reg_write(reg, value)
        except UcError as exc:
            raise ValueError(str(exc)) from None

    def add_code_hook(self, callback: Callable[..., None], begin: int = 1, end: int = 0) -> Any:
        """A code hook (:meth:`LgCpu.add_code_hook`); remove it with :meth:`remove_hook`."""
        return self._cpu.add_code_hook(callback, begin, end)

    def remove_hook(self, hook: Any) -> None:
        self._cpu.remove_hook(hook)

    def stop_here(self, uc: Any, reason: Hold) -> None:
        """From a code hook (the slice's thread): stop before this instruction; the run
        loop holds the CPU for ``reason``."""
        self._cpu.trap.debug = reason
        uc.emu_stop()

    def physical(self, address: int, size: int) -> int | None:
        """The guest-physical address of guest-virtual ``address`` through the CPU's page
        tables, if it and the ``size`` bytes from it (on its page) are guest memory."""
        pa = guest_pa(self._cpu, address & 0xFFFFFFFF)
        if pa is None or not self._cpu.lg.address_ok(pa, size):
            return None
        return pa

    def read(self, pa: int, size: int) -> bytes:
        """Guest-physical bytes (checked by :meth:`physical`)."""
        return bytes(self._cpu.lg.ram[pa : pa + size])

    def write(self, pa: int, data: bytes) -> None:
        """Store guest-physical bytes (checked by :meth:`physical`; read-only pages too)."""
        self._cpu.lg.ram[pa : pa + len(data)] = data

    def flush_code(self) -> None:
        """Forget every translated block: code is translated afresh from memory."""
        self._cpu.flush_code()


class Waker:
    """What a Waker coroutine holds: it may write ``LHREQ_BREAK`` and nothing else."""

    def __init__(self, file: LguestFile) -> None:
        self._file = file

    async def write(self, buf: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Like :meth:`LguestFile.write`; any request but ``LHREQ_BREAK`` raises ``EPERM``."""
        return await self._file._write(bytes(buf), offset, waker=True)

    async def read(self, size: int, offset: int = 0) -> bytes:
        """Always fails: ``EINVAL`` before INITIALIZE or for a bad CPU, else ``EPERM``."""
        return await self._file._read(size, offset, waker=True)

    async def brk(self, on: bool, cpu: int = 0) -> int:
        """Shorthand for writing ``LHREQ_BREAK`` with 1 or 0."""
        return await self.write(pack_words(LHREQ_BREAK, 1 if on else 0), cpu)
