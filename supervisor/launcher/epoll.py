"""The file device's epoll requests: an epoll instance is an open description.

An epoll instance lives in the file device's descriptor table like a file or a
socket, so ``dup``, ``close``, ``fcntl``, ``poll`` and the table's limit
(EMFILE) treat it alike.  Its interest list holds one :class:`Interest` per
(descriptor number, open description), as Linux keys it: closing a watched
descriptor drops its interest once no descriptor refers to that description.

The requests (docs/abi.md, "Sockets": 35-37) never wait: ``EPOLL_WAIT`` answers the
events ready now (the runtime waits for the device's events counter or the
timeout and asks again, as for ``poll``).  The console (descriptors 0-2) is
the runtime's: the request says whether a read of descriptor 0 would not wait,
and writes back whether the instance watches it for input (then the runtime
waits on the console's CPU, as a ``poll`` of it does).

Level-triggered interests report while their condition holds.  ``EPOLLET``
reports a condition when it becomes true (bits that were not ready when the
interest was last looked at) and, as Linux, whenever something happened to a
watched socket since (data arrived, room freed) while its condition holds.
``EPOLLONESHOT`` disarms an interest once it is reported, until
``EPOLL_CTL_MOD``.  Reported interests move to the end of the list, so a
small ``maxevents`` serves every ready descriptor in turn.

A guest's instances hold at most :data:`WATCHES_PER_FILE` times its
``max_files`` interests together (ENOSPC beyond, as Linux's
``max_user_watches``), so a hostile guest cannot grow the Launcher's memory
without bound; interests whose descriptions closed are swept before an ADD is
refused.

A snapshot does not keep an epoll instance (nor the sockets it watches): after
a restore its descriptor is stale (ESTALE; ``close`` works).
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import net
from .devices import Slot

if TYPE_CHECKING:
    from .files import FilesDevice

OP_EPOLL_CREATE = 35
OP_EPOLL_CTL = 36
OP_EPOLL_WAIT = 37

EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD = 1, 2, 3
EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP = net.POLLIN, net.POLLOUT, net.POLLERR, net.POLLHUP
EPOLLPRI, EPOLLRDHUP = net.POLLPRI, net.POLLRDHUP
EPOLLEXCLUSIVE, EPOLLWAKEUP, EPOLLONESHOT, EPOLLET = 1 << 28, 1 << 29, 1 << 30, 1 << 31
MAX_NESTS = 4  # Linux's EP_MAX_NESTS: deeper chains of epoll instances are ELOOP
MAX_EVENTS = 0x7FFFFFFF // 12
WATCHES_PER_FILE = 8  # a guest's interests, all instances together, per max_files

_EVENT = struct.Struct("<IQ")  # struct epoll_event on i386: events, data (12 bytes, packed)
_U32 = struct.Struct("<I")


@dataclass
class Interest:
    """One watched descriptor of an epoll instance."""

    fd: int
    target: Any  # the watched open description; None for the console (descriptors 0-2)
    events: int  # the events asked for, with EPOLLERR | EPOLLHUP (always reported)
    data: int  # returned as given
    armed: bool = True  # EPOLLONESHOT: False once reported, until a MOD
    last: int = 0  # EPOLLET: the ready bits the interest last saw
    wakes: int = 0  # EPOLLET: the socket's wake count the interest last saw


class Budget:
    """The interests a guest's epoll instances hold together (at most ``limit``)."""

    __slots__ = ("instances", "limit", "used")  # (one per guest, most with no instance)

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        # The open ones, swept when the budget is spent (a dict as an ordered set: an
        # empty one is a quarter of an empty set's size).
        self.instances: dict[Epoll, None] = {}


