"""``struct lg_cpu``: one guest CPU, a Unicorn x86-32 instance and its Host state.

Threading contract (checked at run time in asyncio debug mode, like asyncio's
own ``_check_thread``): while a slice runs, only the thread running it touches
this CPU (registers, IDT, page tables, ``hcall``...); between slices only the
event loop does.  The exceptions are :meth:`LgCpu.kick`, which any thread may
call at any time, and the irq bits, which the event loop sets and the slice
clears (atomically, in ``_fuel.c``: ``_slicing.raise_irq`` and ``take_irq``).

The Host's machinery for a CPU is in parts, each written by one room
(docs/architecture.md, "Who owns which field"): :class:`RunControl` (the device
and the run loop), :class:`Engine` (the emulator and its dormancy),
:class:`Clock` (timers.py), :class:`ThreadCheck` and :class:`Debugging`.

Every field, of the CPU and of its parts, is marked :func:`~supervisor.state.saved`
(part of the CPU's state value, :class:`~supervisor.state.CpuState`) or
:func:`~supervisor.state.host_only`; :meth:`LgCpu.capture` and
:meth:`LgCpu.restore` turn the saved ones into that value and back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import functools
import itertools
import math
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableSequence, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, overload

from unicorn import UC_HOOK_CODE, UC_HOOK_MEM_INVALID
from unicorn import unicorn_const as uc_const
from unicorn import x86_const as r

from . import _slicing, _unicorn, hostpages
from ._statefields import host_only, saved, saved_fields
from .abi import IDT_ENTRIES, X86_EFLAGS_IF
from .engines import EnginePool, Taken
from .flag import Flag
from .limits import UNLIMITED, Limits
from .state import CpuState, StateError

if TYPE_CHECKING:
    from .guest import Lguest

CR0_PE = 1 << 0
CR0_TS = 1 << 3
CR0_PG = 1 << 31
CR4_PSE = 1 << 4

# Unicorn's default translation buffer is 1 GiB of address space per instance;
# guests are small, so each CPU gets a small one.
DEFAULT_TCG_BUFFER = 1 << 20  # below 2 MiB, where QEMU's buffer turns into a huge page
MAX_PHYSICAL = (1 << 64) - 1  # the highest physical address a hook's range can name
DEFAULT_BUDGET = 20_000  # blocks in a first slice; adapted to the slice's target length


_ACCESS_KINDS = {
    uc_const.UC_MEM_READ_UNMAPPED: "read",
    uc_const.UC_MEM_WRITE_UNMAPPED: "write",
    uc_const.UC_MEM_FETCH_UNMAPPED: "fetch",
    uc_const.UC_MEM_READ_PROT: "read",
    uc_const.UC_MEM_WRITE_PROT: "write",
    uc_const.UC_MEM_FETCH_PROT: "fetch",
}


@dataclass(slots=True)
class CpuStats:
    """Counters for one CPU; read them from the event loop between slices."""

    # Translated blocks started (exact), counted only while blocks_counted: on the
    # block-hook path (LGUEST_SLICING=hook, a block limit, the debugger).  The default
    # exit-request path has no per-block code, so it keeps no count (blocks stays as it was).
    blocks: int = 0
    slices: int = 0  # slices run (on the executor or, short ones, on the event loop)
    continued: int = 0  # of those, slices after which the run went on without the loop (AGAIN)
    breaks_running: int = 0  # Waker breaks answered while the CPU's executor run went on
    # Runs stopped for a raised interrupt (or a Host write), whose slice then went on.
    irqs_in_slice: int = 0
    # Of the interrupts delivered, those delivered by _fuel.c's run() itself, at the block
    # boundary its stop for them found, with no Python and no GIL (their runs' stops are
    # in irqs_in_slice, not in exits).
    irqs_native: int = 0
    # Executor slices whose time ran out after they delivered an irq: the handler's rest
    # went on as an urgent step (slicepool.AGAIN_URGENT).
    handler_rests: int = 0
    # Executor slices whose time ran out with an irq raised too late to deliver in them:
    # the next step, urgent, delivered it.
    irqs_held_over: int = 0
    exits: int = 0  # times emulation stopped for the Host (traps, hypercalls, stops)
    hypercalls: int = 0
    interrupts: int = 0  # interrupts and traps delivered to the guest
    run_time: float = 0.0  # seconds spent inside slices
    hibernations: int = 0  # times it gave back its emulator (supervisor.hibernation)
    wakes: int = 0  # times it took a new one
    blocks_counted: bool = False  # this CPU's last slice counted its blocks (see blocks)


class Hold(enum.StrEnum):
    """Why a CPU is held: while it is, the run loop parks it at an instruction boundary
    instead of entering the guest (``LguestFile.hold``)."""

    PAUSE = "pause"  # stopped on request (LguestFile.pause, gdb's Ctrl-C, a snapshot)
    START = "start"  # a debugger holds it before its first instruction
    BREAKPOINT = "breakpoint"  # a debugger's breakpoint hook stopped it
    STEP = "step"  # a debugger's single step ended


@dataclass(slots=True)
class Trap:
    """What stopped emulation, recorded by a hook on the slice's thread."""

    vector: int | None = None  # an interrupt or exception vector
    bad_access: tuple[str, int] | None = None  # ("read"|"write"|"fetch", address)
    debug: Hold | None = None  # a debugger's code hook stopped before an instruction: why
    hcall: tuple[int, int, int, int] | None = None  # the hypercall registers, if the hook read them


class ThreadError(RuntimeError):
    """A CPU's state was touched from a thread that does not own it (debug mode only)."""


class _NoGates(list[tuple[int, int]]):
    """A new CPU's IDT (every gate not present), which :func:`_put_idt` writes as one
    cleared table rather than converting 256 entries of zeros."""


# Every new CPU's: never stored or changed (the idt field's value lives in the fuel).
_NO_GATES = _NoGates([(0, 0)] * IDT_ENTRIES)


