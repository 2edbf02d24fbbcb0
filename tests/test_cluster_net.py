"""supervisor.cluster's NetBridge, two workers' Networks and the driver's on one loop: a
bridge calls another directly where a worker makes an actor call (and the driver's long
poll carries a worker's calls of the driver), so the mechanism (names, connect, ordered
acknowledged pieces, ends, faults, a lost worker, ``host`` served by the driver, a move)
is tested without Ray.  tests/test_cluster.py runs C guests across two real Ray workers."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import pytest

pytest.importorskip("ray")

from supervisor.cluster import DRIVER, Cluster, ClusterNetwork, NetBridge
from supervisor.net import (
    DATAGRAM_COST,
    DNS_PORT,
    FIRST_GUEST,
    HOST_ADDR,
    DatagramSocket,
    Member,
    NetError,
    Network,
    StreamSocket,
    WouldBlock,
)
from supervisor.testing import until

T = TypeVar("T")
A_IP, B_IP = FIRST_GUEST, FIRST_GUEST + 1
BUFFER = 4096  # a small stream buffer, so that backpressure shows at once


class Pair:
    """Guest ``a`` on worker w0 and guest ``b`` on worker w1, each worker a Network; the
    driver's Network holds ``host`` and both guests as remote members."""

    def __init__(self, stream_buffer: int = BUFFER) -> None:
        places = ("w0", "w1", DRIVER)
        self.nets = {w: Network(stream_buffer=stream_buffer) for w in places}
        self.calls: list[tuple[str, str]] = []
        self.bridges = {w: NetBridge(w, net, self.call) for w, net in self.nets.items()}
        for name, ip, here in (("a", A_IP, "w0"), ("b", B_IP, "w1")):
            self.bridges[here].claim(name, ip)
            for there in places:
                if there != here:
                    self.bridges[there].add(name, ip, here)
        for worker in ("w0", "w1"):
            self.bridges[worker].host_at(DRIVER)
        self.a = self.nets["w0"].join("a")
        self.b = self.nets["w1"].join("b")
        self.driver = self.nets[DRIVER]

    async def call(self, worker: str, method: str, *args: Any) -> Any:
        self.calls.append((worker, method))
        await asyncio.sleep(0)  # a call never answers inside its caller's step
        return await getattr(self.bridges[worker], method)(*args)

    def fault(self, fault: str, *args: Any, **kwargs: Any) -> None:
        for bridge in self.bridges.values():
            bridge.apply(fault, *args, **kwargs)

    async def connected(self, port: int = 7) -> tuple[StreamSocket, StreamSocket]:
        """``a`` connected to ``b``'s listener on ``port``: (a's socket, b's)."""
        listener = self.b.socket("stream")
        assert isinstance(listener, StreamSocket)
        listener.bind(0, port)
        listener.listen(4)
        client = await connect(self.a, B_IP, port)
        server = await retry(self.b, listener.accept)
        return client, server


async def retry(member: Member, call: Callable[[], T]) -> T:
    """``call()`` again each time ``member`` hears news, until it stops blocking."""
    while True:
        news = asyncio.Event()
        member.on_news = news.set
        try:
            return call()
        except WouldBlock:
            await news.wait()


async def connect(member: Member, ip: int, port: int) -> StreamSocket:
    sock = member.socket("stream")
    assert isinstance(sock, StreamSocket)
    await retry(member, lambda: sock.connect(ip, port))
    return sock


async def read_all(member: Member, sock: StreamSocket) -> bytes:
    data = bytearray()
    while chunk := await retry(member, lambda: sock.recv(65536)):
        data += chunk
    return bytes(data)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    p = Pair()
    async with asyncio.timeout(60):
        yield p
    for bridge in p.bridges.values():
        await bridge.aclose()


async def test_names_resolve_on_every_worker(pair: Pair) -> None:
    for net in pair.nets.values():
        assert net.resolve("a") == A_IP and net.resolve("b") == B_IP
        assert net.lookup("a") == A_IP and net.lookup("b") == B_IP  # the name server's answer
    pair.bridges["w0"].drop("b")
    assert pair.nets["w0"].lookup("b") is None


