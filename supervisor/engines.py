"""Engines: configured, warmed Unicorn instances that a device's CPUs take in turn.

A Unicorn instance is cheap to create (tens of microseconds) but dear to warm: its
first memory mapping and its first ``emu_start`` make QEMU build the emulated
machine, about a millisecond and a mebibyte.  An :class:`EnginePool` owns a device's
instances, and a CPU holds one only while it runs or is about to: an executor step
(:func:`supervisor.execute.run_slice` on a worker) takes one when it starts and gives it
back when it ends; on the event loop a CPU takes one for its inline slices and its
hypercalls and gives it back before it waits for anything (a halt, a hold, its
Launcher, a worker, another task's turn).  Giving back keeps the registers as bytes
(:meth:`LgCpu.release_engine <supervisor.cpu.LgCpu.release_engine>`); taking loads them
(:meth:`LgCpu.take_engine <supervisor.cpu.LgCpu.take_engine>`).

Affinity: a CPU that takes an engine back which nobody took meanwhile gets it as it
left it: its memory mapping, hooks and translations intact (only its registers are
loaded again).  Any other engine is *switched* to the CPU.  Hooks find their CPU
through the instance's seat (:class:`supervisor._unicorn.Seat`), so an engine whose
previous CPU was of the same kind (``take``'s ``kind``: the same hooks, memory size
and slice path) keeps them: only the previous guest's memory is taken off
(:func:`supervisor._unicorn.unbind`, which drops the translations too).  Any other is
stripped of every hook and mapping (:func:`supervisor._unicorn.strip`) and gets the
CPU's hooks and slice meter installed.  Either way the CPU's memory is mapped at its
host address, the seat pointed at the CPU, its registers (FPU/SSE, descriptor tables,
paging included) loaded, and its TLB flushed.

Policy: a computing CPU's engine waits for it between its slices, so that a crowd of
busy CPUs runs as if each had its own; any other CPU's is a spare for anyone.  A give
back is *kept* while the CPU computes (``Engine.busy``: its last executor slice ran out
of time or was stopped mid-way, and it has not slept since) and *spare* otherwise (it
sleeps, is held, waits for its Launcher, or only ran short inline slices); a kept
engine turns spare when its CPU goes to sleep (:meth:`EnginePool.rest`).  A take gets,
in order: the CPU's own engine, untouched; one made ahead ("Made ahead" below); the
spare given back longest ago (the ones given back since are the likeliest to be taken
back by their own CPUs); a new one while fewer than ``bound`` live; the kept engine
given back last (an *eviction*: in a crowd taking turns in a queue, the CPU that ran
last runs again last, so its engine is the one the others need least).  Spares past
``spares`` (what runs at once: one per worker, one for the event loop, :data:`RESERVE`)
are closed, oldest first: the pool holds engines for what runs, not for the guests that
exist.

The bound: the pool makes at most ``bound`` engines whatever the guests do, by default
as many as a share of the machine's memory holds (:func:`default_bound`), at least one
per worker, one for the event loop's inline slices and :data:`RESERVE` more: at most
one step per worker runs at a time, and the run loop holds at most one engine between
two of its awaits (two while a CPU starts another), so at the bound an idle engine is
always there to switch (or on its way back: a take waits for one whose CPU
:meth:`EnginePool.disown` is taking off).  Only the Host's own calls on a CPU that does not run (a
debugger's register reads and code hooks, restoring a state) can hold more at once; a
take past the bound then makes an *overdraft* engine (:attr:`EnginePool.overdrafts`),
closed when it comes back, so ``live`` returns to the bound.

Made ahead: a new engine costs a new instance, most of it QEMU building the emulated
machine, and a crowd of CPUs that starts computing at once needs one each.  A take that
has to make one while runnable CPUs keep engines (a crowd computes) asks for engines
made ahead (:attr:`EnginePool.wanted`, the device's callback): the device's event loop
then makes them (:meth:`EnginePool.prepare`), one per loop turn, until ``spares`` idle
engines wait, spares and made ahead together (what runs at once: the same reserve), or
the bound is reached.  A take past the CPU's own engine gets one of those first: never
run, it needs no switch (the next CPUs of the crowd only map their memory and install
their hooks); and they are the first closed when a give back leaves too many spares.  A
lone CPU that takes a new engine asks for none.

An engine whose ``emu_start`` raised (``UcError``) or whose switch failed is never
handed on: :meth:`EnginePool.give` closes it (the CPU marks it ``Engine.tainted``), and
the next take past the idle ones makes a new one.

Modes (``LguestDevice(engines=...)``, default :data:`ENV`, ``LGUEST_ENGINE_SWITCH``,
else :data:`DEFAULT_MODE`): ``pool``; ``always``, the pool bounded by what runs at once
with every take switched (a CPU never gets back the engine it gave last, so that one
is taken off it at once, as at its close), the mode the exactness tests run under to
judge the switch; ``off``, no pool: each CPU keeps its own
instance until it hibernates (:mod:`supervisor.hibernation`), the only mode where
``hibernate_after`` matters (with a pool a CPU gives its engine back whenever it
sleeps).  Any thread: one lock guards the idle engines and the counts.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import _unicorn

ENV = "LGUEST_ENGINE_SWITCH"  # "pool", "always" (switch at every take), "off" (no pool)
MODES = ("off", "pool", "always")
DEFAULT_MODE = "pool"
# Engines a pool may make beyond one per worker and one for the event loop's inline
# slices: a CPU starting another holds two for a moment, and a switch that failed is
# replaced without waiting for a give.
RESERVE = 2
# The default bound (default_bound): engines may take up to 1/MEMORY_SHARE of the
# machine's physical memory, at ENGINE_MEMORY (what QEMU builds on the first run) plus
# the translation buffer each, and at most MAX_ENGINES of them.
MEMORY_SHARE = 8
ENGINE_MEMORY = 1 << 20
MAX_ENGINES = 4096


class Taken(enum.Enum):
    """How a taken engine comes (:meth:`EnginePool.take`)."""

    OWN = "own"  # the CPU's own, untouched: mapping, hooks, translations, registers
    HOOKED = "hooked"  # another CPU's of the same kind: hooks and flags kept, memory off
    BARE = "bare"  # stripped or new: nothing of any CPU


def default_bound(tcg_buffer: int) -> int:
    """How many engines a pool may make by default: as many as 1/MEMORY_SHARE of the
    physical memory holds at ENGINE_MEMORY + ``tcg_buffer`` each, at most MAX_ENGINES
    (2 if the memory cannot be read; for_workers raises it to what runs at once)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 2
    return max(2, min(MAX_ENGINES, memory // MEMORY_SHARE // (ENGINE_MEMORY + tcg_buffer)))


def mode_from_env() -> str:
    """The engine mode :data:`ENV` asks for (``ValueError`` for an unknown one)."""
    mode = os.environ.get(ENV, DEFAULT_MODE).strip().lower() or DEFAULT_MODE
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


class EnginePool:
    """The engines of one device: at most ``bound`` of them, idle ones remembered with
    the CPU that last held each (module docstring).

    ``always``: every take switches (never the engine the CPU gave back last).
    """

    __slots__ = (
        "_asked",
        "_closing",
        "_disowned",
        "_disowning",
        "_kept",
        "_lock",
        "_ready",
        "_spare",
        "_tcg_buffer",
        "always",
        "bound",
        "closed",
        "evicted",
        "hooked",
        "live",
        "made",
        "overdrafts",
        "peak",
        "prepare_time",
        "prepared",
        "ready_taken",
        "reused",
        "spares",
        "switch_cost",
        "switch_time",
        "switched",
        "taken",
        "wanted",
        "workers",
    )

    def __init__(
        self,
        tcg_buffer: int,
        bound: int,
        *,
        always: bool = False,
        workers: int = 1,
        spares: int | None = None,
    ) -> None:
        if bound < 2:
            raise ValueError(f"an engine pool needs a bound of at least 2 engines, not {bound}")
        self.bound = bound
        self.workers = workers  # the device's worker threads (see crowded())
        # Spare engines kept at most: what runs at once (one per worker, the loop's, the
        # reserve); a spare past that is closed (module docstring, "Policy").
        self.spares = min(bound, workers + 1 + RESERVE) if spares is None else spares
        self.always = always
        self._lock = threading.Lock()
        # Engines disown() has taken out of the idle ones to take their CPU off them,
        # outside the lock: idle all the same, so a take at the bound that finds no other
        # waits for one (_disowned) instead of making one past the bound.
        self._disowning = 0
        self._disowned = threading.Condition(self._lock)
        # id(instance) -> (instance, the owner token of the CPU that gave it back), oldest
        # first: a CPU's own engine is found in O(1).  Kept: given back by runnable CPUs
        # between slices; spare: by waiting CPUs, closed CPUs, or none.
        self._kept: OrderedDict[int, tuple[Any, object]] = OrderedDict()
        self._spare: OrderedDict[int, tuple[Any, object]] = OrderedDict()
        # Engines made ahead (prepare), never run: configured, no memory, no hooks.
        self._ready: list[Any] = []
        self.live = 0  # instances made and not closed (held or idle)
        self.peak = 0  # the most that were ever live at once
        self.made = 0  # instances made, ever
        self.closed = 0  # instances closed (tainted, overdrafts back, spares past `spares`...)
        self.overdrafts = 0  # instances made past the bound (module docstring)
        self.taken = 0  # takes
        self.reused = 0  # takes that found the CPU's own engine untouched
        self.switched = 0  # takes that switched an engine from another CPU
        self.evicted = 0  # switches that took a runnable CPU's kept engine (at the bound)
        self.hooked = 0  # switches that kept the engine's hooks (Taken.HOOKED)
        self.switch_time = 0.0  # seconds the CPUs spent switching engines (and making them)
        self.switch_cost = 0.0  # what a switch costs lately (a moving average, seconds)
        self.prepared = 0  # engines made ahead (prepare), counted in `made` too
        self.ready_taken = 0  # takes that got an engine made ahead (not a switch)
        self.prepare_time = 0.0  # seconds (the making thread's CPU time) prepare took
        # Called, from the taking thread, when a take made a new engine while runnable
        # CPUs keep engines: the owner then calls prepare() until it answers False
        # (module docstring, "Made ahead").  None: nothing is made ahead.
        self.wanted: Callable[[], None] | None = None
        self._asked = False  # wanted() was called and prepare() has not answered False yet
        self._closing = False  # close() was called: nothing more is made ahead
        self._tcg_buffer = tcg_buffer

    @classmethod
    def for_workers(
        cls, tcg_buffer: int, workers: int, mode: str, max_engines: int | None = None
    ) -> EnginePool | None:
        """The pool a device with ``workers`` threads gets in ``mode`` (None: "off"):
        bounded by ``max_engines`` (default :func:`default_bound`), but never below
        what runs at once (one per worker, one for the loop, :data:`RESERVE`).  The
        ``always`` mode's bound is that floor: its engines switch among the CPUs."""
        if mode == "off":
            return None
        floor = workers + 1 + RESERVE
        if mode == "always":
            return cls(tcg_buffer, floor, always=True, workers=workers)
        wanted = default_bound(tcg_buffer) if max_engines is None else max_engines
        return cls(tcg_buffer, max(floor, wanted), workers=workers)

    @property
    def tcg_buffer(self) -> int:
        """The translation buffer of every engine the pool makes, in bytes."""
        return self._tcg_buffer

    @property
    def kept(self) -> int:
        """How many engines wait in the pool for the runnable CPUs that gave them back."""
        return len(self._kept)

    @property
    def idle(self) -> int:
        """How many engines wait in the pool (kept, spare and made ahead)."""
        return len(self._kept) + len(self._spare) + len(self._ready)

    @property
    def ready(self) -> int:
        """How many engines made ahead wait in the pool (:meth:`prepare`)."""
        return len(self._ready)

    @property
    def held(self) -> int:
        """How many engines CPUs hold now."""
        return self.live - self.idle

    def reclaim(self, owner: object, last: Any) -> bool:
        """Take ``last`` back for ``owner`` if it waits idle for it, untouched since (what
        :meth:`take` returns as ``OWN``): True if it did.  Decided under the lock, so the
        caller knows before it starts whether a switch's cost is coming."""
        if last is None or self.always:
            return False
        with self._lock:
            return self._reclaim(owner, last)

    def _reclaim(self, owner: object, last: Any) -> bool:
        """(Lock held.)  :meth:`reclaim`."""
        key = id(last)
        for idle in (self._kept, self._spare):
            entry = idle.get(key)
            if entry is not None and entry[0] is last and entry[1] is owner:
                del idle[key]
                self.taken += 1
                self.reused += 1
                return True
        return False

    def take(self, owner: object, last: Any, kind: object = None) -> tuple[Any, Taken]:
        """An engine for ``owner`` (the CPU's token) and how it comes: ``OWN``, ``last``
        (the one it gave back) untouched since, whose registers only need loading;
        ``HOOKED``, another CPU's whose seat has this ``kind`` of hooks
        (:class:`_unicorn.Seat`), with that CPU's memory taken off
        (:func:`_unicorn.unbind`); ``BARE``, stripped (:func:`_unicorn.strip`) or new.
        The caller maps and configures a ``HOOKED`` or ``BARE`` one for the CPU (and
        gives it back tainted if that fails).  ``kind`` None: always ``BARE`` or ``OWN``.

        Which engine (module docstring, "Policy"): its own; else one made ahead (never
        run: no switch); else the spare given back longest ago; else a new one while
        fewer than ``bound`` live; else the kept engine given back last (an
        *eviction*)."""
        ask = False
        with self._lock:
            if last is not None and not self.always and self._reclaim(owner, last):
                return last, Taken.OWN
            self.taken += 1
            if self._ready and not self.always:
                self.ready_taken += 1
                return self._ready.pop(), Taken.BARE
            uc = self._pick_idle(last)
            if uc is None:
                self._count_new()
                ask = self._ask()
            else:
                self.switched += 1
        if self.always and last is not None:
            # Never to be taken back by its CPU, ``last`` must not hold that CPU meanwhile.
            self.disown(owner, last)
        if uc is None:
            if ask and self.wanted is not None:
                self.wanted()
            return self._new(), Taken.BARE
        try:
            if kind is not None and _unicorn.seat(uc).kind == kind:
                _unicorn.unbind(uc)
                with self._lock:
                    self.hooked += 1
                return uc, Taken.HOOKED
            _unicorn.strip(uc)
        except Exception:
            with self._lock:
                self.switched -= 1
                self._count_new()
            self._close(uc)
            return self._new(), Taken.BARE
        return uc, Taken.BARE

    def _pick_idle(self, last: Any) -> Any:
        """(Lock held.)  The spare given back longest ago; else, at the bound, the kept
        engine given back last (an eviction), waiting for one that :meth:`disown` is
        taking its CPU off if that is the only other; else None (a new one is made)."""
        while True:
            uc = self._pick(self._spare, last, oldest=True)
            if uc is None and self.live >= self.bound:
                uc = self._pick(self._kept, last, oldest=False)
                if uc is not None:
                    self.evicted += 1
            if uc is not None or not self._disowning or self.live < self.bound:
                return uc
            self._disowned.wait()

    def _ask(self) -> bool:
        """(Lock held; a take is making a new engine.)  Whether to ask for engines made
        ahead: runnable CPUs keep engines (a crowd computes), none was asked for yet,
        there is room below the bound, and the pool is not the ``always`` mode's."""
        if self._asked or not self._kept or self.always or self.wanted is None:
            return False
        if self.live >= self.bound or self._closing:
            return False
        self._asked = True
        return True

    def prepare(self) -> bool:
        """Make one engine ahead of need (module docstring, "Made ahead"), a spare of no
        CPU, the first to be taken: True if one was made and more may be; False, and
        nothing made, once ``spares`` idle engines wait, the bound is reached, the pool
        is closing, or making one failed (a take then makes its own, and says why)."""
        with self._lock:
            spares = len(self._spare) + len(self._ready)
            if spares >= self.spares or self.live >= self.bound or self._closing:
                self._asked = False
                return False
            self._count_new()
            self.prepared += 1
        started = time.thread_time()
        try:
            uc = _unicorn.new_instance(self._tcg_buffer)
        except Exception:
            with self._lock:
                self.live -= 1
                self._asked = False
            return False
        with self._lock:
            self.prepare_time += time.thread_time() - started
            if not self._closing:
                self._ready.append(uc)
                return True
            self._asked = False
        self._close(uc)
        return False

    def _pick(self, idle: OrderedDict[int, tuple[Any, object]], last: Any, oldest: bool) -> Any:
        """(Lock held.)  Take an engine out of ``idle``, the oldest or the newest, or None;
        never ``last`` in the ``always`` mode (it must switch)."""
        keys = iter(idle) if oldest else reversed(idle)
        for key in keys:
            candidate = idle[key][0]
            if self.always and candidate is last:
                continue
            del idle[key]
            return candidate
        return None

    def give(self, owner: object, uc: Any, tainted: bool = False, keep: bool = False) -> None:
        """``owner`` gives ``uc`` back (no slice runs on it).  ``keep``: the CPU is
        runnable (it gives the engine back between two slices), so the engine waits
        for it as *kept*; else as a *spare*, and the oldest spare past ``spares`` is
        closed.  A tainted engine is closed, and so is one that comes back while more
        than ``bound`` live (an overdraft)."""
        with self._lock:
            if tainted or self.live > self.bound:
                trimmed = uc
            elif keep:
                self._kept[id(uc)] = (uc, owner)
                return
            else:
                self._spare[id(uc)] = (uc, owner)
                trimmed = self._trim()
        if trimmed is not None:
            self._close(trimmed)

    def rest(self, owner: object, uc: Any) -> None:
        """``owner`` waits (a halt, a hold): if ``uc``, the engine it gave back last, is
        kept for it, it becomes a spare (the newest: still its own if nobody takes it)."""
        with self._lock:
            entry = self._kept.get(id(uc))
            if entry is None or entry[0] is not uc or entry[1] is not owner:
                return
            del self._kept[id(uc)]
            self._spare[id(uc)] = entry
            trimmed = self._trim()
        if trimmed is not None:
            self._close(trimmed)

    def _trim(self) -> Any:
        """(Lock held.)  An engine made ahead, else the oldest spare, taken out, if more
        than ``spares`` of them wait (the caller closes it), else None."""
        if len(self._spare) + len(self._ready) <= self.spares:
            return None
        if self._ready:
            return self._ready.pop(0)
        _, (uc, _owner) = self._spare.popitem(last=False)
        return uc

    def disown(self, owner: object, uc: Any) -> None:
        """``owner`` is gone (its CPU closed): if ``uc``, the engine it gave back last,
        still waits here as it left it, take that CPU off it (:func:`_unicorn.unbind`,
        keeping hooks that find their CPU through the seat; :func:`_unicorn.strip` if
        its seat's kind is unknown) so that nothing keeps that CPU alive; it stays in
        the pool for any CPU, as the first spare to be switched."""
        with self._lock:
            for idle in (self._kept, self._spare):
                entry = idle.get(id(uc))
                if entry is not None and entry[0] is uc and entry[1] is owner:
                    del idle[id(uc)]
                    break
            else:
                return
            self._disowning += 1
        try:
            if _unicorn.seat(uc).kind is not None:
                _unicorn.unbind(uc)
            else:
                _unicorn.strip(uc)
        except Exception:
            self._close(uc)
            with self._lock:
                self._disowning -= 1
                self._disowned.notify_all()
            return
        with self._lock:
            self._disowning -= 1
            self._disowned.notify_all()
            self._spare[id(uc)] = (uc, None)
            self._spare.move_to_end(id(uc), last=False)  # the first to be switched
            trimmed = self._trim()
        if trimmed is not None:
            self._close(trimmed)

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` a CPU spent switching (or making) an engine it took."""
        with self._lock:
            self.switch_time += seconds
            cost = self.switch_cost
            self.switch_cost = seconds if cost == 0.0 else cost + (seconds - cost) / 8

    def crowded(self, waiting_per_worker: float) -> bool:
        """Whether more CPUs compute than the workers have engines for, with
        ``waiting_per_worker`` executor jobs waiting per worker besides the running ones:
        then nearly every executor slice switches (any thread; racy reads)."""
        computing = (waiting_per_worker + 1) * self.workers
        return computing > self.bound - 1  # (one engine stays for the event loop)

    def close(self) -> None:
        """Close every idle engine (the device is closing; held ones come back closed)."""
        with self._lock:
            self._closing = True
        while True:
            with self._lock:
                idle = self._kept or self._spare
                if idle:
                    _, (uc, _owner) = idle.popitem()
                elif self._ready:
                    uc = self._ready.pop()
                else:
                    return
            self._close(uc)

    # -- making and closing --------------------------------------------------------------
    def _count_new(self) -> None:
        """(Lock held.)  One more engine is about to be made."""
        if self.live >= self.bound:
            self.overdrafts += 1
        self.live += 1
        self.made += 1
        self.peak = max(self.peak, self.live)

    def _new(self) -> Any:
        try:
            return _unicorn.new_instance(self._tcg_buffer)
        except BaseException:
            with self._lock:
                self.live -= 1
            raise

    def _close(self, uc: Any) -> None:
        _unicorn.close(uc)
        with self._lock:
            self.live -= 1
            self.closed += 1
