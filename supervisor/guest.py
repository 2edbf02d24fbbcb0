"""``struct lguest``: one guest, its memory window and how it ended.

Guest-physical addresses run from 0 to ``limit`` (``pfn_limit`` pages); every
address the Host dereferences for the guest is checked with :meth:`Lguest.address_ok`
first.  Whoever runs the guest (its CPU's slice, or the run loop between
slices) is the only one touching this state; nothing here is thread-safe on its
own.  Fields are marked like ``LgCpu``'s: :meth:`Lguest.saved_values` gives the
saved ones, under the names :class:`~supervisor.state.GuestState` uses.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._statefields import host_only, saved, saved_fields
from .abi import PAGE_SIZE
from .state import Exit

if TYPE_CHECKING:
    from .cpu import LgCpu
    from .memory import GuestMemory
    from .virtual import Simulation

_U32 = struct.Struct("<I")


@dataclass(eq=False, slots=True)
class Lguest:
    """Everything the Host knows about one guest.  Slots: no attribute dict, which
    switching an idle guest's class (:meth:`pack_memory`) would otherwise make."""

    ram: memoryview = host_only()  # the guest's window of the Launcher's memory
    pfn_limit: int = saved()
    cpus: list[LgCpu] = host_only(default_factory=list)  # each saves itself (CpuState)
    dead: Exit | None = saved(default=None)  # how it ended (first end wins)
    pgdir: int = saved(default=0)  # the page directory the Launcher gave at INITIALIZE
    # The guest-wide values of the first LGUEST_INIT (CPU 0's); each CPU has its own
    # lguest_data (LgCpu.lguest_data).
    noirq_start: int = saved(default=0)
    noirq_end: int = saved(default=0)
    kernel_address: int = saved(default=0)
    # A guest's CPUs take turns: at most one of them is inside a slice at any time, so
    # the guest's `lock`-prefixed instructions are atomic (docs/abi.md, "Several CPUs").
    # Created at the first slice of a guest with more than one CPU; event loop only.
    processor: asyncio.Lock | None = host_only(default=None)
    processor_owner: LgCpu | None = host_only(default=None)  # the CPU holding it
    waiting_turns: int = host_only(default=0)  # CPUs waiting to take the processor
    # Deterministic mode: the device's virtual clock and schedule (supervisor.virtual),
    # set at INITIALIZE (or revival) before the CPUs are made; None otherwise.
    virtual: Simulation | None = host_only(default=None)
    # The Launcher's memory that ``ram`` is a window of (None: never packed).
    memory: GuestMemory | None = host_only(default=None)

    # -- packed memory: an idle guest's pages as a few bytes --------------------------------
    def pack_memory(self) -> bool:
        """Pack the guest's memory (:meth:`GuestMemory.pack`) if every CPU keeps its
        registers packed (no emulator, no slice: nothing but the Host can touch it);
        True if it packed.  Until :meth:`unpack_memory`, the first read of :attr:`ram`
        unpacks it: every Host access goes through ``ram``, so none can see the
        released pages, and the guest costs nothing for that check while unpacked."""
        memory = self.memory
        if memory is None or not self.cpus or type(self) is not Lguest:
            return False
        if not all(cpu.engine.packed for cpu in self.cpus) or not memory.pack():
            return False
        self.__class__ = _PackedLguest
        return True

    @property
    def memory_packed(self) -> bool:
        return type(self) is _PackedLguest

    def unpack_memory(self) -> None:
        """Put the memory back (no effect unless packed); before anything reaches it by
        another way than ``ram`` (an emulator, which maps it by address)."""
        if self.memory_packed:
            self.__class__ = Lguest
            if self.memory is not None:
                self.memory.unpack()

    def release_ram(self) -> None:
        """Let go of ``ram`` (the guest is closing); a packed memory stays packed, so
        closing an idle guest costs no unpacking (its Launcher may still read it)."""
        if self.memory_packed:
            self.__class__ = Lguest
        self.ram.release()

    def saved_values(self) -> dict[str, Any]:
        """The saved fields by name (their part of a GuestState)."""
        return {name: getattr(self, name) for name in _SAVED}

    def restore(self, values: Any) -> None:
        """Take the saved fields from ``values`` (a GuestState, or anything with them)."""
        for name in _SAVED:
            setattr(self, name, getattr(values, name))

    @property
    def limit(self) -> int:
        """One past the highest guest-physical byte."""
        return self.pfn_limit * PAGE_SIZE

    def address_ok(self, addr: int, size: int) -> bool:
        """True if ``[addr, addr+size)`` lies wholly inside guest memory."""
        limit = self.pfn_limit * PAGE_SIZE  # (self.limit, without a second property call)
        return 0 <= addr < limit and size >= 0 and addr + size <= limit

    def kill(self, reason: str, *, err: int | None = None, exit_status: int | None = None) -> None:
        """End the guest (a death, a power-off, a reboot request).  Only the first end counts."""
        if self.dead is None:
            self.dead = Exit.of(reason, err, exit_status)
        for cpu in self.cpus:
            cpu.kick()  # any thread: a slice of another CPU ends at its next block

    # -- guest-physical memory, bounds-checked ----------------------------------
    def read(self, addr: int, size: int) -> bytes | None:
        """Bytes at a guest-physical range, or None if any of it is outside."""
        if not self.address_ok(addr, size):
            return None
        return bytes(self.ram[addr : addr + size])

    def write(self, addr: int, data: bytes) -> bool:
        """Store bytes at a guest-physical range; False if any of it is outside."""
        if not self.address_ok(addr, len(data)):
            return False
        self.ram[addr : addr + len(data)] = data
        self.host_wrote(addr, len(data))
        return True

    def read_u32(self, addr: int) -> int | None:
        if not self.address_ok(addr, 4):
            return None
        value: int = _U32.unpack_from(self.ram, addr)[0]
        return value

    def write_u32(self, addr: int, value: int) -> bool:
        if not self.address_ok(addr, 4):
            return False
        _U32.pack_into(self.ram, addr, value & 0xFFFFFFFF)
        self.host_wrote(addr, 4)
        return True

    def host_wrote(self, addr: int, size: int, dropped_by: LgCpu | None = None) -> None:
        """The Host wrote ``[addr, addr+size)`` behind the guest's back: no CPU may run a
        stale translation of it, so every CPU but ``dropped_by`` (which dropped its own
        already, natively) drops them before it runs again (supervisor.codecache)."""
        for cpu in self.cpus:
            if cpu is not dropped_by:
                cpu.stale_code.append((addr, addr + size))

    def read_string(self, addr: int, limit: int) -> str | None:
        """A NUL-terminated string of at most ``limit`` bytes, or None if it starts outside."""
        if not self.address_ok(addr, 1):
            return None
        end = min(addr + limit, self.limit)
        raw = bytes(self.ram[addr:end])
        return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class _PackedLguest(Lguest):
    """An :class:`Lguest` whose memory is packed: reading ``ram`` unpacks it and turns
    the guest back into a plain :class:`Lguest` (no check on the hot path)."""

    __slots__ = ()

    @property
    def ram(self) -> memoryview:
        self.unpack_memory()
        return self.ram

    @ram.setter
    def ram(self, value: memoryview) -> None:
        self.unpack_memory()
        self.ram = value


_SAVED = saved_fields(Lguest)