def _idt() -> list[tuple[int, int]]:
    return _NO_GATES


_IDT_WORDS = struct.Struct(f"={2 * IDT_ENTRIES}I")  # the table's lo, hi words (native order)


class Idt(MutableSequence[tuple[int, int]]):
    """The guest's IDT as ``(lo, hi)`` pairs: a view of the CPU's ``Fuel.idt``.

    Its entries live only there, where ``_fuel.c``'s interrupt hook writes them
    (LHCALL_LOAD_IDT_ENTRY done natively) and interrupt delivery reads them.  The table
    may be shared with other waiting CPUs (``_slicing.share_idt``): each access looks it
    up afresh, and a write makes it the CPU's own first.  Fixed length: entries are
    replaced, never inserted or deleted.
    """

    __slots__ = ("_fuel",)

    def __init__(self, fuel: _slicing.Fuel) -> None:
        self._fuel = fuel

    def __len__(self) -> int:
        return IDT_ENTRIES

    @overload
    def __getitem__(self, index: int) -> tuple[int, int]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, int]]: ...
    def __getitem__(self, index: int | slice) -> tuple[int, int] | list[tuple[int, int]]:
        if isinstance(index, slice):
            return list(self)[index]
        gate = self._fuel.gates[index]
        return (gate[0], gate[1])

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # The whole table in one conversion: a state capture reads every entry, and
        # ctypes converts one element at a time, far slower.
        words = iter(_IDT_WORDS.unpack(bytes(self._fuel.gates)))
        return zip(words, words, strict=True)

    @overload
    def __setitem__(self, index: int, value: tuple[int, int]) -> None: ...
    @overload
    def __setitem__(self, index: slice, value: Iterable[tuple[int, int]]) -> None: ...
    def __setitem__(self, index: int | slice, value: Any) -> None:
        if isinstance(index, slice):
            indices = range(IDT_ENTRIES)[index]
            values = list(value)
            if len(values) != len(indices):
                raise ValueError(f"the IDT has {IDT_ENTRIES} entries, not {len(values)}")
            table = _slicing.own_idt(self._fuel)
            if len(indices) == IDT_ENTRIES and indices.step == 1:  # all of it (a restore)
                _IDT_WORDS.pack_into(table, 0, *itertools.chain.from_iterable(values))
                return
            for i, (lo, hi) in zip(indices, values, strict=True):
                table[i] = (lo, hi)
            return
        lo, hi = value
        _slicing.own_idt(self._fuel)[index] = (lo, hi)

    def __delitem__(self, index: int | slice) -> None:
        raise TypeError("IDT entries cannot be deleted")

    def insert(self, index: int, value: tuple[int, int]) -> None:
        raise TypeError("IDT entries cannot be inserted")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Idt({[gate for gate in self if gate != (0, 0)]!r} set)"


class _InFuel:
    """An LgCpu field whose one copy lives in the CPU's ``Fuel`` (shared with ``_fuel.c``).

    The dataclass field stays (its mark, its default), but reading and assigning it
    go to the fuel: there is no second copy that a hypercall completed in C could
    leave stale.  ``get`` and ``put`` convert between the field's value and the fuel.
    """

    def __init__(
        self, get: Callable[[_slicing.Fuel], Any], put: Callable[[_slicing.Fuel, Any], None]
    ):
        self.get = get
        self.put = put

    def __get__(self, cpu: LgCpu | None, owner: type) -> Any:
        if cpu is None:
            return self
        return self.get(cpu.fuel)

    def __set__(self, cpu: LgCpu, value: Any) -> None:
        self.put(cpu.fuel, value)


# -- the parts of a CPU, each written by one room (docs/architecture.md) --------------
@dataclass(eq=False, slots=True)
class RunControl:
    """The run state: written on the event loop by ``device.py`` (requests, reads,
    close) and ``run.py`` (the run loop), and by :meth:`LgCpu.wake`.  A worker only
    reads it (``run._may_go_on``), and every writer that needs the run loop kicks the
    CPU afterwards."""

    # Why the CPU is held: while set the run loop parks at an instruction boundary
    # instead of entering the guest.
    hold: Hold | None = host_only(default=None)
    break_out: bool = saved(default=False)  # a Waker's LHREQ_BREAK 1, until BREAK 0
    break_released: Flag = host_only(default_factory=Flag)
    reading: bool = host_only(default=False)  # a read of this CPU is in flight
    closing: bool = host_only(default=False)  # close(): every later pass ends with EBADF
    wakeup: Flag = host_only(default_factory=Flag)  # the run loop's sleep
    idle: Flag = host_only(default_factory=Flag)  # set: no executor slice
    # An executor run (a slicepool.Job) submitted and not finished.  Its cancel()
    # withdraws it while it waits in the pool's queue (before its first slice or between
    # two); while a slice runs it only asks the run to end after that slice.
    queued_slice: concurrent.futures.Future[Any] | None = host_only(default=None)
    inline: bool = host_only(default=True)  # the next slice may run on the event loop
    # An inline slice delivered an irq and ran out of time in its handler: the next executor
    # run is urgent (slicepool: the front of the queue, at most twice per round).
    urgent: bool = host_only(default=False)
    # The read's wait for its executor run, which a Waker's break ends early (run.break_out),
    # as does a wake() that withdraws the run from the pool's queue.
    on_break: asyncio.Future[None] | None = host_only(default=None)
    # An executor run a break left going on with no read in flight (its asyncio future):
    # the next read takes it over instead of starting one (run._run_slice).
    detached: asyncio.Future[Any] | None = host_only(default=None)
    # The loop thread's CPU time (time.thread_time) when its run loop last waited: a yield
    # or a sleep (run.YIELD_TIME counts from there), or when the CPU was made (on the
    # loop): a new CPU's first slice, its start-up, needs no turn of the loop first.
    yielded_at: float = host_only(default_factory=time.thread_time)
    # An irq was raised (not into a slice in progress) since this CPU last asked for its
    # turn on the guest's processor: that turn does not wait out a sibling's run, even if
    # the CPU cannot take the irq this instant (run._take_turn; one such turn per raise).
    irq_raised: bool = host_only(default=False)
    # The reader's restart (LguestFile.rest_when_idle): set, a read may end while the CPU
    # sleeps with its registers packed (it rests); the CPU's next wake() calls it once.
    rest: Callable[[], None] | None = host_only(default=None)
    resting: bool = host_only(default=False)  # its last read ended resting: no read in flight


