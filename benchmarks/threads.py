"""Where this process's CPU time goes, thread by thread (Linux ``/proc/self/task``).

A figure that compares several busy guests with one (``two_spinners``) loses
throughput to whatever else needs a core while the workers run: the event loop,
the native slicer thread (``supervisor/_fuel.c``), and workers that block (on the
GIL, which one worker holds between two slices while the other wants it, or on the
pool's lock).  :func:`snapshot` before and after a run and :func:`spent` between
them say how much of each there was, by role:

* ``workers``: the slice pool's threads (Python names starting ``lguest-cpu``);
* ``loop``: the thread that took the snapshot (the event loop's);
* ``other``: every other thread, the slicer among them.

For each role: CPU seconds, voluntary context switches (the thread blocked: a lock,
the GIL, a condition, a sleep), involuntary ones (the kernel preempted it), and the
seconds it was runnable but waited for a core (``schedstat``'s run delay: what the
kernel, not the thread's own work, took from its wall time).  A thread's wall time
that is neither is time it slept (:meth:`Usage.asleep`).  The CPU seconds are
``schedstat``'s nanoseconds on a core where the kernel keeps them, else ``stat``'s
clock ticks (10 ms each: too coarse for runs of a tenth of a second).  Threads that
ended between the two snapshots are not counted.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

WORKER_PREFIX = "lguest-cpu"
ROLES = ("workers", "loop", "other")


@dataclass(frozen=True)
class Usage:
    """One thread's counters, or a role's sums."""

    cpu: float = 0.0  # seconds, user + system
    blocked: int = 0  # voluntary context switches
    preempted: int = 0  # involuntary context switches
    waited: float = 0.0  # seconds runnable, waiting for a core (run delay)

    def asleep(self, wall: float, threads: int = 1) -> float:
        """Of ``threads`` threads' ``wall`` seconds each, the share none of them was on a
        core nor waiting for one: blocked (the GIL, a lock) or idle."""
        return max(0.0, 1.0 - (self.cpu + self.waited) / (wall * threads)) if wall > 0 else 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.cpu + other.cpu,
            self.blocked + other.blocked,
            self.preempted + other.preempted,
            self.waited + other.waited,
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.cpu - other.cpu,
            self.blocked - other.blocked,
            self.preempted - other.preempted,
            self.waited - other.waited,
        )


@dataclass(frozen=True)
class Snapshot:
    """Each live thread's usage by native id, and the role of each."""

    usage: dict[int, Usage]
    roles: dict[int, str]


def run_delay(schedstat: str) -> float:
    """Seconds a thread waited for a core, from its ``schedstat`` file's text (0 if the
    kernel keeps none)."""
    fields = schedstat.split()
    return int(fields[1]) / 1e9 if len(fields) > 1 else 0.0


def on_cpu(schedstat: str) -> float | None:
    """Seconds a thread ran on a core, from its ``schedstat`` file's text (None if the
    kernel keeps none)."""
    fields = schedstat.split()
    return int(fields[0]) / 1e9 if len(fields) > 1 else None


def own_wait() -> float:
    """:func:`run_delay` of the calling thread so far (0 where ``/proc`` has none)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return run_delay(f.read())
    except OSError:
        return 0.0


def parse(stat: str, status: str, ticks: int, schedstat: str = "") -> Usage:
    """A thread's usage from its ``stat``, ``status`` and ``schedstat`` files' text."""
    fields = stat[stat.rindex(")") + 2 :].split()  # (the name may hold spaces)
    cpu = on_cpu(schedstat)
    if cpu is None:
        cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    counts = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            counts[key] = int(value)
    return Usage(
        cpu,
        counts.get("voluntary_ctxt_switches", 0),
        counts.get("nonvoluntary_ctxt_switches", 0),
        run_delay(schedstat),
    )


def role(name: str | None, tid: int, me: int) -> str:
    """The role of thread ``tid`` whose Python name is ``name`` (None: not a Python thread),
    seen from thread ``me``."""
    if tid == me:
        return "loop"
    if name is not None and name.startswith(WORKER_PREFIX):
        return "workers"
    return "other"


def snapshot() -> Snapshot:
    """Every live thread's usage now (empty where ``/proc`` has no threads)."""
    ticks = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    me = threading.get_native_id()
    usage: dict[int, Usage] = {}
    roles: dict[int, str] = {}
    try:
        tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return Snapshot(usage, roles)
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/status") as f:
                status = f.read()
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                schedstat = f.read()
        except OSError:  # it ended meanwhile (or the kernel keeps no schedstat)
            continue
        usage[tid] = parse(stat, status, ticks, schedstat)
        roles[tid] = role(names.get(tid), tid, me)
    return Snapshot(usage, roles)


def spent(before: Snapshot, after: Snapshot) -> dict[str, Usage]:
    """What each role used between the snapshots (a thread born in between: all of its)."""
    total = {name: Usage() for name in ROLES}
    for tid, now in after.usage.items():
        then = before.usage.get(tid, Usage())
        which = after.roles[tid]
        total[which] = total[which] + (now - then)
    return total
