"""The file device: a guest's files, as capabilities over the directories it was granted.

The guest sees one directory tree made of *grants* (``--dir HOST::GUEST``,
``--ro-dir``): each maps a host directory to an absolute guest path.  Every
guest also has a private, writable ``/tmp`` (a host directory created on first
use and removed when the guest's Launcher stops) unless a grant maps ``/tmp``.

Protocol (docs/abi.md, "File device"): the guest fills its descriptor
(``op``, ``fd``, ``a0``..``a6``) and NOTIFYs it; the Launcher serves the request
before the guest resumes and stores a signed 64-bit ``result`` (a value, or
``-errno``).  Paths are (address, length) pairs in guest RAM, at most
``PATH_MAX`` bytes; data transfers are at most ``max_io`` bytes a request (the
descriptor says how many).  A request the runtime could never send (unknown op,
a length above those bounds) kills the guest; a bad fd, a missing file, a
buffer outside RAM are guest errors (EBADF, ENOENT, EFAULT...).

Guarantees:

* A path never reaches a host file outside the grants.  Guest paths are made
  absolute (against the guest's working directory) and normalised lexically
  (``..`` stops at ``/``), matched to the grant with the longest guest prefix,
  and the rest is resolved beneath that grant's directory descriptor with
  ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)``: symlinks that stay
  inside work, absolute ones and ones that climb out fail (EXDEV).  Without
  ``openat2`` each component is opened with ``O_NOFOLLOW`` (no symlink is ever
  followed: ELOOP).  Only regular files and directories open: a FIFO, socket or
  device inside a grant is refused (EACCES) before it is opened for I/O (it is
  looked at through an ``O_PATH`` descriptor, which has no effect on it).
* A read-only grant is opened read-only on the host: writes fail with EROFS.
* The descriptor table holds at most ``max_files`` guest descriptors (EMFILE
  beyond); every host descriptor is closed when the Launcher stops.
* Requests are served one at a time, even from several CPUs at once.
* Blocking host I/O runs on worker threads; data moves directly between the
  host file and guest RAM (``readv``/``writev`` on a view of guest memory).  A
  request runs to its end even if the guest is killed meanwhile, so a write is
  in the file whole or not at all.
* :meth:`FilesDevice.state` keeps the descriptor table as (grant index, path
  inside the grant, flags, offset); :meth:`FilesDevice.restore` reopens each
  file through the restoring guest's own grants when it is next used.  A file
  that cannot be reopened (gone, or in the private ``/tmp``, whose contents a
  snapshot does not keep) fails with ESTALE.
* Record locks (``fcntl`` ``F_SETLK``/``F_SETLKW``/``F_GETLK`` and the OFD forms)
  are the host's, so they hold against other host processes and other guests
  on the same files.  The guest is one process: its POSIX locks on a file live
  on one host open file description of that file (an OFD lock owner), so its own
  descriptors never conflict with each other, and closing any descriptor of the
  file drops them all, as Linux does for a process.  ``F_SETLKW`` retries
  without a thread (a guest killed meanwhile stops waiting).  Locks are not in
  a snapshot: a restored guest holds none.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .. import net as _net
from .devices import Device, Slot
from .epoll import EPOLL_OPS, WATCHES_PER_FILE, Budget, Epoll
from .sockets import (
    FS_EVENTS,
    FS_SOCKMAP,
    NET_WAIT,
    OP_HALTS,
    OP_PARK,
    PARKABLE,
    S_IFSOCK,
    SOCKET_OPS,
    SocketRequestError,
)

DEV_TYPE_FILES = 3

# Descriptor fields (bytes into the 64-byte descriptor).
FS_OP = 8
FS_FD = 12
FS_A0 = 16  # a0..a6: 16, 20, ..., 40
FS_RESULT = 44  # low word; high word at 48
FS_RESULT_HI = 48
FS_MAX_IO = 52  # Launcher: the largest data transfer of one request

OP_OPENAT = 1
OP_CLOSE = 2
OP_READ = 3
OP_WRITE = 4
OP_PREAD = 5
OP_PWRITE = 6
OP_LSEEK = 7
OP_STATX = 8
OP_FSYNC = 9
OP_FTRUNCATE = 10
OP_UNLINKAT = 11
OP_MKDIRAT = 12
OP_RENAMEAT = 13
OP_GETDENTS64 = 14
OP_FACCESSAT = 15
OP_GETCWD = 16
OP_CHDIR = 17
OP_DUP = 18
OP_FCNTL = 19
OP_READLINKAT = 20
OP_CHECKFD = 21
OP_LOCK = 34  # a0: 0 GETLK, 1 SETLK, 2 SETLKW, | 4 for OFD; a1: struct flock; a2: 1 = flock64

MAX_IO = 1 << 20
PATH_MAX = 4096
STATX_SIZE = 256
AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_REMOVEDIR = 0x200
AT_EMPTY_PATH = 0x1000
FIRST_FD = 3  # 0-2 are the console (the runtime's)
DEFAULT_MAX_FILES = 1024

# The guest's open(2) flags (i386 Linux).
G_ACCMODE = 0o3
G_CREAT = 0o100
G_EXCL = 0o200
G_NOCTTY = 0o400
G_TRUNC = 0o1000
G_APPEND = 0o2000
G_NONBLOCK = 0o4000
G_DSYNC = 0o10000
G_LARGEFILE = 0o100000
G_DIRECTORY = 0o200000
G_NOFOLLOW = 0o400000
G_CLOEXEC = 0o2000000
G_SYNC = 0o4010000
G_PATH = 0o10000000
G_TMPFILE = 0o20000000
_STATUS_FLAGS = G_APPEND | G_NONBLOCK | G_DSYNC | G_SYNC | G_LARGEFILE

F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_DUPFD_CLOEXEC = 0, 1, 2, 3, 4, 1030
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
HOST_F_OFD_GETLK, HOST_F_OFD_SETLK = 36, 37  # Linux's, on every architecture
_FLOCK32 = struct.Struct("<hhiii")  # i386 struct flock: type, whence, start, len, pid
_FLOCK64 = struct.Struct("<hhqqi")  # i386 struct flock64 (64-bit fields 4-aligned)
_HOST_FLOCK = struct.Struct("@hhqqi4x")  # the host's struct flock (64-bit Linux)
LOCK_WAIT_MAX = 0.05  # seconds between tries of a waiting lock (F_SETLKW)

_S64 = struct.Struct("<q")  # a request's 64-bit result, as the descriptor's two words hold it
# A parked request's result and the events counter, with max_io and sockmap between them
_PARKED = struct.Struct("<qIII")
_DIRENT = struct.Struct("<QqHB")  # d_ino, d_off, d_reclen, d_type, then the name

# ---- openat2 ---------------------------------------------------------------------------
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "i686": 437, "i386": 437}.get(os.uname().machine)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def openat2(dirfd: int, path: str, flags: int, mode: int = 0, resolve: int = 0) -> int:
    """Linux's ``openat2(2)``; ``OSError`` on failure (``ENOSYS`` where the host lacks it)."""
    if _SYS_OPENAT2 is None:
        raise OSError(errno.ENOSYS, "openat2 is not available here")
    how = _OpenHow(flags, mode, resolve)
    fd = _syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(fd)


_openat2_works: bool | None = None


