"""The guests' network: sockets served in-process, one :class:`Network` per Supervisor.

A guest launched with ``GuestConfig(net=True)`` joins its Supervisor's network
(``sup.net``) and gets an IPv4 address (10.0.0.2 upward); the embedding program
is ``host`` (10.0.0.1).  The guest's socket calls become file device requests
(docs/abi.md, "Sockets") that the device serves against this module's socket
objects, on the event loop, with no host socket in between (docs/network.md).

Guarantees:

* Nothing leaves the network but a member's allowed outside addresses
  (:func:`parse_outbound`, reached by a real TCP connection from the host): an
  address outside it is ``ENETUNREACH``, an unassigned one inside it
  ``EHOSTUNREACH``, a port nobody listens on ``ECONNREFUSED``.
* Every buffer is bounded: a stream carries at most ``stream_buffer`` unread
  bytes each way (the writer then waits: ``WouldBlock``), a datagram socket
  queues at most ``datagram_queue`` bytes (later datagrams are dropped, as UDP
  drops them).
* A member that leaves (a guest that ends or is killed) closes its sockets as a
  process's exit does: peers see end of file, or a reset where unread data was
  thrown away.
* State changes are reported to the socket's owner through :meth:`Member.news`
  (a guest: its file device raises its irq) or the socket's ``on_change``
  callback (the host's streams), never synchronously inside another's request.
* Faults (:meth:`Network.link`, :meth:`Network.partition`) never lose or reorder
  a stream's bytes: a lost segment costs a retransmission's delay, and bytes a
  cut holds for ``stream_timeout`` end the connection with ``ETIMEDOUT``.
  Datagrams are delayed, dropped and reordered.  Every random draw comes from
  the Network's one seedable ``random.Random`` and every delay from its one
  :class:`Clock`, so a run is reproducible from the seed and the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import math
import os
import random
import re
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol

NET_PREFIX = 0x0A000000  # 10.0.0.0/16
NET_MASK = 0xFFFF0000
HOST_ADDR = NET_PREFIX | 1
FIRST_GUEST = NET_PREFIX | 2
LOOPBACK = 0x7F000001
DEFAULT_STREAM_BUFFER = 256 << 10
DEFAULT_DATAGRAM_QUEUE = 256 << 10
MAX_DATAGRAM = 65507
MAX_BACKLOG = 4096
DNS_PORT = 53
EPHEMERAL = (32768, 60999)
# Linux's TCP timing, which the faults model: the smallest retransmission timeout,
# its ceiling, the retransmissions before a connection gives up (tcp_retries2)
# and the time those take (0.2 s doubling to 120 s: 924.6 s), the time a connect
# waits for an answer (tcp_syn_retries = 6: 1 + 2 + ... + 64 = 127 s).
MIN_RTO = 0.2
MAX_RTO = 120.0
TCP_RETRIES = 15
DEFAULT_STREAM_TIMEOUT = 924.6
DEFAULT_CONNECT_TIMEOUT = 127.0
MSS = 1460  # a stream's bytes cross a lossy link in segments of this size
MAX_PIECE = 64 << 10  # a delayed stream's bytes arrive in pieces of at most this
# What a datagram costs a queue at the least (a kernel charges each its buffer's
# bookkeeping too): without it, empty datagrams would fill no queue, and a guest
# sending them without end would grow the host's memory without bound.
DATAGRAM_COST = 256

POLLIN, POLLPRI, POLLOUT, POLLERR, POLLHUP, POLLNVAL = 1, 2, 4, 8, 16, 32
POLLRDHUP = 0x2000

# A name /etc/hosts can carry (others are reachable by address only).
_HOSTNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")

STREAM = "stream"
DGRAM = "dgram"


class NetError(Exception):
    """A socket call that fails with ``errno`` (the guest gets ``-errno``)."""

    def __init__(self, err: int) -> None:
        super().__init__(err, errno.errorcode.get(err, str(err)))
        self.errno = err


class WouldBlock(Exception):
    """The call cannot complete now; the owner hears :meth:`Member.news` when it may."""


def ip_str(ip: int) -> str:
    return str(ipaddress.IPv4Address(ip))


def ip_int(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


Address = tuple[int, int]  # (IPv4 as an int, port)


class Timer(Protocol):
    """What :meth:`Clock.call_later` returns (an ``asyncio.TimerHandle`` is one)."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Where a :class:`Network`'s time comes from: every delay, rate and timeout of the
    faults is read and scheduled through it, nothing else (a deterministic run
    substitutes virtual time here)."""

    def time(self) -> float: ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer: ...


class LoopClock:
    """The running event loop's ``time()`` and ``call_later`` (the default clock)."""

    def time(self) -> float:
        return asyncio.get_running_loop().time()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(delay, callback)


class Remote(Protocol):
    """Where a remote member lives: another process's :class:`Network` (a cluster
    worker's, :mod:`supervisor.cluster`), which carries its connections."""

    async def dial(self, sock: StreamSocket, member: Member, port: int) -> None:
        """Connect ``sock`` to ``member``'s ``port`` over there, then tell the outcome
        with :meth:`Network.remote_connected` or :meth:`Network.remote_refused`."""
        ...

    def datagram(self, data: bytes, sender: Address, to: Address) -> None:
        """Carry a datagram to ``to`` over there (:meth:`Network.deliver_remote`), or
        drop it, as UDP may."""
        ...


