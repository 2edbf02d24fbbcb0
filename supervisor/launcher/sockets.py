"""The file device's socket requests, served against :mod:`supervisor.net`.

A socket is an open description in the file device's one descriptor table, so
``dup``, ``close``, ``fcntl`` and ``poll`` treat files and sockets alike.  The
requests (docs/abi.md, "Sockets") never wait on the Launcher's side: a call
that cannot complete answers :data:`NET_WAIT` to a blocking socket (the runtime
halts until the device's irq says something changed, then asks again) and
``-EAGAIN`` to a non-blocking one.  Whenever a guest's socket state changes the
device adds one to the descriptor's ``events`` counter and raises its irq.

A ``recvfrom`` or ``sendto`` that asks for it (:data:`OP_PARK` in the op word) and
answers :data:`NET_WAIT` is *parked*: the device keeps its arguments and, at the
next change of the guest's sockets (:meth:`FilesDevice.poll`, the guest stopped),
tries it again; once it completes, the data is in the guest's buffer and the
result in the descriptor before ``events`` moves, so the woken runtime returns it
without a second request.  Any later request of the guest forgets a parked one.

The runtime learns which descriptors are sockets from a bitmap in guest RAM
whose address it stores in the descriptor (``sockmap``): the device sets a
descriptor's bit when it installs a socket there and clears it when the
descriptor goes, so the runtime's read and write of a socket take the socket
path without asking.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .. import net
from .devices import Slot

if TYPE_CHECKING:
    from .files import FilesDevice

FS_SOCKMAP = 56  # guest: address of the socket bitmap (bit fd set: fd is a socket)
FS_EVENTS = 60  # Launcher: counts socket state changes (the runtime waits for a change)

OP_SOCKET = 22
OP_BIND = 23
OP_LISTEN = 24
OP_ACCEPT = 25
OP_CONNECT = 26
OP_SENDTO = 27
OP_RECVFROM = 28
OP_SHUTDOWN = 29
OP_SOCKNAME = 30
OP_SETSOCKOPT = 31
OP_GETSOCKOPT = 32
OP_POLL = 33

NET_WAIT = -(1 << 20)  # not an errno: "wait for the irq, then ask again"
# In the op word: "if this must wait, finish it yourself when it can" (see the top).
OP_PARK = 1 << 16
# In the op word: "I halt after this request" (it came through the hypercall ring with a
# halt behind it): unless it is parked, the device raises its irq, which ends the halt.
OP_HALTS = 1 << 17
MAX_POLL = 1 << 17

AF_UNSPEC, AF_INET = 0, 2
SOCK_STREAM, SOCK_DGRAM = 1, 2
SOCK_NONBLOCK, SOCK_CLOEXEC = 0o4000, 0o2000000
MSG_PEEK, MSG_TRUNC, MSG_DONTWAIT = 0x2, 0x20, 0x40
SOL_SOCKET, IPPROTO_IP, IPPROTO_TCP, IPPROTO_UDP = 1, 0, 6, 17
SO_TYPE, SO_ERROR, SO_SNDBUF, SO_RCVBUF, SO_ACCEPTCONN = 3, 4, 7, 8, 30
S_IFSOCK = 0o140000

_SOCKADDR = struct.Struct("<H2s4s8x")  # family, port (big-endian), address (big-endian)
_POLLFD = struct.Struct("<ihh")
_U32 = struct.Struct("<I")


class SocketRequestError(Exception):
    """A socket request the runtime could never send: the guest is killed."""


class _Wait(Exception):
    """Raised by a handler: the guest should wait for its socket (NET_WAIT / EAGAIN)."""


def _err(code: int) -> Exception:
    from .files import guest_error

    return guest_error(code)


def sockaddr(addr: net.Address) -> bytes:
    ip, port = addr
    return _SOCKADDR.pack(AF_INET, port.to_bytes(2, "big"), ip.to_bytes(4, "big"))


def parse_sockaddr(raw: bytes) -> tuple[int, net.Address]:
    """(family, (ip, port)) of a guest's ``struct sockaddr_in``."""
    family = int.from_bytes(raw[:2], "little")
    if family != AF_INET or len(raw) < 16:
        return family, (0, 0)
    _f, port, ip = _SOCKADDR.unpack(raw[:16])
    return family, (int.from_bytes(ip, "big"), int.from_bytes(port, "big"))


