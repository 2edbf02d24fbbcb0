"""Allowed outbound addresses: a guest reaches exactly the real addresses it was allowed
(``GuestConfig.allow_outbound``, ``--allow-outbound``) and nothing else outside.

Guests are tests/c/netprobe.c's ``outbound`` mode; the real servers are asyncio's and
plain sockets on the host's loopback.  Needs the ``sdk`` extra (Zig's C compiler).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from refused import refused_here

from supervisor import GuestConfig, Supervisor
from supervisor.config import ConfigError
from supervisor.net import (
    HOST_ADDR,
    POLLERR,
    STREAM,
    NetError,
    Network,
    StreamSocket,
    WouldBlock,
    parse_outbound,
)
from supervisor.pytest_plugin import BuildGuest
from supervisor.testing import until

HERE = Path(__file__).resolve().parent
LIMIT = 60  # seconds: a bound for failing, never a wait for success


@pytest.fixture
def probe(build_guest: BuildGuest) -> Path:
    return build_guest((HERE / "c" / "netprobe.c").read_text(), flags=("-O2",))


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        port: int = s.getsockname()[1]
        return port


async def run_probe(
    sup: Supervisor, image: Path, cmdline: str, allowed: list[str] | None = None
) -> list[str]:
    """The console lines of one netprobe run (allowed: its ``allow_outbound``)."""
    config = GuestConfig(
        image=image, cmdline=cmdline, memory="4M", net=True, allow_outbound=allowed or []
    )
    guest = await sup.launch(config)
    async with asyncio.timeout(LIMIT):
        lines = [line async for line in guest.console]
        assert (await guest.wait()).ok
    return lines


async def test_a_guest_reaches_only_the_outside_addresses_it_was_allowed(probe: Path) -> None:
    accepted: Counter[str] = Counter()

    def server(tag: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted[tag] += 1
            if await reader.readline():
                writer.write(f"pong {tag}\n".encode())
                await writer.drain()
            writer.close()

        return serve

    p1, p2, p3, p4 = (free_port("127.0.0.1") for _ in range(4))
    real = [
        await asyncio.start_server(server("A"), "127.0.0.1", p1),  # allowed: host:P1
        await asyncio.start_server(server("B"), "127.0.0.2", p2),  # allowed: itself
        await asyncio.start_server(server("C"), "127.0.0.1", p3),  # not allowed
        await asyncio.start_server(server("D"), "127.0.0.2", p3),  # not allowed
    ]
    udp = []
    for address, port in (("127.0.0.1", p1), ("127.0.0.2", p2)):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind((address, port))
        u.setblocking(False)
        udp.append(u)
    allowed = [f"localhost:{p1}", f"127.0.0.2:{p2}", f"127.0.0.1:{p4}"]  # P4: nobody there
    try:
        async with Supervisor() as sup:
            lines = await run_probe(sup, probe, f"outbound host {p4} {p1} {p3}", allowed)
            assert lines == [
                f"tcp host:{p4} ECONNREFUSED",  # allowed, but the real port refuses
                f"udp host:{p4} OK",
                f"tcp host:{p1} OK peer 10.0.0.1 reply pong A",
                f"udp host:{p1} OK",  # sent, and lost: only TCP is let out
                f"tcp host:{p3} ECONNREFUSED",
                f"udp host:{p3} OK",
                "nonblock EINPROGRESS poll 1 so_error ECONNREFUSED",  # P4's refusal, waited for
            ]
            lines = await run_probe(sup, probe, f"outbound 127.0.0.2 {p2} {p3} {p1}", allowed)
            assert lines == [
                f"tcp 127.0.0.2:{p2} OK peer 127.0.0.2 reply pong B",
                f"udp 127.0.0.2:{p2} ENETUNREACH",
                f"tcp 127.0.0.2:{p3} ENETUNREACH",
                f"udp 127.0.0.2:{p3} ENETUNREACH",
                f"tcp 127.0.0.2:{p1} ENETUNREACH",
                f"udp 127.0.0.2:{p1} ENETUNREACH",
                "nonblock EINPROGRESS poll 1 so_error OK",
            ]
            lines = await run_probe(sup, probe, f"outbound 127.0.0.1 {p1} {p3}", allowed)
            assert lines == [  # 127.0.0.1 is the guest itself
                f"tcp 127.0.0.1:{p1} ECONNREFUSED",
                f"udp 127.0.0.1:{p1} OK",
                f"tcp 127.0.0.1:{p3} ECONNREFUSED",
                f"udp 127.0.0.1:{p3} OK",
                "nonblock EINPROGRESS poll 1 so_error ECONNREFUSED",
            ]
            # Another guest, allowed nothing, tries the same ways.
            lines = await run_probe(sup, probe, f"outbound host {p1}")
            assert lines[:2] == [f"tcp host:{p1} ECONNREFUSED", f"udp host:{p1} OK"]
            for address in ("127.0.0.2", "192.0.2.2", "8.8.8.8"):
                lines = await run_probe(sup, probe, f"outbound {address} {p2}")
                assert lines[:2] == [
                    f"tcp {address}:{p2} ENETUNREACH",
                    f"udp {address}:{p2} ENETUNREACH",
                ]
        assert accepted == {"A": 1, "B": 2}  # the allowed ones only; C and D never
        for u in udp:
            with pytest.raises(BlockingIOError):
                u.recvfrom(100)  # no datagram ever left
    finally:
        for s in real:
            s.close()
        for u in udp:
            u.close()


async def test_a_partition_from_the_host_cuts_the_way_out(probe: Path) -> None:
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()

    port = free_port("127.0.0.2")
    real = await asyncio.start_server(serve, "127.0.0.2", port)
    try:
        async with Supervisor(network=Network(connect_timeout=0.3)) as sup:
            sup.net.partition(["host"], ["10.0.0.2"])  # the address the guest will get
            config = GuestConfig(
                image=probe,
                name="cut",
                cmdline=f"stall 127.0.0.2 {port}",
                memory="4M",
                net=True,
                allow_outbound=[f"127.0.0.2:{port}"],
            )
            guest = await sup.launch(config)
            await guest.expect("connect ETIMEDOUT\nready stall\n", LIMIT)
            assert accepted == []  # nothing went out across the cut
            sup.net.heal()
            guest.send("go\n")
            async with asyncio.timeout(LIMIT):
                lines = [line async for line in guest.console]
            assert lines == ["sent 0 EPIPE", "again EPIPE", "connect OK"]
        assert accepted == [1]
    finally:
        real.close()


def test_outbound_addresses_are_validated() -> None:
    assert parse_outbound("localhost:80") == ((HOST_ADDR, 80), ("127.0.0.1", 80))
    assert parse_outbound("192.0.2.9:5432") == ((0xC0000209, 5432), ("192.0.2.9", 5432))
    for bad, why in [
        ("80", "is not HOST:PORT"),
        ("example.com:80", "is not an IPv4 address"),
        ("127.0.0.1:0", "is not HOST:PORT"),
        ("127.0.0.1:65536", "is not HOST:PORT"),
        ("127.0.0.1:\u00b2", "is not HOST:PORT"),  # a digit to str.isdigit, not to int
        ("127.0.0.1:\u0668\u0660", "is not HOST:PORT"),  # Arabic-Indic 80
        (":80", "'' is not an IPv4 address"),
        ("[::1]:80", "is not an IPv4 address"),
        ("::ffff:127.0.0.1:80", "is not an IPv4 address"),
        ("127.1:80", "is not an IPv4 address"),
        ("10.0.0.3:80", "not an outside unicast address"),
        ("224.0.0.1:80", "not an outside unicast address"),
        ("0.0.0.0:80", "not an outside unicast address"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_outbound(bad)
        with pytest.raises(ConfigError, match=why):
            GuestConfig(image=__file__, net=True, allow_outbound=[bad])
    with pytest.raises(ConfigError, match="allow_outbound needs net"):
        GuestConfig(image=__file__, allow_outbound=["127.0.0.1:80"])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )


def test_cli_allow_outbound_lets_a_run_reach_one_real_address(probe: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(100)
                conn.sendall(b"pong cli\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        proc = _cli(
            "run",
            str(probe),
            "--net",
            "--memory",
            "4M",
            "--allow-outbound",
            f"127.0.0.1:{port}",
            "--cmdline",
            f"outbound host {port}",
        )
        thread.join(LIMIT)
    assert proc.returncode == 0, proc.stderr
    assert f"tcp host:{port} OK peer 10.0.0.1 reply pong cli" in proc.stdout.splitlines()


@pytest.mark.parametrize("command", ["run", "swarm"])
def test_cli_bad_allow_outbound_is_one_line_and_status_2(command: str, probe: Path) -> None:
    for args, why in [
        (["--net", "--allow-outbound", "nowhere"], "is not HOST:PORT"),
        (["--net", "--allow-outbound", "db.example:5432"], "is not an IPv4 address"),
        (["--allow-outbound", "127.0.0.1:80"], "supervisor: error: --allow-outbound needs --net\n"),
    ]:
        extra = ["-n", "1"] if command == "swarm" else []
        proc = refused_here(command, *extra, str(probe), *args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("supervisor: error: ")
        assert why in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def real_connections(port: int) -> list[str]:
    """The TCP states (/proc/net/tcp's hex codes) of this process's sockets connected
    to the host's port ``port`` (the host's ends of connections to the outside)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[9] in inodes:
            states.append(fields[3])
    return states


