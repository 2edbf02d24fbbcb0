"""supervisor.cluster against a real local Ray (2 CPUs): launch, console, wait, kill, placement,
migration (exact, with a disk), checkpoints and the loss of a worker."""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from ray.exceptions import RayActorError  # noqa: E402

from supervisor import GuestConfig, Supervisor  # noqa: E402
from supervisor.cli import main  # noqa: E402
from supervisor.cluster import (  # noqa: E402
    Capture,
    Cluster,
    ClusterError,
    GuestEndedError,
    RemoteGuest,
    WorkerActor,
)
from supervisor.launcher.loader import FLAT_TRAILER, ImageError  # noqa: E402
from supervisor.pytest_plugin import BuildGuest  # noqa: E402
from supervisor.snapshot import SnapshotError  # noqa: E402
from supervisor.testing import until  # noqa: E402

GUESTS = Path(__file__).resolve().parent.parent / "guests"
LIMIT = 300  # seconds: a bound for failing (a hang), never a wait for success
SECTOR = 512

pytestmark = [pytest.mark.one_loop, pytest.mark.usefixtures("local_ray")]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray for the module; shut down (raylet and all) at its end."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def counter(lines: int, spin: int, *, gate: bool = False, **fields: object) -> GuestConfig:
    """The counter guest; ``gate``: it waits for a byte of input before each line and
    before the count, so that it cannot end before the test lets it."""
    cmdline = f"lines={lines} spin={spin} gate={int(gate)}"
    return GuestConfig(image=GUESTS / "counter.img", memory="1M", cmdline=cmdline, **fields)


def counted(lines: int, spin: int) -> list[str]:
    """The counter guest's whole console output."""
    return [*map(str, range(1, lines + 1)), f"count {lines * spin} {lines * spin}"]


async def collect(guest: RemoteGuest) -> list[str]:
    return [line async for line in guest.console]


async def test_launch_console_wait_kill_placement_refusals_and_a_snapshot(
    tmp_path: Path,
) -> None:
    """One cluster (its workers' start is most of a cluster test's cost) for what
    leaves it as it found it: every guest has ended before the next part starts."""
    async with asyncio.timeout(LIMIT), Cluster(workers=2) as cl:
        await launch_console_wait_kill_and_placement(cl)
        await bad_input_is_refused_before_anything_runs(cl, tmp_path)
        await a_remote_snapshot_restores_on_a_local_supervisor(cl)


async def launch_console_wait_kill_and_placement(cl: Cluster) -> None:
    assert [w.name for w in cl.workers] == ["w0", "w1"]
    assert len({w.pid for w in cl.workers}) == 2  # two processes, two event loops
    spinner = await cl.launch(GuestConfig(image=GUESTS / "spinner.img", memory="1M"))
    echo = await cl.launch(GuestConfig(image=GUESTS / "echo.img", memory="1M"))
    assert spinner.worker is not echo.worker  # the least loaded worker
    assert sorted(w.guests for w in cl.workers) == [1, 1]

    echo.send("hello\n")
    echo.send("quit\n")
    assert await collect(echo) == ["hello", "quit", "bye"]
    assert (await echo.wait()).ok
    assert echo.stats.notifies > 0
    assert echo.worker.guests == 0

    hello = await cl.launch(GuestConfig(image=GUESTS / "hello.img", memory="1M"))
    assert hello.worker is echo.worker  # the other one still runs the spinner
    assert await collect(hello) == ["Hello from an lguest guest!"]

    assert not spinner.done
    # (blocks are counted only on the block-hook path: progress is run time)
    assert (await spinner.fetch_stats()).run_time > 0
    result = await spinner.kill()
    assert result.died and result.reason == "killed"
    assert await spinner.wait() == result
    assert spinner.worker.guests == 0