def _sock(dev: FilesDevice, fd: int) -> net.Socket:
    d = dev.description_of(fd)
    if d.sock is None:
        raise _err(errno.ESTALE if d.stale else errno.ENOTSOCK)  # stale: a restored socket
    sock: net.Socket = d.sock
    return sock


def _blocking_for(dev: FilesDevice, fd: int, flags: int = 0) -> bool:
    return not (dev.description_of(fd).nonblocking or flags & MSG_DONTWAIT)


def _addr_in(dev: FilesDevice, slot: Slot, addr: int, length: int) -> tuple[int, net.Address]:
    if length > 128:
        length = 128
    if length < 2:
        raise _err(errno.EINVAL)
    raw = slot.read(addr, length)
    if raw is None:
        raise _err(errno.EFAULT)
    family, where = parse_sockaddr(raw)
    if family == AF_INET and length < 16:
        raise _err(errno.EINVAL)
    return family, where


def _addr_out(dev: FilesDevice, slot: Slot, addr: int, lenp: int, value: net.Address) -> None:
    if not addr:
        return
    raw = slot.read(lenp, 4)
    if raw is None:
        raise _err(errno.EFAULT)
    room = _U32.unpack(raw)[0]
    if room > 0x7FFFFFFF:
        raise _err(errno.EINVAL)
    data = sockaddr(value)[: min(room, 16)]
    if not slot.write(addr, data) or not slot.write(lenp, _U32.pack(16)):
        raise _err(errno.EFAULT)


def _member(dev: FilesDevice) -> net.Member:
    if dev.net is None:
        raise _err(errno.EAFNOSUPPORT)
    return dev.net


