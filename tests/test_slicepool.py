"""The slice pool: jobs of many steps take turns on the workers without the event loop.

No emulator here: each job is a Python step that records what ran and answers AGAIN
(go on) or a result.  Steps that must wait for the test block on threading events, so
every order below is forced, not hoped for.
"""

import os
import sys
import threading
from collections.abc import Callable

import pytest

from supervisor.slicepool import AGAIN, AGAIN_URGENT, Again, Job, SlicePool

WAIT = 10  # seconds a step waits for the test before the test counts as hung


def stepper(
    name: str, log: list[str], steps: int, gate: Callable[[int], None] = lambda n: None
) -> Callable[[], str | Again]:
    """A step that logs ``name``, calls ``gate(n)`` on its n-th run, and finishes after
    ``steps`` runs (its result: ``name``)."""
    runs = 0

    def step() -> str | Again:
        nonlocal runs
        runs += 1
        log.append(name)
        gate(runs)
        return name if runs == steps else AGAIN

    return step


def hold_first(release: threading.Event, started: threading.Event) -> Callable[[int], None]:
    def gate(n: int) -> None:
        if n == 1:
            started.set()
            assert release.wait(WAIT)

    return gate


def test_busy_jobs_take_turns_in_fifo_order() -> None:
    pool = SlicePool(1)
    log: list[str] = []
    release, started = threading.Event(), threading.Event()
    try:
        a = pool.submit(stepper("a", log, 3, hold_first(release, started)))
        assert started.wait(WAIT)  # a is in its first step: b queues behind it
        b = pool.submit(stepper("b", log, 3))
        assert pool.waiting == 1
        release.set()
        assert a.result(WAIT) == "a" and b.result(WAIT) == "b"
    finally:
        pool.shutdown()
    # Each AGAIN with the other waiting sends the job to the back of the queue.
    assert log == ["a", "b", "a", "b", "a", "b"]


def test_a_lone_job_goes_on_on_its_worker_without_queueing_again() -> None:
    pool = SlicePool(2)
    threads: list[int] = []
    waiting: list[int] = []
    log: list[str] = []
    inner = stepper("a", log, 50)
    # Both workers started and idle first, so the job could move to the other one.
    warm = [pool.submit(stepper(f"w{i}", [], 1)) for i in range(2)]
    assert [w.result(WAIT) for w in warm] == ["w0", "w1"]

    def step() -> str | Again:
        threads.append(threading.get_ident())
        waiting.append(pool.waiting)
        return inner()

    try:
        assert pool.submit(step).result(WAIT) == "a"
    finally:
        pool.shutdown()
    assert len(log) == 50 and len(set(threads)) == 1
    assert waiting == [0] * 50  # never back in the queue


def test_a_job_asked_to_stop_during_a_step_ends_instead_of_queueing_again() -> None:
    # The kick for it may come too late for the step to see it: the AGAIN that follows
    # must not send the job to the back of a long queue.
    pool = SlicePool(1)
    log: list[str] = []
    release, started = threading.Event(), threading.Event()
    try:
        a = pool.submit(stepper("a", log, 5, hold_first(release, started)))
        assert started.wait(WAIT)
        b = pool.submit(stepper("b", log, 2))
        assert not a.cancel()  # in a step
        release.set()
        assert b.result(WAIT) == "b"
        assert a.cancelled() and a.cancel()
    finally:
        pool.shutdown()
    assert log == ["a", "b", "b"]


def test_a_job_is_withdrawn_between_steps() -> None:
    pool = SlicePool(1)
    log: list[str] = []
    release_a, a_started = threading.Event(), threading.Event()
    release_b, b_started = threading.Event(), threading.Event()
    try:
        a = pool.submit(stepper("a", log, 5, hold_first(release_a, a_started)))
        assert a_started.wait(WAIT)
        b = pool.submit(stepper("b", log, 1, hold_first(release_b, b_started)))
        release_a.set()  # a answers AGAIN and queues behind b, which now runs
        assert b_started.wait(WAIT)
        assert pool.waiting == 1
        assert a.cancel()  # waiting between two steps: withdrawn
        assert a.cancelled() and pool.waiting == 0
        assert a.cancel()  # (already cancelled: True, like a Future)
        release_b.set()
        assert b.result(WAIT) == "b"
    finally:
        pool.shutdown()
    assert log == ["a", "b"]  # nothing of a ran after it was withdrawn


