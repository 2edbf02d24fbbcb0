"""Deterministic mode (supervisor.virtual): the same seed gives the same run.

Every check here is on bytes, counts and the virtual clock, never on the host's clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from supervisor import GuestConfig, LguestDevice, Supervisor, replay, sdk, testing, virtual
from supervisor.cli import main
from supervisor.host import Guest
from supervisor.state import MAX_CLOCK_NS

HERE = Path(__file__).parent
GUESTS = HERE.parent / "guests"
TICKER = GUESTS / "ticker.img"
C_TICKER = GUESTS / "c" / "ticker.elf"
ECHO = GUESTS / "c" / "echo.elf"
SMP = GUESTS / "c" / "smp.elf"
TCP_SERVER = GUESTS / "c" / "tcp_echo_server.elf"
TCP_CLIENT = GUESTS / "c" / "tcp_echo_client.elf"
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(scope="module")
def vclock(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/c/vclock.c built: prints what the guest's clocks read."""
    return sdk.build([HERE / "c" / "vclock.c"], tmp_path_factory.mktemp("vclock") / "vclock.elf")


async def transcript(seed: int, configs: list[GuestConfig], relay: bool = False) -> list[str]:
    """Run ``configs`` on one deterministic Supervisor; every console line as
    ``NAME: LINE`` in the order the host saw them (what ``swarm --console prefix``
    prints).  ``relay``: the last guest is an echo guest that gets every line the
    others print as its console input (and "quit" once they have all ended)."""
    lines: list[str] = []
    async with asyncio.timeout(300), Supervisor(deterministic=True, seed=seed) as sup:
        guests = [await sup.launch(config) for config in configs]
        echo = guests[-1] if relay else None

        async def pump(guest: Guest) -> None:
            async for line in guest.console:
                lines.append(f"{guest.name}: {line}")
                if echo is not None and guest is not echo:
                    echo.send(f"{guest.name} said {line}\n")

        pumps = [asyncio.create_task(pump(g)) for g in guests]
        others = [g for g in guests if g is not echo]
        for guest in others:
            assert not (await guest.wait()).died
        if echo is not None:
            echo.send("quit\n")
            assert not (await echo.wait()).died
        await asyncio.gather(*pumps)
    return lines


def scenario() -> list[GuestConfig]:
    """Guests that print at virtual times they compute: tickers (assembly and C, each
    sleeping), a guest of two CPUs, and an echo guest the others' lines are relayed to."""
    configs = [
        GuestConfig.build(image=TICKER, name=f"asm{i}", cmdline=f"ticks=3 period_ms={1 + i}")
        for i in range(3)
    ]
    configs += [
        GuestConfig.build(image=C_TICKER, name=f"c{i}", cmdline="ticks=3 period_ms=2")
        for i in range(3)
    ]
    configs.append(GuestConfig.build(image=SMP, name="smp", cpus=2, cmdline="loops=20000"))
    configs.append(GuestConfig.build(image=ECHO, name="echo"))
    return configs


def run_on(loop: str, seed: int) -> list[str]:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(transcript(seed, scenario(), relay=True))


def test_the_same_seed_gives_the_same_interleaving_on_both_loops() -> None:
    """Byte-identical transcripts, relayed console input included, twice on each loop."""
    runs = [run_on(loop, 7) for loop in ("asyncio", "uvloop", "asyncio", "uvloop")]
    assert len(runs[0]) > 30
    assert any(line.startswith("echo: asm0 said tick") for line in runs[0])
    for other in runs[1:]:
        assert other == runs[0]


def test_another_seed_gives_another_interleaving() -> None:
    """Seeds 1 and 2 on four identical C tickers.  All four boot at once, so the seed
    alone orders their boots, hence when each arms its timer and prints.  Each run is
    deterministic (the test above), so this comparison has one outcome for ever: seed
    1 boots t3 first, seed 2 boots t0 first."""
    configs = [
        GuestConfig.build(image=C_TICKER, name=f"t{i}", cmdline="ticks=2 period_ms=1000")
        for i in range(4)
    ]
    with asyncio.Runner() as runner:
        one = runner.run(transcript(1, configs))
        two = runner.run(transcript(2, configs))
    assert sorted(one) == sorted(two)  # the same lines...
    assert one != two  # ...in another order


