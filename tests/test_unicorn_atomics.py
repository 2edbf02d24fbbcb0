"""Why a guest's CPUs take turns: Unicorn's ``lock``-prefixed instructions are not atomic.

Two Unicorn instances mapping the same host memory are two CPUs sharing RAM.  In
Unicorn 2.1 every translation block is generated without QEMU's ``CF_PARALLEL``
(``curr_cflags()`` is the constant 0), so TCG turns a ``lock``-prefixed
read-modify-write into a load, the operation and a store (``do_nonatomic_op_i32``,
the serial branch of ``tcg_gen_atomic_cmpxchg_i32``).  A store another CPU makes
between that load and that store is overwritten: lost.  docs/abi.md, "Several CPUs",
has the source lines and the two-thread reproducer (``python -m benchmarks
--only atomics``).

These tests open that window deterministically, on one thread: the instruction's
own write hook runs after its load and before its store, and plays the other CPU
by storing into the shared host buffer there.  An atomic instruction would leave
either the other CPU's value or its own result computed from it; these tests
check that Unicorn leaves a result computed from the stale value, the other
CPU's store gone.  If a Unicorn release ever makes these instructions atomic,
they fail, and the turns of ``Lguest.processor`` can be revisited.
"""

from __future__ import annotations

import ctypes
from typing import Any

import pytest
from unicorn import UC_ARCH_X86, UC_HOOK_MEM_WRITE, UC_MODE_32, UC_PROT_ALL, Uc
from unicorn import x86_const as r

CODE_AT = 0x1000
DATA_AT = 0x2000
RAM = 0x10000

# Each instruction operates on the dword at DATA_AT (absolute addressing).
LOCK_XADD = bytes.fromhex("f00fc10500200000")  # lock xadd [0x2000], eax
LOCK_CMPXCHG = bytes.fromhex("f00fb11500200000")  # lock cmpxchg [0x2000], edx
XCHG = bytes.fromhex("870500200000")  # xchg [0x2000], eax (locked implicitly)
LOCK_INC = bytes.fromhex("f0ff0500200000")  # lock inc dword [0x2000]


class SharedCpu:
    """A bare 32-bit CPU over a host buffer that "another CPU" may store into."""

    def __init__(self) -> None:
        self.ram = bytearray(RAM)
        self._view = (ctypes.c_char * RAM).from_buffer(self.ram)
        self.uc = Uc(UC_ARCH_X86, UC_MODE_32)
        self.uc.ctl_set_tcg_buffer_size(1 << 20)
        self.uc.mem_map_ptr(0, RAM, UC_PROT_ALL, ctypes.addressof(self._view))
        self.stores: list[int] = []
        self._hook: Any = None

    def word(self) -> int:
        return int.from_bytes(self.ram[DATA_AT : DATA_AT + 4], "little")

    def set_word(self, value: int) -> None:
        self.ram[DATA_AT : DATA_AT + 4] = value.to_bytes(4, "little")

    def other_cpu_stores_in_the_window(self, value: int) -> None:
        """On the instruction's store to DATA_AT, before it lands, store ``value`` there."""

        def hook(_uc: Any, _access: int, address: int, _size: int, _v: int, _d: object) -> None:
            if address == DATA_AT:
                self.stores.append(self.word())
                self.set_word(value)

        self._hook = self.uc.hook_add(UC_HOOK_MEM_WRITE, hook)

    def run(self, code: bytes, **regs: int) -> None:
        self.ram[CODE_AT : CODE_AT + len(code)] = code
        for name, value in regs.items():
            self.uc.reg_write(getattr(r, f"UC_X86_REG_{name.upper()}"), value)
        self.uc.emu_start(CODE_AT, CODE_AT + len(code))

    def reg(self, name: str) -> int:
        value: int = self.uc.reg_read(getattr(r, f"UC_X86_REG_{name.upper()}"))
        return value


@pytest.fixture
def cpu() -> SharedCpu:
    return SharedCpu()


def test_the_window_is_not_there_without_another_cpu(cpu: SharedCpu) -> None:
    """The harness itself: with nobody storing in between, each instruction is exact."""
    cpu.set_word(10)
    cpu.run(LOCK_XADD, eax=1)
    assert (cpu.word(), cpu.reg("eax")) == (11, 10)
    cpu.run(LOCK_CMPXCHG, eax=11, edx=20)
    assert (cpu.word(), cpu.reg("eax")) == (20, 11)
    cpu.run(XCHG, eax=7)
    assert (cpu.word(), cpu.reg("eax")) == (7, 20)


def test_lock_xadd_loses_a_store_made_between_its_load_and_its_store(cpu: SharedCpu) -> None:
    cpu.set_word(10)
    cpu.other_cpu_stores_in_the_window(110)  # the other CPU's lock add of 100
    cpu.run(LOCK_XADD, eax=1)
    assert cpu.stores == [110 - 100]  # the load came before the other CPU's store
    # Atomic: 111 (after the other CPU's add) or 110 (before it, then its add).
    assert (cpu.word(), cpu.reg("eax")) == (11, 10)


def test_lock_inc_loses_a_store_made_between_its_load_and_its_store(cpu: SharedCpu) -> None:
    cpu.set_word(10)
    cpu.other_cpu_stores_in_the_window(110)
    cpu.run(LOCK_INC)
    assert cpu.stores == [10]
    assert cpu.word() == 11  # atomic: 111 or 110


def test_lock_cmpxchg_succeeds_on_a_value_that_is_gone(cpu: SharedCpu) -> None:
    cpu.set_word(0)  # a free spinlock
    cpu.other_cpu_stores_in_the_window(2)  # the other CPU takes it first
    cpu.run(LOCK_CMPXCHG, eax=0, edx=1)
    assert cpu.stores == [0]
    # Atomic: the compare fails (word 2, eax 2, ZF clear).  Here both CPUs hold the lock.
    assert cpu.word() == 1
    assert cpu.reg("eflags") & 0x40  # ZF: "acquired"


def test_xchg_loses_the_value_another_cpu_stored(cpu: SharedCpu) -> None:
    cpu.set_word(10)
    cpu.other_cpu_stores_in_the_window(77)
    cpu.run(XCHG, eax=1)
    assert cpu.stores == [10]
    # Atomic: eax 77 (swapped after the store) or memory 77 (before it).  Here 77 is
    # nowhere: a spinlock released in the window stays taken by nobody.
    assert (cpu.word(), cpu.reg("eax")) == (1, 10)
