"""Exact slices: ending a Unicorn CPU's run only at a block boundary.

A slice of guest execution ends only where no guest instruction is half done:
when another task raises :attr:`Fuel.stop` (:func:`kick`) or when the slice's time
(``deadline``) or block budget is spent.  Nothing here touches the event loop.
Three paths, chosen per process (:data:`PATH`) and per CPU (:attr:`Fuel.exit_request`):

``exit request`` (the default)
    No per-block cost.  The CPU's code is translated with Unicorn's
    ``no_exit_request`` flag, which leaves exactly one exit-request check per
    translated block, at its start; the native slicer thread (``_fuel.c``) sends
    ``uc_emu_stop`` when the deadline passes or a kick arrives.  Why this is
    exact: docs/performance.md, "Exact slices".  Blocks are not counted.
``native block hook``
    ``_fuel.c``'s ``UC_HOOK_BLOCK`` hook checks ``stop``, the budget and the
    clock before every block (a helper call per block).  Used for CPUs that
    need blocks counted (a block limit, the debugger: :func:`exact_blocks`),
    and for all CPUs if the flag cannot be located in this Unicorn build.
``emu_start(count=) fallback``
    Without the native extension (no C compiler at install time; a warning says
    so once) or with ``LGUEST_SLICING=count``: Unicorn's own instruction counter,
    which stops from inside its code hook, so it is exact too, but slower; a
    kick is seen when the current count runs out (see :func:`run`).

``LGUEST_SLICING`` may also be ``hook`` (the block hook for every CPU).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from unicorn import (
    UC_HOOK_BLOCK,
    UC_HOOK_INTR,
    UcError,
)
from unicorn.x86_const import (
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_CS,
    UC_X86_REG_EFLAGS,
    UC_X86_REG_ESP,
)

from . import _unicorn
from .abi import IDT_ENTRIES

ENV = "LGUEST_SLICING"  # "count": the fallback; "hook": the block hook; unset or "exit": default
_choice = os.environ.get(ENV, "exit").strip().lower() or "exit"
if _choice not in ("exit", "hook", "count"):
    raise ImportError(f"{ENV}={_choice!r}: expected 'exit', 'hook' or 'count'")

_fuel: Any
try:
    from . import _fuel  # type: ignore[attr-defined, no-redef]
except ImportError:  # only without a C compiler at install time
    _fuel = None
    if _choice != "count":
        warnings.warn(
            "supervisor._fuel (the native slice meter) is not built: guests run on the exact "
            "but slower emu_start(count=) fallback. Install a C compiler (e.g. apt-get "
            "install gcc) and reinstall (pip install -e .) to get it.",
            RuntimeWarning,
            stacklevel=2,
        )

NATIVE: bool = _fuel is not None and _choice != "count"
# The host's time stamp counter, which Unicorn's guest rdtsc reads too; None without the
# extension or on a host that is not x86.
rdtsc: Callable[[], int] | None = getattr(_fuel, "rdtsc", None)

REASON_NONE = 0
REASON_STOP = 1
REASON_BUDGET = 2
REASON_IRQ = 3  # an interrupt was raised (interrupt()): the slice delivers it and goes on
HLT = 0xF4


# A guest's IDT as _fuel.c reads it: lo, hi of each gate.
IdtTable = (ctypes.c_uint32 * 2) * IDT_ENTRIES

# The IDTs that waiting CPUs share, by their bytes (share_idt): an entry lives as long
# as some CPU's Fuel holds its table.  Nothing writes a table once it is here.
_shared_idts: weakref.WeakValueDictionary[bytes, ctypes.Array[Any]] = weakref.WeakValueDictionary()


def _shared_idt(gates: ctypes.Array[Any]) -> ctypes.Array[Any]:
    """The shared table with the bytes of ``gates``; ``gates`` itself becomes it if there
    is none (its owner must never write it again)."""
    key = bytes(gates)
    shared = _shared_idts.get(key)
    if shared is None:
        _shared_idts[key] = shared = gates
    return shared


# Every gate not present: a new CPU's IDT, shared until it first runs.
_BLANK_IDT = _shared_idt(IdtTable())


def shared_idts() -> int:
    """How many distinct IDTs waiting CPUs share now (:func:`share_idt`)."""
    return len(_shared_idts)


class Fuel(ctypes.Structure):
    """A CPU's slice meter, shared with the native code (``fuel_t`` in ``_fuel.c``).

    ``exit_request`` says which native path the CPU is on; ``left`` and ``mark`` are
    the slice's CPU-time account (see :func:`run`).  ``idt`` points at ``gates``, the
    guest's IDT (:data:`IdtTable`): the CPU's own table while ``owns_gates``, else one
    shared by content with other CPUs, which nothing may write (:func:`own_idt` first).
    No attribute dict: a waiting guest's CPU keeps its Fuel.
    """

    __slots__ = ("address", "gates", "local_call", "owns_gates")

    _fields_ = [
        ("stop", ctypes.c_int32),
        ("reason", ctypes.c_int32),
        ("budget", ctypes.c_int64),
        ("blocks", ctypes.c_uint64),
        ("emu_stop", ctypes.c_void_p),
        ("deadline", ctypes.c_int64),  # time.monotonic_ns() at which the slice ends
        ("clock_mask", ctypes.c_uint64),  # the hook reads the clock when blocks & mask == 0
        ("uc", ctypes.c_void_p),  # the rest: the slicer's, under its mutex
        ("running", ctypes.c_int32),
        ("sent", ctypes.c_int32),
        ("sent_at", ctypes.c_int64),
        ("next", ctypes.c_void_p),
        ("prev", ctypes.c_void_p),
        ("cpu_clock", ctypes.c_int32),  # deadlines count the emulating thread's CPU time
        ("exit_request", ctypes.c_int32),  # which native path the CPU is on
        ("cpu_start", ctypes.c_int64),
        ("span", ctypes.c_int64),
        ("latest", ctypes.c_int64),
        ("left", ctypes.c_int64),  # ns of the emulating thread's CPU time left in the slice
        ("mark", ctypes.c_int64),  # that thread's CPU time when the slice's last run began
        ("ring", ctypes.c_void_p),  # the interrupt hook's (see trap_interrupts)
        ("local", ctypes.c_void_p),
        ("local_mask", ctypes.c_uint64),
        ("next_hcall", ctypes.c_int32),
        ("vector", ctypes.c_int32),
        ("hcall", ctypes.c_uint32 * 4),
        ("hcall_read", ctypes.c_int32),
        ("irq", ctypes.c_int32),  # an irq waits: the next run stops at once (interrupt())
        # The hypercalls the native hook completes itself, and the CPU-local state they
        # change: its only copy (LgCpu.idt, .stack and .ts are views of these fields).
        ("native_mask", ctypes.c_uint64),
        ("native_done", ctypes.c_uint64),  # completed natively, not yet in CpuStats
        ("idt", ctypes.c_void_p),  # gates' address (an IdtTable)
        ("stack", ctypes.c_uint32 * 3),  # ss, esp, pages
        ("ts", ctypes.c_int32),
        ("ram", ctypes.c_void_p),  # the guest's memory, for the page-table calls' checks
        ("pfn_limit", ctypes.c_uint32),
        ("pad2", ctypes.c_int32),
        ("lone", ctypes.c_int64),  # a lone slice's ns beyond a slice in turn (see cut())
        # The CPU's pending irqs: their only copy (LgCpu.irqs_pending is a view), changed
        # only through raise_irq() and take_irq().
        ("irqs_pending", ctypes.c_uint32),
        ("wrote", ctypes.c_int32),  # a Host write was noted during the slice (interrupt())
        # What run() needs to deliver an irq itself (see run()); set by the slice.
        ("irq_native", ctypes.c_int32),
        ("irq_data", ctypes.c_uint32),  # lguest_data
        ("noirq_start", ctypes.c_uint32),
        ("noirq_end", ctypes.c_uint32),
        ("kernel", ctypes.c_uint32),  # Lguest.kernel_address
        ("handler_bound", ctypes.c_int32),  # such an irq's handler got the slice's last ns
        ("handler_ns", ctypes.c_int64),  # CPU time a delivered irq's handler gets at least
        ("irq_stops", ctypes.c_uint64),  # runs stopped for an irq that run() went on with
        ("irqs_native", ctypes.c_uint64),  # irqs run() delivered
    ]
    address: int  # ctypes.addressof(self): how the native calls name it
    local_call: Callable[[int, int, int, int], bool] | None  # kept alive for `local`
    gates: ctypes.Array[Any]  # the IdtTable at `idt`
    owns_gates: bool  # `gates` is this CPU's alone (else shared: never written)

    def __init__(self) -> None:
        super().__init__()
        self.address = ctypes.addressof(self)
        self.local_call = None
        self.owns_gates = False
        self.gates = _BLANK_IDT
        self.idt = ctypes.addressof(self.gates)

    @property
    def counts_blocks(self) -> bool:
        """True if ``blocks`` counts this CPU's blocks (the block-hook path)."""
        return NATIVE and not self.exit_request