def test_a_step_that_raises_fails_its_job_only() -> None:
    pool = SlicePool(1)

    def boom() -> Again:
        raise ValueError("boom")

    try:
        failed: Job[str] = pool.submit(boom)
        with pytest.raises(ValueError, match="boom"):
            failed.result(WAIT)
        assert pool.submit(stepper("ok", [], 2)).result(WAIT) == "ok"
    finally:
        pool.shutdown()


def test_shutdown_withdraws_queued_jobs_and_ends_busy_ones() -> None:
    pool = SlicePool(1)
    log: list[str] = []
    release, started = threading.Event(), threading.Event()
    busy = pool.submit(stepper("busy", log, 10**9, hold_first(release, started)))
    assert started.wait(WAIT)
    queued = pool.submit(stepper("queued", log, 1))
    pool.shutdown(wait=False, cancel_futures=True)
    assert queued.cancelled()
    release.set()  # busy answers AGAIN after shutdown: withdrawn, not run forever
    stopper = threading.Thread(target=pool.shutdown)
    stopper.start()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert busy.cancelled()
    assert "queued" not in log
    with pytest.raises(RuntimeError):
        pool.submit(stepper("late", log, 1))
    assert pool.waiting == 0


def test_a_pool_that_refuses_a_job_does_not_count_it_as_waiting() -> None:
    pool = SlicePool(1)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(print)
    assert pool.waiting == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="workers"):
        SlicePool(0)
    with pytest.raises(ValueError, match="nice"):
        SlicePool(1, nice=20)


@pytest.mark.skipif(sys.platform != "linux", reason="threads have their own nice value on Linux")
def test_workers_run_nice_steps_below_the_submitting_thread() -> None:
    here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if here + 3 > 19:
        pytest.skip("already at the lowest priority")
    pool = SlicePool(1, nice=3)
    try:
        worker = pool.submit(
            lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        ).result(WAIT)
    finally:
        pool.shutdown()
    assert worker == here + 3
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == here


@pytest.mark.skipif(sys.platform != "linux", reason="threads have their own nice value on Linux")
async def test_a_device_runs_its_workers_below_the_event_loop() -> None:
    import asyncio

    from supervisor import LguestDevice, Supervisor

    here = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    if here + 2 > 19:
        pytest.skip("already at the lowest priority")

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async with Supervisor(workers=1, worker_nice=2) as sup:
        assert await asyncio.wrap_future(sup.device.executor.submit(priority)) == here + 2
    for bad in (-1, 20):
        with pytest.raises(ValueError, match="worker_nice"):
            LguestDevice(worker_nice=bad)


@pytest.mark.skipif(sys.platform != "linux", reason="threads have their own policy on Linux")
async def test_idle_workers_run_under_sched_idle_and_leave_the_loop_alone() -> None:
    import asyncio

    from supervisor import LguestDevice, Supervisor

    def policy() -> int:
        return os.sched_getscheduler(0)

    here = policy()
    pool = SlicePool(1, idle=True)
    try:
        assert pool.submit(policy).result(WAIT) == os.SCHED_IDLE
    finally:
        pool.shutdown()
    async with Supervisor(workers=1, idle_workers=True) as sup:
        assert await asyncio.wrap_future(sup.device.executor.submit(policy)) == os.SCHED_IDLE
    async with LguestDevice(workers=1) as dev:  # (the default: a nice value, not the policy)
        assert await asyncio.wrap_future(dev.executor.submit(policy)) == here
    assert policy() == here


