"""The guests' network: TCP and UDP between guests and with the host, names, poll and
select, errors, limits, a killed peer and hostile requests.

Guests are tests/c/netprobe.c (one mode per run, chosen on its command line) and the
echo examples in guests/c/.  Needs the ``sdk`` extra (Zig's C compiler).
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from refused import refused_here
from slotrequests import Requests, slot_at_1m

from supervisor import Exit, Guest, GuestConfig, Supervisor
from supervisor import net as netmod
from supervisor.launcher import files, sockets
from supervisor.memory import GuestMemory
from supervisor.pytest_plugin import BuildGuest
from supervisor.testing import until

HERE = Path(__file__).resolve().parent
GUESTS = HERE.parent / "guests" / "c"
LIMIT = 60  # seconds: a bound for failing, never a wait for success


@pytest.fixture
def probe(build_guest: BuildGuest) -> Path:
    return build_guest((HERE / "c" / "netprobe.c").read_text(), flags=("-O2",))


async def launch(sup: Supervisor, image: Path, name: str, cmdline: str, **extra: object) -> Guest:
    config = GuestConfig(image=image, name=name, cmdline=cmdline, memory="4M", net=True)
    return await sup.launch(config.model_copy(update=extra) if extra else config)


async def output(guest: Guest) -> tuple[list[str], Exit]:
    async with asyncio.timeout(LIMIT):
        lines = [line async for line in guest.console]
        return lines, await guest.wait()


async def test_guest_to_guest_echo_by_name_and_from_the_host() -> None:
    async with Supervisor() as sup:
        server = await launch(sup, GUESTS / "tcp_echo_server.elf", "echo", "7 2")
        await server.expect("listening on 7", LIMIT)
        client = await launch(sup, GUESTS / "tcp_echo_client.elf", "cli", "echo 7 hello there")
        assert await output(client) == (["hello there"], Exit(0, "power off"))
        reader, writer = await sup.net.open_connection("echo", 7)
        assert writer.get_extra_info("peername") == ("10.0.0.2", 7)
        writer.write(b"x" * 300_000)  # more than a connection buffers: drain waits for the guest
        await writer.drain()
        writer.write_eof()
        assert await reader.read() == b"x" * 300_000
        writer.close()
        assert (await output(server))[1] == Exit(0, "power off")


async def test_hold_clients_keep_their_connections_until_the_host_hangs_up() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readline() == b"hi\n"
        writer.write(b"ok then\n")
        writers.append(writer)
        assert await reader.read() == b""  # the guest sends nothing more, nor ends

    async with Supervisor() as sup:
        await sup.net.start_server(serve, 7000)
        image = GUESTS / "tcp_hold_client.elf"
        guests = [
            await launch(sup, image, f"h{i}", "host 7000 hi", memory=1 << 20) for i in range(3)
        ]
        await until(lambda: len(writers) == 3, LIMIT)
        await asyncio.sleep(0.2)
        assert not any(g.done for g in guests)  # all three connections held at once
        for writer in writers:
            writer.close()
        for guest in guests:
            assert await output(guest) == (["ok then"], Exit(0, "power off"))


async def test_names_resolve_in_every_guest_and_host_is_the_host(probe: Path) -> None:
    async with Supervisor() as sup:
        await launch(sup, GUESTS / "tcp_echo_server.elf", "alpha", "7 1")
        guest = await launch(sup, probe, "beta", "names alpha beta host localhost nobody")
        lines, end = await output(guest)
        assert lines == [
            "alpha 10.0.0.2 same",
            "beta 10.0.0.3 same",
            "host 10.0.0.1 same",
            "localhost 127.0.0.1 same",
            "nobody none EAI_NONAME",  # the network's name server: no such name
        ]
        assert end.ok
        assert [m.name for m in sup.net.members] == ["host", "alpha"]  # beta has left


async def test_a_guest_without_net_has_no_sockets(probe: Path) -> None:
    async with Supervisor() as sup:
        config = GuestConfig(image=probe, cmdline="sockets", memory="4M")
        lines, end = await output(await sup.launch(config))
        assert lines == ["sockets 0 EAFNOSUPPORT", "file ENOENT"]  # nor a hosts file
        assert end.ok
        assert sup.net.members == [sup.net.host]


async def test_guest_calls_a_host_server_with_asyncio_streams(probe: Path) -> None:
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readline())
        writer.write(b"HELLO BACK\n")
        await writer.drain()
        writer.close()

    async with Supervisor() as sup:
        server = await sup.net.start_server(serve, 8080)
        assert server.sockets == [("10.0.0.1", 8080)]
        with pytest.raises(OSError, match="EADDRINUSE"):
            await sup.net.start_server(serve, 8080)
        client = await launch(sup, GUESTS / "tcp_echo_client.elf", "c1", "host 8080 hi host")
        assert await output(client) == (["HELLO BACK"], Exit(0, "power off"))
        assert seen == [b"hi host\n"]
        guest = await launch(sup, probe, "c2", "names-of host 8080")
        lines, _ = await output(guest)
        assert lines[:3] == ["connect OK", "me 10.0.0.3 peer 10.0.0.1:8080", "dup-write 4"]
        assert seen[-1] == b"dup\n"
        server.close()
        await server.wait_closed()
        assert server.sockets == []
        with pytest.raises(ConnectionRefusedError):
            await sup.net.open_connection("host", 1)


async def test_refusals_get_linux_errors_and_nothing_leaves_the_network(probe: Path) -> None:
    async with Supervisor() as sup:
        outside = "8.8.8.8 127.0.0.1 10.0.0.1 10.0.200.7 192.168.1.1 10.1.0.1"
        guest = await launch(sup, probe, "p", f"errors host 9 {outside}")
        lines, end = await output(guest)
    assert lines == [
        "connect ECONNREFUSED",
        "send EPIPE",
        "rebind EADDRINUSE",
        "recv-unconnected ENOTCONN",
        "peername ENOTCONN",
        "badfd EBADF",
        "notsock ENOTSOCK",
        "connect ENETUNREACH",  # a real address: never reached
        "connect ECONNREFUSED",  # its own loopback: nothing listens on 80
        "connect ECONNREFUSED",  # the host: nothing listens on 80
        "connect EHOSTUNREACH",  # inside the network, nobody there
        "connect ENETUNREACH",
        "connect ENETUNREACH",
    ]
    assert end.ok


async def test_nonblocking_connect_accept_and_backpressure_in_bytes(probe: Path) -> None:
    async with Supervisor() as sup:
        lines, end = await output(await launch(sup, probe, "nb", "nonblock host 9"))
    assert lines == [
        "accept-empty EAGAIN",
        "connect EINPROGRESS",
        "poll 2 out=1 in=1",
        "so_error OK",
        "accepted 1 nonblock=1",
        "recv-empty EAGAIN",
        f"full {netmod.DEFAULT_STREAM_BUFFER} EAGAIN",  # exactly one buffer, then it waits
        "drained 1000 then-send 1000",
        "connect-refused EINPROGRESS",
        "refused-so_error ECONNREFUSED err=1",
    ]
    assert end.ok


async def test_select_and_poll_wait_on_console_and_sockets_together(probe: Path) -> None:
    async with Supervisor() as sup:
        guest = await launch(sup, probe, "sel", "select")
        await guest.expect("ready select", LIMIT)
        guest.send("typed\n")
        await guest.expect("stdin typed", LIMIT)
        reader, writer = await sup.net.open_connection("sel", 7000)
        writer.write(b"12345")
        writer.write_eof()
        lines, end = await output(guest)
        assert reader.at_eof() or await reader.read() == b""
    assert lines == [
        "",  # the end of the line "stdin typed" that expect() consumed
        "select 1 stdin=0 listener=1",
        "client 5",
        "timeout 0",
        "poll-timeout 0",
    ]
    assert end.ok


async def test_a_killed_guests_peers_see_reset_or_end_of_file(probe: Path) -> None:
    async with Supervisor() as sup:
        holder = await launch(sup, probe, "holder", "serve-hold 4000")
        await holder.expect("ready hold", LIMIT)
        client = await launch(sup, probe, "client", "client-wait holder 4000")
        await client.expect("ready client", LIMIT)
        await holder.expect("accepted 1", LIMIT)
        await holder.kill()  # it never read the client's byte: the client sees a reset
        lines, _ = await output(client)
        assert lines == ["", "recv -1 ECONNRESET", "send-after EPIPE"]

        holder = await launch(sup, probe, "holder2", "serve-hold 4001")
        await holder.expect("ready hold", LIMIT)
        reader, writer = await sup.net.open_connection("holder2", 4001)
        await holder.expect("accepted 1", LIMIT)
        await holder.kill()  # nothing unread: the host sees end of file
        assert await reader.read() == b""
        writer.close()


async def test_host_writes_wait_for_a_guest_that_does_not_read(probe: Path) -> None:
    async with Supervisor() as sup:
        holder = await launch(sup, probe, "slow", "serve-hold 4002")
        await holder.expect("ready hold", LIMIT)
        _reader, writer = await sup.net.open_connection("slow", 4002)
        writer.write(b"y" * (1 << 20))
        drain = asyncio.ensure_future(writer.drain())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not drain.done()  # the guest reads nothing: the writer waits
        held = writer.transport.get_write_buffer_size()
        assert held == (1 << 20) - netmod.DEFAULT_STREAM_BUFFER  # the rest is in the connection
        await holder.kill()
        drain.cancel()
        writer.close()


async def test_udp_between_host_and_guests_keeps_boundaries(probe: Path) -> None:
    async with Supervisor() as sup:
        echo = await launch(sup, probe, "uecho", "udp-echo 5353 5")
        await echo.expect("ready udp", LIMIT)
        client = await launch(sup, probe, "ucli", "udp-client uecho 5353 1 1000 60000")
        lines, end = await output(client)
        assert lines == [
            "reply 1",
            "reply 1000",
            "reply 60000",
            "truncated 10",
            "sendmsg 5",
            "recvmsg 5 ab|cde from 10.0.0.2 flags 0",  # one datagram, scattered
        ]
        assert end.ok
        assert (await output(echo))[0][1:] == [
            "datagram 1 from 10.0.0.3",
            "datagram 1000 from 10.0.0.3",
            "datagram 60000 from 10.0.0.3",
            "datagram 10 from 10.0.0.3",
            "datagram 5 from 10.0.0.3",
        ]
        endpoint = await sup.net.open_datagram(6000)
        assert endpoint.address == ("10.0.0.1", 6000)
        endpoint.send(b"lost", ("host", 5353))  # nobody is bound there: lost, as UDP's are
        other = await sup.net.open_datagram()
        for i in range(300):  # 300 KiB into a 256 KiB queue: the excess is dropped
            other.send(bytes([i % 256]) * 1024, ("host", 6000))
        assert endpoint.dropped == 300 - netmod.DEFAULT_DATAGRAM_QUEUE // 1024
        data, sender = await endpoint.recv()
        assert (data, sender) == (bytes(1024), other.address)
        endpoint.close()
        other.close()


async def test_max_sockets_gives_emfile(probe: Path) -> None:
    async with Supervisor() as sup:
        guest = await launch(sup, probe, "many", "sockets", max_sockets=10)
        lines, end = await output(guest)
    assert lines == ["sockets 10 EMFILE", "file OK"]
    assert end.ok


def test_max_sockets_is_validated() -> None:
    from supervisor.config import ConfigError

    with pytest.raises(ConfigError, match="max_sockets"):
        GuestConfig(image=GUESTS / "hello.elf", max_sockets=0)


async def test_two_guests_cannot_share_a_name(probe: Path) -> None:
    async with Supervisor() as sup:
        await launch(sup, GUESTS / "tcp_echo_server.elf", "same", "7 1")
        with pytest.raises(ValueError, match="already on the network"):
            await launch(sup, probe, "same", "names same")


def test_only_host_names_enter_the_hosts_file() -> None:
    network = netmod.Network()
    good = network.join("good-name.1")
    bad = network.join("bad name\n10.9.9.9 evil")
    assert network.hosts_file(good) == (
        b"127.0.0.1\tlocalhost\n10.0.0.1\thost\n10.0.0.2\tgood-name.1\n"
    )
    assert network.hosts_file(bad) == b"127.0.0.1\tlocalhost\n10.0.0.1\thost\n"
    assert network.lookup("good-name.1") == 0x0A000002
    assert network.lookup("bad name\n10.9.9.9 evil") is None


def test_the_hosts_file_and_a_lookup_do_not_grow_with_the_network() -> None:
    """Joining copies no table: the hosts file a member opens holds three names
    whatever the network's size, and a name is answered by one look-up."""
    network = netmod.Network()
    first = network.join("m-0")
    sizes = []
    joined = 1
    for total in (10, 100, 1000):
        for i in range(joined, total):
            network.join(f"m-{i}")
        joined = total
        newest = network.join(f"new-{total}")
        sizes.append((network.hosts_file(first), len(network.hosts_file(newest).splitlines())))
        assert network.lookup(f"m-{total - 1}") == network.resolve(f"m-{total - 1}")
    assert sizes == [(b"127.0.0.1\tlocalhost\n10.0.0.1\thost\n10.0.0.2\tm-0\n", 3)] * 3


