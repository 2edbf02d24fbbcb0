"""The clock event: LHCALL_SET_CLOCKEVENT arms a one-shot timer that raises irq 0.

Timers live on the event loop (``loop.call_later``); a halted guest with no timer
and no interrupt costs nothing.  Only the event loop may call these.
"""

from __future__ import annotations

import asyncio
import struct
import time

from .abi import LGUEST_DATA_TIME
from .cpu import LgCpu

CLOCK_IRQ = 0
_TIMESPEC = struct.Struct("<II")


def set_clockevent(cpu: LgCpu, delta_ns: int) -> None:
    """Fire irq 0 on ``cpu`` ``delta_ns`` nanoseconds from now; 0 cancels."""
    cancel(cpu)
    if delta_ns == 0:
        return
    loop = asyncio.get_running_loop()
    cpu.clock = loop.call_later(delta_ns / 1e9, _fire, cpu)
    cpu.clock_due = loop.time() + delta_ns / 1e9  # (uvloop's handles do not say when)


def cancel(cpu: LgCpu) -> None:
    """Disarm the clock event, if any."""
    if cpu.clock is not None:
        cpu.clock.cancel()
        cpu.clock = None


def _fire(cpu: LgCpu) -> None:
    cpu.clock = None
    if cpu.closed:
        return
    cpu.raise_irq(CLOCK_IRQ)


def remaining(cpu: LgCpu) -> int | None:
    """The armed clock event's time left in nanoseconds (at least 1), or None: the timer's
    part of the CPU's state value."""
    if cpu.clock is None:
        return None
    left = cpu.clock_due - asyncio.get_running_loop().time()
    return max(1, int(left * 1e9))


def restore(cpu: LgCpu, delta_ns: int | None) -> None:
    """Re-arm the clock event from :func:`remaining`'s value (None: disarmed)."""
    set_clockevent(cpu, delta_ns or 0)


def write_timestamp(cpu: LgCpu) -> None:
    """Tell the guest the wall-clock time (``lguest_data.time``)."""
    lg = cpu.lg
    if lg.lguest_data is None:
        return
    ns = time.time_ns()
    addr = lg.lguest_data + LGUEST_DATA_TIME
    if lg.address_ok(addr, _TIMESPEC.size):
        sec, nsec = divmod(ns, 1_000_000_000)
        _TIMESPEC.pack_into(lg.ram, addr, sec & 0xFFFFFFFF, nsec)
