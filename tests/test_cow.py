"""Copy-on-write memory: templates shared between guests, private once written."""

from __future__ import annotations

import asyncio
import mmap
import os
import shutil
from pathlib import Path
from typing import cast

import pytest

from supervisor import GuestMemory, LguestDevice
from supervisor.abi import PAGE_SIZE
from supervisor.launcher import launcher as launcher_module
from supervisor.launcher.devices import Device, Slot, write_descriptors
from supervisor.launcher.launcher import Launcher, boot_template
from supervisor.launcher.layout import (
    IMAGE_BASE,
    Layout,
    build_pagetables,
    plan,
    write_boot_info,
)
from supervisor.launcher.loader import load_image, read_image
from supervisor.memory import MemoryTemplate
from supervisor.snapshot import Snapshot
from supervisor.state import Exit, GuestState

# The subject is the memory's shared and private pages, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

GUESTS = Path(__file__).resolve().parent.parent / "guests"
needs_binutils = pytest.mark.skipif(shutil.which("as") is None, reason="binutils missing")
SIZE = 64 * PAGE_SIZE
# Three written pages: 0, 5 and 6 (a run), the rest holes.
CONTENT = {0: b"boot", 5 * PAGE_SIZE: b"\x11" * PAGE_SIZE, 6 * PAGE_SIZE + 8: b"tail"}


def fill(view: memoryview) -> None:
    for offset, data in CONTENT.items():
        view[offset : offset + len(data)] = data


def expected() -> bytes:
    raw = bytearray(SIZE)
    fill(memoryview(raw))
    return bytes(raw)


def smaps_field(address: int, field: str) -> int:
    """``field`` (in bytes) of the mapping that starts at ``address``, from /proc/self/smaps."""
    start = f"{address:x}-"
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split()[0] and not line.split()[0].endswith(":"):
                inside = line.startswith(start)
            elif inside and line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping at {address:#x}")


def test_memories_of_a_template_start_with_its_bytes_and_share_them() -> None:
    template = MemoryTemplate(SIZE, fill)
    memories = [GuestMemory(SIZE, template) for _ in range(4)]
    try:
        for memory in memories:
            assert memory.shared
            assert memory.read(0, SIZE) == expected()  # touches every page
        # Read, nothing is private to any memory: the pages are the template's.
        assert [smaps_field(m.address, "Anonymous") for m in memories] == [0] * 4
        assert all(smaps_field(m.address, "Rss") == SIZE for m in memories)
        memories[0].write(5 * PAGE_SIZE + 1, b"\x22")
        memories[1].write(40 * PAGE_SIZE, b"x")  # a hole of the template
        assert [smaps_field(m.address, "Anonymous") for m in memories] == [
            PAGE_SIZE,
            PAGE_SIZE,
            0,
            0,
        ]
        # A write is the writer's only.
        assert memories[0].read(5 * PAGE_SIZE, 3) == b"\x11\x22\x11"
        for memory in memories[1:]:
            assert memory.read(5 * PAGE_SIZE, 3) == b"\x11\x11\x11"
        assert GuestMemory(SIZE, template).read(0, SIZE) == expected()
    finally:
        for memory in memories:
            memory.close()
        template.close()


def test_a_template_cannot_be_changed_once_built() -> None:
    template = MemoryTemplate(SIZE, fill)
    try:
        fd = template.fileno()
        with pytest.raises(PermissionError):  # sealed: no writable shared mapping
            mmap.mmap(fd, SIZE, flags=mmap.MAP_SHARED)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, PAGE_SIZE)
    finally:
        template.close()


def test_copy_into_gives_the_same_bytes_writing_only_the_data() -> None:
    template = MemoryTemplate(SIZE, fill)
    memory = GuestMemory(SIZE)
    try:
        template.copy_into(memory.view)
        assert memory.read(0, SIZE) == expected()
        assert not memory.shared
    finally:
        memory.close()
        template.close()


def test_clear_zeroes_a_templated_memory() -> None:
    template = MemoryTemplate(SIZE, fill)
    memory = GuestMemory(SIZE, template)
    try:
        memory.write(5 * PAGE_SIZE, b"\x33")
        memory.clear()
        assert memory.read(0, SIZE) == bytes(SIZE)
        assert not memory.shared
    finally:
        memory.close()
    # A snapshot restored over one (clear=True) leaves nothing of the template.
    memory = GuestMemory(SIZE, template)
    try:
        snap = Snapshot(SIZE, [(1, 1)], b"\x44" * PAGE_SIZE, state=cast(GuestState, None))
        memory.write(0, b"junk")
        snap.write_memory(memory, clear=True)
        assert memory.read(0, SIZE) == bytes(PAGE_SIZE) + b"\x44" * PAGE_SIZE + bytes(
            SIZE - 2 * PAGE_SIZE
        )
    finally:
        memory.close()
        template.close()


def test_template_size_must_match_and_closed_template_refuses() -> None:
    template = MemoryTemplate(SIZE, fill)
    with pytest.raises(ValueError, match="template of"):
        GuestMemory(2 * SIZE, template)
    template.close()
    with pytest.raises(ValueError, match="closed"):
        GuestMemory(SIZE, template)
    with pytest.raises(ValueError, match="multiple of the page size"):
        MemoryTemplate(SIZE + 1, fill)


