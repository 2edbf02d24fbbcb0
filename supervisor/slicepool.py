"""The worker threads that run slices, taking turns without the event loop.

A job is a *step*, called again and again on a worker until it returns something
other than :data:`AGAIN`; that value is the job's result.  Between steps the job
takes its turn: while other jobs wait for a worker it goes to the back of the one
FIFO queue, otherwise its next step starts right away on the same worker.  So a
busy CPU's executor run (:func:`supervisor.execute.run_slice` as the step) is many
slices, round-robin with every other busy CPU's, and the event loop hears of it
only when it ends for a reason the run loop must handle.  A slice that came back to
the loop to be queued again would cost a loop wake-up per slice of every busy guest,
and the loop would compete for the CPU just when an interrupt or a break needs it
(docs/performance.md, "Busy slices take turns on the workers").

Guarantees:

- FIFO: a job waits for at most one step of each job queued before it.
- Urgent jobs (``submit(..., urgent=owner)``: a CPU with an interrupt handler to run)
  go to the front of the queue instead of the back, and if no worker is free, the step
  that has held its worker longest is asked to end at its next block boundary (its
  ``hurry``), so the urgent job runs next; never a step that jumped the queue itself (a
  handler's rest), which would go back to the end of the queue unfinished.  A step that
  answers :data:`AGAIN_URGENT` (a handler still running when its slice's time ran out,
  or an irq it had no time left to deliver) goes on as if urgent for its job's
  ``owner``.  An owner jumps the queue at most JUMPS_PER_ROUND (two) times per
  round: each jump counts until the workers have taken as many jobs from the queue as
  it jumped ahead of, so a guest that raises events for itself gets at most two steps
  more per round than the others, however often it asks, while two interrupts that
  happen to come within one round both go first.  An urgent job refused for that waits
  no longer than the bound requires: it is queued where its owner's oldest jump stops
  counting, not at the back.
- A step that began while no job waited may run longer (a lone slice: its ``shorten``);
  once a job is queued that no worker is free for, every step in progress is asked to
  shorten, so a lone step ends where a step taken in turn would have.
- A job is never run by two workers at once; its steps run one after another.
- :meth:`Job.cancel` withdraws a job that is waiting in the queue (before its first
  step or between two steps) and returns True; nothing of it runs afterwards.  A job
  in a step cannot be withdrawn (False): ask the step to end (a kick); if the step
  answers AGAIN all the same, the job ends there, cancelled, and is not queued again.

Any thread may submit, cancel or read ``waiting``; steps never touch the event loop.

Workers run ``nice`` steps below the thread that starts them (Linux: a thread's own
nice value), or, with ``idle``, under Linux's ``SCHED_IDLE`` policy.  The event
loop's thread needs the CPU for a few hundred microseconds at a time, and at once, when
an interrupt or a break arrives; the workers need it all the time.  At equal weight, on
a machine with as many busy workers as cores, the kernel made the loop wait for a core
for milliseconds (docs/performance.md, "Who gets the core").  Even at +10 a loop that
just ran is not *eligible* to preempt a worker when a worker wakes it (by releasing the
GIL the loop waited for), and waits for the kernel's tick; a ``SCHED_IDLE`` thread is
preempted by any waking normal thread at once, but gets almost no CPU while any normal
thread of any program is busy: a policy for a machine that runs nothing else
(docs/performance.md, "What a loaded p99 is made of").
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Final, TypeVar

_T = TypeVar("_T")


class Again:
    """A step's answer meaning "not finished: queue me again" (:data:`AGAIN`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "AGAIN"


AGAIN: Final = Again()
# "Not finished, and urgent": queue me again at the front if my owner may jump
# (module docstring); otherwise like AGAIN.
AGAIN_URGENT: Final = Again()

# How many jumps of one owner may count at once (module docstring): one would make a
# second interrupt within a round (a burst, or two that happen to come close) wait for
# what is left of the round.
JUMPS_PER_ROUND = 2

# How far below the event loop the workers run by default (docs/performance.md, "Who
# gets the core": low enough that the loop's wake-ups stay prompt).
DEFAULT_NICE = 10