async def test_bytes_cross_in_order_with_ends(pair: Pair) -> None:
    client, server = await pair.connected()
    assert client.remote == (B_IP, 7) and server.remote == client.local
    sent = bytes(range(256)) * 1024  # 64 buffers' worth: many acknowledged pieces
    writer = asyncio.ensure_future(write_all(pair.a, client, sent, shut=True))
    assert await read_all(pair.b, server) == sent  # in order, each byte once, then EOF
    await writer
    await retry(pair.b, lambda: server.send(b"bye"))
    server.close()
    assert await read_all(pair.a, client) == b"bye"
    client.close()
    await until(lambda: not any(b.conns for b in pair.bridges.values()))


async def write_all(member: Member, sock: StreamSocket, data: bytes, *, shut: bool) -> int:
    at = 0
    while at < len(data):
        rest = memoryview(data)[at:]
        at += await retry(member, lambda: sock.send(rest))  # noqa: B023 - awaited here
    if shut:
        sock.shutdown(1)
    return len(data)


async def test_refused_and_unreachable(pair: Pair) -> None:
    sock = pair.a.socket("stream")
    assert isinstance(sock, StreamSocket)
    with pytest.raises(NetError) as refused:
        await retry(pair.a, lambda: sock.connect(B_IP, 9))  # nobody listens there
    assert refused.value.errno == errno.ECONNREFUSED
    assert ("w1", "net_connect") in pair.calls  # answered by b's worker


async def test_a_writer_waits_for_acknowledgements(pair: Pair) -> None:
    client, server = await pair.connected()
    sent = 0

    async def writer() -> None:
        nonlocal sent
        while True:
            sent += await retry(pair.a, lambda: client.send(b"x" * 1000))

    task = asyncio.ensure_future(writer())
    await until(lambda: len(server.rx) == BUFFER)  # the reader's buffer is full
    for _ in range(100):
        await asyncio.sleep(0)
    # The reader's buffer, and the writer's own, whose bytes stay until acknowledged.
    assert sent == 2 * BUFFER and not task.done()
    assert await retry(pair.b, lambda: server.recv(BUFFER)) == b"x" * BUFFER
    await until(lambda: sent > 2 * BUFFER)  # room again once the reader read
    task.cancel()


async def test_a_partition_holds_bytes_until_healed(pair: Pair) -> None:
    client, server = await pair.connected()
    pair.fault("partition", ["a"], ["b"])
    await retry(pair.a, lambda: client.send(b"held"))
    for _ in range(100):
        await asyncio.sleep(0)
    assert client.unacknowledged() and not server.rx  # held by the sender's worker
    late = asyncio.ensure_future(connect(pair.a, B_IP, 7))  # waits across the cut
    for _ in range(100):
        await asyncio.sleep(0)
    assert not late.done() and pair.nets["w0"].stalled
    pair.fault("heal")
    assert await retry(pair.b, lambda: server.recv(10)) == b"held"
    assert (await late).remote == (B_IP, 7)


async def test_a_lost_worker_resets_its_connections(pair: Pair) -> None:
    client, _server = await pair.connected()
    pair.bridges["w0"].lost("w1")
    with pytest.raises(NetError) as reset:
        client.recv(10)
    assert reset.value.errno == errno.ECONNRESET
    with pytest.raises(OSError):
        pair.nets["w0"].resolve("b")
    assert not pair.bridges["w0"].conns


async def test_a_close_with_unread_bytes_resets_the_peer(pair: Pair) -> None:
    client, server = await pair.connected()
    await retry(pair.a, lambda: client.send(b"unread"))
    await until(lambda: bool(server.rx))
    server.close()  # b never read them: a reset, as Linux sends
    with pytest.raises(NetError) as reset:
        await retry(pair.a, lambda: client.recv(10))
    assert reset.value.errno == errno.ECONNRESET


async def test_datagrams_cross_and_a_cut_or_a_full_queue_drops_them(pair: Pair) -> None:
    inbox = pair.b.socket("dgram")
    outbox = pair.a.socket("dgram")
    assert isinstance(inbox, DatagramSocket) and isinstance(outbox, DatagramSocket)
    inbox.bind(0, 53000)
    outbox.sendto(b"one", (B_IP, 53000))
    assert await retry(pair.b, inbox.recvfrom) == (b"one", outbox.local)
    pair.fault("partition", ["a"], ["b"])
    outbox.sendto(b"cut", (B_IP, 53000))
    pair.fault("heal")
    outbox.sendto(b"two", (B_IP, 53000))
    assert await retry(pair.b, inbox.recvfrom) == (b"two", outbox.local)  # "cut" was lost
    # What the sender's worker has on its way is bounded by its datagram queue.
    bridge = pair.bridges["w0"]
    many = pair.nets["w0"].datagram_queue // DATAGRAM_COST
    for _ in range(many + 5):
        outbox.sendto(b"x", (B_IP, 53000))
    assert bridge.datagrams_dropped == 5 and bridge.datagrams_queued <= bridge.net.datagram_queue