def _query(name: bytes, qtype: int = 1, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(part)]) + part for part in name.split(b"."))
    header = ident.to_bytes(2, "big") + b"\x01\x00\x00\x01" + bytes(6)
    return header + labels + b"\x00" + qtype.to_bytes(2, "big") + b"\x00\x01"


def test_the_name_server_answers_members_and_refuses_the_rest() -> None:
    names = {"alpha": 0x0A000002, "a.b": 0x0A000003}
    reply = netmod.dns_reply(_query(b"alpha"), names.get)
    assert reply is not None
    # id, a response (authoritative, recursion desired and available), NOERROR, 1 answer
    assert reply[:12] == bytes.fromhex("1234 8580 0001 0001 0000 0000")
    assert reply[12:-16] == _query(b"alpha")[12:]  # the question, as asked
    assert reply[-16:] == bytes.fromhex("c00c 0001 0001 00000000 0004 0a000002")
    dotted = netmod.dns_reply(_query(b"a.b"), names.get)
    assert dotted is not None and dotted[-4:] == bytes([10, 0, 0, 3])
    aaaa = netmod.dns_reply(_query(b"alpha", qtype=28), names.get)
    assert aaaa is not None and aaaa[2:8] == bytes.fromhex("8580 0001 0000")  # no record
    nobody = netmod.dns_reply(_query(b"nobody"), names.get)
    assert nobody is not None and nobody[2:8] == bytes.fromhex("8583 0001 0000")  # NXDOMAIN
    formerr = bytes.fromhex("8181 0000 0000")
    truncated = _query(b"alpha")[:-3]
    pointer = _query(b"alpha")[:12] + b"\xc0\x0c\x00\x01\x00\x01"
    two = _query(b"alpha")[:5] + b"\x02" + _query(b"alpha")[6:]
    for bad in (truncated, pointer, two):
        answer = netmod.dns_reply(bad, names.get)
        assert answer is not None and answer[2:8] == formerr and len(answer) == 12
    assert netmod.dns_reply(reply, names.get) is None  # a response is not answered
    assert netmod.dns_reply(b"\x00" * 11, names.get) is None