# The run loop's hooks for a CPU's instance (new_cpu): called with ``hooked`` False to
# install them on a bare instance; True when the instance has them already (it served a
# CPU of the same kind) or the CPU has none yet, to set up only the CPU's own part of
# them (its slice meter's), which the hooks read through the instance's seat.
InstallHooks = Callable[["LgCpu", bool], None]


@dataclass(eq=False, slots=True)
class Engine:
    """The emulator a CPU runs on and its dormancy: the part an engine pool hands around.

    :meth:`LgCpu.hibernate`, :meth:`LgCpu.thaw` and :meth:`LgCpu.close` (event loop)
    write the instance, its registers, hooks and frozen context; ``hibernation.py``
    writes ``dormitory_due``.  While ``frozen`` holds the registers, ``uc`` and ``regs``
    are None and the first use of the emulator takes a new one.
    """

    uc: Any = host_only()  # None once closed or hibernated
    regs: _unicorn.Registers = host_only()  # (None while uc is)
    host_address: int = host_only()  # where the guest's memory is (mem_map_ptr)
    tcg_buffer: int = host_only(default=DEFAULT_TCG_BUFFER)
    install_hooks: InstallHooks | None = host_only(default=None)  # on each new uc
    hooks: list[Any] = host_only(default_factory=list)  # keeps the hooks' callbacks alive
    frozen: bytes | None = host_only(default=None)  # the registers while hibernated
    # `frozen` holds _unicorn.pack_context's bytes (it slept long: supervisor.hibernation)
    packed: bool = host_only(default=False)
    pack_queued: bool = host_only(default=False)  # the dormitory will look at it to pack it
    released: bool = host_only(default=False)  # close() ran: nothing is left
    hibernate_after: float = host_only(default=math.inf)  # seconds drowsy before it does
    dormitory_due: float = host_only(default=math.inf)  # its dormitory queue entry's time
    # The device's engine pool (supervisor.engines), if it has one: instances come from
    # it and go back to it instead of being made and freed.
    pool: EnginePool | None = host_only(default=None)
    last: Any = host_only(default=None)  # the instance it last gave back to the pool
    token: object = host_only(default_factory=object)  # who gave it back (affinity)
    # Its last executor slice computed until its time ran out or it was stopped: with a
    # pool, the engine it gives back between slices is kept for it (supervisor.engines).
    busy: bool = host_only(default=False)
    # Unicorn raised inside this instance (emu_start, a switch): it is never handed on.
    tainted: bool = host_only(default=False)


@dataclass(eq=False, slots=True)
class Clock:
    """The CPU's armed clock event and when it is due (the loop's clock): ``timers.py``
    writes both, on the event loop."""

    event: asyncio.Handle | None = host_only(default=None)
    due: float = host_only(default=0.0)


@dataclass(eq=False, slots=True)
class ThreadCheck:
    """The threading contract's check (asyncio debug mode): set at creation; the slice
    (``execute.py``) writes ``slice`` while it runs."""

    enabled: bool = host_only(default=False)
    loop: int = host_only(default=0)  # the event loop's thread
    slice: int | None = host_only(default=None)  # the thread running a slice now


@dataclass(eq=False, slots=True)
class Debugging:
    """What a debugger attached: :meth:`LgCpu.add_code_hook` / ``remove_hook`` count
    the code hooks (no hibernation meanwhile); ``LguestFile.watch`` sets ``on_hold``,
    which the run loop calls when the CPU parks or dies."""

    code_hooks: int = host_only(default=0)
    on_hold: Callable[[], None] | None = host_only(default=None)


