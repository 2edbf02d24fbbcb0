"""The Launcher's parts: loader, layout, device page, console and block devices, read loop."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
from pathlib import Path

import pytest

from supervisor import GuestConfig, GuestMemory, LguestDevice, Supervisor, _slicing
from supervisor.abi import SWITCHER_PDE
from supervisor.launcher import block
from supervisor.launcher.console import LineStream
from supervisor.launcher.devices import MAX_DEVICES, Device, DeviceTable, Slot
from supervisor.launcher.launcher import MAX_TCG_BUFFER, Launcher, translation_buffer
from supervisor.launcher.layout import IMAGE_BASE, PAGE_OFFSET, build_pagetables, plan
from supervisor.launcher.loader import FLAT_TRAILER, Image, ImageError, parse_image, read_image

GUESTS = Path(__file__).resolve().parent.parent / "guests"
needs_binutils = pytest.mark.skipif(shutil.which("as") is None, reason="binutils missing")


def elf32(
    segments: list[tuple[int, bytes, int]], entry: int, *, cls: int = 1, machine: int = 3
) -> bytes:
    """A minimal ELF executable: (paddr, data, memsz) segments, data after the headers."""
    phoff, count = 52, len(segments)
    offset = phoff + 32 * count
    header = struct.pack(
        "<16sHHIIIIIHHHHHH",
        b"\x7fELF" + bytes([cls, 1, 1]) + bytes(9),
        2,
        machine,
        1,
        entry,
        phoff,
        0,
        0,
        52,
        32,
        count,
        40,
        0,
        0,
    )
    phdrs, body = b"", b""
    for paddr, data, memsz in segments:
        phdrs += struct.pack("<8I", 1, offset + len(body), paddr, paddr, len(data), memsz, 7, 4096)
        body += data
    return header + phdrs + body


# -- loader ------------------------------------------------------------------------
def test_flat_image_loads_at_image_base() -> None:
    image = read_image(GUESTS / "hello.img")
    assert (image.kind, image.entry, image.segments[0].paddr) == ("flat", IMAGE_BASE, IMAGE_BASE)


def test_a_flat_image_is_recognised_by_its_trailer_and_loaded_whole() -> None:
    data = (GUESTS / "hello.img").read_bytes()
    assert data.endswith(FLAT_TRAILER) and len(FLAT_TRAILER) == 16
    image = parse_image(data, "hello")
    assert image.segments[0].data == data  # the trailer is loaded with the rest
    tiny = parse_image(b"\xf4" + FLAT_TRAILER, "hlt")
    assert (tiny.kind, tiny.entry, tiny.end) == ("flat", IMAGE_BASE, IMAGE_BASE + 17)


def test_elf_image_uses_headers() -> None:
    image = read_image(GUESTS / "hello.elf")
    assert (image.kind, image.entry) == ("elf", 0x10000)
    flat = read_image(GUESTS / "hello.img").segments[0].data
    assert image.segments[0].data == flat


def test_elf_bss_is_zeroed() -> None:
    layout = plan(1 << 20)
    image = parse_image(elf32([(0x20000, b"\x90" * 16, 64)], 0x20000))
    with_junk = bytearray(b"\xff" * layout.memory_size)
    from supervisor.launcher.loader import load_image

    assert load_image(image, memoryview(with_junk), layout) == 0x20000
    assert with_junk[0x20000:0x20010] == b"\x90" * 16
    assert with_junk[0x20010:0x20040] == bytes(48)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image"),
        (b"\x7fELF\x01", "truncated"),
        (elf32([(0x10000, b"x", 1)], 0x10000, cls=2), "64-bit"),
        (elf32([(0x10000, b"x", 1)], 0x10000, machine=62), "not x86"),
        (elf32([(0x10000, b"x", 1)], 0x50000), "entry point"),
        (elf32([(0x10000, b"ab", 2), (0x10001, b"c", 1)], 0x10000), "overlap"),
        (elf32([], 0x10000), "nothing to load"),
        (b"# A README\n\nText is not a guest.\n", "not a guest image"),
        (b"\x90" * 64, "not a guest image"),  # code, but no flat image's trailer
        (b"\x90" * 64 + FLAT_TRAILER + b"\n", "not a guest image"),  # bytes after it
        (FLAT_TRAILER, "not a guest image"),  # the trailer alone: nothing to run
    ],
)
def test_bad_images_are_rejected(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse_image(data, "x")


@pytest.mark.one_loop
@pytest.mark.parametrize(
    ("paddr", "size", "message"),
    [
        (0x0, 16, "boot info page"),
        (0x10000, 0x100000, "more than the guest"),
        (0xFE000, 16, "page tables"),
    ],
)
async def test_images_may_not_overlap_reserved_pages(
    dev: LguestDevice, paddr: int, size: int, message: str
) -> None:
    image = parse_image(elf32([(paddr, b"\x90" * size, size)], paddr))
    with pytest.raises(ImageError, match=message):
        Launcher(dev, image, ram_size=1 << 20)


def test_missing_image_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        read_image(tmp_path / "nope.img")
    assert issubclass(ImageError, ValueError)


# -- layout ------------------------------------------------------------------------
def test_layout_reserved_ranges_and_limits() -> None:
    layout = plan(1 << 20)
    assert layout.device_page == 1 << 20
    assert layout.memory_size == (1 << 20) + 4096
    names = [what for _, _, what in layout.reserved()]
    assert names == ["the boot info page", "the page tables", "the device page"]
    with pytest.raises(ValueError):
        plan(PAGE_OFFSET)
    with pytest.raises(ValueError):
        plan(4096)


def test_pagetables_for_one_gib_stay_inside_the_directory() -> None:
    layout = plan(1 << 30)
    memory = GuestMemory(layout.memory_size)
    try:
        build_pagetables(memory.view, layout)
        pgdir = memory.read(layout.pgdir, 4096)
        first_table = memory.read(layout.pgdir + 4096, 8)
        assert struct.unpack_from("<I", pgdir, 4 * 1022)[0] != 0  # high mapping: up to 4 GiB
        assert struct.unpack_from("<I", pgdir, 4 * 1023)[0] == SWITCHER_PDE  # the Host's
        assert struct.unpack("<2I", first_table) == (0x67, 0x1067)  # and did not spill over
    finally:
        memory.close()


# -- device page ---------------------------------------------------------------------
def make_slot(memory: GuestMemory, raised: list[int]) -> Slot:
    return Slot(memory, 1 << 20, 1 << 20, 3, raised.append, lambda: None)


def test_slot_bounds() -> None:
    memory = GuestMemory((1 << 20) + 4096)
    try:
        slot = make_slot(memory, [])
        assert slot.read((1 << 20) - 4, 8) is None  # reaches the device page
        assert not slot.write(-1, b"x")
        assert slot.write(0x5000, b"abc") and slot.read(0x5000, 3) == b"abc"
        slot.set(60, 0x1_2345_6789)
        assert slot.get(60) == 0x2345_6789
        with pytest.raises(ValueError):
            slot.get(62)
        slot.set_words(52, (1, 2, 3))
        assert slot.get_words(52, 3) == (1, 2, 3)
        # Every field of a run of words lies in the 64-byte descriptor, or nothing happens.
        for offset, count in ((56, 3), (-4, 2), (0, 0), (0, 17), (64, 1)):
            with pytest.raises(ValueError):
                slot.get_words(offset, count)
            with pytest.raises(ValueError):
                slot.set_words(offset, (9,) * count)
        assert slot.get_words(52, 3) == (1, 2, 3)
        slot.set_bytes(44, bytes(range(8)))  # whole fields laid out by the caller
        assert memory.read((1 << 20) + 44, 8) == bytes(range(8))
        for offset, size in ((60, 8), (-4, 4), (44, 0), (44, 6), (64, 4)):
            with pytest.raises(ValueError):
                slot.set_bytes(offset, bytes(size))
        assert memory.read((1 << 20) + 44, 8) == bytes(range(8))
        for offset in (-4, 61, 64):
            with pytest.raises(ValueError):
                slot.set(offset, 9)
    finally:
        memory.close()


def test_device_table_registry() -> None:
    devices = [Device() for _ in range(3)]
    table = DeviceTable(devices)
    memory = GuestMemory((1 << 20) + 4096)
    try:
        table.attach(memory, 1 << 20, 1 << 20, lambda irq: None, lambda: None)
        found = table.lookup((1 << 20) + 64)
        assert found is not None and found[0] is devices[1] and found[1].irq == 2
        assert table.lookup((1 << 20) + 65) is None
        with pytest.raises(ValueError):
            table.add(devices[0])
    finally:
        memory.close()
    with pytest.raises(ValueError, match="at most"):
        DeviceTable([Device() for _ in range(MAX_DEVICES + 1)])


def test_line_stream_partial_lines_and_limit() -> None:
    async def collect(stream: LineStream) -> list[str]:
        return [line async for line in stream]

    stream = LineStream(maxlen=2)
    stream.push(b"a\nb")
    stream.push(b"\nc\nd")
    stream.close()
    assert asyncio.run(collect(stream)) == ["c", "d"]
    assert stream.dropped == 2
    endless = LineStream()
    endless.push(b"x" * (LineStream.MAX_LINE + 5))
    endless.close()
    assert [len(line) for line in asyncio.run(collect(endless))] == [LineStream.MAX_LINE, 5]


# -- block device -----------------------------------------------------------------------
@pytest.mark.one_loop
async def test_block_requests_are_checked_whole(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    data = os.urandom(16 * 512)
    path.write_bytes(data)
    memory = GuestMemory((1 << 20) + 4096)
    raised: list[int] = []
    dev = block.BlockDevice(path, readonly=True)
    await dev.start()
    try:
        slot = make_slot(memory, raised)
        dev.attach(slot)
        assert slot.get(block.BLK_CAPACITY) == 16 and slot.get(block.BLK_FLAGS) == 1

        async def request(command: int, sector: int, count: int, buffer: int) -> int:
            for field, value in [
                (block.BLK_COMMAND, command),
                (block.BLK_SECTOR, sector),
                (block.BLK_COUNT, count),
                (block.BLK_BUFFER, buffer),
                (block.BLK_STATUS, 0xFFFFFFFF),
            ]:
                slot.set(field, value)
            await dev.notify(slot)
            return slot.get(block.BLK_STATUS)

        assert await request(block.BLK_CMD_READ, 15, 1, 0x8000) == block.BLK_STATUS_OK
        assert memory.read(0x8000, 512) == data[15 * 512 :]
        assert await request(block.BLK_CMD_READ, 15, 2, 0x8000) == block.BLK_STATUS_IOERR
        assert await request(block.BLK_CMD_READ, 0, 1, (1 << 20) - 100) == block.BLK_STATUS_IOERR
        assert await request(block.BLK_CMD_WRITE, 0, 1, 0x8000) == block.BLK_STATUS_READONLY
        assert await request(7, 0, 1, 0x8000) == block.BLK_STATUS_UNSUPPORTED
        assert raised == []
    finally:
        await dev.stop()
        memory.close()
    assert path.read_bytes() == data


# -- the read loop ---------------------------------------------------------------------
class BootCounter(Device):
    """Counts notifies across reboots and tells the guest the count (descriptor +8)."""

    type = 0x42

    def __init__(self) -> None:
        self.count = 0

    async def notify(self, slot: Slot) -> None:
        self.count += 1
        slot.set(8, self.count)


REBOOTER = r"""
main:
    LGUEST_INIT
    mov 12, %edx            # boot info: device page
    add $64, %edx           # descriptor 1 (after the console)
    push %edx
    mov $17, %eax           # NOTIFY
    int $0x1f
    pop %edx
    cmpl $3, 8(%edx)
    jae 2f
    HCALL 2, msg, 2         # SHUTDOWN: restart
