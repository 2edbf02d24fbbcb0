"""The Launcher's memory: one page-aligned mapping that guests use as RAM.

A :class:`GuestMemory` is anonymous memory, or a private (copy-on-write) mapping of a
:class:`MemoryTemplate`: then every memory made from one template shares, through the
host kernel's page cache, each page of the template that it has not written.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import weakref
from collections.abc import Callable

from .abi import PAGE_SIZE
from .delta import Delta, apply

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long)  # fmt: skip
_mmap.restype = ctypes.c_void_p
_MAP_FAILED = ctypes.c_void_p(-1).value
_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int
_MAP_FIXED = 0x10  # Linux, every architecture this runs on
_RW = mmap.PROT_READ | mmap.PROT_WRITE
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def map_count_limit() -> int:
    """The host's limit of mappings per process (``vm.max_map_count``)."""
    return _map_count_limit()


def _map_count_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            return int(limit.read())
    except (OSError, ValueError):
        return 65530  # Linux's default


# Anonymous memories next to each other merge into one kernel mapping, a template's
# private mapping does not: each costs one of the process's vm.max_map_count mappings.
# At most this many memories share a template at once (half the limit: the rest is for
# the emulators, the heap and the threads); later ones get a copy.
SHARED_LIMIT = _map_count_limit() // 2
_shared_live = 0


def shared_memories() -> int:
    """How many memories map a template now (see ``SHARED_LIMIT``)."""
    return _shared_live


# /proc/self/pagemap: one 64-bit entry per page of the process (Linux's
# Documentation/admin-guide/mm/pagemap.rst); the flags need no privilege.
_PM_PRESENT = 1 << 63
_PM_SWAPPED = 1 << 62
_PM_FILE = 1 << 61  # a page of a file (a template's page) or shared anonymous memory
_ZERO_PAGE = bytes(PAGE_SIZE)

# Packed pages by their bytes: memories that packed the same pages share one copy
# (idle guests of one image mostly wrote the same pages).  Each entry counts its users.
_blobs: dict[bytes, list[bytes | int]] = {}


_packed_live = 0


def packed_memories() -> int:
    """How many memories are packed now (:meth:`GuestMemory.pack`)."""
    return _packed_live


def shared_blobs() -> int:
    """How many distinct packed page sets are held (see :meth:`GuestMemory.pack`)."""
    return len(_blobs)


def _blob_in(blob: bytes) -> bytes:
    entry = _blobs.get(blob)
    if entry is None:
        _blobs[blob] = [blob, 1]
        return blob
    entry[1] = int(entry[1]) + 1
    return bytes(entry[0])


def _blob_out(blob: bytes) -> None:
    entry = _blobs.get(blob)
    if entry is not None:
        entry[1] = int(entry[1]) - 1
        if not entry[1]:
            del _blobs[blob]


_pagemap_fd: int | None = None
# A page's pagemap entry's top byte -> 1 if the memory holds the page itself (present
# and not the template's, or swapped out), else 0.
_HELD = bytes(
    1 if top & (_PM_SWAPPED >> 56) or (top & (_PM_PRESENT >> 56) and not top & (_PM_FILE >> 56))
    else 0
    for top in range(256)
)  # fmt: skip