@dataclass(eq=False)
class LgCpu:
    """A guest CPU.  Create with :func:`new_cpu` or :func:`revive_cpu`.

    The guest's state (marked saved) and the slice's working state are fields here;
    the Host's machinery is in parts, each written by one room: ``run``, ``engine``,
    ``clock``, ``threads``, ``debug``.
    """

    # -- the guest's state (part of CpuState) ------------------------------------------
    id: int = saved()
    start: int = saved()
    # -- the Host's machinery (not part of the state) ----------------------------------
    lg: Lguest = host_only()
    engine: Engine = host_only()
    fuel: _slicing.Fuel = host_only()
    # -- the guest's state, continued ----------------------------------------------------
    irqs_pending: int = saved(default=0)  # in `fuel` (below the class), as ts is
    halted: bool = saved(default=False)
    # CPU 0 is online from INITIALIZE; another CPU once a running one started it
    # (LHCALL_START_CPU).  An offline CPU never runs: its read waits for the start.
    online: bool = saved(default=True)
    lguest_data: int | None = saved(default=None)  # guest-physical, once its LGUEST_INIT ran
    hcall: tuple[int, int, int, int] | None = saved(default=None)  # trapped, not yet done
    next_hcall: int = saved(default=0)  # next slot of the async ring
    pending_notify: int = saved(default=0)  # a notify not yet handed to the Launcher
    # ts, idt and stack live in `fuel` (see _InFuel below the class): one copy, which
    # _fuel.c's interrupt hook changes when it completes a hypercall natively.
    ts: int = saved(default=0)
    idt: MutableSequence[tuple[int, int]] = saved(default_factory=_idt)
    gdt: tuple[int, int] = saved(default=(0, 0))  # guest-physical table, entries
    tls: bytes = saved(default=b"")
    stack: tuple[int, int, int] = saved(default=(0, 0, 0))  # ss, esp, pages
    limits: Limits = saved(default=UNLIMITED)
    stats: CpuStats = saved(default_factory=CpuStats)

    # -- the Host's machinery, continued --------------------------------------------------
    run: RunControl = host_only(default_factory=RunControl)
    clock: Clock = host_only(default_factory=Clock)
    threads: ThreadCheck = host_only(default_factory=ThreadCheck)
    debug: Debugging = host_only(default_factory=Debugging)
    # The slice's own (execute.py): its adaptive length in blocks, and whether the last
    # inline slice that delivered no interrupt used up its time (the guest computes
    # through them: the next one gets INLINE_TIME, not LONG_INLINE_TIME).
    budget: int = host_only(default=DEFAULT_BUDGET)
    inline_spent: bool = host_only(default=False)
    trap: Trap = host_only(default_factory=Trap)  # what the hooks recorded (the slice)
    # Guest-physical ranges the Host wrote since the CPU last ran (supervisor.codecache):
    # a list, whose appends and pops are each atomic as a deque's are, and which holds no
    # storage while empty (a deque keeps a block of 0.5 KiB even then).
    stale_code: list[tuple[int, int]] = host_only(default_factory=list)
    # Instances hibernate() gave back minus those thaw() took, in this process: the C
    # heap keeps their memory for reuse (supervisor.hibernation decides when to trim it).
    given_back: ClassVar[int] = 0
    # Packed registers unpacked (a packed CPU took an engine) in this process: the bytes
    # they take again fill the holes in the C heap that packing left (what
    # supervisor.hibernation weighs before a trim).
    unpacked: ClassVar[int] = 0

    # -- any thread -------------------------------------------------------------
    def kick(self) -> None:
        """End the running slice at its next block boundary (or the next one to start).

        The only call any thread may make; the event loop uses :meth:`wake`.
        """
        _slicing.kick(self.fuel)

    # -- event loop -------------------------------------------------------------------
    def wake(self) -> None:
        """Something happened the run loop must see now (an irq, a break, a hold, close).

        The one way to wake a CPU, like lguest's ``wake_up_process || kick_process``:
        a sleeping run loop is woken; a run waiting in the executor's queue is
        withdrawn (the run loop sees the news without waiting its turn); a running one
        is kicked.  Either way the next slice runs briefly on the event loop.  A CPU whose
        read ended resting (no read in flight) has its reader's restart called.
        """
        self.kick()
        queued = self.run.queued_slice
        if queued is not None and queued.cancel():
            # Withdrawn: the read that waits for it (or a break) sees it in the next turn
            # of the loop, not after the cancellation has reached its asyncio future.
            waiter = self.run.on_break
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        self.run.inline = True
        self.run.wakeup.set()
        if self.run.resting:  # no read in flight: the reader reads again
            self.run.resting = False
            if self.run.rest is not None:
                self.run.rest()

    def raise_irq(self, irq: int) -> None:
        """Mark ``irq`` pending and have it seen promptly: a slice in progress on a worker
        (exit-request path) stops its run at the next block boundary, delivers it and
        goes on without the run loop (``_slicing.raise_irq``); anything else is woken.
        (The event loop calls this, so no inline slice is in progress meanwhile.)"""
        if not _slicing.raise_irq(self.fuel, irq, self.threads.slice is not None):
            self.run.irq_raised = True
            self.wake()

    def take_irq(self, irq: int) -> None:
        """Clear a pending irq once it has been delivered (the slice's thread)."""
        _slicing.take_irq(self.fuel, irq)

    # -- any thread -------------------------------------------------------------
    def heed_write(self) -> None:
        """The Host wrote guest memory (noted in ``stale_code``): stale code must not run.

        A slice in progress (exit-request path) stops its run at the next block boundary,
        drops the stale translations and goes on, as for an interrupt
        (``_slicing.interrupt``); anything else is kicked, and drops them before it
        enters the guest again."""
        _slicing.heed(self.fuel, self.threads.slice is not None)

    @property
    def running(self) -> bool:
        """True while an executor slice of this CPU is queued or running."""
        return not self.run.idle.is_set()

    # -- registers (whoever owns the CPU right now) ------------------------------
    def check_thread(self) -> None:
        """In debug mode, raise :class:`ThreadError` unless this thread owns the CPU now."""
        if not self.threads.enabled:
            return
        me = threading.get_ident()
        owner = self.threads.slice
        if owner is None and self.running:
            owner = -1  # a slice is queued or starting: nobody may touch the CPU
        if owner is None:
            owner = self.threads.loop
        if me != owner:
            raise ThreadError(
                f"cpu {self.id} touched from thread {me}; "
                + ("a slice owns it" if owner != self.threads.loop else "the event loop owns it")
            )

    @property
    def closed(self) -> bool:
        """True once :meth:`close` freed everything."""
        return self.engine.released

    @property
    def hibernated(self) -> bool:
        return self.engine.frozen is not None

    @property
    def emulator(self) -> Any:
        """The Unicorn instance, taking a new one first if the CPU hibernates."""
        self.check_thread()
        if self.engine.frozen is not None:
            self.thaw()
        return self.engine.uc

    @property
    def eip(self) -> int:
        return self.reg(r.UC_X86_REG_EIP)

    def _live_regs(self) -> _unicorn.Registers:
        """The registers, from the thread that owns the CPU now (thawed if it hibernated)."""
        self.check_thread()
        if self.engine.frozen is not None:
            self.thaw()
        return self.engine.regs

    def reg(self, reg: int) -> int:
        return self._live_regs().read(reg)

    def control(self) -> tuple[int, int, int]:
        """cr0, cr3, cr4, in one read."""
        return self._live_regs().control()

    def frame(self) -> tuple[int, int, int, int]:
        """eflags, cs, eip, esp, in one read."""
        return self._live_regs().frame()

    def set_reg(self, reg: int, value: int) -> None:
        self._live_regs().write(reg, value)

    # -- the engine: taken while the CPU runs, given back while it waits -----------------
    def release_engine(self, keep: bool = False) -> bool:
        """Give back the Unicorn instance (to the device's engine pool, or freed), keeping
        the registers as bytes; True if it had one to give.  ``keep``: the CPU is
        runnable, and the pool keeps the engine for it (:meth:`EnginePool.give`); not
        ``keep``: it waits, and an engine the pool kept for it becomes a spare.

        Refused (False) while a debugger's code hooks are installed (they live in that
        instance) and once closed.  Whoever owns the CPU now: the event loop while no
        slice is queued or runs, or the thread running its executor step.
        """
        engine = self.engine
        uc = engine.uc
        if uc is None or self.debug.code_hooks or engine.released:
            if uc is None and not keep and engine.pool is not None and engine.last is not None:
                engine.pool.rest(engine.token, engine.last)
            return False
        self.check_thread()
        engine.frozen = _unicorn.context_data(uc)
        _give_back(engine, uc, _hook_kind(self), keep)
        engine.uc = None
        engine.regs = None  # type: ignore[assignment]  # (with uc)
        if engine.pool is None:
            LgCpu.given_back += 1  # (a pool keeps the instance: no memory went back)
        return True

    def take_engine(self) -> float | None:
        """Take an instance for the kept registers; None if it needs none (it has one,
        or is closed), else the CPU seconds (this thread's) a switched or new engine took
        to set up, 0.0 for its own engine back from the pool, untouched, which still
        holds them (supervisor.engines).  The owner of the CPU, as for
        :meth:`release_engine`."""
        engine = self.engine
        frozen = engine.frozen
        if frozen is None or engine.released:
            return None
        self.check_thread()  # (a take beside a run's release would be undone by it)
        self.lg.unpack_memory()  # an engine maps the memory by address, not through ram
        pool = engine.pool
        # Its own engine back costs nothing to set up: the CPU clock (a system call, about
        # as dear as the rest of the take) is read only for a switch or a new engine, and
        # before any of it (the reclaim decides under the pool's lock which it is).
        own = pool is not None and pool.reclaim(engine.token, engine.last)
        started = 0.0 if own else time.thread_time()
        if pool is None:
            uc = _new_uc(self.lg, engine.host_address, engine.tcg_buffer)
            taken = Taken.BARE
            LgCpu.given_back -= 1
        else:
            uc, taken = _take(self.lg, engine, _hook_kind(self), own)
        try:
            place = _unicorn.seat(uc)
            engine.uc = uc
            engine.regs = place.regs
            if taken is not Taken.OWN:  # a new or switched instance: meter, hooks, registers
                place.cpu = self
                _slicing.attach(uc, self.fuel, hooked=taken is Taken.HOOKED)
                if taken is Taken.BARE:
                    _install_hooks(self)
                if engine.packed:
                    frozen = _unicorn.unpack_context(frozen)
                    LgCpu.unpacked += 1
                # (No TLB entry of its previous CPU is left to drop: mapping this CPU's
                # memory, which every take but of its own engine does, flushed the TLB, as
                # Unicorn does at every change of the memory map.)
                _unicorn.load_context_data(uc, frozen)
        except BaseException:
            engine.tainted = True
            _give_back(engine, uc, None)
            engine.uc = None
            engine.regs = None  # type: ignore[assignment]
            raise
        engine.frozen = None
        engine.packed = False
        if taken is Taken.OWN:
            return 0.0
        # A switched or new instance holds no translation (unbind and strip flush them), so
        # no Host write can be stale in it: nothing to drop before the guest runs again.
        self.stale_code.clear()
        spent = time.thread_time() - started
        if engine.pool is not None:
            engine.pool.charge(spent)
        return spent

    def hibernate(self) -> bool:
        """Give back the Unicorn instance while the CPU waits (:meth:`release_engine`).

        Refused (False) while a slice is queued or runs, while a debugger's code
        hooks are installed, and once closed.  Event loop only.
        """
        if self.running or not self.release_engine():
            return False
        self.stats.hibernations += 1
        return True

    def pack_registers(self) -> bool:
        """Keep the registers of a CPU that gave its emulator back packed
        (:func:`_unicorn.pack_context`, about 5 KiB less), and its IDT in the table
        shared by the CPUs whose IDT has the same bytes (``_slicing.share_idt``, 2 KiB
        less); True if it packed them.  Event loop, while no slice is queued or runs;
        the next take unpacks the registers, the next run copies the IDT."""
        engine = self.engine
        if engine.frozen is None or engine.packed or engine.released or self.running:
            return False
        engine.frozen = _unicorn.pack_context(engine.frozen)
        engine.packed = True
        _slicing.share_idt(self.fuel)  # (its own again at its next run)
        if engine.pool is not None and engine.last is not None:
            # Asleep this long, it rarely finds its engine untouched when it wakes: take
            # it off that engine now (EnginePool.disown: its memory unmapped, the engine
            # the first spare to switch), not in the take of whichever wake switches it.
            engine.pool.disown(engine.token, engine.last)
            engine.last = None
        return True

    def thaw(self) -> float | None:
        """Take an instance with the kept registers (no effect if it has one); what
        :meth:`take_engine` answers."""
        spent = self.take_engine()
        if spent is not None:
            self.stats.wakes += 1
        return spent

    def flush_tlb(self) -> None:
        """Drop cached translations; the guest's page tables are read afresh."""
        self.set_reg(r.UC_X86_REG_CR3, self.reg(r.UC_X86_REG_CR3))

    def flush_code(self) -> None:
        """Forget every translated block: code is translated afresh from memory."""
        self.emulator.ctl_flush_tb()

    def add_code_hook(self, callback: Callable[..., None], begin: int = 1, end: int = 0) -> Any:
        """A Python hook before each instruction in ``[begin, end]`` (every one when
        ``begin > end``); it runs on the slice's thread.  Held CPUs only; the CPU does
        not hibernate while it has such hooks."""
        uc = self.emulator
        _slicing.exact_blocks(uc, self.fuel)  # code hooks must stop before an instruction
        hook = uc.hook_add(UC_HOOK_CODE, callback, begin=begin, end=end)
        uc.ctl_flush_tb()  # blocks translated before the hook would not call it
        self.debug.code_hooks += 1
        return hook

    def remove_hook(self, hook: Any) -> None:
        """Remove a hook from :meth:`add_code_hook` (no effect once the CPU is closed)."""
        if self.engine.uc is None:
            return
        self.check_thread()
        self.engine.uc.hook_del(hook)
        self.engine.uc.ctl_flush_tb()
        self.debug.code_hooks -= 1

    # -- the state value ---------------------------------------------------------------
    def capture(self, timer_ns: int | None) -> CpuState:
        """This CPU as a :class:`CpuState` (event loop; no slice may run).

        ``timer_ns`` is the clock event's part (:func:`supervisor.timers.remaining`).
        """
        self.check_thread()
        if self.running:
            raise StateError(f"cpu {self.id} is running")
        values = {name: getattr(self, name) for name in _SAVED}
        for part, names in _SAVED_PARTS:
            values.update((name, getattr(getattr(self, part), name)) for name in names)
        values["idt"] = tuple(self.idt)
        values["stats"] = tuple(
            (f.name, getattr(self.stats, f.name)) for f in dataclasses.fields(CpuStats)
        )
        engine = self.engine
        if engine.frozen is None:
            context = _unicorn.context_data(engine.uc)
        else:
            context = _unicorn.unpack_context(engine.frozen) if engine.packed else engine.frozen
        return CpuState(context=context, timer_ns=timer_ns, **values)

    def restore(self, state: CpuState) -> None:
        """Put this (not running) CPU into ``state``; the timer is the caller's part."""
        self.check_thread()
        for name in _SAVED:
            setattr(self, name, getattr(state, name))
        for part, names in _SAVED_PARTS:
            for name in names:
                setattr(getattr(self, part), name, getattr(state, name))
        self.idt = list(state.idt)
        counters = {f.name for f in dataclasses.fields(CpuStats)}
        self.stats = CpuStats(**{k: v for k, v in state.stats if k in counters})  # type: ignore[arg-type]
        self.fuel.blocks = self.stats.blocks
        self.fuel.native_done = 0  # (counted into stats after each run; none is pending here)
        uc = self.emulator
        try:
            _unicorn.load_context_data(uc, state.context)
        except ValueError as exc:
            raise StateError(str(exc)) from None
        _unicorn.forget_exception(uc)
        uc.ctl_flush_tb()
        self.flush_tlb()
        if self.run.break_out:
            self.run.break_released.clear()
        else:
            self.run.break_released.set()

    # -- the end ----------------------------------------------------------------------------
    def close(self) -> None:
        """Free the Unicorn instance now, not at the next garbage collection.

        Only when no slice runs.
        """
        engine = self.engine
        engine.released = True
        engine.frozen = None
        engine.packed = False
        uc = engine.uc
        if uc is not None:
            _give_back(engine, uc, _hook_kind(self))
            engine.uc = None
        if engine.pool is not None and engine.last is not None:
            # Its engine waits in the pool with its hooks, which hold this CPU (and so the
            # guest's memory): take them off now, not when another CPU takes it.
            engine.pool.disown(engine.token, engine.last)
        engine.last = None