def test_boot_template_holds_what_a_copying_boot_wrote() -> None:
    image = read_image(GUESTS / "hello.img")
    layout = plan(1 << 20)
    template = boot_template(image, layout, (1, 2), b"a=b", 1, b"X=1\0")
    assert boot_template(image, layout, (1, 2), b"a=b", 1, b"X=1\0") is template
    assert boot_template(image, layout, (1, 2), b"a=c", 1, b"X=1\0") is not template
    copied = GuestMemory(layout.memory_size)
    mapped = GuestMemory(layout.memory_size, template)
    try:
        load_image(image, copied.view, layout)
        build_pagetables(copied.view, layout)
        write_boot_info(copied.view, layout, 2, b"a=b", 1, b"X=1\0")
        write_descriptors(copied.view, layout.device_page, (1, 2))
        assert mapped.read(0, mapped.size) == copied.read(0, copied.size)
        assert mapped.read(IMAGE_BASE, 16) == image.segments[0].data[:16]
    finally:
        copied.close()
        mapped.close()


def test_boot_templates_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher_module, "TEMPLATES_KEPT", 2)
    image = read_image(GUESTS / "hello.img")
    layout = plan(1 << 20)
    made = [boot_template(image, layout, (), str(i).encode(), 1, b"") for i in range(4)]
    assert [t.closed for t in made] == [True, True, False, False]


# A guest that adds one to a word of its own image and reports the sum as the address
# of a notify (which the Launcher names when it kills the guest for it).
INCREMENTER = r"""
main:
    LGUEST_INIT
    incl counter
    movl counter, %esi
    HCALL_REG 17, %esi, $0, $0
1:  jmp 1b
.data
counter: .long 0x1000
"""


@needs_binutils
async def test_guests_of_one_image_share_it_and_write_their_own(tmp_path: Path) -> None:
    from guestasm import assemble

    path = tmp_path / "inc.img"
    path.write_bytes(assemble(INCREMENTER).image)
    dev = LguestDevice()
    shared: list[bool] = []
    launchers = [Launcher(dev, path, ram_size=1 << 20) for _ in range(3)]
    for launcher in launchers:
        launcher.on_boot.append(lambda f: shared.append(f.memory.shared))
    ends: list[Exit] = await asyncio.gather(*(launcher.run() for launcher in launchers))
    assert shared == [True] * 3
    assert [end.reason for end in ends] == ["notify of unknown device address 0x1001"] * 3


def page_is_shared(address: int) -> bool:
    """The page at ``address`` is mapped and is a file's (not a private copy): pagemap
    bits 63 (present) and 61 (file page or shared anonymous)."""
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(address // PAGE_SIZE * 8)
        entry = int.from_bytes(pagemap.read(8), "little")
    return bool(entry >> 63 & 1) and bool(entry >> 61 & 1)


class PageTableProbe(Device):
    """At the guest's first notify (it runs paged by then), looks at its boot page tables."""

    type = 0x45

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.seen: list[bool] = []

    async def notify(self, slot: Slot) -> None:
        base = slot.memory.address
        pgdir = self.layout.pgdir
        self.seen = [
            slot.memory.shared,
            page_is_shared(base + pgdir),  # the directory: entry 1023 written before
            page_is_shared(base + pgdir + PAGE_SIZE),  # the table: accessed, dirty preset
            # Its descriptor starts in the boot template and nobody wrote it: shared.
            page_is_shared(base + self.layout.device_page),
        ]


# Runs paged through code, data and stack, then notifies its device and ends.
PAGED = r"""
main:
    LGUEST_INIT
    movl $1, %eax
    pushl %eax
    popl %ebx
    HCALL 17, 0x100000
    HCALL 2, msg, 1, 0
.data
msg: .asciz "paged"
"""


@needs_binutils
async def test_running_guests_leave_their_boot_page_tables_shared(tmp_path: Path) -> None:
    from guestasm import assemble

    path = tmp_path / "paged.img"
    path.write_bytes(assemble(PAGED).image)
    layout = plan(1 << 20)
    probe = PageTableProbe(layout)
    end = await Launcher(LguestDevice(), path, ram_size=1 << 20, devices=[probe]).run()
    assert not end.died, end
    assert probe.seen == [True, True, True, True]


def test_past_the_shared_limit_memories_get_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    from supervisor import memory as memory_module

    live = memory_module.shared_memories()
    monkeypatch.setattr(memory_module, "SHARED_LIMIT", live + 2)
    template = MemoryTemplate(SIZE, fill)
    memories = [GuestMemory(SIZE, template) for _ in range(3)]
    try:
        assert [m.shared for m in memories] == [True, True, False]
        assert all(m.read(0, SIZE) == expected() for m in memories)
        assert memory_module.shared_memories() == live + 2
        memories[0].close()
        memories[1].clear()
        assert memory_module.shared_memories() == live
        memories.append(GuestMemory(SIZE, template))
        assert memories[-1].shared and memory_module.shared_memories() == live + 1
    finally:
        for memory in memories:
            memory.close()
        template.close()
    assert memory_module.shared_memories() == live