async def test_a_socket_closed_while_dialing_leaves_no_host_socket() -> None:
    """A connect to an allowed address that does not answer holds a host socket while it
    waits; the guest's close gives it back (else a guest could connect and close in a
    loop and hold host descriptors without bound)."""
    with socket.socket() as deaf:
        deaf.bind(("127.0.0.1", 0))
        deaf.listen(0)
        port = deaf.getsockname()[1]
        fillers = []  # fill its backlog: the host's next connect gets no answer
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            await until(lambda: len(real_connections(port)) == len(fillers), LIMIT)
            net = Network()
            guest = net.join("g", outbound=[f"127.0.0.1:{port}"])
            for _ in range(3):
                sock = guest.socket(STREAM)
                assert isinstance(sock, StreamSocket)
                with pytest.raises(WouldBlock):
                    sock.connect(HOST_ADDR, port)
                await until(lambda: len(real_connections(port)) == len(fillers) + 1, LIMIT)
                sock.close()
                await until(lambda: len(real_connections(port)) == len(fillers), LIMIT)
            await net.aclose()
        finally:
            for filler in fillers:
                filler.close()


async def test_closing_a_connection_to_the_outside_closes_the_host_socket() -> None:
    """The guest's bytes before its close reach the outside, then the host's end of the
    real connection closes even though the outside keeps its own open and says nothing;
    a shutdown of the guest's sending side only ends what the outside reads."""
    received: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        received.append(await reader.read())  # up to the end; then silent, and open
        if received[-1] == b"half":
            writer.write(b"after your end")
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    net = Network()
    guest = net.join("g", outbound=[f"127.0.0.1:{port}"])

    async def connect() -> StreamSocket:
        sock = guest.socket(STREAM)
        assert isinstance(sock, StreamSocket)
        woken = asyncio.Event()
        sock.on_change = woken.set
        while True:
            try:
                sock.connect(HOST_ADDR, port)
                return sock
            except WouldBlock:
                await woken.wait()
                woken.clear()

    try:
        for _ in range(3):
            sock = await connect()
            assert sock.send(b"bye") == 3
            sock.close()
            await until(lambda: not real_connections(port), LIMIT)
        assert received == [b"bye"] * 3
        sock = await connect()
        sock.send(b"half")
        sock.shutdown(1)
        await until(lambda: bool(sock.rx), LIMIT)
        assert real_connections(port)  # still open: the outside may still send
        await until(lambda: sock.rx == bytearray(b"after your end"), LIMIT)
        sock.close()
        await until(lambda: not real_connections(port), LIMIT)
        assert received == [b"bye"] * 3 + [b"half"]
    finally:
        await net.aclose()
        for writer in writers:
            writer.close()
        server.close()