def _ended_step() -> Again:  # pragma: no cover - an ended job's step never runs
    raise AssertionError("an ended job ran")


class Job(Future[_T]):
    """A submitted job: a ``concurrent.futures.Future`` of its result.

    It is never marked running, so that it can be withdrawn between steps; its
    :meth:`cancel` asks the pool whether it is in a step right now.
    """

    def __init__(
        self,
        pool: SlicePool,
        step: Callable[[], _T | Again],
        hurry: Callable[[], bool] | None = None,
        owner: object | None = None,
        shorten: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__()
        self._pool = pool
        self.step = step
        # Ask its step in progress, if it is a lone one, to end where a step taken in turn
        # would have (any thread, the pool's lock held; True if asked); None: never longer.
        self.shorten = shorten
        # Whom the job is urgent for when a step answers AGAIN_URGENT (None: never).
        self.owner = owner
        # Ask its step in progress to end soon, its job going on after a turn (any
        # thread; True if asked); None: never hurried for an urgent job.
        self.hurry = hurry
        # Guarded by the pool's lock.  queued: in the queue, waiting for a worker (an
        # entry in the queue that is not queued was withdrawn: it is skipped);
        # stop_asked: cancel() came while a step ran: an AGAIN then ends the job
        # (cancelled) instead of queueing it again behind every waiting job.
        self.queued = False
        self.stop_asked = False
        # Its step in progress (or next) is one it jumped the queue for: not hurried.
        # Set under the lock; its worker clears it when that step ends (a racy read is
        # at worst one step late).
        self.jumped = False
        self.taken_at = 0.0  # when a worker last took it from the queue (time.monotonic)

    def cancel(self) -> bool:
        """Withdraw the job if it waits in the queue (True, as when already cancelled).
        False while a step runs (the job then ends after it, cancelled if the step
        answers AGAIN) or once done."""
        if self._pool._withdraw(self):
            return super().cancel()
        return self.cancelled()

    def add_done_callback(self, fn: Callable[[Future[_T]], object]) -> None:
        """As ``Future.add_done_callback``, except that the job lets go of ``fn`` once it
        has called it.  An ended job may be kept a while (by its worker until it takes
        the next, a withdrawn entry until a worker skips it), and what its callbacks
        refer to (the read's future, a CPU, its guest) must not live that long."""
        pending = [fn]

        def call(job: Future[_T]) -> None:
            if pending:
                pending.pop()(job)

        super().add_done_callback(call)


def _lower_priority(steps: int, idle: bool) -> None:
    """This thread's nice value ``steps`` higher (lower priority), or its policy
    ``SCHED_IDLE`` if ``idle``, where threads have their own (Linux)."""
    if sys.platform != "linux":
        return
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # (0: this thread)
    elif steps:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + steps)


