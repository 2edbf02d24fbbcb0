"""Requests straight to a files device through its slot, written as the guest runtime
writes them: how the device tests send what no compiled guest would (bad pointers,
oversized transfers, unknown operations)."""

from __future__ import annotations

from supervisor.launcher import files
from supervisor.launcher.devices import Slot
from supervisor.memory import GuestMemory


def slot_at_1m(memory: GuestMemory) -> Slot:
    """A slot at 1 MiB of ``memory`` (its interrupt and wake-up go nowhere): ``memory``
    needs a page past 1 MiB; the guest's pointers are below it."""
    return Slot(memory, 1 << 20, 1 << 20, 3, lambda irq: None, lambda: None)


class Requests:
    """``await request(op, fd, *args)``: one request to ``dev`` through ``slot``, its
    signed 64-bit result (``-errno`` for a guest error); a request that kills the guest
    raises the device's :class:`files.FileRequestError`."""

    def __init__(self, dev: files.FilesDevice, slot: Slot) -> None:
        self.dev, self.slot = dev, slot

    async def __call__(self, op: int, fd: int, *args: int) -> int:
        slot = self.slot
        slot.set(files.FS_OP, op)
        slot.set(files.FS_FD, fd)
        for i, value in enumerate([*args, 0, 0, 0, 0, 0, 0, 0][:7]):
            slot.set(files.FS_A0 + 4 * i, value)
        await self.dev.notify(slot)
        lo, hi = slot.get(files.FS_RESULT), slot.get(files.FS_RESULT_HI)
        return int.from_bytes((lo | hi << 32).to_bytes(8, "little"), "little", signed=True)
