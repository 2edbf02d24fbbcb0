"""Guests and swarms on a Ray cluster: one worker actor = one :class:`Supervisor` on its own loop.

::

    async with Cluster(checkpoint_every=1) as cl:        # a local Ray, one worker per core
        guest = await cl.launch(GuestConfig(image="guests/echo.img"))
        lines = guest.console
        guest.send("hi\\n")
        print(await anext(lines))                         # hi
        await cl.migrate(guest)                           # to the least loaded other worker
        guest.send("quit\\n")
        print([line async for line in lines], guest.worker.name)   # ['quit', 'bye'] w1
        print(await guest.wait())

Guarantees (see docs/cluster.md):

* What travels is content, never a path: the image and a block device's file are
  sent through Ray's object store; a worker writes them to its own temporary
  directory.  A writable disk is written back to the caller's file once, when
  the guest has ended (a temporary file, then ``os.replace``).
* Console lines are numbered from the guest's first line.  A worker keeps the
  lines not yet read; whoever reads asks for "lines from number N on", so a move
  or a revival (which re-runs the guest from an older state) never repeats a
  line, and a move carries the unread lines along, so none is lost.
* Console input is numbered by byte the same way: the driver keeps what was sent
  since the state a revival would start from and re-sends it; a worker drops
  bytes it already has.
* A move pauses the guest at an instruction boundary inside its Launcher's read
  (no device request in flight), captures it (``Guest.snapshot``) with its
  disk, and revives it on the target from that state; the paused guest is
  ended only once the target runs it, so a failed move leaves it running where
  it was.
* ``checkpoint_every=S``: every S seconds each guest is captured the same way
  (and resumed).  The capture is fetched and put back into the object store by
  the driver, so it lives on the driver's node and outlives the worker's.  When
  a worker dies, its guests continue from their last checkpoint on live workers;
  without a checkpoint they end as died ("worker NAME lost").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import ray
    from ray.exceptions import RayActorError, RayTaskError
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "supervisor.cluster needs Ray: pip install 'lguest-supervisor[cluster]'"
    ) from exc

from .config import GuestConfig
from .host import Exit, Guest, GuestStats, Supervisor
from .launcher.layout import plan
from .launcher.loader import parse_image
from .net import (
    DATAGRAM_COST,
    FIRST_GUEST,
    HOST_ADDR,
    NET_MASK,
    NET_PREFIX,
    Address,
    DatagramEndpoint,
    Member,
    NetError,
    NetServer,
    Network,
    StreamSocket,
    WouldBlock,
    ip_int,
    ip_str,
)
from .snapshot import Snapshot, SnapshotError

__all__ = [
    "Cluster",
    "ClusterError",
    "ClusterNetwork",
    "GuestEndedError",
    "NetBridge",
    "RemoteGuest",
    "Worker",
]

MAX_LINES = 100_000  # unread console lines a worker keeps per guest (older ones are dropped)
READ_BATCH = 4096  # lines per console read
MAX_CALLS = 1 << 20  # calls a worker runs at once (Ray's default of 1,000 would starve guests)
_AUTH_MODE = "RAY_AUTH_MODE"  # Ray's switch for token authentication ("token", "disabled")


class ClusterError(RuntimeError):
    """A cluster operation that cannot be done (the message says why)."""


class GuestEndedError(ClusterError):
    """The guest has ended (before or during the operation): there is nothing to move.

    ``await guest.wait()`` returns how it ended.
    """


# -- what travels ------------------------------------------------------------------------------
@dataclass
class Capture:
    """One guest's state as it travels: the snapshot plus what the worker holds for it.

    Taken while the guest is paused, so the disk, the console and the input count
    all match the snapshot.
    """

    snapshot: bytes  # Snapshot.to_bytes()
    disk: bytes | None  # the block device's content (None: no block device)
    base: int  # number of the first console line in ``lines``
    lines: list[str]  # console lines not yet acknowledged by the reader
    partial: bytes  # output of a line not yet ended
    received: int  # console input bytes the guest had been given
    stats: dict[str, Any]  # GuestStats so far (all incarnations)


# -- the network across workers ----------------------------------------------------------------
PIECE = 64 << 10  # bytes of one connection's way per actor call at most
WINDOW = 4  # calls of one way on their way at once (their bytes stay in the sender's buffer)
GONE = -1  # a piece's answer when its connection is over at the receiving end
DRIVER = "driver"  # the driver as the workers' bridges name it: where ``host`` lives
DRIVER_CALLS = ("net_connect", "net_piece", "net_datagram")  # what a worker asks of it
DATA, EOF, CLOSE, RESET = "", "eof", "close", "reset"  # what a piece ends its way with

# One call to another worker's bridge: (worker name, method name, arguments) -> its answer.
Call = Callable[..., Awaitable[Any]]


class _Connection:
    """One connection between a guest here and a guest on another worker, as this
    worker holds it: ``end``, the near end of the remote member, joined to the
    guest's socket; the bytes of the way in are numbered, ``received`` so far."""

    def __init__(self, cid: str, worker: str) -> None:
        self.cid = cid
        self.worker = worker
        self.end: StreamSocket | None = None
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.readable = asyncio.Event()  # the pump's wake-up: bytes, an end, a heal
        self.writable = asyncio.Event()  # a piece's wake-up: room in the guest's socket
        self.arrived = asyncio.Event()  # a piece went in: the next one may follow
        self.received = 0
        self.sent_end = False  # the way out has ended (its last piece was acknowledged)
        self.got_end = False  # the way in has ended
        self.pump: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self.readable.set()
        self.writable.set()


class _RemoteAt:
    """:class:`~supervisor.net.Remote` for the members on one other worker."""

    def __init__(self, bridge: NetBridge, worker: str) -> None:
        self.bridge = bridge
        self.worker = worker

    async def dial(self, sock: StreamSocket, member: Member, port: int) -> None:
        await self.bridge.dial(self.worker, sock, member, port)

    def datagram(self, data: bytes, sender: Address, to: Address) -> None:
        self.bridge.datagram(self.worker, data, sender, to)