def _put_idt(fuel: _slicing.Fuel, value: Iterable[tuple[int, int]]) -> None:
    if type(value) is _NoGates:
        _slicing.clear_idt(fuel)
        return
    Idt(fuel)[:] = list(value)


def _put_stack(fuel: _slicing.Fuel, value: tuple[int, int, int]) -> None:
    fuel.stack[:] = list(value)


def _put_ts(fuel: _slicing.Fuel, value: int) -> None:
    fuel.ts = value


def _put_pending(fuel: _slicing.Fuel, value: int) -> None:
    fuel.irqs_pending = value  # (a whole new set: only while no slice runs, e.g. restore)


# The dataclass' __init__ assigns these after `fuel` (declared first), through the views.
for _name, _view in (
    ("ts", _InFuel(lambda fuel: fuel.ts, _put_ts)),
    ("irqs_pending", _InFuel(lambda fuel: fuel.irqs_pending, _put_pending)),
    ("idt", _InFuel(Idt, _put_idt)),
    ("stack", _InFuel(lambda fuel: tuple(fuel.stack), _put_stack)),
):
    setattr(LgCpu, _name, _view)

_SAVED = saved_fields(LgCpu)
# The parts of an LgCpu by field name.  Their fields are marked like LgCpu's own; a
# part's saved fields are in CpuState under their own names.
PARTS: dict[str, type] = {
    "run": RunControl,
    "engine": Engine,
    "clock": Clock,
    "threads": ThreadCheck,
    "debug": Debugging,
}
_SAVED_PARTS = tuple((p, saved_fields(c)) for p, c in PARTS.items() if saved_fields(c))


