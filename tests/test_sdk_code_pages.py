"""C guests run code only from .text's pages, so their stores to data stay fast.

QEMU (Unicorn) keeps every store to a page the CPU may run code from on its slow
path, and an x86-32 page without PAE is always executable, except to ring-0 code
under ``CR4.SMEP`` when its entry says "user".  So the runtime makes .text's entries
supervisor ones and turns SMEP on (runtime.c's ``protect_code``), guest.ld keeps
every writable section off .text's pages, and a fetch from any other page makes
that page executable and runs on (``make_executable``).  The Host drops
translations only through pages code can run from, since Unicorn's lookup
through any other leaves a page fault behind that turns the guest's next real
one into a double fault (codecache._remove_code, _fuel.c's ``remove_code``).

Needs the ``sdk`` extra (Zig's C compiler); without it these tests skip.
"""

from __future__ import annotations

import asyncio
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import Exit, GuestConfig, Supervisor, _slicing, sdk
from supervisor.config import DirGrant
from supervisor.pytest_plugin import BuildGuest

# The subject is the C runtime's page protections, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

HERE = Path(__file__).resolve().parent
GUESTS = HERE.parent / "guests" / "c"
LIMIT = 120  # seconds: a bound for failing, never a wait for success
PAGE = 4096
PF_X, PF_W = 1, 2
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4


def _zig() -> sdk.Toolchain:
    try:
        return sdk.find_toolchain("zig")
    except sdk.ToolchainError as exc:
        pytest.skip(str(exc))