@pytest.mark.parametrize("through", ["step", "owner"])
def test_a_withdrawn_job_lets_go_of_what_it_holds_at_once(through: str) -> None:
    """A withdrawn job's entry stays in the queue until a worker skips it; what it refers
    to must not live that long: its step's (a CPU, a guest's memory), and its owner, its
    hurry and its shorten (the supervisor passes a CPU and its slice meter's methods)."""
    import gc
    import weakref

    class Held:
        def hurry(self) -> bool:
            return False

        def shorten(self) -> bool:
            return False

    pool = SlicePool(1)
    release, started = threading.Event(), threading.Event()
    try:
        busy = pool.submit(stepper("busy", [], 1, hold_first(release, started)))
        assert started.wait(WAIT)
        held = Held()
        alive = weakref.ref(held)
        if through == "step":
            queued = pool.submit(lambda h=held: h)
        else:
            queued = pool.submit(lambda: 0, owner=held, hurry=held.hurry, shorten=held.shorten)
        del held
        assert queued.cancel()
        gc.collect()
        assert alive() is None  # while the worker is still busy and the entry queued
    finally:
        release.set()
        pool.shutdown()
    assert busy.result(WAIT) == "busy"


class Owner:
    """Whom an urgent job is urgent for (a CPU, in the supervisor)."""


def hurry_log(name: str, log: list[str], answer: bool = True) -> Callable[[], bool]:
    """A job's ``hurry`` that logs ``name``; it answers ``answer`` (whether it asked)."""

    def hurry() -> bool:
        log.append(name)
        return answer

    return hurry


def test_an_urgent_job_goes_first_and_hurries_the_busy_step() -> None:
    pool = SlicePool(1)
    log: list[str] = []
    hurried: list[str] = []
    release, started = threading.Event(), threading.Event()
    try:
        a = pool.submit(
            stepper("a", log, 2, hold_first(release, started)), hurry=hurry_log("a", hurried)
        )
        assert started.wait(WAIT)
        b = pool.submit(stepper("b", log, 1), hurry=hurry_log("b", hurried))
        c = pool.submit(stepper("c", log, 1), hurry=hurry_log("c", hurried))
        assert hurried == []  # (normal jobs hurry nobody)
        d = pool.submit(stepper("d", log, 1), urgent=Owner())
        assert hurried == ["a"]  # the one worker is busy: its step is asked to end
        assert (pool.jumps, pool.hurried, pool.waiting) == (1, 1, 3)
        release.set()
        assert [j.result(WAIT) for j in (a, b, c, d)] == ["a", "b", "c", "d"]
    finally:
        pool.shutdown()
    # d before everything that waited; a's AGAIN went to the back as always.
    assert log == ["a", "d", "b", "c", "a"]


def test_an_owner_jumps_the_queue_at_most_twice_per_round() -> None:
    # A guest that raises events for itself as often as it likes gets two steps ahead of
    # the queue per round: its third urgent job waits until the workers have taken as
    # many jobs as its first jump went ahead of (not behind everything queued since).
    # Another owner's jumps are its own.
    pool = SlicePool(1)
    log: list[str] = []
    release, started = threading.Event(), threading.Event()
    hostile, other = Owner(), Owner()
    try:
        a = pool.submit(stepper("a", log, 1, hold_first(release, started)))
        assert started.wait(WAIT)
        jobs = [a, pool.submit(stepper("b", log, 1)), pool.submit(stepper("c", log, 1))]
        jobs.append(pool.submit(stepper("d", log, 1), urgent=hostile))  # ahead of b, c
        jobs.append(pool.submit(stepper("e", log, 1), urgent=hostile))  # ahead of d, b, c
        jobs.append(pool.submit(stepper("x", log, 1)))
        jobs.append(pool.submit(stepper("f", log, 1), urgent=hostile))  # refused
        jobs.append(pool.submit(stepper("g", log, 1), urgent=other))
        assert (pool.jumps, pool.refused, pool.waiting) == (3, 1, 7)
        release.set()
        assert [j.result(WAIT) for j in jobs] == list("abcdexfg")
        # f after three takes (e, d, b: as many as d jumped, with d's own), before c and x.
        assert log == ["a", "g", "e", "d", "b", "f", "c", "x"]
        # Every job it jumped has had its step: the owner may jump again.
        assert pool.submit(stepper("h", log, 1), urgent=hostile).result(WAIT) == "h"
        assert (pool.jumps, pool.refused) == (4, 1)
    finally:
        pool.shutdown()