def _held_pages(address: int, pages: int) -> list[int] | None:
    """Which of ``pages`` pages from ``address`` the process holds privately (written
    pages of a template's mapping, touched anonymous ones), from ``/proc/self/pagemap``;
    None where the host has none (then nothing is packed)."""
    global _pagemap_fd
    try:
        if _pagemap_fd is None:
            _pagemap_fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        raw = os.pread(_pagemap_fd, 8 * pages, 8 * (address // PAGE_SIZE))
    except OSError:
        return None
    if len(raw) != 8 * pages:
        return None
    held = raw[7::8].translate(_HELD)  # (little-endian: each entry's flags byte)
    found = []
    n = held.find(1)
    while n >= 0:
        found.append(n)
        n = held.find(1, n + 1)
    return found


def _map_fixed(address: int, size: int, flags: int, fd: int) -> None:
    """Replace the pages at ``[address, address + size)`` by a new mapping (``OSError``)."""
    if _mmap(address, size, _RW, flags | _MAP_FIXED, fd, 0) == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class MemoryTemplate:
    """The first contents of guest memories of ``size`` bytes, held once by the host.

    ``fill`` writes the contents into a zeroed view of the whole memory, once; the
    bytes then live in a memfd that is sealed (nothing can write, shrink or grow it),
    so a memory mapped from it can neither fault nor see a change later.  Pages
    ``fill`` never wrote stay holes of the file and cost nothing.  A template stays
    usable until :meth:`close`; memories already made from it keep its pages.
    """

    def __init__(self, size: int, fill: Callable[[memoryview], None]) -> None:
        if not isinstance(size, int) or size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"template size must be a positive multiple of the page size, "
                             f"not {size!r}")  # fmt: skip
        fd = os.memfd_create("lguest-template", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size, flags=mmap.MAP_SHARED) as shared:
                view = memoryview(shared)
                try:
                    fill(view)
                finally:
                    view.release()
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int = fd
        self._closed = False
        # Packed memories that map the template again when they unpack: the memfd stays
        # open for them after close().
        self._users = 0
        self._size = size
        self._finalizer = weakref.finalize(self, os.close, fd)

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        """The sealed memfd (``ValueError`` once closed)."""
        if self._closed:
            raise ValueError("memory template is closed")
        return self._fd

    def _use(self) -> None:
        self._users += 1

    def _unuse(self) -> None:
        self._users -= 1
        if self._closed and not self._users:
            self._finalizer()

    def _page(self, index: int) -> bytes:
        """The template's page ``index`` (to a packing memory that uses it)."""
        return os.pread(self._fd, PAGE_SIZE, index * PAGE_SIZE)

    def map_at(self, address: int) -> None:
        """Map the template privately over ``[address, address + size)``; ``OSError``
        (``ENOMEM`` past the host's limit of mappings, ``vm.max_map_count``) if not."""
        _map_fixed(address, self._size, mmap.MAP_PRIVATE, self.fileno())

    def copy_into(self, view: memoryview) -> None:
        """Copy every written run of the template into ``view`` (assumed zeroed)."""
        self._copy(view, self.fileno())

    def _copy(self, view: memoryview, fd: int) -> None:
        offset = 0
        while offset < self._size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing written past offset
                    return
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), self._size)
            while start < end:
                start += os.preadv(fd, [view[start:end]], start)
            offset = end

    def close(self) -> None:
        """Let the template go (memories made from it keep their pages)."""
        if not self._closed:
            self._closed = True
            if not self._users:
                self._finalizer()

    def __repr__(self) -> str:
        return f"<MemoryTemplate {self._size:#x} bytes{' closed' if self.closed else ''}>"


