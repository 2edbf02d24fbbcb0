"""Isolation and prompt shutdown under load.

Each test here pins one guarantee of docs/security.md: a killed or closed guest
does not wait for its queued slice, host writes into guest memory are seen by
the guest's code, a snapshot names no host file or socket by itself, the
capture console is bounded by bytes, a flooding console pays for itself.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest
from guestasm import SPIN, assemble, boot, notified, until
from test_cli import cli

from supervisor import Guest, GuestConfig, LguestDevice, Supervisor
from supervisor.config import ConfigError
from supervisor.launcher.console import LineStream
from supervisor.launcher.devices import Device
from supervisor.snapshot import Snapshot


@contextmanager
def blocked_executor(dev: LguestDevice) -> Iterator[threading.Event]:
    """Occupy every executor thread: slices submitted now wait in the queue."""
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        started.release()
        release.wait()

    workers = dev.executor.workers
    for _ in range(workers):
        dev.executor.submit(hold)
    for _ in range(workers):
        started.acquire()
    try:
        yield release
    finally:
        release.set()


def queued(dev: LguestDevice) -> int:
    """How many guests have a slice waiting in the executor's queue."""
    return sum(
        1
        for f in dev.files
        if f._lg is not None and any(c.run.queued_slice is not None for c in f._lg.cpus)
    )


