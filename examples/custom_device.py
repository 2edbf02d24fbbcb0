"""A custom device in the device page: a RAM disk, serviced on NOTIFY.

The blockcopy guest looks for a device of type 2 (block) and copies sectors
0..7 to 8..15 through it.  Here that device is not the built-in file-backed
one but ``RamDisk``, written from scratch against the descriptor protocol
(docs/abi.md, "Custom devices"): the guest fills command/sector/count/buffer,
notifies the descriptor's address, and we set ``status`` before it resumes.

    python examples/custom_device.py
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from supervisor import GuestConfig, Supervisor
from supervisor.launcher import block
from supervisor.launcher.devices import DEV_TYPE_BLOCK, Device, Slot

BLOCKCOPY = Path(__file__).resolve().parent.parent / "guests" / "blockcopy.img"


class RamDisk(Device):
    """A block device whose sectors live in a bytearray."""

    type = DEV_TYPE_BLOCK

    def __init__(self, sectors: int) -> None:
        words = sectors * block.SECTOR_SIZE // 4
        self.data = bytearray(b"".join(b"%04d" % i for i in range(words)))
        self.sectors = sectors
        self.log: list[str] = []

    def attach(self, slot: Slot) -> None:
        super().attach(slot)
        slot.set(block.BLK_CAPACITY, self.sectors)
        slot.set(block.BLK_FLAGS, 0)

    async def notify(self, slot: Slot) -> None:
        command, sector = slot.get(block.BLK_COMMAND), slot.get(block.BLK_SECTOR)
        count, buffer = slot.get(block.BLK_COUNT), slot.get(block.BLK_BUFFER)
        start, size = sector * block.SECTOR_SIZE, count * block.SECTOR_SIZE
        status = block.BLK_STATUS_OK
        if sector + count > self.sectors or not slot.in_ram(buffer, size):
            status = block.BLK_STATUS_IOERR
        elif command == block.BLK_CMD_READ:
            slot.write(buffer, self.data[start : start + size])
        elif command == block.BLK_CMD_WRITE:
            self.data[start : start + size] = slot.read(buffer, size) or b""
        else:
            status = block.BLK_STATUS_UNSUPPORTED
        self.log.append(f"cmd {command} sectors {sector}..{sector + count - 1} -> {status}")
        slot.set(block.BLK_STATUS, status)


async def main() -> None:
    disk = RamDisk(sectors=32)
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=BLOCKCOPY, memory="1M"), devices=[disk])
        async for line in guest.console:
            print(f"[guest] {line}")
        result = await guest.wait()
    for entry in disk.log:
        print(f"[ramdisk] {entry}")
    half = 8 * block.SECTOR_SIZE
    print(f"sectors copied: {disk.data[:half] == disk.data[half : 2 * half]}")
    print(f"exit status {result.exit_status}")


if __name__ == "__main__":
    asyncio.run(main())