async def test_a_reset_from_the_outside_resets_the_guests_connection() -> None:
    """The outside resetting the real connection while the guest waits to read gives
    the guest ``ECONNRESET``, and the host's end is closed."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        real = writer.get_extra_info("socket")
        real.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with a zero linger: a reset

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    net = Network()
    guest = net.join("g", outbound=[f"127.0.0.1:{port}"])
    sock = guest.socket(STREAM)
    assert isinstance(sock, StreamSocket)
    try:
        with pytest.raises(WouldBlock):
            sock.connect(HOST_ADDR, port)
        await until(lambda: not sock.dialing, LIMIT)
        sock.connect(HOST_ADDR, port)  # made
        assert sock.send(b"hello") == 5
        await until(lambda: bool(sock.poll() & POLLERR), LIMIT)
        with pytest.raises(NetError) as failed:
            sock.recv(10)
        assert failed.value.errno == errno.ECONNRESET
        await until(lambda: not real_connections(port), LIMIT)
        sock.close()
    finally:
        await net.aclose()
        server.close()


async def test_a_restored_snapshot_reaches_only_what_its_restorer_allows() -> None:
    """A snapshot is data: the outside addresses its saved config allows are not the
    restored copy's (a crafted snapshot would reach them); the caller names them."""
    image = HERE.parent / "guests" / "c" / "tcp_echo_server.elf"
    allowed = ["192.0.2.9:5432"]
    config = GuestConfig(
        image=image, name="saved", cmdline="7 1", memory="4M", net=True, allow_outbound=allowed
    )
    async with Supervisor() as sup:
        original = await sup.launch(config)
        await original.expect("listening on 7", LIMIT)
        snap = await asyncio.wait_for(original.snapshot(), LIMIT)
        assert snap is not None
        copy = await sup.restore(snap, name="copy")
        assert copy.config.allow_outbound == []
        again = await sup.restore(snap, name="again", net=True, allow_outbound=["192.0.2.7:80"])
        assert again.config.allow_outbound == ["192.0.2.7:80"]
        # A cluster's worker restores a moved guest with the fields its config names.
        cluster = pytest.importorskip("supervisor.cluster")
        fields = {**cluster.revive_fields(config), "name": "moved"}
        moved = await sup.restore(snap, **fields)
        assert moved.config.allow_outbound == allowed
        for guest in (original, copy, again, moved):
            await guest.kill("done")


