"""Deterministic mode: one device's virtual clock, virtual timers and seeded schedule.

A :class:`Simulation` belongs to an ``LguestDevice(deterministic=True, seed=N)``.
Everything a guest can observe of time comes from executed work, never from the
host (QEMU's icount idea): every CPU runs on the native block hook, so its
translated blocks are counted exactly, and the device's clock advances
:data:`NS_PER_BLOCK` virtual nanoseconds per block any of its CPUs runs (one
virtual processor time-shared by every guest).  The guest's clocks read it:
``lguest_data.time`` is :data:`EPOCH_NS` plus the clock, ``rdtsc`` (hooked) is
the clock at the executing block, counted at :data:`TSC_KHZ`.

One scheduler task per device runs *quanta* one at a time, FoundationDB-style:
it waits until every CPU of the device has settled (wants a turn, or sleeps in
a halt), lets the event loop run what is ready, fires the virtual timers that
are due, then gives one runnable CPU, chosen by ``random.Random(seed)`` among
the runnable CPUs in a fixed order, a quantum of at most :data:`QUANTUM_BLOCKS`
blocks, cut short so that it ends when the next timer is due.  The quantum runs
on the event loop itself (nothing else may run meanwhile, so a thread hand-off
would buy nothing).  What the Launchers and the host do in response (serving a
notify, a break, an irq for another guest) happens between quanta, before the
next choice, so it takes effect at the same virtual time on every run.  When
every CPU sleeps and a timer is armed, the clock jumps to it: sleeping costs no
wall time (FoundationDB's time compression).

What comes from outside the device (a terminal's input, a host connection, a
pause or kill from the host program at a wall-clock moment) still arrives at a
wall-clock moment; it takes effect at the next quantum boundary.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _slicing, _unicorn
from .flag import Flag

if TYPE_CHECKING:
    from .cpu import LgCpu

NS_PER_BLOCK = 10  # virtual nanoseconds per translated block executed
TSC_KHZ = 1_000_000  # the guest's TSC counts virtual nanoseconds (a 1 GHz counter)
EPOCH_NS = 1_735_689_600 * 1_000_000_000  # lguest_data.time at virtual 0: 2025-01-01 UTC
QUANTUM_BLOCKS = 100_000  # a turn's most blocks: 1 ms of virtual time
SETTLE_YIELDS = 3  # passes of the event loop between quanta (host tasks catch up)
MAX_SEED = (1 << 64) - 1

_ACTIVE = 0  # doing something the schedule must wait for (or running a quantum)
_WANTS = 1  # waiting for a turn
_SLEEPING = 2  # halted (or held, or offline) with no wake-up yet
_UNREAD = 3  # initialized, not read yet: like a sleeping CPU until it is woken or read


def counting() -> str:
    """What the virtual clock counts in this process: the Unicorn release, and translated
    blocks (the native slice meter's block hook) or, on the ``count=`` fallback (no
    native extension, or ``LGUEST_SLICING=count``), instructions.  Runs with the same
    seed are the same only where this is the same."""
    unit = "blocks" if _slicing.NATIVE else "instructions"
    return f"unicorn {_unicorn.VERSION} counting {unit}"


class _Turn:
    """A CPU's place in the schedule."""

    __slots__ = ("ahead_ns", "grant", "key", "state")

    def __init__(self, key: tuple[int, int]) -> None:
        self.key = key  # (its guest's rank, CPU number): the order the seed chooses in
        self.state = _ACTIVE
        self.grant: asyncio.Future[int] | None = None  # its turn: the quantum's blocks
        self.ahead_ns = 0  # how far its guest's clocks are ahead of the device's


class _Wakeup(Flag):
    """A CPU's ``run.wakeup`` in deterministic mode: waking a sleeping CPU makes the
    schedule wait for it to settle again, before anyone's next quantum."""

    __slots__ = ("_cpu", "_sim")

    def __init__(self, sim: Simulation, cpu: LgCpu) -> None:
        super().__init__()
        self._sim = sim
        self._cpu = cpu

    def set(self) -> None:
        if not self.is_set():
            super().set()
            self._sim._woken(self._cpu)


