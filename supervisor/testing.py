"""Test toolkit: write tiny guests in assembly and run them on a device.

For tests of guest software and of the supervisor itself (this project's tests
and benchmarks use it)::

    from supervisor import LguestDevice
    from supervisor.testing import boot, notified

    async def test_it_notifies():
        async with LguestDevice() as dev:
            g = await boot(dev, "main:\n LGUEST_INIT\n HCALL 17, 0x42\n")
            assert await notified(g) == 0x42

A guest body starts at label ``main``; it is wrapped in a prelude (stack, flat
GDT, segment registers, or with ``assemble(body, own_gdt=False)`` only the stack:
the guest then stays in the Host's boot segments, 0x60 and 0x68; macros ``HCALL nr,
a1, a2, a3``, ``LGUEST_INIT``, ``IDT vector, handler, type``; for guests with several
CPUs ``HCALL_REG nr, a1, a2, a3`` with operands such as ``%esi`` or ``$label``, and
``CPU_INIT data``, a started CPU's own LGUEST_INIT with its ``lguest_data`` at
``data``) and a postlude (``lguest_data``, a stack, and ``irq_return``, the
interrupt-return stub inside the no-irq range).  Needs GNU binutils (``as``, ``ld``,
``objcopy``, ``nm``); images are cached by content in ``$LGUEST_ASM_CACHE``
(default: the temp directory).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import abi
from .device import LguestDevice, LguestFile
from .launcher.layout import IMAGE_BASE, Layout, build_pagetables, plan, write_boot_info
from .launcher.loader import FLAT_TRAILER
from .memory import GuestMemory

CACHE = Path(os.environ.get("LGUEST_ASM_CACHE", Path(tempfile.gettempdir()) / "lguest-test-asm"))

_HEAD = r"""
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
.macro HCALL_REG nr, a1, a2, a3
    mov \a3, %ecx
    mov \a2, %ebx
    mov \a1, %edx
    mov $\nr, %eax
    int $0x1f
.endm
.macro CPU_INIT data
    movl $0x80, \data+1132
    mov $\data+20, %edi
    mov $0xff, %al
    mov $64, %ecx
    rep stosb
    HCALL 1, \data
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
"""

OWN_GDT = r"""
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

PRELUDE = _HEAD + OWN_GDT

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


# CPU 1's own lguest_data (``cpu1_data``, for ``CPU_INIT``) and stack (``stack1_top``):
# append to the body of a guest that starts a second CPU.
CPU1_AREAS = r"""
.bss
.align 4096
cpu1_data: .space 1136
.align 16
stack1: .space 4096
stack1_top:
"""


# Two CPUs: the Host interrupts CPU 0 (irq 3), which counts in memory (``count0``)
# meanwhile; its handler sends CPU 1, halted, irq 4 (``SEND_IPI``), whose handler
# notifies 0x1b1.  Each CPU needs a read in flight to run.
IPI_PINGER = (
    r"""
main:
    LGUEST_INIT
    IDT 35, to_cpu1
    IDT 36, on_cpu1
    HCALL_REG 64, $1, $secondary, $stack1_top
    movl $512, lguest_data
1:  incl count0
    jmp 1b
to_cpu1:
    HCALL 65, 1, 4
    movl $512, lguest_data
    iret
secondary:
    CPU_INIT cpu1_data
    movl $512, cpu1_data
2:  HCALL 10
    jmp 2b
on_cpu1:
    HCALL 17, 0x1b1
    movl $512, cpu1_data
    iret
.data
count0: .long 0
"""
    + CPU1_AREAS
)

# Halts for good, no clock event armed; the console's first irq (vector 33) is taken by
# a handler that enables interrupts (a pending irq the guest never takes would end
# every halt at once).  It never ends by itself.
SLEEPER = r"""
main:
    LGUEST_INIT
    IDT 33, handler
1:  HCALL 10
    jmp 1b
handler:
    movl $512, lguest_data
    iret
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


# Counts to TARGET in memory (`counter`) and in a register (stored in `regcount`),
# notifies 0xc0ffee, then powers off ("counted").  Fill in with .format(target=N).
COUNT_TO = r"""
.set TARGET, {target}
main:
    LGUEST_INIT
    xor %ebx, %ebx
1:  incl counter
    inc %ebx
    cmpl $TARGET, counter
    jne 1b
    mov %ebx, regcount
    HCALL 17, 0xc0ffee
    HCALL 2, msg, 1, 0