def layout_differences(layout: Mapping[str, tuple[int, int]], size: int) -> list[str]:
    """Where :class:`Fuel` differs from ``fuel_t`` as ``_fuel.c`` lays it out: ``layout``
    is its {field: (offset, size)} and ``size`` its ``sizeof``; empty if they agree."""
    differences = []
    names = [name for name, *_ in Fuel._fields_]
    for name in names:
        field = getattr(Fuel, name)
        mirror = (field.offset, field.size)
        native = layout.get(name)
        if native is None:
            differences.append(f"{name}: not in fuel_t")
        elif native != mirror:
            differences.append(
                f"{name}: (offset, size) {native} in fuel_t, {mirror} in _slicing.Fuel"
            )
    differences += [f"{name}: not in _slicing.Fuel" for name in layout if name not in names]
    if size != ctypes.sizeof(Fuel):
        differences.append(f"size: {size} in fuel_t, {ctypes.sizeof(Fuel)} in _slicing.Fuel")
    return differences


_EMU_STOP = _unicorn.EMU_STOP_ADDRESS
if _fuel is not None and (_differences := layout_differences(_fuel.fuel_layout, _fuel.fuel_size)):
    raise ImportError(
        "supervisor._fuel was built for a different fuel_t layout (rebuild it: pip install "
        "-e .): " + "; ".join(_differences)
    )
