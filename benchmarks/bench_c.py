"""The compute guest written in C (guests/c/sieve.elf), supervised and raw.

Supervised: the whole guest through Supervisor (boot, musl, console); the time
is from its "sieve n=... rounds=..." line to its result line, so it holds the
compute and one console round trip.  Raw: the same image loaded by the same
Launcher code into a bare Unicorn (same mapping, page tables, translation
buffer, and .text's pages the only executable ones, as the runtime makes them
at boot), ``sieve_rounds`` called directly with the same arguments.
"""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

from unicorn import UC_ARCH_X86, UC_MODE_32, UC_PROT_ALL, Uc
from unicorn import x86_const as r

from supervisor import GuestConfig, Supervisor
from supervisor.cpu import CR0_PE, CR0_PG, CR4_PSE, DEFAULT_TCG_BUFFER
from supervisor.launcher.layout import build_pagetables, plan, write_boot_info
from supervisor.launcher.loader import load_image, read_image
from supervisor.memory import GuestMemory
from supervisor.pagetables import CR4_SMEP, PTE_USER
from supervisor.sdk.elfstrip import symbols as elf_symbols

from .harness import Profile, Result, now

SIEVE = Path(__file__).resolve().parent.parent / "guests" / "c" / "sieve.elf"
RAM = 8 << 20
N = 1_000_000


class RawSieve:
    """sieve.elf in a bare Unicorn: call ``sieve_rounds(buf, n, rounds, &sum)``."""

    def __init__(self) -> None:
        self.symbols = elf_symbols(SIEVE.read_bytes())
        layout = plan(RAM)
        self.memory = GuestMemory(layout.pfn_limit * 4096)
        load_image(read_image(SIEVE), self.memory.view, layout)
        build_pagetables(self.memory.view, layout)
        self._protect_code(layout.pgdir)
        write_boot_info(self.memory.view, layout, 0, b"")
        uc = Uc(UC_ARCH_X86, UC_MODE_32)
        uc.ctl_set_tcg_buffer_size(DEFAULT_TCG_BUFFER)
        uc.mem_map_ptr(0, layout.pfn_limit * 4096, UC_PROT_ALL, self.memory.address)
        uc.reg_write(r.UC_X86_REG_CR3, layout.pgdir)
        uc.reg_write(r.UC_X86_REG_CR4, uc.reg_read(r.UC_X86_REG_CR4) | CR4_PSE | CR4_SMEP)
        uc.reg_write(r.UC_X86_REG_CR0, uc.reg_read(r.UC_X86_REG_CR0) | CR0_PE | CR0_PG)
        uc.reg_write(r.UC_X86_REG_EFLAGS, 0x202)
        self.uc = uc
        self.stack_top = layout.pgdir  # the runtime's stack: the top of free memory
        self.buffer = (self.symbols["_end"] + 0x2000) & ~0xFFF
        self.result = self.buffer - 16

    def _protect_code(self, pgdir: int) -> None:
        """What the runtime does at boot (runtime.c's protect_code): .text's pages
        become supervisor pages, the only ones the CPU runs code from under SMEP."""
        view = self.memory.view
        start = self.symbols["__lguest_text_start"] & ~0xFFF
        for va in range(start, self.symbols["__lguest_text_end"], 4096):
            (pde,) = struct.unpack_from("<I", view, pgdir + 4 * (va >> 22))
            slot = (pde & ~0xFFF) + 4 * ((va >> 12) & 0x3FF)
            (pte,) = struct.unpack_from("<I", view, slot)
            struct.pack_into("<I", view, slot, pte & ~PTE_USER)

    def run(self, n: int, rounds: int) -> tuple[int, int]:
        """(count, checksum) of one call."""
        # The return address: emulation stops there.  Inside a page it may run code from
        # (a stop at a page's first byte makes Unicorn fetch from the page before).
        stop = self.symbols["_lguest_start"] + 1
        sp = self.stack_top - 32
        frame = struct.pack("<5I", stop, self.buffer, n, rounds, self.result)
        self.memory.write(sp, frame)
        self.uc.reg_write(r.UC_X86_REG_ESP, sp)
        self.uc.emu_start(self.symbols["sieve_rounds"], stop)
        count = self.uc.reg_read(r.UC_X86_REG_EAX)
        checksum = int.from_bytes(self.memory.read(self.result, 4), "little")
        return count, checksum

    def close(self) -> None:
        self.uc = None


async def _supervised(sup: Supervisor, n: int, rounds: int) -> tuple[float, str]:
    guest = await sup.launch(GuestConfig(image=SIEVE, memory=RAM, cmdline=f"n={n} rounds={rounds}"))
    lines = aiter(guest.console)
    first = await anext(lines)
    assert first.startswith("sieve "), first
    t0 = now()
    result = await anext(lines)
    t = now() - t0
    exit_ = await guest.wait()
    assert exit_.ok, exit_
    return t, result


async def c_compute(p: Profile) -> list[Result]:
    raw = RawSieve()
    raw.run(N, 1)  # translate once
    t0 = now()
    count, checksum = raw.run(N, 1)
    one = now() - t0
    rounds = max(1, round(p.loop_seconds * 4 / one))
    raw_times: list[float] = []
    sup_times: list[float] = []
    info: dict[str, Any] = {}
    async with Supervisor() as sup:
        await _supervised(sup, N, 1)  # warm the executor
        for _ in range(p.reps):  # interleaved, so that noise hits both alike
            t0 = now()
            got = raw.run(N, rounds)
            raw_times.append(now() - t0)
            t, line = await _supervised(sup, N, rounds)
            sup_times.append(t)
            assert got == (count, checksum)
            assert line == f"primes up to {N}: {count}, checksum {checksum}", line
            info = {"rounds": rounds, "count": count, "checksum": checksum}
            await asyncio.sleep(0)
    raw.close()
    raw_rate = rounds / min(raw_times)
    sup_rate = rounds / min(sup_times)
    return [
        Result(
            "c_compute",
            "C compute guest (guests/c/sieve.elf, n=1e6)",
            "sieves/s",
            sup_rate,
            raw_rate,
            sup_rate / raw_rate,
            0.95,
            "ratio",
            "higher",
            f"{rounds} rounds per run, best of {p.reps}; raw calls sieve_rounds in a bare Unicorn",
            {**info, "raw_times": raw_times, "sup_times": sup_times},
        )
    ]
