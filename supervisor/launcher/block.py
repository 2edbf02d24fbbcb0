"""The file-backed block device: 512-byte sectors, one request per notify.

Descriptor fields (offsets in guests/lguest.inc): ``capacity`` (sectors, set by
the Launcher), ``flags`` (bit 0: read-only), and the request the guest fills
before notifying: ``command`` (1 read, 2 write), ``sector``, ``count``,
``buffer`` (guest-physical), and ``status``, which the Launcher always
overwrites with one of the ``BLK_STATUS_*`` codes before the guest resumes.

Guarantees: a request is checked whole before any byte moves (sectors within
capacity, buffer within guest RAM, write allowed), so a bad request changes
nothing; a write reaches the file with ``pwrite`` and ``fdatasync`` before the
guest resumes, so a guest that dies later never leaves a half-written
request behind; a read-only device opens its file ``O_RDONLY``, so the file
stays byte-identical.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from .devices import DEV_TYPE_BLOCK, Device, Slot

BLK_CAPACITY = 8
BLK_FLAGS = 12
BLK_COMMAND = 16
BLK_SECTOR = 20
BLK_COUNT = 24
BLK_BUFFER = 28
BLK_STATUS = 32
BLK_FLAG_RO = 1
BLK_CMD_READ = 1
BLK_CMD_WRITE = 2
SECTOR_SIZE = 512

BLK_STATUS_OK = 0
BLK_STATUS_IOERR = 1  # out of range, bad buffer, or the host file failed
BLK_STATUS_UNSUPPORTED = 2  # unknown command
BLK_STATUS_READONLY = 3  # write to a read-only device


class BlockDevice(Device):
    """A block device backed by ``path``; capacity is the file size in whole sectors."""

    type = DEV_TYPE_BLOCK

    def __init__(self, path: str | Path, *, readonly: bool = False, sync: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.sync = sync
        self._fd: int | None = None
        self.capacity = 0
        self.requests = 0

    async def start(self) -> None:
        """Open the file.  Raises ``OSError`` (e.g. missing, or not writable when it must be)."""
        self.open()

    def open(self) -> None:
        """Open the backing file now (idempotent); see :meth:`start`."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY if self.readonly else os.O_RDWR)
            self.capacity = os.fstat(self._fd).st_size // SECTOR_SIZE

    async def stop(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def attach(self, slot: Slot) -> None:
        super().attach(slot)
        slot.set(BLK_CAPACITY, min(self.capacity, 0xFFFFFFFF))
        slot.set(BLK_FLAGS, BLK_FLAG_RO if self.readonly else 0)

    async def notify(self, slot: Slot) -> None:
        self.requests += 1
        slot.set(BLK_STATUS, await self._request(slot))

    async def _request(self, slot: Slot) -> int:
        command = slot.get(BLK_COMMAND)
        sector, count, buffer = slot.get(BLK_SECTOR), slot.get(BLK_COUNT), slot.get(BLK_BUFFER)
        size = count * SECTOR_SIZE
        if command not in (BLK_CMD_READ, BLK_CMD_WRITE):
            return BLK_STATUS_UNSUPPORTED
        if command == BLK_CMD_WRITE and self.readonly:
            return BLK_STATUS_READONLY
        if sector + count > self.capacity or not slot.in_ram(buffer, size) or self._fd is None:
            return BLK_STATUS_IOERR
        fd, offset = self._fd, sector * SECTOR_SIZE
        try:
            if command == BLK_CMD_READ:
                data = await asyncio.to_thread(os.pread, fd, size, offset)
                if len(data) != size:
                    return BLK_STATUS_IOERR
                slot.write(buffer, data)
            else:
                data = slot.read(buffer, size) or b""
                await asyncio.to_thread(_write_all, fd, data, offset, self.sync)
        except OSError:
            return BLK_STATUS_IOERR
        return BLK_STATUS_OK


def _write_all(fd: int, data: bytes, offset: int, sync: bool) -> None:
    """Write all of ``data`` at ``offset`` (looping on short writes), then sync if asked."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
    if sync:
        os.fdatasync(fd)