async def test_sleeping_guests_cost_no_wall_time_and_see_virtual_time() -> None:
    """20 guests ticking 3 times, 1 s apart, all asleep between ticks: the clock jumps
    from timer to timer, and ends just past the 3 s they slept."""
    async with asyncio.timeout(300), Supervisor(deterministic=True, seed=3) as sup:
        guests = [
            await sup.launch(
                GuestConfig.build(image=TICKER, name=f"t{i}", cmdline="ticks=3 period_ms=1000")
            )
            for i in range(20)
        ]
        for guest in guests:
            assert (await guest.wait()).exit_status == 0
        sim = sup.device.virtual
        assert sim is not None
        assert 3_000_000_000 <= sim.now_ns < 3_100_000_000
        assert sim.jumps >= 3
        assert sim.jumped_ns > 2_900_000_000  # nearly all of it asleep
        assert sup.seed == 3


async def test_a_guest_reads_virtual_clocks(vclock: Path) -> None:
    """CLOCK_REALTIME starts at the virtual epoch; CLOCK_MONOTONIC (the TSC, hooked)
    advances by the sleeps and a little work; AT_RANDOM (from both) is the same on
    every run, as is every value printed."""

    async def once() -> list[str]:
        return await transcript(11, [GuestConfig.build(image=vclock, name="v", cmdline="2")])

    first = await once()
    assert first[0] == f"v: real {virtual.EPOCH_NS // 1_000_000_000}"
    monos = [int(line.split()[-1]) for line in first if line.startswith("v: mono")]
    assert len(monos) == 3
    assert monos[0] < 100_000_000  # a boot's worth of blocks, not the host's uptime
    for before, after in itertools.pairwise(monos):
        assert 1_000_000_000 <= after - before < 1_010_000_000
    assert await once() == first


async def test_a_restored_guests_clocks_go_on_from_its_snapshot(vclock: Path) -> None:
    """A guest snapshotted one virtual second into its run, in the middle of a second's
    sleep, and restored into a new deterministic device: its monotonic clock goes on
    from where it was (never back to the new device's 0), the rest of its sleep
    included, the same on every restore.  Restored into a device whose clock is
    further on, its clocks jump forward with it."""
    async with asyncio.timeout(300), Supervisor(deterministic=True, seed=1) as sup:
        guest = await sup.launch(GuestConfig.build(image=vclock, name="v", cmdline="3"))
        before = [await guest.console.readline() for _ in range(3)]
        snap = await guest.snapshot()
        await guest.kill()
    last = int(before[-1].split()[-1])
    assert before[0].startswith("real") and last >= 1_000_000_000
    assert snap.state.clock_ns is not None and snap.state.clock_ns >= last

    async def restored(head_start: str | None) -> list[int]:
        async with asyncio.timeout(300), Supervisor(deterministic=True, seed=1) as sup:
            if head_start is not None:  # the device's clock runs on first
                ticker = GuestConfig.build(image=TICKER, cmdline=head_start)
                assert (await (await sup.launch(ticker)).wait()).exit_status == 0
            guest = await sup.restore(snap)
            lines = [line async for line in guest.console]
            assert (await guest.wait()).exit_status == 0
        return [int(line.split()[-1]) for line in lines if line.startswith("mono")]

    after = await restored(None)
    assert len(after) == 2
    assert last + 1_000_000_000 <= after[0] < last + 1_010_000_000  # the sleep's rest
    assert after[1] - after[0] >= 1_000_000_000
    assert await restored(None) == after
    later = await restored("ticks=5 period_ms=1000")  # the device is 5 virtual s on
    assert later[0] >= 5_000_000_000 + 1_000_000_000 > after[0]


async def test_a_guest_restored_at_the_top_of_the_clock_can_be_snapshotted() -> None:
    """A state may carry any clock up to ``MAX_CLOCK_NS``; the guest restored from it runs
    on, past it, and its next snapshot still succeeds (its clock held at the top)."""
    async with asyncio.timeout(300), Supervisor(deterministic=True, seed=1) as sup:
        guest = await sup.launch(GuestConfig.build(image=C_TICKER, name="t"))
        await guest.console.readline()
        snap = await guest.snapshot()
        await guest.kill()
        top = dataclasses.replace(snap.state, clock_ns=MAX_CLOCK_NS)
        copy = await sup.restore(dataclasses.replace(snap, state=top), name="c")
        await copy.console.readline()  # it ran on: its clock is past the top now
        again = await copy.snapshot()
        await copy.kill()
    assert again.state.clock_ns == MAX_CLOCK_NS