class NetBridge:
    """One worker's part of the cluster's network: the other workers' networked guests
    as remote members of this worker's :class:`~supervisor.net.Network`, and the
    connections between its guests and theirs.

    Every byte travels as a call of ``call`` (an actor call on Ray): a connect is
    :meth:`net_connect` at the listener's worker; each way of a connection is a
    sequence of :meth:`net_piece` calls from the sending worker, one at a time, each
    numbered by its first byte's offset, the answer being the acknowledgement.  The
    sender reads its guest's bytes without taking them and takes them once
    acknowledged, so a writer holds at most its connection's ``stream_buffer`` in
    flight and waits beyond, as on one network.  Faults act where the bytes are
    sent: a cut holds them in the sender's buffer (and its ``stream_timeout``
    runs there), a link delays them on the way into it.
    """

    def __init__(self, name: str, net: Network, call: Call) -> None:
        self.name = name
        self.net = net
        self.call = call
        self.remotes: dict[int, Member] = {}  # address -> remote member
        self.conns: dict[str, _Connection] = {}
        self._ids = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.datagrams_queued = 0  # bytes of datagrams sent from here, not yet delivered
        self.datagrams_dropped = 0  # datagrams dropped here: ``datagram_queue`` was full

    # -- members --------------------------------------------------------------------------
    def add(self, name: str, ip: int, worker: str) -> None:
        """``name`` (address ``ip``) runs on ``worker`` (another worker).

        A member it replaces (the guest moved) is forgotten, while the connections
        made with it run on to the ends its old worker sends: the reset of every one
        when the move is done (:meth:`reset`), or none if the move fails and the
        guest runs on there."""
        old = self.remotes.pop(ip, None)
        if old is not None:
            self.net.forget_remote(old)
        member = self.net.add_remote(name, ip, _RemoteAt(self, worker))
        self.remotes[ip] = member

    def host_at(self, worker: str) -> None:
        """``host`` is the program on ``worker`` (the driver): the guests here reach
        it as a remote member, and it connects to them as one."""
        self.net.host_elsewhere(_RemoteAt(self, worker))
        self.remotes[HOST_ADDR] = self.net.host

    def reset(self, name: str) -> None:
        """Reset every connection of ``name``, a guest here that moved away: its peers,
        here and elsewhere, read what it sent, then get ``ECONNRESET`` (its listeners'
        connections not yet accepted too), as a peer whose host vanished leaves them."""
        for member in self.net.members:
            if member.name != name or member.remote is not None:
                continue
            for sock in list(member.sockets):
                if isinstance(sock, StreamSocket):
                    for pending in list(sock.backlog):
                        pending.abort(errno.ECONNRESET)
                    sock.abort(errno.ECONNRESET)

    def drop(self, name: str) -> None:
        """``name`` has left the network: it no longer resolves (its connections end by
        their own last pieces, which may still be on their way)."""
        for ip, member in list(self.remotes.items()):
            if member.name == name:
                del self.remotes[ip]
                self.net.forget_remote(member)

    def claim(self, name: str, ip: int) -> None:
        """``name`` joins here next, with address ``ip`` (a launch, or a revival of a
        guest that ran elsewhere)."""
        self.drop(name)
        self.net.reserve(name, ip)

    def lost(self, worker: str) -> None:
        """``worker`` is gone: its guests leave, every connection to them is reset."""
        for ip, member in list(self.remotes.items()):
            remote = member.remote
            if isinstance(remote, _RemoteAt) and remote.worker == worker:
                del self.remotes[ip]
                self.net.drop_remote(member.name, errno.ECONNRESET)
        for conn in [c for c in self.conns.values() if c.worker == worker]:
            if conn.end is not None:
                conn.end.abort(errno.ECONNRESET)
            self._forget(conn)

    # -- connecting -------------------------------------------------------------------------
    async def dial(self, worker: str, sock: StreamSocket, member: Member, port: int) -> None:
        """A guest's connect to ``member`` (on ``worker``): asked of that worker."""
        self._ids += 1
        conn = _Connection(f"{self.name}/{self._ids}", worker)
        self.conns[conn.cid] = conn
        assert sock.local is not None
        try:
            source = sock.local
            err = await self.call(
                worker, "net_connect", conn.cid, self.name, source, member.ip, port
            )
        except asyncio.CancelledError:  # the socket was closed: the other end is reset
            self._forget(conn)
            self._spawn(self.call(worker, "net_piece", conn.cid, 0, b"", RESET))
            raise
        except Exception:  # the worker is gone
            err = errno.EHOSTUNREACH
        if err:
            self._forget(conn)
            self.net.remote_refused(sock, err)
            return
        self._open(conn, self.net.remote_connected(sock, member, port))

    async def net_connect(
        self, cid: str, worker: str, source: tuple[int, int], ip: int, port: int
    ) -> int:
        """A connect from a guest on ``worker`` (at ``source``) to ``ip:port`` here:
        0 once a listener here has it in its backlog, or the errno."""
        member = self.remotes.get(source[0])
        if member is None or ip in self.remotes:
            return errno.EHOSTUNREACH
        end = self.net.accept_remote(member, source[1])
        conn = _Connection(cid, worker)
        end.on_change = conn.wake
        while True:
            conn.readable.clear()
            try:
                end.connect(ip, port)
                break
            except WouldBlock:
                await conn.readable.wait()
            except NetError as exc:
                end.close()
                return exc.errno
        self.conns[cid] = conn
        self._open(conn, end)
        return 0

    def _open(self, conn: _Connection, end: StreamSocket) -> None:
        conn.end = end
        end.on_change = conn.wake
        conn.ready.set_result(True)
        conn.pump = asyncio.get_running_loop().create_task(self._pump(conn, end))

    # -- bytes ------------------------------------------------------------------------------
    async def _pump(self, conn: _Connection, end: StreamSocket) -> None:
        """Send what the guest here writes to the other worker: up to :data:`WINDOW`
        pieces on their way at once, each read from the guest's buffer without taking
        it, taken once acknowledged (which gives the writer room again); then the
        way's end (end of file, close or reset), after the last byte."""
        acked = sent = 0  # bytes taken from ``end.rx``; bytes sent (from ``acked`` on)
        flight: deque[tuple[asyncio.Future[Any], int]] = deque()
        ended = False
        while True:
            conn.readable.clear()  # what wakes it from here on is news
            while not ended and len(flight) < WINDOW:
                try:
                    data = end.recv(sent - acked + PIECE, peek=True)
                except WouldBlock:
                    break
                except NetError:  # reset here (a timeout): the other end is reset too
                    data, how = b"", RESET
                else:
                    if len(data) > sent - acked:
                        how = DATA
                    elif end.rx:
                        break  # all of it is on its way already
                    else:
                        how = CLOSE if end.peer is None else EOF
                piece = data[sent - acked :]
                call = self.call(conn.worker, "net_piece", conn.cid, sent, piece, how)
                flight.append((asyncio.ensure_future(call), len(piece)))
                sent += len(piece)
                ended = how != DATA
            if not flight:
                await conn.readable.wait()
                continue
            first = flight[0][0]
            if not first.done():
                wake = asyncio.ensure_future(conn.readable.wait())
                try:
                    await asyncio.wait({first, wake}, return_when=asyncio.FIRST_COMPLETED)
                finally:  # (also when the pump is cancelled: no task is left behind)
                    wake.cancel()
                continue
            flight.popleft()
            got = GONE if first.cancelled() or first.exception() else first.result()
            if got == GONE:  # over there, or the worker is gone: a reset here
                for pending, _ in flight:
                    pending.cancel()
                if not end.closed:
                    end.abort(errno.ECONNRESET)
                conn.sent_end = conn.got_end = True
                break
            size = got - acked  # the answer counts every byte received so far
            if size > 0:
                end.take(size)  # acknowledged
                acked += size
            if ended and not flight:
                conn.sent_end = True
                break
        self._settle(conn)

    async def net_piece(self, cid: str, offset: int, data: bytes, how: str) -> int:
        """Bytes ``offset`` on of a connection's way in, then its end (``how``): the
        bytes go into the guest's socket as it has room (waiting meanwhile: the
        acknowledgement is this call's answer, the count written so far), or
        :data:`GONE` if the connection is over here."""
        conn = self.conns.get(cid)
        if conn is None or not await conn.ready or conn.end is None:
            return GONE
        while offset > conn.received:  # an earlier piece is still on its way
            conn.arrived.clear()
            await conn.arrived.wait()
            if self.conns.get(cid) is not conn:
                return GONE
        end = conn.end
        view = memoryview(data)[conn.received - offset :]
        while view:
            conn.writable.clear()
            try:
                n = end.send(view)
            except WouldBlock:
                await conn.writable.wait()
                continue
            except NetError:  # the guest here closed or was reset: a reset there
                conn.got_end = True
                self._settle(conn)
                return GONE
            view = view[n:]
            conn.received += n
            conn.arrived.set()
        if how == EOF:
            with contextlib.suppress(NetError):
                end.shutdown(1)
        elif how == CLOSE:
            end.close()
        elif how == RESET:
            end.abort(errno.ECONNRESET)
        if how in (CLOSE, RESET):
            conn.readable.set()  # a closed end has nothing more to send: the pump ends it
        if how != DATA:
            conn.got_end = True
            self._settle(conn)
        return conn.received

    # -- datagrams ---------------------------------------------------------------------------
    def datagram(self, worker: str, data: bytes, sender: Address, to: Address) -> None:
        """Send a datagram to a guest on ``worker``: one call, not awaited by the guest.
        At most ``datagram_queue`` bytes are on their way from here at once; beyond,
        a datagram is dropped, as a full queue drops it."""
        cost = max(len(data), DATAGRAM_COST)
        if self.datagrams_queued + cost > self.net.datagram_queue:
            self.datagrams_dropped += 1
            return
        self.datagrams_queued += cost

        async def carry() -> None:
            try:
                await self.call(worker, "net_datagram", data, sender, to)
            finally:
                self.datagrams_queued -= cost

        self._spawn(carry())

    async def net_datagram(self, data: bytes, sender: Address, to: Address) -> bool:
        """A datagram from a guest on another worker, for ``to`` here."""
        return self.net.deliver_remote(data, sender, to)

    # -- ends -------------------------------------------------------------------------------
    def _settle(self, conn: _Connection) -> None:
        """Forget a connection once both ways have ended."""
        if conn.sent_end and conn.got_end:
            if conn.end is not None and not conn.end.closed:
                conn.end.close()
            self._forget(conn)

    def _forget(self, conn: _Connection) -> None:
        if self.conns.get(conn.cid) is conn:
            del self.conns[conn.cid]
        conn.arrived.set()  # a piece waiting for an earlier one finds the connection gone
        if not conn.ready.done():
            conn.ready.set_result(False)
        if conn.pump is not None and conn.pump is not asyncio.current_task():
            conn.pump.cancel()

    def _spawn(self, call: Awaitable[Any]) -> None:
        async def run() -> None:
            with contextlib.suppress(Exception):
                await call

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        for conn in list(self.conns.values()):
            self._forget(conn)
        for task in list(self._tasks):
            task.cancel()

    def apply(self, fault: str, *args: Any, **kwargs: Any) -> None:
        """A fault the driver set for the whole network (``partition``, ``heal``,
        ``link``, ``unlink``), applied to this worker's Network."""
        if fault not in ("partition", "heal", "link", "unlink"):
            raise ValueError(f"no fault {fault!r}")
        getattr(self.net, fault)(*args, **kwargs)