def answers(name: str, log: list[str], *steps: str | Again) -> Callable[[], str | Again]:
    """A step that logs ``name`` and gives ``steps``' answers in turn."""
    left = list(steps)

    def step() -> str | Again:
        log.append(name)
        return left.pop(0)

    return step


def test_a_step_that_answers_again_urgent_goes_on_first_once_per_round() -> None:
    # A handler still running when its slice's time ran out: its next step goes before
    # the queue (on the worker that just ran it), as an urgent job of its owner's, and
    # is refused like one.
    pool = SlicePool(1)
    log: list[str] = []
    release, started = threading.Event(), threading.Event()
    try:
        gate = hold_first(release, started)
        first = answers("h", log, AGAIN_URGENT, AGAIN_URGENT, AGAIN_URGENT, "h")

        def held() -> str | Again:
            gate(len(log) + 1)
            return first()

        h = pool.submit(held, owner=Owner())
        assert started.wait(WAIT)
        others = [pool.submit(stepper(name, log, 1)) for name in "bc"]
        # Without an owner, AGAIN_URGENT is a plain AGAIN: to the back.
        plain = pool.submit(answers("p", log, AGAIN_URGENT, "p"))
        release.set()
        assert h.result(WAIT) == "h" and [j.result(WAIT) for j in others] == ["b", "c"]
        assert plain.result(WAIT) == "p"
    finally:
        release.set()
        pool.shutdown()
    # Twice first; the third time behind as many jobs as the first jump went ahead of
    # (with its own take: b, c), before p.
    assert log == ["h", "h", "h", "b", "c", "h", "p", "p"]
    assert (pool.jumps, pool.refused) == (2, 1)


def test_an_urgent_job_hurries_nobody_while_a_worker_is_free() -> None:
    pool = SlicePool(2)
    hurried: list[str] = []
    warm = [pool.submit(stepper(f"w{i}", [], 1)) for i in range(2)]
    assert [w.result(WAIT) for w in warm] == ["w0", "w1"]
    release, started = threading.Event(), threading.Event()
    try:
        busy = pool.submit(
            stepper("busy", [], 1, hold_first(release, started)), hurry=hurry_log("busy", hurried)
        )
        assert started.wait(WAIT)
        assert pool.submit(stepper("u", [], 1), urgent=Owner()).result(WAIT) == "u"
        assert hurried == [] and pool.hurried == 0 and pool.jumps == 1
        release.set()
        assert busy.result(WAIT) == "busy"
    finally:
        release.set()
        pool.shutdown()


def test_an_urgent_job_hurries_nobody_while_a_worker_is_between_jobs() -> None:
    """A worker that has ended a job but not yet come back for the next (here: held in
    the job's done callback, which runs on that worker) takes the queue's front next."""
    pool = SlicePool(2)
    hurried: list[str] = []
    release, started = threading.Event(), threading.Event()
    last_go, last_started = threading.Event(), threading.Event()
    between, go_on = threading.Event(), threading.Event()

    def hold(_: object) -> None:
        between.set()
        assert go_on.wait(WAIT)

    try:
        busy = pool.submit(
            stepper("busy", [], 1, hold_first(release, started)), hurry=hurry_log("busy", hurried)
        )
        assert started.wait(WAIT)
        last = pool.submit(stepper("last", [], 1, hold_first(last_go, last_started)))
        assert last_started.wait(WAIT)
        last.add_done_callback(hold)
        last_go.set()
        assert between.wait(WAIT)  # its worker is between jobs: neither busy nor waiting
        urgent = pool.submit(stepper("u", [], 1), urgent=Owner())
        assert hurried == [] and pool.hurried == 0
        go_on.set()
        assert urgent.result(WAIT) == "u"
        release.set()
        assert busy.result(WAIT) == "busy"
    finally:
        release.set()
        last_go.set()
        go_on.set()
        pool.shutdown()