async def test_the_name_server_answers_across_faults() -> None:
    network = netmod.Network()
    a = network.join("a")
    network.join("b")
    network.partition(["a"], ["host", "b"])
    network.link("a", "host", loss=1.0)
    sock = a.socket(netmod.DGRAM)
    assert isinstance(sock, netmod.DatagramSocket)
    sock.sendto(_query(b"b"), (netmod.HOST_ADDR, netmod.DNS_PORT))
    await until(lambda: bool(sock.poll() & netmod.POLLIN), LIMIT)
    data, sender = sock.recvfrom()
    assert sender == (netmod.HOST_ADDR, netmod.DNS_PORT)
    assert data[-4:] == bytes([10, 0, 0, 3])


async def test_hostile_socket_requests_kill_or_fail_never_the_host() -> None:
    memory = GuestMemory((1 << 20) + 4096)
    network = netmod.Network()
    dev = files.FilesDevice(net=network.join("evil"))
    await dev.start()
    try:
        slot = slot_at_1m(memory)
        dev.attach(slot)
        request = Requests(dev, slot)

        fd = await request(sockets.OP_SOCKET, 0, 2, 1, 0)
        assert fd == 3
        assert await request(sockets.OP_SOCKET, 0, 2, 5, 0) == -94  # ESOCKTNOSUPPORT
        assert await request(sockets.OP_SOCKET, 0, 2, 99, 0) == -22  # EINVAL
        assert await request(sockets.OP_SOCKET, 0, 10, 1, 0) == -97  # EAFNOSUPPORT
        assert await request(sockets.OP_BIND, 3, 0xFFFFFF00, 16) == -14  # EFAULT
        assert await request(sockets.OP_CONNECT, 3, 0x1000, 1) == -22  # EINVAL
        assert await request(sockets.OP_SENDTO, 3, 0xFFFFF000, 100) == -14
        assert await request(sockets.OP_POLL, 0, 0xFFFFF000, 1000) == -14
        assert await request(sockets.OP_SETSOCKOPT, 3, 99, 1, 0x1000, 4) == -92  # ENOPROTOOPT
        assert await request(sockets.OP_GETSOCKOPT, 3, 99, 1, 0x1000, 0x1004) == -92
        assert await request(sockets.OP_ACCEPT, 7, 0, 0, 0) == -9  # EBADF
        for op, args, why in [
            (sockets.OP_SENDTO, (0x2000, files.MAX_IO + 1), "transfer of"),
            (sockets.OP_RECVFROM, (0x2000, files.MAX_IO + 1), "transfer of"),
            (sockets.OP_POLL, (0x2000, sockets.MAX_POLL + 1), "poll of"),
            (40, (), "unknown file request 40"),
        ]:
            with pytest.raises(files.FileRequestError, match=why):
                await request(op, 3, *args)
    finally:
        await dev.stop()
        memory.close()
    assert network.members == [network.host]  # the guest's place is given back