class _Outbox:
    """The calls a worker's bridge makes of the driver, which no actor call reaches (the
    driver is no actor): the driver fetches them with a long poll (``net_calls``) and
    sends their answers back (``net_answers``), so they travel as actor calls too.

    What waits here is bounded as the calls between workers are: each connection has
    at most :data:`WINDOW` pieces on their way, datagrams at most ``datagram_queue``.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, tuple[Any, ...]]] = []
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.ready = asyncio.Event()
        self.closed = False
        self._ids = 0

    async def call(self, method: str, *args: Any) -> Any:
        if self.closed:
            raise ClusterError("the worker is closing")
        self._ids += 1
        number = self._ids
        answer = self.waiting[number] = asyncio.get_running_loop().create_future()
        self.calls.append((number, method, args))
        self.ready.set()
        try:
            return await answer
        finally:
            self.waiting.pop(number, None)

    async def take(self) -> list[tuple[int, str, tuple[Any, ...]]] | None:
        """The calls made since the last take (waiting for one); None once closed."""
        while not self.calls and not self.closed:
            self.ready.clear()
            await self.ready.wait()
        if self.closed:
            return None
        calls, self.calls = self.calls, []
        return calls

    def answer(self, answers: list[tuple[int, bool, Any]]) -> None:
        for number, ok, value in answers:
            waiting = self.waiting.get(number)
            if waiting is None or waiting.done():
                continue  # its caller gave up (a closed socket's connect)
            if ok:
                waiting.set_result(value)
            else:
                waiting.set_exception(ClusterError(f"the driver failed: {value}"))

    def close(self) -> None:
        self.closed = True
        self.ready.set()
        for waiting in self.waiting.values():
            if not waiting.done():
                waiting.set_exception(ClusterError("the worker is closing"))


# -- the worker actor --------------------------------------------------------------------------
class _Relay:
    """One guest's console lines on a worker, numbered from the guest's first line."""

    def __init__(self, base: int = 0, lines: list[str] | None = None) -> None:
        self.base = base
        self.lines: deque[str] = deque(lines or ())
        self.state = "running"  # running | ended | moved
        self.changed = asyncio.Event()

    @property
    def end(self) -> int:
        return self.base + len(self.lines)

    def append(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) > MAX_LINES:
            self.lines.popleft()
            self.base += 1
        self.changed.set()

    def trim(self, upto: int) -> None:
        """Forget the lines numbered below ``upto`` (the reader has them)."""
        while self.lines and self.base < upto:
            self.lines.popleft()
            self.base += 1

    def finish(self, state: str) -> None:
        if self.state == "running":
            self.state = state
        self.changed.set()


@dataclass
class _Hosted:
    guest: Guest
    relay: _Relay
    disk: Path | None
    writable: bool
    received: int
    stats_base: GuestStats
    pump: asyncio.Task[None] | None = None
    moved: bool = False
    early: dict[int, bytes] = field(default_factory=dict)  # input past a gap, by offset
    eof_at: int | None = None  # input ends once this many bytes have been given

    def stats(self) -> GuestStats:
        return self.stats_base.add(self.guest.stats)


class WorkerActor:
    """The Ray actor behind a :class:`Worker`: a Supervisor on the actor's event loop.

    Guests are keyed by incarnation (``"<guest id>.<n>"``): each launch, move or
    revival is a new key, so an old incarnation never mixes with a new one.
    """

    def __init__(self, name: str, max_guests: int | None, max_memory: int | None) -> None:
        self.name = name
        self._limits = (max_guests, max_memory)
        self._sup: Supervisor | None = None
        self._guests: dict[str, _Hosted] = {}
        self._dir = Path(tempfile.mkdtemp(prefix=f"lguest-{name}-"))
        self._peers: dict[str, Any] = {}  # worker name -> actor handle (the network's)
        self._bridge: NetBridge | None = None
        self._outbox = _Outbox()  # the bridge's calls of the driver

    @property
    def sup(self) -> Supervisor:
        if self._sup is None:
            self._sup = Supervisor(max_guests=self._limits[0], max_memory=self._limits[1])
        return self._sup

    async def start(self) -> dict[str, Any]:
        self.sup  # noqa: B018 - created on the actor's loop
        return {
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    async def ping(self) -> int:
        return os.getpid()

    # -- the network across workers (NetBridge) -------------------------------------------------
    @property
    def bridge(self) -> NetBridge:
        if self._bridge is None:
            self._bridge = NetBridge(self.name, self.sup.net, self._call)
        return self._bridge

    async def _call(self, worker: str, method: str, *args: Any) -> Any:
        if worker == DRIVER:
            return await self._outbox.call(method, *args)
        return await getattr(self._peers[worker], method).remote(*args)

    async def net_state(self) -> dict[str, Any]:
        """What this worker's part of the network holds now: the connects waiting
        across a cut, the connections to other workers, the remote members (name ->
        their worker)."""
        bridge = self.bridge
        return {
            "stalled": len(self.sup.net.stalled),
            "connections": len(bridge.conns),
            "remotes": {
                m.name: m.remote.worker
                for m in bridge.remotes.values()
                if isinstance(m.remote, _RemoteAt) and m.remote.worker != DRIVER
            },
        }

    async def net_peers(self, peers: dict[str, Any]) -> None:
        """The other workers' actors; ``host`` is the driver from now on."""
        self._peers = {name: actor for name, actor in peers.items() if name != self.name}
        self.bridge.host_at(DRIVER)

    async def net_calls(self) -> list[tuple[int, str, tuple[Any, ...]]] | None:
        """The driver's long poll: this worker's calls of the driver (None: closing)."""
        return await self._outbox.take()

    async def net_answers(self, answers: list[tuple[int, bool, Any]]) -> None:
        """The driver's answers to calls :meth:`net_calls` gave it: (number, ok, value)."""
        self._outbox.answer(answers)

    async def net_add(self, name: str, ip: int, worker: str) -> None:
        self.bridge.add(name, ip, worker)

    async def net_drop(self, name: str) -> None:
        self.bridge.drop(name)

    async def net_lost(self, worker: str) -> None:
        self.bridge.lost(worker)

    async def net_fault(self, fault: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        self.bridge.apply(fault, *args, **kwargs)

    async def net_connect(
        self, cid: str, worker: str, source: tuple[int, int], ip: int, port: int
    ) -> int:
        return await self.bridge.net_connect(cid, worker, source, ip, port)

    async def net_piece(self, cid: str, offset: int, data: bytes, how: str) -> int:
        return await self.bridge.net_piece(cid, offset, data, how)

    async def net_datagram(self, data: bytes, sender: Address, to: Address) -> bool:
        return await self.bridge.net_datagram(data, sender, to)

    async def cpu_time(self) -> float:
        """CPU seconds this worker's process has used (all its threads)."""
        return time.process_time()

    # -- starting guests ----------------------------------------------------------------------
    async def launch(
        self,
        key: str,
        fields: dict[str, Any],
        image_key: str,
        image: bytes,
        disk: bytes | None,
        net_ip: int | None = None,
    ) -> None:
        path = self._dir / f"{image_key}.img"
        if not path.exists():
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_bytes(image)
            os.replace(temporary, path)
        local = self._disk(key, disk)
        config = GuestConfig.build(**fields, image=path, block=local)
        if net_ip is not None:
            self.bridge.claim(config.display_name, net_ip)
        guest = await self.sup.launch(config)
        writable = local is not None and not config.block_readonly
        self._host(key, _Hosted(guest, _Relay(), local, writable, 0, GuestStats()))

    async def revive(
        self,
        key: str,
        state: Capture,
        tail: bytes,
        eof: bool,
        fields: dict[str, Any],
        net_ip: int | None = None,
    ) -> None:
        """Continue a guest from ``state`` (a move or a checkpoint), input ``tail`` after it."""
        snap = Snapshot.from_bytes(state.snapshot, key)
        if net_ip is not None:
            self.bridge.claim(fields["name"], net_ip)
        local = self._disk(key, state.disk)
        # The half-written line goes into the new console before the guest runs: the
        # restore gives it a turn of the loop, in which it may go on writing that line.
        guest = await self.sup.restore(snap, console_partial=state.partial, block=local, **fields)
        readonly = bool(fields.get("block_readonly"))
        hosted = _Hosted(
            guest,
            _Relay(state.base, state.lines),
            local,
            local is not None and not readonly,
            state.received,
            GuestStats(**state.stats),
        )
        self._host(key, hosted)
        self._feed(hosted, state.received, tail)
        if eof:
            self._end(hosted, state.received + len(tail))

    def _disk(self, key: str, content: bytes | None) -> Path | None:
        if content is None:
            return None
        path = self._dir / f"{key}.disk"
        path.write_bytes(content)
        return path

    def _host(self, key: str, hosted: _Hosted) -> None:
        self._guests[key] = hosted
        hosted.pump = asyncio.create_task(self._pump(hosted), name=f"relay-{key}")

    async def _pump(self, hosted: _Hosted) -> None:
        async for line in hosted.guest.console:
            if not hosted.moved:  # a moved guest's last (flushed) partial line is not output
                hosted.relay.append(line)
        await hosted.guest.wait()
        hosted.relay.finish("ended")

    # -- console ------------------------------------------------------------------------------
    async def read(self, key: str, start: int) -> tuple[int, list[str], str, dict[str, Any], int]:
        """Lines numbered ``start`` on (waiting for one), the relay's state, the counters
        and the input bytes received so far.

        The lines before ``start`` are forgotten: the reader has them.  The state is
        ``running``, ``ended`` (no more lines will come) or ``moved``/``gone`` (ask
        the guest's new place).
        """
        hosted = self._guests.get(key)
        if hosted is None:
            return start, [], "gone", {}, 0
        relay = hosted.relay
        relay.trim(start)
        while relay.end <= start and relay.state == "running":
            relay.changed.clear()
            await relay.changed.wait()
        if relay.state == "moved":
            return start, [], "moved", {}, 0
        first = max(start, relay.base)
        skip = first - relay.base
        lines = [relay.lines[i] for i in range(skip, min(len(relay.lines), skip + READ_BATCH))]
        state = "ended" if relay.state == "ended" and first + len(lines) >= relay.end else "running"
        return first, lines, state, dataclasses.asdict(hosted.stats()), hosted.received

    async def feed(self, key: str, offset: int, data: bytes) -> None:
        hosted = self._guests.get(key)
        if hosted is not None and not hosted.moved:
            self._feed(hosted, offset, data)

    @classmethod
    def _feed(cls, hosted: _Hosted, offset: int, data: bytes) -> None:
        """Give the guest the bytes of ``data`` (input numbered from ``offset``) it has not had.

        Ray may run an async actor's calls out of order: a piece past a gap waits
        for the gap to be filled, so the guest sees its input in order, each byte once.
        """
        if offset > hosted.received:
            hosted.early[offset] = data
            return
        skip = hosted.received - offset
        if skip < len(data):
            chunk = data[skip:]
            hosted.guest.send(chunk)
            hosted.received += len(chunk)
        ready = [at for at in hosted.early if at <= hosted.received]
        for at in sorted(ready):
            cls._feed(hosted, at, hosted.early.pop(at))
        if hosted.eof_at is not None and hosted.received >= hosted.eof_at:
            hosted.guest.send_eof()

    async def end_input(self, key: str, total: int) -> None:
        """Input ends after byte ``total`` (once the bytes before it have arrived)."""
        hosted = self._guests.get(key)
        if hosted is not None and not hosted.moved:
            self._end(hosted, total)

    @staticmethod
    def _end(hosted: _Hosted, total: int) -> None:
        hosted.eof_at = total
        if hosted.received >= total:
            hosted.guest.send_eof()

    # -- the guest's life ------------------------------------------------------------------------
    async def wait(self, key: str) -> dict[str, Any]:
        """The guest's end: its Exit, stats and (writable block device) disk content.

        ``{"moved": True}`` if it moved away instead.
        """
        hosted = self._guests.get(key)
        if hosted is None:
            return {"moved": True}
        result = await hosted.guest.wait()
        if hosted.pump is not None:
            await asyncio.shield(hosted.pump)
        if hosted.moved:
            return {"moved": True}
        disk = hosted.disk.read_bytes() if hosted.writable and hosted.disk is not None else None
        return {
            "exit": dataclasses.asdict(result),
            "stats": dataclasses.asdict(hosted.stats()),
            "disk": disk,
        }

    async def kill(self, key: str, reason: str) -> None:
        hosted = self._guests.get(key)
        if hosted is not None and not hosted.moved:
            await hosted.guest.kill(reason)

    async def stats(self, key: str) -> dict[str, Any] | None:
        hosted = self._guests.get(key)
        return dataclasses.asdict(hosted.stats()) if hosted is not None else None

    async def snapshot(self, key: str) -> bytes:
        hosted = self._guests.get(key)
        if hosted is None or hosted.moved:
            raise SnapshotError("the guest has moved")
        return (await hosted.guest.snapshot()).to_bytes()

    @ray.method(num_returns=2)  # type: ignore[untyped-decorator]
    async def capture(self, key: str, hold: bool) -> tuple[dict[str, Any], Capture | None]:
        """Pause and capture the guest; then keep it paused here (``hold``: a move, which
        :meth:`release` ends) or let it run on (a checkpoint).

        Returns ``({"ended": True}, None)`` if the guest ended first.
        """
        hosted = self._guests.get(key)
        if hosted is None or hosted.moved:
            return {"ended": True}, None
        guest = hosted.guest
        try:
            await guest.pause()
            snap = await guest.snapshot()  # paused: stays paused
        except SnapshotError as exc:
            if guest.done:
                return {"ended": True}, None
            guest.resume()  # it runs on here, as it was
            return {"ended": False, "error": str(exc)}, None
        for line in guest.console.take():  # paused: nothing can arrive meanwhile
            hosted.relay.append(line)
        stats = hosted.stats()
        state = Capture(
            snapshot=snap.to_bytes(),
            disk=hosted.disk.read_bytes() if hosted.disk is not None else None,
            base=hosted.relay.base,
            lines=list(hosted.relay.lines),
            partial=guest.console.partial,
            received=hosted.received,
            stats=dataclasses.asdict(stats),
        )
        if not hold:
            guest.resume()
        info = {"ended": False, "received": hosted.received, "stats": dataclasses.asdict(stats)}
        return info, state

    async def release(
        self, key: str, moved: bool, net_at: tuple[str, int, str] | None = None
    ) -> None:
        """End a move that :meth:`capture` held: the guest runs elsewhere now (``moved``:
        it ends here, its readers are sent on), or the move failed and it runs on here
        from the instruction where it was held.

        ``net_at``: the moved guest's (name, address, worker) on the cluster's network:
        once it has left this worker's Network (its sockets closed, as at any end),
        it is a remote member here."""
        hosted = self._guests.get(key)
        if hosted is None or hosted.moved:
            return
        if moved:
            hosted.moved = True
            hosted.relay.finish("moved")
            if net_at is not None:  # connections do not follow it: reset, not ended
                self.bridge.reset(net_at[0])
            await hosted.guest.kill("moved")
            if net_at is not None:
                self.bridge.add(*net_at)
        else:
            hosted.guest.resume()

    async def forget(self, key: str) -> None:
        hosted = self._guests.pop(key, None)
        if hosted is None:
            return
        hosted.relay.finish("moved" if hosted.moved else "ended")
        if not hosted.guest.done:
            await hosted.guest.kill("forgotten")
        if hosted.disk is not None:
            hosted.disk.unlink(missing_ok=True)

    async def close(self) -> None:
        self._outbox.close()
        if self._bridge is not None:
            await self._bridge.aclose()
        if self._sup is not None:
            await self._sup.aclose()
        shutil.rmtree(self._dir, ignore_errors=True)


_RemoteWorker: Any = ray.remote(WorkerActor)


# -- the driver side -----------------------------------------------------------------------------
class Worker:
    """One worker actor as the driver sees it: ``name``, ``guests``, ``load``, ``kill()``."""

    def __init__(
        self,
        cluster: Cluster,
        name: str,
        actor: Any,
        max_guests: int | None,
        max_memory: int | None,
    ) -> None:
        self.name = name
        self.actor = actor
        self.alive = True
        self.pid: int | None = None
        self.node: str | None = None  # the IP address of its node
        self.node_id: str | None = None  # Ray's id of its node (several may share an address)
        self.max_guests = max_guests
        self.max_memory = max_memory
        self.placed = 0  # guests placed here so far (launched, moved or revived)
        self._cluster = cluster
        self._running: dict[int, int] = {}  # guest id -> bytes of guest memory

    @property
    def guests(self) -> int:
        """Guests running here now."""
        return len(self._running)

    @property
    def memory(self) -> int:
        """Bytes of guest memory running here now."""
        return sum(self._running.values())

    @property
    def load(self) -> float:
        """How full the worker is: the fuller of its two bounds (0..1), or its guest count
        when it has none.  New guests go where it is lowest."""
        parts = []
        if self.max_guests is not None:
            parts.append(self.guests / self.max_guests)
        if self.max_memory is not None:
            parts.append(self.memory / self.max_memory)
        return max(parts) if parts else float(self.guests)

    def has_room(self, memory: int) -> bool:
        if self.max_guests is not None and self.guests >= self.max_guests:
            return False
        return self.max_memory is None or self.memory + memory <= self.max_memory

    def _add(self, gid: int, memory: int, *, placed: bool = True) -> None:
        self._running[gid] = memory
        if placed:
            self.placed += 1

    def _remove(self, gid: int) -> None:
        self._running.pop(gid, None)

    async def cpu_time(self) -> float:
        """CPU seconds the worker's process has used so far."""
        seconds: float = await self.actor.cpu_time.remote()
        return seconds

    async def kill(self) -> None:
        """End the worker's process abruptly, as a lost node would (no clean-up there).

        Returns once calls to it fail; its guests are revived from their last
        checkpoint elsewhere (or end as died when there is none).
        """
        self.alive = False
        ray.kill(self.actor, no_restart=True)
        with contextlib.suppress(RayActorError):
            async with asyncio.timeout(30):
                while True:
                    await self.actor.ping.remote()
                    await asyncio.sleep(0.01)

    def __repr__(self) -> str:
        state = "alive" if self.alive else "dead"
        return f"<Worker {self.name} {state} guests={self.guests}>"


@dataclass(eq=False)
class _Place:
    """One incarnation of a guest: on ``worker`` under ``key``; ``ready`` once it runs there."""

    worker: Worker
    key: str
    ready: asyncio.Future[bool] = field(default_factory=lambda: asyncio.Future())


@dataclass
class _Checkpoint:
    state: Any  # ObjectRef of a Capture, owned by the driver
    received: int
    stats: dict[str, Any]


class RemoteGuest:
    """A guest running on a cluster worker, with :class:`~supervisor.host.Guest`'s surface.

    ``stats`` is the last count the driver heard (exact once the guest has ended);
    ``await fetch_stats()`` asks the worker now.
    """

    def __init__(self, cluster: Cluster, gid: int, config: GuestConfig, place: _Place) -> None:
        self.config = config
        self.name = config.display_name
        self.gid = gid
        self.memory = plan(config.memory).memory_size
        self._cluster = cluster
        self._where = place
        self._incarnation = 0
        self._relocated = asyncio.Event()
        self._lock = asyncio.Lock()  # one move, checkpoint, snapshot or kill at a time
        self._input = bytearray()  # console input from byte _input_base on
        self._input_base = 0
        self._eof = False
        self._next_line = 0  # number of the next console line to deliver
        self._stats = GuestStats()
        self._checkpoint: _Checkpoint | None = None
        self._moves = 0
        self._revivals = 0
        self._checkpoints = 0
        self._killed: str | None = None
        self._console_done = False
        self._net_ip: int | None = None  # its address on the cluster's network (net=True)
        self._task = asyncio.create_task(self._supervise(), name=f"remote-{self.name}")

    # -- where --------------------------------------------------------------------------------
    @property
    def worker(self) -> Worker:
        """The worker it runs on now (or ran on last)."""
        return self._where.worker

    @property
    def moves(self) -> int:
        """How many times it was migrated."""
        return self._moves

    @property
    def checkpoints(self) -> int:
        """How many checkpoints were taken of it."""
        return self._checkpoints

    @property
    def revivals(self) -> int:
        """How many times it was revived from a checkpoint after a worker was lost."""
        return self._revivals

    def _next_key(self) -> str:
        self._incarnation += 1
        return f"{self.gid}.{self._incarnation}"

    def _relocate(self, place: _Place, *, back: bool = False) -> None:
        """Run at ``place`` from now on (``back``: at the place a failed move left, which
        then counts as never placed where the move meant to go)."""
        old = self._where
        old.worker._remove(self.gid)
        if back:
            old.worker.placed -= 1
        place.worker._add(self.gid, self.memory, placed=not back)
        self._where = place
        self._relocated.set()

    async def _placed(self, old: _Place) -> None:
        """Wait until the guest has a place other than ``old``, or has ended."""
        while self._where is old and not self._task.done():
            self._relocated.clear()
            ended: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(self._task))
            moved: asyncio.Future[Any] = asyncio.ensure_future(self._relocated.wait())
            await asyncio.wait({ended, moved}, return_when=asyncio.FIRST_COMPLETED)
            for pending in (ended, moved):
                pending.cancel()

    # -- Guest's surface ----------------------------------------------------------------------
    @property
    def console(self) -> AsyncIterator[str]:
        """Console output lines, across moves and revivals; for one reader at a time."""
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        while True:
            place = self._where
            state = "gone"
            if await place.ready:
                try:
                    reply = await place.worker.actor.read.remote(place.key, self._next_line)
                except RayActorError:
                    state = "lost"
                else:
                    first, lines, state, stats, received = reply
                    if stats:
                        self._stats = GuestStats(**stats)
                    if self._checkpoint is None and self._where is place:
                        self._drop_input_before(received)  # a move re-sends only what follows
                    for number, line in enumerate(lines, first):
                        if number >= self._next_line:
                            self._next_line = number + 1
                            yield line
            if state == "ended":
                self._console_done = True
                if self._task.done():  # else the supervising task forgets it at the end
                    place.worker.actor.forget.remote(place.key)
                return
            if state != "running":
                await self._placed(place)
                if self._where is place:
                    return  # ended without another place: the lines there are gone

    def send(self, text: str | bytes) -> None:
        """Queue console input (UTF-8 encoded if ``str``); it survives moves and revivals."""
        data = text.encode() if isinstance(text, str) else text
        if not data or self._eof:
            return
        offset = self._input_base + len(self._input)
        self._input += data
        place = self._where
        if place.ready.done() and place.ready.result():
            place.worker.actor.feed.remote(place.key, offset, data)

    def send_eof(self) -> None:
        """End console input after what is already queued."""
        if self._eof:
            return
        self._eof = True
        place = self._where
        if place.ready.done() and place.ready.result():
            place.worker.actor.end_input.remote(place.key, self._input_base + len(self._input))

    def _input_from(self, offset: int) -> bytes:
        return bytes(self._input[max(offset - self._input_base, 0) :])

    def _drop_input_before(self, offset: int) -> None:
        if offset > self._input_base:
            del self._input[: offset - self._input_base]
            self._input_base = offset

    @property
    def stats(self) -> GuestStats:
        """Counters as last heard (exact once the guest has ended)."""
        return self._stats

    async def fetch_stats(self) -> GuestStats:
        """Counters now, asked of the worker."""
        place = self._where
        if not self._task.done() and await place.ready:
            with contextlib.suppress(RayActorError):
                stats = await place.worker.actor.stats.remote(place.key)
                if stats is not None:
                    self._stats = GuestStats(**stats)
        return self._stats

    @property
    def done(self) -> bool:
        return self._task.done()

    async def wait(self) -> Exit:
        """Wait for the guest to end (wherever it runs then) and return how."""
        return await asyncio.shield(self._task)

    async def kill(self, reason: str = "killed") -> Exit:
        """End the guest now (no effect if it has ended); return its :class:`Exit`."""
        if self._killed is None and not self._task.done():
            self._killed = reason
        async with self._lock:
            place = self._where
            if not self._task.done() and await place.ready:
                with contextlib.suppress(RayActorError):
                    await place.worker.actor.kill.remote(place.key, reason)
        return await self.wait()

    async def snapshot(self) -> Snapshot:
        """The guest's whole state, taken on its worker (it runs on afterwards)."""
        async with self._lock:
            place = self._where
            if self._task.done() or not await place.ready:
                raise SnapshotError("the guest has ended")
            try:
                raw = await place.worker.actor.snapshot.remote(place.key)
            except RayTaskError as exc:
                raise SnapshotError(str(exc.cause)) from None
            return Snapshot.from_bytes(raw)

    # -- driver-side life ---------------------------------------------------------------------
    async def _supervise(self) -> Exit:
        """Follow the guest across moves and revivals until it ends; write its disk back."""
        result: dict[str, Any] | None = None
        while result is None:
            place = self._where
            out: dict[str, Any] | None = None
            if await place.ready:
                with contextlib.suppress(RayActorError):
                    out = await place.worker.actor.wait.remote(place.key)
            if out is None:  # its worker is gone
                if self._where is not place:
                    continue  # it moved meanwhile
                place.worker.alive = False
                self._cluster.net._worker_lost(place.worker)
                if self._killed is not None or not await self._cluster._revive(self, place):
                    self._where.worker._remove(self.gid)
                    reason = self._killed or f"worker {place.worker.name} lost"
                    return Exit(None, reason, 0, died=True)
                continue
            if out.get("moved"):
                await self._placed(place)
                continue
            result = out
        self._where.worker._remove(self.gid)
        if self.config.net:
            self._cluster.net._leave(self.name, self._where.worker)
        self._stats = GuestStats(**result["stats"])
        if result["disk"] is not None and self.config.block is not None:
            _write_back(self.config.block, result["disk"])
        if self.config.console == "null" or self._console_done:
            self._where.worker.actor.forget.remote(self._where.key)
        return Exit(**result["exit"])

    def _revive_fields(self) -> dict[str, Any]:
        return revive_fields(self.config)

    def __repr__(self) -> str:
        state = "running" if not self.done else "ended"
        return f"<RemoteGuest {self.name} on {self.worker.name} {state}>"


