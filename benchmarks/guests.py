"""Benchmark guests: assembled from source with binutils, as tests/guestasm.py does.

Each guest is the common prelude (stack, flat GDT, hypercall macros), the
benchmark's own code starting at ``main``, and the common data (``lguest_data``,
a stack, an interrupt-return stub inside the no-irq range).  The same image is
loaded for the supervised run and for the raw Unicorn baseline, so both execute
byte-identical code under the same page tables.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from supervisor import GuestMemory, LguestDevice, LguestFile, abi
from supervisor.launcher.layout import IMAGE_BASE, Layout, build_pagetables, plan, write_boot_info

CACHE = Path(
    os.environ.get("LGUEST_BENCH_ASM_CACHE", Path(tempfile.gettempdir()) / "lguest-bench-asm")
)

PRELUDE = r"""
.code32
.macro HCALL nr, a1=0, a2=0, a3=0
    mov $\nr, %eax
    mov $\a1, %edx
    mov $\a2, %ebx
    mov $\a3, %ecx
    int $0x1f
.endm
.macro LGUEST_INIT
    movl $0x80, lguest_data+1132
    movl $noirq_start, lguest_data+1120
    movl $noirq_end, lguest_data+1124
    mov $lguest_data+20, %edi
    mov $0xff, %al
    mov $64, %ecx
    rep stosb
    HCALL 1, lguest_data
.endm
.macro IDT vector, handler, type=0xe
    mov $6, %eax
    mov $\vector, %edx
    mov $\handler, %ebx
    and $0xffff, %ebx
    or $0x00080000, %ebx
    mov $\handler, %ecx
    and $0xffff0000, %ecx
    or $(0x8000 | (\type << 8)), %ecx
    int $0x1f
.endm
.text
.globl _start
_start:
    mov $stack_top, %esp
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %fs
    mov %ax, %gs
    mov %ax, %ss
    jmp main
"""

POSTLUDE = r"""
.text
noirq_start:
irq_return:
    movl $512, lguest_data
    iret
noirq_end:
.data
.align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
gdt_desc:
    .word 23
    .long gdt
.bss
.align 4096
lguest_data:
    .space 1136
.align 16
stack:
    .space 8192
stack_top:
"""

NOTIFY = 17
SMALL_RAM = 128 << 10  # the smallest RAM the Launcher's layout accepts for these images


@dataclass(frozen=True)
class Image:
    code: bytes
    symbols: dict[str, int]


def assemble(body: str) -> Image:
    """Build a guest whose code starts at label ``main``; cached by content."""
    source = PRELUDE + body + POSTLUDE
    key = hashlib.sha256(source.encode()).hexdigest()[:20]
    out = CACHE / key
    if not (out / "guest.bin").exists():
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=CACHE))
        (work / "g.s").write_text(source)

        def run(*cmd: str) -> None:
            subprocess.run(cmd, cwd=work, check=True, capture_output=True)

        run("as", "--32", "-o", "g.o", "g.s")
        run(
            "ld",
            "-m",
            "elf_i386",
            "-N",
            "-Ttext",
            hex(IMAGE_BASE),
            "-e",
            "_start",
            "--build-id=none",
            "-o",
            "g.elf",
            "g.o",
        )
        run("objcopy", "-O", "binary", "g.elf", "guest.bin")
        nm = subprocess.run(["nm", "g.elf"], cwd=work, check=True, capture_output=True, text=True)
        (work / "symbols").write_text(nm.stdout)
        for name in ("symbols", "guest.bin"):  # guest.bin last: it marks the entry complete
            os.replace(work / name, out / name)
    symbols = {}
    for line in (out / "symbols").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    return Image((out / "guest.bin").read_bytes(), symbols)


def load(image: Image, ram_size: int = 1 << 20) -> tuple[GuestMemory, Layout]:
    """Fresh Launcher memory with the image, page tables and boot info in place."""
    layout = plan(ram_size)
    memory = GuestMemory(layout.pfn_limit * abi.PAGE_SIZE)
    memory.write(IMAGE_BASE, image.code)
    build_pagetables(memory.view, layout)
    write_boot_info(memory.view, layout, 0, b"")
    return memory, layout


@dataclass
class Booted:
    file: LguestFile
    memory: GuestMemory
    layout: Layout
    image: Image

    def u32(self, symbol: str) -> int:
        return int.from_bytes(self.memory.read(self.image.symbols[symbol], 4), "little")

    def set_u32(self, symbol: str, value: int) -> None:
        self.memory.write(self.image.symbols[symbol], value.to_bytes(4, "little"))

    async def read_word(self) -> int:
        return abi.unpack_words(await self.file.read(abi.WORD_SIZE))[0]


def initialize_words(memory: GuestMemory, layout: Layout) -> bytes:
    return abi.pack_words(
        abi.LHREQ_INITIALIZE, memory.address, layout.pfn_limit, layout.pgdir, IMAGE_BASE
    )


async def boot(dev: LguestDevice, image: Image, ram_size: int = 1 << 20) -> Booted:
    """Load and INITIALIZE a guest; the caller reads to run it."""
    memory, layout = load(image, ram_size)
    f = dev.open(memory)
    await f.write(initialize_words(memory, layout))
    return Booted(f, memory, layout, image)


async def close(booted: Booted) -> None:
    await booted.file.close()
    with contextlib.suppress(BufferError):  # still exported: the garbage collector frees it
        booted.memory.close()