if _fuel is not None:
    _fuel.bind(
        _unicorn.EMU_START_ADDRESS,
        _unicorn.REG_READ_ADDRESS,
        _unicorn.REG_WRITE_ADDRESS,
        _unicorn.EIP,
        _unicorn.HYPERCALL_REGS,
        UC_X86_REG_CR0,
        UC_X86_REG_CR3,
        _unicorn.CTL_ADDRESS,
        _unicorn.REMOVE_CACHE_REQUEST,
        (UC_X86_REG_EFLAGS, UC_X86_REG_CS, UC_X86_REG_ESP, UC_X86_REG_CR4),
        _unicorn.FLUSH_TB_REQUEST,
    )
# The hypercall numbers _fuel.c can complete without Python (see trap_interrupts).
NATIVE_CALLS: frozenset[int] = frozenset(
    n for n in range(64) if _fuel is not None and _fuel.native_calls >> n & 1
)


@functools.cache
def _no_exit_request() -> int | None:
    """The flag's offset when new CPUs take the exit-request path, else None; located on
    first use, not at import (importing creates no ``Uc``)."""
    return _unicorn.no_exit_request_offset() if NATIVE and _choice == "exit" else None


def _path() -> str:
    if _no_exit_request() is not None:
        return "exit request"
    return "native block hook" if NATIVE else "emu_start(count=) fallback"