async def test_a_link_is_applied_once_by_the_sending_worker(pair: Pair) -> None:
    client, server = await pair.connected()
    pair.fault("link", "a", "b", rate=1e9)  # every worker has the link, both ways
    await retry(pair.a, lambda: client.send(b"a to b"))
    assert await retry(pair.b, lambda: server.recv(10)) == b"a to b"
    await retry(pair.b, lambda: server.send(b"b to a"))
    assert await retry(pair.a, lambda: client.recv(10)) == b"b to a"
    w0, w1 = pair.nets["w0"], pair.nets["w1"]
    used = [
        (net_name, a, b)
        for net_name, net in (("w0", w0), ("w1", w1))
        for a, b in (("a", "b"), ("b", "a"))
        if (link := net.link_of(a, b)) is not None and link.busy_until > 0
    ]
    assert used == [("w0", "a", "b"), ("w1", "b", "a")]


async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A host service: answer one line with it and the caller's address, then close."""
    line = await reader.readline()
    peer = writer.get_extra_info("peername")
    writer.write(line.strip() + f" from {peer[0]}\n".encode())
    await writer.drain()
    writer.close()


async def test_guests_on_two_workers_reach_the_drivers_server(pair: Pair) -> None:
    server = await pair.driver.start_server(echo_once, 8000)
    answers = []
    for member in (pair.a, pair.b):
        sock = await connect(member, HOST_ADDR, 8000)
        assert sock.remote == (HOST_ADDR, 8000)
        await write_all(member, sock, f"hi {member.name}\n".encode(), shut=False)
        answers.append(await read_all(member, sock))
        sock.close()
    assert answers == [b"hi a from 10.0.0.2\n", b"hi b from 10.0.0.3\n"]
    assert server.connections == 2
    assert ("driver", "net_connect") in pair.calls  # host is the driver, from either worker
    with pytest.raises(NetError) as refused:
        await connect(pair.a, HOST_ADDR, 9)  # nothing listens there on the driver
    assert refused.value.errno == errno.ECONNREFUSED
    server.close()
    await until(lambda: not any(b.conns for b in pair.bridges.values()))


async def test_the_driver_connects_to_a_guest_on_a_worker(pair: Pair) -> None:
    listener = pair.b.socket("stream")
    assert isinstance(listener, StreamSocket)
    listener.bind(0, 7)
    listener.listen(4)
    reader, writer = await pair.driver.open_connection("b", 7)
    assert writer.get_extra_info("peername") == ("10.0.0.3", 7)
    served = await retry(pair.b, listener.accept)
    assert served.remote is not None and served.remote[0] == HOST_ADDR
    sent = bytes(range(256)) * 64  # 4 buffers' worth: several acknowledged pieces
    writer.write(sent)
    writer.write_eof()
    assert await read_all(pair.b, served) == sent  # in order, once, then end of file
    await write_all(pair.b, served, b"done", shut=True)
    assert await reader.read() == b"done"
    writer.close()
    served.close()
    with pytest.raises(ConnectionRefusedError):
        await pair.driver.open_connection("b", 9)
    await until(lambda: not any(b.conns for b in pair.bridges.values()))