class Epoll:
    """An epoll instance's interest list, in report order."""

    def __init__(self, budget: Budget) -> None:
        self.interest: dict[tuple[int, int], Interest] = {}
        self.budget = budget
        budget.instances[self] = None

    def add(self, key: tuple[int, int], it: Interest, dev: FilesDevice) -> None:
        """Watch ``it`` (ENOSPC if the guest's budget is spent even after a sweep)."""
        budget = self.budget
        if budget.used >= budget.limit:
            for ep in budget.instances:
                ep.sweep(dev)
            if budget.used >= budget.limit:
                raise _err(errno.ENOSPC)
        self.interest[key] = it
        budget.used += 1

    def remove(self, key: tuple[int, int]) -> None:
        del self.interest[key]
        self.budget.used -= 1

    def sweep(self, dev: FilesDevice) -> None:
        """Drop the interests whose description no descriptor refers to any more."""
        for key, it in list(self.interest.items()):
            if it.target is not None and not dev.is_open(it.target):
                self.remove(key)

    def clear(self) -> None:
        """The instance's last descriptor closed: it watches nothing more."""
        self.budget.used -= len(self.interest)
        self.interest.clear()
        self.budget.instances.pop(self, None)

    def any_ready(self, dev: FilesDevice, memo: dict[int, bool]) -> bool:
        """Whether some interest would be reported now (``poll`` of the instance, or an
        instance watching it).  Console input counts as not ready here (the runtime
        tells the device only in ``EPOLL_WAIT``).  ``memo``: the instances already
        answered in this request, so each is looked at once however they nest."""
        known = memo.get(id(self))
        if known is not None:
            return known
        memo[id(self)] = False  # a cycle cannot be made (ELOOP); this guards anyway
        ready = False
        for it in self.interest.values():
            if not it.armed or (it.target is not None and not dev.is_open(it.target)):
                continue
            if _fresh(it, interest_bits(dev, it, 0, memo))[0]:
                ready = True
                break
        memo[id(self)] = ready
        return ready

    def inner(self) -> list[Epoll]:
        """The instances this one watches."""
        return [it.target.epoll for it in self.interest.values()
                if it.target is not None and it.target.epoll is not None]  # fmt: skip

    def height(self, memo: dict[int, int]) -> int:
        """How many instances the longest chain down from this one holds (itself
        included), counted up to MAX_NESTS + 2."""
        known = memo.get(id(self))
        if known is None:
            memo[id(self)] = MAX_NESTS + 2  # a cycle cannot be made; this guards anyway
            known = 1 + max((ep.height(memo) for ep in self.inner()), default=0)
            memo[id(self)] = known = min(known, MAX_NESTS + 2)
        return known

    def depth(self, parents: dict[int, list[Epoll]], memo: dict[int, int]) -> int:
        """How many instances the longest chain up from this one holds (itself
        included), counted up to MAX_NESTS + 2."""
        known = memo.get(id(self))
        if known is None:
            memo[id(self)] = MAX_NESTS + 2
            above = parents.get(id(self), [])
            known = 1 + max((ep.depth(parents, memo) for ep in above), default=0)
            memo[id(self)] = known = min(known, MAX_NESTS + 2)
        return known


def _loops(ep: Epoll, target: Epoll) -> bool:
    """Whether ``ep`` watching ``target`` would make a cycle or a chain of more than
    MAX_NESTS + 1 instances (Linux's limit): ELOOP."""
    seen: set[int] = set()
    todo = [target]
    while todo:
        cur = todo.pop()
        if cur is ep:
            return True
        if id(cur) not in seen:
            seen.add(id(cur))
            todo.extend(cur.inner())
    parents: dict[int, list[Epoll]] = {}
    for watcher in ep.budget.instances:
        for inner in watcher.inner():
            parents.setdefault(id(inner), []).append(watcher)
    return ep.depth(parents, {}) + target.height({}) > MAX_NESTS + 1


def interest_bits(dev: FilesDevice, it: Interest, console_in: int, memo: dict[int, bool]) -> int:
    """The ready bits of ``it``'s descriptor among the ones it asked for."""
    if it.target is None:
        bits = (EPOLLIN if console_in else 0) if it.fd == 0 else EPOLLOUT  # 0 in, 1-2 out
    elif it.target.epoll is not None:
        bits = EPOLLIN if it.target.epoll.any_ready(dev, memo) else 0
    else:
        bits = dev.description_bits(it.target)
    return bits & it.events


def _fresh(it: Interest, bits: int) -> tuple[int, int]:
    """What an interest reports of its ready ``bits``: all of them (level-triggered,
    or EPOLLET with news of its socket since it last looked), else those that rose;
    and the socket's wake count now."""
    sock = it.target.sock if it.target is not None else None
    wakes: int = sock.wakes if sock is not None else 0
    if not it.events & EPOLLET or wakes != it.wakes:
        return bits, wakes
    return bits & ~it.last, wakes


def _err(code: int) -> Exception:
    from .files import guest_error

    return guest_error(code)


def _signed(word: int) -> int:
    return word - (1 << 32) if word & 0x80000000 else word


def _epoll_of(dev: FilesDevice, fd: int) -> Epoll:
    """The epoll instance of ``fd``: EBADF, ESTALE (one a snapshot did not keep), or
    EINVAL (not an epoll descriptor)."""
    d = dev.description_of(fd)
    ep: Epoll | None = d.epoll
    if ep is None:
        raise _err(errno.ESTALE if dev.is_stale(d) else errno.EINVAL)
    return ep