async def test_quanta_end_at_timers_and_count_blocks() -> None:
    """A 1 ms ticker: each tick is due at an exact virtual time, so the clock at the end
    is the same on every run, to the nanosecond."""

    async def end() -> int:
        async with Supervisor(deterministic=True, seed=5) as sup:
            g = await sup.launch(GuestConfig.build(image=TICKER, cmdline="ticks=5 period_ms=1"))
            assert (await g.wait()).exit_status == 0
            sim = sup.device.virtual
            assert sim is not None
            assert sim.quanta > 5
            return sim.now_ns

    first = await end()
    assert 5_000_000 <= first < 6_000_000
    assert await end() == first


def test_derived_randomness_and_the_virtual_clock_for_other_parts() -> None:
    sim = virtual.Simulation(9)
    net = sim.random("net")
    assert [net.random() for _ in range(3)] == [
        x for x in (lambda r: [r.random() for _ in range(3)])(virtual.Simulation(9).random("net"))
    ]
    assert sim.random("net").random() != sim.random("disk").random()
    assert sim.time() == 0.0


@pytest.mark.parametrize("seed", [-1, 1 << 64, True, 1.5])
def test_bad_seeds_are_refused(seed: object) -> None:
    with pytest.raises(ValueError, match="seed"):
        virtual.Simulation(seed)  # type: ignore[arg-type]


async def test_a_seed_needs_the_switch() -> None:
    with pytest.raises(ValueError, match="deterministic"):
        LguestDevice(seed=3)
    plain = LguestDevice()
    assert plain.virtual is None and plain.seed is None
    await plain.aclose()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--seed", "3", str(TICKER)], "--seed needs --deterministic"),
        (["run", "--deterministic", "--seed", "-4", str(TICKER)], "--seed"),
        (["swarm", "--deterministic", "--max-alive", "2", str(TICKER)], "--max-alive"),
        (["swarm", "--deterministic", "--cluster", "local", str(TICKER)], "--cluster"),
    ],
)
def test_bad_deterministic_options_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("supervisor: error:") and message in err


async def test_a_guest_nobody_reads_does_not_stop_the_others() -> None:
    """On a bare device: a guest initialized and never read counts as asleep, so the
    guest being read runs to its end; the clock then says exactly how many blocks it
    ran, the same on every run."""

    async def once() -> int:
        async with LguestDevice(deterministic=True, seed=2) as dev:
            g = await testing.boot(dev, testing.COUNT_TO.format(target=200_000))
            idle = await testing.boot(dev, testing.SPIN)
            assert await asyncio.wait_for(testing.run_to_end(g), 120) == "counted"
            assert g.u32("regcount") == 200_000
            assert idle.u32("counter") == 0  # never read: never ran
            sim = dev.virtual
            assert sim is not None
            return sim.now_ns

    first = await once()
    assert first >= 200_000 * virtual.NS_PER_BLOCK  # at least a block per iteration
    assert await once() == first


async def test_the_network_draws_from_the_seed_and_runs_on_virtual_time() -> None:
    """A deterministic Supervisor's default network: its faults' randomness is derived
    from the seed (the same sequence for the same seed, another for another) and its
    delays are timed by the virtual clock."""

    async def draws(seed: int) -> list[float]:
        async with Supervisor(deterministic=True, seed=seed) as sup:
            assert sup.net.clock is sup.device.virtual
            return [sup.net.random.random() for _ in range(4)]

    assert await draws(5) == await draws(5)
    assert await draws(5) != await draws(6)
    async with Supervisor() as plain:
        assert plain.net.clock is not None and plain.net.clock is not plain.device.virtual