# -- 3. prompt shutdown --------------------------------------------------------------------------
async def test_cancelling_a_read_withdraws_its_queued_slice(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    reader = asyncio.create_task(g.file.read(4))
    with blocked_executor(dev):
        await until(lambda: queued(dev) == 1)
        reader.cancel()
        done, _ = await asyncio.wait({reader}, timeout=60)  # the worker stays blocked meanwhile
        assert done, "the cancelled read waited for its queued slice"
        assert reader.cancelled()
        before = g.u32("counter")
        await asyncio.wait_for(g.file.close(), 60)
    assert g.u32("counter") == before  # the withdrawn slice never ran


@pytest.mark.parametrize("n", [20])
async def test_supervisor_aclose_does_not_wait_for_queued_slices(tmp_path: Path, n: int) -> None:
    image = tmp_path / "spin.img"
    image.write_bytes(assemble(SPIN).image)
    sup = Supervisor(workers=1)
    config = GuestConfig(image=image, memory="128K", console="null")
    guests = [await sup.launch(config) for _ in range(n)]
    with blocked_executor(sup.device) as release:
        await until(lambda: queued(sup.device) == n)
        closing = asyncio.create_task(sup.aclose())
        await until(lambda: all(g.done for g in guests), timeout=60)
        release.set()
        await closing
    assert [(await g.wait()).reason for g in guests] == ["supervisor closed"] * n


async def test_kill_does_not_wait_for_queued_slices(tmp_path: Path) -> None:
    image = tmp_path / "spin.img"
    image.write_bytes(assemble(SPIN).image)
    async with Supervisor(workers=1) as sup:
        config = GuestConfig(image=image, memory="128K", console="null")
        guests = [await sup.launch(config) for _ in range(5)]
        with blocked_executor(sup.device):
            await until(lambda: queued(sup.device) == 5)
            result = await asyncio.wait_for(guests[2].kill(), 60)
            assert result.died and result.reason == "killed"
            assert not any(g.done for g in guests[:2] + guests[3:])


STUBBORN = """
import asyncio, sys
from supervisor.cli import run_coroutine

async def stubborn() -> int:
    print("ready", flush=True)
    while True:  # a shutdown that never ends
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            print("cancelled", flush=True)

sys.exit(run_coroutine(stubborn(), sys.argv[1]))
"""


def next_line(stream: IO[str]) -> str:
    """The next line a child prints, or a failure after 60 s: a child that never prints
    it (a signal it does not get) fails the test rather than hanging the run.  (The
    line is not in ``stream``'s buffer yet: the child writes it after the last one.)"""
    ready, _, _ = select.select([stream], [], [], 60)
    assert ready, "no line from the child within 60 s"
    return stream.readline()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_second_ctrl_c_ends_the_process_at_once(loop: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN, loop],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert next_line(proc.stdout) == "ready\n"
        proc.send_signal(signal.SIGINT)
        assert next_line(proc.stdout) == "cancelled\n"  # the first asks politely
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert proc.stderr is not None and "interrupted" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


# Each line on stdin: a SIGINT that a thread of the child's own takes, as the kernel may
# give a process's signal to any thread that does not block it.  Its C-level handler runs
# there; the main thread, waiting in epoll for an hour, is not interrupted (the same as a
# signal that comes just before the loop's epoll_wait): only the wakeup fd wakes it.
ELSEWHERE = """
import asyncio, signal, sys, threading
from supervisor.cli import run_coroutine

def relay() -> None:
    for _line in sys.stdin:
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

async def stubborn() -> int:
    threading.Thread(target=relay, daemon=True).start()
    print("ready", flush=True)
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            print("cancelled", flush=True)

sys.exit(run_coroutine(stubborn(), sys.argv[1]))
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_ctrl_c_taken_by_another_thread_wakes_the_waiting_loop(loop: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", ELSEWHERE, loop],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert next_line(proc.stdout) == "ready\n"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert next_line(proc.stdout) == "cancelled\n"  # the loop woke, the handler ran
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 130
        assert proc.stderr is not None and "interrupted" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


# -- 2. the capture console is bounded by bytes -------------------------------------------------
FLOOD = Path(__file__).resolve().parent.parent / "guests" / "flood.img"  # 64 KiB per NOTIFY
FLOOD_LINE = "f"


async def test_capture_console_holds_at_most_console_buffer_and_loses_nothing() -> None:
    async with Supervisor() as sup:
        config = GuestConfig(image=FLOOD, memory="1M", console_buffer=100_000)
        guest = await sup.launch(config)
        full = 100_000 - LineStream.LINE_COST  # what a waiting guest has filled at least
        await until(lambda: guest.console.held > full)  # 32,768 lines per NOTIFY: it waits
        stuck = guest.stats.notifies
        for _ in range(100):  # give it every chance to run on
            await asyncio.sleep(0.001)
            assert full < guest.console.held <= 100_000
        assert guest.stats.notifies == stuck
        lines = []
        async for line in guest.console:  # the reader catches up: the guest goes on
            lines.append(line)
            if len(lines) == 128 * 1024:
                break
        assert lines == [FLOOD_LINE] * len(lines)  # nothing lost, nothing cut
        assert guest.stats.notifies > stuck
        await guest.kill()


def test_console_buffer_is_a_checked_option() -> None:
    with pytest.raises(ConfigError, match="console_buffer"):
        GuestConfig.build(image=FLOOD, console_buffer=0)


# -- 4. code the Host writes runs as written ------------------------------------------------------
CALL_TWICE = r"""
main:
    LGUEST_INIT
    call func
    mov %eax, first
    HCALL 17, 0x100
    call {where}
    mov %eax, second
    HCALL 17, 0x200
1:  jmp 1b
.data
.align 4096
func:
    mov $1, %eax
    ret
.align 4096
first: .long 0
second: .long 0
"""
MOV_2_RET = b"\xb8\x02\x00\x00\x00\xc3"  # mov $2, %eax; ret


@pytest.mark.parametrize("how", ["write", "view", "high alias"])
async def test_code_the_launcher_writes_runs_as_written(dev: LguestDevice, how: str) -> None:
    where = "func + 0xC0000000" if how == "high alias" else "func"
    g = await boot(dev, CALL_TWICE.format(where=where))
    assert await notified(g) == 0x100
    func = g.guest.symbols["func"]
    if how == "view":
        g.memory.view[func : func + len(MOV_2_RET)] = MOV_2_RET
        g.memory.written(func, len(MOV_2_RET))
    else:
        g.memory.write(func, MOV_2_RET)
    assert await notified(g) == 0x200
    assert (g.u32("first"), g.u32("second")) == (1, 2)
    await g.file.close()


# -- 5. a snapshot is data: it opens no file or socket by itself ---------------------------------
ROOT = Path(__file__).resolve().parent.parent
TICKER = ROOT / "guests" / "ticker.img"


async def _crafted_snapshot(tmp_path: Path, victim: Path) -> Path:
    """A ticker with a block device, snapshotted, then edited to name ``victim`` and a
    gdb listener on every interface, and saved (with a valid checksum) again."""
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(16 * 512))
    async with Supervisor() as sup:
        config = GuestConfig(image=TICKER, memory="1M", cmdline="ticks=4 period_ms=20", block=disk)
        guest = await sup.launch(config)
        async for _line in guest.console:
            break
        snap = await guest.snapshot()
    assert snap.launcher is not None
    snap.launcher["config"]["block"] = str(victim)
    snap.launcher["config"]["gdb"] = "0.0.0.0:0"
    path = tmp_path / "crafted.snap"
    snap.save(path)
    return path


async def test_a_crafted_snapshot_opens_no_file_and_no_socket(tmp_path: Path) -> None:
    from supervisor.snapshot import Snapshot, SnapshotError

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1000)
    snap = Snapshot.load(await _crafted_snapshot(tmp_path, victim))
    async with Supervisor() as sup:
        with pytest.raises(SnapshotError, match="block device"):
            await sup.restore(snap)  # it had a block device: the caller must name the file
        mine = tmp_path / "mine"
        mine.write_bytes(bytes(16 * 512))
        guest = await sup.restore(snap, block=mine)
        assert guest.gdb is None  # no listener the caller did not ask for
        assert guest.config.block == mine
        assert (await guest.wait()).ok
    assert victim.read_bytes() == b"precious" * 1000


def test_run_restore_takes_block_and_gdb_from_the_caller_only(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    snap = asyncio.run(_crafted_snapshot(tmp_path, victim))
    proc = cli("run", "--restore", str(snap))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "supervisor: error:" in proc.stderr and "--block" in proc.stderr
    mine = tmp_path / "mine"
    mine.write_bytes(bytes(16 * 512))
    proc = cli("run", "--restore", str(snap), "--block", str(mine))
    assert proc.returncode == 0, proc.stderr
    assert "gdb" not in proc.stderr
    assert victim.read_bytes() == b"precious"


# -- the "Also" list: CLI, config and host -------------------------------------------------------
HELLO = ROOT / "guests" / "hello.img"


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("supervisor: error: ") and proc.stderr.count("\n") == 1, (
        proc.stderr
    )
    for word in words:
        assert word in proc.stderr, proc.stderr


def test_swarm_admits_at_most_max_alive_guests(monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor import cli as cli_module

    most = 0

    class Counting(Supervisor):
        async def launch(
            self,
            config: GuestConfig,
            *,
            devices: Sequence[Device] = (),
            snapshot: Snapshot | None = None,
        ) -> Guest:
            nonlocal most
            guest = await super().launch(config, devices=devices, snapshot=snapshot)
            most = max(most, sum(not g.done for g in self.guests))
            return guest

    monkeypatch.setattr(cli_module, "Supervisor", Counting)
    config = GuestConfig(image=HELLO, memory="128K", console="null")
    assert asyncio.run(cli_module.run_swarm(config, 12, max_alive=3)) == 0
    assert most == 3


def test_swarm_gdb_prints_its_port_and_checks_the_guest_index() -> None:
    one_line_error(cli("swarm", "-n", "3", str(HELLO), "--gdb", "127.0.0.1:0", "--gdb-guest", "99"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "supervisor",
            "swarm",
            "-n",
            "2",
            str(HELLO),
            "--gdb",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("supervisor: gdb server on 127.0.0.1:"), line
        assert int(line.rsplit(":", 1)[1]) > 0
    finally:
        proc.kill()
        proc.wait()


async def test_a_cancelled_launch_leaves_no_gdb_listener() -> None:
    import socket

    for delay in range(6):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        sup = Supervisor()
        config = GuestConfig(image=HELLO, memory="1M", gdb=f"127.0.0.1:{port}")
        launching = asyncio.create_task(sup.launch(config))
        for _ in range(delay):
            await asyncio.sleep(0)
        launching.cancel()
        await asyncio.wait({launching})
        if not launching.cancelled():
            await launching.result().kill()
        await sup.aclose()
        again = socket.socket()
        again.bind(("127.0.0.1", port))  # EADDRINUSE if a listener was left behind
        again.close()


REBOOTER = r"""
main:
    LGUEST_INIT
1:  incl counter
    cmpl $200000, counter
    jne 1b
    HCALL 2, msg, 2, 0      # restart
.data
counter: .long 0
msg: .asciz "again"
"""


async def test_an_image_gone_before_a_reboot_is_the_guests_death(tmp_path: Path) -> None:
    image = tmp_path / "reboot.img"
    image.write_bytes(assemble(REBOOTER).image)
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=image, memory="128K", console="null"))
        image.unlink()
        result = await guest.wait()
    assert result.died and result.reason.startswith("cannot reboot:"), result


def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_bytes(b'image = "\xff\xfe"\n')
    one_line_error(cli("run", "--config", str(config)), "UTF-8")
    one_line_error(
        cli("snapshot", str(HELLO), "-o", "/nonexistent/dir/x.snap", "--after", "0"),
        "/nonexistent/dir/x.snap",
    )
    one_line_error(cli("run", str(tmp_path)), "not a regular file")
    one_line_error(cli("run", "/dev/null"), "not a regular file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    one_line_error(cli("run", str(HELLO), "--block", str(fifo)), "not a regular file")
    proc = cli("run", str(HELLO), "--gdb", "1.2.3.4:80")
    one_line_error(proc, "1.2.3.4:80")
    assert "None" not in proc.stderr


async def _ticker_snapshot() -> Snapshot:
    async with Supervisor() as sup:
        config = GuestConfig(image=TICKER, memory="1M", cmdline="ticks=4 period_ms=20")
        guest = await sup.launch(config)
        async for _line in guest.console:
            break
        return await guest.snapshot()


# (IDT, TLS and the other CPU fields are checked when a GuestState is decoded: test_state.py)
@pytest.mark.parametrize("damage", ["memory size", "irq", "runs"])
def test_checksum_valid_but_bad_snapshots_are_one_line_errors(tmp_path: Path, damage: str) -> None:
    snap = asyncio.run(_ticker_snapshot())
    assert snap.launcher is not None
    if damage == "memory size":
        snap.memory_size += 4096
    elif damage == "irq":
        snap.launcher["irqs"] = [99]
    else:
        snap.runs = [(1 << 20, 1)]
    path = tmp_path / "bad.snap"
    snap.save(path)
    one_line_error(cli("run", "--restore", str(path)), str(path))


def test_run_stops_quietly_when_its_reader_goes_away() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", str(FLOOD)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"f\n"
    proc.stdout.close()  # run ... | head -1
    assert proc.wait(timeout=30) == 141
    assert proc.stderr.read() == b""


def test_ctrl_c_stops_run_whose_stdout_nobody_reads() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", str(FLOOD)],
        stdout=subprocess.PIPE,  # never read: the pipe fills and the guest waits
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.read(1) == b"f"  # it runs; the pipe is full moments later
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        proc.kill()
        proc.wait()


def test_options_are_honoured_or_refused(tmp_path: Path) -> None:
    spinner = str(ROOT / "guests" / "spinner.img")
    snap = tmp_path / "s.snap"
    proc = cli("snapshot", spinner, "-o", str(snap), "--after", "2", "--max-blocks", "1000")
    assert proc.returncode == 1 and "instruction budget" in proc.stderr, proc.stderr
    assert not snap.exists()
    one_line_error(cli("run", str(HELLO), "--restore", str(snap)), "IMAGE")
    one_line_error(cli("run", "--restore", str(snap), "--memory", "1M"), "--memory")
    one_line_error(cli("run", str(HELLO), "--readonly"), "--readonly")
    config = tmp_path / "c.toml"
    config.write_text(f'image = "{HELLO}"\nconsole = "bogus"\n')
    one_line_error(cli("run", "--config", str(config)), "console")
    config.write_text(f'image = "{HELLO}"\nconsole = "null"\n')
    proc = cli("run", "--config", str(config))
    assert (proc.returncode, proc.stdout) == (0, "")  # null: honoured, nothing printed


def test_guest_config_errors_are_one_line_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        GuestConfig(image=HELLO, memory="lots")
    assert "\n" not in str(info.value) and "memory" in str(info.value)


async def test_launch_after_aclose_is_refused() -> None:
    sup = Supervisor()
    await sup.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await sup.launch(GuestConfig(image=HELLO, memory="128K"))


def test_a_second_event_loop_on_one_device_is_refused() -> None:
    dev = LguestDevice()
    first = asyncio.new_event_loop()
    try:
        g = first.run_until_complete(boot(dev, SPIN))

        async def from_another_loop() -> None:
            with pytest.raises(RuntimeError, match="another event loop"):
                await g.file.read(4)

        asyncio.run(from_another_loop())
        first.run_until_complete(dev.aclose())
    finally:
        first.close()


def test_assembling_without_binutils_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="binutils"):
        assemble(f"main:\n LGUEST_INIT\n# unique {os.getpid()} {id(monkeypatch)}\n")