class GuestMemory:
    """A page-aligned block of the Launcher's memory.

    ``address`` is the block's "user address": ``LHREQ_INITIALIZE``'s ``base``
    names a page inside ``[address, address + size)``.  Pages are committed
    lazily by the host kernel, so an untouched guest costs no RAM.

    Offsets given to :meth:`read` and :meth:`write` are relative to the start of
    the block; a range outside it raises ``ValueError``.  The memory stays valid
    until :meth:`close`; a device keeps its own reference while a guest uses it.

    With a ``template`` (of the same size) the memory starts as its contents: mapped
    privately, so the pages stay shared until written (:attr:`shared`), or copied
    (the same bytes) while ``SHARED_LIMIT`` memories map one or the host refuses
    another mapping.
    """

    __slots__ = (
        "__weakref__", "_address", "_map", "_packed", "_pins", "_shared", "_size",
        "_template", "_view", "_watchers",
    )  # fmt: skip

    def __init__(self, size: int, template: MemoryTemplate | None = None) -> None:
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"memory size must be a positive integer, not {size!r}")
        if size % PAGE_SIZE:
            raise ValueError(f"memory size {size:#x} is not a multiple of the page size")
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(self._map)
        self._address = ctypes.addressof(anchor)
        del anchor  # release the buffer export so close() can unmap
        self._view: memoryview | None = memoryview(self._map)
        self._size = size
        self._watchers: list[Callable[[int, int], None]] = []
        self._shared = False
        self._template: MemoryTemplate | None = None  # what unwritten pages hold
        self._packed: bytes | None = None  # the written bytes (a supervisor.delta value)
        self._pins = 0
        if template is not None:
            self._start_from(template)

    def _start_from(self, template: MemoryTemplate) -> None:
        if template.size != self._size:
            self.close()
            raise ValueError(f"template of {template.size:#x} bytes for memory of {self._size:#x}")
        template.fileno()  # raises once closed
        template._use()
        self._template = template
        self._map_template(template)

    def _map_template(self, template: MemoryTemplate) -> None:
        """Make the memory the template's contents: its private mapping, or a copy."""
        global _shared_live
        if _shared_live < SHARED_LIMIT:
            try:
                _map_fixed(self._address, self._size, mmap.MAP_PRIVATE, template._fd)
                self._shared = True
                _shared_live += 1
                return
            except OSError:  # out of mappings after all: the same bytes, unshared
                pass
        with memoryview(self._map) as view:
            template._copy(view, template._fd)

    def _unshared(self) -> None:
        global _shared_live
        if self._shared:
            self._shared = False
            _shared_live -= 1

    def _forget_template(self) -> None:
        template, self._template = self._template, None
        if template is not None:
            template._unuse()

    @property
    def shared(self) -> bool:
        """True while the memory is a private mapping of a template (copy-on-write)."""
        return self._shared

    # -- packed: an idle guest's memory as a few bytes ------------------------------------
    @property
    def packed(self) -> bool:
        """True while the memory holds its written pages packed and no RAM (:meth:`pack`)."""
        return self._packed is not None

    @property
    def packed_size(self) -> int:
        """Bytes the packed pages take (0 unless :attr:`packed`; shared ones counted whole)."""
        return 0 if self._packed is None else len(self._packed)

    def pin(self) -> None:
        """Keep the memory from being packed while someone holds a view of it across a
        wait (a file read into guest RAM on a thread); :meth:`unpin` when done."""
        self.view  # unpacks, raises once closed  # noqa: B018
        self._pins += 1

    def unpin(self) -> None:
        self._pins -= 1

    def pack(self) -> bool:
        """Keep only the bytes that differ from where the memory started (its template's
        pages, or zeros), as runs deflated (:mod:`supervisor.delta`: unpacking writes
        those runs alone), and give every page back to the host kernel: the
        mapping of the template goes too, so its pages stop counting in the process's
        RSS and in its mappings.  True if it packed.

        The memory's address stays reserved (anonymous, untouched) and the first use
        of :attr:`view` (or :meth:`unpack`) puts every byte back where it was.  Refused
        while pinned, packed or closed.  Whoever holds a pointer into the memory (an
        emulator, ``Lguest.ram``) must unpack it before using it.
        """
        if self._view is None or self._packed is not None or self._pins:
            return False
        held = _held_pages(self._address, self._size // PAGE_SIZE)
        if held is None:
            return False
        template = self._template
        view = self._view
        delta = Delta()
        for n in held:  # (the others were never written: the template's pages, or zeros)
            start = n * PAGE_SIZE
            page = view[start : start + PAGE_SIZE]
            base = _ZERO_PAGE if template is None else template._page(n)
            if page != base:
                delta.add(page, base, start)
        blob = _blob_in(delta.pack())
        self._set_packed(blob)
        # Anonymous memory's pages are dropped where they are: read again, they are zeros,
        # which is what its delta was taken against; no mapping to make now nor at the
        # unpack.
        if template is None and _madvise(self._address, self._size, mmap.MADV_DONTNEED) == 0:
            return True
        try:
            _map_fixed(self._address, self._size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)
        except OSError:  # the kernel refused: put it back as it was, exactly
            self.unpack()
            return False
        self._unshared()
        return True

    def unpack(self) -> None:
        """Put back every byte of a packed memory (no effect unless :attr:`packed`)."""
        packed = self._packed
        if packed is None:
            return
        self._set_packed(None)
        if self._template is not None:
            self._unshared()
            self._map_template(self._template)
        # (else the pages were dropped, or mapped afresh: zeros, where the delta applies)
        assert self._view is not None
        apply(packed, self._view)  # (only the bytes that differ from where it started)
        _blob_out(packed)

    def _set_packed(self, packed: bytes | None) -> None:
        global _packed_live
        _packed_live += (packed is not None) - (self._packed is not None)
        self._packed = packed

    def _drop_packed(self) -> None:
        if self._packed is not None:
            _blob_out(self._packed)
            self._set_packed(None)

    def clear(self) -> None:
        """Zero the whole memory, giving its pages back to the host kernel (a template's
        mapping included: the memory is plain anonymous memory afterwards)."""
        if self._view is None:
            raise ValueError("guest memory is closed")
        self._drop_packed()
        try:
            _map_fixed(self._address, self._size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)
        except OSError:  # out of memory for the kernel's bookkeeping: write the zeros
            ctypes.memset(self._address, 0, self._size)
        self._unshared()
        self._forget_template()

    @property
    def address(self) -> int:
        """The integer address of the first byte (what ``base`` refers to)."""
        return self._address

    @property
    def size(self) -> int:
        return self._size

    @property
    def view(self) -> memoryview:
        """A writable memoryview of the whole block (raises ``ValueError`` once closed);
        a packed memory is unpacked first."""
        if self._view is None:
            raise ValueError("guest memory is closed")
        if self._packed is not None:
            self.unpack()
        return self._view

    @property
    def closed(self) -> bool:
        return self._view is None

    def _check(self, addr: int, n: int) -> None:
        if addr < 0 or n < 0 or addr + n > self._size:
            raise ValueError(f"range {addr:#x}+{n:#x} is outside guest memory of {self._size:#x}")

    def read(self, addr: int, n: int) -> bytes:
        """Copy ``n`` bytes starting at offset ``addr``."""
        self._check(addr, n)
        return bytes(self.view[addr : addr + n])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into the block at offset ``addr`` (watchers are told)."""
        n = len(data)
        if addr < 0 or addr + n > self._size:  # (the Host's every write: no call to check)
            self._check(addr, n)
        view = self._view
        if view is None:
            raise ValueError("guest memory is closed")
        if self._packed is not None:
            self.unpack()
        view[addr : addr + n] = data
        if self._watchers:
            for callback in list(self._watchers):
                callback(addr, n)

    # -- who must know about writes (a guest's CPU drops stale translations) ----------
    def watch(self, callback: Callable[[int, int], None]) -> None:
        """Call ``callback(addr, n)`` after every :meth:`write` (and :meth:`written`)."""
        self._watchers.append(callback)

    def unwatch(self, callback: Callable[[int, int], None]) -> None:
        if callback in self._watchers:
            self._watchers.remove(callback)

    def written(self, addr: int, n: int) -> None:
        """Report ``n`` bytes at ``addr`` written through :attr:`view` instead of :meth:`write`.

        Code written into a running guest's memory that way is only guaranteed to
        run (instead of a stale translation of the old bytes) once reported.
        """
        for callback in list(self._watchers):
            callback(addr, n)

    def close(self) -> None:
        """Unmap the block.  Raises ``BufferError`` while someone still exports its buffer."""
        if self._view is None:
            return
        self._view.release()
        self._view = None
        self._map.close()
        self._unshared()
        self._drop_packed()
        self._forget_template()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at {self._address:#x}"
        return f"<GuestMemory {self._size:#x} bytes {state}>"
