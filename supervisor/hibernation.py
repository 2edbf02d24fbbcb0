"""Hibernation: a CPU that does not need its emulator gives it back.

With the device's engine pool (:mod:`supervisor.engines`, ``engines="pool"``) a CPU
gives its engine back whenever it waits, so ``hibernate_after`` is 0 for every CPU and the
dormitory only does the bookkeeping below (counting, and what wakes cost); what follows
about delays, freed instances, trims and instances made ahead is the ``engines="off"``
mode's, where each CPU has an instance of its own.

A CPU is *drowsy* while it sleeps in a halt, is held (paused, stopped by a
debugger), or waits for its Launcher (no read in flight).  A CPU drowsy for
``hibernate_after`` seconds hibernates (:meth:`LgCpu.hibernate`): its Unicorn
instance and translation buffer (about 0.9 MiB) are freed and its registers
kept as bytes; everything else the guest has (memory, the Host's state, its
timer, the Launcher's objects) stays as it is.  The first thing that needs the
emulator again, whether the run loop about to run it or a debugger reading a
register, takes a new one (:meth:`LgCpu.thaw`); the guest cannot tell.

One :class:`Dormitory` per device does the bookkeeping with at most one timer
for all its CPUs, armed only while some CPU is drowsy and not yet hibernated:
a hibernated guest with no timer of its own costs no event-loop work at all.

Unicorn frees an instance's memory to the C allocator, which keeps most of it
resident until a ``malloc_trim``.  Kept memory is not lost: the next instance a thaw (or a new
guest) takes reuses it.  So memory goes back to the system only when
hibernations have given back ``TRIM_SLACK`` more instances than thaws took
since the last time (:attr:`LgCpu.given_back`, process-wide): a burst of
hibernations is trimmed once, ``TRIM_DELAY`` after it; guests that wake and
sleep in turn never are.  ``malloc_trim`` walks the whole heap, milliseconds
whatever it finds to give back, so a trim after each hibernation would be the
wake latency's tail.

Most of a wake's own cost is Unicorn building a new emulated machine, so a wake
also asks for one to be made ahead (:func:`supervisor._unicorn.prepare`,
``REFILL_DELAY`` later, one per loop turn, at most ``_unicorn.BLANKS`` waiting,
about 0.8 MiB each): the next wakes take a ready one.

``hibernate_after`` 0 hibernates at the moment a CPU becomes drowsy; infinity
never.  Event loop only.

Engines at a notify: a pool's CPU whose read ended (its Launcher's turn, a notify to
serve) keeps its engine until the loop's next turn, or until another CPU's read ends,
whichever comes first, and not at all if it reads again first: a Launcher that serves
the notify without waiting reads again at once, and its CPU runs on without giving its
engine back and taking it again.  One CPU keeps one that way at a time, so the event
loop holds at most one engine besides the one it runs on.

Packed registers: a CPU that has kept its registers as bytes (hibernated, or with a
pool, its engine given back) for ``PACK_AFTER`` while no slice of it was queued has
them packed (:meth:`LgCpu.pack_registers`, 5.4 KiB down to about 0.2 KiB): an idle
guest's largest Python object.  The bytes freed are holes in the C heap between live
objects, so ``PACK_TRIM`` packs more than unpacks (:attr:`LgCpu.unpacked`, process-wide
like the heap) since the last ``malloc_trim`` bring one, at most one per
``PACK_TRIM_EVERY``: a wake's bytes fill the holes its pack left, so guests that wake
and sleep in turn bring none (a trim walks the whole heap, milliseconds with 100,000
guests, which a wake on the loop meanwhile waits for).  The delay keeps the cost
(about 15 us, and 5 us to unpack at the next switch or wake) off guests that sleep
briefly.  One FIFO queue per
device, one entry per CPU (``Engine.pack_queued``) and at most one timer: each entry
remembers which bytes it was queued for, so a CPU that ran meanwhile is queued again
rather than packed early.

Short sleeps: a CPU whose clock event is due within ``PACK_SOON`` times ``PACK_AFTER``
when its pack comes due is not packed then (``Dormitory.left_unpacked`` counts these) but
queued again, so that it packs if it still sleeps then (its clock event cancelled, or its
interrupt blocked).  Its wake would unpack what the pack had just packed: a ticker that
sleeps a second between ticks would spend a pack and an unpack of its registers and
memory (about 0.4 ms of the loop's CPU) on every tick to hold about 30 KiB less for half
a second.  A guest that sleeps longer, or waits for an interrupt with no clock event,
packs as before.

Packed memory: when the last of a guest's CPUs has its registers packed, nothing but the
Host can touch the guest's memory, so it is packed too (:meth:`Lguest.pack_memory`,
:meth:`GuestMemory.pack`): the bytes that differ from its template, as runs deflated
(:mod:`supervisor.delta`; guests that wrote the same bytes share one copy), and its RAM
and its template's mapping given back to the host kernel.  The first access puts every
byte back: ``Lguest.ram`` (every Host access), :attr:`GuestMemory.view` (the Launcher,
snapshots) or an engine taken for one of its CPUs (``dormitory.memory_packs`` counts the packs).

A wake is paid by the guest that wakes.  Taking a new emulator, running the
guest on it until it sleeps again (its code translated afresh), giving it back
and making instances ahead happen on the event loop, whose thread the kernel
prefers to the niced workers (:mod:`supervisor.slicepool`) about nine to one: a
guest that wakes and sleeps as fast as it can would otherwise take the cores
from a neighbour computing on the workers.  So the dormitory charges the time
of each of those steps to the CPU it was done for, and while a guest computes
on the workers (:attr:`SlicePool.computing`) the CPUs' charges may together use
at most ``WAKE_SHARE`` of a core, in equal shares: a CPU that owes more than
``WAKE_GRACE`` runs again only once its share has paid the debt, or at once for
anything but a plain wake (a close, a hold, a break).  A CPU that wakes now and
then never owes that much; while no guest computes no wake waits, and what a
CPU spent while nobody else needed the cores is not owed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import heapq
import itertools
import math
import time
import weakref
from collections import deque
from collections.abc import Callable

from . import _unicorn
from .cpu import LgCpu
from .slicepool import SlicePool

DEFAULT_HIBERNATE_AFTER = 1.0  # seconds: see docs/performance.md, "Hibernation"
NEVER = math.inf
TRIM_DELAY = 0.05  # seconds: hibernations in a burst share one malloc_trim
# Instances given back and not taken again before memory is returned (about 0.5 MiB each).
TRIM_SLACK = 32
REFILL_DELAY = 0.01  # seconds after a wake starts: instances are made ahead off its path
# While a guest computes: what all CPUs' wake costs together may use of one core, and
# what a CPU may owe before it waits (more than one wake costs).
WAKE_SHARE = 0.1
WAKE_GRACE = 0.005  # seconds of loop time
# Seconds a CPU keeps its registers as bytes (hibernated, or its engine back in a pool)
# before they are packed: 5.4 KiB down to about 0.2 KiB, for about 15 us to pack and
# 10 us to unpack at its next wake (module docstring, "Packed registers").
PACK_AFTER = 0.5
# A CPU whose clock event is due within this many PACK_AFTERs when its registers would
# be packed is left as it is (module docstring, "Short sleeps"): it wakes before packing
# its memory and registers (about 0.2 ms of the loop's CPU, and as much again to unpack
# them) has paid for itself, as a ticker's or a poller's sleep of a second does.
PACK_SOON = 2
# Packs (each frees 5.4 KiB of the C heap, in holes between live objects) that make a
# malloc_trim worth its walk of the heap; and the least time between two such trims.
PACK_TRIM = 256
PACK_TRIM_EVERY = 1.0  # seconds: at most about 1 % of a core


def _wakes_soon(cpu: LgCpu, due: float) -> bool:
    """Whether ``cpu``'s clock event (the loop's clock; not a virtual one) is due within
    ``PACK_SOON`` times ``PACK_AFTER`` of ``due``, when its pack came due (not when the
    loop got to it: a late loop changes nothing)."""
    clock = cpu.clock
    return (
        clock.event is not None
        and cpu.lg.virtual is None
        and clock.due - due < PACK_SOON * PACK_AFTER
    )


def _malloc_trim() -> Callable[[], None] | None:
    """glibc's ``malloc_trim(0)``, or None where there is no such call (musl, macOS)."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is None:
        return None
    trim.argtypes = (ctypes.c_size_t,)

    def give_back() -> None:
        trim(0)

    return give_back