async def test_guests_talking_over_the_network_give_the_same_transcript() -> None:
    """An echo server and four clients on the guests' network, launched once it listens
    (at an idle point: launched with it, a client may connect first and be refused):
    the order in which the clients are served, and so print their echoes, is the same
    on every run."""

    async def once() -> list[str]:
        lines: list[str] = []
        async with asyncio.timeout(300), Supervisor(deterministic=True, seed=4) as sup:
            srv = await sup.launch(
                GuestConfig.build(image=TCP_SERVER, name="srv", net=True, cmdline="7 4")
            )
            await srv.expect("listening on 7\n")
            sim = sup.device.virtual
            assert sim is not None
            await sim.idle()
            clients = [
                await sup.launch(
                    GuestConfig.build(
                        image=TCP_CLIENT, name=f"c{i}", net=True, cmdline=f"srv 7 hello {i}"
                    )
                )
                for i in range(4)
            ]

            async def pump(guest: Guest) -> None:
                async for line in guest.console:
                    lines.append(f"{guest.name}: {line}")

            pumps = [asyncio.create_task(pump(g)) for g in clients]
            for guest in [srv, *clients]:
                assert (await guest.wait()).exit_status == 0
            await asyncio.gather(*pumps)
        return lines

    first = await once()
    assert sorted(first) == [f"c{i}: hello {i}" for i in range(4)]
    assert await once() == first


async def test_a_failing_schedule_kills_its_guests_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: virtual.Simulation) -> None:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(virtual.Simulation, "_give_turn", broken)
    async with asyncio.timeout(120), Supervisor(deterministic=True, seed=1) as sup:
        guest = await sup.launch(GuestConfig.build(image=TICKER, cmdline="ticks=1"))
        end = await guest.wait()
    assert end.died
    assert "deterministic schedule: RuntimeError: broken on purpose" in end.reason


def test_a_deterministic_swarm_prints_the_same_lines_and_virtual_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``swarm --console prefix --deterministic --seed N`` on each event loop: the same
    guest lines in the same order, the same virtual time, and the blocks column (they
    are counted); another seed interleaves the same lines otherwise."""

    def swarm(seed: int, loop: str) -> tuple[list[str], list[str]]:
        argv = ["swarm", "-n", "4", "--deterministic", "--seed", str(seed), "--console", "prefix",
                "--loop", loop, "--cmdline", "ticks=3 period_ms=7", str(TICKER)]  # fmt: skip
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert f"supervisor: deterministic run, seed {seed}" in captured.err
        lines = captured.out.splitlines()
        guest_lines = [line for line in lines if line.startswith("ticker-")]
        virtual_lines = [line for line in lines if line.startswith("virtual time:")]
        assert len(guest_lines) == 16 and len(virtual_lines) == 1
        assert "blocks" in captured.out
        return guest_lines, virtual_lines

    first = swarm(5, "asyncio")
    assert swarm(5, "uvloop") == first
    other = swarm(6, "asyncio")[0]
    assert sorted(other) == sorted(first[0]) and other != first[0]


@pytest.fixture(scope="module")
def stamp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/c/stamp.c built: prints each input line with the time it was read."""
    return sdk.build([HERE / "c" / "stamp.c"], tmp_path_factory.mktemp("stamp") / "stamp.elf")