def have_openat2() -> bool:
    """True if this host's kernel has ``openat2`` (asked once)."""
    global _openat2_works
    if _openat2_works is None:
        try:
            os.close(openat2(AT_FDCWD, "/", os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_BENEATH))
            _openat2_works = True
        except OSError as exc:
            _openat2_works = exc.errno not in (errno.ENOSYS, errno.EPERM)
    return _openat2_works


class FileRequestError(Exception):
    """A request the guest runtime could never send: the guest is killed with this reason."""


class _GuestError(Exception):
    """A request that fails with ``errno`` for the guest."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


def guest_error(err: int) -> Exception:
    """The exception a request handler raises to answer ``-err``."""
    return _GuestError(err)


@dataclass(frozen=True)
class Grant:
    """A host directory the guest sees at ``guest`` (absolute, normalised)."""

    host: Path
    guest: str
    read_only: bool = False


@dataclass
class _Description:
    """An open file description (shared by dup'ed descriptors)."""

    grant: int  # index into the device's grants; TMP_GRANT for the private /tmp
    path: str  # inside the grant ("" for its root)
    flags: int  # the guest's open flags (access mode and status flags)
    fd: int | None = None  # the host descriptor; None until reopened after a restore
    is_dir: bool = False
    offset: int = 0  # only meaningful before a reopen (restore)
    listing: list[bytes] | None = None  # getdents64: the entries, made at position 0
    position: int = 0  # getdents64: the next entry
    stale: bool = False  # could not be reopened after a restore
    refs: int = 0
    sock: Any = None  # a supervisor.net.Socket: this description is a socket
    epoll: Epoll | None = None  # this description is an epoll instance
    inode: tuple[int, int] | None = None  # (st_dev, st_ino), once a lock request needed it

    @property
    def nonblocking(self) -> bool:
        return bool(self.flags & G_NONBLOCK)


@dataclass
class _Entry:
    description: _Description
    cloexec: bool = False


@dataclass
class _Table:
    entries: dict[int, _Entry] = field(default_factory=dict)

    def lowest_free(self, start: int, limit: int) -> int | None:
        fd = max(start, FIRST_FD)
        while fd in self.entries:
            fd += 1
        return fd if fd < limit else None


TMP_GRANT = -1
SYNTH_GRANT = -2  # a file the device makes (a network's /etc/hosts), kept in a memfd
T = TypeVar("T")


def normalise(path: str) -> str:
    """``path`` (absolute) with ``.``, ``..`` and repeated slashes resolved lexically."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return "/" + "/".join(parts)


class FilesDevice(Device):
    """Serves the guest's file system calls over ``grants`` (see the module docstring)."""

    type = DEV_TYPE_FILES

    def __init__(
        self,
        grants: Sequence[Grant] = (),
        *,
        workdir: str = "/",
        max_files: int = DEFAULT_MAX_FILES,
        private_tmp: bool = True,
        use_openat2: bool | None = None,
        net: _net.Member | None = None,
    ) -> None:
        """``net``: this guest's place on a network (its sockets; None: none)."""
        self.grants = list(grants)
        self.workdir = normalise(workdir)
        self.cwd = self.workdir
        self.max_files = max_files
        self.epoll_budget = Budget(WATCHES_PER_FILE * max_files)  # the epoll interests
        self.private_tmp = private_tmp and not any(g.guest == "/tmp" for g in self.grants)
        self._use_openat2 = have_openat2() if use_openat2 is None else use_openat2
        self._grant_fds: list[int] = []
        self._tmp_dir: str | None = None
        self._tmp_fd: int | None = None
        self._table = _Table()
        self._posix_locks: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> host fd
        self.requests = 0
        self._memory_view: memoryview | None = None
        self.net = net
        self._news = False
        # A blocking socket request that asked to be finished here (sockets.OP_PARK):
        # (op, fd, arguments), until it completes or the guest makes another request.
        self._parked: tuple[int, int, list[int]] | None = None
        self.parked_done = 0  # parked requests completed at a change of the sockets
        self.served_now = 0  # requests served inside the guest's read (notify_now)
        # One request at a time: the runtime holds a lock across CPUs, but a hostile SMP
        # guest may NOTIFY from two at once, and a close must never reach a host
        # descriptor a worker thread is still reading or writing (its number could be
        # reused by another guest's file).
        self._serving = asyncio.Lock()

    # -- life cycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Open every grant's directory (``OSError`` if one is missing or not a directory)."""
        self.open()

    def open(self) -> None:
        """Open the grants now (idempotent); see :meth:`start`."""
        if self._grant_fds:
            return
        fds: list[int] = []
        try:
            for grant in self.grants:
                fds.append(os.open(grant.host, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        self._grant_fds = fds

    async def stop(self) -> None:
        for entry in list(self._table.entries.values()):
            self._release(entry.description)
        self._table.entries.clear()
        self._drop_all_locks()
        if self.net is not None:
            self.net.on_news = None
            self.net.leave()
        for fd in self._grant_fds:
            os.close(fd)
        self._grant_fds = []
        if self._tmp_fd is not None:
            os.close(self._tmp_fd)
            self._tmp_fd = None
        if self._tmp_dir is not None:
            tmp, self._tmp_dir = self._tmp_dir, None
            await asyncio.to_thread(shutil.rmtree, tmp, True)

    @property
    def open_files(self) -> int:
        """How many guest descriptors are open."""
        return len(self._table.entries)

    @property
    def tmp_dir(self) -> str | None:
        """The host directory behind the private ``/tmp`` (None until the guest uses it)."""
        return self._tmp_dir

    def attach(self, slot: Slot) -> None:
        super().attach(slot)
        slot.set(FS_MAX_IO, MAX_IO)
        self._news = False  # a new boot: the next change must break it out again
        self._parked = None
        if self.net is not None:
            self.net.on_news = self._on_news

    def _on_news(self) -> None:
        """One of the guest's sockets changed: break it out to count it (see :meth:`poll`)."""
        if not self._news and self.slot is not None:
            self._news = True
            self.slot.wake()

    def poll(self, slot: Slot) -> None:
        if self._news:
            self._news = False
            result = self._finish_parked(slot)
            events = (slot.get(FS_EVENTS) + 1) & 0xFFFFFFFF
            if result is None:
                slot.set(FS_EVENTS, events)
            else:
                # The result and the counter in one write of the descriptor (its CPUs drop
                # one range of stale translations, not two), the two words between them
                # written back as they are: the guest is stopped, and its one requester
                # (a parked request means no threads) waits for this.
                max_io, sockmap = slot.get_words(FS_MAX_IO, 2)
                data = _PARKED.pack(result, max_io, sockmap, events)
                slot.set_bytes(FS_RESULT, data)
            slot.interrupt()

    # -- snapshots ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The working directory and the descriptor table: per open description its
        grant index, path inside the grant, flags and offset; per descriptor its
        description and close-on-exec flag.  No host path is recorded."""
        descriptions: list[_Description] = []
        index: dict[int, int] = {}
        fds = []
        for fd, entry in sorted(self._table.entries.items()):
            d = entry.description
            if id(d) not in index:
                index[id(d)] = len(descriptions)
                descriptions.append(d)
            fds.append([fd, index[id(d)], entry.cloexec])
        saved = []
        for d in descriptions:
            if d.sock is not None or d.epoll is not None or d.grant == SYNTH_GRANT:
                # not kept: ESTALE once restored
                saved.append({"grant": TMP_GRANT, "path": "", "flags": d.flags, "dir": False,
                              "offset": 0, "position": 0, "stale": True})  # fmt: skip
                continue
            offset = d.offset
            if d.fd is not None and not d.is_dir:
                offset = os.lseek(d.fd, 0, os.SEEK_CUR)
            saved.append(
                {"grant": d.grant, "path": d.path, "flags": d.flags, "dir": d.is_dir,
                 "offset": offset, "position": d.position, "stale": d.stale}
            )  # fmt: skip
        grants = [g.guest for g in self.grants]
        return {"cwd": self.cwd, "grants": grants, "descriptions": saved, "fds": fds}

    def restore(self, state: Any) -> None:
        """Take back :meth:`state`; the files are reopened (through this device's grants)
        when first used.  ``ValueError`` for a value that does not fit these grants (their
        guest paths, in order, must be the saved guest's)."""
        try:
            cwd = state["cwd"]
            if not isinstance(cwd, str) or not cwd.startswith("/"):
                raise ValueError(f"bad working directory {cwd!r}")
            grants = state["grants"]
            if grants != [g.guest for g in self.grants]:
                mine = [g.guest for g in self.grants]
                raise ValueError(f"the guest had directories {grants}, this one has {mine}")
            made: list[_Description] = []
            for s in state["descriptions"]:
                grant, path, flags = int(s["grant"]), str(s["path"]), int(s["flags"])
                if grant != TMP_GRANT and not 0 <= grant < len(self.grants):
                    raise ValueError(f"no grant {grant} in this guest's grants")
                if path.startswith("/") or normalise("/" + path) != "/" + path.rstrip("/"):
                    raise ValueError(f"bad path {path!r}")
                made.append(
                    _Description(grant, path, flags, None, bool(s["dir"]), int(s["offset"]),
                                 None, int(s["position"]), bool(s["stale"]) or grant == TMP_GRANT)
                )  # fmt: skip
            entries: dict[int, _Entry] = {}
            for fd, which, cloexec in state["fds"]:
                if int(fd) < FIRST_FD or not 0 <= int(which) < len(made):
                    raise ValueError(f"bad descriptor {fd}")
                made[which].refs += 1
                entries[int(fd)] = _Entry(made[which], bool(cloexec))
            if len(entries) > self.max_files:
                raise ValueError(f"{len(entries)} open files, more than max_files {self.max_files}")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad file device state: {exc!r}") from None
        for entry in list(self._table.entries.values()):
            self._release(entry.description)
        self._drop_all_locks()
        self._table.entries = entries
        self.cwd = normalise(cwd)
        if any(d.stale for d in made):
            # A blocking request of the guest's may wait for one of its sockets (halted
            # until ``events`` moves), and a stale one never changes again: news, so
            # that the next poll moves the counter and the waiter asks again (ESTALE).
            self._on_news()

    # -- requests ----------------------------------------------------------------------
    async def notify(self, slot: Slot) -> None:
        async with self._serving:
            await self._serve(slot)

    def notify_now(self, slot: Slot) -> bool:
        """Serve a socket ``sendto`` or ``recvfrom`` at once (they never await), unless a
        request is being served (another CPU's): the guest goes on in the same read."""
        if self._serving.locked():
            return False
        word, raw_fd, *args = slot.get_words(FS_OP, 9)  # op, fd, a0..a6
        op = word & ~(OP_PARK | OP_HALTS)
        now = PARKABLE.get(op)
        if now is None:
            return False
        self.requests += 1
        self._parked = None  # the guest moved on: it asks again if it still wants it
        self.served_now += 1
        fd = _signed(raw_fd)
        try:
            result = now(self, slot, fd, args)
        except _GuestError as exc:
            result = -exc.errno
        except SocketRequestError as exc:
            raise FileRequestError(str(exc)) from None
        self._answer(slot, word, op, fd, args, result)
        return True

    async def _serve(self, slot: Slot) -> None:
        self.requests += 1
        self._parked = None  # the guest moved on: it asks again if it still wants it
        word, raw_fd, *args = slot.get_words(FS_OP, 9)  # op, fd, a0..a6
        op = word & ~(OP_PARK | OP_HALTS)
        fd = _signed(raw_fd)
        handler = _OPS.get(op) or SOCKET_OPS.get(op) or EPOLL_OPS.get(op)
        if handler is None:
            raise FileRequestError(f"unknown file request {word}")
        try:
            result = await handler(self, slot, fd, args)
        except _GuestError as exc:
            result = -exc.errno
        except SocketRequestError as exc:
            raise FileRequestError(str(exc)) from None
        self._answer(slot, word, op, fd, args, result)

    def _answer(
        self, slot: Slot, word: int, op: int, fd: int, args: list[int], result: int
    ) -> None:
        """Park the request or raise the irq its halt waits for, as it asked; store
        ``result``."""
        if result == NET_WAIT and word & OP_PARK and op in PARKABLE:
            self._parked = (op, fd, args)
        elif word & OP_HALTS:
            slot.interrupt()  # the guest halts after this request: the answer ends it
        slot.set_bytes(FS_RESULT, _S64.pack(result))  # (both words in one write)

    def _finish_parked(self, slot: Slot) -> int | None:
        """Try the parked request again (the guest is stopped); if it completes, its
        result, which the caller stores in place of ``NET_WAIT`` in the descriptor, where
        the woken runtime finds it; else None."""
        parked = self._parked
        if parked is None:
            return None
        op, fd, args = parked
        try:
            result = PARKABLE[op](self, slot, fd, args)
        except _GuestError as exc:
            result = -exc.errno
        if result == NET_WAIT:
            return None
        self._parked = None
        self.parked_done += 1
        return result

    async def _blocking(
        self, fn: Callable[..., T], *args: Any, discard: Callable[[T], None] | None = None
    ) -> T:
        """``fn(*args)`` on a worker thread; an ``OSError`` becomes the guest's errno.

        Cancelled (the guest is being killed), it still waits for the thread: the
        request (a write, say) ends whole and no view of guest memory outlives it;
        what the thread made (a host descriptor) is handed to ``discard``, since
        nobody will take it.
        """
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, fn, *args)
        cancelled = False
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            if discard is not None and not future.cancelled() and future.exception() is None:
                discard(future.result())
            raise asyncio.CancelledError
        try:
            return future.result()
        except OSError as exc:
            raise _GuestError(exc.errno or errno.EIO) from None

    # -- paths -------------------------------------------------------------------------
    def _path(self, slot: Slot, addr: int, length: int) -> str:
        if length > PATH_MAX:
            raise FileRequestError(f"path of {length} bytes (at most {PATH_MAX})")
        if length == 0:
            raise _GuestError(errno.ENOENT)
        raw = slot.read(addr, length)
        if raw is None:
            raise _GuestError(errno.EFAULT)
        if b"\0" in raw:
            raise _GuestError(errno.EINVAL)
        return os.fsdecode(raw)

    def _guest_path(self, dirfd: int, path: str) -> str:
        """The absolute, normalised guest path of ``path`` relative to ``dirfd``."""
        if path.startswith("/"):
            return normalise(path)
        if dirfd == AT_FDCWD:
            base = self.cwd
        else:
            d = self._description(dirfd)
            if not d.is_dir:
                raise _GuestError(errno.ENOTDIR)
            base = self._grant_guest(d.grant).rstrip("/") + "/" + d.path
        return normalise(base + "/" + path)

    def _grant_guest(self, grant: int) -> str:
        return "/tmp" if grant == TMP_GRANT else self.grants[grant].guest

    def _locate(self, guest_path: str) -> tuple[int, str]:
        """(grant index, path inside it) of a normalised guest path; ENOENT outside them."""
        best, best_len, rel = None, -1, ""
        candidates = [(i, g.guest) for i, g in enumerate(self.grants)]
        if self.private_tmp:
            candidates.append((TMP_GRANT, "/tmp"))
        for i, prefix in candidates:
            if prefix == "/":
                inside, rest = True, guest_path[1:]
            else:
                inside = guest_path == prefix or guest_path.startswith(prefix + "/")
                rest = guest_path[len(prefix) + 1 :]
            if inside and len(prefix) > best_len:
                best, best_len, rel = i, len(prefix), rest
        if best is None:
            raise _GuestError(errno.ENOENT)
        return best, rel

    def _read_only(self, grant: int) -> bool:
        return grant != TMP_GRANT and self.grants[grant].read_only

    async def _grant_fd(self, grant: int) -> int:
        if grant != TMP_GRANT:
            return self._grant_fds[grant]
        if self._tmp_fd is None:
            self._tmp_dir = await asyncio.to_thread(tempfile.mkdtemp, prefix="lguest-tmp-")
            self._tmp_fd = os.open(self._tmp_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._tmp_fd

    # -- resolution beneath a grant (worker threads) -----------------------------------
    def _resolve(self, base: int, rel: str, flags: int, follow: bool, mode: int = 0) -> int:
        """A host descriptor for ``rel`` beneath ``base`` (``flags`` | ``O_CLOEXEC``)."""
        flags |= os.O_CLOEXEC  # (openat2 refuses O_NOCTTY beside O_PATH: nothing else reaches here)
        if not follow:
            flags |= os.O_NOFOLLOW
        if self._use_openat2:
            return openat2(base, rel or ".", flags, mode, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        parts = [p for p in rel.split("/") if p]
        fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=base)
        try:
            for part in parts[:-1]:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)  # fmt: skip
                os.close(fd)
                fd = nxt
            last = parts[-1] if parts else "."
            found = os.open(last, flags | os.O_NOFOLLOW, mode, dir_fd=fd)
            if follow and flags & os.O_PATH and stat.S_ISLNK(os.fstat(found).st_mode):
                os.close(found)  # O_PATH | O_NOFOLLOW gave the link itself: not followed here
                raise OSError(errno.ELOOP, "symbolic links are not followed", rel)
            return found
        finally:
            os.close(fd)

    def _parent(self, base: int, rel: str) -> tuple[int, str]:
        """(host descriptor of ``rel``'s directory, its last component)."""
        head, _, name = rel.rpartition("/")
        if not name:
            raise OSError(errno.EBUSY, "a grant's root")
        return self._resolve(base, head, os.O_PATH | os.O_DIRECTORY, True), name

    def _open_file(self, base: int, rel: str, flags: int, mode: int) -> tuple[int, bool]:
        """Open ``rel`` for the guest's ``flags``: (host fd, is a directory)."""
        acc = flags & G_ACCMODE
        host_acc = {0: os.O_RDONLY, 1: os.O_WRONLY, 2: os.O_RDWR}.get(acc)
        if host_acc is None:
            raise OSError(errno.EINVAL, "bad access mode")
        follow = not flags & G_NOFOLLOW
        for _attempt in range(4):
            try:
                probe = self._resolve(base, rel, os.O_PATH, follow)
            except FileNotFoundError:
                if not flags & G_CREAT:
                    raise
                parent, name = self._parent(base, rel)
                try:
                    create = host_acc | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    if flags & G_APPEND:
                        create |= os.O_APPEND
                    fd = os.open(name, create | os.O_NOCTTY, mode & 0o7777, dir_fd=parent)
                except FileExistsError:
                    if flags & G_EXCL:
                        raise
                    continue  # made meanwhile: open it as an existing file
                finally:
                    os.close(parent)
                return fd, False
            try:
                st = os.fstat(probe)
                if stat.S_ISLNK(st.st_mode):
                    raise OSError(errno.ELOOP, "a symbolic link")
                if flags & G_CREAT and flags & G_EXCL:
                    raise OSError(errno.EEXIST, "exists")
                if stat.S_ISDIR(st.st_mode):
                    if acc != 0 or flags & (G_CREAT | G_TRUNC):
                        raise OSError(errno.EISDIR, "a directory")
                    reopen = os.O_RDONLY | os.O_DIRECTORY
                elif stat.S_ISREG(st.st_mode):
                    if flags & G_DIRECTORY:
                        raise OSError(errno.ENOTDIR, "not a directory")
                    reopen = host_acc
                    if flags & G_TRUNC and acc != 0:
                        reopen |= os.O_TRUNC
                    if flags & G_APPEND:
                        reopen |= os.O_APPEND
                else:
                    raise OSError(errno.EACCES, "not a regular file or directory")
                fd = os.open(f"/proc/self/fd/{probe}", reopen | os.O_CLOEXEC | os.O_NOCTTY)
                return fd, stat.S_ISDIR(st.st_mode)
            finally:
                os.close(probe)
        raise OSError(errno.EAGAIN, "the file kept changing")

    # -- the descriptor table ----------------------------------------------------------
    def _entry(self, fd: int) -> _Entry:
        entry = self._table.entries.get(fd)
        if entry is None:
            raise _GuestError(errno.EBADF)
        return entry

    def _description(self, fd: int) -> _Description:
        return self._entry(fd).description

    async def _host_fd(self, d: _Description) -> int:
        """The description's host descriptor, reopened (through its grant) after a restore."""
        if d.fd is not None:
            return d.fd
        if d.sock is not None:
            raise _GuestError(errno.ESPIPE)
        if d.epoll is not None:
            raise _GuestError(errno.EINVAL)
        if d.stale:
            raise _GuestError(errno.ESTALE)
        base = await self._grant_fd(d.grant)
        flags = d.flags & ~(G_CREAT | G_EXCL | G_TRUNC)
        try:
            fd, is_dir = await self._blocking(
                self._open_file, base, d.path, flags, 0, discard=_close_opened
            )
        except _GuestError:
            d.stale = True
            raise _GuestError(errno.ESTALE) from None
        if is_dir != d.is_dir:
            os.close(fd)
            d.stale = True
            raise _GuestError(errno.ESTALE)
        if not is_dir:
            os.lseek(fd, d.offset, os.SEEK_SET)
        d.fd = fd
        return fd

    def description_of(self, fd: int) -> _Description:
        """The open description behind guest descriptor ``fd`` (EBADF)."""
        return self._entry(fd).description

    def check_room(self) -> None:
        """EMFILE if the descriptor table is full."""
        if len(self._table.entries) >= self.max_files:
            raise _GuestError(errno.EMFILE)

    def install_socket(self, sock: Any, nonblocking: bool, cloexec: bool) -> int:
        """A new descriptor for ``sock`` (closed again if the table is full)."""
        d = _Description(TMP_GRANT, "", 2 | (G_NONBLOCK if nonblocking else 0), sock=sock)
        try:
            return self._install(d, FIRST_FD, cloexec)
        except _GuestError:
            sock.close()
            raise

    def install_epoll(self, ep: Epoll, cloexec: bool) -> int:
        """A new descriptor for the epoll instance ``ep`` (EMFILE if the table is full)."""
        return self._install(_Description(TMP_GRANT, "", 2, epoll=ep), FIRST_FD, cloexec)

    def poll_bits(self, fd: int) -> int:
        """``poll`` events of ``fd``: a socket's state; a file is always ready."""
        entry = self._table.entries.get(fd)
        if entry is None:
            return _net.POLLNVAL
        return self.description_bits(entry.description)

    def description_bits(self, d: _Description) -> int:
        """``poll`` events of an open description: a socket's state, an epoll
        instance's readability (it has an event to report); a file is always ready."""
        if d.sock is not None:
            bits: int = d.sock.poll()
            return bits
        if d.epoll is not None:
            return _net.POLLIN if d.epoll.any_ready(self, {}) else 0
        return _net.POLLIN | _net.POLLOUT

    @staticmethod
    def pollable(d: _Description) -> bool:
        """Whether epoll may watch ``d``: a socket or an epoll instance (as on Linux,
        a regular file or a directory may not: EPERM)."""
        return d.sock is not None or d.epoll is not None

    @staticmethod
    def is_stale(d: _Description) -> bool:
        """Whether ``d`` is a description a restore could not bring back (ESTALE)."""
        return d.stale

    @staticmethod
    def is_open(d: _Description) -> bool:
        """Whether some guest descriptor still refers to ``d``."""
        return d.refs > 0

    def guest_buffer(self, slot: Slot, addr: int, length: int) -> memoryview:
        """A view of guest RAM (EFAULT outside it; a length above MAX_IO kills)."""
        return self._buffer(slot, addr, length)

    def put(self, slot: Slot, addr: int, data: bytes) -> None:
        """Copy ``data`` into guest RAM (EFAULT outside it)."""
        self._put(slot, addr, data)

    def _mark(self, fd: int, is_socket: bool) -> None:
        """Keep the runtime's socket bitmap (if it gave one) in step with the table."""
        slot = self.slot
        if slot is None:
            return
        base = slot.get(FS_SOCKMAP)
        if not base:
            return
        where = base + fd // 8
        old = slot.read(where, 1)
        if old is None:
            return
        bit = 1 << (fd % 8)
        new = old[0] | bit if is_socket else old[0] & ~bit
        if new != old[0]:
            slot.write(where, bytes([new]))

    def _install(self, d: _Description, start: int, cloexec: bool, exact: bool = False) -> int:
        limit = FIRST_FD + self.max_files
        if exact:
            if not FIRST_FD <= start < limit:
                raise _GuestError(errno.EBADF)
            fd = start
            old = self._table.entries.pop(start, None)
            if old is not None:
                self._release(old.description)
        else:
            if len(self._table.entries) >= self.max_files:
                raise _GuestError(errno.EMFILE)
            free = self._table.lowest_free(start, limit)
            if free is None:
                raise _GuestError(errno.EMFILE)
            fd = free
        d.refs += 1
        self._table.entries[fd] = _Entry(d, cloexec)
        self._mark(fd, d.sock is not None)
        return fd

    def _release(self, d: _Description) -> None:
        """A guest descriptor of ``d`` is closed: the guest's POSIX locks on its file go
        (any close does, as for a Linux process), and the host file when no descriptor
        is left."""
        if self._posix_locks and d.fd is not None and not d.is_dir:
            if d.inode is None:
                st = os.fstat(d.fd)  # an open descriptor's inode: no disk access
                d.inode = (st.st_dev, st.st_ino)
            lock_fd = self._posix_locks.pop(d.inode, None)
            if lock_fd is not None:
                os.close(lock_fd)
        d.refs -= 1
        if d.refs <= 0 and d.fd is not None:
            os.close(d.fd)
            d.fd = None
        if d.refs <= 0 and d.sock is not None:
            d.sock.close()
            d.sock = None
        if d.refs <= 0 and d.epoll is not None:
            d.epoll.clear()

    # -- guest memory ------------------------------------------------------------------
    @staticmethod
    def _buffer(slot: Slot, addr: int, length: int) -> memoryview:
        if length > MAX_IO:
            raise FileRequestError(f"transfer of {length} bytes (at most {MAX_IO})")
        if not slot.in_ram(addr, length):
            raise _GuestError(errno.EFAULT)
        return slot.memory.view[addr : addr + length]

    @staticmethod
    def _put(slot: Slot, addr: int, data: bytes) -> None:
        if not slot.write(addr, data):
            raise _GuestError(errno.EFAULT)

    # -- the operations ----------------------------------------------------------------
    async def _op_openat(self, slot: Slot, dirfd: int, a: list[int]) -> int:
        path = self._path(slot, a[0], a[1])
        flags, mode = a[2], a[3]
        if flags & (G_PATH | G_TMPFILE) == G_TMPFILE or flags & G_PATH:
            raise _GuestError(errno.EOPNOTSUPP)
        guest_path = self._guest_path(dirfd, path)
        if self.net is not None and guest_path in _NET_FILES:
            return self._open_synthesized(guest_path, flags)
        grant, rel = self._locate(guest_path)
        if self._read_only(grant) and (flags & G_ACCMODE or flags & (G_CREAT | G_TRUNC)):
            raise _GuestError(errno.EROFS)
        if len(self._table.entries) >= self.max_files:
            raise _GuestError(errno.EMFILE)
        base = await self._grant_fd(grant)
        fd, is_dir = await self._blocking(
            self._open_file, base, rel, flags, mode, discard=_close_opened
        )
        d = _Description(grant, rel, flags & (G_ACCMODE | _STATUS_FLAGS | G_DIRECTORY), fd, is_dir)
        try:
            return self._install(d, FIRST_FD, bool(flags & G_CLOEXEC))
        except _GuestError:
            os.close(fd)
            raise

    def _open_synthesized(self, guest_path: str, flags: int) -> int:
        """The network's ``/etc/hosts`` or ``/etc/resolv.conf``, read-only, made now."""
        if flags & G_ACCMODE or flags & (G_CREAT | G_TRUNC):
            raise _GuestError(errno.EROFS)
        if flags & G_DIRECTORY:
            raise _GuestError(errno.ENOTDIR)
        assert self.net is not None
        hosts = guest_path == "/etc/hosts"
        data = self.net.network.hosts_file(self.net) if hosts else RESOLV_CONF
        self.check_room()
        fd = os.memfd_create("lguest-net", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            os.lseek(fd, 0, os.SEEK_SET)
            d = _Description(SYNTH_GRANT, guest_path, flags & (G_ACCMODE | _STATUS_FLAGS), fd)
            return self._install(d, FIRST_FD, bool(flags & G_CLOEXEC))
        except BaseException:
            os.close(fd)
            raise

    async def _op_close(self, slot: Slot, fd: int, a: list[int]) -> int:
        entry = self._table.entries.pop(fd, None)
        if entry is None:
            raise _GuestError(errno.EBADF)
        self._mark(fd, False)
        self._release(entry.description)
        return 0

    async def _op_read(self, slot: Slot, fd: int, a: list[int]) -> int:
        return await self._transfer(slot, fd, a[0], a[1], None, write=False)

    async def _op_write(self, slot: Slot, fd: int, a: list[int]) -> int:
        return await self._transfer(slot, fd, a[0], a[1], None, write=True)

    async def _op_pread(self, slot: Slot, fd: int, a: list[int]) -> int:
        return await self._transfer(slot, fd, a[0], a[1], _offset(a[2], a[3]), write=False)

    async def _op_pwrite(self, slot: Slot, fd: int, a: list[int]) -> int:
        return await self._transfer(slot, fd, a[0], a[1], _offset(a[2], a[3]), write=True)

    async def _transfer(
        self, slot: Slot, fd: int, addr: int, length: int, offset: int | None, *, write: bool
    ) -> int:
        d = self._description(fd)
        if d.sock is not None:
            if offset is not None:
                raise _GuestError(errno.ESPIPE)
            op = SOCKET_OPS[27 if write else 28]
            result: int = await op(self, slot, fd, [addr, length, 0, 0, 0, 0, 0])
            return result
        acc = d.flags & G_ACCMODE
        if (acc == 0) if write else (acc == 1):
            raise _GuestError(errno.EBADF)
        if d.is_dir:
            raise _GuestError(errno.EISDIR)
        if offset is not None and offset < 0:
            raise _GuestError(errno.EINVAL)
        view = self._buffer(slot, addr, length)
        slot.memory.pin()  # the view outlives waits: the memory must not be packed meanwhile
        try:
            host = await self._host_fd(d)
            if write:
                return await self._blocking(_write, host, view, offset)
            n = _read_cached(host, view, offset)  # what the page cache has, without waiting
            if n < length:
                rest = view[n:]
                try:
                    n += await self._blocking(
                        _read, host, rest, None if offset is None else offset + n
                    )
                finally:
                    rest.release()
        finally:
            view.release()
            slot.memory.unpin()
        if n:
            slot.memory.written(addr, n)
        return n

    async def _op_lseek(self, slot: Slot, fd: int, a: list[int]) -> int:
        d = self._description(fd)
        offset, whence = _offset(a[0], a[1]), a[2]
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
            raise _GuestError(errno.EINVAL)
        if d.is_dir:
            if whence != os.SEEK_SET or offset < 0:
                raise _GuestError(errno.EINVAL)
            d.position = offset
            if offset == 0:
                d.listing = None  # rewinddir: list afresh
            return offset
        host = await self._host_fd(d)
        try:
            return os.lseek(host, offset, whence)
        except OSError as exc:
            raise _GuestError(exc.errno or errno.EINVAL) from None

    async def _op_statx(self, slot: Slot, dirfd: int, a: list[int]) -> int:
        flags, buf = a[2], a[3]
        if not slot.in_ram(buf, STATX_SIZE):
            raise _GuestError(errno.EFAULT)
        if a[1] == 0 and flags & AT_EMPTY_PATH:
            if dirfd == AT_FDCWD:
                grant, rel = self._locate(self.cwd)
                st = await self._stat_path(grant, rel, True)
            elif self._description(dirfd).sock is not None:
                st = os.stat_result((S_IFSOCK | 0o777, 0, 0, 1, 0, 0, 0, 0, 0, 0))
            else:
                host = await self._host_fd(self._description(dirfd))
                st = await self._blocking(os.fstat, host)
        else:
            path = self._path(slot, a[0], a[1])
            grant, rel = self._locate(self._guest_path(dirfd, path))
            st = await self._stat_path(grant, rel, not flags & AT_SYMLINK_NOFOLLOW)
        self._put(slot, buf, _statx(st))
        return 0

    async def _stat_path(self, grant: int, rel: str, follow: bool) -> os.stat_result:
        base = await self._grant_fd(grant)
        return await self._blocking(self._stat_beneath, base, rel, follow)

    def _stat_beneath(self, base: int, rel: str, follow: bool) -> os.stat_result:
        fd = self._resolve(base, rel, os.O_PATH, follow)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    async def _op_fsync(self, slot: Slot, fd: int, a: list[int]) -> int:
        host = await self._host_fd(self._description(fd))
        await self._blocking(os.fdatasync if a[0] else os.fsync, host)
        return 0

    async def _op_ftruncate(self, slot: Slot, fd: int, a: list[int]) -> int:
        d = self._description(fd)
        length = _offset(a[0], a[1])
        if length < 0 or d.is_dir:
            raise _GuestError(errno.EINVAL)
        if d.flags & G_ACCMODE == 0:
            raise _GuestError(errno.EROFS if self._read_only(d.grant) else errno.EINVAL)
        host = await self._host_fd(d)
        await self._blocking(os.ftruncate, host, length)
        return 0

    async def _writable(self, slot: Slot, dirfd: int, addr: int, length: int) -> tuple[int, str]:
        grant, rel = self._locate(self._guest_path(dirfd, self._path(slot, addr, length)))
        if self._read_only(grant):
            raise _GuestError(errno.EROFS)
        return grant, rel

    def _in_parent(self, base: int, rel: str, fn: Callable[[str, int], None]) -> None:
        parent, name = self._parent(base, rel)
        try:
            fn(name, parent)
        finally:
            os.close(parent)

    async def _op_unlinkat(self, slot: Slot, dirfd: int, a: list[int]) -> int:
        grant, rel = await self._writable(slot, dirfd, a[0], a[1])
        remove = os.rmdir if a[2] & AT_REMOVEDIR else os.unlink
        base = await self._grant_fd(grant)
        await self._blocking(self._in_parent, base, rel, lambda n, p: remove(n, dir_fd=p))
        return 0

    async def _op_mkdirat(self, slot: Slot, dirfd: int, a: list[int]) -> int:
        grant, rel = await self._writable(slot, dirfd, a[0], a[1])
        mode = a[2] & 0o7777
        base = await self._grant_fd(grant)
        if not rel:
            raise _GuestError(errno.EEXIST)
        await self._blocking(self._in_parent, base, rel, lambda n, p: os.mkdir(n, mode, dir_fd=p))
        return 0

    async def _op_renameat(self, slot: Slot, dirfd: int, a: list[int]) -> int:
        if a[5]:
            raise _GuestError(errno.EINVAL)  # RENAME_NOREPLACE/EXCHANGE: not offered
        g1, r1 = await self._writable(slot, dirfd, a[0], a[1])
        g2, r2 = await self._writable(slot, _signed(a[2]), a[3], a[4])
        if g1 != g2:
            raise _GuestError(errno.EXDEV)
        base = await self._grant_fd(g1)

        def rename() -> None:
            p1, n1 = self._parent(base, r1)
            try:
                p2, n2 = self._parent(base, r2)
                try:
                    os.rename(n1, n2, src_dir_fd=p1, dst_dir_fd=p2)
                finally:
                    os.close(p2)
            finally:
                os.close(p1)

        await self._blocking(rename)
        return 0

    async def _op_getdents64(self, slot: Slot, fd: int, a: list[int]) -> int:
        buf, size = a[0], a[1]
        if size > MAX_IO:
            raise FileRequestError(f"transfer of {size} bytes (at most {MAX_IO})")
        d = self._description(fd)
        if not d.is_dir:
            raise _GuestError(errno.ENOTDIR)
        if not slot.in_ram(buf, size):
            raise _GuestError(errno.EFAULT)
        host = await self._host_fd(d)
        if d.listing is None:
            d.listing = await self._blocking(_list, host)
        out = bytearray()
        while d.position < len(d.listing):
            record = bytearray(d.listing[d.position])
            struct.pack_into("<q", record, 8, d.position + 1)
            if len(out) + len(record) > size:
                if not out:
                    raise _GuestError(errno.EINVAL)
                break
            out += record
            d.position += 1
        self._put(slot, buf, bytes(out))
        return len(out)

    async def _op_faccessat(self, slot: Slot, dirfd: int, a: list[int]) -> int:
        path = self._path(slot, a[0], a[1])
        mode, flags = a[2], a[3]
        grant, rel = self._locate(self._guest_path(dirfd, path))
        if mode & os.W_OK and self._read_only(grant):
            raise _GuestError(errno.EROFS)
        base = await self._grant_fd(grant)
        follow = not flags & AT_SYMLINK_NOFOLLOW

        def check() -> bool:
            fd = self._resolve(base, rel, os.O_PATH, follow)
            try:
                return mode == 0 or os.access(f"/proc/self/fd/{fd}", mode)
            finally:
                os.close(fd)

        if not await self._blocking(check):
            raise _GuestError(errno.EACCES)
        return 0

    async def _op_getcwd(self, slot: Slot, fd: int, a: list[int]) -> int:
        data = self.cwd.encode() + b"\0"
        if len(data) > a[1]:
            raise _GuestError(errno.ERANGE)
        self._put(slot, a[0], data)
        return len(data)

    async def _op_chdir(self, slot: Slot, dirfd: int, a: list[int]) -> int:
        if a[1] == 0 and dirfd != AT_FDCWD:  # fchdir
            d = self._description(dirfd)
            if not d.is_dir:
                raise _GuestError(errno.ENOTDIR)
            self.cwd = normalise(self._grant_guest(d.grant) + "/" + d.path)
            return 0
        target = self._guest_path(dirfd, self._path(slot, a[0], a[1]))
        try:
            grant, rel = self._locate(target)
        except _GuestError:
            if any(g.guest.startswith(target.rstrip("/") + "/") for g in self.grants):
                self.cwd = target  # an ancestor of a grant: a directory with nothing else
                return 0
            raise
        st = await self._stat_path(grant, rel, True)
        if not stat.S_ISDIR(st.st_mode):
            raise _GuestError(errno.ENOTDIR)
        self.cwd = target
        return 0

    async def _op_dup(self, slot: Slot, fd: int, a: list[int]) -> int:
        d = self._description(fd)
        target, cloexec, exact = _signed(a[0]), bool(a[1]), bool(a[2])
        if exact:
            if target == fd:
                return fd
            return self._install(d, target, cloexec, exact=True)
        if target < 0:
            raise _GuestError(errno.EINVAL)
        return self._install(d, target, cloexec)

    async def _op_fcntl(self, slot: Slot, fd: int, a: list[int]) -> int:
        entry = self._entry(fd)
        cmd, arg = a[0], a[1]
        d = entry.description
        if cmd == F_GETFD:
            return 1 if entry.cloexec else 0
        if cmd == F_SETFD:
            entry.cloexec = bool(arg & 1)
            return 0
        if cmd == F_GETFL:
            return d.flags & (G_ACCMODE | _STATUS_FLAGS)
        if cmd == F_SETFL:
            changeable = G_APPEND | G_NONBLOCK
            new = (d.flags & ~changeable) | (arg & changeable)
            if (new ^ d.flags) & G_APPEND and d.fd is not None and not d.is_dir:
                fl = _fcntl_getfl(d.fd)
                _fcntl_setfl(d.fd, fl | os.O_APPEND if new & G_APPEND else fl & ~os.O_APPEND)
            d.flags = new
            return 0
        raise _GuestError(errno.EINVAL)

    async def _op_readlinkat(self, slot: Slot, dirfd: int, a: list[int]) -> int:
        path = self._path(slot, a[0], a[1])
        buf, size = a[2], a[3]
        if size > PATH_MAX:
            size = PATH_MAX
        grant, rel = self._locate(self._guest_path(dirfd, path))
        base = await self._grant_fd(grant)

        def readlink() -> bytes:
            fd = self._resolve(base, rel, os.O_PATH, False)
            try:
                if not stat.S_ISLNK(os.fstat(fd).st_mode):
                    raise OSError(errno.EINVAL, "not a symbolic link")
                return os.readlink(b"", dir_fd=fd)
            finally:
                os.close(fd)

        target = (await self._blocking(readlink))[:size]
        self._put(slot, buf, target)
        return len(target)

    async def _op_checkfd(self, slot: Slot, fd: int, a: list[int]) -> int:
        self._entry(fd)
        return 0

    def _drop_all_locks(self) -> None:
        for lock_fd in self._posix_locks.values():
            os.close(lock_fd)
        self._posix_locks.clear()

    def _posix_lock_fd(self, d: _Description, host: int, create: bool) -> int | None:
        """The host description that carries the guest's POSIX locks on ``d``'s file:
        a second open of the same file (through ``/proc/self/fd``, so never another
        file), read-write unless the grant or the file's permissions say otherwise."""
        if d.inode is None:
            st = os.fstat(host)
            d.inode = (st.st_dev, st.st_ino)
        key = d.inode
        lock_fd = self._posix_locks.get(key)
        if lock_fd is not None or not create:
            return lock_fd
        link = f"/proc/self/fd/{host}"
        modes = [os.O_RDONLY] if self._read_only(d.grant) else [os.O_RDWR, os.O_RDONLY]
        if d.flags & G_ACCMODE == 1:
            modes.append(os.O_WRONLY)
        for i, mode in enumerate(modes):
            try:
                lock_fd = os.open(link, mode | os.O_CLOEXEC | os.O_NOCTTY)
                break
            except OSError:
                if i == len(modes) - 1:
                    raise
        assert lock_fd is not None
        self._posix_locks[key] = lock_fd
        return lock_fd

    async def _op_lock(self, slot: Slot, fd: int, a: list[int]) -> int:
        kind, addr, wide = a[0], a[1], a[2]
        cmd, ofd = kind & 3, bool(kind & 4)
        if cmd == 3 or kind & ~7 or wide > 1:
            raise FileRequestError(f"lock request {kind:#x} with layout {wide}")
        d = self._description(fd)
        layout = _FLOCK64 if wide else _FLOCK32
        if not slot.in_ram(addr, layout.size):
            raise _GuestError(errno.EFAULT)
        l_type, whence, start, length, _ = layout.unpack(
            bytes(slot.memory.view[addr : addr + layout.size])
        )
        if l_type not in (F_RDLCK, F_WRLCK, F_UNLCK) or whence not in (0, 1, 2):
            raise _GuestError(errno.EINVAL)
        host = await self._host_fd(d)
        if whence == os.SEEK_CUR:
            start += os.lseek(host, 0, os.SEEK_CUR)
        elif whence == os.SEEK_END:
            start += (await self._blocking(os.fstat, host)).st_size
        if length < 0:
            start, length = start + length, -length
        if start < 0:
            raise _GuestError(errno.EINVAL)
        acc = d.flags & G_ACCMODE
        if cmd and ((l_type == F_RDLCK and acc == 1) or (l_type == F_WRLCK and acc == 0)):
            raise _GuestError(errno.EBADF)
        lock_fd = host
        if not ofd:
            create = cmd == 0 or l_type != F_UNLCK
            known = d.inode is not None and d.inode in self._posix_locks
            # Only a first lock of the file opens (and stats) on a worker thread.
            process_fd = (
                self._posix_lock_fd(d, host, create)
                if known or (d.inode is not None and not create)
                else await self._blocking(self._posix_lock_fd, d, host, create)
            )
            if process_fd is None:
                return 0  # unlocking what the guest never locked
            lock_fd = process_fd
        request = _HOST_FLOCK.pack(l_type, 0, start, length, 0)
        if cmd == 0:
            got = _HOST_FLOCK.unpack(_fcntl_lock(lock_fd, HOST_F_OFD_GETLK, request))
            if got[0] == F_UNLCK:
                out = struct.pack("<h", F_UNLCK)
            else:
                try:
                    out = layout.pack(got[0], 0, got[2], got[3], -1)
                except struct.error:
                    raise _GuestError(errno.EOVERFLOW) from None
            self._put(slot, addr, out)
            return 0
        delay = 0.001
        while True:
            try:
                _fcntl_lock(lock_fd, HOST_F_OFD_SETLK, request)
                return 0
            except OSError as exc:
                if cmd == 1 or exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise _GuestError(exc.errno or errno.EIO) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, LOCK_WAIT_MAX)


# Names resolve through /etc/hosts; the network's name server (host:53) answers
# every other name "no such name" at once.
RESOLV_CONF = b"nameserver 10.0.0.1\noptions timeout:2 attempts:1\n"
_NET_FILES = ("/etc/hosts", "/etc/resolv.conf")

_OPS: dict[int, Callable[[FilesDevice, Slot, int, list[int]], Any]] = {
    OP_OPENAT: FilesDevice._op_openat,
    OP_CLOSE: FilesDevice._op_close,
    OP_READ: FilesDevice._op_read,
    OP_WRITE: FilesDevice._op_write,
    OP_PREAD: FilesDevice._op_pread,
    OP_PWRITE: FilesDevice._op_pwrite,
    OP_LSEEK: FilesDevice._op_lseek,
    OP_STATX: FilesDevice._op_statx,
    OP_FSYNC: FilesDevice._op_fsync,
    OP_FTRUNCATE: FilesDevice._op_ftruncate,
    OP_UNLINKAT: FilesDevice._op_unlinkat,
    OP_MKDIRAT: FilesDevice._op_mkdirat,
    OP_RENAMEAT: FilesDevice._op_renameat,
    OP_GETDENTS64: FilesDevice._op_getdents64,
    OP_FACCESSAT: FilesDevice._op_faccessat,
    OP_GETCWD: FilesDevice._op_getcwd,
    OP_CHDIR: FilesDevice._op_chdir,
    OP_DUP: FilesDevice._op_dup,
    OP_FCNTL: FilesDevice._op_fcntl,
    OP_READLINKAT: FilesDevice._op_readlinkat,
    OP_CHECKFD: FilesDevice._op_checkfd,
    OP_LOCK: FilesDevice._op_lock,
}


# ---- helpers (worker threads) ------------------------------------------------------------
def _signed(word: int) -> int:
    return word - (1 << 32) if word & 0x80000000 else word


def _offset(lo: int, hi: int) -> int:
    value: int = _S64.unpack(struct.pack("<II", lo, hi))[0]
    return value


def _close_opened(opened: tuple[int, bool]) -> None:
    """Close what :meth:`FilesDevice._open_file` opened for a request that was cancelled."""
    os.close(opened[0])


def _read(fd: int, view: memoryview, offset: int | None) -> int:
    """Read into ``view`` (guest RAM) until it is full or the file ends."""
    done = 0
    while done < len(view):
        part = view[done:]
        n = os.readv(fd, [part]) if offset is None else os.preadv(fd, [part], offset + done)
        if n == 0:
            break
        done += n
    return done


def _read_cached(fd: int, view: memoryview, offset: int | None) -> int:
    """Read into ``view`` what the host's page cache already holds (``RWF_NOWAIT``: never
    waits for a disk, so it may run on the event loop); stops at the first miss, or the
    end of the file only if it reached it (0 then means: ask a thread)."""
    if not _nowait_reads:
        return 0
    done = 0
    while done < len(view):
        part = view[done:]
        try:
            n = os.preadv(fd, [part], -1 if offset is None else offset + done, _RWF_NOWAIT)
        except BlockingIOError:
            break
        except OSError:
            break  # not offered here (or a real error, which the thread reports)
        finally:
            part.release()
        if n == 0:
            break
        done += n
    return done


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_nowait_reads = _RWF_NOWAIT != 0 and hasattr(os, "preadv")


def _write(fd: int, view: memoryview, offset: int | None) -> int:
    """Write all of ``view`` (guest RAM), looping on short writes."""
    done = 0
    while done < len(view):
        part = view[done:]
        n = os.writev(fd, [part]) if offset is None else os.pwritev(fd, [part], offset + done)
        done += n
    return done


def _list(fd: int) -> list[bytes]:
    """linux_dirent64 records (``d_off`` filled in later) for ``.``, ``..`` and each entry."""
    records = []
    here = os.fstat(fd)
    entries: list[tuple[int, int, bytes]] = [(here.st_ino, 4, b"."), (here.st_ino, 4, b"..")]
    with os.scandir(fd) as it:
        for e in it:
            try:
                kind = 4 if e.is_dir(follow_symlinks=False) else 10 if e.is_symlink() else 8
            except OSError:
                kind = 0
            entries.append((e.inode(), kind, os.fsencode(e.name)))
    for ino, kind, name in entries:
        size = (_DIRENT.size + len(name) + 1 + 7) & ~7
        record = bytearray(size)
        _DIRENT.pack_into(record, 0, ino, 0, size, kind)
        record[_DIRENT.size : _DIRENT.size + len(name)] = name
        records.append(bytes(record))
    return records


def _statx(st: os.stat_result) -> bytes:
    """Linux's ``struct statx`` (256 bytes) for ``st``."""
    out = bytearray(STATX_SIZE)
    struct.pack_into(
        "<IIQIIIHxxQQQQ", out, 0,
        0x7FF, st.st_blksize, 0, st.st_nlink, st.st_uid, st.st_gid, st.st_mode,
        st.st_ino, st.st_size, st.st_blocks, 0,
    )  # fmt: skip
    for where, ns in ((64, st.st_atime_ns), (80, 0), (96, st.st_ctime_ns), (112, st.st_mtime_ns)):
        struct.pack_into("<qI", out, where, ns // 1_000_000_000, ns % 1_000_000_000)
    struct.pack_into(
        "<IIII", out, 128,
        os.major(st.st_rdev), os.minor(st.st_rdev), os.major(st.st_dev), os.minor(st.st_dev),
    )  # fmt: skip
    return bytes(out)


def _fcntl_getfl(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def _fcntl_setfl(fd: int, flags: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _fcntl_lock(fd: int, cmd: int, request: bytes) -> bytes:
    """An OFD lock request on the host; never waits (the SETLKW form is not used)."""
    import fcntl

    return fcntl.fcntl(fd, cmd, request)


def grants_for(dirs: Sequence[Any]) -> list[Grant]:
    """:class:`Grant` objects from ``GuestConfig.dirs`` entries (host, guest, read_only)."""
    return [Grant(Path(d.host), normalise(d.guest), bool(d.read_only)) for d in dirs]


__all__ = [
    "DEV_TYPE_FILES",
    "FileRequestError",
    "FilesDevice",
    "Grant",
    "grants_for",
    "have_openat2",
    "normalise",
    "openat2",
]
