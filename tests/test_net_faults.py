"""Network faults: link delay, jitter, loss and rate, and TCP timeouts across a partition.

The socket-level tests drive :mod:`supervisor.net` directly on a virtual clock
(:class:`VirtualClock`, through the Network's ``clock``), so they count bytes, order
and errnos at chosen instants of virtual time, never the machine's.  The guest tests
use tests/c/netprobe.c (needs the ``sdk`` extra) with short configured timeouts.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import itertools
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from supervisor import Exit, Guest, GuestConfig, Supervisor
from supervisor import net as netmod
from supervisor.pytest_plugin import BuildGuest
from supervisor.testing import until

HERE = Path(__file__).resolve().parent
LIMIT = 60  # seconds: a bound for failing, never a wait for success


class VirtualTimer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """A :class:`supervisor.net.Clock` whose time moves only by :meth:`advance`."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, VirtualTimer]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> VirtualTimer:
        timer = VirtualTimer(self.now + delay, callback)
        heapq.heappush(self._heap, (timer.when, next(self._order), timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Run every timer due up to ``now + seconds``, in order, at its own time."""
        end = self.now + seconds
        while self._heap and self._heap[0][0] <= end:
            when, _, timer = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            if not timer.cancelled:
                timer.callback()
        self.now = end

    def pending(self) -> int:
        return sum(not t.cancelled for _, _, t in self._heap)


def network(**options: object) -> tuple[netmod.Network, VirtualClock]:
    clock = VirtualClock()
    return netmod.Network(clock=clock, **options), clock  # type: ignore[arg-type]


def connected(
    net: netmod.Network, port: int = 80
) -> tuple[netmod.StreamSocket, netmod.StreamSocket]:
    """(client end on member a, server end on member b) of a new connection."""
    a = net._by_name.get("a") or net.join("a")
    b = net._by_name.get("b") or net.join("b")
    listener = b.socket(netmod.STREAM)
    assert isinstance(listener, netmod.StreamSocket)
    listener.bind(0, port)
    listener.listen(4)
    client = a.socket(netmod.STREAM)
    assert isinstance(client, netmod.StreamSocket)
    client.connect(b.ip, port)
    return client, listener.accept()


def drain(sock: netmod.StreamSocket) -> bytes:
    """Everything readable now."""
    got = bytearray()
    while True:
        try:
            data = sock.recv(1 << 16)
        except netmod.WouldBlock:
            return bytes(got)
        if not data:
            return bytes(got)
        got += data


def raises_errno(call: Callable[[], object]) -> int:
    try:
        call()
    except netmod.NetError as exc:
        return exc.errno
    raise AssertionError("no error")


def test_a_lossy_jittery_link_delays_a_stream_but_keeps_every_byte_in_order() -> None:
    net, clock = network(seed=3)
    client, server = connected(net)
    net.link("a", "b", delay=0.05, jitter=0.04, loss=0.3)
    sent = b"".join(i.to_bytes(4, "big") * 250 for i in range(200))  # 200 KB, numbered
    for at in range(0, len(sent), 1000):
        assert client.send(sent[at : at + 1000]) == 1000
    assert drain(server) == b""  # nothing before the delay
    clock.advance(0.049)
    assert drain(server) == b""
    got = bytearray()
    last_arrival = 0.0
    while len(got) < len(sent) and clock.now < 100:
        clock.advance(0.01)
        more = drain(server)
        if more:
            last_arrival = clock.now
        got += more
        assert sent.startswith(got)  # never lost, never out of order
    assert bytes(got) == sent
    # Segments were lost and resent: the last bytes came after delay + jitter.
    assert last_arrival > 0.05 + 0.04 + netmod.MIN_RTO
    assert clock.pending() == 0


def test_a_rate_bounds_the_bytes_a_link_carries() -> None:
    net, clock = network()
    client, server = connected(net)
    net.link("a", "b", rate=10_000)
    assert client.send(b"r" * 50_000) == 50_000
    clock.advance(1.0)
    first_second = len(drain(server))
    assert 10_000 - netmod.MSS <= first_second <= 10_000
    clock.advance(4.0)
    assert first_second + len(drain(server)) == 50_000
    # The bytes on the way count against the connection's buffer: the writer waits.
    assert client.send(b"s" * (netmod.DEFAULT_STREAM_BUFFER + 1)) == netmod.DEFAULT_STREAM_BUFFER
    with pytest.raises(netmod.WouldBlock):
        client.send(b"t")


def test_an_end_of_stream_comes_after_the_delayed_bytes() -> None:
    net, clock = network()
    client, server = connected(net)
    net.link("a", "b", delay=1.0)
    client.send(b"last words")
    client.close()
    with pytest.raises(netmod.WouldBlock):
        server.recv(10)  # not the end: the bytes before it are on the way
    assert not server.poll() & netmod.POLLIN  # neither data nor the end yet
    clock.advance(1.0)
    assert server.poll() & netmod.POLLIN
    assert drain(server) == b"last words"
    assert server.recv(10) == b""


def lossy_datagrams(seed: int) -> list[int]:
    net, clock = network(seed=seed)
    a, b = net.join("a"), net.join("b")
    sender, receiver = a.socket(netmod.DGRAM), b.socket(netmod.DGRAM)
    assert isinstance(sender, netmod.DatagramSocket)
    assert isinstance(receiver, netmod.DatagramSocket)
    receiver.bind(0, 53)
    net.link("a", "b", delay=0.01, jitter=0.02, loss=0.5)
    for i in range(400):
        sender.sendto(i.to_bytes(2, "big"), (b.ip, 53))
    clock.advance(0.0099)
    assert not receiver.queue  # nothing before the delay
    clock.advance(1.0)
    got = [int.from_bytes(receiver.recvfrom()[0], "big") for _ in range(len(receiver.queue))]
    link = net.link_of("a", "b")
    assert link is not None and link.dropped == 400 - len(got)
    return got


def test_datagrams_are_dropped_and_reordered_reproducibly_from_the_seed() -> None:
    got = lossy_datagrams(seed=11)
    assert 120 < len(got) < 280  # about half of 400 lost
    assert len(set(got)) == len(got)  # never duplicated
    assert got != sorted(got)  # jitter reorders datagrams
    assert lossy_datagrams(seed=11) == got  # the same seed: the same run
    assert lossy_datagrams(seed=12) != got


def test_unlink_and_an_empty_link_restore_the_plain_network() -> None:
    net, clock = network()
    client, server = connected(net)
    net.link("a", "b", delay=5.0)
    client.send(b"slow")
    net.unlink("b", "a")
    client.send(b"fast")
    assert drain(server) == b""  # "fast" waits behind "slow": a stream keeps its order
    clock.advance(5.0)
    assert drain(server) == b"slowfast"
    net.link("a", "b", delay=5.0)
    net.link("a", "b")  # every argument at its default: no link
    assert net.link_of("a", "b") is None
    client.send(b"now")
    assert drain(server) == b"now"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"delay": -1}, "delay must be a number of seconds >= 0"),
        ({"delay": math.inf}, "delay must be"),
        ({"jitter": math.nan}, "jitter must be"),
        ({"delay": True}, "delay must be"),
        ({"loss": 1.5}, "loss must be a probability from 0 to 1"),
        ({"loss": "0.1"}, "loss must be"),
        ({"rate": 0}, "rate must be bytes per second above 0"),
        ({"rate": -5.0}, "rate must be"),
    ],
)
def test_link_arguments_are_validated(options: dict[str, object], message: str) -> None:
    net, _ = network()
    net.join("a")
    net.join("b")
    with pytest.raises(ValueError, match=message):
        net.link("a", "b", **options)  # type: ignore[arg-type]


def test_link_members_and_network_timeouts_are_validated() -> None:
    net, _ = network()
    net.join("a")
    with pytest.raises(ValueError, match="two different members"):
        net.link("a", "a", delay=1)
    with pytest.raises(OSError, match="no 'nobody' on the network"):
        net.link("a", "nobody", delay=1)
    outside_the_network = "outside the network"
    for outside in ("8.8.8.8", "127.0.0.1", "0.0.0.0", "255.255.255.255"):
        with pytest.raises(OSError, match=outside_the_network) as caught:
            net.link("a", outside, delay=1)
        assert caught.value.errno == errno.ENETUNREACH
        with pytest.raises(OSError, match=outside_the_network):
            net.unlink(outside, "a")
        with pytest.raises(OSError, match=outside_the_network):
            net.link_of("a", outside)
        with pytest.raises(OSError, match=outside_the_network):
            net.partition(["a"], [outside])
    with pytest.raises(TypeError, match="a list of names or addresses, not 'alpha'"):
        net.partition("alpha", ["a"])
    with pytest.raises(TypeError, match="not 'a'"):
        net.partition(["alpha"], "a")  # would cut nothing from "a" itself
    assert not net.is_cut(net.resolve("a"), netmod.HOST_ADDR)
    for bad in (0, -1, 1.5, math.nan, True, "4096"):
        with pytest.raises(ValueError, match="stream_buffer must be a whole number"):
            netmod.Network(stream_buffer=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="datagram_queue must be a whole number"):
            netmod.Network(datagram_queue=bad)  # type: ignore[arg-type]
    for bad in (0, -1.0, math.inf, math.nan, "5"):
        with pytest.raises(ValueError, match="stream_timeout must be a number of seconds"):
            netmod.Network(stream_timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="connect_timeout must be"):
            netmod.Network(connect_timeout=bad)  # type: ignore[arg-type]


def test_a_stream_across_a_partition_stalls_then_flows_after_a_heal() -> None:
    net, clock = network(stream_timeout=5.0)
    client, server = connected(net)
    net.partition(["a"], ["b"])
    assert client.send(b"x" * 1000) == 1000
    clock.advance(4.0)
    assert drain(server) == b""  # in flight
    net.heal()
    net.partition(["a"], ["b"])  # a new cut: a new timeout, from now
    clock.advance(4.0)
    assert client.poll() & netmod.POLLERR == 0
    net.heal()
    clock.advance(10.0)
    assert drain(server) == b"x" * 1000
    assert client.send(b"after") == 5
    assert drain(server) == b"after"


def test_a_stream_held_by_a_partition_times_out_with_etimedout() -> None:
    net, clock = network(stream_timeout=5.0)
    client, server = connected(net)
    assert server.send(b"before") == 6  # read by the client before the cut
    assert drain(client) == b"before"
    net.partition(["b"], ["a"])
    sent = 0
    while True:
        try:
            sent += client.send(b"y" * 4096)
        except netmod.WouldBlock:
            break
    assert sent == netmod.DEFAULT_STREAM_BUFFER  # a full buffer, then the writer waits
    clock.advance(4.9)
    assert client.poll() & netmod.POLLERR == 0
    clock.advance(0.2)
    assert client.poll() & (netmod.POLLERR | netmod.POLLHUP) == netmod.POLLERR | netmod.POLLHUP
    assert raises_errno(lambda: client.send(b"z")) == errno.ETIMEDOUT  # told once
    assert raises_errno(lambda: client.send(b"z")) == errno.EPIPE
    assert client.recv(10) == b""
    with pytest.raises(netmod.WouldBlock):
        server.recv(10)  # the cut still hides everything from the other end
    net.heal()
    assert raises_errno(lambda: server.recv(10)) == errno.ECONNRESET  # nothing arrived
    assert server.recv(10) == b""


def test_the_receiving_end_of_a_partition_never_times_out_by_itself() -> None:
    net, clock = network(stream_timeout=5.0)
    client, server = connected(net)
    net.partition(["a"], ["b"])
    clock.advance(100.0)
    with pytest.raises(netmod.WouldBlock):
        server.recv(10)  # nothing sent, nothing unacknowledged: it waits, as Linux does
    net.heal()
    client.send(b"ok")
    assert drain(server) == b"ok"


def test_bytes_on_the_way_when_the_cut_comes_time_out_too() -> None:
    net, clock = network(stream_timeout=5.0)
    client, server = connected(net)
    net.link("a", "b", delay=1.0)
    client.send(b"w" * 100)
    net.partition(["a"], ["b"])
    clock.advance(5.1)
    assert raises_errno(lambda: client.recv(1)) == errno.ETIMEDOUT
    net.heal()
    assert raises_errno(lambda: server.recv(1)) == errno.ECONNRESET


def test_a_hopeless_link_gives_up_as_tcp_retransmissions_do() -> None:
    net, clock = network(seed=1)
    client, server = connected(net)
    client.send(b"arrived")
    net.link("a", "b", loss=1.0)
    client.send(b"never")
    clock.advance(1.0)
    assert raises_errno(lambda: client.send(b"more")) == errno.ETIMEDOUT
    assert server.recv(100) == b"arrived"  # what had arrived stays readable
    assert raises_errno(lambda: server.recv(10)) == errno.ECONNRESET


def test_a_connect_across_a_partition_times_out_unless_healed() -> None:
    net, clock = network(connect_timeout=3.0)
    a, b = net.join("a"), net.join("b")
    listener = b.socket(netmod.STREAM)
    assert isinstance(listener, netmod.StreamSocket)
    listener.bind(0, 80)
    listener.listen(4)
    net.partition(["a"], ["b"])
    first, second = a.socket(netmod.STREAM), a.socket(netmod.STREAM)
    assert isinstance(first, netmod.StreamSocket) and isinstance(second, netmod.StreamSocket)
    with pytest.raises(netmod.WouldBlock):
        first.connect(b.ip, 80)
    clock.advance(2.9)
    with pytest.raises(netmod.WouldBlock):
        first.connect(b.ip, 80)  # asking again does not restart the clock
    clock.advance(0.2)
    assert raises_errno(lambda: first.connect(b.ip, 80)) == errno.ETIMEDOUT
    with pytest.raises(netmod.WouldBlock):
        second.connect(b.ip, 80)
    net.heal()
    clock.advance(10.0)
    second.connect(b.ip, 80)
    assert listener.accept().remote == second.local


def test_a_connect_waiting_for_room_in_a_full_backlog_times_out() -> None:
    net, clock = network(connect_timeout=3.0, stream_timeout=5.0)
    a, b = net.join("a"), net.join("b")
    listener = b.socket(netmod.STREAM)
    assert isinstance(listener, netmod.StreamSocket)
    listener.bind(0, 80)
    listener.listen(1)
    filler, late, served = (a.socket(netmod.STREAM) for _ in range(3))
    assert isinstance(filler, netmod.StreamSocket) and isinstance(late, netmod.StreamSocket)
    assert isinstance(served, netmod.StreamSocket)
    filler.connect(b.ip, 80)  # the backlog of one is full
    woken: list[str] = []
    late.on_change = lambda: woken.append("late")
    with pytest.raises(netmod.WouldBlock):
        late.connect(b.ip, 80)
    net.partition(["a"], ["host"])  # a cut met or healed meanwhile changes nothing
    net.heal()
    clock.advance(2.9)
    with pytest.raises(netmod.WouldBlock):
        late.connect(b.ip, 80)  # asking again does not restart the clock
    assert woken == []
    clock.advance(0.2)
    assert woken == ["late"]  # a blocked connect hears its outcome
    assert raises_errno(lambda: late.connect(b.ip, 80)) == errno.ETIMEDOUT
    assert late not in listener.waiters

    with pytest.raises(netmod.WouldBlock):
        served.connect(b.ip, 80)
    clock.advance(1.0)
    assert listener.accept().remote == filler.local  # room: the waiting connect is made
    served.connect(b.ip, 80)  # its connect timeout ends with the wait
    net.partition(["a"], ["b"])
    served.send(b"held")
    clock.advance(5.1)  # a cut's timeout of its bytes runs as on any connection
    assert raises_errno(lambda: served.send(b"more")) == errno.ETIMEDOUT
    assert clock.pending() == 0


async def test_the_hosts_connect_to_a_full_backlog_times_out() -> None:
    net, clock = network(connect_timeout=3.0)
    a, b = net.join("a"), net.join("b")
    listener = b.socket(netmod.STREAM)
    assert isinstance(listener, netmod.StreamSocket)
    listener.bind(0, 80)
    listener.listen(1)
    filler = a.socket(netmod.STREAM)
    assert isinstance(filler, netmod.StreamSocket)
    filler.connect(b.ip, 80)  # the backlog of one is full
    connecting = asyncio.ensure_future(net.open_connection("b", 80))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not connecting.done()
    clock.advance(3.1)
    for _ in range(10):
        await asyncio.sleep(0)
    assert connecting.done()
    failed = connecting.exception()
    assert isinstance(failed, TimeoutError) and failed.errno == errno.ETIMEDOUT


@pytest.fixture
def probe(build_guest: BuildGuest) -> Path:
    return build_guest((HERE / "c" / "netprobe.c").read_text(), flags=("-O2",))


async def lines_of(guest: Guest) -> tuple[list[str], Exit]:
    async with asyncio.timeout(LIMIT):
        lines = [line async for line in guest.console]
        return lines, await guest.wait()


async def test_a_guest_and_the_host_get_etimedout_across_a_partition(probe: Path) -> None:
    """The timeouts run on a virtual clock that the test moves once the guest or the
    host waits across the cut: a full buffer, then the timeout, whatever the pace of
    the guest's sends on a loaded machine."""
    net, clock = network()
    async with Supervisor(network=net) as sup:
        accepted: list[asyncio.StreamReader] = []
        server = await sup.net.start_server(lambda r, w: accepted.append(r), 9000)
        guest = await sup.launch(
            GuestConfig(image=probe, name="g", cmdline="stall host 9000", memory="4M", net=True)
        )
        await guest.expect("ready stall", LIMIT)
        (sock,) = streams_of(net, "g")
        sup.net.partition(["g"], ["host"])
        guest.send("go\n")
        await until(lambda: sock.room() == 0, LIMIT)  # its buffer is full: the send waits
        assert sock.unacknowledged() and clock.pending() == 1
        clock.advance(net.stream_timeout)
        await until(lambda: len(net.stalled) == 1, LIMIT)  # its connect waits across the cut
        clock.advance(net.connect_timeout)
        lines, end = await lines_of(guest)
        assert lines == [
            "",  # the rest of the "ready stall" line
            f"sent {netmod.DEFAULT_STREAM_BUFFER} ETIMEDOUT",  # a full buffer, then the timeout
            "again EPIPE",
            "connect ETIMEDOUT",  # across the cut nothing answers
        ]
        assert end.ok
        sup.net.heal()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(accepted[0].read(), LIMIT)  # none of it arrived
        server.close()

        # The host's side: a connect and a writer across the cut time out too.
        echo = await sup.launch(
            GuestConfig(image=probe, name="e", cmdline="serve-hold 7", memory="4M", net=True)
        )
        await echo.expect("ready hold", LIMIT)
        reader, writer = await sup.net.open_connection("e", 7)
        sup.net.partition(["host"], ["e"])
        connecting = asyncio.ensure_future(sup.net.open_connection("e", 7))
        await until(lambda: len(net.stalled) == 1, LIMIT)
        clock.advance(net.connect_timeout)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(connecting, LIMIT)
        writer.write(b"q" * 1000)
        await until(lambda: clock.pending() == 1, LIMIT)  # the host's bytes are held
        clock.advance(net.stream_timeout)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(), LIMIT)
        sup.net.heal()
        await echo.kill()


def streams_of(net: netmod.Network, name: str) -> list[netmod.StreamSocket]:
    """The connected stream sockets of the member ``name``."""
    (member,) = [m for m in net.members if m.name == name]
    return [s for s in member.sockets if isinstance(s, netmod.StreamSocket) and s.peer]


async def test_a_restored_copy_finds_its_sockets_stale_and_the_original_keeps_them(
    probe: Path,
) -> None:
    async with Supervisor() as sup:
        config = GuestConfig(image=probe, name="orig", cmdline="snap 7100", memory="4M", net=True)
        original = await sup.launch(config)
        await original.expect("ready snap\n", LIMIT)
        reader, writer = await sup.net.open_connection("orig", 7100)
        await original.expect("accepted 1\n", LIMIT)
        snap = await asyncio.wait_for(original.snapshot(), LIMIT)  # a listener, a connection
        copy = await sup.launch(config.model_copy(update={"name": "copy"}), snapshot=snap)
        copy.send("go\n")
        assert await lines_of(copy) == (
            [
                "accept ESTALE",  # the listener is not kept
                "recv -1 ESTALE",  # nor the connection: the host's stays with the original
                "close OK OK",
                "listen-again 1",  # the copy is a new member: port 7100 is its own
            ],
            Exit(0, "power off"),
        )
        writer.write(b"hi")
        await writer.drain()
        original.send("go\n")
        assert await lines_of(original) == (
            ["accept EAGAIN", "recv 2 OK", "close OK OK", "listen-again 1"],
            Exit(0, "power off"),
        )
        assert await asyncio.wait_for(reader.read(), LIMIT) == b""  # the original closed it
        writer.close()


async def test_a_copy_restored_while_its_receive_waits_gets_estale(probe: Path) -> None:
    """Snapshotted while a blocking receive waits (the CPU halted on the device's event
    counter, at an idle point of a deterministic run, so surely in the wait): the copy's
    socket is stale and never changes, yet its receive ends with ESTALE."""
    async with asyncio.timeout(LIMIT), Supervisor(deterministic=True, seed=1) as sup:
        sim = sup.device.virtual
        assert sim is not None
        server = await sup.launch(
            GuestConfig(image=probe, name="s", cmdline="serve-hold 7200", memory="4M", net=True)
        )
        await server.expect("ready hold\n", LIMIT)
        client = await sup.launch(
            GuestConfig(image=probe, name="c", cmdline="client-wait s 7200", memory="4M", net=True)
        )
        await client.expect("ready client\n", LIMIT)
        await sim.idle()  # every CPU asleep: the client's receive waits
        snap = await client.snapshot()
        copy = await sup.restore(snap, name="copy")
        lines, end = await lines_of(copy)
        assert lines == ["recv -1 ESTALE", "send-after ESTALE"], lines
        assert end.exit_status == 0, end
        await server.kill()
        await client.kill()


async def test_a_nonblocking_connect_across_a_partition_goes_on_by_itself(probe: Path) -> None:
    """The connect timeout runs on a virtual clock the test moves: the first connect
    times out, the second waits across the cut however long the test takes to heal it."""
    net, clock = network()
    async with Supervisor(network=net) as sup:
        server = await sup.net.start_server(lambda r, w: w.close(), 9100)
        sup.net.partition(["host"], ["10.0.0.2"])  # the address the guest will get
        config = GuestConfig(
            image=probe, name="nb", cmdline="nbconnect host 9100", memory="4M", net=True
        )
        guest = await sup.launch(config)
        # Both calls made (a timeout between them would make the second a new connect).
        await guest.expect("connect1 EINPROGRESS again EALREADY\n", LIMIT)
        clock.advance(net.connect_timeout)
        before = await guest.expect(re.compile(r"(?s)^(.*)ready second\n"), LIMIT)
        assert before[1].splitlines() == [
            "poll1 1 ERR so_error ETIMEDOUT peer ENOTCONN",  # no answer across the cut
            "connect2 EINPROGRESS again EALREADY",
        ]
        sup.net.heal()  # the second connect completes by itself
        assert await lines_of(guest) == (
            ["poll2 1 so_error OK peer OK"],
            Exit(0, "power off"),
        )
        assert server.connections == 1
        server.close()


def test_empty_datagrams_fill_queues_as_others_do() -> None:
    """A datagram costs a queue at least ``DATAGRAM_COST`` bytes: a guest sending empty
    ones without end fills a link's queue and a receiver's, never the host's memory."""
    net, clock = network(datagram_queue=4096)
    a, b = net.join("a"), net.join("b")
    sender, receiver = a.socket(netmod.DGRAM), b.socket(netmod.DGRAM)
    assert isinstance(sender, netmod.DatagramSocket)
    assert isinstance(receiver, netmod.DatagramSocket)
    receiver.bind(0, 53)
    fits = 4096 // netmod.DATAGRAM_COST
    net.link("a", "b", delay=100.0)
    for _ in range(1000):
        sender.sendto(b"", (b.ip, 53))
    link = net.link_of("a", "b")
    assert link is not None and link.dropped == 1000 - fits
    assert clock.pending() == fits  # one arrival each for those on the way, no more
    clock.advance(100.0)
    assert len(receiver.queue) == fits
    net.unlink("a", "b")
    for _ in range(1000):
        sender.sendto(b"", (b.ip, 53))  # the receiver reads none of them
    assert len(receiver.queue) == fits and receiver.dropped == 1000
    assert sender.local is not None
    assert receiver.recvfrom() == (b"", sender.local)
    sender.sendto(b"", (b.ip, 53))  # one read makes room for one more
    assert len(receiver.queue) == fits and receiver.dropped == 1000