async def test_a_guest_writing_to_a_driver_that_does_not_read_waits(pair: Pair) -> None:
    ready: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def keep(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await ready.put((reader, writer))

    await pair.driver.start_server(keep, 8000, limit=1024)
    client = await connect(pair.a, HOST_ADDR, 8000)
    reader, writer = await ready.get()
    sent = 0

    async def writer_task() -> None:
        nonlocal sent
        while True:
            sent += await retry(pair.a, lambda: client.send(b"x" * 1000))

    async def stopped() -> int:
        """Once the writer stops (the bytes it sent no longer grow): how many."""
        settled = -1
        while settled != sent:
            settled = sent
            for _ in range(200):
                await asyncio.sleep(0)
        return settled

    task = asyncio.ensure_future(writer_task())
    held = await stopped()
    # Bounded: the reader's buffer (twice its limit), the host's socket, the bytes
    # unacknowledged at a's worker and a's own socket buffer.
    assert 0 < held <= 2 * 1024 + 4 * BUFFER and not task.done()
    assert await reader.readexactly(held) == b"x" * held
    await until(lambda: sent > held)  # room again once the driver read
    await stopped()
    task.cancel()
    # The driver closes with bytes its socket holds unread: the guest sees a reset.
    writer.close()
    with pytest.raises(NetError) as reset:
        await retry(pair.a, lambda: client.recv(10))
    assert reset.value.errno == errno.ECONNRESET


async def test_datagrams_between_the_driver_and_guests_and_the_name_server_local(
    pair: Pair,
) -> None:
    endpoint = await pair.driver.open_datagram(5000)
    sock = pair.b.socket("dgram")
    assert isinstance(sock, DatagramSocket)
    sock.bind(0, 6000)
    sock.sendto(b"to host", (HOST_ADDR, 5000))
    assert await endpoint.recv() == (b"to host", ("10.0.0.3", 6000))
    endpoint.send(b"to b", ("b", 6000))
    assert await retry(pair.b, sock.recvfrom) == (b"to b", (HOST_ADDR, 5000))
    # The name server at host:53 is b's own worker's, not the driver's.
    calls = len(pair.calls)
    query = b"\x12\x34\x01\x00\x00\x01" + bytes(6) + b"\x01a\x00\x00\x01\x00\x01"
    sock.sendto(query, (HOST_ADDR, DNS_PORT))
    reply, sender = await retry(pair.b, sock.recvfrom)
    assert sender == (HOST_ADDR, DNS_PORT) and reply.endswith(A_IP.to_bytes(4, "big"))
    assert len(pair.calls) == calls
    endpoint.close()


async def test_a_move_resets_the_connections_and_a_failed_move_keeps_them(pair: Pair) -> None:
    listener = pair.b.socket("stream")
    assert isinstance(listener, StreamSocket)
    listener.bind(0, 7)
    listener.listen(4)
    client = await connect(pair.a, B_IP, 7)
    server = await retry(pair.b, listener.accept)
    reader, writer = await pair.driver.open_connection("b", 7)
    from_host = await retry(pair.b, listener.accept)
    # b is placed again where it runs (a failed move): its connections go on.
    for there in ("w0", DRIVER):
        pair.bridges[there].add("b", B_IP, "w1")
    await write_all(pair.a, client, b"still", shut=False)
    assert await retry(pair.b, lambda: server.recv(10)) == b"still"
    writer.write(b"here")
    assert await retry(pair.b, lambda: from_host.recv(10)) == b"here"
    # b moved: its old worker resets every connection after the bytes b sent.
    await write_all(pair.b, server, b"last", shut=False)
    await write_all(pair.b, from_host, b"last", shut=False)
    pair.bridges["w1"].reset("b")
    assert await retry(pair.a, lambda: client.recv(10)) == b"last"
    with pytest.raises(NetError) as reset:
        await retry(pair.a, lambda: client.recv(10))
    assert reset.value.errno == errno.ECONNRESET
    assert await reader.readexactly(4) == b"last"
    with pytest.raises(ConnectionResetError):
        await reader.read()


async def test_a_partition_cuts_guests_off_the_driver_until_healed(pair: Pair) -> None:
    await pair.driver.start_server(echo_once, 8000)
    pair.fault("partition", ["host"], ["a"])
    late = asyncio.ensure_future(connect(pair.a, HOST_ADDR, 8000))
    for _ in range(100):
        await asyncio.sleep(0)
    assert not late.done() and pair.nets["w0"].stalled  # held by a's worker
    pair.fault("heal")
    sock = await late
    await write_all(pair.a, sock, b"healed\n", shut=False)
    assert await read_all(pair.a, sock) == b"healed from 10.0.0.2\n"
    # The cluster's faults name the driver as host, as a Network's do.
    network = ClusterNetwork(cast(Cluster, SimpleNamespace(workers=[])))
    await network.partition(["host"], ["10.0.0.2"])
    await network.heal()