class Link:
    """The faults of one direction between two members (:meth:`Network.link`).

    ``busy_until``: when the link has sent what it was given (``rate``), so
    that every connection and datagram over it shares the rate.  ``queued``:
    datagram bytes on the way, bounded by the network's ``datagram_queue``.
    ``dropped``: datagrams lost to ``loss`` or to a full queue.
    """

    def __init__(self, delay: float, jitter: float, loss: float, rate: float | None) -> None:
        self.delay = delay
        self.jitter = jitter
        self.loss = loss
        self.rate = rate
        self.busy_until = 0.0
        self.queued = 0
        self.dropped = 0

    def depart(self, now: float, size: int) -> float:
        """When ``size`` bytes given now have left (the rate's queue, then the wire)."""
        if self.rate is None:
            return now
        start = max(now, self.busy_until)
        self.busy_until = start + size / self.rate
        return self.busy_until

    def latency(self, rng: random.Random) -> float:
        return self.delay + (self.jitter * rng.random() if self.jitter else 0.0)

    def retransmissions(self, size: int, rng: random.Random) -> tuple[float, bool]:
        """The extra delay lost segments of ``size`` bytes cost, as TCP resends them:
        each of its segments is lost with probability ``loss``, resent after a
        retransmission timeout that doubles each time; the slowest decides.  True
        if one was lost more than ``TCP_RETRIES`` times (the connection gives up)."""
        if not self.loss:
            return 0.0, False
        worst = 0
        for _ in range(-(-size // MSS)):
            lost = 0
            while rng.random() < self.loss:
                lost += 1
                if lost > TCP_RETRIES:
                    return 0.0, True
            worst = max(worst, lost)
        rto = max(MIN_RTO, 2 * self.delay + MIN_RTO)
        return sum(min(rto * (1 << i), MAX_RTO) for i in range(worst)), False


def parse_outbound(spec: str) -> tuple[Address, tuple[str, int]]:
    """(the address a guest connects to, the real address) of an allowed outside
    address ``HOST:PORT``: HOST an IPv4 address, or ``localhost``.  The host's
    loopback (``127.0.0.1``, ``localhost``; inside a guest that is the guest itself)
    is reached at ``host:PORT``, any other address at itself.  ``ValueError`` for
    anything else (no name is looked up)."""
    host, sep, port = spec.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{spec!r} is not HOST:PORT (a port from 1 to 65535)")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ip_int(host)
    except ValueError:
        raise ValueError(f"{spec!r}: {host!r} is not an IPv4 address (or localhost)") from None
    if ip & NET_MASK == NET_PREFIX or ip in (0, 0xFFFFFFFF) or ip >> 28 == 0xE:
        raise ValueError(f"{spec!r}: {host} is not an outside unicast address")
    return ((HOST_ADDR if ip == LOOPBACK else ip), int(port)), (host, int(port))


DNS_A, DNS_IN = 1, 1
DNS_TTL = 0  # a member's address changes when it leaves and another joins: never cached
_DNS_HEADER = struct.Struct(">HHHHHH")


def dns_reply(query: bytes, lookup: Callable[[str], int | None]) -> bytes | None:
    """The name server's answer to the DNS message ``query`` (None: not a query, no
    answer).  One question, class IN: a name ``lookup`` knows has its address for
    type A and no record of any other type (``NOERROR``: the name exists), a name it
    does not know is ``NXDOMAIN``; anything else (several questions, compressed or
    truncated names) is ``FORMERR``.  The reply carries the question and the answer
    only, never more than the query's size plus one record."""
    if len(query) < 12:
        return None
    ident, flags, qdcount, _an, _ns, _ar = _DNS_HEADER.unpack_from(query)
    if flags & 0x8000 or (flags >> 11) & 0xF:
        return None  # a response, or not a standard query: nothing to answer
    rd = flags & 0x0100
    labels: list[bytes] = []
    at = 12
    parsed = qdcount == 1
    while parsed:
        if at >= len(query) or query[at] & 0xC0:
            parsed = False  # truncated, or a compression pointer in a question
            break
        size = query[at]
        at += 1
        if size == 0:
            break
        labels.append(query[at : at + size])
        at += size
    if not parsed or at + 4 > len(query) or at - 12 > 255:
        return _DNS_HEADER.pack(ident, 0x8000 | rd | 0x80 | 1, 0, 0, 0, 0)  # FORMERR
    question = query[12 : at + 4]
    qtype, qclass = struct.unpack_from(">HH", query, at)
    try:
        name = b".".join(labels).decode("ascii")
    except UnicodeDecodeError:
        name = ""
    ip = lookup(name) if name else None
    answer = 0x8000 | 0x0400 | rd | 0x80  # a response, authoritative, recursion available
    if ip is None:
        return _DNS_HEADER.pack(ident, answer | 3, 1, 0, 0, 0) + question  # NXDOMAIN
    if qtype != DNS_A or qclass != DNS_IN:
        return _DNS_HEADER.pack(ident, answer, 1, 0, 0, 0) + question
    record = struct.pack(">HHHIH", 0xC00C, DNS_A, DNS_IN, DNS_TTL, 4) + ip.to_bytes(4, "big")
    return _DNS_HEADER.pack(ident, answer, 1, 1, 0, 0) + question + record


class Member:
    """A name and address on a :class:`Network`: a guest, or the host.

    ``outbound``: the outside addresses it may connect to, by the address it
    connects to (:func:`parse_outbound`).  ``remote``: set for a member that lives
    in another process's Network (:meth:`Network.add_remote`); its sockets here
    are the near ends of connections that ``remote`` carries.
    """

    remote: Remote | None = None

    def __init__(
        self,
        network: Network,
        name: str,
        ip: int,
        max_sockets: int,
        outbound: dict[Address, tuple[str, int]] | None = None,
    ) -> None:
        self.network = network
        self.name = name
        self.ip = ip
        self.max_sockets = max_sockets
        self.outbound = outbound or {}
        self.sockets: set[Socket] = set()
        # Closed connections to the outside whose last bytes are still going out:
        # they hold a host socket, so they count against ``max_sockets`` too.
        self.lingering = 0
        self.on_news: Callable[[], None] | None = None

    @property
    def address(self) -> str:
        return ip_str(self.ip)

    def news(self) -> None:
        """Something changed for one of this member's sockets (wake a waiting guest)."""
        if self.on_news is not None:
            self.on_news()

    def socket(self, kind: str) -> Socket:
        """A new socket (``EMFILE`` beyond ``max_sockets``)."""
        if len(self.sockets) + self.lingering >= self.max_sockets:
            raise NetError(errno.EMFILE)
        sock: Socket = StreamSocket(self) if kind == STREAM else DatagramSocket(self)
        self.sockets.add(sock)
        return sock

    def leave(self) -> None:
        """Close every socket (as a process's exit does) and give back the name."""
        for sock in list(self.sockets):
            sock.close()
        self.network._forget(self)

    def __repr__(self) -> str:
        return f"<Member {self.name} {self.address}>"


class Socket:
    """What the two kinds share: an owner, a local address, options, a pending error."""

    kind = ""

    def __init__(self, owner: Member) -> None:
        self.owner = owner
        self.local: Address | None = None
        self.bound_key: tuple[int, int, str] | None = None
        self.error = 0  # SO_ERROR
        self.reuseaddr = False
        self.options: dict[tuple[int, int], int] = {}
        self.closed = False
        self.on_change: Callable[[], None] | None = None
        self.wakes = 0  # how often wake() ran: epoll's edge-triggered interests compare it

    @property
    def net(self) -> Network:
        return self.owner.network

    def wake(self) -> None:
        self.wakes += 1
        if self.on_change is not None:
            self.on_change()
        else:
            self.owner.news()

    def bind(self, ip: int, port: int) -> None:
        if self.local is not None:
            raise NetError(errno.EINVAL)
        if ip not in (0, LOOPBACK, self.owner.ip):
            raise NetError(errno.EADDRNOTAVAIL)
        self.net._bind(self, port)

    def _autobind(self) -> None:
        if self.local is None:
            self.net._bind(self, 0)

    def close(self) -> None:
        self.closed = True
        self.net._unbind(self)
        self.owner.sockets.discard(self)

    def poll(self) -> int:
        raise NotImplementedError


class StreamSocket(Socket):
    """A TCP socket: unconnected, listening, or one end of a connection."""

    kind = STREAM

    def __init__(self, owner: Member) -> None:
        super().__init__(owner)
        self.listening = False
        self.backlog: deque[StreamSocket] = deque()
        self.backlog_max = 0
        self.peer: StreamSocket | None = None
        self.remote: Address | None = None
        self.rx = bytearray()
        self.eof = False  # the peer will send no more
        self.reset = False  # the connection failed: the next call gets reset_errno
        self.write_shut = False
        self.was_connected = False
        self.waiters: set[StreamSocket] = set()  # connects waiting for room in the backlog

    # What faults, waiting connects and the outside use: class defaults until a socket
    # sets its own, so that an ordinary connection's instance dict stays small.
    hop: int | None = None  # the member the connection goes through (partitions)
    # Bytes on their way here over a link (arrival time, bytes, the segment that
    # makes the sender give up), in order; they count against the buffer.
    pending: deque[tuple[float, bytes, bool]] | None = None
    inflight = 0
    reset_errno = errno.ECONNRESET
    timed_out = False  # this end gave up (ETIMEDOUT): no cut hides that
    connect_error = 0  # a waiting connect's outcome (ETIMEDOUT), told once
    deadline: Timer | None = None  # a cut's timeout (connect or sent bytes)
    _arrival: Timer | None = None  # the next of ``pending`` to arrive
    dialing = False  # a connect to an allowed outside address is under way
    dialed = False  # ... and it has connected: the next connect returns
    connecting: Address | None = None  # a non-blocking connect goes on by itself
    # Told once when the socket closes: a connection to the outside stops dialing,
    # or closes its real end (a closed guest socket holds no host descriptor).
    on_close: Callable[[], None] | None = None
    # The listener whose backlog this connect waits for room in (it is in its
    # ``waiters``): a close takes it out, so that connecting and closing in a loop
    # against a full backlog grows nothing.
    waiting_on: StreamSocket | None = None

    def wake(self) -> None:
        """Tell the owner something changed; first, a non-blocking connect that was
        waiting (a cut, a full backlog) tries again, and tells only its outcome."""
        if self.connecting is not None:
            ip, port = self.connecting
            try:
                self.connect(ip, port)
            except WouldBlock:
                return  # still waiting: nothing to tell
            except NetError as exc:
                self.error = exc.errno  # poll: POLLERR; SO_ERROR says which
            self.connecting = None
        super().wake()

    # -- connecting ------------------------------------------------------------------
    def listen(self, backlog: int) -> None:
        if self.peer is not None or self.was_connected:
            raise NetError(errno.EINVAL)
        self._autobind()
        self.listening = True
        self.backlog_max = max(1, min(backlog, MAX_BACKLOG))

    def connect(self, ip: int, port: int) -> None:
        """Connect now (the peer's listener queues the other end), or raise."""
        if self.deadline is None or self.was_connected:  # no connect waiting: nothing to end
            self._connect(ip, port)
            return
        try:
            self._connect(ip, port)
        except WouldBlock:
            raise
        except BaseException:
            self._end_connect_wait()
            raise
        self._end_connect_wait()

    def _end_connect_wait(self) -> None:
        """The connect waited and has an outcome: its timeout stops, and a connected
        socket's deadline is free for a cut's timeout of its bytes."""
        self.cancel_deadline()
        self.net._forget_stalled(self)

    def _connect(self, ip: int, port: int) -> None:
        if self.listening:
            raise NetError(errno.EINVAL)
        if self.dialing:
            raise WouldBlock
        if self.dialed:
            self.dialed = False
            return
        if self.peer is not None or self.was_connected:
            raise NetError(errno.EISCONN)
        if self.connect_error:
            err, self.connect_error = self.connect_error, 0
            self.error = 0
            raise NetError(err)
        outside = self.owner.outbound.get((ip, port)) if self.owner.outbound else None
        if outside is not None and self.net._listener(ip, port) is None:
            if self.net.is_cut(self.owner.ip, HOST_ADDR):  # the way out is through the host
                self.net._stall_connect(self)
                raise WouldBlock
            self.net._dial(self, (ip, port), outside)
            raise WouldBlock
        target = self.net._route(self.owner, ip)
        if self.net.is_cut(self.owner.ip, target.ip):
            self.net._stall_connect(self)
            raise WouldBlock  # no answer across a partition: a heal, or ETIMEDOUT
        if target.remote is not None:
            self.net._dial_remote(self, target, port)
            raise WouldBlock  # the answer comes from the member's process
        listener = self.net._listener(target.ip, port)
        if listener is None:
            raise NetError(errno.ECONNREFUSED)
        if self.waiting_on is not None:
            self.waiting_on.waiters.discard(self)
            self.waiting_on = None
        if len(listener.backlog) >= listener.backlog_max:
            listener.waiters.add(self)
            self.waiting_on = listener
            self.net._wait_for_backlog(self, listener)
            raise WouldBlock  # room after an accept, or ETIMEDOUT
        self._autobind()
        server = StreamSocket(listener.owner)
        owner = listener.owner
        if len(owner.sockets) + owner.lingering >= owner.max_sockets:
            raise NetError(errno.ECONNREFUSED)  # the listener's owner can hold no more
        listener.owner.sockets.add(server)
        assert self.local is not None and listener.local is not None
        server.local = (target.ip, listener.local[1])
        server.remote = (self.owner.ip, self.local[1])
        self.remote = (target.ip, port)
        server.hop, self.hop = self.owner.ip, target.ip
        server.peer, self.peer = self, server
        server.was_connected = self.was_connected = True
        listener.backlog.append(server)
        listener.wake()

    def accept(self) -> StreamSocket:
        if not self.listening:
            raise NetError(errno.EINVAL)
        if not self.backlog:
            raise WouldBlock
        sock = self.backlog.popleft()
        for waiter in list(self.waiters):
            if waiter.closed:
                self.waiters.discard(waiter)
            else:
                waiter.wake()  # room in the backlog: a waiting connect may retry
        return sock

    # -- data ------------------------------------------------------------------------
    @property
    def cut(self) -> bool:
        """True while a partition separates this end from its peer (data waits), unless
        this end gave up (its ``ETIMEDOUT`` is told at once)."""
        return (
            self.hop is not None and not self.timed_out and self.net.is_cut(self.owner.ip, self.hop)
        )

    def room(self) -> int:
        peer = self.peer
        if peer is None:
            return 0
        return max(0, self.net.stream_buffer - len(peer.rx) - peer.inflight)

    def _failed(self) -> NetError:
        """The connection's failure, told once (later calls see a closed connection)."""
        self.reset = False
        self.error = 0
        return NetError(self.reset_errno)

    def send(self, data: bytes | memoryview) -> int:
        if self.reset:
            raise self._failed()
        if self.write_shut:
            raise NetError(errno.EPIPE)
        if self.peer is None:
            raise NetError(errno.EPIPE)  # Linux's answer connected or not
        room = self.room()
        if room == 0:
            raise WouldBlock
        n = min(room, len(data))
        peer = self.peer
        net = self.net
        # A remote member's end only hands on what its sender's process has sent
        # through the faults already: they are applied once, by the sender.
        remote = self.owner.remote is not None
        link = net._link(self.owner.ip, peer.owner.ip) if net._links and not remote else None
        if link is not None or peer.pending:  # behind bytes on the way, even unlinked
            peer._arrive_later(bytes(data[:n]), link)
        else:
            was_empty = not peer.rx
            peer.rx += data[:n]
            if was_empty:
                peer.wake()
        if net._cuts and self.cut:
            net._stall_stream(self)  # unacknowledged bytes: heal, or ETIMEDOUT
        return n

    def _arrive_later(self, data: bytes, link: Link | None) -> None:
        """Queue ``data`` (sent now by the peer) to arrive after the link's delays (no
        link: at once), in order: pieces leave ``pending`` from its front only, so a
        piece never overtakes the one before it (it may come with it)."""
        net = self.net
        now = net.clock.time()
        pending = self.pending
        if pending is None:
            pending = self.pending = deque()
        step = MAX_PIECE
        if link is not None and link.rate is not None:
            step = int(min(MAX_PIECE, max(MSS, link.rate / 100)))
        for at in range(0, len(data), step):
            piece = data[at : at + step]
            due, fatal = now, False
            if link is not None:
                extra, fatal = link.retransmissions(len(piece), net.random)
                due = link.depart(now, len(piece)) + link.latency(net.random) + extra
            pending.append((due, piece, fatal))
            self.inflight += len(piece)
        if self._arrival is None:
            self._arrival = net.clock.call_later(max(0.0, pending[0][0] - now), self._arrive)

    def _arrive(self) -> None:
        """Move what is due from ``pending`` to ``rx``; a hopeless segment ends the
        connection as its sender's retransmissions would."""
        self._arrival = None
        pending = self.pending
        if not pending:
            return
        clock = self.net.clock
        now = max(clock.time(), pending[0][0])
        while pending and pending[0][0] <= now:
            _due, piece, fatal = pending.popleft()
            self.inflight -= len(piece)
            if fatal:
                if self.peer is not None:
                    self.net._time_out(self.peer)
                else:
                    self._drop_pending()
                    self.reset = True  # the sender is gone and its end never came
                    self.wake()
                return
            self.rx += piece
        if pending:
            wait = max(0.0, pending[0][0] - clock.time())
            self._arrival = clock.call_later(wait, self._arrive)
        else:
            self.pending = None
        self.wake()

    def _drop_pending(self) -> None:
        self.pending = None
        self.inflight = 0
        if self._arrival is not None:
            self._arrival.cancel()
            self._arrival = None

    def unacknowledged(self) -> bool:
        """True if bytes this end sent are held by a cut (as if unacknowledged)."""
        peer = self.peer
        return peer is not None and bool(peer.rx or peer.pending) and self.cut

    def cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def recv(self, size: int, *, peek: bool = False) -> bytes:
        if self.cut:
            raise WouldBlock  # in flight until the partition heals
        if self.rx:
            with memoryview(self.rx) as held:
                data = bytes(held[:size])  # one copy (a slice of the bytearray would be two)
            if not peek:
                full = self.peer is not None and self.peer.room() == 0
                del self.rx[:size]
                if full and self.peer is not None:
                    self.peer.wake()  # the writer has room again
            return data
        if self.pending:
            raise WouldBlock  # bytes on the way: an end or a reset comes after them
        if self.reset:
            raise self._failed()
        if self.eof:
            return b""
        if self.peer is None and not self.was_connected:
            raise NetError(errno.ENOTCONN)
        if self.peer is None:
            return b""
        raise WouldBlock

    def recv_into(self, buffer: memoryview, *, peek: bool = False) -> int:
        """:meth:`recv` of up to ``len(buffer)`` bytes straight into ``buffer`` (guest RAM):
        one copy; the same waits and errors."""
        rx = self.rx
        if not rx or self.cut or not buffer:
            return len(self.recv(len(buffer), peek=peek))  # nothing to copy: its answer
        n = min(len(rx), len(buffer))
        with memoryview(rx) as held:
            buffer[:n] = held[:n]
        if not peek:
            peer = self.peer
            full = peer is not None and peer.room() == 0
            del rx[:n]
            if full and peer is not None:
                peer.wake()  # the writer has room again
        return n

    def take(self, size: int) -> None:
        """Drop the first ``size`` received bytes, which were read with ``peek`` and
        handed on (a remote member's end, once the far side acknowledged them);
        a writer that had no room hears of it, as after :meth:`recv`."""
        peer = self.peer
        full = peer is not None and peer.room() == 0
        del self.rx[:size]
        if full and peer is not None:
            peer.wake()

    def shutdown(self, how: int) -> None:
        if self.peer is None and not self.was_connected:
            raise NetError(errno.ENOTCONN)
        if how in (0, 2):
            self.eof = True
            self.rx.clear()
            self._drop_pending()
        if how in (1, 2) and not self.write_shut:
            self.write_shut = True
            if self.peer is not None:
                self.peer.eof = True
                self.peer.wake()

    def abort(self, err: int = errno.ECONNRESET) -> None:
        """Close this end and reset the connection: the peer's next call fails with
        ``err`` (what a peer in another process that reset, died or timed out leaves)."""
        peer = self.peer
        if peer is not None:
            peer.reset, peer.reset_errno = True, err
        self.close()
        if peer is not None:
            peer.error = err

    def close(self) -> None:
        if self.closed:
            return
        # No longer a listener before the waiting connects below try again: they
        # must find it gone (ECONNREFUSED), not room in a backlog nobody accepts.
        self.listening = False
        for pending in self.backlog:  # connected but never accepted: reset
            pending.close()
        self.backlog.clear()
        for waiter in list(self.waiters):
            waiter.wake()  # a connect waiting for this listener now finds it gone
        if self.waiting_on is not None:
            self.waiting_on.waiters.discard(self)
            self.waiting_on = None
        self.cancel_deadline()
        self.net._forget_stalled(self)
        unread = bool(self.rx or self.pending)
        self._drop_pending()
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            peer.cancel_deadline()  # nothing of its can be acknowledged any more
            if unread:
                peer.reset = True  # unread data thrown away: the peer sees a reset
                peer.error = errno.ECONNRESET
            else:
                peer.eof = True
            peer.wake()
        super().close()
        if self.on_close is not None:
            told, self.on_close = self.on_close, None
            told()

    def poll(self) -> int:
        if self.listening:
            return POLLIN if self.backlog else 0
        if self.dialing or self.connecting is not None:
            return 0
        if self.peer is None and not self.was_connected:
            bits = POLLOUT | POLLHUP
            return bits | POLLERR if self.error else bits
        if self.cut:
            return POLLOUT if self.peer is not None and self.room() > 0 else 0
        if self.pending:  # bytes on the way: an end or a reset comes after them
            writable = self.peer is not None and not self.write_shut and self.room() > 0
            return (POLLIN if self.rx else 0) | (POLLOUT if writable else 0)
        bits = 0
        if self.rx or self.eof or self.reset or self.peer is None:
            bits |= POLLIN
        if self.eof or self.peer is None:
            bits |= POLLRDHUP
        if self.peer is not None and not self.write_shut and self.room() > 0:
            bits |= POLLOUT
        if self.reset or self.error:
            bits |= POLLERR
        if self.reset or self.peer is None or (self.eof and self.write_shut):
            bits |= POLLHUP
        return bits


class DatagramSocket(Socket):
    """A UDP socket: a bounded queue of (datagram, sender)."""

    def __init__(self, owner: Member) -> None:
        Socket.__init__(self, owner)
        self.queue: deque[tuple[bytes, Address]] = deque()
        self.queued = 0
        self.dropped = 0
        self.remote: Address | None = None

    kind = DGRAM

    def connect(self, ip: int, port: int) -> None:
        if ip == 0 and port == 0:
            self.remote = None  # AF_UNSPEC-like: forget the peer
            return
        self.net._route(self.owner, ip)
        self._autobind()
        self.remote = (ip, port)

    def sendto(self, data: bytes, to: Address | None) -> int:
        if to is None:
            if self.remote is None:
                raise NetError(errno.EDESTADDRREQ)
            to = self.remote
        if len(data) > MAX_DATAGRAM:
            raise NetError(errno.EMSGSIZE)
        target = self.net._route(self.owner, to[0])
        self._autobind()
        assert self.local is not None
        net = self.net
        # The name server stands in for /etc/hosts: faults never come between it and
        # a member, as they never come between a process and its files.
        named = self is net._dns or (target.ip, to[1]) == (HOST_ADDR, DNS_PORT)
        link = net._link(self.owner.ip, target.ip) if net._links and not named else None
        if link is not None:
            net._send_later(link, data, (self.owner.ip, self.local[1]), (target.ip, to[1]))
            return len(data)
        if target.remote is not None and not named:  # it carries the datagram (or drops it)
            if not net.is_cut(self.owner.ip, target.ip):
                target.remote.datagram(data, (self.owner.ip, self.local[1]), (target.ip, to[1]))
            return len(data)
        dest = net._datagram(target.ip, to[1])
        if dest is None or (not named and net.is_cut(self.owner.ip, target.ip)):
            return len(data)  # nobody listens there: the datagram is lost, as UDP's are
        dest.deliver(data, (self.owner.ip, self.local[1]))
        return len(data)

    def deliver(self, data: bytes, sender: Address) -> None:
        if self.remote is not None and sender != self.remote:
            return  # a connected datagram socket takes only its peer's
        cost = max(len(data), DATAGRAM_COST)
        if self.queued + cost > self.net.datagram_queue:
            self.dropped += 1
            return
        was_empty = not self.queue
        self.queue.append((data, sender))
        self.queued += cost
        if was_empty:
            self.wake()

    def recvfrom(self, *, peek: bool = False) -> tuple[bytes, Address]:
        if not self.queue:
            raise WouldBlock
        if peek:
            return self.queue[0]
        data, sender = self.queue.popleft()
        self.queued -= max(len(data), DATAGRAM_COST)
        return data, sender

    def poll(self) -> int:
        return (POLLIN if self.queue else 0) | POLLOUT | (POLLERR if self.error else 0)


class Network:
    """Addresses, names, listeners and bound ports of one Supervisor's guests and its host.

    ``stream_buffer``: unread bytes a connection holds each way before the
    writer waits; ``datagram_queue``: bytes a datagram socket (and a link) queues
    before dropping.  ``seed``: the seed of :attr:`random`, the one source of the
    faults' randomness (None: from the system).  ``clock``: the time every delay
    and timeout is measured in (default: the running event loop's).
    ``stream_timeout``: seconds a cut may hold a connection's sent bytes before
    the sender gives up with ``ETIMEDOUT``; ``connect_timeout``: seconds a
    connect waits across a cut before ``ETIMEDOUT`` (Linux's defaults).
    """

    def __init__(
        self,
        *,
        stream_buffer: int = DEFAULT_STREAM_BUFFER,
        datagram_queue: int = DEFAULT_DATAGRAM_QUEUE,
        seed: int | None = None,
        clock: Clock | None = None,
        stream_timeout: float = DEFAULT_STREAM_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        for what, size in (("stream_buffer", stream_buffer), ("datagram_queue", datagram_queue)):
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"{what} must be a whole number of bytes >= 1, not {size!r}")
        for what, value in (
            ("stream_timeout", stream_timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not _number(value) or not 0 < value < math.inf:
                raise ValueError(f"{what} must be a number of seconds above 0, not {value!r}")
        self.stream_buffer = stream_buffer
        self.datagram_queue = datagram_queue
        self.random = random.Random(seed)
        self.clock: Clock = LoopClock() if clock is None else clock
        self.stream_timeout = float(stream_timeout)
        self.connect_timeout = float(connect_timeout)
        self._links: dict[tuple[int, int], Link] = {}
        self._bridges: set[asyncio.Task[None]] = set()  # connections to the outside
        self._deadlines: set[StreamSocket] = set()  # sockets whose cut timeout runs
        self._by_ip: dict[int, Member] = {}
        self._by_name: dict[str, Member] = {}
        self._next_ip = FIRST_GUEST
        self._reserved: dict[str, int] = {}  # name -> the address its join gets
        self._ports: dict[tuple[int, int, str], Socket] = {}
        self._next_port: dict[tuple[int, str], int] = {}
        self.host = self._add("host", HOST_ADDR, 1 << 30)
        self._published: list[asyncio.Server] = []
        self._cuts: set[tuple[int, int]] = set()
        self.stalled: set[StreamSocket] = set()  # connects waiting for a heal
        self._dns = self.host.socket(DGRAM)
        self._bind(self._dns, DNS_PORT)
        self._dns.on_change = self._dns_soon

    # -- members -------------------------------------------------------------------------
    def join(self, name: str, *, max_sockets: int = 1024, outbound: Iterable[str] = ()) -> Member:
        """A new member named ``name`` with the next free address (``ValueError`` if the
        name is taken, the addresses ran out or an ``outbound`` address is bad).

        ``outbound``: the outside addresses (``HOST:PORT``, :func:`parse_outbound`)
        the member may connect to, through a real connection the host makes.
        """
        allowed = dict(parse_outbound(spec) for spec in outbound)
        if name in self._by_name:
            raise ValueError(f"{name!r} is already on the network")
        reserved = self._reserved.pop(name, None)
        if reserved is not None:
            if reserved in self._by_ip:
                raise ValueError(f"{ip_str(reserved)} is already on the network")
            return self._add(name, reserved, max_sockets, allowed)
        ip = self._next_ip
        for _ in range(0xFFFD):  # addresses are handed out in turn, reused only after a wrap
            if ip & 0xFFFF == 0xFFFF:
                ip = FIRST_GUEST
            if ip not in self._by_ip:
                break
            ip += 1
        else:
            raise ValueError("the network has no free address left")
        self._next_ip = ip + 1
        return self._add(name, ip, max_sockets, allowed)

    def reserve(self, name: str, ip: int) -> None:
        """The next :meth:`join` of ``name`` gets address ``ip`` (one chosen for the
        whole cluster, where another process hands out the addresses)."""
        if ip & NET_MASK != NET_PREFIX or ip in (HOST_ADDR, NET_PREFIX | 0xFFFF):
            raise ValueError(f"{ip_str(ip)} is not a guest's address on the network")
        self._reserved[name] = ip

    def add_remote(self, name: str, ip: int, remote: Remote) -> Member:
        """A member that lives in another process's Network: its name resolves here,
        faults name it, and a connect to it goes through ``remote``.  Replaces a
        remote member of the same name or address (it moved); ``ValueError`` if a
        member of this Network has either."""
        for old in (self._by_name.get(name), self._by_ip.get(ip)):
            if old is not None and (old.remote is None or old is self.host):
                raise ValueError(f"{name!r} ({ip_str(ip)}) is on the network here")
            if old is not None:
                self.drop_remote(old.name)
        member = self._add(name, ip, 1 << 30)
        member.remote = remote
        return member

    def host_elsewhere(self, remote: Remote) -> None:
        """``host`` is the program of another process (a cluster's driver): connects and
        datagrams to ``host`` go through ``remote``, as to any remote member, and
        its connects come in as :meth:`accept_remote` ends of ``host``.  The name
        server at ``host:53`` stays here: every process answers its own members."""
        self.host.remote = remote

    def drop_remote(self, name: str, err: int | None = None) -> None:
        """Forget the remote member ``name`` (no effect if there is none).  Its
        connections end as a closed peer's do (end of file), or reset with ``err``."""
        member = self._by_name.get(name)
        if member is None or member.remote is None or member is self.host:
            return
        for sock in list(member.sockets):
            if err is not None and isinstance(sock, StreamSocket):
                sock.abort(err)
        member.leave()

    def forget_remote(self, member: Member) -> None:
        """The remote ``member`` has left: its name and address are free here, while
        its connections run on to their own ends."""
        if member.remote is not None and member is not self.host:
            self._forget(member)

    def remote_connected(self, sock: StreamSocket, member: Member, port: int) -> StreamSocket:
        """``sock``'s connect to the remote ``member``'s ``port`` was accepted over
        there: its near end here (owned by ``member``) is returned, joined to
        ``sock``, whose next connect call returns."""
        end = StreamSocket(member)
        member.sockets.add(end)
        assert sock.local is not None
        end.local = (member.ip, port)
        end.remote = sock.local
        sock.remote = (member.ip, port)
        end.hop, sock.hop = sock.owner.ip, member.ip
        end.peer, sock.peer = sock, end
        end.was_connected = sock.was_connected = True
        sock.dialing, sock.dialed = False, True
        sock.on_close = None
        sock.wake()
        return end

    def remote_refused(self, sock: StreamSocket, err: int) -> None:
        """``sock``'s connect to a remote member failed with ``err`` (``ECONNREFUSED``...)."""
        sock.dialing = False
        sock.on_close = None
        sock.connect_error = sock.error = err
        sock.wake()

    def deliver_remote(self, data: bytes, sender: Address, to: Address) -> bool:
        """A datagram a remote member sent (through its own process's faults) to ``to``
        here: queued at the socket bound there (False: nobody is, or its queue is
        full, and it is lost)."""
        dest = self._datagram(*to)
        if dest is None:
            return False
        dropped = dest.dropped
        dest.deliver(data, sender)
        return dest.dropped == dropped

    def accept_remote(self, member: Member, port: int) -> StreamSocket:
        """The near end of a connection that the remote ``member`` opens from its
        ``port``: a socket of ``member`` whose :meth:`StreamSocket.connect` reaches
        a listener here as any connect does (backlog, cuts, ``ECONNREFUSED``)."""
        if member.remote is None:
            raise ValueError(f"{member.name!r} is not a remote member")
        end = StreamSocket(member)
        member.sockets.add(end)
        end.local = (member.ip, port)
        return end

    def _dial_remote(self, sock: StreamSocket, member: Member, port: int) -> None:
        """Start ``sock``'s connect to the remote ``member``; a close stops it."""
        assert member.remote is not None
        sock._autobind()
        sock.dialing = True
        task = asyncio.get_running_loop().create_task(member.remote.dial(sock, member, port))
        self._bridges.add(task)
        task.add_done_callback(self._bridges.discard)

        def stop() -> None:
            task.cancel()

        sock.on_close = stop

    def _add(
        self,
        name: str,
        ip: int,
        max_sockets: int,
        outbound: dict[Address, tuple[str, int]] | None = None,
    ) -> Member:
        member = Member(self, name, ip, max_sockets, outbound)
        self._by_ip[ip] = member
        self._by_name[name] = member
        return member

    def _forget(self, member: Member) -> None:
        if self._by_ip.get(member.ip) is member:
            del self._by_ip[member.ip]
            for key in [k for k in self._links if member.ip in k]:
                del self._links[key]  # a link joins the members there now
        if self._by_name.get(member.name) is member:
            del self._by_name[member.name]

    @property
    def members(self) -> list[Member]:
        """Everyone on the network, the host first."""
        return sorted(self._by_ip.values(), key=lambda m: m.ip)

    def resolve(self, name_or_address: str) -> int:
        """The address of a member's name, or of a dotted address (``OSError``
        ``EHOSTUNREACH`` for a name nobody has)."""
        member = self._by_name.get(name_or_address)
        if member is not None:
            return member.ip
        try:
            return ip_int(name_or_address)
        except ValueError:
            raise OSError(errno.EHOSTUNREACH, f"no {name_or_address!r} on the network") from None

    def _inside(self, name_or_address: str) -> int:
        """:meth:`resolve`, for faults: an address outside the network (the outside, a
        loopback) is never a member's, so naming one is ``OSError`` ``ENETUNREACH``."""
        ip = self.resolve(name_or_address)
        if ip & NET_MASK != NET_PREFIX:
            why = f"{name_or_address!r} is outside the network (faults join its members)"
            raise OSError(errno.ENETUNREACH, why)
        return ip

    def hosts_file(self, member: Member | None = None) -> bytes:
        """``/etc/hosts`` as ``member`` sees it: ``localhost``, ``host`` and the member's
        own name, so that its size never depends on how many members the network has
        (every other name is answered by the name server at ``host:53``).  A name that
        is not a host name (with blanks, say) is left out: reachable by address only."""
        lines = ["127.0.0.1\tlocalhost", f"{self.host.address}\t{self.host.name}"]
        if member is not None and member is not self.host and _HOSTNAME.fullmatch(member.name):
            lines.append(f"{member.address}\t{member.name}")
        return ("\n".join(lines) + "\n").encode()

    def lookup(self, name: str) -> int | None:
        """The address the name server gives ``name``: a member's whose name is a host
        name (one dictionary look-up, whatever the network's size), else None."""
        member = self._by_name.get(name)
        if member is None or not _HOSTNAME.fullmatch(name):
            return None
        return member.ip

    # -- the name server -------------------------------------------------------------------
    def _dns_soon(self) -> None:
        asyncio.get_running_loop().call_soon(self._dns_answer)

    def _dns_answer(self) -> None:
        """Answer every query queued at ``host:53`` (:func:`dns_reply`): a member's name
        has its address, any other name is "no such name" (a resolver fails at once)."""
        sock = self._dns
        assert isinstance(sock, DatagramSocket)
        while True:
            try:
                query, sender = sock.recvfrom()
            except WouldBlock:
                return
            reply = dns_reply(query, self.lookup)
            if reply is not None:
                with contextlib.suppress(NetError):
                    sock.sendto(reply, sender)

    # -- faults ----------------------------------------------------------------------------
    def partition(self, group_a: Iterable[str], group_b: Iterable[str]) -> None:
        """Cut every member of ``group_a`` off from every member of ``group_b`` (names or
        addresses; ``OSError`` for one not on the network).

        Across the cut, bytes already sent and those sent meanwhile stay in flight
        (a writer fills the connection's buffer, then waits), datagrams are lost and
        a connect waits; :meth:`heal` lets everything through again.
        """
        for group in (group_a, group_b):
            if isinstance(group, str):  # its letters would be taken for names
                raise TypeError(f"a group is a list of names or addresses, not {group!r}")
        a = [self._inside(x) for x in group_a]
        b = [self._inside(x) for x in group_b]
        for x in a:
            for y in b:
                if x != y:
                    self._cuts.update(((x, y), (y, x)))
        for ip in {*a, *b}:  # bytes already on the way are now unacknowledged
            member = self._by_ip.get(ip)
            for sock in list(member.sockets) if member is not None else ():
                if isinstance(sock, StreamSocket) and sock.unacknowledged():
                    self._stall_stream(sock)

    def heal(self) -> None:
        """End every partition: what was in flight arrives, waiting connects go on."""
        if not self._cuts:
            return
        self._cuts.clear()
        deadlines, self._deadlines = self._deadlines, set()
        for timed in deadlines:
            timed.cancel_deadline()
        stalled, self.stalled = self.stalled, set()
        for waiting in stalled:
            waiting.wake()
        for member in list(self._by_ip.values()):
            for each in list(member.sockets):
                if isinstance(each, StreamSocket) and each.remote is not None:
                    each.wake()

    def is_cut(self, a: int, b: int) -> bool:
        """True if a partition separates addresses ``a`` and ``b``."""
        return bool(self._cuts) and (a, b) in self._cuts

    def _stall_connect(self, sock: StreamSocket) -> None:
        """``sock``'s connect waits across a cut: ``ETIMEDOUT`` unless a heal comes first."""
        self.stalled.add(sock)
        if sock.deadline is None:
            sock.deadline = self.clock.call_later(
                self.connect_timeout, lambda: self._connect_expired(sock)
            )
            self._deadlines.add(sock)

    def _connect_expired(self, sock: StreamSocket) -> None:
        sock.deadline = None
        self._deadlines.discard(sock)
        if sock in self.stalled:
            self.stalled.discard(sock)
            sock.connect_error = errno.ETIMEDOUT
            sock.wake()

    def _wait_for_backlog(self, sock: StreamSocket, listener: StreamSocket) -> None:
        """``sock``'s connect waits for room in ``listener``'s full backlog, as a SYN
        that Linux drops and resends: ``ETIMEDOUT`` after ``connect_timeout`` unless
        an accept makes room first.  A heal does not stop this timeout (the cut is
        not what it waits for); a cut met meanwhile does not restart it."""
        if sock.deadline is None:
            sock.deadline = self.clock.call_later(
                self.connect_timeout, lambda: self._backlog_expired(sock, listener)
            )

    def _backlog_expired(self, sock: StreamSocket, listener: StreamSocket) -> None:
        sock.deadline = None
        listener.waiters.discard(sock)
        sock.waiting_on = None
        self.stalled.discard(sock)
        sock.connect_error = errno.ETIMEDOUT
        sock.wake()

    def _forget_stalled(self, sock: StreamSocket) -> None:
        self.stalled.discard(sock)
        self._deadlines.discard(sock)

    def _stall_stream(self, sock: StreamSocket) -> None:
        """A cut holds bytes ``sock`` sent: ``ETIMEDOUT`` unless a heal comes first."""
        if sock.deadline is None and not sock.timed_out:
            sock.deadline = self.clock.call_later(
                self.stream_timeout, lambda: self._stream_expired(sock)
            )
            self._deadlines.add(sock)

    def _stream_expired(self, sock: StreamSocket) -> None:
        sock.deadline = None
        self._deadlines.discard(sock)
        if sock.unacknowledged():
            self._time_out(sock)

    def _time_out(self, sock: StreamSocket) -> None:
        """``sock`` gave up on its unacknowledged bytes: it fails with ``ETIMEDOUT``
        at once; the other end loses what had not arrived (what a cut hides has
        not) and finds the connection reset (across a cut: once the cut heals)."""
        sock.cancel_deadline()
        self._deadlines.discard(sock)
        sock.timed_out = True
        sock.reset, sock.reset_errno, sock.error = True, errno.ETIMEDOUT, errno.ETIMEDOUT
        sock._drop_pending()
        peer, sock.peer = sock.peer, None
        if peer is not None:
            peer.peer = None
            peer.cancel_deadline()
            self._deadlines.discard(peer)
            if peer.cut:
                peer.rx.clear()
            peer._drop_pending()
            peer.reset, peer.reset_errno, peer.error = True, errno.ECONNRESET, errno.ECONNRESET
            peer.wake()
        sock.wake()

    # -- the outside ------------------------------------------------------------------------
    def _dial(self, sock: StreamSocket, at: Address, outside: tuple[str, int]) -> None:
        """Start connecting ``sock`` to the real address ``outside`` (allowed to its
        owner), which it knows as ``at``; it hears :meth:`Socket.wake` when done."""
        sock.dialing = True
        task = asyncio.get_running_loop().create_task(self._outside(sock, at, outside))
        self._bridges.add(task)
        task.add_done_callback(self._bridges.discard)

    async def _outside(self, sock: StreamSocket, at: Address, outside: tuple[str, int]) -> None:
        """Connect to ``outside`` on the host, join it to ``sock`` and copy both ways
        (each way waiting for the other's drain: bounded as any connection).

        Closing ``sock`` stops a dial under way and, once the guest's last bytes
        have gone out, closes the real connection, whatever the outside does:
        every host descriptor a guest holds belongs to one of its open sockets.
        """
        if sock.closed:
            return  # closed before this task began
        dial = asyncio.ensure_future(asyncio.open_connection(*outside))

        def stop() -> None:
            dial.cancel()

        sock.on_close = stop
        try:
            await asyncio.wait([dial])
        except asyncio.CancelledError:
            dial.cancel()
            raise
        if dial.cancelled():
            return  # the guest closed the socket first
        if (failure := dial.exception()) is not None:
            sock.dialing = False
            sock.on_close = None
            code = failure.errno if isinstance(failure, OSError) else None
            sock.connect_error = sock.error = code or errno.ECONNREFUSED
            sock.wake()
            return
        real_reader, real_writer = dial.result()
        if sock.closed:
            real_writer.close()
            return
        sock._autobind()
        assert sock.local is not None
        end = StreamSocket(self.host)
        self.host.sockets.add(end)
        end.local = at
        end.remote = (sock.owner.ip, sock.local[1])
        sock.remote = at
        end.hop, sock.hop = sock.owner.ip, HOST_ADDR  # through the host: its cuts apply
        end.peer, sock.peer = sock, end
        end.was_connected = sock.was_connected = True
        sock.dialing, sock.dialed = False, True
        sock.wake()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        writer = asyncio.StreamWriter(StreamTransport(end, protocol, loop), protocol, reader, loop)
        gone = asyncio.Event()
        owner = sock.owner
        lingering = False

        def hang_up() -> None:
            nonlocal lingering
            if not outward.done():
                lingering = True
                owner.lingering += 1
            gone.set()

        sock.on_close = hang_up
        outward = asyncio.ensure_future(_pipe(reader, real_writer))
        inward = asyncio.ensure_future(_pipe(real_reader, writer))
        closed = asyncio.ensure_future(gone.wait())
        try:
            # The guest's bytes up to its end (a shutdown or a close), and the
            # outside's up to theirs unless the guest closes first; a failure of
            # the real connection resets the guest's.
            while not (outward.done() and (inward.done() or closed.done())):
                waiting = [t for t in (outward, inward, closed) if not t.done()]
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if any(t.done() and t.exception() is not None for t in (outward, inward)):
                    if not sock.closed:
                        writer.transport.abort()
                        sock.reset, sock.error = True, errno.ECONNRESET
                        sock.wake()
                    break
        finally:
            for task in (outward, inward, closed):
                task.cancel()
            for w in (writer, real_writer):
                w.close()
            await asyncio.gather(outward, inward, closed, return_exceptions=True)
            if lingering:
                owner.lingering -= 1

    # -- links -----------------------------------------------------------------------------
    def link(
        self,
        a: str,
        b: str,
        *,
        delay: float = 0.0,
        jitter: float = 0.0,
        loss: float = 0.0,
        rate: float | None = None,
    ) -> None:
        """Faults between members ``a`` and ``b`` (names or addresses), both ways.

        ``delay`` and ``jitter`` (seconds): every byte and datagram takes ``delay``
        plus a uniform draw from [0, ``jitter``].  ``loss`` (0 to 1): each
        datagram is dropped with that probability; each segment of a stream is,
        and is resent after a retransmission timeout (its bytes come later, never
        out of order; after ``TCP_RETRIES`` losses of one segment the sender gives
        up with ``ETIMEDOUT``).  ``rate`` (bytes per second, None: unbounded):
        what the link carries each way, shared by everything on it.  Streams keep
        their order; datagrams may be reordered by jitter.  A link with every
        argument at its default is no link (:meth:`unlink`).  ``ValueError`` for a
        bad value; ``OSError`` for a member not on the network.
        """
        for what, value in (("delay", delay), ("jitter", jitter)):
            if not _number(value) or not 0 <= value < math.inf:
                raise ValueError(f"{what} must be a number of seconds >= 0, not {value!r}")
        if not _number(loss) or not 0 <= loss <= 1:
            raise ValueError(f"loss must be a probability from 0 to 1, not {loss!r}")
        if rate is not None and (not _number(rate) or not 0 < rate < math.inf):
            raise ValueError(f"rate must be bytes per second above 0 (or None), not {rate!r}")
        x, y = self._inside(a), self._inside(b)
        if x == y:
            raise ValueError(f"a link joins two different members, not {a!r} and {b!r}")
        if not (delay or jitter or loss or rate is not None):
            self.unlink(a, b)
            return
        for key in ((x, y), (y, x)):
            self._links[key] = Link(float(delay), float(jitter), float(loss),
                                    None if rate is None else float(rate))  # fmt: skip

    def unlink(self, a: str, b: str) -> None:
        """Remove the faults between ``a`` and ``b`` (bytes already on the way still
        arrive as they were sent)."""
        x, y = self._inside(a), self._inside(b)
        self._links.pop((x, y), None)
        self._links.pop((y, x), None)

    def link_of(self, a: str, b: str) -> Link | None:
        """The faults from ``a`` to ``b`` (their ``dropped`` counts lost datagrams)."""
        return self._links.get((self._inside(a), self._inside(b)))

    def _link(self, a: int, b: int) -> Link | None:
        return self._links.get((a, b)) if a != b else None

    def _send_later(self, link: Link, data: bytes, sender: Address, to: Address) -> None:
        """Send a datagram over ``link``: dropped (``loss``, a full queue) or delivered
        after its delays to whoever is bound at ``to`` then (unless a cut is)."""
        rng = self.random
        if link.loss and rng.random() < link.loss:
            link.dropped += 1
            return
        cost = max(len(data), DATAGRAM_COST)
        if link.queued + cost > self.datagram_queue:
            link.dropped += 1
            return
        now = self.clock.time()
        due = link.depart(now, len(data)) + link.latency(rng)
        link.queued += cost

        def arrive() -> None:
            link.queued -= cost
            if self.is_cut(sender[0], to[0]):
                return
            remote = self._by_ip.get(to[0])
            if remote is not None and remote.remote is not None:
                remote.remote.datagram(data, sender, to)
                return
            dest = self._datagram(*to)
            if dest is not None:
                dest.deliver(data, sender)

        self.clock.call_later(due - now, arrive)

    # -- routing and ports ---------------------------------------------------------------
    def _route(self, source: Member, ip: int) -> Member:
        if ip == LOOPBACK or ip == source.ip:
            return source
        if ip & NET_MASK != NET_PREFIX:
            raise NetError(errno.ENETUNREACH)
        member = self._by_ip.get(ip)
        if member is None:
            raise NetError(errno.EHOSTUNREACH)
        return member

    def _listener(self, ip: int, port: int) -> StreamSocket | None:
        sock = self._ports.get((ip, port, STREAM))
        return sock if isinstance(sock, StreamSocket) and sock.listening else None

    def _datagram(self, ip: int, port: int) -> DatagramSocket | None:
        sock = self._ports.get((ip, port, DGRAM))
        return sock if isinstance(sock, DatagramSocket) else None

    def _bind(self, sock: Socket, port: int) -> None:
        ip = sock.owner.ip
        if not 0 <= port <= 65535:
            raise NetError(errno.EINVAL)
        if port == 0:
            port = self._ephemeral(ip, sock.kind)
        key = (ip, port, sock.kind)
        if key in self._ports:
            raise NetError(errno.EADDRINUSE)
        self._ports[key] = sock
        sock.bound_key = key
        sock.local = (ip, port)

    def _ephemeral(self, ip: int, kind: str) -> int:
        low, high = EPHEMERAL
        start = self._next_port.get((ip, kind), low)
        port = start
        while (ip, port, kind) in self._ports:
            port = low if port >= high else port + 1
            if port == start:
                raise NetError(errno.EADDRNOTAVAIL)
        self._next_port[(ip, kind)] = low if port >= high else port + 1
        return port

    def _unbind(self, sock: Socket) -> None:
        key = sock.bound_key
        if key is not None and self._ports.get(key) is sock:
            del self._ports[key]
        sock.bound_key = None

    # -- the host's side -----------------------------------------------------------------
    async def open_connection(
        self, host: str, port: int, *, limit: int = 2**16
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect from ``host`` (10.0.0.1) to a guest's listening port, as
        :func:`asyncio.open_connection` does (``ConnectionRefusedError`` if nothing
        listens; waits while the listener's backlog is full)."""
        loop = asyncio.get_running_loop()
        ip = self.resolve(host)
        sock = self.host.socket(STREAM)
        assert isinstance(sock, StreamSocket)
        try:
            while True:
                try:
                    sock.connect(ip, port)
                    break
                except WouldBlock:
                    ready = asyncio.Event()
                    sock.on_change = ready.set
                    await ready.wait()
        except NetError as exc:
            sock.close()
            why = errno.errorcode[exc.errno]
            raise OSError(exc.errno, f"connect to {host}:{port}: {why}") from None
        except BaseException:
            sock.close()
            raise
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport = StreamTransport(sock, protocol, loop)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return reader, writer

    async def start_server(
        self,
        client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
        port: int,
        *,
        backlog: int = 100,
        limit: int = 2**16,
    ) -> NetServer:
        """Listen as ``host:port`` for guests; ``client_connected_cb(reader, writer)`` (a
        function or coroutine function) runs for each connection, as with
        :func:`asyncio.start_server` (``OSError`` ``EADDRINUSE`` if the port is taken)."""
        sock = self.host.socket(STREAM)
        assert isinstance(sock, StreamSocket)
        try:
            sock.bind(0, port)
            sock.listen(backlog)
        except NetError as exc:
            sock.close()
            raise OSError(exc.errno, f"host:{port}: {errno.errorcode[exc.errno]}") from None
        return NetServer(sock, client_connected_cb, limit)

    async def publish(
        self, name: str, port: int, host_port: int, host_addr: str = "127.0.0.1"
    ) -> asyncio.Server:
        """Listen on the real TCP address ``host_addr:host_port`` and forward each
        connection to guest ``name``'s ``port`` (``OSError`` if the address is taken).

        A connection the guest refuses (nothing listens yet, or the guest is gone) is
        closed at once.  The server is closed by :meth:`aclose`.
        """

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                inner_reader, inner_writer = await self.open_connection(name, port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(
                _pipe(reader, inner_writer), _pipe(inner_reader, writer), return_exceptions=True
            )
            for w in (writer, inner_writer):
                w.close()

        server = await asyncio.start_server(forward, host_addr, host_port)
        self._published.append(server)
        return server

    async def aclose(self) -> None:
        """Close every published port and connection to the outside (the Supervisor
        does, as it closes)."""
        servers, self._published = self._published, []
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()
        bridges = list(self._bridges)
        for task in bridges:
            task.cancel()
        await asyncio.gather(*bridges, return_exceptions=True)

    async def open_datagram(self, port: int = 0) -> DatagramEndpoint:
        """A UDP socket of the host bound to ``port`` (0: any free port)."""
        sock = self.host.socket(DGRAM)
        assert isinstance(sock, DatagramSocket)
        try:
            sock.bind(0, port)
        except NetError as exc:
            sock.close()
            raise OSError(exc.errno, f"host:{port}: {errno.errorcode[exc.errno]}") from None
        return DatagramEndpoint(sock)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` (waiting for each drain), then end the writer's side."""
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()


class StreamTransport(asyncio.Transport):
    """An asyncio transport over one of the host's stream sockets.

    Written bytes move into the peer's bounded buffer as it has room; beyond
    ``high`` bytes waiting here the protocol is paused (``writer.drain()``
    waits), as a socket transport does.  Received bytes go to the protocol unless
    reading is paused.
    """

    def __init__(
        self,
        sock: StreamSocket,
        protocol: asyncio.BaseProtocol,
        loop: asyncio.AbstractEventLoop,
        high: int = 64 << 10,
    ) -> None:
        super().__init__()
        self._sock = sock
        self._protocol = protocol
        self._loop = loop
        self._out = bytearray()
        self._high = high
        self._low = high // 4
        self._writing_paused = False
        self._reading_paused = False
        self._closing = False
        self._eof_sent = False
        self._eof_delivered = False
        self._lost = False
        self._scheduled = False
        sock.on_change = self._schedule
        protocol.connection_made(self)
        self._schedule()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername" and self._sock.remote is not None:
            return (ip_str(self._sock.remote[0]), self._sock.remote[1])
        if name == "sockname" and self._sock.local is not None:
            return (ip_str(self._sock.local[0]), self._sock.local[1])
        return default

    def _schedule(self) -> None:
        if not self._scheduled and not self._lost:
            self._scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        if self._lost:
            return
        sock = self._sock
        self._flush()
        if self._lost:
            return
        protocol = self._protocol
        assert isinstance(protocol, asyncio.Protocol)
        if sock.cut:
            return  # in flight: delivered after a heal
        while sock.rx and not self._reading_paused:
            data = sock.recv(1 << 16)
            protocol.data_received(data)
        if sock.pending:
            return  # bytes on the way: an end or a reset comes after them
        if sock.reset and not sock.rx:
            self._lose(OSError(sock.reset_errno, os.strerror(sock.reset_errno)))
            return
        if sock.eof and not sock.rx and not self._eof_delivered:
            self._eof_delivered = True
            keep_open = protocol.eof_received()
            if not keep_open or self._eof_sent:
                self.close()

    def _flush(self) -> None:
        sock = self._sock
        while self._out and sock.peer is not None:
            try:
                n = sock.send(memoryview(self._out))
            except WouldBlock:
                break
            except NetError as exc:
                self._out.clear()
                self._lose(OSError(exc.errno, os.strerror(exc.errno)))
                return
            del self._out[:n]
        if self._writing_paused and len(self._out) <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()
        if self._closing and not self._out:
            self._lose(None)
        elif self._eof_sent and not self._out and not sock.write_shut and sock.peer is not None:
            sock.shutdown(1)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._eof_sent:
            raise RuntimeError("write after close or write_eof")
        if self._sock.peer is None:
            return  # the peer is gone: dropped, as asyncio's socket transports do
        self._out += data
        self._flush()
        if not self._writing_paused and len(self._out) > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        self._flush()

    def get_write_buffer_size(self) -> int:
        return len(self._out)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 << 10 if high is None else high
        self._low = self._high // 4 if low is None else low

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._schedule()

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._lost

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        if self._closing or self._lost:
            return
        self._closing = True
        self._flush()

    def abort(self) -> None:
        self._out.clear()
        self._lose(None)

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._sock.on_change = None
        self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)


class NetServer:
    """What :meth:`Network.start_server` returns: ``close()``, ``await wait_closed()``,
    ``sockets`` ((address, port) pairs) and ``async with``."""

    def __init__(
        self,
        sock: StreamSocket,
        callback: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
        limit: int,
    ) -> None:
        self._sock = sock
        self._callback = callback
        self._limit = limit
        self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self.connections = 0
        sock.on_change = self._schedule_accept

    @property
    def sockets(self) -> list[tuple[str, int]]:
        if self._closed.is_set() or self._sock.local is None:
            return []
        return [(ip_str(self._sock.local[0]), self._sock.local[1])]

    @property
    def port(self) -> int:
        assert self._sock.local is not None
        return self._sock.local[1]

    def _schedule_accept(self) -> None:
        self._loop.call_soon(self._accept)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn = self._sock.accept()
            except WouldBlock:
                return
            self.connections += 1
            reader = asyncio.StreamReader(limit=self._limit, loop=self._loop)
            protocol = asyncio.StreamReaderProtocol(reader, self._callback, loop=self._loop)
            StreamTransport(conn, protocol, self._loop)

    def is_serving(self) -> bool:
        return not self._closed.is_set()

    def close(self) -> None:
        """Stop listening (connections already made go on)."""
        if not self._closed.is_set():
            self._closed.set()
            self._sock.on_change = None
            self._sock.close()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> NetServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class DatagramEndpoint:
    """The host's UDP socket: ``send(data, (name_or_address, port))``,
    ``await recv() -> (data, (address, port))``, ``close()``."""

    def __init__(self, sock: DatagramSocket) -> None:
        self._sock = sock
        self._ready = asyncio.Event()
        sock.on_change = self._ready.set

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock.local is not None
        return (ip_str(self._sock.local[0]), self._sock.local[1])

    @property
    def dropped(self) -> int:
        """Datagrams dropped because the queue was full."""
        return self._sock.dropped

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        """Send one datagram (lost silently if nobody is bound there, as UDP's are)."""
        if self._sock.closed:
            raise OSError(errno.EBADF, "the endpoint is closed")
        try:
            self._sock.sendto(bytes(data), (self._sock.net.resolve(to[0]), to[1]))
        except NetError as exc:
            raise OSError(exc.errno, f"send to {to}: {errno.errorcode[exc.errno]}") from None

    async def recv(self) -> tuple[bytes, tuple[str, int]]:
        """The next datagram and its sender (waits for one)."""
        while True:
            if self._sock.closed:
                raise OSError(errno.EBADF, "the endpoint is closed")
            try:
                data, (ip, port) = self._sock.recvfrom()
                return data, (ip_str(ip), port)
            except WouldBlock:
                self._ready.clear()
                await self._ready.wait()

    def close(self) -> None:
        self._sock.close()
        self._ready.set()


__all__ = [
    "HOST_ADDR",
    "DatagramEndpoint",
    "Member",
    "NetError",
    "NetServer",
    "Network",
    "StreamTransport",
    "WouldBlock",
    "ip_int",
    "ip_str",
]