async def op_epoll_create(dev: FilesDevice, slot: Slot, fd: int, a: list[int]) -> int:
    """a0: close-on-exec (0 or 1)."""
    ep = Epoll(dev.epoll_budget)
    try:
        return dev.install_epoll(ep, bool(a[0]))
    except BaseException:
        ep.clear()
        raise


async def op_epoll_ctl(dev: FilesDevice, slot: Slot, epfd: int, a: list[int]) -> int:
    """a0: the operation; a1: the watched descriptor; a2: its struct epoll_event (ADD, MOD)."""
    op, fd, addr = a[0], _signed(a[1]), a[2]
    events = data = 0
    if op in (EPOLL_CTL_ADD, EPOLL_CTL_MOD):
        raw = slot.read(addr, _EVENT.size)
        if raw is None:
            raise _err(errno.EFAULT)
        events, data = _EVENT.unpack(raw)
    ep_description = dev.description_of(epfd)
    target = None if 0 <= fd <= 2 else dev.description_of(fd)
    if target is not None and dev.is_stale(target):
        raise _err(errno.ESTALE)
    if target is not None and not dev.pollable(target):
        raise _err(errno.EPERM)
    ep = _epoll_of(dev, epfd)
    if target is ep_description:
        raise _err(errno.EINVAL)
    if events & EPOLLEXCLUSIVE and (op == EPOLL_CTL_MOD or (target is not None and target.epoll)):
        raise _err(errno.EINVAL)
    key = (fd, id(target) if target is not None else 0)
    if op == EPOLL_CTL_ADD:
        if key in ep.interest:
            raise _err(errno.EEXIST)
        if target is not None and target.epoll is not None and _loops(ep, target.epoll):
            raise _err(errno.ELOOP)
        ep.add(key, Interest(fd, target, events | EPOLLERR | EPOLLHUP, data), dev)
        return 0
    if op not in (EPOLL_CTL_DEL, EPOLL_CTL_MOD):
        raise _err(errno.EINVAL)
    it = ep.interest.get(key)
    if it is None:
        raise _err(errno.ENOENT)
    if op == EPOLL_CTL_DEL:
        ep.remove(key)
    else:
        it.events, it.data, it.armed = events | EPOLLERR | EPOLLHUP, data, True
        it.last = it.wakes = 0
    return 0


async def op_epoll_wait(dev: FilesDevice, slot: Slot, epfd: int, a: list[int]) -> int:
    """a0: the events buffer; a1: maxevents; a2: 1 if a read of descriptor 0 would not
    wait; a3: where to write whether the instance watches descriptor 0 for input (0:
    nowhere).  The events ready now, at most maxevents, never waiting."""
    addr, maxevents, console_in, flag = a[0], a[1], a[2], a[3]
    ep = _epoll_of(dev, epfd)
    if not 0 < maxevents <= MAX_EVENTS:
        raise _err(errno.EINVAL)
    if not slot.in_ram(addr, min(maxevents, len(ep.interest) or 1) * _EVENT.size):
        raise _err(errno.EFAULT)
    console = False
    memo: dict[int, bool] = {}
    reported: list[tuple[tuple[int, int], Interest, int]] = []
    for key, it in list(ep.interest.items()):
        if it.target is not None and not dev.is_open(it.target):
            ep.remove(key)  # its last descriptor closed
            continue
        if not it.armed:
            continue
        console |= it.target is None and it.fd == 0 and bool(it.events & EPOLLIN)
        bits = interest_bits(dev, it, console_in, memo)
        if it.events & EPOLLET:
            fresh, wakes = _fresh(it, bits)
            if fresh and len(reported) < maxevents:
                reported.append((key, it, fresh))
                it.last, it.wakes = bits, wakes
            elif not fresh:
                it.last, it.wakes = bits, wakes  # bits that went away may rise again
        elif bits and len(reported) < maxevents:
            reported.append((key, it, bits))
    out = bytearray()
    for key, it, bits in reported:
        out += _EVENT.pack(bits, it.data)
        if it.events & EPOLLONESHOT:
            it.armed = False
        del ep.interest[key]  # to the end: the next call serves the others first
        ep.interest[key] = it
    if out:
        dev.put(slot, addr, bytes(out))
    if flag:
        dev.put(slot, flag, _U32.pack(int(console)))
    return len(reported)


EPOLL_OPS: dict[int, Callable[[FilesDevice, Slot, int, list[int]], Awaitable[int]]] = {
    OP_EPOLL_CREATE: op_epoll_create,
    OP_EPOLL_CTL: op_epoll_ctl,
    OP_EPOLL_WAIT: op_epoll_wait,
}