def test_the_step_that_has_held_its_worker_longest_is_hurried() -> None:
    pool = SlicePool(2)
    hurried: list[str] = []
    release = threading.Event()
    first, second = threading.Event(), threading.Event()
    try:
        old = pool.submit(
            stepper("old", [], 1, hold_first(release, first)),
            hurry=hurry_log("old", hurried, answer=False),  # (between two runs: not asked)
        )
        assert first.wait(WAIT)
        new = pool.submit(
            stepper("new", [], 1, hold_first(release, second)), hurry=hurry_log("new", hurried)
        )
        assert second.wait(WAIT)
        urgent = pool.submit(stepper("u", [], 1), urgent=Owner())
        assert hurried == ["old"]
        assert pool.hurried == 0  # it answered that it asked nothing
        release.set()
        assert [j.result(WAIT) for j in (old, new, urgent)] == ["old", "new", "u"]
    finally:
        release.set()
        pool.shutdown()


def test_a_step_that_jumped_the_queue_is_never_hurried() -> None:
    # A handler's rest (an urgent step) that another urgent job cut short would answer
    # AGAIN and wait at the back for a whole round: the ordinary step is hurried
    # instead, even though the urgent one has held its worker longer; with only urgent
    # steps in progress nobody is, and the new urgent job waits for one to end.
    pool = SlicePool(2)
    hurried: list[str] = []
    warm = [pool.submit(stepper(f"w{i}", [], 1)) for i in range(2)]
    assert [w.result(WAIT) for w in warm] == ["w0", "w1"]
    release, plain_release = threading.Event(), threading.Event()
    first, second = threading.Event(), threading.Event()
    try:
        rest = pool.submit(
            stepper("rest", [], 1, hold_first(release, first)),
            hurry=hurry_log("rest", hurried),
            urgent=Owner(),
        )
        assert first.wait(WAIT)
        plain = pool.submit(
            stepper("plain", [], 2, hold_first(plain_release, second)),
            hurry=hurry_log("plain", hurried),
        )
        assert second.wait(WAIT)
        u = pool.submit(stepper("u", [], 1), urgent=Owner())
        assert hurried == ["plain"] and pool.hurried == 1
        plain_release.set()  # its AGAIN goes to the back; u takes its worker
        assert u.result(WAIT) == "u" and plain.result(WAIT) == "plain"
        # Only the urgent step in progress, the other worker busy with a jumped step too.
        again = threading.Event()
        v_started = threading.Event()
        v = pool.submit(
            stepper("v", [], 1, hold_first(again, v_started)),
            hurry=hurry_log("v", hurried),
            urgent=Owner(),
        )
        assert v_started.wait(WAIT)
        w = pool.submit(stepper("w", [], 1), urgent=Owner())
        assert hurried == ["plain"] and pool.waiting == 1
        again.set()
        assert v.result(WAIT) == "v" and w.result(WAIT) == "w"
    finally:
        release.set()
        plain_release.set()
        pool.shutdown()
    assert rest.result(WAIT) == "rest"


def test_an_ended_job_lets_go_of_its_owner_while_its_worker_waits() -> None:
    """A worker keeps its last job until it takes the next: the job must not keep its
    owner (a CPU, and through it its guest) alive meanwhile."""
    import gc
    import weakref

    class Owner:
        def hurry(self) -> bool:
            return False

    pool = SlicePool(1)
    try:
        owner = Owner()
        gone = weakref.ref(owner)
        job = pool.submit(lambda: 7, hurry=owner.hurry, owner=owner)
        assert job.result(timeout=60) == 7
        del job, owner
        gc.collect()
        assert gone() is None
    finally:
        pool.shutdown()


