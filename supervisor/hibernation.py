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
(measured: 500 KiB per hibernated guest stayed resident, 52 KiB after a
``malloc_trim``).  So after hibernations the dormitory asks glibc to give free
memory back, at most once per ``TRIM_DELAY`` however many CPUs hibernated.
``hibernate_after`` 0 hibernates at the moment a CPU becomes drowsy; infinity
never.  Event loop only.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import math
from collections.abc import Callable

from .cpu import LgCpu

DEFAULT_HIBERNATE_AFTER = 1.0  # seconds: see docs/performance.md, "Hibernation"
NEVER = math.inf
TRIM_DELAY = 0.05  # seconds: hibernations in a burst share one malloc_trim


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


class Dormitory:
    """Which CPUs are drowsy since when, and the one timer that hibernates them."""

    __slots__ = ("_drowsy", "_timer", "_trim")

    def __init__(self) -> None:
        self._drowsy: dict[LgCpu, float] = {}  # CPU -> when it must hibernate (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._trim: asyncio.TimerHandle | None = None  # a malloc_trim to come

    def __len__(self) -> int:
        """How many CPUs are drowsy and not yet hibernated."""
        return len(self._drowsy)

    @property
    def armed(self) -> bool:
        """True while a timer is armed (some CPU is drowsy, or memory is to be given back)."""
        return self._timer is not None or self._trim is not None

    def drowsy(self, cpu: LgCpu) -> None:
        """``cpu`` stopped needing its emulator: hibernate it after its ``hibernate_after``."""
        after = cpu.hibernate_after
        if after == NEVER or cpu.hibernated or cpu.closed:
            return
        if after <= 0:
            self._hibernate(cpu)
            return
        if cpu in self._drowsy:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + after
        self._drowsy[cpu] = due
        if self._timer is None:
            self._timer = loop.call_at(due, self._sweep)

    def awake(self, cpu: LgCpu) -> None:
        """``cpu`` is about to need its emulator (or is gone): forget it."""
        self._drowsy.pop(cpu, None)

    def _sweep(self) -> None:
        """Hibernate every CPU whose time has come; re-arm for the next one, if any."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        due_next = math.inf
        for cpu, due in list(self._drowsy.items()):
            if due <= now:
                del self._drowsy[cpu]
                self._hibernate(cpu)  # refused (and dropped) if it runs meanwhile
            else:
                due_next = min(due_next, due)
        if due_next < math.inf:
            self._timer = loop.call_at(due_next, self._sweep)

    def _hibernate(self, cpu: LgCpu) -> None:
        if cpu.hibernate() and self._trim is None and _GIVE_BACK is not None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY, self._give_back)

    def _give_back(self) -> None:
        self._trim = None
        if _GIVE_BACK is not None:
            _GIVE_BACK()

    def close(self) -> None:
        """Forget everything (the device is closing)."""
        self._drowsy.clear()
        for handle in (self._timer, self._trim):
            if handle is not None:
                handle.cancel()
        self._timer = self._trim = None
