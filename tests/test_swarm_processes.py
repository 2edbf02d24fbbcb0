"""``swarm --processes N``: a swarm sharded across processes (supervisor.shards) prints
what one process would, ends with the same status, and leaves no shard behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor import shards
from supervisor.admission import Admission, Reading
from supervisor.cli import build_parser, swarm_processes

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 60  # seconds: a bound for failing, never a wait for success
TICKER = ["guests/ticker.img", "--memory", "1M"]
ENDLESS = [*TICKER, "--cmdline", "ticks=10000000 period_ms=1"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=LIMIT,
    )  # fmt: skip


def row(out: str) -> list[str]:
    """The swarm table's one row: finished, failed, died, ..."""
    line = next(line for line in out.splitlines() if re.search(r"\d\.\d\ds", line))
    return re.findall(r"[\d,.]+", line)


def children(pid: int) -> set[int]:
    """The live processes whose parent is ``pid``."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def gone(pids: set[int]) -> bool:
    """Whether every one of ``pids`` ends within LIMIT (zombies count as ended): waits
    on each one's pidfd, which becomes readable when the process exits."""
    fds: list[int] = []
    try:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # (already reaped: gone)
                fds.append(os.pidfd_open(pid))
        deadline = time.monotonic() + LIMIT
        for fd in fds:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return False
        return True
    finally:
        for fd in fds:
            os.close(fd)