async def test_a_snapshot_keeps_sockets_only_as_stale_descriptors() -> None:
    memory = GuestMemory((1 << 20) + 4096)
    network = netmod.Network()
    dev = files.FilesDevice(net=network.join("saved"))
    again = files.FilesDevice(net=network.join("restored"))
    try:
        slot = slot_at_1m(memory)
        dev.attach(slot)
        slot.set(files.FS_OP, sockets.OP_SOCKET)
        for i, value in enumerate([2, 1, 0]):
            slot.set(files.FS_A0 + 4 * i, value)
        await dev.notify(slot)
        assert slot.get(files.FS_RESULT) == 3
        state = dev.state()
        again.attach(slot)
        again.restore(state)
        for op, want in [(sockets.OP_LISTEN, -116), (files.OP_READ, -116), (files.OP_CLOSE, 0)]:
            slot.set(files.FS_OP, op)
            slot.set(files.FS_FD, 3)
            slot.set(files.FS_A0, 0x1000)
            slot.set(files.FS_A0 + 4, 1)
            await again.notify(slot)
            assert slot.get(files.FS_RESULT) == want & 0xFFFFFFFF  # ESTALE, then closed
    finally:
        await dev.stop()
        await again.stop()
        memory.close()


async def test_a_hostile_guest_is_killed_with_a_reason(build_guest: BuildGuest) -> None:
    source = """
#include <lguest.h>
#include <stdint.h>
int main(void)
{
    volatile uint32_t *d = (volatile uint32_t *)lguest_find_device(3, 0);
    d[2] = 33;          /* poll */
    d[4] = 0x1000;      /* pollfds */
    d[5] = 0x7fffffff;  /* a count no runtime sends */
    lguest_notify((const void *)d);
    return 0;
}
"""
    image = build_guest(source)
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=image, memory="4M", net=True))
        async with asyncio.timeout(LIMIT):
            end = await guest.wait()
        assert end.died
        assert re.search(r"FilesDevice failed: poll of \d+ descriptors", end.reason)
        server = await sup.net.start_server(lambda r, w: None, 80)  # the host still serves
        server.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )


