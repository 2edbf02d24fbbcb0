"""The block file survives guests that die or are killed in the middle of writing."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from supervisor import GuestConfig, Supervisor
from supervisor.testing import assemble, until

# The subject is the block file's bytes, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

SECTOR = 512
SECTORS = 32
FILL = 0xEE

# Writes 4-sector requests forever, each filled with the round number (a u32 pattern),
# to sectors (round % 8) * 4 .. +4 of the block device (device 1: the console is device 0).
WRITER = r"""
main:
    LGUEST_INIT
    mov 12, %edi                 # boot info: the device page
    add $64, %edi                # descriptor 1: the block device
    xor %esi, %esi
1:  inc %esi
    mov $buf, %ebx
    mov $512, %ecx
2:  mov %esi, (%ebx)
    add $4, %ebx
    loop 2b
    movl $2, 16(%edi)            # write
    mov %esi, %eax
    and $7, %eax
    shl $2, %eax
    mov %eax, 20(%edi)           # sector
    movl $4, 24(%edi)            # count
    movl $buf, 28(%edi)
    mov $17, %eax
    mov %edi, %edx
    int $0x1f                    # NOTIFY the descriptor: the write happens now
    jmp 1b
.bss
.align 16
buf: .space 2048
"""


def whole_sectors(data: bytes) -> bool:
    """Every sector is untouched or holds one request's pattern: nothing torn."""
    for i in range(0, len(data), SECTOR):
        sector = data[i : i + SECTOR]
        if sector == bytes([FILL]) * SECTOR:
            continue
        if sector != sector[:4] * (SECTOR // 4):
            return False
    return True


@pytest.fixture
def writer_image(tmp_path: Path) -> Path:
    path = tmp_path / "writer.img"
    path.write_bytes(assemble(WRITER).image)
    return path


@pytest.mark.parametrize("seed", range(4))
async def test_killed_or_exhausted_writers_leave_whole_sectors(
    writer_image: Path, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes([FILL]) * SECTORS * SECTOR)
    async with Supervisor() as sup:
        budget = rng.randrange(2_000, 200_000)
        dies = await sup.launch(
            GuestConfig(image=writer_image, memory="1M", block=disk, max_blocks=budget)
        )
        result = await asyncio.wait_for(dies.wait(), 60)
        assert result.died and result.reason.startswith("instruction budget exhausted")
        assert whole_sectors(disk.read_bytes())
        killed = await sup.launch(GuestConfig(image=writer_image, memory="1M", block=disk))
        writes = rng.randrange(1, 400)
        await until(lambda: killed.stats.notifies >= writes, 30)
        result = await asyncio.wait_for(killed.kill(), 30)
        assert result.died
    data = disk.read_bytes()
    assert len(data) == SECTORS * SECTOR
    assert whole_sectors(data)
    assert data != bytes([FILL]) * SECTORS * SECTOR  # the writers did write


async def test_a_read_only_file_stays_byte_identical_under_a_writer(
    writer_image: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    original = bytes(range(256)) * (SECTORS * SECTOR // 256)
    disk.write_bytes(original)
    async with Supervisor() as sup:
        guest = await sup.launch(
            GuestConfig(
                image=writer_image, memory="1M", block=disk, block_readonly=True, max_blocks=50_000
            )
        )
        result = await asyncio.wait_for(guest.wait(), 60)
    assert result.died
    assert disk.read_bytes() == original
