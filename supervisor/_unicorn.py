"""Everything the project knows about Unicorn's insides, in one place.

The rest of the supervisor uses Unicorn's public Python API (``Uc``, hooks,
``emu_start``) and this module for the few things that API does not give, or
gives too slowly:

* the C library handle and an instance's native handle (``uclib``, ``_uch``):
  fast register access (:class:`Registers`) and the native block hook
  (:func:`add_native_hook`);
* the layout of a saved CPU context: its data part is a guest's registers as
  bytes (:func:`context_data`, :func:`load_context_data`), except QEMU's four
  debug-register breakpoint slots, host pointers found by experiment
  (:func:`check_context`): a saved context never carries them, and one that
  does is refused;
* QEMU's ``old_exception`` field, which Unicorn never resets (unicorn issue
  #1883): its offset in the saved context is found by experiment, lazily, on
  the first guest (:func:`forget_exception`);
* QEMU's page-fault ``error_code``, which the interrupt hook is not given: its
  offset is found the same way (:func:`page_fault_error_code`);
* ``uc_struct``'s ``no_exit_request`` flag, which makes translated code check for
  an exit request only at the start of each block: located by experiment, lazily
  (:func:`find_no_exit_request`), and set per instance (:func:`set_no_exit_request`);
* freeing an instance at once instead of at the next cyclic collection
  (:func:`close`);
* new instances, configured through ``uc_ctl`` (:func:`configure`), and a few
  made ahead of need in idle time (:func:`new_instance`, :func:`prepare`): most
  of a new instance's cost is Unicorn building the emulated machine.

Each of these depends on the Unicorn build, so importing this module checks
the version against the one these offsets and layouts were measured with.
Importing creates no ``Uc``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import struct
import sys
from collections.abc import Callable
from typing import Any

import unicorn
from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_32, Uc, UcError
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as r

from . import delta

MEASURED_VERSION = "2.1.4"
SUPPORTED_SERIES = "2.1."

VERSION: str = unicorn.__version__
if not VERSION.startswith(SUPPORTED_SERIES):  # pragma: no cover - depends on the install
    raise ImportError(
        f"supervisor needs Unicorn {SUPPORTED_SERIES}x (its internals were measured with "
        f"Unicorn {MEASURED_VERSION}); this is Unicorn {VERSION}: "
        f"pip install 'unicorn=={MEASURED_VERSION}'"
    )

from unicorn.unicorn_py3.unicorn import uclib  # noqa: E402  (after the version check)

_MASK = 0xFFFFFFFF
_SIZE_T = struct.Struct("N")
_UNSET = b"\xff\xff\xff\xff"
# Vectors after which QEMU remembers an exception (contributory ones, page fault).
REMEMBERED = frozenset({0, 8, 10, 11, 12, 13, 14})
EMU_STOP_ADDRESS: int | None = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
EMU_START_ADDRESS: int | None = ctypes.cast(uclib.uc_emu_start, ctypes.c_void_p).value
REG_READ_ADDRESS: int | None = ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value
REG_WRITE_ADDRESS: int | None = ctypes.cast(uclib.uc_reg_write, ctypes.c_void_p).value
EIP = r.UC_X86_REG_EIP


def handle(uc: Any) -> Any:
    """The instance's native ``uc_engine *`` (for the C API)."""
    return uc._uch


# -- starting emulation through the C API (supervisor._fuel.run) ---------------------------
# The binding's emu_start records an exception raised in a Python hook (the hook then
# stops emulation) and raises it once uc_emu_start returns; a caller that starts the
# engine itself does the same with these two.
def forget_hook_exception(uc: Any) -> None:
    """Before a start: no exception from an earlier run's hooks is pending."""
    uc._hook_exception = None


def raise_hook_exception(uc: Any) -> None:
    """After a start: raise what a Python hook raised during it, if anything."""
    exc = uc._hook_exception
    if exc is not None:
        uc._hook_exception = None
        raise exc


def eip(uc: Any) -> int:
    """The instance's eip."""
    value = ctypes.c_uint64()
    uclib.uc_reg_read(uc._uch, EIP, ctypes.byref(value))
    return value.value & _MASK