2:  HCALL 2, msg, 1, 7      # SHUTDOWN: power off, status 7
1:  jmp 1b
.data
msg: .asciz "again"
"""


async def assembled(tmp_path: Path, body: str) -> Path:
    from guestasm import assemble

    path = tmp_path / "guest.img"
    path.write_bytes(assemble(body).image)
    return path


@pytest.mark.one_loop
@needs_binutils
async def test_reboot_reloads_and_reattaches(tmp_path: Path) -> None:
    image = await assembled(tmp_path, REBOOTER)
    counter = BootCounter()
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=image, memory="1M"), devices=[counter])
        result = await guest.wait()
    assert (result.exit_status, result.restarts, result.died) == (7, 2, False)
    assert counter.count == 3


@pytest.mark.one_loop
@needs_binutils
async def test_reboots_are_bounded(tmp_path: Path) -> None:
    image = await assembled(tmp_path, REBOOTER.replace("cmpl $3", "cmpl $100"))
    async with Supervisor(max_restarts=2) as sup:
        guest = await sup.launch(GuestConfig(image=image, memory="1M"), devices=[BootCounter()])
        result = await guest.wait()
    assert result.died and result.restarts == 2
    assert result.reason == "too many restarts (2): again"


@pytest.mark.one_loop
@needs_binutils
async def test_notify_of_unknown_address_kills(tmp_path: Path) -> None:
    image = await assembled(tmp_path, "main:\n LGUEST_INIT\n HCALL 17, 0x1234\n1: jmp 1b\n")
    async with Supervisor() as sup:
        result = await (await sup.launch(GuestConfig(image=image, memory="1M"))).wait()
    assert result.died and result.reason == "notify of unknown device address 0x1234"


class Broken(Device):
    type = 0x43

    async def notify(self, slot: Slot) -> None:
        raise RuntimeError("boom")


@pytest.mark.one_loop
@needs_binutils
async def test_failing_device_kills_only_its_guest(tmp_path: Path) -> None:
    image = await assembled(tmp_path, REBOOTER)
    async with Supervisor() as sup:
        bad = await sup.launch(GuestConfig(image=image, memory="1M"), devices=[Broken()])
        good = await sup.launch(GuestConfig(image=GUESTS / "hello.img", memory="1M"))
        result = await bad.wait()
        assert (await good.wait()).ok
    assert result.died and result.reason == "device Broken failed: boom"


async def test_kill_before_it_runs_and_after_it_ended() -> None:
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=GUESTS / "spinner.img", memory="1M"))
        result = await guest.kill("bye")
        assert result.died and result.reason == "bye"
        hello = await sup.launch(GuestConfig(image=GUESTS / "hello.img", memory="1M"))
        assert (await hello.wait()).ok
        assert await hello.kill() == await hello.wait()


async def test_supervisor_exit_kills_running_guests() -> None:
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=GUESTS / "spinner.img", memory="1M"))
    result = await guest.wait()
    assert result.died and result.reason == "supervisor closed"
    assert sup.device.files == frozenset()


async def test_stats_count_the_work() -> None:
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=GUESTS / "hello.img", memory="1M"))
        await guest.wait()
    stats = guest.stats
    assert stats.hypercalls >= 2 and stats.notifies == 1
    # Blocks are counted where the block hook meters slices (see _slicing.COUNTS_BLOCKS).
    assert stats.blocks > 0 or not _slicing.COUNTS_BLOCKS
    assert stats.run_time > 0


@pytest.mark.one_loop
async def test_image_too_big_is_refused_before_running(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    path.write_bytes(b"\x90" * (200 << 10) + FLAT_TRAILER)
    async with Supervisor() as sup:
        with pytest.raises(ImageError, match="more than the guest"):
            await sup.launch(GuestConfig(image=path, memory="128K"))
        assert sup.guests == []


# -- the translation buffer ---------------------------------------------------------
def _image_of(size: int) -> Image:
    """An ELF image of ``size`` loaded bytes at IMAGE_BASE that spins (``jmp .``)."""
    return parse_image(elf32([(IMAGE_BASE, b"\xeb\xfe" + bytes(size - 2), size)], IMAGE_BASE))


def test_translation_buffer_grows_with_the_image() -> None:
    least = 1 << 20
    assert translation_buffer(_image_of(100 << 10), least) == least  # the SDK's examples
    # 8 bytes per loaded byte, doubled up from the device's: the SQLite shell's size
    assert translation_buffer(_image_of(1_300_000), least) == 16 << 20
    assert translation_buffer(_image_of(300 << 10), least) == 4 << 20
    assert translation_buffer(_image_of(20 << 20), least) == MAX_TCG_BUFFER
    assert translation_buffer(_image_of(4096), 32 << 20) == 32 << 20  # never below the device's


async def _file_buffer(dev: LguestDevice, image: Image) -> tuple[int, int, bool]:
    """The translation buffer a Launcher's file of ``image`` gets, its CPU 0's, and
    whether that CPU takes its engines from the device's pool."""
    launcher = Launcher(dev, image, ram_size=4 << 20)
    run = asyncio.create_task(launcher.run())
    try:
        # until INITIALIZE (the Launcher has no event for it)
        while launcher.file is None or launcher.file.stats is None:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        engine = launcher.file.cpu(0).engine
        pooled = engine.pool is not None and engine.pool is dev.engines
        return launcher.file.tcg_buffer, engine.tcg_buffer, pooled
    finally:
        await launcher.kill()
        await run


@pytest.mark.one_loop
async def test_a_big_image_gets_a_big_translation_buffer(dev: LguestDevice) -> None:
    # A pool's engines have the device's buffer: a bigger one's CPUs keep their own.
    pooled = dev.engines is not None
    assert await _file_buffer(dev, _image_of(1_300_000)) == (16 << 20, 16 << 20, False)
    small = await _file_buffer(dev, _image_of(4096))
    assert small == (dev.tcg_buffer, dev.tcg_buffer, pooled)


@pytest.mark.one_loop
async def test_a_file_takes_its_own_translation_buffer(dev: LguestDevice) -> None:
    memory = GuestMemory(1 << 20)
    try:
        assert dev.open(memory).tcg_buffer == dev.tcg_buffer
        assert dev.open(memory, tcg_buffer=8 << 20).tcg_buffer == 8 << 20
        with pytest.raises(ValueError, match="tcg_buffer must be > 0"):
            dev.open(memory, tcg_buffer=0)
    finally:
        for f in dev.files:
            await f.close()
        memory.close()