async def bad_input_is_refused_before_anything_runs(cl: Cluster, tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\x7fELF not really")
    with pytest.raises(ImageError, match=r"junk\.img"):
        await cl.launch(GuestConfig(image=junk, memory="1M"))
    big = tmp_path / "big.img"
    big.write_bytes(b"\x90" * (2 << 20) + FLAT_TRAILER)
    with pytest.raises(ImageError):  # does not fit: found on the worker
        await cl.launch(GuestConfig(image=big, memory="1M"))
    named = GuestConfig(image=GUESTS / "echo.img", memory="1M", net=True, name="h")
    waiting = await cl.launch(named)  # echo waits for input
    with pytest.raises(ClusterError, match="'h' is already on the cluster's network"):
        await cl.launch(named)
    assert waiting.worker.guests == 1 and sum(w.guests for w in cl.workers) == 1
    await waiting.kill()
    done = await cl.launch(GuestConfig(image=GUESTS / "hello.img", memory="1M"))
    assert (await done.wait()).ok
    with pytest.raises(GuestEndedError, match="hello has ended"):
        await cl.migrate(done)
    with pytest.raises(SnapshotError, match="ended"):
        await done.snapshot()


async def a_remote_snapshot_restores_on_a_local_supervisor(cl: Cluster) -> None:
    lines, spin = 8, 200_000
    guest = await cl.launch(counter(lines, spin))
    assert await anext(guest.console) == "1"
    snap = await guest.snapshot()  # it runs on
    assert await collect(guest) == counted(lines, spin)[1:]
    async with Supervisor() as sup:
        copy = await sup.restore(snap)
        rest = [line async for line in copy.console]
        assert rest[-1] == counted(lines, spin)[-1]  # the counts: exact from mid-run
        assert (await copy.wait()).ok


async def test_full_workers_are_skipped_and_all_full_cannot_start() -> None:
    async with asyncio.timeout(LIMIT), Cluster(workers=2, max_guests=1) as cl:
        spin = GuestConfig(image=GUESTS / "spinner.img", memory="1M")
        first, second = await cl.launch(spin), await cl.launch(spin)
        assert {first.worker.name, second.worker.name} == {"w0", "w1"}
        third = await cl.launch(spin)
        result = await third.wait()
        assert result.died and result.reason == "cannot start: Cannot allocate memory"
        with pytest.raises(ClusterError, match="room"):
            await cl.migrate(first)
        await first.kill()
        fourth = await cl.launch(spin)  # room again where the first one was
        assert fourth.worker is first.worker
        for guest in (second, fourth):
            await guest.kill()


async def test_migrations_are_exact_with_the_console_input_a_disk_and_every_cpu(
    tmp_path: Path, build_guest: BuildGuest
) -> None:
    """Migrations on one cluster (its workers' start is most of a cluster test's cost),
    one guest after another."""
    fsprobe = build_guest((Path(__file__).parent / "c" / "fsprobe.c").read_text(), flags=("-O2",))
    async with asyncio.timeout(LIMIT), Cluster(workers=2) as cl:
        await migration_is_exact_and_the_console_goes_on(cl)
        await migration_mid_line_and_with_input_queued(cl)
        await a_disk_moves_with_its_guest_and_is_written_back_once(cl, tmp_path)
        await a_guest_with_several_cpus_migrates_with_every_cpu(cl, tmp_path)
        await a_migrated_guest_keeps_its_open_files(cl, fsprobe, tmp_path)


async def migration_is_exact_and_the_console_goes_on(cl: Cluster) -> None:
    """(On a cluster that has placed no guest yet.)  A move after each line but the
    last, each made once the guest may compute the next line: the gate before the
    count keeps it from ending before the moves, however slowly the driver goes."""
    lines, spin = 16, 100_000
    guest = await cl.launch(counter(lines, spin, gate=True))
    guest.send("1")
    seen: list[str] = []
    async for line in guest.console:
        seen.append(line)
        if len(seen) <= lines:
            guest.send("1")  # the next line (or, after the last, the count)
        if len(seen) < lines:
            moved_to = await cl.migrate(guest)
            assert guest.worker is moved_to
    assert seen == counted(lines, spin)  # nothing lost, nothing repeated
    assert (await guest.wait()).ok
    assert guest.moves == lines - 1
    assert sum(w.placed for w in cl.workers) == 1 + guest.moves


async def test_a_move_whose_destination_died_leaves_the_guest_running_where_it_was() -> None:
    """Destinations that died before the driver knew (killed, still marked alive): each
    move fails with ClusterError, the guest runs on at the source from where it was held,
    input sent around the move arrives once, and the dead worker is marked dead."""
    lines, spin = 6, 300_000
    async with asyncio.timeout(LIMIT), Cluster(workers=3) as cl:
        source, dead, dead_too = cl.workers
        guest = await cl.launch(counter(lines, spin, gate=True), worker=source)
        guest.send("1")  # one line: it cannot end before the moves
        echo = await cl.launch(GuestConfig(image=GUESTS / "echo.img", memory="1M"), worker=source)
        echoed = echo.console
        echo.send("before\n")
        assert await anext(echoed) == "before"
        assert await anext(guest.console) == "1"
        for worker in (dead, dead_too):
            ray.kill(worker.actor, no_restart=True)
            with contextlib.suppress(RayActorError):
                while True:  # until calls to it fail
                    await worker.actor.ping.remote()
        assert dead.alive and dead_too.alive  # the driver has not noticed
        guest.send("1")  # the second line: held while it computes it, or waits for the third
        with pytest.raises(ClusterError, match="worker w1 died during the move") as failed:
            await cl.migrate(guest, dead)
        assert "runs on at w0" in str(failed.value)
        assert not dead.alive
        assert guest.worker is source and guest.moves == 0
        assert (source.guests, dead.guests, source.placed, dead.placed) == (2, 0, 2, 0)
        guest.send("1" * (lines - 1))  # the other lines and the count
        assert await collect(guest) == counted(lines, spin)[1:]  # on from where it was held
        assert (await guest.wait()).ok

        move = asyncio.ensure_future(cl.migrate(echo, dead_too))
        echo.send("around\n")  # before or during the move: delivered once either way
        with pytest.raises(ClusterError, match="worker w2 died during the move"):
            await move
        echo.send("after\nquit\n")  # to the source again
        assert [line async for line in echoed] == ["around", "after", "quit", "bye"]
        assert (await echo.wait()).ok and echo.worker is source


async def migration_mid_line_and_with_input_queued(cl: Cluster) -> None:
    echo = await cl.launch(GuestConfig(image=GUESTS / "echo.img", memory="1M"))
    lines = echo.console
    echo.send("half a li")  # echoed at once: a partial line on the first worker
    while (await echo.fetch_stats()).notifies < 3:  # armed input (1), took and echoed it
        pass
    await cl.migrate(echo)
    echo.send("ne\nquit\n")
    assert [line async for line in lines] == ["half a line", "quit", "bye"]
    assert (await echo.wait()).ok


async def a_disk_moves_with_its_guest_and_is_written_back_once(cl: Cluster, tmp_path: Path) -> None:
    lines, spin = 12, 200_000
    disk = tmp_path / "disk.img"
    original = bytes(range(256)) * (lines * SECTOR // 256)
    disk.write_bytes(original)
    guest = await cl.launch(counter(lines, spin, gate=True, block=disk))
    guest.send("1")
    seen = []
    async for line in guest.console:
        seen.append(line)
        if line.isdigit():
            guest.send("1")  # the next line (or, after the last, the count)
        if line.isdigit() and int(line) % 3 == 0 and int(line) < lines:
            await cl.migrate(guest)
        if not guest.done:  # the caller's file waits for the end
            assert disk.read_bytes() == original
    assert seen == [*counted(lines, spin), "disk ok"]  # writes made before moves survive
    assert (await guest.wait()).ok
    assert guest.moves == 3  # after lines 3, 6 and 9
    after = disk.read_bytes()
    assert after == b"".join(bytes([n]) * SECTOR for n in range(1, lines + 1))


async def test_worker_loss_revives_from_the_checkpoint(tmp_path: Path) -> None:
    lines, spin = 30, 150_000
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(lines * SECTOR))
    async with asyncio.timeout(LIMIT), Cluster(workers=2, checkpoint_every=0.2) as cl:
        with_disk = await cl.launch(counter(lines, spin, block=disk))
        plain = await cl.launch(counter(lines, spin))
        assert with_disk.worker is not plain.worker
        victim = plain.worker
        echo = await cl.launch(GuestConfig(image=GUESTS / "echo.img", memory="1M"), worker=victim)
        echoed = echo.console
        echo.send("one\n")
        assert await anext(echoed) == "one"
        assert await cl.checkpoint(echo)
        echo.send("two\n")  # after the checkpoint: sent again to the revived guest
        assert await anext(echoed) == "two"
        seen = []
        async for line in plain.console:
            seen.append(line)
            if len(seen) == lines // 2:
                await until(lambda: plain.checkpoints > 0, LIMIT)
                await victim.kill()
                assert not victim.alive
        assert seen == counted(lines, spin)  # lines delivered before the loss: not again
        echo.send("quit\n")
        assert [line async for line in echoed] == ["quit", "bye"]  # "two" is not delivered again
        assert echo.revivals == 1 and (await echo.wait()).ok
        assert plain.revivals == 1 and plain.worker is not victim
        assert (await plain.wait()).ok
        assert [line async for line in with_disk.console] == [*counted(lines, spin), "disk ok"]
        assert (await with_disk.wait()).ok
    assert disk.read_bytes() == b"".join(bytes([n]) * SECTOR for n in range(1, lines + 1))


async def test_without_checkpoints_a_lost_worker_loses_its_guests() -> None:
    async with asyncio.timeout(LIMIT), Cluster(workers=2) as cl:
        guest = await cl.launch(GuestConfig(image=GUESTS / "spinner.img", memory="1M"))
        other = await cl.launch(GuestConfig(image=GUESTS / "hello.img", memory="1M"))
        await guest.worker.kill()
        result = await guest.wait()
        assert result.died and result.reason == f"worker {guest.worker.name} lost"
        assert (await other.wait()).ok  # the other worker's guest is unaffected
        again = await cl.launch(GuestConfig(image=GUESTS / "hello.img", memory="1M"))
        assert again.worker is other.worker  # a dead worker gets no new guests
        assert (await again.wait()).ok


def test_cli_swarm_on_the_cluster(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["swarm", "-n", "4", str(GUESTS / "counter.img"), "--memory", "1M"]
    argv += ["--cmdline", "lines=3 spin=1000", "--cluster", "ray", "--workers", "2"]
    assert main([*argv, "--checkpoint-every", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "swarm of 4" in out and "workers" in out
    rows = [line for line in out.splitlines() if line.strip("│ ").startswith(("w0 ", "w1 "))]
    assert len(rows) == 2 and all("alive" in row for row in rows)
    # On the cluster's one network, each by its own name (counter-0 ... counter-3).
    assert main([*argv, "--net"]) == 0
    assert "finished" in capsys.readouterr().out


def test_cli_cluster_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    image = str(GUESTS / "hello.img")
    assert main(["swarm", "-n", "1", image, "--cluster", "slurm"]) == 2
    assert "--cluster must be 'ray', 'local', 'auto', HOST:PORT or ray://HOST:PORT" in (
        capsys.readouterr().err
    )
    assert main(["swarm", "-n", "1", image, "--cluster", "host:port"]) == 2
    assert "not 'host:port'" in capsys.readouterr().err
    assert main(["swarm", "-n", "1", image, "--checkpoint-every", "1"]) == 2
    assert "need --cluster" in capsys.readouterr().err
    assert main(["swarm", "-n", "1", image, "--cluster", "ray", "--checkpoint-every", "0"]) == 2
    assert "--checkpoint-every: must be more than 0" in capsys.readouterr().err


async def test_a_worker_puts_input_that_arrives_out_of_order_back_in_order() -> None:
    """Ray may run an async actor's calls out of order; the guest still gets its input in
    order, each byte once, and EOF after the last byte (the actor class, run in-process)."""
    actor = WorkerActor("local", None, None)
    try:
        image = (GUESTS / "echo.img").read_bytes()
        fields = {"memory": 1 << 20, "console": "capture", "name": "echo"}
        await actor.launch("e.0", fields, "echo", image, None)
        await actor.end_input("e.0", 11)  # the last call first: EOF only after 11 bytes
        await actor.feed("e.0", 6, b"more\n")
        await actor.feed("e.0", 0, b"hello\n")
        await actor.feed("e.0", 0, b"hello\n")  # again (as after a revival): skipped
        lines: list[str] = []
        state = "running"
        while state != "ended":
            reply = await asyncio.wait_for(actor.read("e.0", len(lines)), LIMIT)
            first, got, state, _, received = reply
            assert first == len(lines)
            lines += got
        assert lines == ["hello", "more"]  # then EOF: echo powers off
        assert received == 11
        assert (await actor.wait("e.0"))["exit"]["exit_status"] == 0
    finally:
        await actor.close()


@pytest.mark.usefixtures("whole_inline_slices")
async def test_a_revived_guest_continues_its_half_written_line_before_it_writes() -> None:
    """The half-written line a move carries comes before anything the guest writes on
    its new worker, even when the guest writes at once: the actor class, in-process,
    revives an echo guest captured with input it has not echoed yet (sent while it was
    paused), and the line it finishes there is whole.  (With whole inline slices the
    revived guest's first read lets no other task run before it has echoed: it writes
    in the very turn of the loop that the restore gives it.)"""
    async with Supervisor() as sup:
        source = await sup.launch(GuestConfig(image=GUESTS / "echo.img", memory="1M"))
        await source.pause()
        source.send("ne\nquit\n")  # the guest echoes it as soon as it runs again
        snap = await source.snapshot()  # paused: stays paused
        await source.kill()
    state = Capture(
        snapshot=snap.to_bytes(),
        disk=None,
        base=0,
        lines=[],
        partial=b"half a li",  # what the guest had written of its line on the old worker
        received=len(b"half a line\nquit\n"),
        stats={},
    )
    actor = WorkerActor("local", None, None)
    try:
        fields = {"memory": 1 << 20, "console": "capture", "name": "echo"}
        await actor.revive("e.1", state, b"", False, fields)
        lines: list[str] = []
        status = "running"
        while status != "ended":
            first, got, status, _, _ = await asyncio.wait_for(actor.read("e.1", len(lines)), LIMIT)
            assert first == len(lines)
            lines += got
        assert lines == ["half a line", "quit", "bye"]
    finally:
        await actor.close()


async def a_guest_with_several_cpus_migrates_with_every_cpu(cl: Cluster, tmp_path: Path) -> None:
    from test_smp import SPINLOCK, XADD, smp

    from supervisor.testing import assemble

    image = tmp_path / "smp.img"
    loops = 400_000
    image.write_bytes(assemble(smp(3, loops, SPINLOCK + XADD, check=("counter", "counter2"))).image)
    config = GuestConfig(image=image, memory="1M", cpus=3, console="null")
    guest = await cl.launch(config)
    moves = 0
    while not guest.done and moves < 4:
        try:
            await cl.migrate(guest)
        except ClusterError:  # it ended meanwhile
            break
        moves += 1
    end = await guest.wait()
    assert end.ok, end  # each CPU's count exact across the moves (status 1 otherwise)
    assert moves >= 1


async def a_migrated_guest_keeps_its_open_files(cl: Cluster, fsprobe: Path, tmp_path: Path) -> None:
    """Its descriptors, offsets and working directory in a granted directory (which the
    new worker names again) go on after the move (tests/test_files.py: the grants)."""
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "f").write_bytes(b"abcdefghijklmnopqrstuvwxyz")
    granted = [{"host": tmp_path / "files", "guest": "/d"}]
    guest = await cl.launch(GuestConfig(image=fsprobe, memory="4M", dirs=granted))
    guest.send("open /d/f b\nread 3 3\ncd /d\n")
    lines = aiter(guest.console)
    assert [await anext(lines) for _ in range(3)] == ["ok 3", "ok 3 abc", "ok"]
    first = guest.worker
    assert await cl.migrate(guest) is not first
    guest.send("read 3 2\nwrite 3 XY\ncwd\nexit 5\n")
    assert [line async for line in lines] == ["ok 2 de", "ok 2", "ok /d"]
    assert (await guest.wait()).exit_status == 5
    assert (tmp_path / "files" / "f").read_bytes() == b"abcdeXYhijklmnopqrstuvwxyz"


def networked(image: str, name: str, cmdline: str) -> GuestConfig:
    return GuestConfig(
        image=GUESTS / "c" / image, name=name, cmdline=cmdline, memory="4M", net=True
    )


async def test_guests_on_two_workers_reach_each_other_by_name() -> None:
    """A C echo server on one worker, C clients on the other connecting by name: bytes
    both ways, ECONNREFUSED from the server's worker, a connect that a partition
    holds until a heal."""
    async with asyncio.timeout(LIMIT), Cluster(workers=2) as cl:
        w0, w1 = cl.workers
        server = await cl.launch(networked("tcp_echo_server.elf", "echo", "7 2"), worker=w0)
        lines = aiter(server.console)
        assert await anext(lines) == "listening on 7"
        client = await cl.launch(
            networked("tcp_echo_client.elf", "cli", "echo 7 hello there"), worker=w1
        )
        assert cl.net.members == {"cli": "10.0.0.3", "echo": "10.0.0.2"}
        assert await collect(client) == ["hello there"]
        assert (await client.wait()).ok
        refused = await cl.launch(networked("tcp_echo_client.elf", "cli2", "echo 8 x"), worker=w1)
        assert await collect(refused) == []  # perror("connect") went to its stderr
        assert (await refused.wait()).exit_status == 1
        # The next guest's address, cut off before it runs: its connect waits.
        await cl.net.partition(["echo"], ["10.0.0.5"])
        late = await cl.launch(networked("tcp_echo_client.elf", "cli3", "echo 7 late"), worker=w1)
        await until_remote(lambda: w1.actor.net_state.remote(), lambda s: s["stalled"] == 1)
        assert not late.done
        await cl.net.heal()
        assert await collect(late) == ["late"]
        assert (await server.wait()).ok  # its two clients came and went
        assert "echo" not in cl.net.members
        gone = {"stalled": 0, "connections": 0, "remotes": {}}  # told by the driver
        await until_remote(lambda: w1.actor.net_state.remote(), lambda s: s == gone)


async def until_remote(
    ask: Callable[[], Awaitable[dict[str, Any]]], holds: Callable[[dict[str, Any]], bool]
) -> None:
    """Ask a worker until its answer ``holds`` (a bound for failing: LIMIT)."""
    while not holds(await ask()):  # noqa: ASYNC110 - a remote worker has no Event to await
        await asyncio.sleep(0.05)


@pytest.mark.soak  # (default: migrations, a networked guest's move below, NetBridge's tests)
async def test_a_networked_guest_moves_with_its_name_and_address() -> None:
    async with asyncio.timeout(LIMIT), Cluster(workers=2) as cl:
        w0, w1 = cl.workers
        config = GuestConfig(image=GUESTS / "echo.img", memory="1M", name="idle", net=True)
        idle = await cl.launch(config, worker=w0)
        assert (await w1.actor.net_state.remote())["remotes"] == {"idle": "w0"}
        assert await cl.migrate(idle) is w1
        assert cl.net.worker_of("idle") is w1 and cl.net.resolve("idle") == "10.0.0.2"
        assert (await w0.actor.net_state.remote())["remotes"] == {"idle": "w1"}
        assert (await w1.actor.net_state.remote())["remotes"] == {}
        # Asked of w1 now, where nothing listens on port 7.
        client = await cl.launch(networked("tcp_echo_client.elf", "cli", "idle 7 x"), worker=w0)
        assert (await client.wait()).exit_status == 1
        idle.send("still here\n")
        assert await anext(aiter(idle.console)) == "still here"
        await idle.kill()


async def test_a_lost_worker_resets_the_connections_to_its_guests() -> None:
    async with asyncio.timeout(LIMIT), Cluster(workers=2) as cl:
        w0, w1 = cl.workers
        server = await cl.launch(networked("tcp_echo_server.elf", "echo", "7"), worker=w0)
        assert await anext(aiter(server.console)) == "listening on 7"
        holder = await cl.launch(networked("tcp_hold_client.elf", "hold", "echo 7 hi"), worker=w1)
        assert await anext(aiter(holder.console)) == "hi"  # connected, echoed, holding
        reader, writer = await cl.net.open_connection("echo", 7)
        writer.write(b"hi\n")
        assert await reader.readline() == b"hi\n"
        await w0.kill()
        assert (await holder.wait()).exit_status == 1  # its recv failed: ECONNRESET
        with pytest.raises(ConnectionResetError):  # the driver's too
            await reader.read()
        assert (await server.wait()).reason == "worker w0 lost"
        assert cl.net.members == {}
        gone = {"stalled": 0, "connections": 0, "remotes": {}}
        await until_remote(lambda: w1.actor.net_state.remote(), lambda s: s == gone)


@pytest.fixture
def probe(build_guest: BuildGuest) -> Path:
    """tests/c/netprobe.c: socket behaviours, one mode per run."""
    source = Path(__file__).resolve().parent / "c" / "netprobe.c"
    return build_guest(source.read_text(), flags=("-O2",))


def probing(image: Path, name: str, cmdline: str) -> GuestConfig:
    return GuestConfig(image=image, name=name, cmdline=cmdline, memory="4M", net=True)


async def test_host_is_the_driver_for_guests_on_every_worker(probe: Path) -> None:
    """Guests on both workers call the driver's server at host:7 (and are refused at
    host:9); the driver connects to a guest by name on a worker, and exchanges
    datagrams with one."""
    async with asyncio.timeout(LIMIT), Cluster(workers=2) as cl:
        w0, w1 = cl.workers

        async def shout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write((await reader.readline()).upper())
            await writer.drain()
            writer.close()

        server = await cl.net.start_server(shout, 7)
        calls = [
            await cl.launch(networked("tcp_echo_client.elf", f"c{i}", f"host 7 hi {i}"), worker=w)
            for i, w in enumerate((w0, w1))
        ]
        assert [await collect(c) for c in calls] == [["HI 0"], ["HI 1"]]
        assert [(await c.wait()).ok for c in calls] == [True, True]
        assert server.connections == 2
        refused = await cl.launch(networked("tcp_echo_client.elf", "c2", "host 9 x"), worker=w1)
        assert (await refused.wait()).exit_status == 1  # connect: ECONNREFUSED (its stderr)

        echo = await cl.launch(networked("tcp_echo_server.elf", "echo", "7 1"), worker=w1)
        assert await anext(aiter(echo.console)) == "listening on 7"
        reader, writer = await cl.net.open_connection("echo", 7)
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        writer.close()
        assert (await echo.wait()).ok
        with pytest.raises(OSError) as gone:
            await cl.net.open_connection("c0", 7)  # it ended: its name is gone
        assert gone.value.errno == errno.EHOSTUNREACH

        uecho = await cl.launch(probing(probe, "uecho", "udp-echo 5353 1"), worker=w0)
        lines = aiter(uecho.console)
        assert await anext(lines) == "ready udp"
        with pytest.raises(ConnectionRefusedError):  # answered by its worker
            await cl.net.open_connection("uecho", 7)
        endpoint = await cl.net.open_datagram()
        address = cl.net.resolve("uecho")  # (it ends once it has echoed)
        endpoint.send(b"datagram", ("uecho", 5353))
        assert await endpoint.recv() == (b"datagram", (address, 5353))
        assert await anext(lines) == "datagram 8 from 10.0.0.1"
        assert (await uecho.wait()).ok
        endpoint.close()


async def test_a_move_resets_connections_and_the_listener_listens_again(probe: Path) -> None:
    async with asyncio.timeout(LIMIT), Cluster(workers=2) as cl:
        w0, w1 = cl.workers
        srv = await cl.launch(probing(probe, "srv", "snap 7"), worker=w1)
        srv_lines = aiter(srv.console)
        assert await anext(srv_lines) == "ready snap"
        cli = await cl.launch(probing(probe, "cli", "client-wait srv 7"), worker=w0)
        cli_lines = aiter(cli.console)
        assert [await anext(cli_lines) for _ in range(2)] == ["connect OK", "ready client"]
        assert await anext(srv_lines) == "accepted 1"
        reader, _writer = await cl.net.open_connection("srv", 7)  # in the backlog
        assert await cl.migrate(srv) is w0
        # Its peers, on its new worker and on the driver, see a reset, not an end.
        assert [line async for line in cli_lines] == ["recv -1 ECONNRESET", "send-after EPIPE"]
        with pytest.raises(ConnectionResetError):
            await reader.read()
        with pytest.raises(ConnectionRefusedError):  # its listener did not move with it
            await cl.net.open_connection("srv", 7)
        srv.send("go\n")
        assert [line async for line in srv_lines] == [
            "accept ESTALE",
            "recv -1 ESTALE",
            "close OK OK",
            "listen-again 1",  # on arrival: the port is its own to listen on again
        ]
        assert (await srv.wait()).ok


async def test_a_failed_move_keeps_the_connections(tmp_path: Path) -> None:
    """Two failed moves of a networked guest: to a worker that could not revive it (the
    directory it was granted is gone), then to one that died.  Each time it runs on at
    w0 with its connections, and its name goes on resolving to w0 everywhere, on the
    worker that refused it too."""
    granted = tmp_path / "granted"
    granted.mkdir()
    async with asyncio.timeout(LIMIT), Cluster(workers=2) as cl:
        w0, w1 = cl.workers
        config = GuestConfig(
            image=GUESTS / "c" / "tcp_echo_server.elf", name="echo", cmdline="7", memory="4M",
            net=True, dirs=[{"host": granted, "guest": "/data"}],
        )  # fmt: skip
        echo = await cl.launch(config, worker=w0)
        assert await anext(aiter(echo.console)) == "listening on 7"
        reader, writer = await cl.net.open_connection("echo", 7)
        writer.write(b"before\n")
        assert await reader.readline() == b"before\n"
        holder = await cl.launch(networked("tcp_hold_client.elf", "hold", "echo 7 hi"), worker=w1)
        held = aiter(holder.console)
        assert await anext(held) == "hi"  # connected from w1, echoed, holding
        granted.rmdir()  # a restore names it again: w1 cannot revive the guest
        with pytest.raises(ClusterError, match="worker w1 could not revive it") as failed:
            await cl.migrate(echo, w1)
        assert "no such directory" in str(failed.value) and "runs on at w0" in str(failed.value)
        assert echo.worker is w0 and echo.moves == 0 and w1.alive
        assert (await w1.actor.net_state.remote())["remotes"] == {"echo": "w0"}
        writer.write(b"between\n")  # the driver's connection is kept
        assert await reader.readline() == b"between\n"
        client = await cl.launch(networked("tcp_echo_client.elf", "cli", "echo 7 again"), worker=w1)
        assert await collect(client) == ["again"]  # the name, asked on w1, is at w0
        assert not holder.done  # w1's connection is kept too
        await holder.kill()  # (so that the driver does not see w1 die below)
        ray.kill(w1.actor, no_restart=True)  # dead, still marked alive
        with contextlib.suppress(RayActorError):
            while True:  # until calls to it fail
                await w1.actor.ping.remote()
        with pytest.raises(ClusterError, match="worker w1 died during the move"):
            await cl.migrate(echo, w1)
        writer.write(b"after\n")  # the same connection, to the guest running on at w0
        assert await reader.readline() == b"after\n"
        writer.close()
        await echo.kill()