.data
counter: .long 0
regcount: .long 0
msg: .asciz "counted"
"""


@dataclass(frozen=True)
class AsmGuest:
    """An assembled flat image (loaded at ``IMAGE_BASE``; its .bss as zeros, then the flat
    image's trailer) and its symbols' addresses."""

    image: bytes
    symbols: dict[str, int]


def assemble(body: str, *, own_gdt: bool = True) -> AsmGuest:
    """Build a guest whose code starts at label ``main``.

    ``own_gdt=False``: the prelude loads no GDT and no segment register (the
    guest runs in the boot segments the Host gives every guest).
    Raises ``RuntimeError`` with the assembler's or linker's message on errors.
    """
    source = _HEAD + (OWN_GDT if own_gdt else "    jmp main\n") + body + POSTLUDE
    key = hashlib.sha256(source.encode()).hexdigest()[:20]
    out = CACHE / key
    if not (out / "guest.bin").exists():
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=CACHE))
        (work / "g.s").write_text(source)

        def run(*cmd: str) -> None:
            if shutil.which(cmd[0]) is None:
                raise RuntimeError(f"{cmd[0]} not found: assembling guests needs GNU binutils")
            done = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{cmd[0]} failed:\n{done.stderr}")

        run("as", "--32", "-o", "g.o", "g.s")
        run(
            "ld", "-m", "elf_i386", "-N", "-Ttext", hex(IMAGE_BASE), "-e", "_start",
            "--build-id=none", "-o", "g.elf", "g.o",
        )  # fmt: skip
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
    # A flat image ends with its trailer, after the .bss (zeros), which it must not cover.
    image = (out / "guest.bin").read_bytes().ljust(symbols["_end"] - IMAGE_BASE, b"\0")
    return AsmGuest(image + FLAT_TRAILER, symbols)


@dataclass
class Booted:
    """A guest that has been INITIALIZEd: its file, memory, layout and symbols."""

    file: LguestFile
    memory: GuestMemory
    layout: Layout
    guest: AsmGuest

    def u32(self, symbol: str) -> int:
        """The 32-bit value at ``symbol`` in guest memory."""
        return int.from_bytes(self.memory.read(self.guest.symbols[symbol], 4), "little")

    def set_u32(self, symbol: str, value: int) -> None:
        """Store a 32-bit value at ``symbol``."""
        self.memory.write(self.guest.symbols[symbol], value.to_bytes(4, "little"))

    async def read_word(self) -> int:
        """One read of the device: the address the guest notified."""
        return await notified(self)


def initialize_words(
    memory: GuestMemory, layout: Layout, start: int = IMAGE_BASE, cpus: int = 1
) -> bytes:
    """The ``LHREQ_INITIALIZE`` request for a guest loaded by :func:`load` (with the
    fifth word, the number of CPUs, only for more than one)."""
    words = [abi.LHREQ_INITIALIZE, memory.address, layout.pfn_limit, layout.pgdir, start]
    return abi.pack_words(*words, *([cpus] if cpus != 1 else []))


def load(guest: AsmGuest, ram_size: int = 1 << 20, cpus: int = 1) -> tuple[GuestMemory, Layout]:
    """Fresh Launcher memory with the image, page tables and boot info in place."""
    layout = plan(ram_size)
    memory = GuestMemory(layout.pfn_limit * abi.PAGE_SIZE)
    memory.write(IMAGE_BASE, guest.image)
    build_pagetables(memory.view, layout)
    write_boot_info(memory.view, layout, 0, b"", cpus)
    return memory, layout


async def boot(
    dev: LguestDevice, body: str | AsmGuest, ram_size: int = 1 << 20, cpus: int = 1
) -> Booted:
    """Assemble (if given source), load and INITIALIZE a guest; read to run it."""
    guest = assemble(body) if isinstance(body, str) else body
    memory, layout = load(guest, ram_size, cpus)
    f = dev.open(memory)
    await f.write(initialize_words(memory, layout, cpus=cpus))
    return Booted(f, memory, layout, guest)


async def run_to_end(booted: Booted) -> str:
    """Read until the guest dies (skipping notifies); return the reason it gives."""
    f = booted.file
    while True:
        try:
            await f.read(abi.WORD_SIZE)
        except FileNotFoundError:
            return (await f.read(256)).rstrip(b"\0").decode()


async def run_cpus_to_end(booted: Booted) -> str:
    """Read every CPU at once, as a Launcher does (one task each), skipping notifies,
    until the guest dies; return the reason it gives."""
    f = booted.file

    async def reader(cpu: int) -> None:
        while True:
            try:
                await f.read(abi.WORD_SIZE, cpu)
            except FileNotFoundError:
                return

    async with asyncio.TaskGroup() as tasks:
        for n in range(f.cpu_count):
            tasks.create_task(reader(n))
    return (await f.read(256)).rstrip(b"\0").decode()


async def notified(booted: Booted) -> int:
    """Run until the next notify and return its address."""
    address: int = abi.unpack_words(await booted.file.read(abi.WORD_SIZE))[0]
    return address


async def until(predicate: Callable[[], bool], timeout: float = 120.0) -> None:  # noqa: ASYNC109
    """Wait until ``predicate()`` holds; guest memory has no events, so poll it.

    The first checks only yield; later ones sleep a millisecond so that a long
    wait leaves the cores to the guests.  ``timeout`` bounds a wait that fails (a
    TimeoutError), so that a test never hangs; a passing wait never reaches it, so
    the default is generous enough for guests whose niced workers get a few
    percent of a core on a loaded machine.
    """
    async with asyncio.timeout(timeout):
        for _ in range(100):
            if predicate():
                return
            await asyncio.sleep(0)
        while not predicate():  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.001)