class SlicePool:
    """``workers`` threads running jobs in turn (module docstring); started as needed,
    each ``nice`` steps below the priority of the thread that submitted first, or
    ``SCHED_IDLE`` if ``idle``."""

    def __init__(
        self, workers: int, name: str = "lguest-cpu", *, nice: int = 0, idle: bool = False
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be 0 to 19, not {nice}")
        self.workers = workers
        self.nice = nice
        self.idle = idle
        self._name = name
        self._lock = threading.Condition()
        # All guarded by _lock.  _queue may hold withdrawn entries (not queued: skipped);
        # _waiting counts the others.  _idle_threads: threads waiting for a job.
        self._queue: deque[Job[Any]] = deque()
        self._waiting = 0
        self._idle_threads = 0
        self._threads: list[threading.Thread] = []
        self._computing: set[Job[Any]] = set()  # jobs that answered AGAIN and go on
        self._closed = False
        self._busy: set[Job[Any]] = set()  # jobs a worker took from the queue and runs
        self._taken = 0  # jobs taken from the queue so far
        # owner -> for each of its jumps that may still count, the value of _taken from
        # which it stops counting.
        self._jumps: weakref.WeakKeyDictionary[Any, list[int]] = weakref.WeakKeyDictionary()
        self.jumps = 0  # urgent jobs put at the front of the queue
        self.refused = 0  # urgent jobs not put at the front: their owner jumped enough
        self.hurried = 0  # steps asked to end early for an urgent job
        self.shortened = 0  # lone steps asked to end where a step in turn would have

    @property
    def waiting(self) -> int:
        """Jobs in the queue, not withdrawn: each waits for a worker.  Any thread (a
        racy read is at worst one step late)."""
        return self._waiting

    @property
    def computing(self) -> bool:
        """True while a job computes: one of its steps answered AGAIN and it has not
        ended (it runs its next step, or waits for its turn).  Any thread; racy like
        ``waiting``."""
        return bool(self._computing)

    def crowd(self) -> float:
        """Jobs waiting per worker (any thread; racy like ``waiting``)."""
        return self._waiting / self.workers

    def submit(
        self,
        fn: Callable[..., _T | Again],
        /,
        *args: Any,
        hurry: Callable[[], bool] | None = None,
        urgent: object | None = None,
        owner: object | None = None,
        shorten: Callable[[], bool] | None = None,
    ) -> Job[_T]:
        """Queue a job whose step is ``fn(*args)`` (FIFO).  RuntimeError once shut down.

        ``hurry``: asks the job's step in progress to end early (for an urgent job).
        ``urgent``: who the job is urgent for (weakly referenced): to the front of the
        queue, twice per round at most for each owner (module docstring).  ``owner``: whom a
        step's AGAIN_URGENT is for (default ``urgent``; None: it counts as AGAIN).
        ``shorten``: asks the job's step in progress, if lone, to end as a step in turn."""
        job: Job[_T] = Job(
            self,
            functools.partial(fn, *args) if args else fn,
            hurry,
            owner if owner is not None else urgent,
            shorten,
        )
        slow: Job[Any] | None = None
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            if urgent is None:
                self._enqueue(job)
            elif self._enqueue_urgent(job, urgent):
                slow = self._slowest()
            if self._waiting > self._idle_threads and len(self._threads) < self.workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self._name}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        hurry = slow.hurry if slow is not None else None  # (read once: an ended job drops it)
        if hurry is not None and hurry():
            self.hurried += 1  # (a racy count: the figures of a test or a benchmark)
        return job

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new jobs; with ``cancel_futures`` every queued job is withdrawn.  A job
        that answers AGAIN after this is withdrawn too, so ``wait`` ends once each
        worker's current step has.  Safe to call twice."""
        withdrawn: list[Job[Any]] = []
        with self._lock:
            self._closed = True
            if cancel_futures:
                for job in self._queue:
                    if job.queued:
                        self._mark_withdrawn(job)
                        withdrawn.append(job)
            self._lock.notify_all()
        for job in withdrawn:
            Future.cancel(job)  # (outside the lock: it runs the future's callbacks)
        if wait:
            for thread in list(self._threads):
                if thread is not threading.current_thread():
                    thread.join()

    # -- lock held -------------------------------------------------------------------
    def _enqueue(self, job: Job[Any], front: bool = False, index: int | None = None) -> None:
        """Queue ``job`` at the back, the front, or before the entry at ``index``."""
        job.queued = True
        job.jumped = front
        if front:
            self._queue.appendleft(job)
        elif index is not None:
            self._queue.insert(index, job)
        else:
            self._queue.append(job)
        self._waiting += 1
        if self._idle_threads:
            self._lock.notify()
        if self._waiting > self._idle_threads and len(self._threads) >= self.workers:
            # No worker is free for it: lone steps end where steps in turn would.
            for busy in self._busy:
                if busy.shorten is not None and busy.shorten():
                    self.shortened += 1

    def _enqueue_urgent(self, job: Job[Any], owner: object) -> bool:
        """Queue an urgent job: at the front if ``owner`` may jump (True); else where its
        owner may jump again, once its oldest jump stops counting (the back at the
        latest)."""
        if self._may_jump(owner):
            self._enqueue(job, front=True)
            return True
        ahead = min(self._jumps[owner]) - self._taken  # jobs still to be taken first
        if ahead >= self._waiting:
            self._enqueue(job)
            return False
        for index, entry in enumerate(self._queue):  # (withdrawn entries are skipped)
            if entry.queued:
                if ahead == 0:
                    self._enqueue(job, index=index)
                    break
                ahead -= 1
        return False

    def _may_jump(self, owner: object) -> bool:
        """Whether ``owner``'s urgent job may go to the front now, recording the jump:
        not while JUMPS_PER_ROUND of its jumps count (a jump counts until the workers
        have taken as many jobs as it went ahead of)."""
        counting = [end for end in self._jumps.get(owner, ()) if end > self._taken]
        if len(counting) >= JUMPS_PER_ROUND:
            self._jumps[owner] = counting
            self.refused += 1
            return False
        counting.append(self._taken + self._waiting + 1)  # (+1: its own job's take)
        self._jumps[owner] = counting
        self.jumps += 1
        return True

    def _slowest(self) -> Job[Any] | None:
        """The job to hurry for an urgent one at the front: none while a worker is free
        (waiting for a job, or between two: it looks at the queue's front next) or about
        to start; else the one that has held its worker longest, of those whose step is
        not an urgent one (a handler's rest cut short would wait at the back)."""
        if len(self._busy) < len(self._threads) or len(self._threads) < self.workers:
            return None
        busy = [job for job in self._busy if not job.jumped]
        return min(busy, key=lambda job: job.taken_at) if busy else None

    def _withdraw(self, job: Job[Any]) -> bool:
        with self._lock:
            if not job.queued:
                job.stop_asked = not job.done()
                return False
            self._mark_withdrawn(job)
            return True

    def _mark_withdrawn(self, job: Job[Any]) -> None:
        """A queued job will not run again.  Its entry stays in the queue until a worker
        skips it, so its step, owner, hurry and shorten (and whatever they hold: a CPU,
        its guest, a guest's memory) are let go now, not then: an idle pool might not
        look at its queue for a long time."""
        job.queued = False
        job.step = _ended_step
        job.owner = job.hurry = job.shorten = None
        self._waiting -= 1
        self._computing.discard(job)

    def _take(self) -> Job[Any] | None:
        """The next job to run (waiting for one), or None once shut down and empty."""
        while True:
            while self._queue:
                job = self._queue.popleft()
                if job.queued:
                    job.queued = False
                    self._waiting -= 1
                    self._taken += 1
                    job.taken_at = time.monotonic()
                    self._busy.add(job)
                    return job
            if self._closed:
                return None
            self._idle_threads += 1
            self._lock.wait()
            self._idle_threads -= 1

    # -- worker threads ---------------------------------------------------------------
    def _work(self) -> None:
        # (A new thread starts at its creator's priority.  Where lowering it is not
        # allowed, a sandbox, the worker runs at that priority.)
        with contextlib.suppress(OSError):
            _lower_priority(self.nice, self.idle)
        while True:
            with self._lock:
                job = self._take()
            if job is None:
                return
            result: Any = AGAIN
            error: BaseException | None = None
            try:
                result = job.step()
                job.jumped = False  # (the step it jumped for is done)
                # Nobody waits for this worker: go on here, without a trip through the queue.
                if isinstance(result, Again):
                    self._computing.add(job)
                while isinstance(result, Again) and not (
                    self._waiting or self._closed or job.stop_asked
                ):
                    result = job.step()
            except BaseException as exc:  # the job's, like ThreadPoolExecutor's
                error = exc
            with self._lock:
                self._busy.discard(job)
                again = isinstance(result, Again) and error is None
                if again and not self._closed and not job.stop_asked:
                    if result is AGAIN_URGENT and job.owner is not None:
                        # (To the front: this worker takes it next; nobody to hurry.)
                        self._enqueue_urgent(job, job.owner)
                    else:
                        self._enqueue(job)  # to the back: every job waiting now goes first
                    continue
            # Ended: let go of what the step, its owner and its hurry hold (a CPU, its
            # guest), since this thread's frame keeps the job until it takes the next.
            job.step = _ended_step
            job.owner = job.hurry = job.shorten = None
            self._computing.discard(job)
            if error is not None:
                job.set_exception(error)
            elif isinstance(result, Again):
                Future.cancel(job)  # shut down or asked to stop: as if withdrawn from the queue
            else:
                job.set_result(result)