def test_cli_net_joins_the_network_and_max_sockets_is_checked() -> None:
    client = str(GUESTS / "tcp_echo_client.elf")
    joined = _cli("run", client, "--net", "--cmdline", "host 80 hi")
    assert (joined.returncode, joined.stderr) == (1, "connect: Connection refused\n")
    alone = _cli("run", client, "--cmdline", "host 80 hi")
    assert alone.returncode == 1
    assert alone.stderr.startswith("host: ")  # no network: not even a name to resolve
    bad = _cli("run", client, "--net", "--max-sockets", "0")
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [
        "supervisor: error: argument --max-sockets: must be from 1 to 65536 (see --help)"
    ]


def _doc_programs() -> list[str]:
    text = (HERE.parent / "docs" / "network.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("program", _doc_programs())
def test_the_docs_python_blocks_run(program: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", program],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hello" in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_publish_forwards_a_real_port_to_the_guest() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", str(GUESTS / "tcp_echo_server.elf"),
         "--net", "--cmdline", "7 1", "--publish", f"127.0.0.1:{port}:7"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "listening on 7\n"
        with socket.create_connection(("127.0.0.1", port), timeout=LIMIT) as conn:
            conn.sendall(b"through the host\n")
            conn.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := conn.recv(4096):
                got += chunk
        assert got == b"through the host\n"
        assert proc.wait(timeout=LIMIT) == 0  # the server served its one connection
    finally:
        proc.kill()
        proc.wait()


def test_a_taken_published_port_is_one_line_and_status_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _cli("run", str(GUESTS / "tcp_echo_server.elf"), "--net", "--publish", f"{port}:7")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"supervisor: error: --publish {port}:7: ")
    assert "address already in use" in lines[0]
    for args, why in [
        (["--publish", "80:7"], "--publish needs --net"),
        (["--net", "--publish", "x:7"], "not [HOSTADDR:]HOSTPORT:GUESTPORT"),
    ]:
        proc = refused_here("run", str(GUESTS / "tcp_echo_server.elf"), *args)
        assert proc.returncode == 2
        assert why in proc.stderr


def test_publish_is_an_option_of_run_only() -> None:
    """swarm and snapshot run guests that no one real port can stand for: they have no
    --publish, in their --help or their parsing."""
    image = str(GUESTS / "tcp_echo_server.elf")
    snapshot = ["snapshot", image, "-o", "x.snap", "--after", "1"]
    for command in (["swarm", "-n", "2", image], snapshot):
        helped = refused_here(command[0], "--help")
        assert helped.returncode == 0 and "--net" in helped.stdout
        assert "--publish" not in helped.stdout
        proc = refused_here(*command, "--net", "--publish", "8080:7")
        assert proc.returncode == 2
        assert proc.stderr.splitlines() == [
            "supervisor: error: unrecognized arguments: --publish 8080:7 (see --help)"
        ]
    assert "--publish" in refused_here("run", "--help").stdout


async def test_the_key_value_store_answers_each_request_line() -> None:
    async with Supervisor() as sup:
        store = await launch(sup, GUESTS / "kv_server.elf", "kv", "6379")
        await store.expect("listening on 6379", LIMIT)
        reader, writer = await sup.net.open_connection("kv", 6379)
        requests = ["SET a 1", "SET b two words", "SET a 3", "GET a", "GET b", "GET c",
                    "DUMP", "SET lonely", "BOGUS", "SET " + "k" * 64 + " v"]  # fmt: skip
        writer.write("".join(f"{r}\n" for r in requests).encode())  # one piece: lines split
        await writer.drain()
        async with asyncio.timeout(LIMIT):
            answers = [(await reader.readline()).decode().rstrip("\n") for _ in requests]
        assert answers == ["OK", "OK", "OK", "VALUE 3", "VALUE two words", "MISSING",
                           "a=3 b=two words", "ERROR unknown request",
                           "ERROR unknown request", "ERROR too long"]  # fmt: skip
        writer.close()


async def test_a_partition_holds_data_in_flight_until_heal(probe: Path) -> None:
    async with Supervisor() as sup:
        guest = await launch(sup, probe, "island", "partition 4100")
        await guest.expect("ready partition", LIMIT)
        _reader, writer = await sup.net.open_connection("island", 4100)
        sup.net.partition(["host"], ["island"])
        writer.write(b"held")
        guest.send("now\n")  # the bytes are in flight before the guest looks
        await guest.expect("poll 0\n", LIMIT)
        connecting = asyncio.ensure_future(sup.net.open_connection("island", 4100))
        endpoint = await sup.net.open_datagram()
        endpoint.send(b"lost", ("island", 9))  # a datagram across the cut is lost
        for _ in range(10):
            await asyncio.sleep(0)
        assert not connecting.done()  # no answer across a partition: it waits
        sup.net.heal()
        guest.send("wait\n")
        await guest.expect("poll 1 data held\n", LIMIT)
        _r2, w2 = await asyncio.wait_for(connecting, LIMIT)
        for w in (writer, w2):
            w.close()
        endpoint.close()


async def test_a_hibernated_guest_wakes_when_a_connection_arrives() -> None:
    async with Supervisor() as sup:
        server = await launch(
            sup, GUESTS / "tcp_echo_server.elf", "sleepy", "7 1", hibernate_after=0
        )
        await server.expect("listening on 7", LIMIT)
        await until(lambda: server.stats.hibernations > 0, LIMIT)  # halted in poll: asleep
        reader, writer = await sup.net.open_connection("sleepy", 7)
        writer.write(b"wake up\n")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), LIMIT) == b"wake up\n"
        writer.close()
        assert (await output(server))[1].ok
        assert server.stats.wakes >= 1


