"""Deterministic mode on the guests' network: every wait the network makes (a full
backlog, a full buffer, a link's delay and loss, a partition's stall and timeouts)
is on the virtual clock or wakes a guest, so the seeded schedule sees it.

Every check is on bytes, exit statuses and the virtual clock, never the host's clock;
each run is bounded so that a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from pathlib import Path

import pytest

from supervisor import Exit, GuestConfig, Supervisor, abi, sdk
from supervisor import net as netmod
from supervisor.device import LguestFile
from supervisor.host import Guest
from supervisor.pytest_plugin import BuildGuest
from supervisor.virtual import Simulation

HERE = Path(__file__).resolve().parent
GUESTS = HERE.parent / "guests" / "c"
TCP_SERVER = GUESTS / "tcp_echo_server.elf"
TCP_CLIENT = GUESTS / "tcp_echo_client.elf"
ECHO = GUESTS / "echo.elf"
TICKER = HERE.parent / "guests" / "ticker.img"
LIMIT = 300  # seconds: a bound for failing, never a wait for success
BACKLOG = 16  # tcp_echo_server's listen(16)


def sim_of(sup: Supervisor) -> Simulation:
    sim = sup.device.virtual
    assert sim is not None
    return sim


def server(s: int, clients: int) -> GuestConfig:
    return GuestConfig.build(image=TCP_SERVER, name=f"srv{s}", net=True, cmdline=f"7 {clients}")


def client(s: int, i: int) -> GuestConfig:
    return GuestConfig.build(
        image=TCP_CLIENT, name=f"c{s}.{i}", net=True, cmdline=f"srv{s} 7 hello {s}.{i}"
    )


async def pump(guest: Guest, lines: list[str]) -> None:
    """Every line of ``guest``'s output and errors, as ``NAME: LINE`` in arrival order."""

    async def one(source: AsyncIterable[str], tag: str) -> None:
        async for line in source:
            lines.append(f"{guest.name}{tag}: {line}")

    await asyncio.gather(one(guest.console, ""), one(guest.stderr, " (stderr)"))


async def echo_run(
    seed: int, servers: int, clients: int, *, faults: bool = False
) -> tuple[list[str], int, list[Exit]]:
    """(transcript, virtual time in ns, every guest's exit) of ``servers`` echo
    servers, each with ``clients`` clients launched once it listens and the device is
    idle (so the clients' launch is at one point of the run).  ``faults``: every
    client's link to its server has a delay, jitter and loss."""
    lines: list[str] = []
    async with asyncio.timeout(LIMIT), Supervisor(deterministic=True, seed=seed) as sup:
        sim = sim_of(sup)
        guests = [await sup.launch(server(s, clients)) for s in range(servers)]
        for guest in guests:
            await guest.expect("listening on 7\n")
            lines.append(f"{guest.name}: listening on 7")
        await sim.idle()
        for s in range(servers):
            for i in range(clients):
                guests.append(await sup.launch(client(s, i)))
                if faults:
                    sup.net.link(f"c{s}.{i}", f"srv{s}", delay=0.002, jitter=0.003, loss=0.2)
        pumps = [asyncio.create_task(pump(g, lines)) for g in guests]
        ends = [await g.wait() for g in guests]
        await asyncio.gather(*pumps)
        return lines, sim.now_ns, ends


