"""Hibernation: a CPU that does not need its emulator gives it back.

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
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import heapq
import itertools
import math
import weakref
from collections.abc import Callable

from . import _unicorn
from .cpu import LgCpu

DEFAULT_HIBERNATE_AFTER = 1.0  # seconds: see docs/performance.md, "Hibernation"
NEVER = math.inf
TRIM_DELAY = 0.05  # seconds: hibernations in a burst share one malloc_trim
# Instances given back and not taken again before memory is returned (about 0.5 MiB each).
TRIM_SLACK = 32
REFILL_DELAY = 0.01  # seconds after a wake starts: instances are made ahead off its path


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

    __slots__ = ("_drowsy", "_queue", "_refill", "_seq", "_timer", "_timer_due", "_trim", "trims")

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
        self.trims = 0  # times memory was given back to the system

    def __len__(self) -> int:
        """How many CPUs are drowsy and not yet hibernated."""
        return len(self._drowsy)

    @property
    def entries(self) -> int:
        """How many entries its queue holds, stale ones included: at most about one per
        CPU however often the CPUs doze off and wake."""
        return len(self._queue)

    @property
    def armed(self) -> bool:
        """True while a timer is armed (some CPU is drowsy, or memory is to be given back)."""
        return self._timer is not None or self._trim is not None or self._refill is not None

    def drowsy(self, cpu: LgCpu) -> None:
        """``cpu`` stopped needing its emulator: hibernate it after its ``hibernate_after``."""
        engine = cpu.engine
        after = engine.hibernate_after
        if after == NEVER or engine.frozen is not None or engine.released:  # (hibernated, closed)
            return
        if after <= 0:
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

    def _push(self, cpu: LgCpu, due: float) -> None:
        cpu.engine.dormitory_due = due
        heapq.heappush(self._queue, (due, next(self._seq), weakref.ref(cpu)))

    def awake(self, cpu: LgCpu) -> None:
        """``cpu`` is about to need its emulator (or is gone): forget it."""
        self._drowsy.pop(cpu, None)
        hibernated = cpu.engine.frozen is not None
        if hibernated and not cpu.run.closing and self._refill is None:
            loop = asyncio.get_running_loop()
            self._refill = loop.call_later(REFILL_DELAY, self._make_ahead, cpu.engine.tcg_buffer)

    def _make_ahead(self, tcg_buffer: int) -> None:
        """Make one instance ahead of need, and again at the next loop turn until enough wait."""
        self._refill = None
        if _unicorn.prepare(tcg_buffer) and _unicorn.blank_count() < _unicorn.BLANKS:
            self._refill = asyncio.get_running_loop().call_soon(self._make_ahead, tcg_buffer)

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
        if not cpu.hibernate():
            return
        _low = min(_low, before)  # thaws since the last hibernation reused memory
        if LgCpu.given_back - _low >= TRIM_SLACK and self._trim is None and _GIVE_BACK is not None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._give_back)

    def _give_back(self) -> None:
        global _low
        self._trim = None
        if _GIVE_BACK is not None:
            _GIVE_BACK()
            self.trims += 1
        _low = LgCpu.given_back

    def close(self) -> None:
        """Forget everything (the device is closing)."""
        self._drowsy.clear()
        for _, _, ref in self._queue:
            cpu = ref()
            if cpu is not None:
                cpu.engine.dormitory_due = math.inf
        self._queue.clear()
        for handle in (self._timer, self._trim, self._refill):
            if handle is not None:
                handle.cancel()
        self._timer = self._trim = self._refill = None
        self._timer_due = math.inf