# -- registers -------------------------------------------------------------------------------
HYPERCALL_REGS = (r.UC_X86_REG_EAX, r.UC_X86_REG_EDX, r.UC_X86_REG_EBX, r.UC_X86_REG_ECX)
CONTROL_REGS = (r.UC_X86_REG_CR0, r.UC_X86_REG_CR3, r.UC_X86_REG_CR4)
FRAME_REGS = (r.UC_X86_REG_EFLAGS, r.UC_X86_REG_CS, r.UC_X86_REG_EIP, r.UC_X86_REG_ESP)
_read = uclib.uc_reg_read
_write = uclib.uc_reg_write
_read_batch = uclib.uc_reg_read_batch


class _Batch:
    """Preallocated buffers to read a fixed set of registers in one ``uc_reg_read_batch``."""

    __slots__ = ("count", "ids", "pointers", "values")

    def __init__(self, regs: tuple[int, ...]) -> None:
        self.count = len(regs)
        self.ids = (ctypes.c_int * self.count)(*regs)
        self.values = (ctypes.c_uint64 * self.count)()
        base = ctypes.addressof(self.values)
        self.pointers = (ctypes.c_void_p * self.count)(*(base + 8 * i for i in range(self.count)))

    def read(self, h: Any) -> list[int]:
        values = self.values
        for i in range(self.count):
            values[i] = 0
        _read_batch(h, self.ids, self.pointers, self.count)
        return [v & _MASK for v in values]


class Registers:
    """Read and write one CPU's 32-bit registers as ints, through Unicorn's C API.

    The binding's ``reg_read`` costs several microseconds a call (it looks up a
    register class per call), and every call into the library lets go of the GIL;
    the run loop reads eip on every guest entry, four registers on every hypercall and
    seven for every interrupt it delivers, so it uses these preallocated buffers and
    reads each set in one call.  Same threading contract as the CPU itself.
    """

    __slots__ = ("_control", "_frame", "_handle", "_hypercall", "_ref", "_value")

    def __init__(self, uc: Any) -> None:
        self._handle = handle(uc)
        self._value = ctypes.c_uint64()
        self._ref = ctypes.byref(self._value)
        self._hypercall = _Batch(HYPERCALL_REGS)
        self._control = _Batch(CONTROL_REGS)
        self._frame = _Batch(FRAME_REGS)

    def read(self, reg: int) -> int:
        """The register's value (32 bits; segment selectors 16)."""
        self._value.value = 0
        _read(self._handle, reg, self._ref)
        return self._value.value & _MASK

    def write(self, reg: int, value: int) -> None:
        """Set a register; ``value`` is truncated to 32 bits."""
        self._value.value = value & _MASK
        _write(self._handle, reg, self._ref)

    def hypercall(self) -> tuple[int, int, int, int]:
        """eax, edx, ebx, ecx: a hypercall's number and its three arguments."""
        eax, edx, ebx, ecx = self._hypercall.read(self._handle)
        return eax, edx, ebx, ecx

    def control(self) -> tuple[int, int, int]:
        """cr0, cr3, cr4: what a page walk needs."""
        cr0, cr3, cr4 = self._control.read(self._handle)
        return cr0, cr3, cr4

    def frame(self) -> tuple[int, int, int, int]:
        """eflags, cs, eip, esp: what an interrupt frame needs."""
        eflags, cs, eip, esp = self._frame.read(self._handle)
        return eflags, cs, eip, esp


# -- controls --------------------------------------------------------------------------------
def _write_code(control: int, nargs: int) -> int:
    """``uc_ctl``'s request code for writing ``control`` with ``nargs`` arguments."""
    return int(uc_const.UC_CTL_IO_WRITE << 30) | (nargs << 26) | control


_CTL = uclib.uc_ctl
_SET_TCG_BUFFER = _write_code(uc_const.UC_CTL_TCG_BUFFER_SIZE, 1)
_USE_EXITS = _write_code(uc_const.UC_CTL_UC_USE_EXITS, 1)
_SET_EXITS = _write_code(uc_const.UC_CTL_UC_EXITS, 2)
_NO_EXITS = (ctypes.c_uint64 * 1)()
_FLUSH_TB = _write_code(uc_const.UC_CTL_TB_FLUSH, 0)


# The request ctl_remove_cache makes; with uc_ctl itself, for native code too (_fuel.c).
REMOVE_CACHE_REQUEST: int = _write_code(uc_const.UC_CTL_TB_REMOVE_CACHE, 2)
FLUSH_TB_REQUEST: int = _FLUSH_TB  # ctl_flush_tb's, for _fuel.c
CTL_ADDRESS: int | None = ctypes.cast(uclib.uc_ctl, ctypes.c_void_p).value