def _pages(start: int, size: int) -> set[int]:
    return set(range(start // PAGE, (start + size + PAGE - 1) // PAGE)) if size else set()


def _segment_pages(image: bytes) -> tuple[set[int], set[int]]:
    """The pages of the executable and of the writable PT_LOAD segments of an ELF32."""
    assert image[:4] == b"\x7fELF" and image[4] == 1
    (phoff,) = struct.unpack_from("<I", image, 28)
    phentsize, phnum = struct.unpack_from("<HH", image, 42)
    code: set[int] = set()
    data: set[int] = set()
    for i in range(phnum):
        kind, _off, vaddr, _pa, _filesz, memsz, flags, _align = struct.unpack_from(
            "<8I", image, phoff + i * phentsize
        )
        if kind == 1:  # PT_LOAD
            if flags & PF_X:
                code |= _pages(vaddr, memsz)
            if flags & PF_W:
                data |= _pages(vaddr, memsz)
    return code, data


def _section_pages(image: bytes) -> tuple[set[int], set[int]]:
    """The pages of the executable and of the writable allocated sections of an ELF32."""
    (shoff,) = struct.unpack_from("<I", image, 32)
    shentsize, shnum = struct.unpack_from("<HH", image, 46)
    code: set[int] = set()
    data: set[int] = set()
    for i in range(shnum):
        _name, _kind, flags, addr, _off, size = struct.unpack_from(
            "<6I", image, shoff + i * shentsize
        )
        if flags & SHF_ALLOC:
            if flags & SHF_EXECINSTR:
                code |= _pages(addr, size)
            if flags & SHF_WRITE:
                data |= _pages(addr, size)
    return code, data


SECTIONS = r"""
int counter = 7;                    /* .data */
static char scratch[100];           /* .bss */
_Thread_local int per_thread = 3;   /* .tdata */
__attribute__((constructor)) static void early(void) { counter++; }  /* .init_array */
int main(void) { scratch[0] = 1; return counter + scratch[0] + per_thread; }
"""


def test_writable_sections_never_share_a_page_with_code(build_guest: BuildGuest) -> None:
    """A built image (with .data, .bss, .tdata and .init_array) and every committed
    C guest: no page holds both code and anything writable, by segments and by
    sections."""
    _zig()
    images = [build_guest(SECTIONS, flags=["-O2"]), *sorted(GUESTS.glob("*.elf"))]
    assert len(images) > 5
    for path in images:
        image = path.read_bytes()
        for code, data in (_segment_pages(image), _section_pages(image)):
            assert code and data, path
            assert not code & data, (path, sorted(code & data))


PAGES = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static const unsigned char ret42[] = {0xb8, 42, 0, 0, 0, 0xc3};  /* mov $42, %eax; ret */
int data_word = 1;
static char bss_bytes[64];
static uint32_t user_bits(const void *p)  /* the entry's present, writable, user bits */
{
    uint32_t cr3, va = (uint32_t)p;
    __asm__ volatile("movl %%cr3, %0" : "=r"(cr3));
    uint32_t pde = ((volatile uint32_t *)cr3)[va >> 22];
    return ((volatile uint32_t *)(pde & ~0xfffu))[(va >> 12) & 1023] & 7;
}
int main(int argc, char **argv)
{
    uint32_t cr4;
    __asm__ volatile("movl %%cr4, %0" : "=r"(cr4));
    unsigned char *heap = malloc(3 * 4096), *spare = heap + 2 * 4096;
    unsigned char stack[16];
    spare[0] = 1;
    printf("smep %u text %u data %u bss %u heap %u stack %u\n", (cr4 >> 20) & 1,
           user_bits((void *)main), user_bits(&data_word), user_bits(bss_bytes),
           user_bits(heap), user_bits(stack));
    memcpy(heap, ret42, sizeof ret42);
    int first = ((int (*)(void))heap)();
    heap[1] = 43;  /* a store over code it ran: the next call runs the new bytes */
    int second = ((int (*)(void))heap)();
    memcpy(stack, ret42, sizeof ret42);
    stack[1] = 44;
    __asm__ volatile("" : : "r"(stack) : "memory");
    int third = ((int (*)(void))stack)();
    printf("ran %d %d %d heap %u stack %u spare %u\n", first, second, third, user_bits(heap),
           user_bits(stack), user_bits(spare));
    FILE *f = fopen(argv[1], "r");  /* the Host writes data pages: a read, its frames */
    char line[64];
    int lines = 0;
    while (f && fgets(line, sizeof line, f)) lines++;
    printf("lines %d\n", lines);
    fflush(stdout);
    return *(volatile int *)(uintptr_t)(argc * 8);  /* a read of page 0 */
}
"""


@pytest.mark.parametrize("way", ["native", "python"])
async def test_only_code_pages_run_code_and_faults_stay_exact(
    build_guest: BuildGuest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """SMEP is on; .text's entries are supervisor (5 -> 3: no user bit), data, .bss,
    heap and stack are user; code the program writes on the heap and the stack runs
    (each page made executable on its first fetch, the others untouched), a store
    over that code is seen; after file reads, system calls and those faults (the Host
    writing data pages and dropping translations) a NULL read is still reported as
    one, not as a double fault.  Both ways the Host drops translations: in C and in
    Python."""
    _zig()
    if way == "native" and not _slicing.NATIVE:
        pytest.skip("no native slicing here")
    if way == "python":
        monkeypatch.setattr(_slicing, "drop", lambda *_args: None)
    image = build_guest(PAGES, flags=["-O2"])
    (tmp_path / "text").write_bytes(b"line\n" * 3000)
    async with Supervisor() as sup, asyncio.timeout(LIMIT):
        guest = await sup.launch(
            GuestConfig(
                image=image,
                memory="16M",
                cmdline="/d/text",
                dirs=[DirGrant(host=tmp_path, guest="/d", read_only=True)],
            )
        )
        lines = [line async for line in guest.console]
        end: Exit = await guest.wait()
    assert lines == [
        "smep 1 text 3 data 7 bss 7 heap 7 stack 7",
        "ran 42 43 44 heap 3 stack 3 spare 7",
        "lines 3000",
    ]
    assert end.died
    assert end.reason is not None and end.reason.startswith(
        "CRASH: NULL pointer dereference: read at 0x00000010"
    ), end.reason


FGETS = r"""
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv)
{
    char small[7], big[4096];
    unsigned long long total = 0;
    unsigned sum = 0, lines = 0;
    for (int pass = 0; pass < 2; pass++) {
        FILE *f = fopen(argv[1], "r");
        if (!f) return 1;
        char *buf = pass ? big : small;
        int size = pass ? (int)sizeof big : (int)sizeof small;
        while (fgets(buf, size, f)) {
            size_t n = strlen(buf);
            total += n;
            lines += buf[n - 1] == '\n';
            for (size_t i = 0; i < n; i++) sum = sum * 31 + (unsigned char)buf[i];
            if (lines % 19 == 1) fputs(buf, stdout);
        }
        printf("pass %d bytes %llu lines %u sum %u eof %d\n", pass, total, lines, sum, feof(f));
        fclose(f);
    }
    return 0;
}
"""


def test_fgets_reads_what_a_native_build_reads(tmp_path: Path) -> None:
    """stdio fgets through --dir, with a buffer shorter than most lines and one of
    4 KiB, over lines of lengths up to 5000 bytes (every length at the buffers' and
    stdio's 1 KiB buffer's edges, and a spread between them) and a last line without
    a newline: the same output as the source built natively."""
    zig = _zig()
    source = tmp_path / "fgetsprobe.c"
    source.write_text(FGETS)
    data = tmp_path / "data"
    edges = [n + d for n in (0, 7, 1024, 4096) for d in (-2, -1, 0, 1, 2) if n + d >= 0]
    lengths = [*edges, *range(3, 5001, 11), 5000]
    random.Random(0).shuffle(lengths)
    with data.open("wb") as f:
        for i, n in enumerate(lengths):
            f.write(bytes(48 + (i * 7 + j) % 75 for j in range(n)) + b"\n")
        f.write(b"no newline at the end")
    native = tmp_path / "fgetsprobe"
    subprocess.run(
        [*zig.cc, "-target", "x86_64-linux-musl", "-static", "-O2", str(source), "-o",
         str(native)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    expected = subprocess.run(
        [native, str(data)], capture_output=True, timeout=60, check=True
    ).stdout
    image = sdk.build([source], tmp_path / "fgetsprobe.elf", sdk.BuildOptions(optimize="2"), zig)
    got = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", str(image), "--memory", "16M",
         "--ro-dir", f"{tmp_path}::/d", "--cmdline", "/d/data"],
        capture_output=True, timeout=600,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert expected.count(b"\n") > 40
    assert got.stdout == expected