def cli(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor", *args],
        stdin=subprocess.PIPE if stdin is None else stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_replay_feeds_the_recorded_input_at_the_same_points(stamp: Path, tmp_path: Path) -> None:
    """Input typed in two pieces, the second only once the guest answered the first:
    the replay (stdin closed) prints the same lines with the same virtual times, and
    the recording names no path."""
    record = tmp_path / "run.replay"
    recording = cli("run", "--record", str(record), str(stamp), stdin=None)
    assert recording.stdin is not None and recording.stdout is not None
    recording.stdin.write("one\n")
    recording.stdin.flush()
    first = recording.stdout.readline()
    assert first.startswith("one at ")
    recording.stdin.write("two\n")
    recording.stdin.close()
    rest = recording.stdout.read()
    assert recording.wait(timeout=120) == 0, recording.stderr

    recorded = first + rest
    assert recorded.splitlines()[1].startswith("two at ") and recorded.endswith("eof\n")
    text = record.read_text()
    assert str(tmp_path) not in text and "stamp" not in text
    steps = [entry["step"] for entry in json.loads(text)["inputs"]]
    assert len(steps) == 3 and steps[0] < steps[1] <= steps[2]  # one, two, the end
    replaying = cli("run", "--replay", str(record), str(stamp))
    replayed, err = replaying.communicate(timeout=120)
    assert replaying.returncode == 0, err
    assert replayed == recorded


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not a recording"),
        ('{"format": "lguest-replay", "version": 1, "seed": 1, "image_sha256": "%s", '
         '"config_sha256": "%s", "files_sha256": "%s", "inputs": [],'
         ' "image": "/etc/passwd"}', "not a recording"),
        ('{"format": "lguest-replay", "version": 1, "seed": 1, "image_sha256": "%s", '
         '"config_sha256": "%s", "files_sha256": "%s", "inputs": [{"step": 1, "data": "@@"}]}',
         "not base64"),
        ('{"format": "lguest-replay", "version": 1, "seed": 1, "image_sha256": "%s", '
         '"config_sha256": "%s", "files_sha256": "%s", "inputs": [{"step": 5}, {"step": 2}]}',
         "out of order"),
        ('{"format": "lguest-replay", "version": 1, "seed": 1, "image_sha256": "%s", '
         '"config_sha256": "%s", "files_sha256": "%s", "inputs": []}', "another image"),
        # Each input is bytes or an end: both, neither or empty bytes would leave the
        # replay to guess which was recorded.
        ('{"format": "lguest-replay", "version": 1, "seed": 1, "image_sha256": "%s", '
         '"config_sha256": "%s", "files_sha256": "%s", '
         '"inputs": [{"step": 1, "data": "eA==", "eof": true}]}', "not bytes or an end"),
        ('{"format": "lguest-replay", "version": 1, "seed": 1, "image_sha256": "%s", '
         '"config_sha256": "%s", "files_sha256": "%s", "inputs": [{"step": 1}]}',
         "not bytes or an end"),
        ('{"format": "lguest-replay", "version": 1, "seed": 1, "image_sha256": "%s", '
         '"config_sha256": "%s", "files_sha256": "%s", "inputs": [{"step": 1, "data": ""}]}',
         "not bytes or an end"),
        # Numbers are JSON numbers: a string or a boolean is not one.
        ('{"format": "lguest-replay", "version": 1, "seed": "1", "image_sha256": "%s", '
         '"config_sha256": "%s", "files_sha256": "%s", "inputs": []}', "seed"),
        ('{"format": "lguest-replay", "version": 1, "seed": 1, "image_sha256": "%s", '
         '"config_sha256": "%s", "files_sha256": "%s", "inputs": [{"step": true, "eof": true}]}',
         "step"),
    ],
)  # fmt: skip
def test_a_bad_or_foreign_recording_is_one_line_and_exit_2_before_anything_runs(
    content: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.replay"
    image, rest = replay.digests(GuestConfig.build(image=TICKER))
    if message == "another image":
        image = "0" * 64
    files = replay.files_digest(GuestConfig.build(image=TICKER))
    content = content.replace('"version": 1,', f'"version": 1, "emulator": "{replay.emulator()}",')
    path.write_text(content.replace("%s", image, 1).replace("%s", rest, 1).replace("%s", files, 1))
    assert main(["run", "--replay", str(path), str(TICKER)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran
    assert captured.err.count("\n") == 1 and captured.err.startswith("supervisor: error:")
    assert message in captured.err


def test_replay_options_that_cannot_go_together_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.replay"
    for argv in (
        ["run", "--replay", str(path), "--seed", "3", str(TICKER)],
        ["run", "--record", str(path), "--replay", str(path), str(TICKER)],
        ["run", "--record", str(tmp_path / "no" / "such" / "dir"), str(TICKER)],
        ["run", "--replay", str(path), "--net", "--publish", "8080:80", str(TICKER)],
        ["run", "--record", str(path), "--publish", "8080:80", str(TICKER)],  # no --net
        ["run", "--record", str(path), "--net", "--publish", "80", str(TICKER)],
        ["run", "--record", str(path), "--net", "--allow-outbound", "10.1.2.3:80", str(TICKER)],
        [
            "swarm",
            "-n",
            "2",
            "--record",
            str(path),
            "--net",
            "--allow-outbound",
            "10.1.2.3:80",
            str(TICKER),
        ],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("supervisor: error:"), err


@pytest.fixture(scope="module")
def netstamp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/c/netstamp.c built: a file's line, then one connection's pieces, timed."""
    return sdk.build([HERE / "c" / "netstamp.c"], tmp_path_factory.mktemp("ns") / "netstamp.elf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_replay_feeds_recorded_connections_and_checks_the_files(
    netstamp: Path, tmp_path: Path
) -> None:
    """A host connection to a published port, in two pieces: the replay (no port,
    the files copied elsewhere) prints the same lines at the same virtual times; the
    recording names no path nor address; changed files refuse the replay (exit 2)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "msg").write_text("hello file\n")
    record = tmp_path / "net.replay"
    port = free_port()
    options = ["--net", "--cmdline", "80 /data/msg", str(netstamp)]
    recording = cli("run", "--record", str(record), "--ro-dir", f"{data}::/data",
                    "--publish", f"127.0.0.1:{port}:80", *options)  # fmt: skip
    assert recording.stdout is not None
    head = [recording.stdout.readline() for _ in range(2)]
    assert head[0].startswith("file: hello file at ") and head[1].startswith("listening at ")
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        answers = conn.makefile("rb")
        for word in (b"one", b"two"):
            conn.sendall(word + b"\n")
            assert answers.readline() == word + b"\n"  # the guest's echo reached the host
        conn.shutdown(socket.SHUT_WR)
        assert answers.read() == b""
        answers.close()
    rest = recording.stdout.read()
    assert recording.wait(timeout=120) == 0, recording.stderr
    recorded = "".join(head) + rest
    assert [line.split(" at ")[0] for line in recorded.splitlines()] == [
        "file: hello file", "listening", "connected", "got one", "got two", "eof"
    ]  # fmt: skip
    text = record.read_text()
    assert str(tmp_path) not in text and "127.0.0.1" not in text and str(port) not in text
    inputs = json.loads(text)["inputs"]
    assert [(e.get("conn"), e.get("port"), e["eof"]) for e in inputs if "conn" in e] == [
        (0, 80, False), (0, None, False), (0, None, False), (0, None, True)
    ]  # fmt: skip

    moved = tmp_path / "moved"
    data.rename(moved)  # the same files elsewhere: the same run
    replaying = cli("run", "--replay", str(record), "--ro-dir", f"{moved}::/data", *options)
    replayed, err = replaying.communicate(timeout=120)
    assert replaying.returncode == 0, err
    assert replayed == recorded

    (moved / "msg").write_text("hullo file\n")  # the same size, other bytes
    changed = cli("run", "--replay", str(record), "--ro-dir", f"{moved}::/data", *options)
    out, err = changed.communicate(timeout=120)
    assert changed.returncode == 2 and out == ""
    assert err.count("\n") == 1 and "files under --dir are not the ones recorded" in err


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ('[{"step": 1, "conn": 0, "data": "eA=="}]', "connection 0 never opened"),
        ('[{"step": 1, "conn": 0, "port": 80}, {"step": 2, "conn": 0, "port": 81}]',
         "a bad connection"),
        ('[{"step": 1, "port": 80}]', "a bad connection"),
        ('[{"step": 1, "conn": 0, "port": 0}]', "not a recording"),
        ('[{"step": 1, "conn": 0, "port": 80, "data": "eA=="}]', "a bad connection"),
        ('[{"step": 1, "conn": 0, "port": 80}]', "needs --net"),
    ],
)  # fmt: skip
def test_bad_recorded_connections_are_one_line_and_exit_2(
    inputs: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.replay"
    config = GuestConfig.build(image=TICKER)
    image, rest = replay.digests(config)
    fields = {
        "format": "lguest-replay", "version": 1, "seed": 1, "image_sha256": image,
        "config_sha256": rest, "files_sha256": replay.files_digest(config),
        "emulator": replay.emulator(),
    }  # fmt: skip
    path.write_text(json.dumps(fields)[:-1] + f', "inputs": {inputs}}}')
    assert main(["run", "--replay", str(path), str(TICKER)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("supervisor: error:")
    assert message in captured.err


def test_a_replay_starts_from_a_snapshot(stamp: Path, tmp_path: Path) -> None:
    """``run --restore SNAP --record`` then ``--restore SNAP --replay``: the same lines
    at the same virtual times; another snapshot refuses the recording (exit 2)."""

    async def take(path: Path, line: str) -> None:
        async with Supervisor() as sup:
            guest = await sup.launch(GuestConfig.build(image=stamp))
            guest.send(f"{line}\n")
            first = await anext(aiter(guest.console))
            assert first.startswith(f"{line} at ")
            (await guest.snapshot()).save(path)

    snap, other = tmp_path / "snap", tmp_path / "other"
    asyncio.run(take(snap, "before"))
    asyncio.run(take(other, "elsewhere"))
    record = tmp_path / "r.replay"
    recording = cli("run", "--restore", str(snap), "--record", str(record), stdin=None)
    recorded, err = recording.communicate("after\n", timeout=120)
    assert recording.returncode == 0, err
    assert [line.split(" at ")[0] for line in recorded.splitlines()] == ["after", "eof"]
    assert str(tmp_path) not in record.read_text()
    replaying = cli("run", "--restore", str(snap), "--replay", str(record))
    replayed, err = replaying.communicate(timeout=120)
    assert replaying.returncode == 0, err
    assert replayed == recorded
    foreign = cli("run", "--restore", str(other), "--replay", str(record))
    out, err = foreign.communicate(timeout=120)
    assert foreign.returncode == 2 and out == ""
    assert err.count("\n") == 1 and "recorded with another snapshot" in err


def test_a_swarm_replays_its_recording(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``swarm --record`` keeps the seed it drew; ``--replay`` prints the same lines in
    the same order; another -n, or a run's recording, is one line and exit 2."""
    record = tmp_path / "swarm.replay"
    common = ["-n", "3", "--console", "prefix", "--loop", "asyncio",
              "--cmdline", "ticks=2 period_ms=3", str(TICKER)]  # fmt: skip
    assert main(["swarm", "--record", str(record), *common]) == 0
    first = capsys.readouterr()
    seed = json.loads(record.read_text())["seed"]
    assert f"deterministic run, seed {seed}" in first.err
    lines = [line for line in first.out.splitlines() if line.startswith("ticker-")]
    assert len(lines) == 9
    assert main(["swarm", "--replay", str(record), *common]) == 0
    again = capsys.readouterr()
    assert [line for line in again.out.splitlines() if line.startswith("ticker-")] == lines
    assert f"deterministic run, seed {seed}" in again.err
    other = ["-n", "4", *common[2:]]
    for argv, message in (
        (["swarm", "--replay", str(record), *other], "recorded with 3 guests, not 4"),
        (["run", "--replay", str(record), "--cmdline", "ticks=2 period_ms=3", str(TICKER)],
         "recorded with 3 guests, not 1"),
        (["swarm", "--replay", str(record), "--seed", "1", *common], "not with --seed"),
    ):  # fmt: skip
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert message in captured.err


def test_a_recording_made_where_the_clock_counts_otherwise_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The native slice meter counts blocks, the ``count=`` fallback instructions: the
    same seed runs differently on each, so a recording names what counted it, and a
    replay where that differs is one line and exit 2."""
    from supervisor import _slicing

    here = virtual.counting()
    assert here.endswith("counting blocks" if _slicing.NATIVE else "counting instructions")
    elsewhere = subprocess.run(
        [sys.executable, "-c", "from supervisor import virtual; print(virtual.counting())"],
        env={**os.environ, _slicing.ENV: "count" if _slicing.NATIVE else "exit"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    if _slicing.NATIVE:
        assert elsewhere.endswith("counting instructions")
    else:  # (no native meter to compare with: another Unicorn release, then)
        elsewhere = "unicorn 0.0.0 counting blocks"
    record = tmp_path / "swarm.replay"
    common = ["-n", "1", "--cmdline", "ticks=1 period_ms=1", str(TICKER)]
    assert main(["swarm", "--record", str(record), *common]) == 0
    capsys.readouterr()
    recording = json.loads(record.read_text())
    assert recording["emulator"] == here
    recording["emulator"] = elsewhere
    record.write_text(json.dumps(recording))
    assert main(["swarm", "--replay", str(record), *common]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert f"recorded on {elsewhere}, not on {here}" in captured.err