def remove_cache(uc: Any, begin: int, end: int) -> None:
    """Drop the translations of guest-virtual ``[begin, end)`` (``ctl_remove_cache``,
    without the binding's few microseconds of argument handling)."""
    status = _CTL(handle(uc), REMOVE_CACHE_REQUEST, ctypes.c_uint64(begin), ctypes.c_uint64(end))
    if status != uc_const.UC_ERR_OK:
        raise UcError(status)


def configure(uc: Any, tcg_buffer: int) -> None:
    """Give a new instance a ``tcg_buffer``-byte translation buffer and no exit address
    (``emu_start``'s ``until`` is then ignored), through ``uc_ctl`` itself: the
    binding's ``ctl_*`` methods cost about 10 us a call.  Setting the exits is what
    makes Unicorn build the emulated machine (its lazy ``uc_init``)."""
    h = handle(uc)
    for status in (
        _CTL(h, _SET_TCG_BUFFER, ctypes.c_uint32(tcg_buffer)),
        _CTL(h, _USE_EXITS, ctypes.c_int(1)),
        _CTL(h, _SET_EXITS, ctypes.cast(_NO_EXITS, ctypes.c_void_p), ctypes.c_size_t(0)),
    ):
        if status != uc_const.UC_ERR_OK:
            raise UcError(status)


# -- new instances -----------------------------------------------------------------------------
# Configured instances never used yet, by translation buffer size: at most BLANKS in all,
# about 0.8 MiB of memory each.  Event-loop threads only.
BLANKS = 4
_blanks: dict[int, list[Any]] = {}


def _configured(tcg_buffer: int) -> Any:
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    configure(uc, tcg_buffer)
    return uc


def new_instance(tcg_buffer: int) -> Any:
    """A configured x86-32 instance (see :func:`configure`): one made ahead by
    :func:`prepare` if there is one, else a new one.  Either has never run and has
    no memory and no hooks: the two are indistinguishable to a guest.  Any thread (an
    engine pool's worker may make one)."""
    blanks = _blanks.get(tcg_buffer)
    if blanks:
        with contextlib.suppress(IndexError):  # (another thread took the last one)
            return blanks.pop()
    return _configured(tcg_buffer)


def prepare(tcg_buffer: int) -> bool:
    """Make one instance ahead of need; False (and nothing made) once :data:`BLANKS`
    instances wait.  About 0.2 ms: call it when nothing else waits for the thread."""
    if blank_count() >= BLANKS:
        return False
    _blanks.setdefault(tcg_buffer, []).append(_configured(tcg_buffer))
    return True


def blank_count() -> int:
    """How many instances made ahead wait to be used."""
    return sum(len(blanks) for blanks in _blanks.values())


def drop_blanks() -> None:
    """Free every instance made ahead (they cost memory: about 0.8 MiB each)."""
    while _blanks:
        _, blanks = _blanks.popitem()
        for uc in blanks:
            close(uc)


# -- an instance's seat: whom its hooks serve --------------------------------------------
class Seat:
    """Whom one instance's hooks serve: the hooks find their CPU here, never in a closure,
    so an instance handed from one CPU to another of the same ``kind`` keeps its hooks
    (:func:`unbind`) and only its seat changes; the binding's ``hook_del`` and
    ``hook_add`` cost tens of microseconds each.

    ``cell`` holds the address of the current CPU's slice meter (``fuel_t``): the native
    hooks' user data is the cell's address (``_fuel.c`` reads the meter through it).
    ``cpu`` is the current CPU, for the Python hooks.  ``kind``: what the installed hooks
    and flags fit, as their installer names it (None: unknown; :func:`strip` then runs
    before another CPU uses the instance).  ``memory``: the size of the guest memory
    mapped at 0 (:func:`map_memory`).  ``regs``: the instance's :class:`Registers`;
    ``context``: its buffer for saved contexts (:func:`context_data`).
    """

    __slots__ = ("cell", "context", "cpu", "kind", "memory", "regs")

    def __init__(self, uc: Any) -> None:
        self.cell = ctypes.c_void_p()
        self.context: tuple[Any, int, int, memoryview] | None = None  # (_context_buffer)
        self.cpu: Any = None
        self.kind: object = None
        self.memory = 0
        self.regs = Registers(uc)

    @property
    def cell_address(self) -> int:
        """The native hooks' user data: where the current CPU's meter address is."""
        return ctypes.addressof(self.cell)


def seat(uc: Any) -> Seat:
    """The instance's :class:`Seat` (made with its first use)."""
    found: Seat | None = getattr(uc, "_lguest_seat", None)
    if found is None:
        found = Seat(uc)
        uc._lguest_seat = found
    return found