class ClusterNetwork:
    """The cluster's one network (``cl.net``): every guest launched with ``net=True``,
    on whichever worker, reaches every other by name (docs/cluster.md, "One network
    across workers").

    The driver holds the one table of names and addresses and tells every worker;
    each worker's Network holds the guests elsewhere as remote members.  The faults
    are set here and applied by every worker, to the bytes its guests send.

    ``host`` is this program, the driver, on every worker: :meth:`start_server`
    listens as ``host:PORT`` for guests on any worker, :meth:`open_connection` and
    :meth:`open_datagram` reach a guest by name wherever it runs.  The driver is
    one more node of the network, whose one member is ``host``: its own Network
    holds every networked guest as a remote member, and its connections travel
    as the workers' do (ordered, acknowledged pieces), its pieces for a worker as
    actor calls of that worker, a worker's for it fetched by a long poll.
    """

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._table: dict[str, tuple[int, Worker]] = {}  # name -> (address, worker)
        self._next = FIRST_GUEST
        self._lost: set[str] = set()  # workers whose loss every worker has been told
        self._net = Network()  # the driver's: host here, every networked guest remote
        self._bridge = NetBridge(DRIVER, self._net, self._call)
        self._tasks: set[asyncio.Task[None]] = set()  # long polls and calls being served
        self._answers: dict[str, list[tuple[int, bool, Any]]] = {}  # to send, per worker

    # -- the driver's host -------------------------------------------------------------------
    async def open_connection(
        self, name_or_address: str, port: int, *, limit: int = 2**16
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect from ``host`` to a networked guest's ``port``, on whichever worker it
        runs, as :meth:`supervisor.net.Network.open_connection` does
        (``ConnectionRefusedError`` if nothing listens there)."""
        return await self._net.open_connection(name_or_address, port, limit=limit)

    async def start_server(
        self,
        client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
        port: int,
        *,
        backlog: int = 100,
        limit: int = 2**16,
    ) -> NetServer:
        """Listen as ``host:port`` for the guests on every worker, as
        :meth:`supervisor.net.Network.start_server` does for one Supervisor's."""
        return await self._net.start_server(client_connected_cb, port, backlog=backlog, limit=limit)

    async def open_datagram(self, port: int = 0) -> DatagramEndpoint:
        """A UDP socket of ``host`` bound to ``port`` (0: any free port), which sends to
        and hears from networked guests on every worker."""
        return await self._net.open_datagram(port)

    async def _call(self, worker: str, method: str, *args: Any) -> Any:
        """The driver's bridge's call of a worker: an actor call."""
        for w in self._cluster.workers:
            if w.name == worker and w.alive:
                return await getattr(w.actor, method).remote(*args)
        raise ClusterError(f"worker {worker} is not alive")

    def _serve(self) -> None:
        """Start fetching each worker's calls of the driver."""
        loop = asyncio.get_running_loop()
        for worker in self._cluster.workers:
            self._keep(loop.create_task(self._poll(worker), name=f"net-poll-{worker.name}"))

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _poll(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        while worker.alive:
            try:
                calls = await worker.actor.net_calls.remote()
            except RayActorError:
                return  # lost: its guests' supervising tasks tell the network
            if calls is None:
                return  # closing
            for number, method, args in calls:
                self._keep(loop.create_task(self._answer(worker, number, method, args)))

    async def _answer(self, worker: Worker, number: int, method: str, args: Any) -> None:
        try:
            if method not in DRIVER_CALLS:
                raise ValueError(f"no call {method!r}")
            value, ok = await getattr(self._bridge, method)(*args), True
        except Exception as exc:
            value, ok = _reason(exc), False
        pending = self._answers.setdefault(worker.name, [])
        pending.append((number, ok, value))
        if len(pending) == 1:  # the answers ready in this step go in one call
            asyncio.get_running_loop().call_soon(self._send_answers, worker)

    def _send_answers(self, worker: Worker) -> None:
        answers = self._answers.pop(worker.name, [])
        if answers and worker.alive:
            worker.actor.net_answers.remote(answers)

    async def _close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._bridge.aclose()
        await self._net.aclose()

    @property
    def members(self) -> dict[str, str]:
        """Every networked guest running now: name -> address."""
        return {name: ip_str(ip) for name, (ip, _) in sorted(self._table.items())}

    def resolve(self, name: str) -> str:
        """A networked guest's address (``OSError`` ``EHOSTUNREACH`` for a name nobody has)."""
        entry = self._table.get(name)
        if entry is None:
            raise OSError(errno.EHOSTUNREACH, f"no {name!r} on the cluster's network")
        return ip_str(entry[0])

    def worker_of(self, name: str) -> Worker:
        """The worker where the networked guest ``name`` runs now."""
        self.resolve(name)
        return self._table[name][1]

    async def partition(self, group_a: list[str], group_b: list[str]) -> None:
        """Cut every member of ``group_a`` off from every member of ``group_b``
        (:meth:`supervisor.net.Network.partition`), on every worker, before it returns."""
        for group in (group_a, group_b):
            if isinstance(group, str):
                raise TypeError(f"a group is a list of names or addresses, not {group!r}")
            for name in group:
                self._known(name)
        await self._fault("partition", list(group_a), list(group_b))

    async def heal(self) -> None:
        """End every partition, on every worker."""
        await self._fault("heal")

    async def link(self, a: str, b: str, **faults: float | None) -> None:
        """Faults between ``a`` and ``b`` (:meth:`supervisor.net.Network.link`: ``delay``,
        ``jitter``, ``loss``, ``rate``), applied where the bytes are sent."""
        self._known(a)
        self._known(b)
        await self._fault("link", a, b, **faults)

    async def unlink(self, a: str, b: str) -> None:
        self._known(a)
        self._known(b)
        await self._fault("unlink", a, b)

    def _known(self, name_or_address: str) -> None:
        if name_or_address in self._table or name_or_address == "host":  # host: the driver
            return
        try:
            ip = ip_int(name_or_address)
        except ValueError:
            raise OSError(errno.EHOSTUNREACH, f"no {name_or_address!r} on the network") from None
        if ip & NET_MASK != NET_PREFIX:  # as Network.partition: any address inside it
            raise OSError(errno.ENETUNREACH, f"{name_or_address!r} is outside the network")

    async def _fault(self, fault: str, *args: Any, **kwargs: Any) -> None:
        self._bridge.apply(fault, *args, **kwargs)  # the driver's host sends bytes too
        live = [w for w in self._cluster.workers if w.alive]
        calls = [w.actor.net_fault.remote(fault, list(args), kwargs) for w in live]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for result in results:
            if isinstance(result, RayTaskError):
                raise result.cause from None

    # -- the table ---------------------------------------------------------------------------
    def _assign(self, name: str) -> int:
        """A new guest's address, unique on the cluster (``ClusterError`` if ``name`` is
        on the network already or no address is left)."""
        if name in self._table:
            raise ClusterError(f"{name!r} is already on the cluster's network")
        taken = {ip for ip, _ in self._table.values()}
        ip = self._next
        for _ in range(0xFFFD):
            if ip & 0xFFFF == 0xFFFF:
                ip = FIRST_GUEST
            if ip not in taken:
                break
            ip += 1
        else:
            raise ClusterError("the cluster's network has no free address left")
        self._next = ip + 1
        return ip

    async def _place(self, name: str, ip: int, worker: Worker) -> None:
        """``name`` (``ip``) runs on ``worker`` from now on: every other worker holds it as
        a remote member before it runs, so its name resolves everywhere from its start."""
        self._table[name] = (ip, worker)
        self._bridge.add(name, ip, worker.name)
        others = [w for w in self._cluster.workers if w.alive and w is not worker]
        await asyncio.gather(
            *(w.actor.net_add.remote(name, ip, worker.name) for w in others),
            return_exceptions=True,
        )

    def _leave(self, name: str, worker: Worker) -> None:
        """``name`` has ended on ``worker``: its name is free everywhere."""
        entry = self._table.get(name)
        if entry is None or entry[1] is not worker:
            return
        del self._table[name]
        self._bridge.drop(name)
        for w in self._cluster.workers:
            if w.alive and w is not worker:
                w.actor.net_drop.remote(name)

    def _worker_lost(self, worker: Worker) -> None:
        """Tell every live worker (once) that ``worker`` is gone: connections to its
        guests are reset there, and their names stop resolving until a revival."""
        if worker.name in self._lost:
            return
        self._lost.add(worker.name)
        for name in [n for n, (_, w) in self._table.items() if w is worker]:
            del self._table[name]
        self._bridge.lost(worker.name)
        for w in self._cluster.workers:
            if w.alive and w is not worker:
                w.actor.net_lost.remote(worker.name)


def revive_fields(config: GuestConfig) -> dict[str, Any]:
    """The config fields a worker restores a moved or revived guest with, beside its
    snapshot (a restore takes none of these from the snapshot itself)."""
    return {
        "name": config.display_name,
        "console": _console_mode(config),
        "block_readonly": config.block_readonly,
        # The same directories, named again: a restore never opens the snapshot's.
        "dirs": [d.model_dump(mode="json") for d in config.dirs],
        # Likewise the network and the outside addresses it may reach: a restore drops
        # the snapshot's.
        "net": config.net,
        "allow_outbound": list(config.allow_outbound),
    }


def _existing_cluster() -> bool:
    """Whether Ray's rule for no address finds a cluster to join rather than starting
    one: ``RAY_ADDRESS``, or the cluster ``ray start`` started last on this machine."""
    if os.environ.get("RAY_ADDRESS"):
        return True
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(None) is not None


def _choose_token_auth() -> None:
    """Choose token authentication for a Ray this process starts, unless ``RAY_AUTH_MODE``
    already chooses: what Ray does when the mode is unset, without its warning that the
    mode was unset (printed at every start).

    Ray reads the mode when it is imported: the variable alone would leave this process
    on the old mode and its new cluster on the new one, so Ray's own switch does both
    (it also makes the token, ``~/.ray/auth_token``, if there is none).
    """
    if os.environ.get(_AUTH_MODE) is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth
    except ImportError:  # pragma: no cover - another Ray: its default, with its warning
        return
    _enable_token_auth()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a background task's outcome as seen (its caller may have been cancelled)."""
    if not task.cancelled():
        task.exception()


def _reason(exc: BaseException) -> str:
    """One line for a failed remote call: the worker's own exception, not Ray's wrapper."""
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


def _console_mode(config: GuestConfig) -> str:
    return "null" if config.console == "null" else "capture"


def _write_back(path: Path, content: bytes) -> None:
    """Replace ``path``'s content with ``content`` in one step (never a torn file)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.writeback")
    temporary.write_bytes(content)
    with contextlib.suppress(OSError):
        shutil.copymode(path, temporary)
    os.replace(temporary, path)


class Cluster:
    """Workers on a Ray cluster, each a :class:`Supervisor` on its own event loop.

    ``address``: a Ray cluster to connect to (``"auto"``, ``"HOST:PORT"``,
    ``"ray://HOST:PORT"``), or ``"local"`` for a Ray of its own on this machine; none
    joins the cluster ``ray start`` started on this machine (or ``RAY_ADDRESS``
    names), as ``ray.init()`` does, and otherwise starts a local Ray.  ``workers``: how many
    (default one per CPU of the cluster).  ``checkpoint_every``: seconds between
    checkpoints of every guest (default none: a lost worker loses its guests).
    ``max_guests``/``max_memory``: each worker's bounds, as for :class:`Supervisor`.
    Leaving ``async with`` kills the guests still running, ends the workers, and
    shuts down the Ray it started (or disconnects from the one it joined).
    """

    def __init__(
        self,
        address: str | None = None,
        workers: int | None = None,
        checkpoint_every: float | None = None,
        *,
        max_guests: int | None = None,
        max_memory: int | None = None,
    ) -> None:
        if workers is not None and workers < 1:
            raise ValueError("a cluster needs at least one worker")
        if checkpoint_every is not None and checkpoint_every <= 0:
            raise ValueError("checkpoint_every must be a positive number of seconds")
        self.address = address
        self.checkpoint_every = checkpoint_every
        self.workers: list[Worker] = []
        self.guests: list[RemoteGuest] = []
        self._want = workers
        self._limits = (max_guests, max_memory)
        self._connected = False
        self._closing = False
        self._images: dict[str, Any] = {}  # content hash -> ObjectRef of the image bytes
        self._checkpointer: asyncio.Task[None] | None = None
        self.net = ClusterNetwork(self)

    async def __aenter__(self) -> Cluster:
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address == "local" or (self.address is None and not _existing_cluster()):
                # A Ray of its own, of as many CPUs as workers (Ray starts a process per
                # CPU), with token authentication (Ray's default) chosen, not defaulted to.
                _choose_token_auth()
                ray.init(address="local", num_cpus=self._want, **options)
            else:
                # Joining: the cluster's nodes have their CPUs (Ray refuses num_cpus here).
                ray.init(address=self.address, **options)
            self._connected = True
        try:
            await self._start_workers()
        except BaseException:
            await self.aclose()
            raise
        if self.checkpoint_every is not None:
            self._checkpointer = asyncio.create_task(self._checkpoints(self.checkpoint_every))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _start_workers(self) -> None:
        cpus = float(ray.cluster_resources().get("CPU", 1))
        n = self._want or max(1, int(cpus))
        per = min(1.0, cpus / n)
        prefix = os.urandom(3).hex()
        for i in range(n):
            name = f"w{i}"
            actor = _RemoteWorker.options(
                num_cpus=per,
                scheduling_strategy="SPREAD",
                name=f"lguest-{prefix}-{name}",
                # Every guest has a wait() and maybe a console read pending at all times.
                max_concurrency=MAX_CALLS,
            ).remote(name, *self._limits)
            self.workers.append(Worker(self, name, actor, *self._limits))
        infos = await asyncio.gather(*(w.actor.start.remote() for w in self.workers))
        for worker, info in zip(self.workers, infos, strict=True):
            worker.pid, worker.node, worker.node_id = info["pid"], info["node"], info["node_id"]
        peers = {w.name: w.actor for w in self.workers}
        await asyncio.gather(*(w.actor.net_peers.remote(peers) for w in self.workers))
        self.net._serve()

    async def aclose(self) -> None:
        """Kill the guests, end the workers; shut Ray down if this cluster started it."""
        if self._closing:
            return
        self._closing = True
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
        await self.net._close()
        live = [w for w in self.workers if w.alive]
        with contextlib.suppress(Exception):
            async with asyncio.timeout(30):
                await asyncio.gather(
                    *(w.actor.close.remote() for w in live), return_exceptions=True
                )
        for guest in self.guests:
            if not guest._task.done():
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await guest.wait()
        for worker in live:
            worker.alive = False
            with contextlib.suppress(Exception):
                ray.kill(worker.actor, no_restart=True)
        for guest in self.guests:
            if not guest._task.done():
                guest._task.cancel()
                with contextlib.suppress(BaseException):
                    await guest._task
        if self._connected:
            ray.shutdown()
            self._connected = False

    # -- placement ---------------------------------------------------------------------------
    def _pick(self, memory: int, exclude: Worker | None = None) -> Worker | None:
        """The least loaded live worker with room (None if every one is full)."""
        fits = [w for w in self.workers if w.alive and w is not exclude and w.has_room(memory)]
        return min(fits, key=lambda w: (w.load, w.guests, w.placed), default=None)

    def _fallback(self, exclude: Worker | None = None) -> Worker:
        """When every worker is full: the least loaded live one (its device refuses)."""
        live = [w for w in self.workers if w.alive and w is not exclude]
        if not live:
            raise ClusterError("no live worker left")
        return min(live, key=lambda w: (w.load, w.guests, w.placed))

    # -- launching -------------------------------------------------------------------------------
    async def launch(self, config: GuestConfig, *, worker: Worker | None = None) -> RemoteGuest:
        """Start a guest on ``worker`` or the least loaded one with room.

        The image (and block file) travel by content.  A bad image raises
        :class:`~supervisor.launcher.loader.ImageError`, an unreadable block file
        ``OSError``, before anything runs.  With every worker full the guest ends
        at once with "cannot start: Cannot allocate memory", as on one Supervisor.
        """
        if self._closing or not self.workers:
            raise ClusterError("the cluster is not running (use 'async with Cluster()')")
        if config.gdb is not None:
            raise ClusterError("gdb is not supported for guests on a cluster")
        raw = config.image.read_bytes()
        parse_image(raw, str(config.image))  # a bad image fails here, with its name
        disk = None
        if config.block is not None:
            disk = config.block.read_bytes()
            if not config.block_readonly and not os.access(config.block, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(config.block))
        image_key = hashlib.sha256(raw).hexdigest()[:32]
        image_ref = self._images.get(image_key)
        if image_ref is None:
            image_ref = self._images[image_key] = ray.put(raw)
        memory = plan(config.memory).memory_size
        target = worker if worker is not None else self._pick(memory) or self._fallback()
        if not target.alive:
            raise ClusterError(f"worker {target.name} is not alive")
        fields = config.model_dump(exclude={"image", "block", "gdb"})
        fields["console"] = _console_mode(config)
        net_ip = None
        if config.net:
            # Named as the driver knows it (a worker names its copy of the image anew).
            fields["name"] = config.display_name
            net_ip = self.net._assign(config.display_name)
            await self.net._place(config.display_name, net_ip, target)
        gid = len(self.guests)
        place = _Place(target, f"{gid}.0")
        target._add(gid, memory)
        try:
            await target.actor.launch.remote(place.key, fields, image_key, image_ref, disk, net_ip)
        except RayTaskError as exc:
            target._remove(gid)
            if config.net:
                self.net._leave(config.display_name, target)
            raise exc.cause from None
        except BaseException:
            target._remove(gid)
            if config.net:
                self.net._leave(config.display_name, target)
            raise
        place.ready.set_result(True)
        guest = RemoteGuest(self, gid, config, place)
        guest._net_ip = net_ip
        self.guests.append(guest)
        return guest

    # -- moving ----------------------------------------------------------------------------------
    async def migrate(self, guest: RemoteGuest, worker: Worker | None = None) -> Worker:
        """Move a running guest to ``worker`` (default: the least loaded other one with room).

        Pause, capture, ship, revive, resume: the guest cannot tell, and its
        console goes on with nothing lost and nothing repeated.  Returns where it
        runs now.  :class:`GuestEndedError` if it has ended (before or during the
        move); :class:`ClusterError` if no worker can take it, or if the move
        failed (the destination died or could not revive it): the guest then
        runs on where it was, from where it was paused, and ``guest.worker``
        says so.  Cancelling the call does not cancel the move, which ends one
        way or the other.
        """
        move = asyncio.ensure_future(self._migrate(guest, worker))
        move.add_done_callback(_retrieve)
        return await asyncio.shield(move)

    async def _migrate(self, guest: RemoteGuest, worker: Worker | None) -> Worker:
        async with guest._lock:
            old = guest._where
            if guest.done:
                raise GuestEndedError(f"{guest.name} has ended")
            target = worker if worker is not None else self._pick(guest.memory, old.worker)
            if target is None:
                raise ClusterError(f"no other worker has room for {guest.name}")
            if target is old.worker:
                return target
            if not target.alive:
                raise ClusterError(f"worker {target.name} is not alive")
            if not target.has_room(guest.memory):
                raise ClusterError(f"worker {target.name} is full")
            # Held, not ended, at the source until the target runs it: a failed move
            # leaves the guest where it was.
            info_ref, state_ref = old.worker.actor.capture.remote(old.key, True)
            try:
                info = await info_ref
            except RayActorError:
                raise ClusterError(f"worker {old.worker.name} was lost during the move") from None
            if info["ended"]:
                raise GuestEndedError(f"{guest.name} has ended")
            if "error" in info:
                raise ClusterError(f"cannot capture {guest.name}: {info['error']}")
            eof = guest._eof
            failure = await self._revive_at(guest, target, state_ref, info["received"])
            if failure is not None:
                failed = guest._where
                await self._move_back(guest, old, info["received"], eof)
                if isinstance(failure, RayActorError):
                    target.alive = False
                    why = f"worker {target.name} died during the move"
                else:
                    target.actor.forget.remote(failed.key)
                    why = f"worker {target.name} could not revive it: {_reason(failure)}"
                raise ClusterError(
                    f"cannot move {guest.name}: {why}; it runs on at {old.worker.name}"
                )
            with contextlib.suppress(RayActorError):  # (a lost source: nothing to end there)
                net_at = None
                if guest._net_ip is not None:
                    net_at = (guest.name, guest._net_ip, target.name)
                await old.worker.actor.release.remote(old.key, True, net_at)
            guest._moves += 1
            guest._stats = GuestStats(**info["stats"])
            if guest._checkpoint is None:
                guest._drop_input_before(info["received"])
            old.worker.actor.forget.remote(old.key)
            return target

    async def _move_back(self, guest: RemoteGuest, old: _Place, received: int, eof: bool) -> None:
        """A move failed: ``guest`` runs on at ``old``, where it was held, with the input
        sent meanwhile (the worker skips the bytes it has)."""
        guest._relocate(old, back=True)
        if guest._net_ip is not None:  # its name is where it runs again, everywhere
            await self.net._place(guest.name, guest._net_ip, old.worker)
        with contextlib.suppress(RayActorError):  # (a lost source: the guest's task sees it)
            await old.worker.actor.release.remote(old.key, False)
            tail = guest._input_from(received)
            if tail:
                old.worker.actor.feed.remote(old.key, received, tail)
            if guest._eof and not eof:
                old.worker.actor.end_input.remote(old.key, guest._input_base + len(guest._input))

    async def _revive_at(
        self, guest: RemoteGuest, target: Worker, state: Any, received: int
    ) -> BaseException | None:
        """Continue ``guest`` on ``target`` from ``state`` (input numbered from ``received``).

        Returns None once it runs there, or the error that kept it from running there:
        ``RayActorError`` if ``target`` died, ``RayTaskError`` if it could not revive it.
        """
        place = _Place(target, guest._next_key())
        tail = guest._input_from(received)
        sent = guest._input_base + len(guest._input)
        guest._relocate(place)
        net_ip = guest._net_ip
        try:
            if net_ip is not None:  # its name resolves everywhere before it runs again
                await self.net._place(guest.name, net_ip, target)
            await target.actor.revive.remote(
                place.key, state, tail, guest._eof, guest._revive_fields(), net_ip
            )
        except (RayActorError, RayTaskError) as exc:
            place.ready.set_result(False)
            failure: BaseException = exc
            return failure
        except BaseException:
            place.ready.set_result(False)
            raise
        place.ready.set_result(True)
        if guest._killed is not None:
            target.actor.kill.remote(place.key, guest._killed)
        late = guest._input_from(sent)  # sent while the revival was on its way
        if late:
            target.actor.feed.remote(place.key, sent, late)
        if guest._eof:
            target.actor.end_input.remote(place.key, sent + len(late))
        return None

    async def _revive(self, guest: RemoteGuest, lost: _Place) -> bool:
        """After ``lost``'s worker died: continue from the last checkpoint elsewhere."""
        checkpoint = guest._checkpoint
        if checkpoint is None or self._closing:
            return False
        refused: set[Worker] = set()  # live workers that could not revive it
        while True:
            candidates = [w for w in self.workers if w.alive and w is not lost.worker]
            candidates = [w for w in candidates if w not in refused]
            if not candidates:
                return False
            fits = [w for w in candidates if w.has_room(guest.memory)] or candidates
            target = min(fits, key=lambda w: (w.load, w.guests, w.placed))
            failure = await self._revive_at(guest, target, checkpoint.state, checkpoint.received)
            if failure is None:
                guest._revivals += 1
                guest._stats = GuestStats(**checkpoint.stats)
                return True
            if isinstance(failure, RayActorError):
                target.alive = False
            else:
                refused.add(target)

    # -- checkpoints -------------------------------------------------------------------------------
    async def _checkpoints(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            running = [g for g in self.guests if not g.done]
            await asyncio.gather(*(self.checkpoint(g) for g in running), return_exceptions=True)

    async def checkpoint(self, guest: RemoteGuest) -> bool:
        """Capture ``guest`` now (it runs on); a lost worker revives it from here.

        The capture is kept in the object store under the driver's ownership.
        Returns False if the guest ended (or its worker was lost) first.
        """
        async with guest._lock:
            place = guest._where
            if guest.done or not await place.ready:
                return False
            info_ref, state_ref = place.worker.actor.capture.remote(place.key, False)
            try:
                info = await info_ref
                if info["ended"] or "error" in info:
                    return False
                state = await state_ref
            except RayActorError:
                return False
            guest._checkpoint = _Checkpoint(ray.put(state), info["received"], info["stats"])
            guest._checkpoints += 1
            guest._stats = GuestStats(**info["stats"])
            guest._drop_input_before(info["received"])
            return True

    def __repr__(self) -> str:
        return f"<Cluster {len(self.workers)} workers, {len(self.guests)} guests>"