@pytest.mark.parametrize(("servers", "clients"), [(1, 16), (1, 24), (2, 4)])
async def test_clients_launched_once_their_server_listens_all_get_their_echo(
    servers: int, clients: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 x 16 and 1 x 24 clients fill tcp_echo_server's backlog of 16 (a connect then
    waits for an accept to make room); 2 x 4: two servers.  Every client gets its echo,
    and a second run with the seed is the same run, byte for byte."""
    waits: list[int] = []
    wait_for_backlog = netmod.Network._wait_for_backlog

    def counting(
        self: netmod.Network, sock: netmod.StreamSocket, listener: netmod.StreamSocket
    ) -> None:
        waits.append(len(listener.backlog))
        wait_for_backlog(self, sock, listener)

    monkeypatch.setattr(netmod.Network, "_wait_for_backlog", counting)
    first, now, ends = await echo_run(7, servers, clients)
    assert all(end.ok for end in ends), ends
    echoes = sorted(line for line in first if ": hello" in line)
    want = sorted(f"c{s}.{i}: hello {s}.{i}" for s in range(servers) for i in range(clients))
    assert echoes == want
    if clients > BACKLOG:
        assert waits and set(waits) == {BACKLOG}  # connects waited for room, and got it
    backlog_waits = len(waits)
    assert await echo_run(7, servers, clients) == (first, now, ends)
    assert len(waits) == 2 * backlog_waits


async def test_lossy_jittery_links_between_clients_and_servers_replay_from_the_seed() -> None:
    """Delay, jitter and loss on every client's link, drawn from the seed and timed on
    the virtual clock: the echoes arrive, later in virtual time, the same way twice;
    another seed gives another order."""
    plain_lines, plain_ns, _ = await echo_run(3, 2, 4)
    first, now, ends = await echo_run(3, 2, 4, faults=True)
    assert all(end.ok for end in ends), ends
    assert sorted(first) == sorted(plain_lines)  # the same bytes arrive...
    assert now > plain_ns + 2_000_000  # ...after the links' delays at the least
    assert await echo_run(3, 2, 4, faults=True) == (first, now, ends)
    other, _, _ = await echo_run(4, 2, 4, faults=True)
    assert sorted(other) == sorted(first) and other != first


async def test_clients_launched_with_their_server_race_it_deterministically() -> None:
    """Launched together, the clients and the server start at virtual time 0 and the
    seed orders their boots: with seed 7, clients that connect by address (no name to
    look up first) connect before the server listens and get ECONNREFUSED, as they
    could on any machine.  The server then waits for clients that will never come: the
    device goes idle (nothing in it can change without the host), which
    :meth:`Simulation.idle` tells instead of a hang; a second run refuses the same
    clients."""

    async def once() -> tuple[list[str], int]:
        lines: list[str] = []
        async with asyncio.timeout(LIMIT), Supervisor(deterministic=True, seed=7) as sup:
            guests = [await sup.launch(server(0, 16))]
            address = sup.net.resolve("srv0")
            by_address = [
                GuestConfig.build(
                    image=TCP_CLIENT,
                    name=f"c0.{i}",
                    net=True,
                    cmdline=f"{netmod.ip_str(address)} 7 hello 0.{i}",
                )
                for i in range(16)
            ]
            guests += [await sup.launch(config) for config in by_address]
            pumps = [asyncio.create_task(pump(g, lines)) for g in guests[1:]]
            for guest in guests[1:]:
                await guest.wait()
            await asyncio.gather(*pumps)
            await sim_of(sup).idle()
            assert not guests[0].done  # the server waits for ever
            return lines, sim_of(sup).now_ns

    first, now = await once()
    refused = [line for line in first if line.endswith("connect: Connection refused")]
    echoed = [line for line in first if ": hello" in line]
    assert refused and len(refused) + len(echoed) == 16
    assert await once() == (first, now)


async def test_idle_waits_for_every_timer() -> None:
    """A sleeping ticker keeps a timer armed: the device is idle only once it ended,
    after its three virtual seconds."""
    async with asyncio.timeout(LIMIT), Supervisor(deterministic=True, seed=1) as sup:
        sim = sim_of(sup)
        await sim.idle()  # nothing launched: idle at once
        guest = await sup.launch(GuestConfig.build(image=TICKER, cmdline="ticks=3 period_ms=1000"))
        await sim.idle()
        assert sim.now_ns >= 3_000_000_000
        assert (await guest.wait()).exit_status == 0
        await sim.idle()  # idle already, and nothing changed: at once
        await sim.idle()


async def test_idle_waits_for_input_sent_while_idle() -> None:
    """A line sent to an idle echo guest is input the schedule applies: idle() asked
    right after the send waits for the guest to have echoed it."""
    async with asyncio.timeout(LIMIT), Supervisor(deterministic=True, seed=1) as sup:
        sim = sim_of(sup)
        guest = await sup.launch(GuestConfig.build(image=ECHO, name="echo"))
        await sim.idle()
        quanta, step = sim.quanta, sim.step
        guest.send("hello\n")
        await sim.idle()
        assert sim.quanta > quanta and sim.step > step
        guest.send("quit\n")
        assert (await guest.wait()).exit_status == 0
        assert "hello" in [line async for line in guest.console]


@pytest.fixture
def probe(build_guest: BuildGuest) -> Path:
    return build_guest((HERE / "c" / "netprobe.c").read_text(), flags=("-O2",))


async def test_a_partition_stalls_and_times_out_on_the_virtual_clock(probe: Path) -> None:
    """A writer fills a connection whose reader never reads (it then waits for room),
    a partition holds its bytes until the stream timeout (924.6 s), and its reconnect
    across the cut waits for the connect timeout (127 s): both timeouts pass in
    virtual time, with the default timeouts, and the run is the same twice."""

    async def once() -> tuple[list[str], int]:
        async with asyncio.timeout(LIMIT), Supervisor(deterministic=True, seed=5) as sup:
            sim = sim_of(sup)
            hold = await sup.launch(
                GuestConfig(image=probe, name="h", cmdline="serve-hold 7", memory="4M", net=True)
            )
            await hold.expect("ready hold")
            await sim.idle()
            writer = await sup.launch(
                GuestConfig(image=probe, name="w", cmdline="stall h 7", memory="4M", net=True)
            )
            await writer.expect("ready stall")
            await sim.idle()
            start = sim.now_ns
            sup.net.partition(["w"], ["h"])
            writer.send("go\n")
            lines = [line async for line in writer.console]
            assert (await writer.wait()).ok
            await hold.kill()
            elapsed = sim.now_ns - start
            assert elapsed >= round((netmod.DEFAULT_STREAM_TIMEOUT + 127) * 1e9)
            return lines, sim.now_ns

    first, now = await once()
    assert first == [
        "",  # the rest of the "ready stall" line
        f"sent {netmod.DEFAULT_STREAM_BUFFER} ETIMEDOUT",  # a full buffer, then the timeout
        "again EPIPE",
        "connect ETIMEDOUT",  # across the cut nothing answers
    ]
    assert await once() == (first, now)


async def test_a_connect_waiting_for_a_full_backlog_times_out_on_the_virtual_clock(
    probe: Path,
) -> None:
    """A server that accepts one connection and no more (netprobe's serve-hold, a
    backlog of 4) and six clients: one is accepted, four wait in the backlog, and the
    sixth connect waits for room that never comes, until the connect timeout (127 s,
    passed in virtual time: the clock jumps to it).  The device is then idle, the
    five others waiting for ever; the same run twice."""

    async def once() -> tuple[list[str], int]:
        lines: list[str] = []
        async with Supervisor(deterministic=True, seed=2) as sup:
            sim = sim_of(sup)
            async with asyncio.timeout(LIMIT):
                hold = await sup.launch(
                    GuestConfig(
                        image=probe, name="h", cmdline="serve-hold 7", memory="4M", net=True
                    )
                )
                await hold.expect("ready hold\n")
                await sim.idle()
                clients = [
                    await sup.launch(
                        GuestConfig(
                            image=probe,
                            name=f"c{i}",
                            cmdline="client-wait h 7",
                            memory="4M",
                            net=True,
                        )
                    )
                    for i in range(6)
                ]
                pumps = [asyncio.create_task(pump(g, lines)) for g in clients]
                await sim.idle()
            now = sim.now_ns
        await asyncio.gather(*pumps)  # (the Supervisor's end killed the waiting ones)
        return lines, now

    first, now = await once()
    connects = sorted(line.split(": ", 1)[1] for line in first if ": connect " in line)
    assert connects == ["connect ETIMEDOUT"] + ["connect OK"] * 5
    assert now >= round(netmod.DEFAULT_CONNECT_TIMEOUT * 1e9)
    assert await once() == (first, now)


@pytest.fixture(scope="module")
def rebooter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/c/reboot.c built: prints when it booted, then reboots."""
    return sdk.build([HERE / "c" / "reboot.c"], tmp_path_factory.mktemp("rb") / "reboot.elf")


