"""The benchmarks' per-thread CPU accounting (benchmarks/threads.py)."""

from __future__ import annotations

import threading

import pytest

from benchmarks import threads as thread_use

STAT = "4242 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0 100 0 0"
STATUS = "Name:\tx\nvoluntary_ctxt_switches:\t17\nnonvoluntary_ctxt_switches:\t5\n"


def test_parse_reads_user_and_system_time_and_both_switch_counts() -> None:
    assert thread_use.parse(STAT, STATUS, 100) == thread_use.Usage(3.0, 17, 5)


def test_parse_reads_the_time_on_a_core_and_the_wait_for_one_from_schedstat() -> None:
    # (schedstat's nanoseconds, not stat's 10 ms ticks: a run of 0.15 s is 15 ticks)
    usage = thread_use.parse(STAT, STATUS, 100, "123456789 2500000000 7\n")
    assert usage == thread_use.Usage(0.123456789, 17, 5, 2.5)
    assert thread_use.run_delay("") == 0.0
    assert thread_use.on_cpu("") is None


def test_the_time_asleep_is_the_wall_time_neither_on_a_core_nor_waiting() -> None:
    two = thread_use.Usage(cpu=1.2, waited=0.4)  # two threads' sums over 1 s each
    assert two.asleep(1.0, threads=2) == pytest.approx(0.2)
    assert thread_use.Usage(cpu=1.0).asleep(1.0) == 0.0
    assert thread_use.Usage(cpu=1.0).asleep(0.0) == 0.0


def test_roles_by_name_and_by_the_calling_thread() -> None:
    assert thread_use.role("lguest-cpu_0", 7, 1) == "workers"
    assert thread_use.role(None, 1, 1) == "loop"
    assert thread_use.role(None, 7, 1) == "other"  # a native thread: the slicer
    assert thread_use.role("MainThread", 7, 1) == "other"


def test_spent_sums_by_role_and_counts_a_new_thread_whole() -> None:
    before = thread_use.Snapshot(
        {1: thread_use.Usage(1.0, 10, 1), 2: thread_use.Usage(2.0, 0, 0)},
        {1: "loop", 2: "workers"},
    )
    after = thread_use.Snapshot(
        {
            1: thread_use.Usage(1.5, 12, 1),
            2: thread_use.Usage(3.0, 4, 9),
            3: thread_use.Usage(0.25, 100, 0),
            4: thread_use.Usage(0.5, 1, 1),
        },
        {1: "loop", 2: "workers", 3: "other", 4: "workers"},
    )
    got = thread_use.spent(before, after)
    assert got["loop"] == thread_use.Usage(0.5, 2, 0)
    assert got["workers"] == thread_use.Usage(1.5, 5, 10)
    assert got["other"] == thread_use.Usage(0.25, 100, 0)


def test_a_busy_worker_thread_is_seen_with_its_cpu() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    before = thread_use.snapshot()
    worker = threading.Thread(target=spin, name="lguest-cpu_9")
    worker.start()
    try:
        for _ in range(6000):  # (a bound that only a broken accounting reaches)
            if thread_use.spent(before, thread_use.snapshot())["workers"].cpu >= 0.02:
                break
            stop.wait(0.01)
        else:
            raise AssertionError("the worker's CPU time was never seen")
    finally:
        stop.set()
        worker.join()