def test_a_job_no_worker_is_free_for_asks_every_step_in_progress_to_shorten() -> None:
    # A lone step (begun while nobody waited) may run longer than a step in turn; a job
    # that must wait for a worker asks each step in progress to shorten, while a job a
    # free (or a new) worker takes asks nobody.
    pool = SlicePool(2)
    shortened: list[str] = []
    release = threading.Event()
    first, second = threading.Event(), threading.Event()
    try:
        a = pool.submit(
            stepper("a", [], 1, hold_first(release, first)), shorten=hurry_log("a", shortened)
        )
        assert first.wait(WAIT)
        b = pool.submit(  # (the second worker starts for it)
            stepper("b", [], 1, hold_first(release, second)),
            shorten=hurry_log("b", shortened, answer=False),  # (not lone: nothing to shorten)
        )
        assert second.wait(WAIT)
        assert shortened == [] and pool.shortened == 0
        c = pool.submit(stepper("c", [], 1))
        assert sorted(shortened) == ["a", "b"] and pool.shortened == 1
        release.set()
        assert [j.result(WAIT) for j in (a, b, c)] == ["a", "b", "c"]
    finally:
        release.set()
        pool.shutdown()


def test_a_step_that_goes_to_the_back_asks_the_other_steps_to_shorten() -> None:
    # One job answers AGAIN while another waits: it is queued behind the waiting one, and
    # the step still in progress on the other worker is asked to shorten.
    pool = SlicePool(2)
    shortened: list[str] = []
    release_a, release_b = threading.Event(), threading.Event()
    first, second = threading.Event(), threading.Event()
    try:
        a = pool.submit(
            stepper("a", [], 2, hold_first(release_a, first)), shorten=hurry_log("a", shortened)
        )
        assert first.wait(WAIT)
        b = pool.submit(
            stepper("b", [], 1, hold_first(release_b, second)), shorten=hurry_log("b", shortened)
        )
        assert second.wait(WAIT)
        c = pool.submit(stepper("c", [], 1))  # waits: both steps are asked
        assert sorted(shortened) == ["a", "b"]
        shortened.clear()
        d = pool.submit(stepper("d", [], 1))
        assert sorted(shortened) == ["a", "b"]
        shortened.clear()
        release_a.set()  # a answers AGAIN: behind c and d, and b (still running) is asked
        assert c.result(WAIT) == "c" and d.result(WAIT) == "d"
        assert shortened == ["b"]
        release_b.set()
        assert a.result(WAIT) == "a" and b.result(WAIT) == "b"
    finally:
        release_a.set()
        release_b.set()
        pool.shutdown()


@pytest.mark.parametrize("end", ["finished", "withdrawn", "stopped"])
def test_an_ended_job_lets_go_of_its_done_callbacks(end: str) -> None:
    """A job calls each done callback once, then lets go of it: the run loop's refers to
    the CPU, and an ended job is kept a while (by its worker until it takes the next
    job, a withdrawn entry until a worker skips it)."""
    import gc
    import weakref

    called = threading.Event()

    class Held:
        def note(self, done: object) -> None:
            called.set()

    pool = SlicePool(1)
    release, started = threading.Event(), threading.Event()
    try:
        if end == "withdrawn":  # (it waits behind a busy job)
            pool.submit(stepper("busy", [], 1, hold_first(release, started)))
            assert started.wait(WAIT)
            job = pool.submit(stepper("job", [], 1))
        else:  # "stopped": asked to stop in a step, it answers AGAIN (cancelled)
            steps = 2 if end == "stopped" else 1
            job = pool.submit(stepper("job", [], steps, hold_first(release, started)))
            assert started.wait(WAIT)
        held = Held()
        alive = weakref.ref(held)
        job.add_done_callback(held.note)
        del held
        if end == "withdrawn":
            assert job.cancel()
        elif end == "stopped":
            assert not job.cancel()  # in a step: asked to stop
            release.set()
        else:
            release.set()
        assert called.wait(WAIT)
        gc.collect()
        assert alive() is None  # the job itself is still referenced here
        assert job.cancelled() == (end != "finished")
    finally:
        release.set()
        pool.shutdown()
