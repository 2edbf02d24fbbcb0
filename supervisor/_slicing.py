"""Exact slices: the native block hook and its control block ("fuel").

A slice of guest execution ends only at a block boundary, from inside the
emulating thread: when another task raises :attr:`Fuel.stop` or when the slice's
block budget or time (``deadline``) is spent.  Nothing here touches the event loop.

If the native hook could not be built, :data:`NATIVE` is false and slices fall
back to ``emu_start(count=...)``, which is exact too but slower.
"""

from __future__ import annotations

import ctypes
from typing import Any

from unicorn import UC_HOOK_BLOCK

from . import _unicorn

try:
    from . import _fuel  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - only without a C compiler at install time
    _fuel = None

NATIVE: bool = _fuel is not None

REASON_NONE = 0
REASON_STOP = 1
REASON_BUDGET = 2


class Fuel(ctypes.Structure):
    """Shared between the event loop (which may set ``stop``) and the hook."""

    _fields_ = [
        ("stop", ctypes.c_int32),
        ("reason", ctypes.c_int32),
        ("budget", ctypes.c_int64),
        ("blocks", ctypes.c_uint64),
        ("emu_stop", ctypes.c_void_p),
        ("deadline", ctypes.c_int64),  # time.monotonic_ns() at which the slice ends
        ("clock_mask", ctypes.c_uint64),  # the hook reads the clock when blocks & mask == 0
    ]


_EMU_STOP = _unicorn.EMU_STOP_ADDRESS
if _fuel is not None and _fuel.fuel_size != ctypes.sizeof(Fuel):  # pragma: no cover
    raise ImportError("supervisor._fuel was built for a different Fuel layout")


def attach(uc: Any, fuel: Fuel | None = None) -> Fuel:
    """Install the native block hook on ``uc`` and return its control block.

    ``fuel`` reuses a control block (a CPU's new instance after hibernation keeps
    its counters).  The caller must keep the returned object alive as long as
    ``uc`` runs.  Without the native hook the control block is still returned
    (the slice loop then meters with ``count=``).
    """
    if fuel is None:
        fuel = Fuel()
        fuel.clock_mask = 0
    fuel.emu_stop = _EMU_STOP
    if _fuel is not None:
        _unicorn.add_native_hook(uc, UC_HOOK_BLOCK, _fuel.block_hook, ctypes.addressof(fuel))
    return fuel
