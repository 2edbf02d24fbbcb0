"""The clock event: LHCALL_SET_CLOCKEVENT arms a one-shot timer that raises irq 0.

Timers live on the event loop (``loop.call_later``); a halted guest with no timer
and no interrupt costs nothing.  Only the event loop may call these.
"""

from __future__ import annotations

import asyncio
import functools
import struct
import time
from typing import Any

from unicorn import UC_ARCH_X86, UC_MODE_32, Uc
from unicorn import x86_const as r

from . import _unicorn
from .abi import LGUEST_DATA_TIME
from .cpu import LgCpu

CLOCK_IRQ = 0
_TIMESPEC = struct.Struct("<II")
_CALIBRATION_NS = 20_000_000  # the baseline tsc_khz is measured over


def _read_tsc(uc: Any) -> tuple[int, int]:
    """(guest TSC, host perf_counter_ns) read as close together as possible."""
    t0 = time.perf_counter_ns()
    uc.emu_start(0, 2)
    t1 = time.perf_counter_ns()
    return uc.reg_read(r.UC_X86_REG_EDX) << 32 | uc.reg_read(r.UC_X86_REG_EAX), (t0 + t1) // 2


@functools.cache
def tsc_khz() -> int:
    """Guest ``rdtsc`` ticks per millisecond (``lguest_data.tsc_khz``).

    Unicorn's ``rdtsc`` reads the host's time stamp counter, so a guest's TSC
    counts real time; its rate is measured on first use (the first
    LGUEST_INIT of the process, which waits those 20 ms) against
    ``time.perf_counter_ns``, with a throw-away Unicorn instance.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    try:
        uc.ctl_set_tcg_buffer_size(1 << 20)
        uc.mem_map(0, 0x1000)
        uc.mem_write(0, b"\x0f\x31")  # rdtsc
        tsc0, ns0 = _read_tsc(uc)
        time.sleep(_CALIBRATION_NS / 1e9)
        tsc1, ns1 = _read_tsc(uc)
    finally:
        _unicorn.close(uc)
    return max(1, round((tsc1 - tsc0) * 1_000_000 / (ns1 - ns0)))


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