# Computed on first access (PEP 562), since they need the probe above:
#   NO_EXIT_REQUEST: int | None -- the flag's offset in uc_struct;
#   EXIT_REQUEST: bool -- new CPUs take the exit-request path;
#   COUNTS_BLOCKS: bool -- Fuel.blocks (and so CpuStats.blocks) counts blocks for every
#     CPU: only on the block-hook path.  The exit-request path counts none (except for
#     CPUs with a block limit or under the debugger); the fallback counts instructions
#     of counts that ran out;
#   PATH: str -- the path's name, for tables and messages.
_LAZY: dict[str, Callable[[], Any]] = {
    "NO_EXIT_REQUEST": _no_exit_request,
    "EXIT_REQUEST": lambda: _no_exit_request() is not None,
    "COUNTS_BLOCKS": lambda: NATIVE and _no_exit_request() is None,
    "PATH": _path,
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return _LAZY[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _hook_blocks(uc: Any, fuel: Fuel) -> None:
    place = _unicorn.seat(uc)
    place.cell.value = fuel.address
    _unicorn.add_native_hook(uc, UC_HOOK_BLOCK, _fuel.block_hook, place.cell_address)


def new_fuel(count_blocks: bool = False) -> Fuel:
    """A slice meter for a new CPU, on the path new CPUs take (the block hook if
    ``count_blocks``), not yet on any instance: :func:`attach` puts it on one."""
    fuel = Fuel()
    fuel.clock_mask = 0
    fuel.exit_request = not count_blocks and _no_exit_request() is not None
    return fuel


def own_idt(fuel: Fuel) -> ctypes.Array[Any]:
    """The CPU's IDT table, made its own first (a copy of the shared one) if it shares
    one: before anything writes it (the CPU's owner)."""
    if not fuel.owns_gates:
        fuel.gates = IdtTable.from_buffer_copy(fuel.gates)
        fuel.idt = ctypes.addressof(fuel.gates)
        fuel.owns_gates = True
    return fuel.gates


def share_idt(fuel: Fuel) -> None:
    """Have a waiting CPU (no engine, no slice) share its IDT with every other CPU whose
    IDT has the same bytes, keeping no table of its own (2 KiB); its next run, or write
    to it, makes it its own again (:func:`own_idt`)."""
    if fuel.owns_gates:
        fuel.owns_gates = False
        fuel.gates = _shared_idt(fuel.gates)
        fuel.idt = ctypes.addressof(fuel.gates)


def clear_idt(fuel: Fuel) -> None:
    """Every gate of the CPU's IDT not present (the shared blank table)."""
    fuel.owns_gates = False
    fuel.gates = _BLANK_IDT
    fuel.idt = ctypes.addressof(fuel.gates)


def attach(
    uc: Any, fuel: Fuel | None = None, count_blocks: bool = False, hooked: bool = False
) -> Fuel:
    """Give ``uc`` a slice meter (before it translates anything) and return it.

    ``fuel`` reuses a control block (a CPU's new instance after hibernation keeps its
    counters and its path).  ``count_blocks``: a new CPU needs ``Fuel.blocks`` counted
    (a block limit), so it gets the block hook.  ``hooked``: ``uc`` already has the hooks
    and flags of ``fuel``'s path (it served a CPU of the same kind: :func:`_unicorn.unbind`);
    they are only pointed at ``fuel`` (the instance's seat).  The caller must keep the
    returned object alive as long as ``uc`` runs.
    """
    if fuel is None:
        fuel = new_fuel(count_blocks)
    fuel.emu_stop = _EMU_STOP
    fuel.uc = _unicorn.handle(uc).value
    _unicorn.seat(uc).cell.value = fuel.address
    if hooked:
        return fuel
    if fuel.exit_request:
        _unicorn.set_no_exit_request(uc, True)
    elif NATIVE:
        if _no_exit_request() is not None:  # (an instance another CPU used may have it set)
            _unicorn.set_no_exit_request(uc, False)
        _hook_blocks(uc, fuel)
    return fuel


@functools.lru_cache(maxsize=8)
def call_masks(local_calls: frozenset[int], native_calls: frozenset[int]) -> tuple[int, int]:
    """:func:`trap_interrupts`' hypercall sets as ``_fuel.c``'s bit masks (local, native),
    checked and made once per pair of sets, not for every new CPU (a ValueError, which
    is not kept, for sets it cannot take)."""
    if any(not 0 <= n < 64 for n in local_calls):
        raise ValueError("CPU-local hypercall numbers must be below 64")
    if not native_calls <= local_calls & NATIVE_CALLS:
        unknown = sorted(native_calls - (local_calls & NATIVE_CALLS))
        raise ValueError(f"hypercalls {unknown} cannot be completed natively")
    return sum(1 << n for n in local_calls), sum(1 << n for n in native_calls)


def trap_interrupts(
    uc: Any,
    fuel: Fuel,
    local: Callable[[int, int, int, int], bool],
    local_calls: frozenset[int],
    native_calls: frozenset[int] = frozenset(),
    memory: tuple[int, int] | None = None,
    hooked: bool = False,
) -> None:
    """Native paths only: ``_fuel.c``'s interrupt hook ends a run at every interrupt or
    exception (``fuel.vector``; a hypercall's registers in ``fuel.hcall``), except the
    hypercalls in ``local_calls`` while ``fuel.ring`` shows an empty async ring: those in
    ``native_calls`` whose arguments the Host accepts it completes itself, in C (counted
    in ``fuel.native_done``); the others it hands to ``local(number, a1, a2, a3)`` on the
    spot (a true result stops the run); either way the guest goes on.  Again for each
    new or stripped instance of the CPU.  ``native_calls`` must be CPU-local
    calls that ``_fuel.c`` implements (:data:`NATIVE_CALLS`).  ``memory``: the guest's
    memory as (host address of guest-physical 0, pages), fixed for the guest's life;
    without it the page-table calls are left to ``local``.

    The CPU's own part (``fuel``'s) is set up by the first call for ``fuel`` only: it
    holds for the CPU's life, whichever instances it runs on.  ``hooked``: ``uc`` has
    the hook already (it served a CPU of the same kind), or is None (the CPU has no
    instance yet): nothing more is done."""
    assert NATIVE
    local_mask, native_mask = call_masks(local_calls, native_calls)
    if fuel.local_call is None:
        fuel.local_call = local
        fuel.local = id(local)  # a borrowed reference: fuel.local_call keeps it alive
        fuel.local_mask = local_mask
        fuel.native_mask = native_mask
        fuel.ram, fuel.pfn_limit = memory if memory is not None else (None, 0)
    if hooked:
        return
    place = _unicorn.seat(uc)
    place.cell.value = fuel.address
    _unicorn.add_native_hook(uc, UC_HOOK_INTR, _fuel.intr_hook, place.cell_address)


def exact_blocks(uc: Any, fuel: Fuel) -> None:
    """Move a CPU to the block hook (its blocks counted, and stops from code hooks
    taking effect before the hooked instruction, as a debugger needs).  Only while
    no slice of it runs; its translated code is flushed."""
    if fuel.exit_request:
        _hook_blocks(uc, fuel)
        fuel.exit_request = False
    elif _no_exit_request() is None or not _unicorn.no_exit_request(uc):
        return  # (on the block hook with every exit check already)
    _unicorn.set_no_exit_request(uc, False)
    uc.ctl_flush_tb()


def count_blocks(uc: Any, fuel: Fuel) -> None:
    """Move a CPU to the block hook, its translated code checking for an exit request
    only at the start of each block (the exit-request path's ``no_exit_request``),
    where a stop from the hook lands: the hook runs before that check, so the slice
    still ends exactly where the hook stopped it, before any of the block's
    instructions.  What it saves is the check after every guest load and store,
    which only a stop in the middle of a block needs (a code hook's:
    :func:`exact_blocks` turns the checks back on).  As :func:`exact_blocks` where
    new CPUs do not take the exit-request path.  Only while no slice of it runs."""
    exact_blocks(uc, fuel)
    if _no_exit_request() is not None:
        _unicorn.set_no_exit_request(uc, True)
        uc.ctl_flush_tb()


# What deliver() returns when it delivered: the frame's guest-physical address and size,
# whether this CPU's translations of it were dropped, whether lguest_data's irq_enabled
# was written (0: an interrupt gate) and whether this CPU's translations of it were.
Delivered = tuple[int, int, bool, bool, bool]


def deliver(
    fuel: Fuel, lo: int, hi: int, error_code: int | None, irq_enabled: int, kernel_address: int
) -> Delivered | None:
    """Native paths, CPUs with their memory given to :func:`trap_interrupts`: push the
    interrupt frame and jump to the gate ``(lo, hi)`` in C, as
    ``interrupts.set_guest_interrupt`` does, when it is the common case (``_fuel.c``
    says which: a frame within one writable page of guest memory, not in user mode);
    None, with nothing changed, for the rest.  ``irq_enabled``: the guest-physical
    address of ``lguest_data.irq_enabled``.  The CPU must be awake (not hibernated)."""
    result: Delivered | None = _fuel.deliver(
        fuel.address,
        lo,
        hi,
        -1 if error_code is None else error_code,
        irq_enabled,
        kernel_address,
    )
    return result


def drop(fuel: Fuel, ranges: list[tuple[int, int]], kernel_address: int) -> bool | None:
    """Native paths, CPUs with their memory given to :func:`trap_interrupts`: drop this
    CPU's translations of the guest-physical ``ranges`` (merged, as ``codecache`` does)
    in one C call, each at the first alias the guest maps back to it (its physical
    address, ``kernel_address`` + it, ``codecache.KERNEL_ALIAS`` + it).  True: done;
    False: user mode, or a range without such an alias (the caller flushes the whole
    cache); None: nothing done (no memory given, or not native).  The CPU must be awake."""
    if not NATIVE:
        return None
    done: bool | None = _fuel.drop(fuel.address, ranges, kernel_address)
    return done


def kick(fuel: Fuel) -> None:
    """End the CPU's running slice at its next block boundary (any thread)."""
    if fuel.exit_request:
        _fuel.kick(fuel.address)
    else:
        fuel.stop = 1


class SlicerStats(NamedTuple):
    """The exit-request slicer thread's counts so far (``_fuel.c``)."""

    wakes: int  # wake-ups: each takes a core from a busy slice when every core runs one
    ticks: int  # sleeps cut short to tick while short runs kept starting
    moved: int  # deadlines moved for CPU time a preempted thread was not given
    resent: int  # stops sent again to a run that had not returned
    # Calls holding the GIL (the event loop's kicks and irqs) that waited for the slicer's
    # lock: the whole interpreter waited for the thread holding it.
    lock_waits: int
    lock_wait_ns: int  # their waits, in all


def slicer_stats() -> SlicerStats | None:
    """The exit-request slicer's counts (:class:`SlicerStats`); None without the
    extension (benchmarks and tests)."""
    if _fuel is None:
        return None
    return SlicerStats(*(int(n) for n in _fuel.slicer_stats()))


def interrupt(fuel: Fuel, in_slice: bool) -> bool:
    """The Host wrote the CPU's memory (any thread): as :func:`raise_irq`, without an irq.

    On the exit-request path a run in progress stops at its next block boundary (or the
    next run at once, ``in_slice``) and goes back to its slice's Python, which drops the
    stale code and goes on; True.  A run already stopped for its slice's time is left to
    end so (True): the next slice drops it before its first run.  Otherwise change
    nothing and return False (the caller kicks the CPU)."""
    return bool(fuel.exit_request) and bool(_fuel.interrupt(fuel.address, in_slice, -1))


# Without the extension: guards every change of a Fuel.irqs_pending (with it, _fuel.c's
# atomic operations do).
_pending_lock = threading.Lock()


def raise_irq(fuel: Fuel, irq: int, in_slice: bool) -> bool:
    """Mark ``irq`` pending for the CPU and have a running slice take it (any thread).

    On the exit-request path, stop the CPU's run in progress at its next block boundary
    with ``REASON_IRQ``, or, if the CPU is between two runs of a slice (``in_slice``),
    its next run at once; True.  The slice delivers the irq there and goes on: ``run()``
    itself, without the GIL, while ``fuel.irq_native`` is set and the case is common
    (``_fuel.c``'s ``irq_in_run``), else the slice's Python.  A run already stopped for
    its slice's time is left to end so (True): the next slice delivers the irq before
    its first run.  Otherwise return False (the caller wakes the CPU)."""
    if _fuel is None:
        with _pending_lock:
            fuel.irqs_pending |= 1 << irq
        return False
    return bool(_fuel.interrupt(fuel.address, in_slice, irq)) and bool(fuel.exit_request)


def take_irq(fuel: Fuel, irq: int) -> None:
    """Clear a pending irq once it has been delivered (the slice's thread)."""
    if _fuel is None:
        with _pending_lock:
            fuel.irqs_pending &= ~(1 << irq)
    else:
        _fuel.take_irq(fuel.address, irq)


def heed(fuel: Fuel, in_slice: bool) -> None:
    """:func:`interrupt`, else :func:`kick`: what a Host write into guest memory asks of
    the CPU (any thread), in one call, since the Host's requests make several."""
    if fuel.exit_request:
        address = fuel.address
        if not _fuel.interrupt(address, in_slice, -1):
            _fuel.kick(address)
    else:
        fuel.stop = 1


def hurry(fuel: Fuel) -> bool:
    """End the CPU's run in progress at its next block boundary as if its slice's time were
    spent (``REASON_BUDGET``: the slice ends with BUDGET, its run may go on after a turn),
    so that its worker is free for a more urgent job (any thread).  True if a stop was
    sent: only to a run on the exit-request path that nothing else stops yet."""
    return bool(fuel.exit_request) and bool(_fuel.hurry(fuel.address))


def cut(fuel: Fuel) -> bool:
    """A job waits for a worker: a lone slice of the CPU (longer by ``fuel.lone`` ns than
    a slice taken in turn, begun when no job waited) ends where a slice in turn would
    have, at once if that is past (the GIL held: the slice's Python and :func:`run` write
    its time left with the GIL).  True if it was a lone slice."""
    return bool(fuel.exit_request) and fuel.lone > 0 and bool(_fuel.cut(fuel.address))


# What run() returns: the fallback's instruction count (0 on the native paths), and the
# native interrupt hook's trap vector and hypercall registers (eax, edx, ebx, ecx), None
# when there is none or they were not read (always None on the fallback, whose Python
# hook records them itself).
Stop = tuple[int, int | None, tuple[int, int, int, int] | None]
_NO_TRAP: Stop = (0, None, None)


def run(uc: Any, fuel: Fuel, until: int, ring: int = 0, next_hcall: int = 0) -> Stop:
    """Run the guest from its ``eip`` until something stops it; see :data:`Stop`.

    ``fuel.reason`` starts at ``REASON_NONE``.  ``ring`` and ``next_hcall`` are for the
    native interrupt hook (:func:`trap_interrupts`): the async ring's status bytes (a
    host address; 0: stop at every trap) and its next slot.

    The slice's time is ``fuel.left`` nanoseconds of the emulating thread's CPU time,
    counted from the slice's first run on: at the start of each run the thread's CPU
    time since the previous run started (that run, and the Host's work for the guest
    after it) is taken off, and the run's deadline is ``fuel.left`` from now.  What
    the Host did before the first run (delivering an interrupt) and time the thread
    waited for a CPU do not count.  With no time left the run does not start and
    ``fuel.reason`` is ``REASON_BUDGET``.  On the native paths this is one call into
    ``_fuel.c`` (one CPU-clock read, eip, the slicer's bookkeeping and ``uc_emu_start``
    with the GIL released).

    The fallback runs at most ``fuel.budget`` instructions (at least one):
    ``count=`` stops from inside Unicorn's code hook, before an instruction, so no
    write is replayed.  Once the caller knows why emulation ended, it calls
    :func:`count_spent` if the count ran out.
    """
    if NATIVE:
        if not fuel.owns_gates:  # (the run may write it: LHCALL_LOAD_IDT_ENTRY in C)
            own_idt(fuel)
        _unicorn.forget_hook_exception(uc)
        # (_fuel.c also sets budget to 0 when the slice's time is found spent: time is the
        # budget on the exit-request path, and with no time left nothing ran.)
        stop = _fuel.run(fuel.address, until, ring, next_hcall)
        status = stop[0]
        if status > 0:
            raise UcError(status)  # (a trap recorded meanwhile: last_trap)
        _unicorn.raise_hook_exception(uc)
        return stop if status == 0 else _NO_TRAP  # (-1: no time left, nothing ran)
    fuel.reason = REASON_NONE
    used = time.thread_time_ns()
    if fuel.mark:
        fuel.left -= used - fuel.mark
    fuel.mark = used
    if fuel.left <= 0:
        fuel.reason = REASON_BUDGET
        fuel.budget = 0
        return _NO_TRAP
    fuel.deadline = time.monotonic_ns() + fuel.left  # (read by the interrupt hook)
    count = max(1, fuel.budget)
    uc.emu_start(_unicorn.eip(uc), until, count=count)
    return (int(count), None, None)


def last_trap(fuel: Fuel) -> tuple[int | None, tuple[int, int, int, int] | None]:
    """The native paths' trap vector and hypercall registers of the last :func:`run`, as it
    returns them (for a run that raised ``UcError``)."""
    if not NATIVE or fuel.vector < 0:
        return None, None
    h = fuel.hcall
    return fuel.vector, (h[0], h[1], h[2], h[3]) if fuel.hcall_read else None


def count_spent(fuel: Fuel, count: int) -> None:
    """The fallback's count ran out: account the instructions as the slice's budget."""
    fuel.reason = REASON_BUDGET
    fuel.budget -= count
    fuel.blocks += count