async def test_bytes_still_going_out_after_a_close_count_against_max_sockets() -> None:
    """A closed connection to the outside whose bytes have not all gone out still holds
    a host socket: it counts against the guest's ``max_sockets`` until they have, so
    that an outside that never reads cannot make a guest hold host sockets without
    bound."""
    received: list[bytes] = []
    read = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read.wait()  # reads nothing until told
        received.append(await reader.read())
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    net = Network()
    guest = net.join("g", max_sockets=1, outbound=[f"127.0.0.1:{port}"])
    try:
        sock = guest.socket(STREAM)
        assert isinstance(sock, StreamSocket)
        with pytest.raises(WouldBlock):
            sock.connect(HOST_ADDR, port)
        await until(lambda: not sock.dialing, LIMIT)
        sock.connect(HOST_ADDR, port)
        assert sock.send(b"last words") == 10
        sock.close()
        with pytest.raises(NetError) as refused:
            guest.socket(STREAM)  # the closed one's bytes are still on their way
        assert refused.value.errno == errno.EMFILE
        read.set()
        await until(lambda: received == [b"last words"], LIMIT)
        await until(lambda: guest.lingering == 0, LIMIT)
        guest.socket(STREAM).close()  # gone out: its place is free again
    finally:
        await net.aclose()
        server.close()