def map_memory(uc: Any, size: int, host_address: int) -> None:
    """Map a guest's memory (``size`` bytes at ``host_address``) at guest-physical 0, with
    every permission; :func:`unbind` takes it off again.  Unicorn flushes the TLB as the
    memory map changes, so no entry for memory mapped before is left."""
    uc.mem_map_ptr(0, size, uc_const.UC_PROT_ALL, host_address)
    seat(uc).memory = size


# -- native hooks ----------------------------------------------------------------------------
def add_native_hook(uc: Any, kind: int, function: int, user_data: int) -> None:
    """Install a C function (``function`` is its address) as a hook on every address.

    ``user_data`` is passed to it unchanged; the caller keeps it alive as long as ``uc``
    (the slice meters' hooks get :attr:`Seat.cell_address`).  The hook's handle is
    kept with the instance, for :func:`strip`.
    """
    hook = ctypes.c_ulong()
    status = uclib.uc_hook_add(
        handle(uc),
        ctypes.byref(hook),
        kind,
        ctypes.c_void_p(function),
        ctypes.c_void_p(user_data),
        1,
        0,
    )
    if status != 0:  # pragma: no cover
        raise RuntimeError(f"uc_hook_add failed with unicorn error {status}")
    native: list[int] | None = getattr(uc, "_lguest_native_hooks", None)
    if native is None:
        native = []
        uc._lguest_native_hooks = native
    native.append(hook.value)


_INSN_HOOK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def hook_rdtsc(uc: Any, read: Callable[[], int]) -> None:
    """Make ``rdtsc`` and ``rdtscp`` on ``uc`` read ``read()`` instead of the host's
    time stamp counter (``rdtscp``'s ``ecx``, the processor id, reads 0).

    Unicorn 2.1's C library takes ``UC_HOOK_INSN`` hooks for these two instructions (a
    hook returning 1 replaces the instruction's own work); its Python binding refuses
    them, so the hook is installed through the C call.  Like :func:`add_native_hook`'s,
    it goes with the instance's hooks in :func:`strip`.
    """

    def tsc_for(insn: int) -> Any:
        def on_insn(_engine: int | None, _data: int | None) -> int:
            value = read() & 0xFFFF_FFFF_FFFF_FFFF
            uc.reg_write(r.UC_X86_REG_EAX, value & 0xFFFF_FFFF)
            uc.reg_write(r.UC_X86_REG_EDX, value >> 32)
            if insn == r.UC_X86_INS_RDTSCP:
                uc.reg_write(r.UC_X86_REG_ECX, 0)
            return 1

        return _INSN_HOOK(on_insn)

    kept: list[Any] | None = getattr(uc, "_lguest_kept", None)
    if kept is None:
        kept = []
        uc._lguest_kept = kept
    native: list[int] | None = getattr(uc, "_lguest_native_hooks", None)
    if native is None:
        native = []
        uc._lguest_native_hooks = native
    for insn in (r.UC_X86_INS_RDTSC, r.UC_X86_INS_RDTSCP):
        callback = tsc_for(insn)
        hook = ctypes.c_size_t()
        status = uclib.uc_hook_add(
            handle(uc),
            ctypes.byref(hook),
            unicorn.UC_HOOK_INSN,
            callback,
            None,
            ctypes.c_uint64(1),
            ctypes.c_uint64(0),
            ctypes.c_int(insn),
        )
        if status != uc_const.UC_ERR_OK:
            raise UcError(status)
        kept.append(callback)
        native.append(hook.value)


def strip(uc: Any) -> None:
    """Take every hook (Python and native) and every memory mapping off ``uc``: what an
    instance handed from one CPU to another must lose, so that nothing of the previous
    CPU (its fuel, its hooks' closures, its memory) is reachable from the next one.
    Translations made for the old mappings are dropped with them (``ctl_flush_tb``).

    Paging goes off first (clearing cr0.PG flushes the TLB), then the registers become a
    new instance's: unmapping drops translations by guest-virtual address, which Unicorn
    resolves through the CPU's page tables, and those lived in the previous CPU's
    memory, which may be freed by now."""
    h = handle(uc)
    uc.reg_write(r.UC_X86_REG_CR0, uc.reg_read(r.UC_X86_REG_CR0) & ~(1 << 31))
    load_context_data(uc, blank_context())
    place = seat(uc)
    place.kind = place.cpu = place.cell.value = None
    place.memory = 0
    for hook in getattr(uc, "_lguest_native_hooks", ()):
        status = uclib.uc_hook_del(h, ctypes.c_size_t(hook))
        if status != uc_const.UC_ERR_OK:
            raise UcError(status)
    uc._lguest_native_hooks = []
    uc._lguest_kept = []  # (the C callbacks of hook_rdtsc, now unhooked)
    for hook in list(uc._callbacks):
        uc.hook_del(hook)
    for begin, end, _perms in list(uc.mem_regions()):
        uc.mem_unmap(begin, end - begin + 1)
    uc.ctl_flush_tb()


