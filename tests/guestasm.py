"""Assemble tiny test guests from source with binutils, cached by content.

Every test guest is: the common prelude (stack, flat GDT, macros), the test's
own code starting at ``main``, then the common data (``lguest_data``, stack,
and an interrupt-return stub inside the noirq range).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from supervisor import GuestMemory, LguestDevice, LguestFile, abi
from supervisor.launcher.layout import IMAGE_BASE, Layout, build_pagetables, plan, write_boot_info

CACHE = Path(os.environ.get("LGUEST_ASM_CACHE", Path(tempfile.gettempdir()) / "lguest-test-asm"))

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


# A guest that counts in memory (symbol `counter`) forever.
SPIN = r"""
main:
    LGUEST_INIT
1:  incl counter
    jmp 1b
.data
counter: .long 0
"""


@dataclass(frozen=True)
class Guest:
    image: bytes
    symbols: dict[str, int]


def assemble(body: str) -> Guest:
    """Build a guest whose code starts at label ``main``.  Raises on assembler errors."""
    source = PRELUDE + body + POSTLUDE
    key = hashlib.sha256(source.encode()).hexdigest()[:20]
    out = CACHE / key
    if not (out / "guest.bin").exists():
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=CACHE))
        (work / "g.s").write_text(source)

        def run(*cmd: str) -> None:
            done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{cmd[0]} failed:\n{done.stderr}")

        run("as", "--32", "-o", "g.o", "g.s")
        run("ld", "-m", "elf_i386", "-N", "-Ttext", hex(IMAGE_BASE), "-e", "_start",
            "--build-id=none", "-o", "g.elf", "g.o")
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
    return Guest((out / "guest.bin").read_bytes(), symbols)


@dataclass
class Booted:
    file: LguestFile
    memory: GuestMemory
    layout: Layout
    guest: Guest

    def u32(self, symbol: str) -> int:
        return int.from_bytes(self.memory.read(self.guest.symbols[symbol], 4), "little")


def load(guest: Guest, ram_size: int = 1 << 20) -> tuple[GuestMemory, Layout]:
    layout = plan(ram_size)
    memory = GuestMemory(layout.pfn_limit * abi.PAGE_SIZE)
    memory.write(IMAGE_BASE, guest.image)
    build_pagetables(memory.view, layout)
    write_boot_info(memory.view, layout, 0, b"")
    return memory, layout


async def boot(dev: LguestDevice, body: str, ram_size: int = 1 << 20) -> Booted:
    """Assemble, load and INITIALIZE a guest; the caller reads to run it."""
    guest = assemble(body)
    memory, layout = load(guest, ram_size)
    f = dev.open(memory)
    await f.write(
        abi.pack_words(
            abi.LHREQ_INITIALIZE, memory.address, layout.pfn_limit, layout.pgdir, IMAGE_BASE
        )
    )
    return Booted(f, memory, layout, guest)


async def run_to_end(booted: Booted) -> str:
    """Read until the guest dies (skipping notifies); return the reason it gives."""
    f = booted.file
    while True:
        try:
            await f.read(abi.WORD_SIZE)
        except FileNotFoundError:
            return (await f.read(256)).rstrip(b"\0").decode()


async def notified(booted: Booted) -> int:
    """Run until the next notify and return its address."""
    return abi.unpack_words(await booted.file.read(abi.WORD_SIZE))[0]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds; guest memory has no events, so poll it.

    The first checks only yield; later ones sleep a millisecond so that a long
    wait leaves the cores to the guests.
    """
    async with asyncio.timeout(timeout):
        for _ in range(100):
            if predicate():
                return
            await asyncio.sleep(0)
        while not predicate():
            await asyncio.sleep(0.001)