class Hold:
    """Keeps the schedule from running any quantum until :meth:`release` (idempotent);
    also a context manager.  See :meth:`Simulation.hold`."""

    __slots__ = ("_sim", "released")

    def __init__(self, sim: Simulation) -> None:
        self._sim = sim
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._sim._unhold()

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Simulation:
    """A device's virtual time, virtual timers and seeded schedule (event loop only)."""

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to 2**64-1, not {seed!r}")
        self.seed = seed
        self._rng = random.Random(seed)  # the schedule's own: nothing else draws from it
        self.now_ns = 0  # the virtual clock
        self.quanta = 0  # turns given
        # Settled points passed so far: each input applied, timer fired, jump or turn
        # given is one, so a step names one point of the run (record and replay).
        self.step = 0
        self._posted: list[Callable[[], None]] = []  # host inputs for the next point
        self._script: dict[int, list[Callable[[], None]]] = {}  # inputs at given steps
        self.jumps = 0  # times the clock jumped to a timer, every CPU asleep
        self.jumped_ns = 0  # virtual time those jumps skipped
        self._timers: list[tuple[int, int, asyncio.Handle, Callable[..., None], tuple[Any, ...]]]
        self._timers = []
        self._seq = itertools.count()
        self._turns: dict[LgCpu, _Turn] = {}
        self._runnable: set[LgCpu] = set()
        self._unsettled = 0  # CPUs in _ACTIVE, plus holds
        self._ranks = itertools.count()
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._running: LgCpu | None = None  # whose quantum runs, and where it began:
        self._base_ns = 0
        self._base_blocks = 0

    # -- for other parts of the host: derived randomness and the virtual clock --------
    def random(self, name: str) -> random.Random:
        """A ``random.Random`` of its own for ``name`` (e.g. ``"net"``), derived from
        the seed: the same seed and name give the same sequence, whatever else draws."""
        return random.Random(f"{self.seed}:{name}")

    def time(self) -> float:
        """The virtual clock in seconds (the role ``loop.time()`` has outside this mode)."""
        return self.now_ns / 1e9

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> asyncio.Handle:
        """Call ``callback(*args)`` once the virtual clock has advanced ``delay`` seconds
        (at a quantum boundary, before the next choice); cancel with the handle."""
        return self.call_at_ns(self.now_ns + max(0, round(delay * 1e9)), callback, *args)

    def call_at_ns(self, due_ns: int, callback: Callable[..., None], *args: Any) -> asyncio.Handle:
        """Call ``callback(*args)`` when the virtual clock reaches ``due_ns``."""
        handle = asyncio.Handle(callback, args, asyncio.get_running_loop())
        heapq.heappush(self._timers, (due_ns, next(self._seq), handle, callback, args))
        self._poke()
        return handle

    def post(self, callback: Callable[[], None]) -> None:
        """Apply a host input (``callback()``, e.g. a guest's ``send``) at the next settled
        point of the schedule, before its next choice; ``step`` then names that point
        (what a recording keeps)."""
        self._posted.append(callback)
        self._poke()

    def at_step(self, step: int, callback: Callable[[], None]) -> None:
        """Apply ``callback()`` at the settled point ``step`` (a replay of :meth:`post`)."""
        if step < self.step:
            raise ValueError(f"step {step} has passed (now {self.step})")
        self._script.setdefault(step, []).append(callback)
        self._poke()

    async def idle(self) -> None:
        """Return once the device is *idle*: every CPU sleeps (or is not read yet), no
        timer is armed, no input waits and nothing holds the schedule, so nothing in
        the device can change until the host acts.  A host action taken then (a
        launch, a line sent, a partition, a heal) takes effect at the same point of
        the run, whatever the wall clock says.  A guest still alive then waits for
        the host, or for ever (a deadlock, such as a server waiting for clients
        whose connects were refused)."""
        if self._closed:
            return
        self._ensure_task()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        self._poke()  # settle again first: what the host did just now lands before
        await waiter

    def hold(self) -> Hold:
        """No quantum runs until the returned hold is released: take one before
        launching guests that must all start at virtual time 0 together."""
        self._unsettled += 1
        return Hold(self)

    # -- the guest's clocks -------------------------------------------------------------
    def clock_ns(self, cpu: LgCpu) -> int:
        """The virtual clock as ``cpu`` sees it now: inside its quantum, counting the
        blocks it has run so far (``rdtsc`` from a hook on the slice's thread)."""
        if cpu is self._running:
            blocks: int = cpu.fuel.blocks - self._base_blocks
            return self._base_ns + blocks * NS_PER_BLOCK
        return self.now_ns

    def guest_ns(self, cpu: LgCpu) -> int:
        """The virtual time ``cpu``'s guest reads now: :meth:`clock_ns`, plus how far its
        clocks are ahead (a restored guest continues from its snapshot's clock).
        Timers are on the device's clock: a delay is the same on both."""
        turn = self._turns.get(cpu)
        return self.clock_ns(cpu) + (turn.ahead_ns if turn is not None else 0)

    def tsc(self, cpu: LgCpu) -> int:
        """What ``rdtsc`` reads on ``cpu`` now."""
        return self.guest_ns(cpu) * TSC_KHZ // 1_000_000

    # -- CPUs ----------------------------------------------------------------------------
    def add(self, cpu: LgCpu, clock_ns: int | None = None) -> None:
        """Schedule ``cpu`` (a new or revived CPU of this device).  Until its first read
        it counts as asleep: a guest nobody reads does not stop the others (the
        Supervisor holds the schedule from a launch to the guest's first read).

        ``clock_ns``: the clock its guest read when it was captured (a revived
        guest's): its clocks go on from there, never back, so they run ahead of the
        device's clock by the difference (none if the device's is further on)."""
        self._ensure_task()
        cpu.run.wakeup = _Wakeup(self, cpu)
        turn = self._turns[cpu] = _Turn((next(self._ranks), cpu.id))
        turn.state = _UNREAD
        if clock_ns is not None:
            turn.ahead_ns = max(0, clock_ns - self.now_ns)

    def rank(self, cpus: list[LgCpu], rank: int) -> None:
        """Order the guest's CPUs by ``rank`` (the Supervisor's launch order) among the
        CPUs the seed chooses from, instead of the order their guests initialized in."""
        for cpu in cpus:
            turn = self._turns.get(cpu)
            if turn is not None:
                turn.key = (rank, cpu.id)

    def remove(self, cpu: LgCpu) -> None:
        """``cpu`` is closing: it leaves the schedule (a turn it waits for ends at once)."""
        turn = self._turns.pop(cpu, None)
        if turn is None:
            return
        if turn.state == _ACTIVE:
            self._unsettled -= 1
        self._runnable.discard(cpu)
        if turn.grant is not None and not turn.grant.done():
            turn.grant.set_result(0)
        self._poke()

    async def turn(self, cpu: LgCpu) -> int:
        """Wait for ``cpu``'s next quantum; return its blocks (0: it left the schedule)."""
        turn = self._turns.get(cpu)
        if turn is None or self._closed:
            return 0
        grant: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        turn.grant = grant
        self._settle(turn, _WANTS)
        self._runnable.add(cpu)
        try:
            return await grant
        except asyncio.CancelledError:
            if turn.state == _WANTS:  # not given yet: withdrawn
                self._runnable.discard(cpu)
                self._settle(turn, _ACTIVE)
            raise
        finally:
            turn.grant = None

    def begin(self, cpu: LgCpu) -> None:
        """``cpu``'s quantum starts running now (after :meth:`turn`)."""
        self._running = cpu
        self._base_ns = self.now_ns
        self._base_blocks = int(cpu.fuel.blocks)

    def blocks_left(self, cpu: LgCpu) -> int:
        """Inside ``cpu``'s quantum: the blocks it may still run before the next timer
        is due (a large number if none is armed)."""
        due = self._next_due()
        if due is None:
            return QUANTUM_BLOCKS
        return -(-(due - self.clock_ns(cpu)) // NS_PER_BLOCK)

    def end(self, cpu: LgCpu) -> None:
        """``cpu``'s quantum ended: the clock advances by the blocks it ran."""
        self.now_ns = self.clock_ns(cpu)
        self._running = None

    def reading(self, cpu: LgCpu) -> None:
        """A read of ``cpu`` starts (the run loop's first pass)."""
        turn = self._turns.get(cpu)
        if turn is not None and turn.state == _UNREAD:
            self._settle(turn, _ACTIVE)

    def sleeping(self, cpu: LgCpu) -> None:
        """``cpu``'s run loop waits for its wake-up (a halt, a hold, offline)."""
        turn = self._turns.get(cpu)
        if turn is not None and turn.state == _ACTIVE and not cpu.run.wakeup.is_set():
            self._settle(turn, _SLEEPING)

    def awake(self, cpu: LgCpu) -> None:
        """``cpu``'s run loop stopped waiting (woken, or its read was cancelled)."""
        turn = self._turns.get(cpu)
        if turn is not None and turn.state in (_SLEEPING, _UNREAD):
            self._settle(turn, _ACTIVE)

    def _woken(self, cpu: LgCpu) -> None:
        self.awake(cpu)

    def _settle(self, turn: _Turn, state: int) -> None:
        if turn.state == _ACTIVE:
            self._unsettled -= 1
        if state == _ACTIVE:
            self._unsettled += 1
        turn.state = state
        self._poke()

    def _unhold(self) -> None:
        self._unsettled -= 1
        self._poke()

    def _poke(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # -- the scheduler ---------------------------------------------------------------
    def _ensure_task(self) -> None:
        if self._task is None and not self._closed:
            self._changed = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._schedule(), name="lguest-deterministic-schedule"
            )

    def close(self) -> None:
        """Stop the scheduler (the device is closing)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        self._tell_idle()

    def _tell_idle(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _schedule(self) -> None:
        """The scheduler task.  A Host bug in it must not leave every guest waiting for a
        turn for ever: each guest of the device is killed with the error instead."""
        try:
            await self._decide()
        except Exception as exc:
            self._closed = True
            for cpu in list(self._turns):
                cpu.lg.kill(f"internal error: deterministic schedule: {type(exc).__name__}: {exc}")
                self.remove(cpu)
                cpu.wake()
            self._tell_idle()

    async def _decide(self) -> None:
        changed = self._changed
        assert changed is not None
        while True:
            if self._unsettled > 0:
                changed.clear()
                await changed.wait()
                continue
            for _ in range(SETTLE_YIELDS):
                await asyncio.sleep(0)
            if self._unsettled > 0:
                continue
            inputs = self._script.pop(self.step, []) + self._posted
            if inputs:
                self._posted = []
                for callback in inputs:
                    callback()
                self.step += 1
                continue
            if self._fire_due():
                self.step += 1
                continue  # the woken settle first
            if not self._runnable:
                due = self._next_due()
                if due is None:  # only the host can change anything now
                    changed.clear()
                    self._tell_idle()
                    await changed.wait()
                    continue
                self.jumps += 1
                self.jumped_ns += due - self.now_ns
                self.now_ns = due
                self.step += 1
                continue
            self._give_turn()

    def _give_turn(self) -> None:
        choices = sorted(self._runnable, key=lambda c: self._turns[c].key)
        cpu = choices[self._rng.randrange(len(choices))] if len(choices) > 1 else choices[0]
        self._runnable.discard(cpu)
        turn = self._turns[cpu]
        blocks = QUANTUM_BLOCKS
        due = self._next_due()
        if due is not None:
            blocks = max(1, min(blocks, -(-(due - self.now_ns) // NS_PER_BLOCK)))
        self._settle(turn, _ACTIVE)
        self.quanta += 1
        self.step += 1
        assert turn.grant is not None
        turn.grant.set_result(blocks)

    def _next_due(self) -> int | None:
        timers = self._timers
        while timers and timers[0][2].cancelled():
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def _fire_due(self) -> bool:
        fired = False
        timers = self._timers
        while timers and timers[0][0] <= self.now_ns:
            _due, _seq, handle, callback, args = heapq.heappop(timers)
            if not handle.cancelled():
                handle.cancel()  # (done: a later cancel() is harmless)
                callback(*args)
                fired = True
        return fired