def unbind(uc: Any) -> None:
    """Take the guest's memory (:func:`map_memory`) and its CPU off ``uc`` but keep its
    hooks, flags and every other mapping: the cheap half of a switch to another CPU of
    the seat's ``kind``, whose hooks find the new CPU through the seat.  Paging goes
    off first, for :func:`strip`'s reason.

    Translations go with the memory: ``uc_mem_unmap`` invalidates every translation
    made from the unmapped range (with paging off, guest-virtual is guest-physical),
    and the guest's memory is the only place code is translated from (the Host's
    pages, the one other mapping, are read-only and the same in every instance: a
    fetch there stops the guest).  So no whole-cache flush follows, which would cost
    as much again (QEMU resets its whole translation hash table and page map), and an
    instance with no memory mapped holds no translation to drop."""
    h = handle(uc)
    place = seat(uc)
    regs = place.regs
    regs.write(r.UC_X86_REG_CR0, regs.read(r.UC_X86_REG_CR0) & ~(1 << 31))
    place.cpu = place.cell.value = None
    if place.memory:  # (none: unbound already, by a CPU's close or a switch away)
        status = uclib.uc_mem_unmap(h, ctypes.c_uint64(0), ctypes.c_size_t(place.memory))
        if status != uc_const.UC_ERR_OK:
            raise UcError(status)
        place.memory = 0


# -- the floating-point unit at power-on -------------------------------------------------
CR4_OSFXSR = 1 << 9  # fxsave/fxrstor and SSE instructions allowed
CR4_OSXMMEXCPT = 1 << 10  # an unmasked SSE exception is #XM, not #UD
FPU_CONTROL_RESET = 0x37F  # fninit's control word: all exceptions masked, 64-bit mantissa
MXCSR_RESET = 0x1F80  # all SSE exceptions masked, round to nearest


def reset_fpu(uc: Any) -> None:
    """The x87 and SSE state of a processor after reset, with SSE enabled as Linux
    enables it (CR4.OSFXSR, CR4.OSXMMEXCPT): FCW 0x37F, every x87 register empty,
    MXCSR 0x1F80.

    A new Unicorn instance has FCW and MXCSR 0 (every exception unmasked), which no
    real processor or process starts with.  All of it lives in the saved context
    (:func:`context_data`), so snapshots and hibernation keep what the guest set.
    """
    uc.reg_write(r.UC_X86_REG_CR4, uc.reg_read(r.UC_X86_REG_CR4) | CR4_OSFXSR | CR4_OSXMMEXCPT)
    uc.reg_write(r.UC_X86_REG_FPCW, FPU_CONTROL_RESET)
    uc.reg_write(r.UC_X86_REG_FPSW, 0)
    uc.reg_write(r.UC_X86_REG_FPTAG, 0xFFFF)
    uc.reg_write(r.UC_X86_REG_MXCSR, MXCSR_RESET)


# -- saved CPU contexts ---------------------------------------------------------------------
def context_data(uc: Any) -> bytes:
    """The CPU's whole register state (general, segment with descriptor caches, control,
    debug, descriptor tables, flags, FPU/SSE) as Unicorn saves it, with QEMU's
    breakpoint slots zeroed (:func:`check_context`).

    Only meaningful to the same Unicorn build (see :data:`VERSION`).
    """
    h = handle(uc)
    context, _address, _size, data = _context_buffer(uc)
    status = uclib.uc_context_save(h, context.context)
    if status != uc_const.UC_ERR_OK:
        raise UcError(status)
    start, end = _breakpoint_slots()
    data[start:end] = _no_breakpoints()  # (the buffer is this module's own)
    return bytes(data)