def _new_uc(lg: Lguest, host_address: int, tcg_buffer: int, uc: Any = None) -> Any:
    # No exit address, so emu_start's `until` is ignored: a real one makes Unicorn probe
    # that address and leave a stale page fault behind (_unicorn.configure).
    if uc is None:
        uc = _unicorn.new_instance(tcg_buffer)
    _unicorn.map_memory(uc, lg.limit, host_address)
    hostpages.map_into(uc)  # the boot GDT, read-only, in every instance (thaws too)
    return uc


def bad_access_range(lg: Lguest) -> tuple[int, int]:
    """The guest-physical addresses the bad-access hook covers: everything past guest memory.

    Guest memory ``[0, limit)`` is mapped with every permission, so no access there is
    ever invalid; the Host's read-only pages and unmapped addresses all lie at or past
    ``limit``.  Unicorn checks a hook's range against the physical address.  A
    ``UC_HOOK_MEM_*`` hook whose range covers a page keeps every store to that page on
    Unicorn's slow path (its ``notdirty_write`` never marks a hooked page dirty), so the
    hook must leave guest memory out for stores there to take the TLB fast path.
    """
    return lg.limit, MAX_PHYSICAL


def _hook_kind(cpu: LgCpu) -> object:
    """What the hooks of ``cpu``'s instances fit (:attr:`_unicorn.Seat.kind`): another CPU
    of the same kind may take an instance with its hooks kept.  They differ by the run
    loop's hooks (``install_hooks``), the bad-access hook's range (the guest's memory
    size) and the slice meter's path; None while a debugger's code hooks are installed
    (they are this CPU's alone)."""
    if cpu.debug.code_hooks:
        return None
    return (cpu.engine.install_hooks, cpu.lg.limit, cpu.fuel.exit_request)


