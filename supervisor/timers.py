"""The clock event: LHCALL_SET_CLOCKEVENT arms a one-shot timer that raises irq 0.

Timers live on the event loop (``loop.call_later``), or, in deterministic mode, on
the device's virtual clock (:mod:`supervisor.virtual`); a halted guest with no timer
and no interrupt costs nothing.  Only the event loop may call these.
"""

from __future__ import annotations

import asyncio
import functools
import struct
import time
from collections.abc import Callable

from unicorn import UC_ARCH_X86, UC_MODE_32, Uc
from unicorn import x86_const as r

from . import _slicing, virtual
from .abi import LGUEST_DATA_TIME
from .cpu import LgCpu

CLOCK_IRQ = 0
_TIMESPEC = struct.Struct("<II")
_TIMESPEC_SIZE = _TIMESPEC.size
_pack_timespec = _TIMESPEC.pack_into
_CALIBRATION_NS = 20_000_000  # the baseline tsc_khz is measured over


def _unicorn_rdtsc() -> Callable[[], int]:
    """The host's TSC read through a throw-away Unicorn instance (without the extension)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.ctl_set_tcg_buffer_size(1 << 20)
    uc.mem_map(0, 0x1000)
    uc.mem_write(0, b"\x0f\x31")  # rdtsc

    def read() -> int:
        uc.emu_start(0, 2)
        return int(uc.reg_read(r.UC_X86_REG_EDX) << 32 | uc.reg_read(r.UC_X86_REG_EAX))

    return read


def _sample(read: Callable[[], int]) -> tuple[int, int]:
    """(TSC, perf_counter_ns) read as close together as possible."""
    t0 = time.perf_counter_ns()
    tsc = read()
    t1 = time.perf_counter_ns()
    return tsc, (t0 + t1) // 2


@functools.cache
def tsc_khz() -> int:
    """Guest ``rdtsc`` ticks per millisecond (``lguest_data.tsc_khz``).

    Unicorn's ``rdtsc`` reads the host's time stamp counter, so a guest's TSC
    counts real time; its rate is measured once per process, on the first call,
    against ``time.perf_counter_ns`` over 20 ms.  The counter is read by the native
    extension (:data:`_slicing.rdtsc`) or, without it, by a Unicorn instance.
    """
    read = _slicing.rdtsc or _unicorn_rdtsc()
    tsc0, ns0 = _sample(read)
    elapsed = time.perf_counter_ns() - ns0
    if elapsed < _CALIBRATION_NS:
        time.sleep((_CALIBRATION_NS - elapsed) / 1e9)
    tsc1, ns1 = _sample(read)
    return max(1, round((tsc1 - tsc0) * 1_000_000 / (ns1 - ns0)))


def guest_tsc_khz(cpu: LgCpu) -> int:
    """``lguest_data.tsc_khz`` for ``cpu``: fixed in deterministic mode."""
    return tsc_khz() if cpu.lg.virtual is None else virtual.TSC_KHZ


def set_clockevent(cpu: LgCpu, delta_ns: int) -> None:
    """Fire irq 0 on ``cpu`` ``delta_ns`` nanoseconds from now; 0 cancels."""
    cancel(cpu)
    if delta_ns == 0:
        return
    sim = cpu.lg.virtual
    if sim is not None:
        due = sim.clock_ns(cpu) + delta_ns  # virtual nanoseconds
        cpu.clock.due = due
        cpu.clock.event = sim.call_at_ns(due, _fire, cpu)
        return
    loop = asyncio.get_running_loop()
    cpu.clock.event = loop.call_later(delta_ns / 1e9, _fire, cpu)
    cpu.clock.due = loop.time() + delta_ns / 1e9  # (uvloop's handles do not say when)


def cancel(cpu: LgCpu) -> None:
    """Disarm the clock event, if any."""
    if cpu.clock.event is not None:
        cpu.clock.event.cancel()
        cpu.clock.event = None


def _fire(cpu: LgCpu) -> None:
    cpu.clock.event = None
    if cpu.closed:
        return
    cpu.raise_irq(CLOCK_IRQ)


def remaining(cpu: LgCpu) -> int | None:
    """The armed clock event's time left in nanoseconds (at least 1), or None: the timer's
    part of the CPU's state value."""
    if cpu.clock.event is None:
        return None
    sim = cpu.lg.virtual
    if sim is not None:
        return max(1, int(cpu.clock.due) - sim.clock_ns(cpu))
    left = cpu.clock.due - asyncio.get_running_loop().time()
    return max(1, int(left * 1e9))


def restore(cpu: LgCpu, delta_ns: int | None) -> None:
    """Re-arm the clock event from :func:`remaining`'s value (None: disarmed)."""
    set_clockevent(cpu, delta_ns or 0)


def write_timestamp(cpu: LgCpu) -> None:
    """Tell the guest the wall-clock time (``lguest_data.time``; in deterministic mode
    the virtual clock from ``virtual.EPOCH_NS``)."""
    data = cpu.lguest_data
    if data is None:
        return
    lg = cpu.lg
    sim = lg.virtual
    ns = time.time_ns() if sim is None else virtual.EPOCH_NS + sim.guest_ns(cpu)
    addr = data + LGUEST_DATA_TIME
    if lg.address_ok(addr, _TIMESPEC_SIZE):
        sec, nsec = divmod(ns, 1_000_000_000)
        _pack_timespec(lg.ram, addr, sec & 0xFFFFFFFF, nsec)