def _context_buffer(uc: Any) -> tuple[Any, int, int, memoryview]:
    """The instance's saved-context buffer (made once: the binding's ``context_save``
    allocates one every time), the address of its data part, that part's size and a
    view of it (copied in and out without a ctypes call each: a network round trip
    saves two contexts)."""
    place = seat(uc)
    if place.context is None:
        context = uc.context_save()
        raw = bytes(context)
        (size,) = _SIZE_T.unpack_from(raw)  # struct uc_context starts with the data's size
        address = ctypes.cast(context.context, ctypes.c_void_p).value
        assert address is not None
        start = address + len(raw) - size
        data = memoryview((ctypes.c_char * size).from_address(start)).cast("B")
        place.context = (context, start, size, data)
    return place.context


@functools.cache
def _no_breakpoints() -> bytes:
    """Zeros over QEMU's breakpoint slots (:func:`_breakpoint_slots`)."""
    start, end = _breakpoint_slots()
    return bytes(end - start)


@functools.cache
def blank_context() -> bytes:
    """The registers of a new instance (:func:`context_data`): what an instance that ran
    another CPU is given before it starts a new one (made once: an instance costs tens
    of microseconds, and a switch needs these bytes every time)."""
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    try:
        return context_data(uc)
    finally:
        close(uc)


def pack_context(data: bytes) -> bytes:
    """:func:`context_data` bytes kept small, for a CPU that sleeps long: the runs where
    they differ from a new instance's registers (:func:`blank_context`), deflated
    (:mod:`supervisor.delta`).  About 0.2 KiB instead of 5.4 KiB; :func:`unpack_context`
    gives the same bytes back, writing only those runs over a copy of the blank ones."""
    return delta.pack(data, blank_context())


def unpack_context(packed: bytes) -> bytes:
    """The :func:`context_data` bytes :func:`pack_context` packed."""
    return delta.unpack(packed, blank_context())


def load_context_data(uc: Any, data: bytes) -> None:
    """Put register state from :func:`context_data` back into ``uc`` (``ValueError`` if
    :func:`check_context` refuses it)."""
    check_context(data)
    h = handle(uc)
    context, _address, _size, view = _context_buffer(uc)
    status = uclib.uc_context_save(h, context.context)  # (the parts besides the data)
    if status == uc_const.UC_ERR_OK:
        view[:] = data
        status = uclib.uc_context_restore(h, context.context)
    if status != uc_const.UC_ERR_OK:
        raise UcError(status)


def check_context(data: bytes) -> None:
    """``ValueError`` unless ``data`` can be loaded as a CPU context of this build.

    A context is QEMU's CPU structure copied byte for byte.  All of it is guest
    register state except four host pointers beside the debug registers: the
    breakpoints QEMU allocated for the guest's ``dr0``-``dr3`` (``dr7`` enables
    them), which it follows and frees when the guest changes ``dr7`` again.  A
    context from elsewhere (a file, another instance, one closed by hibernation)
    would hand QEMU pointers to memory that is not, or no longer, such a
    breakpoint, so they must be zero: the guest's debug registers survive, and
    the breakpoints they describe take effect again when the guest next writes them.
    """
    size = _context_size()
    if len(data) != size:
        raise ValueError(f"CPU context is {len(data)} bytes, this Unicorn's is {size}")
    start, end = _breakpoint_slots()
    if any(data[start:end]):
        raise ValueError("CPU context holds host pointers (QEMU's breakpoint slots)")


@functools.cache
def _context_size() -> int:
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    try:
        (size,) = _SIZE_T.unpack_from(bytes(uc.context_save()))
    finally:
        close(uc)
    return int(size)


_DR0_PROBE = 0x5A5A1000  # a breakpoint address no other field holds


@functools.cache
def _breakpoint_slots() -> tuple[int, int]:
    """Where QEMU's breakpoint pointers for ``dr0``-``dr3`` live in a context's data.

    Found by experiment: a guest enables a breakpoint on ``dr0``; the pointer
    appears in the word right after the eight debug registers.
    """
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    try:
        uc.mem_map(0, 0x2000)
        # mov $_DR0_PROBE, %eax; mov %eax, %dr0; mov $1, %eax; mov %eax, %dr7
        code = b"\xb8" + struct.pack("<I", _DR0_PROBE) + bytes.fromhex("0f23c0b8010000000f23f8")
        uc.mem_write(0x1000, code)
        uc.emu_start(0x1000, 0x1000 + len(code))
        raw = bytes(uc.context_save())
    finally:
        close(uc)
    (size,) = _SIZE_T.unpack_from(raw)
    data = raw[len(raw) - size :]
    dr0 = data.find(struct.pack("<Q", _DR0_PROBE))
    start = dr0 + 8 * 8  # dr0 .. dr7, 8 bytes each
    pointer = data[start : start + 8]
    if dr0 < 0 or dr0 % 8 or data.find(struct.pack("<Q", _DR0_PROBE), dr0 + 1) >= 0:
        raise RuntimeError("cannot find the debug registers in Unicorn's saved context")
    if not any(pointer) or data[dr0 + 7 * 8] != 1:  # dr7 = 1: breakpoint 0 enabled
        raise RuntimeError("cannot find QEMU's breakpoint slots in Unicorn's saved context")
    return start, start + 4 * 8