def _take(lg: Lguest, engine: Engine, kind: object = None, own: bool = False) -> tuple[Any, Taken]:
    """An instance from ``engine.pool`` for this CPU, with its memory mapped, and how it
    came (:meth:`EnginePool.take`: ``OWN``, its own untouched one, hooks, translations
    and mapping still its own; ``HOOKED``, with hooks of ``kind``; ``BARE``).  ``own``:
    the caller already took ``engine.last`` back (:meth:`EnginePool.reclaim`)."""
    assert engine.pool is not None
    if own:
        uc, taken = engine.last, Taken.OWN
    else:
        uc, taken = engine.pool.take(engine.token, engine.last, kind)
    engine.last = None
    engine.tainted = False
    _unicorn.seat(uc).kind = None  # (set again when given back: hooks may change meanwhile)
    if taken is not Taken.OWN:
        engine.hooks.clear()  # (the CPU's hooks are the instance's now, or gone)
        try:
            if taken is Taken.HOOKED:
                _unicorn.map_memory(uc, lg.limit, engine.host_address)
            else:
                _new_uc(lg, engine.host_address, engine.tcg_buffer, uc)
        except BaseException:
            engine.pool.give(engine.token, uc, tainted=True)
            raise
    return uc, taken


def _give_back(engine: Engine, uc: Any, kind: object, keep: bool = False) -> None:
    """``uc`` leaves this CPU: to its pool (closed there if tainted; kept for the CPU if
    ``keep``), or freed.  ``kind``: what its hooks fit (:func:`_hook_kind`), for the CPU
    that takes it next."""
    if engine.pool is None:
        _unicorn.close(uc)
        engine.hooks.clear()
        return
    _unicorn.seat(uc).kind = None if engine.tainted else kind
    engine.pool.give(engine.token, uc, engine.tainted, keep)
    engine.last = None if engine.tainted else uc
    engine.tainted = False


def _install_hooks(cpu: LgCpu) -> None:
    """The hooks every Unicorn instance of ``cpu`` has (again after a thaw), installed
    once per instance: they find their CPU through the instance's seat
    (:class:`_unicorn.Seat`), so a CPU of the same :func:`_hook_kind` keeps them."""
    place = _unicorn.seat(cpu.engine.uc)
    place.cpu = cpu

    def on_bad_access(uc: Any, access: int, address: int, *_rest: object) -> bool:
        place.cpu.trap.bad_access = (_ACCESS_KINDS.get(access, "access"), address)
        return False

    begin, end = bad_access_range(cpu.lg)
    hook = cpu.engine.uc.hook_add(UC_HOOK_MEM_INVALID, on_bad_access, begin=begin, end=end)
    cpu.engine.hooks.append(hook)
    if cpu.engine.install_hooks is not None:
        cpu.engine.install_hooks(cpu, False)


def _attach(
    lg: Lguest,
    cpu_id: int,
    start: int,
    host_address: int,
    tcg_buffer: int,
    limits: Limits,
    install_hooks: InstallHooks | None,
    hibernate_after: float,
    pool: EnginePool | None,
    boot: bytes | None = None,
) -> LgCpu:
    """The CPU's parts and its first engine: none if ``boot`` (a pool's new CPU, whose
    registers are those context bytes until its first slice takes an engine)."""
    loop = asyncio.get_running_loop()
    count_blocks = limits.max_blocks is not None
    if boot is not None:
        uc = None
    elif pool is None:
        uc = _new_uc(lg, host_address, tcg_buffer)
    else:
        engine = Engine(uc=None, regs=None, host_address=host_address, tcg_buffer=tcg_buffer)  # type: ignore[arg-type]
        engine.pool = pool
        uc, _ = _take(lg, engine)
        try:  # a new CPU's registers are a new instance's, whoever used this one before
            _unicorn.load_context_data(uc, _unicorn.blank_context())
        except BaseException:
            pool.give(engine.token, uc, tainted=True)
            raise
    cpu = LgCpu(
        id=cpu_id,
        start=start,
        limits=limits,
        lg=lg,
        engine=Engine(
            uc=uc,
            regs=None if uc is None else _unicorn.Registers(uc),  # type: ignore[arg-type]
            host_address=host_address,
            tcg_buffer=tcg_buffer,
            install_hooks=install_hooks,
            frozen=boot,
            # With a pool a CPU gives its engine back whenever it waits (supervisor.engines).
            hibernate_after=hibernate_after if pool is None else 0.0,
            pool=pool,
        ),
        fuel=(
            _slicing.new_fuel(count_blocks)
            if uc is None
            else _slicing.attach(uc, count_blocks=count_blocks)
        ),
        threads=ThreadCheck(enabled=loop.get_debug(), loop=threading.get_ident()),
    )
    cpu.run.break_released.set()
    cpu.run.idle.set()
    if uc is not None:
        _install_hooks(cpu)
    elif install_hooks is not None:
        install_hooks(cpu, True)  # its own part now: its first engine may keep its hooks
    return cpu