async def test_a_guest_waiting_on_a_socket_can_be_snapshotted_and_goes_on() -> None:
    async with Supervisor() as sup:
        server = await launch(sup, GUESTS / "tcp_echo_server.elf", "waiter", "7 1")
        await server.expect("listening on 7", LIMIT)
        snap = await asyncio.wait_for(server.snapshot(), LIMIT)  # halted in poll: no request open
        assert snap is not None
        reader, writer = await sup.net.open_connection("waiter", 7)
        writer.write(b"after the snapshot\n")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), LIMIT) == b"after the snapshot\n"
        writer.close()
        assert (await output(server))[1].ok


def full_listener(net: netmod.Network) -> tuple[netmod.Member, netmod.StreamSocket]:
    """(a client member, a listener of member "server" whose backlog of one is full)."""
    server, client = net.join("server"), net.join("client")
    listener = server.socket(netmod.STREAM)
    assert isinstance(listener, netmod.StreamSocket)
    listener.bind(0, 80)
    listener.listen(1)
    first = client.socket(netmod.STREAM)
    assert isinstance(first, netmod.StreamSocket)
    first.connect(server.ip, 80)  # the backlog's one place
    return client, listener


async def test_connects_closed_while_waiting_for_a_backlog_leave_nothing_behind() -> None:
    """A connect waiting for room in a full backlog that is closed takes itself off the
    listener's waiting list: connecting and closing in a loop grows nothing."""
    net = netmod.Network()
    client, listener = full_listener(net)
    for _ in range(1000):
        sock = client.socket(netmod.STREAM)
        assert isinstance(sock, netmod.StreamSocket)
        with pytest.raises(netmod.WouldBlock):
            sock.connect(listener.owner.ip, 80)
        assert len(listener.waiters) == 1
        sock.close()
        assert not listener.waiters


async def test_a_closing_listener_refuses_the_connects_waiting_for_it() -> None:
    """A non-blocking connect waiting for room in a backlog, whose listener closes, is
    refused (``POLLERR``, ``SO_ERROR`` ECONNREFUSED), never connected to a backlog that
    nobody will accept from; the listener's member keeps no socket for it."""
    net = netmod.Network()
    client, listener = full_listener(net)
    sock = client.socket(netmod.STREAM)
    assert isinstance(sock, netmod.StreamSocket)
    with pytest.raises(netmod.WouldBlock):
        sock.connect(listener.owner.ip, 80)
    sock.connecting = (listener.owner.ip, 80)  # what the device's non-blocking connect sets
    listener.close()
    assert sock.connecting is None and sock.peer is None
    assert sock.error == errno.ECONNREFUSED
    assert sock.poll() & netmod.POLLERR
    assert not listener.owner.sockets  # the listener and its unaccepted connection: gone