async def test_a_reboot_rejoins_the_schedule_where_it_left_it(
    rebooter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest rebooting four times beside a busy ticker: nothing runs while its
    Launcher reloads it, so each boot starts at the same virtual time however long
    the reload takes on the host (here made 50 ms of wall time longer)."""

    async def once() -> list[str]:
        lines: list[str] = []
        async with (
            asyncio.timeout(LIMIT),
            Supervisor(deterministic=True, seed=3, max_restarts=4) as sup,
        ):
            guests = [
                await sup.launch(GuestConfig.build(image=rebooter, name="r")),
                await sup.launch(
                    GuestConfig.build(
                        image=GUESTS / "ticker.elf", name="t", cmdline="ticks=60 period_ms=1"
                    )
                ),
            ]
            pumps = [asyncio.create_task(pump(g, lines)) for g in guests]
            ends = [await g.wait() for g in guests]
            await asyncio.gather(*pumps)
        assert ends[0].restarts == 4 and "too many restarts" in ends[0].reason
        assert ends[1].exit_status == 0
        return lines

    quick = await once()
    assert len([line for line in quick if line.startswith("r: boot at")]) == 5
    write = LguestFile.write
    initialize = abi.LHREQ_INITIALIZE.to_bytes(4, "little")

    async def slow_reload(
        self: LguestFile, buf: bytes | bytearray | memoryview, offset: int = 0
    ) -> int:
        if bytes(buf[:4]) == initialize:
            await asyncio.sleep(0.05)
        return await write(self, buf, offset)

    monkeypatch.setattr(LguestFile, "write", slow_reload)
    assert await once() == quick