# -- QEMU's remembered exception ---------------------------------------------------------------
@functools.cache
def _old_exception_offset() -> int | None:
    """Where ``old_exception`` lives in a saved context, found by raising a divide error."""
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    try:
        uc.mem_map(0, 0x2000)
        uc.mem_write(0x1000, bytes.fromhex("31c9f7f1"))  # xor ecx, ecx; div ecx

        def stop(uc: Any, _vector: int, _data: object) -> None:
            uc.emu_stop()

        uc.hook_add(UC_HOOK_INTR, stop)
        before = bytes(uc.context_save())
        uc.emu_start(0x1000, 0x1004)
        after = bytes(uc.context_save())
    finally:
        close(uc)
    found = [
        i
        for i in range(0, len(before) - 3, 4)
        if before[i : i + 4] == _UNSET and after[i : i + 4] == b"\0\0\0\0"
    ]
    return found[0] if len(found) == 1 else None


def can_forget_exception() -> bool:
    """True if :func:`forget_exception` works on this build (calibrates on first use)."""
    return _old_exception_offset() is not None


def forget_exception(uc: Any) -> None:
    """Tell Unicorn the last exception was delivered (the slice's thread, between runs).

    QEMU remembers the last exception so that a fault while delivering it becomes
    a double fault, and forgets it only when QEMU itself delivers it.  Unicorn
    hands exceptions to our interrupt hook instead, so without this the guest's
    *next* divide error or page fault would be reported as a double fault.
    """
    offset = _old_exception_offset()
    if offset is None:
        return
    context = uc.context_save()
    address = ctypes.cast(context.context, ctypes.c_void_p).value
    assert address is not None
    ctypes.memmove(address + offset, _UNSET, len(_UNSET))
    uc.context_restore(context)


# -- the page-fault error code -----------------------------------------------------------------
_CR0_PE_PG_WP = 1 | (1 << 31) | (1 << 16)


def _fault_context(code: bytes) -> bytes:
    """The saved context right after ``code`` (at 0x3000, paging on) page-faults."""
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    seen: list[bytes] = []
    try:
        uc.ctl_set_tcg_buffer_size(1 << 20)
        uc.mem_map(0, 0x10000)
        uc.mem_write(0x1000, struct.pack("<I", 0x2000 | 7))  # page directory: one table
        table = [0] * 1024
        table[3] = 0x3000 | 3  # code: present, writable
        table[5] = 0x5000 | 1  # present, read-only; page 4 is not present
        uc.mem_write(0x2000, struct.pack("<1024I", *table))
        uc.mem_write(0x3000, code)
        uc.reg_write(r.UC_X86_REG_CR3, 0x1000)
        uc.reg_write(r.UC_X86_REG_CR0, _CR0_PE_PG_WP)

        def on_intr(uc: Any, vector: int, _data: object) -> None:
            if vector == 14 and not seen:
                seen.append(bytes(uc.context_save()))
            uc.emu_stop()

        uc.hook_add(UC_HOOK_INTR, on_intr)
        with contextlib.suppress(UcError):  # the fault ends emulation
            uc.emu_start(0x3000, 0x3000 + len(code))
    finally:
        close(uc)
    return seen[0] if seen else b""


@functools.cache
def _error_code_offset() -> int | None:
    """Where QEMU's ``error_code`` lives in a saved context, found with three faults whose
    codes differ: read of a page not present = 0, write to it = 2, write to a present
    read-only page with CR0.WP = 3."""
    try:
        read_np = _fault_context(bytes.fromhex("a100400000"))  # mov eax, [0x4000]
        write_np = _fault_context(bytes.fromhex("a300400000"))  # mov [0x4000], eax
        write_ro = _fault_context(bytes.fromhex("a300500000"))  # mov [0x5000], eax
    except UcError:
        return None
    size = min(len(read_np), len(write_np), len(write_ro))
    found = [
        i
        for i in range(0, size - 3, 4)
        if read_np[i : i + 4] == b"\0\0\0\0"
        and write_np[i : i + 4] == b"\2\0\0\0"
        and write_ro[i : i + 4] == b"\3\0\0\0"
    ]
    return found[0] if len(found) == 1 else None