def test_every_guests_output_once_in_its_order() -> None:
    proc = cli(
        "swarm", "-n", "5", *TICKER, "--cmdline", "ticks=2 period_ms=1",
        "--console", "prefix", "--processes", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "swarm of 5, in 2 processes" in proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ticker-")]
    assert len(lines) == 15
    for i in range(5):
        mine = [line for line in lines if line.startswith(f"ticker-{i}: ")]
        assert mine == [f"ticker-{i}: tick 1", f"ticker-{i}: tick 2", f"ticker-{i}: done"]
    assert row(proc.stdout)[:3] == ["5", "0", "0"]
    assert proc.stderr == ""


def test_the_tails_of_every_shard_in_one_table() -> None:
    proc = cli("swarm", "-n", "3", *TICKER, "--cmdline", "ticks=4 period_ms=1",
               "--console", "tail", "--tail-lines", "2", "--processes", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout[proc.stdout.index("last console lines") :]
    assert [int(i) for i in re.findall(r"ticker-(\d)", table)] == [0, 1, 2]
    assert table.count("tick 4") == 3 and table.count("done") == 3 and "tick 3" not in table


def test_failed_and_dead_guests_are_counted_across_shards() -> None:
    failed = cli("swarm", "-n", "3", "guests/blockcopy.img", "--memory", "1M", "--processes", "2")
    assert failed.returncode == 1
    assert row(failed.stdout)[:3] == ["0", "3", "0"]
    died = cli("swarm", "-n", "3", "guests/faulty-crash.img", "--memory", "1M", "--processes", "3")
    assert died.returncode == 1
    assert row(died.stdout)[:3] == ["0", "0", "3"]
    assert "died x3: CRASH: guest panic" in died.stdout


def test_bad_input_is_said_once() -> None:
    proc = cli("swarm", "-n", "4", "guests/hello.S", "--processes", "2")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.count("\n") == 1 and "hello.S: not a guest image" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--deterministic"], "--processes: a swarm with --deterministic"),
        (["--gdb", "127.0.0.1:0"], "--processes: a swarm with --gdb runs in one process"),
        (["--cluster", "local"], "--processes is for a swarm on this machine"),
        (["--processes", "0"], "--processes: must be at least 1"),
    ],
)
def test_what_runs_in_one_process_refuses_more(args: list[str], message: str) -> None:
    proc = cli("swarm", "-n", "2", "guests/hello.img", "--processes", "2", *args)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def _start(*args: str) -> tuple[subprocess.Popen[str], set[int]]:
    """A running sharded swarm of endless tickers and its shards' pids."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "swarm", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    shards_seen: set[int] = set()
    while len(shards_seen) < 2:  # a guest of each shard (even, odd) has ticked
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        shards_seen.add(int(line.split(":")[0].rpartition("-")[2]) % 2)
    return proc, children(proc.pid)


@pytest.mark.parametrize(
    ("signum", "status", "line"),
    [(signal.SIGTERM, 143, "supervisor: terminated\n"),
     (signal.SIGINT, 130, "supervisor: interrupted\n")],
)  # fmt: skip
def test_a_signal_stops_every_shard_and_the_table_adds_them_up(
    signum: int, status: int, line: str
) -> None:
    swarm, shard_pids = _start(
        "-n", "5", *ENDLESS, "--console", "prefix", "--max-alive", "4", "--processes", "2"
    )
    try:
        assert len(shard_pids) == 2
        swarm.send_signal(signum)
        out, err = swarm.communicate(timeout=LIMIT)
    finally:
        swarm.kill()
    assert (swarm.returncode, err) == (status, line)
    assert "swarm of 5, in 2 processes" in out
    # Two alive in each shard (its share of --max-alive): guest 4 never launched.
    assert "interrupted: 4 guests stopped, 1 never launched" in out
    assert gone(shard_pids)


def test_a_lost_shard_is_named_and_the_others_carry_on() -> None:
    swarm, shard_pids = _start(
        "-n", "4", *TICKER, "--cmdline", "ticks=50 period_ms=100", "--console", "prefix",
        "--processes", "2",
    )  # fmt: skip
    try:
        first = next(p for p in shard_pids if b"0,2," in Path(f"/proc/{p}/cmdline").read_bytes())
        os.kill(first, signal.SIGKILL)  # shard 0: guests 0 and 2
        out, err = swarm.communicate(timeout=LIMIT)
    finally:
        swarm.kill()
    assert swarm.returncode == 1
    assert err == (
        "supervisor: shard 0 ended with status -9, its guests not counted after the 0 it "
        "reported ended\n"
    )
    assert row(out)[:3] == ["2", "0", "0"]  # guests 1 and 3 ran to their end
    assert "ticker-1: done" in out and "ticker-3: done" in out


def test_shards_stop_when_their_parent_is_killed() -> None:
    # --console tail: the shards write nothing to their stdout, whose reader goes away
    # too; their stdin reaching EOF is what tells them.
    swarm = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "swarm", "-n", "2", *ENDLESS, "--console", "tail",
         "--processes", "2"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    shard_pids: set[int] = set()
    try:
        deadline = time.monotonic() + LIMIT
        while len(shard_pids) < 2 and time.monotonic() < deadline:
            shard_pids = children(swarm.pid)
            time.sleep(0.05)
        assert len(shard_pids) == 2
        swarm.kill()  # no clean-up
        swarm.wait(timeout=LIMIT)
        assert gone(shard_pids)
    finally:
        swarm.kill()
        for pid in shard_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_closed_stdout_ends_a_sharded_swarm_quietly_with_141() -> None:
    swarm, shard_pids = _start("-n", "2", *ENDLESS, "--console", "prefix", "--processes", "2")
    try:
        assert swarm.stdout is not None and swarm.stderr is not None
        swarm.stdout.close()  # like `| head -2`: the reader goes away
        swarm.wait(timeout=LIMIT)
        err = swarm.stderr.read()
    finally:
        swarm.kill()
    assert (swarm.returncode, err) == (141, "")
    assert gone(shard_pids)


def test_the_default_is_a_process_per_cpu_for_large_swarms_only() -> None:
    cpus = shards.cpus_available()
    assert shards.default_processes(1) == 1
    assert shards.default_processes(shards.PER_PROCESS - 1) == 1
    assert shards.default_processes(2 * shards.PER_PROCESS) == min(2, cpus)
    assert shards.default_processes(1000 * shards.PER_PROCESS) == cpus
    for total in (0, 1, 5, 7, 100):
        parts = [shards.share(total, i, 3) for i in range(3)]
        assert sum(parts) == total and max(parts) - min(parts) <= 1
    assert [list(shards.Shard(i, 3, 9).guests(7)) for i in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="out of range"):
        shards.Shard.parse("3,3,9")


def test_a_shard_admits_its_share_of_the_memory_room() -> None:
    """Two processes admitting into the same memory each count half the room."""
    mib = 1 << 20

    def limit(shares: int) -> int:
        readings = iter([Reading(0, 160 * mib), Reading(64 * mib, 160 * mib)])
        a = Admission(lambda: next(readings), shares=shares)

        async def fill() -> None:
            for _ in range(64):
                await a.admit()  # the 64th takes the second reading: 1 MiB a guest

        asyncio.run(fill())
        return a.limit

    # 160 MiB less a quarter kept, at twice 1 MiB a guest: 60 more alone, 30 as one of two.
    assert (limit(1), limit(2)) == (64 + 60, 64 + 30)
    with pytest.raises(ValueError, match="shares"):
        Admission(lambda: Reading(0, 0), shares=0)


def test_how_many_processes_a_swarm_runs_in() -> None:
    def processes(*args: str, deterministic: bool = False) -> int:
        parsed = build_parser().parse_args(["swarm", "guests/hello.img", *args])
        return swarm_processes(parsed, deterministic)

    big = str(1000 * shards.PER_PROCESS)
    assert processes("-n", big) == shards.cpus_available()
    assert processes("-n", "10") == 1
    assert processes("-n", big, deterministic=True) == 1  # one virtual clock
    assert processes("-n", big, "--gdb", "127.0.0.1:0") == 1
    assert processes("-n", "3", "--processes", "8") == 3  # never more than the guests
    assert processes("-n", "30", "--processes", "8", "--max-alive", "2") == 2
    assert processes("-n", "30", "--processes", "1", "--deterministic", deterministic=True) == 1


def test_a_shard_reports_its_launches_before_any_guest_ends() -> None:
    """The parent's progress shows guests launched while none has ended yet, the last
    launch included."""
    read_end, write_end = os.pipe()
    shard = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "swarm", "-n", "2", *ENDLESS,
         "--shard", f"0,1,{write_end}"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, pass_fds=(write_end,),
    )  # fmt: skip
    os.close(write_end)
    try:
        reports = b""
        while b'"progress":[2,' not in reports:  # every launch said, though none ended
            ready, _, _ = select.select([read_end], [], [], LIMIT)
            assert ready
            data = os.read(read_end, 4096)
            assert data, reports
            reports += data
        for line in reports.splitlines():
            _launched, finished, failed, died = json.loads(line)["progress"]
            assert (finished, failed, died) == (0, 0, 0)
    finally:
        shard.kill()
        shard.wait(timeout=LIMIT)
        os.close(read_end)
