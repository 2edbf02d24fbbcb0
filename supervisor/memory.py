"""The Launcher's memory: one page-aligned anonymous mapping that guests use as RAM."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable

from .abi import PAGE_SIZE


class GuestMemory:
    """A page-aligned block of the Launcher's memory.

    ``address`` is the block's "user address": ``LHREQ_INITIALIZE``'s ``base``
    names a page inside ``[address, address + size)``.  Pages are committed
    lazily by the host kernel, so an untouched guest costs no RAM.

    Offsets given to :meth:`read` and :meth:`write` are relative to the start of
    the block; a range outside it raises ``ValueError``.  The memory stays valid
    until :meth:`close`; a device keeps its own reference while a guest uses it.
    """

    def __init__(self, size: int) -> None:
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

    @property
    def address(self) -> int:
        """The integer address of the first byte (what ``base`` refers to)."""
        return self._address

    @property
    def size(self) -> int:
        return self._size

    @property
    def view(self) -> memoryview:
        """A writable memoryview of the whole block (raises ``ValueError`` once closed)."""
        if self._view is None:
            raise ValueError("guest memory is closed")
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
        self._check(addr, len(data))
        self.view[addr : addr + len(data)] = data
        if self._watchers:
            self.written(addr, len(data))

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

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at {self._address:#x}"
        return f"<GuestMemory {self._size:#x} bytes {state}>"