def page_fault_error_code(uc: Any) -> int | None:
    """The error code (bit 0 present, 1 write, 2 user) of the page fault just reported to
    the interrupt hook, as the hardware pushes it; None if this build hides it.

    QEMU computes it and keeps it in ``CPUX86State.error_code``; Unicorn does not
    pass it to the hook (calibrates on first use).
    """
    offset = _error_code_offset()
    if offset is None:
        return None
    code: int = struct.unpack_from("<I", bytes(uc.context_save()), offset)[0]
    return code & 0x1F


# -- uc_struct's no_exit_request flag ----------------------------------------------------------
# uc_struct (include/uc_priv.h, Unicorn 2.1) ends its flags with
#     bool hook_insert, first_tb, no_exit_request, init_done;
#     sigjmp_buf jmp_bufs[UC_MAX_NESTED_LEVEL];   /* 64 x 200 bytes, glibc x86-64 */
#     int nested_level;                           /* 1 inside emu_start, else 0 */
_JMP_BUFS = 64 * 200
_SCAN = 4096


def find_no_exit_request() -> int | None:
    """The offset of ``no_exit_request`` in this build's ``uc_struct``, or None.

    Located, not assumed: the only int that reads 1 inside a hook and 0 outside
    must sit ``_JMP_BUFS`` bytes after an 8-aligned array that follows the flags
    ``hook_insert = 0, no_exit_request = 0, init_done = 1``.  Exactly one such
    place must exist.
    """
    if sys.platform != "linux" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    try:
        uc.mem_map(0, 0x1000, uc_const.UC_PROT_ALL)
        uc.mem_write(0, b"\x90\x90\xf4")  # nop; nop; hlt
        base = handle(uc).value
        inside: dict[int, int] = {}

        def probe(u: Any, _address: int, _size: int, _data: object) -> None:
            for j in candidates:
                inside[j] = ctypes.c_int32.from_address(base + j + _JMP_BUFS).value
            u.emu_stop()

        head = ctypes.string_at(base, _SCAN)
        candidates = [
            j
            for j in range(8, _SCAN, 8)
            if head[j - 8] == 0
            and head[j - 6] == 0
            and head[j - 5] == 1
            and not any(head[j - 4 : j])
        ]
        hook = uc.hook_add(uc_const.UC_HOOK_CODE, probe)
        uc.emu_start(0, 3)
        uc.hook_del(hook)
        found = [
            j
            for j in candidates
            if inside.get(j) == 1 and ctypes.c_int32.from_address(base + j + _JMP_BUFS).value == 0
        ]
    finally:
        close(uc)
    return found[0] - 6 if len(found) == 1 else None


@functools.cache
def no_exit_request_offset() -> int | None:
    """:func:`find_no_exit_request`'s answer, located once per process on first use."""
    return find_no_exit_request()


def set_no_exit_request(uc: Any, value: bool) -> None:
    """Set or clear the instance's ``no_exit_request`` flag: translated code then checks
    for an exit request only at the start of each block.  Before ``uc`` translates
    anything, or with its translations flushed afterwards."""
    offset = no_exit_request_offset()
    if offset is None:
        raise RuntimeError("this Unicorn build's no_exit_request flag was not located")
    ctypes.c_uint8.from_address(handle(uc).value + offset).value = int(value)


def no_exit_request(uc: Any) -> bool:
    """Whether the instance's ``no_exit_request`` flag is set (False where it was not
    located: it is then never set)."""
    offset = no_exit_request_offset()
    return offset is not None and bool(ctypes.c_uint8.from_address(handle(uc).value + offset).value)


# -- freeing -----------------------------------------------------------------------------------
def close(uc: Any) -> None:
    """Free the native instance now (``uc_close``), not at the next cyclic collection.

    Only when nothing runs on it.  Hook closures usually refer back to their
    owner, so the binding's finalizer would otherwise wait for the collector.
    """
    release = getattr(uc, "_Uc__finalizer", None)  # the binding's uc_close, run once
    if release is not None:
        release()
    uc._callbacks.clear()


def is_closed(uc: Any) -> bool:
    """True once :func:`close` (or the garbage collector) freed the native instance."""
    release = getattr(uc, "_Uc__finalizer", None)
    return release is None or not release.alive