def new_cpu(
    lg: Lguest,
    cpu_id: int,
    host_address: int,
    start: int,
    pgdir: int,
    tcg_buffer: int,
    limits: Limits = UNLIMITED,
    install_hooks: InstallHooks | None = None,
    hibernate_after: float = math.inf,
    pool: EnginePool | None = None,
) -> LgCpu:
    """Create CPU ``cpu_id`` of ``lg`` (event loop): guest memory mapped at 0, paging on
    at ``pgdir``.  ``install_hooks`` adds the run loop's hooks to each Unicorn instance
    the CPU gets (this one, and a new one after each hibernation); they must find their
    CPU through the instance's seat (:func:`_unicorn.seat`), never hold it: a pool hands
    the instance, hooks and all, to the next CPU with the same ``install_hooks``
    (:func:`_hook_kind`); ``hibernate_after``
    is how long it may sleep before it gives back its emulator (supervisor.hibernation);
    ``pool``: where its instances come from and go back to (supervisor.engines); with
    a pool the CPU returns holding none.

    The CPU starts at ring 0 in lguest's boot segments (the Host's read-only GDT,
    supervisor.hostpages, which entry 1023 of ``pgdir`` now maps), ``eip = start``,
    ``eflags = 0x202`` and ``esi = 0`` (the boot information page).
    """
    # With a pool the CPU holds an engine only while it runs: its registers wait as the
    # boot context, and its first slice takes an engine (switched, as at any wake).
    boot = boot_context(start, pgdir) if pool is not None else None
    cpu = _attach(
        lg, cpu_id, start, host_address, tcg_buffer, limits, install_hooks, hibernate_after,
        pool, boot,
    )  # fmt: skip
    lg.host_wrote(hostpages.install(lg.ram, pgdir), 4)
    if boot is None:
        setup_regs(cpu.engine.uc, start, pgdir)
    return cpu


def revive_cpu(
    lg: Lguest,
    state: CpuState,
    host_address: int,
    tcg_buffer: int,
    install_hooks: InstallHooks | None = None,
    hibernate_after: float = math.inf,
    pool: EnginePool | None = None,
) -> LgCpu:
    """A CPU of ``lg`` in ``state`` (event loop); its timer is the caller's part."""
    cpu = _attach(
        lg, state.id, state.start, host_address, tcg_buffer, state.limits, install_hooks,
        hibernate_after, pool,
    )  # fmt: skip
    try:
        cpu.restore(state)
    except BaseException:
        cpu.close()
        raise
    return cpu


def start_secondary(cpu: LgCpu, starter: LgCpu, eip: int, esp: int) -> None:
    """Bring offline ``cpu`` online at ``eip`` with stack ``esp`` (LHCALL_START_CPU).

    It begins with a copy of ``starter``'s registers (segments with their
    descriptor caches, control registers, page directory, FPU), IDT, GDT, TLS and
    kernel stack, then ``eip``, ``esp``, ``eflags = 0x202`` and ``eax`` = its own
    number; it has no ``lguest_data`` yet, so its first hypercall must be its own
    ``LGUEST_INIT``, as CPU 0's was.  Event loop; neither CPU may be running.
    """
    context = _unicorn.context_data(starter.emulator)
    uc = cpu.emulator
    _unicorn.load_context_data(uc, context)
    _unicorn.forget_exception(uc)
    uc.ctl_flush_tb()
    cpu.idt = list(starter.idt)
    cpu.gdt, cpu.tls, cpu.stack, cpu.ts = starter.gdt, starter.tls, starter.stack, starter.ts
    cpu.set_reg(r.UC_X86_REG_EIP, eip)
    cpu.set_reg(r.UC_X86_REG_ESP, esp)
    cpu.set_reg(r.UC_X86_REG_EFLAGS, X86_EFLAGS_IF | 0x2)
    cpu.set_reg(r.UC_X86_REG_EAX, cpu.id)
    cpu.start = eip
    cpu.halted = False
    cpu.lguest_data = None
    cpu.online = True


BOOT_CONTEXTS = 64  # boot_context's (start, pgdir) pairs kept, 5.4 KiB each


@functools.lru_cache(maxsize=BOOT_CONTEXTS)
def boot_context(start: int, pgdir: int) -> bytes:
    """The registers a new CPU starts with (:func:`setup_regs` on a new instance), as
    context bytes (:func:`_unicorn.context_data`): made once per ``(start, pgdir)`` on
    an instance of its own, so that a pool's new CPU needs no engine until it runs.
    They depend on nothing else: the boot segments are read from the Host's pages,
    the same in every instance."""
    uc = _unicorn.new_instance(DEFAULT_TCG_BUFFER)
    try:
        hostpages.map_into(uc)
        setup_regs(uc, start, pgdir)
        return _unicorn.context_data(uc)
    finally:
        _unicorn.close(uc)


def setup_regs(uc: Any, start: int, pgdir: int) -> None:
    """The registers a guest starts with (``lguest_arch_setup_regs``), on a new
    instance (or one given a new instance's registers) with the Host's pages mapped:
    cs, ds, es, ss in lguest's boot segments, paging on at ``pgdir``."""
    uc.reg_write(r.UC_X86_REG_CR3, pgdir)
    uc.reg_write(r.UC_X86_REG_CR4, uc.reg_read(r.UC_X86_REG_CR4) | CR4_PSE)
    _unicorn.reset_fpu(uc)  # FCW 0x37F, MXCSR 0x1F80, SSE enabled
    uc.reg_write(r.UC_X86_REG_CR0, uc.reg_read(r.UC_X86_REG_CR0) | CR0_PE)
    hostpages.load_boot_segments(uc)  # before paging: see there
    uc.reg_write(r.UC_X86_REG_CR0, uc.reg_read(r.UC_X86_REG_CR0) | CR0_PG)
    uc.reg_write(r.UC_X86_REG_EFLAGS, X86_EFLAGS_IF | 0x2)
    uc.reg_write(r.UC_X86_REG_ESI, 0)
    uc.reg_write(r.UC_X86_REG_EIP, start)