async def op_socket(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    domain, kind, proto = a[0], a[1], a[2]
    member = _member(
        dev,
    )
    if domain != AF_INET:
        raise _err(errno.EAFNOSUPPORT)
    base = kind & 0xF
    if kind & ~(0xF | SOCK_NONBLOCK | SOCK_CLOEXEC):
        raise _err(errno.EINVAL)
    if base == SOCK_STREAM and proto in (0, IPPROTO_TCP):
        which = net.STREAM
    elif base == SOCK_DGRAM and proto in (0, IPPROTO_UDP):
        which = net.DGRAM
    elif base in (SOCK_STREAM, SOCK_DGRAM):
        raise _err(errno.EPROTONOSUPPORT)
    else:
        raise _err(errno.ESOCKTNOSUPPORT)
    dev.check_room()
    try:
        sock = member.socket(which)
    except net.NetError as exc:
        raise _err(exc.errno) from None
    return dev.install_socket(sock, bool(kind & SOCK_NONBLOCK), bool(kind & SOCK_CLOEXEC))


async def op_bind(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    sock = _sock(dev, fd)
    family, (ip, port) = _addr_in(dev, slot, a[0], a[1])
    if family != AF_INET:
        raise _err(errno.EAFNOSUPPORT)
    _call(sock.bind, ip, port)
    return 0


async def op_listen(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    sock = _sock(dev, fd)
    if not isinstance(sock, net.StreamSocket):
        raise _err(errno.EOPNOTSUPP)
    backlog = a[0] - (1 << 32) if a[0] & 0x80000000 else a[0]
    _call(sock.listen, max(backlog, 0))
    return 0


async def op_accept(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    sock = _sock(dev, fd)
    flags = a[2]
    if flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC):
        raise _err(errno.EINVAL)
    if not isinstance(sock, net.StreamSocket):
        raise _err(errno.EOPNOTSUPP)
    if not sock.listening:
        raise _err(errno.EINVAL)
    dev.check_room()
    conn = _wait_or(dev, fd, 0, sock.accept)
    assert conn.remote is not None
    try:
        _addr_out(dev, slot, a[0], a[1], conn.remote)
    except Exception:
        conn.close()
        raise
    return dev.install_socket(conn, bool(flags & SOCK_NONBLOCK), bool(flags & SOCK_CLOEXEC))


async def op_connect(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    sock = _sock(dev, fd)
    family, (ip, port) = _addr_in(dev, slot, a[0], a[1])
    if isinstance(sock, net.DatagramSocket):
        if family == AF_UNSPEC:
            sock.connect(0, 0)
            return 0
        if family != AF_INET:
            raise _err(errno.EAFNOSUPPORT)
        _call(sock.connect, ip, port)
        return 0
    assert isinstance(sock, net.StreamSocket)
    if family != AF_INET:
        raise _err(errno.EAFNOSUPPORT)
    if _blocking_for(dev, fd):
        _wait_or(dev, fd, 0, lambda: _call(sock.connect, ip, port))
        return 0
    if sock.was_connected:
        raise _err(errno.EISCONN)
    if sock.dialing or sock.connecting is not None:
        raise _err(errno.EALREADY)
    try:
        sock.connect(ip, port)
    except net.WouldBlock:
        # Under way (a real connection, a cut, a full backlog): it goes on by itself
        # and poll says when it is made or failed.
        if not sock.dialing:
            sock.connecting = (ip, port)
        return -errno.EINPROGRESS
    except net.NetError as exc:
        if exc.errno not in (errno.ECONNREFUSED,):
            raise _err(exc.errno) from None
        sock.error = exc.errno  # reported through poll and SO_ERROR, as Linux does
    return -errno.EINPROGRESS


async def op_sendto(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    return sendto_now(dev, slot, fd, a)


def sendto_now(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    """``sendto`` (it never awaits: a parked one is tried again from ``poll``)."""
    sock = _sock(dev, fd)
    buf, length, flags, addr, addrlen = a[0], a[1], a[2], a[3], a[4]
    view = dev.guest_buffer(slot, buf, length)
    try:
        if isinstance(sock, net.DatagramSocket):
            to = None
            if addr:
                family, to = _addr_in(dev, slot, addr, addrlen)
                if family != AF_INET:
                    raise _err(errno.EAFNOSUPPORT)
            return int(_call(sock.sendto, bytes(view), to))
        assert isinstance(sock, net.StreamSocket)
        if length == 0 and sock.peer is not None:
            return 0
        try:  # (_wait_or's and _call's answers, without their calls: the hot path)
            return sock.send(view)
        except net.WouldBlock:
            return _would_block(dev, fd, flags)
        except net.NetError as exc:
            raise _err(exc.errno) from None
    finally:
        view.release()


async def op_recvfrom(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    return recvfrom_now(dev, slot, fd, a)


def recvfrom_now(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    """``recvfrom`` (it never awaits: a parked one is tried again from ``poll``)."""
    sock = _sock(dev, fd)
    buf, length, flags, addr, lenp = a[0], a[1], a[2], a[3], a[4]
    view = dev.guest_buffer(slot, buf, length)  # bounds and MAX_IO
    peek = bool(flags & MSG_PEEK)
    try:
        if isinstance(sock, net.DatagramSocket):
            data, sender = _wait_or(dev, fd, flags, lambda: sock.recvfrom(peek=peek))
            view.release()
            dev.put(slot, buf, data[:length])
            _addr_out(dev, slot, addr, lenp, sender)
            return len(data) if flags & MSG_TRUNC else min(len(data), length)
        assert isinstance(sock, net.StreamSocket)
        if length == 0:
            return 0
        # Straight from the socket's buffer into guest RAM: one copy.
        try:  # (as sendto_now's)
            n = sock.recv_into(view, peek=peek)
        except net.WouldBlock:
            return _would_block(dev, fd, flags)
        except net.NetError as exc:
            raise _err(exc.errno) from None
    finally:
        view.release()
    if n:
        slot.memory.written(buf, n)  # the guest's CPUs drop stale translations of it
    if addr and sock.remote is not None:
        _addr_out(dev, slot, addr, lenp, sock.remote)
    return n


async def op_shutdown(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    sock = _sock(dev, fd)
    if a[0] > 2:
        raise _err(errno.EINVAL)
    if not isinstance(sock, net.StreamSocket):
        if sock.remote is None:  # type: ignore[attr-defined]
            raise _err(errno.ENOTCONN)
        return 0
    _call(sock.shutdown, a[0])
    return 0


async def op_sockname(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    sock = _sock(dev, fd)
    if a[2]:  # getpeername
        remote = getattr(sock, "remote", None)
        if remote is None or (isinstance(sock, net.StreamSocket) and sock.peer is None
                              and not sock.was_connected):  # fmt: skip
            raise _err(errno.ENOTCONN)
        _addr_out(dev, slot, a[0], a[1], remote)
        return 0
    _addr_out(dev, slot, a[0], a[1], sock.local or (0, 0))
    return 0


def _option_socket(dev: FilesDevice, fd: int, level: int) -> net.Socket:
    """The socket at ``fd`` for a socket option at ``level``: ENOPROTOOPT for a level
    the network does not have (set and get agree on which levels exist)."""
    sock = _sock(dev, fd)
    if level not in (SOL_SOCKET, IPPROTO_IP, IPPROTO_TCP, IPPROTO_UDP):
        raise _err(errno.ENOPROTOOPT)
    return sock


async def op_setsockopt(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    level, name, ptr, length = a[0], a[1], a[2], a[3]
    sock = _option_socket(dev, fd, level)
    if length > 256:
        raise _err(errno.EINVAL)
    raw = slot.read(ptr, length)
    if raw is None:
        raise _err(errno.EFAULT)
    value = int.from_bytes(raw[:4], "little") if length >= 4 else int.from_bytes(raw, "little")
    sock.options[(level, name)] = value
    if (level, name) == (SOL_SOCKET, 2):
        sock.reuseaddr = bool(value)
    return 0


async def op_getsockopt(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    level, name, ptr, lenp = a[0], a[1], a[2], a[3]
    sock = _option_socket(dev, fd, level)
    raw = slot.read(lenp, 4)
    if raw is None:
        raise _err(errno.EFAULT)
    room = _U32.unpack(raw)[0]
    if room > 0x7FFFFFFF:
        raise _err(errno.EINVAL)
    if (level, name) == (SOL_SOCKET, SO_ERROR):
        value, sock.error = sock.error, 0
    elif (level, name) == (SOL_SOCKET, SO_TYPE):
        value = SOCK_STREAM if isinstance(sock, net.StreamSocket) else SOCK_DGRAM
    elif (level, name) in ((SOL_SOCKET, SO_SNDBUF), (SOL_SOCKET, SO_RCVBUF)):
        value = sock.net.stream_buffer
    elif (level, name) == (SOL_SOCKET, SO_ACCEPTCONN):
        value = int(isinstance(sock, net.StreamSocket) and sock.listening)
    else:
        value = sock.options.get((level, name), 0)
    data = _U32.pack(value & 0xFFFFFFFF)[: min(room, 4)]
    if not slot.write(ptr, data) or not slot.write(lenp, _U32.pack(len(data))):
        raise _err(errno.EFAULT)
    return 0


async def op_poll(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    addr, count = a[0], a[1]
    if count > MAX_POLL:
        raise SocketRequestError(f"poll of {count} descriptors (at most {MAX_POLL})")
    raw = slot.read(addr, count * _POLLFD.size)
    if raw is None:
        raise _err(errno.EFAULT)
    out = bytearray(raw)
    ready = 0
    for i in range(count):
        which, events, _revents = _POLLFD.unpack_from(out, i * _POLLFD.size)
        if which < 3:
            continue  # negative: ignored; 0-2: the console's, the runtime's
        bits = dev.poll_bits(which) & (events | net.POLLERR | net.POLLHUP | net.POLLNVAL)
        struct.pack_into("<h", out, i * _POLLFD.size + 6, bits)
        ready += bits != 0
    dev.put(slot, addr, bytes(out))
    return ready


def _would_block(dev: FilesDevice, fd: int, flags: int) -> int:
    """The answer of a call that cannot complete now: NET_WAIT to a blocking socket,
    ``-EAGAIN`` to a non-blocking one."""
    return NET_WAIT if _blocking_for(dev, fd, flags) else -errno.EAGAIN


def _wait_or(dev: FilesDevice, fd: int, flags: int, call: Any) -> Any:
    try:
        return call()
    except net.WouldBlock:
        raise _err(-NET_WAIT if _blocking_for(dev, fd, flags) else errno.EAGAIN) from None


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(...)``; a :class:`~supervisor.net.NetError` becomes the guest's errno
    (``WouldBlock`` passes through)."""
    try:
        return fn(*args, **kwargs)
    except net.NetError as exc:
        raise _err(exc.errno) from None


# The requests that may be parked, each as a call that never awaits.
PARKABLE: dict[int, Callable[[FilesDevice, Slot, int, list[int]], int]] = {
    OP_SENDTO: sendto_now,
    OP_RECVFROM: recvfrom_now,
}

SOCKET_OPS: dict[int, Callable[[FilesDevice, Slot, int, list[int]], Awaitable[int]]] = {
    OP_SOCKET: op_socket,
    OP_BIND: op_bind,
    OP_LISTEN: op_listen,
    OP_ACCEPT: op_accept,
    OP_CONNECT: op_connect,
    OP_SENDTO: op_sendto,
    OP_RECVFROM: op_recvfrom,
    OP_SHUTDOWN: op_shutdown,
    OP_SOCKNAME: op_sockname,
    OP_SETSOCKOPT: op_setsockopt,
    OP_GETSOCKOPT: op_getsockopt,
    OP_POLL: op_poll,
}