_GIVE_BACK = _malloc_trim()
# LgCpu.given_back at its lowest since memory was last given back (process-wide, like
# the C heap): what hibernations gave back above it is kept memory nothing reused.
_low = 0


class Dormitory:
    """Which CPUs are drowsy since when, and the one timer that hibernates them.

    Costs O(log n) per drowsy CPU and per hibernation, however many CPUs are drowsy.
    """

    __slots__ = (
        "_debts",
        "_drowsy",
        "_last_trim",
        "_lazy",
        "_lazy_due",
        "_pack_timer",
        "_packed",
        "_packing",
        "_queue",
        "_refill",
        "_refill_for",
        "_seq",
        "_timer",
        "_timer_due",
        "_trim",
        "_unpacked",
        "deferred",
        "lazy_kept",
        "left_unpacked",
        "memory_packs",
        "packs",
        "trims",
    )

    def __init__(self) -> None:
        self._drowsy: dict[LgCpu, float] = {}  # CPU -> when it must hibernate (loop time)
        # (due, sequence, CPU), a heap (weak: it keeps no closed CPU alive).  Invariant: a
        # drowsy CPU has an entry due no later than its time in _drowsy; one entry per CPU
        # is enough (Engine.dormitory_due), so a CPU that wakes and dozes off again at every
        # read pushes nothing: the sweep moves its entry on to its latest time instead.
        self._queue: list[tuple[float, int, weakref.ref[LgCpu]]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf
        self._trim: asyncio.TimerHandle | None = None  # a malloc_trim to come
        self._refill: asyncio.Handle | None = None  # an instance to make ahead
        self._refill_for: weakref.ref[LgCpu] | None = None  # whose wake the refill pays
        # CPU -> [seconds of loop time it owes for its wakes, loop time of that figure,
        # its run time when it last thawed (-1: none since it last went to sleep)]
        self._debts: weakref.WeakKeyDictionary[LgCpu, list[float]] = weakref.WeakKeyDictionary()
        # (due, CPU, id of its kept registers then), due times in order: CPUs whose
        # registers are to be packed (one entry per CPU: Engine.pack_queued).
        self._packing: deque[tuple[float, weakref.ref[LgCpu], int]] = deque()
        self._pack_timer: asyncio.TimerHandle | None = None
        self.packs = 0  # CPUs' registers packed
        self.memory_packs = 0  # guests' memories packed (their CPUs' registers all were)
        self.left_unpacked = 0  # packs due that a clock event due soon put off
        self._packed = 0  # packs since memory was last given back
        self._unpacked = LgCpu.unpacked  # LgCpu.unpacked when memory was last given back
        self._last_trim = -math.inf  # loop time of the last malloc_trim
        self.trims = 0  # times memory was given back to the system
        self.deferred = 0  # wakes put off until the CPU's share had paid for its earlier ones
        # A pool's CPU whose read ended keeps its engine until the loop's next turn (one
        # CPU at a time: "Engines at a notify" in the module docstring), and that turn.
        self._lazy: LgCpu | None = None
        self._lazy_due: asyncio.Handle | None = None
        self.lazy_kept = 0  # reads ended whose engine waited for the loop's next turn

    def __len__(self) -> int:
        """How many CPUs are drowsy and not yet hibernated."""
        return len(self._drowsy)

    @property
    def entries(self) -> int:
        """How many entries its queue holds, stale ones included: at most about one per
        CPU however often the CPUs doze off and wake."""
        return len(self._queue)

    @property
    def pack_entries(self) -> int:
        """How many CPUs wait for their registers to be packed: at most one entry per CPU
        however often it sleeps and wakes."""
        return len(self._packing)

    @property
    def armed(self) -> bool:
        """True while a timer is armed (some CPU is drowsy, memory is to be given back, or
        registers to be packed)."""
        return (
            self._timer is not None
            or self._trim is not None
            or self._refill is not None
            or self._pack_timer is not None
            or self._lazy_due is not None
        )

    def drowsy(self, cpu: LgCpu) -> None:
        """``cpu`` stopped needing its emulator: hibernate it after its ``hibernate_after``.

        What it ran since it last thawed (a new emulator translates its code afresh) is
        charged to it."""
        engine = cpu.engine
        entry = self._debts.get(cpu) if engine.pool is None else None
        if entry is not None and entry[2] >= 0:
            self.charge(cpu, cpu.stats.run_time - entry[2])
            entry[2] = -1.0
        after = engine.hibernate_after
        if after == NEVER or engine.frozen is not None or engine.released:  # (hibernated, closed)
            self._pack_later(cpu)
            return
        if after <= 0:
            if engine.pool is not None and not engine.pool.always and not cpu.run.reading:
                self._hibernate_soon(cpu)
            else:
                self._hibernate(cpu)
            return
        if cpu in self._drowsy:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + after
        self._drowsy[cpu] = due
        if cpu.engine.dormitory_due <= due:
            return  # its entry in the queue comes first; the sweep moves it on to `due`
        self._push(cpu, due)
        if due < self._timer_due:
            self._arm(loop, due)

    def _hibernate_soon(self, cpu: LgCpu) -> None:
        """A pool's CPU whose read ended (its Launcher's turn now): give its engine back
        at the loop's next turn, or when another CPU's read ends first, whichever comes
        first; not at all if its next read has begun by then (that read's run loop gives
        it back before it waits for anything).  One such CPU at a time, so the event
        loop holds at most one engine more than it runs on."""
        self.lazy_kept += 1
        lazy = self._lazy
        if lazy is not cpu:
            if lazy is not None:
                self._lazy = None
                self._hibernate_lazy(lazy)
            self._lazy = cpu
        if self._lazy_due is None:
            self._lazy_due = asyncio.get_running_loop().call_soon(self._lazy_turn)

    def _lazy_turn(self) -> None:
        self._lazy_due = None
        lazy, self._lazy = self._lazy, None
        if lazy is not None:
            self._hibernate_lazy(lazy)

    def _hibernate_lazy(self, cpu: LgCpu) -> None:
        """Hibernate a CPU :meth:`_hibernate_soon` kept, unless it reads again (its run
        loop owns the engine then).  A closing CPU too: its file may close it only after
        other tasks' turns."""
        if not cpu.run.reading:
            self._hibernate(cpu)

    def _push(self, cpu: LgCpu, due: float) -> None:
        cpu.engine.dormitory_due = due
        heapq.heappush(self._queue, (due, next(self._seq), weakref.ref(cpu)))

    def awake(self, cpu: LgCpu) -> None:
        """``cpu`` is about to need its emulator (or is gone): forget it."""
        self._drowsy.pop(cpu, None)
        if cpu.run.closing:
            self._debts.pop(cpu, None)
        hibernated = cpu.engine.frozen is not None
        if hibernated and not cpu.run.closing and self._refill is None and cpu.engine.pool is None:
            loop = asyncio.get_running_loop()
            self._refill = loop.call_later(REFILL_DELAY, self._make_ahead, cpu.engine.tcg_buffer)
            self._refill_for = weakref.ref(cpu)

    def _make_ahead(self, tcg_buffer: int) -> None:
        """Make one instance ahead of need, and again at the next loop turn until enough wait."""
        self._refill = None
        started = time.thread_time()
        more = _unicorn.prepare(tcg_buffer) and _unicorn.blank_count() < _unicorn.BLANKS
        waker = self._refill_for() if self._refill_for is not None else None
        if waker is not None:
            self.charge(waker, time.thread_time() - started)
        if more:
            self._refill = asyncio.get_running_loop().call_soon(self._make_ahead, tcg_buffer)

    # -- what wakes cost ---------------------------------------------------------------------
    def thaw(self, cpu: LgCpu) -> float | None:
        """:meth:`LgCpu.thaw`, its cost charged to ``cpu``; nothing is charged to a pool's
        CPU, whose wakes are never put off (:meth:`turn`), so it runs up no debt.  What
        :meth:`LgCpu.thaw` answers."""
        if cpu.engine.pool is not None:
            return cpu.thaw()
        started = time.thread_time()
        spent = cpu.thaw()
        self.charge(cpu, time.thread_time() - started)
        self._debts[cpu][2] = cpu.stats.run_time
        return spent

    def charge(self, cpu: LgCpu, seconds: float) -> None:
        """``cpu`` owes ``seconds`` more of the loop's time."""
        self._drain(cpu)[0] += seconds

    @property
    def debtors(self) -> int:
        """How many CPUs have an account of what their wakes cost (a pool's never do)."""
        return len(self._debts)

    def owed(self, cpu: LgCpu) -> float:
        """Seconds of loop time ``cpu`` owes for its wakes now (its share pays them off)."""
        return self._drain(cpu)[0]

    def _drain(self, cpu: LgCpu) -> list[float]:
        """``cpu``'s [debt, when, ...], less what its share paid since then: the CPUs with
        an entry (those that owed something when last looked at) share ``WAKE_SHARE``
        equally."""
        now = asyncio.get_running_loop().time()
        entry = self._debts.get(cpu)
        if entry is None:
            entry = self._debts[cpu] = [0.0, now, -1.0]
        paid = (now - entry[1]) * WAKE_SHARE / max(1, len(self._debts))
        entry[0] = max(0.0, entry[0] - paid)
        entry[1] = now
        return entry

    async def turn(self, cpu: LgCpu, workers: SlicePool, urgent: Callable[[], bool]) -> None:
        """Before a woken CPU runs: while a guest computes on ``workers`` and ``cpu`` owes
        more than ``WAKE_GRACE``, wait until its share has paid the excess (or until
        ``urgent()``).  Not a pool's CPU: its wake takes a warm engine (a switch, as any
        busy CPU's slice may), not a new emulator, so there is nothing to pay off, and
        putting it off would hold an interrupt behind a whole round of the crowd."""
        if cpu.engine.pool is not None:
            return
        if not workers.computing:
            self._debts.pop(cpu, None)  # what nobody else needed is not owed
            return
        excess = self._drain(cpu)[0] - WAKE_GRACE
        if excess <= 0 or urgent():
            return
        for other, entry in list(self._debts.items()):  # paid up: no longer in the share
            if other is not cpu and self._drain(other)[0] == 0.0 and entry[2] < 0:
                del self._debts[other]
        self.deferred += 1
        loop = asyncio.get_running_loop()
        until = loop.time() + excess * max(1, len(self._debts)) / WAKE_SHARE
        while not urgent():
            left = until - loop.time()
            if left <= 0:
                return
            cpu.run.wakeup.clear()  # (a plain wake changes state the next pass reads anyway)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await cpu.run.wakeup.wait()

    def _arm(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(due, self._sweep)
        self._timer_due = due

    def _sweep(self) -> None:
        """Hibernate every CPU whose time has come; re-arm for the next one, if any."""
        self._timer = None
        self._timer_due = math.inf
        loop = asyncio.get_running_loop()
        now = loop.time()
        queue, drowsy = self._queue, self._drowsy
        while queue:
            due, _, ref = queue[0]
            cpu = ref()
            when = None if cpu is None else drowsy.get(cpu)
            if cpu is None or when != due:
                heapq.heappop(queue)  # stale: it woke (and maybe dozed off again) since
                if cpu is None:
                    continue
                if cpu.engine.dormitory_due == due:
                    cpu.engine.dormitory_due = math.inf
                if when is not None and cpu.engine.dormitory_due > when:
                    self._push(cpu, when)  # it dozed off again: the entry for its new time
            elif due <= now:
                heapq.heappop(queue)
                cpu.engine.dormitory_due = math.inf
                del drowsy[cpu]
                self._hibernate(cpu)  # refused (and dropped) if it runs meanwhile
            else:
                self._arm(loop, due)
                break

    def _hibernate(self, cpu: LgCpu) -> None:
        global _low
        before = LgCpu.given_back
        # A pool's CPU owes nothing (see thaw): its clock, a system call, is not read.
        owes = cpu.engine.pool is None
        started = time.thread_time() if owes else 0.0
        if not cpu.hibernate():
            return
        if owes:
            self.charge(cpu, time.thread_time() - started)
        self._pack_later(cpu)
        _low = min(_low, before)  # thaws since the last hibernation reused memory
        if LgCpu.given_back - _low >= TRIM_SLACK and _GIVE_BACK is not None:
            loop = asyncio.get_running_loop()
            # (A trim the packs asked for may be due later: this one comes first.)
            if self._trim is not None and self._trim.when() > loop.time() + TRIM_DELAY:
                self._trim.cancel()
                self._trim = None
            if self._trim is None:
                self._trim = loop.call_later(TRIM_DELAY, self._give_back)

    def _give_back(self) -> None:
        global _low
        self._trim = None
        if _GIVE_BACK is not None:
            _GIVE_BACK()
            self.trims += 1
        _low = LgCpu.given_back
        self._packed = 0
        self._unpacked = LgCpu.unpacked
        self._last_trim = asyncio.get_running_loop().time()

    # -- packed registers ------------------------------------------------------------------
    def _pack_later(self, cpu: LgCpu) -> None:
        """Pack ``cpu``'s kept registers ``PACK_AFTER`` from now if it keeps them as
        bytes that long (nothing if it has none, has them packed, or is queued)."""
        engine = cpu.engine
        frozen = engine.frozen
        if frozen is None or engine.packed or engine.pack_queued or engine.released:
            return
        engine.pack_queued = True
        loop = asyncio.get_running_loop()
        self._packing.append((loop.time() + PACK_AFTER, weakref.ref(cpu), id(frozen)))
        if self._pack_timer is None:
            self._pack_timer = loop.call_at(self._packing[0][0], self._pack_due)

    def _pack_due(self) -> None:
        """Pack the registers of every CPU that kept the same bytes since it was queued;
        queue again one that took an engine and gave it back since."""
        self._pack_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        packing = self._packing
        again = []
        packs = self.packs
        while packing and packing[0][0] <= now:
            due, ref, kept = packing.popleft()
            cpu = ref()
            if cpu is None:
                continue
            cpu.engine.pack_queued = False
            frozen = cpu.engine.frozen
            if frozen is None or cpu.engine.packed:
                continue  # it runs (or was packed): its next sleep queues it again
            if id(frozen) != kept:
                again.append(cpu)  # the bytes of a later sleep: not yet PACK_AFTER old
            elif _wakes_soon(cpu, due):
                self.left_unpacked += 1
                again.append(cpu)  # looked at again if it still sleeps then
            elif cpu.pack_registers():
                self.packs += 1
                if cpu.lg.pack_memory():
                    self.memory_packs += 1
                if cpu.run.rest is not None and cpu.run.reading and cpu.run.hold is None:
                    cpu.run.wakeup.set()  # its sleep ends: the read rests (run._rests)
        for cpu in again:
            self._pack_later(cpu)
        if packing and self._pack_timer is None:
            self._pack_timer = loop.call_at(packing[0][0], self._pack_due)
        self._packed += self.packs - packs
        grown = self._packed - (LgCpu.unpacked - self._unpacked)
        if grown >= PACK_TRIM and self._trim is None and _GIVE_BACK is not None:
            delay = max(TRIM_DELAY, self._last_trim + PACK_TRIM_EVERY - now)
            self._trim = loop.call_later(delay, self._give_back)

    def close(self) -> None:
        """Forget everything (the device is closing)."""
        self._drowsy.clear()
        for _, _, ref in self._queue:
            cpu = ref()
            if cpu is not None:
                cpu.engine.dormitory_due = math.inf
        self._queue.clear()
        self._debts.clear()
        for _, ref, _kept in self._packing:
            cpu = ref()
            if cpu is not None:
                cpu.engine.pack_queued = False
        self._packing.clear()
        self._lazy = None
        for handle in (self._timer, self._trim, self._refill, self._pack_timer, self._lazy_due):
            if handle is not None:
                handle.cancel()
        self._timer = self._trim = self._refill = self._pack_timer = self._lazy_due = None
        self._timer_due = math.inf
