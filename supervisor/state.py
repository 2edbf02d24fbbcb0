"""A guest's whole state, except its memory, as one immutable value.

:class:`GuestState` is what :meth:`LguestFile.state` returns and what
:meth:`LguestDevice.open` revives a guest from: every CPU's registers (Unicorn's
saved context: general, segment with descriptor caches, control, debug,
descriptor tables, flags, FPU/SSE) and lguest state, the guest's lguest state,
limits, counters and death.  It compares with ``==``, pickles, and has a
versioned, checksummed encoding (:meth:`GuestState.to_bytes`,
:meth:`GuestState.from_bytes`) framed like a snapshot file (:mod:`supervisor.framing`).

Who fills it: the classes whose fields it holds.  Every field of ``LgCpu`` and
``Lguest`` is marked :func:`saved` (it is part of the value, under the same
name) or :func:`host_only` (it is not: an emulator handle, an event, a
scheduling hint); ``tests/test_state.py`` fails when a field is neither.  The
timer's part (``timer_ns``) comes from :mod:`supervisor.timers`.

Trust: an encoding is checked for shape, types and ranges when decoded, so a
damaged or crafted one raises :class:`StateError` and never crashes the host,
but its registers are whatever it says: reviving one runs that guest, inside
its own memory, like any other guest (see docs/security.md).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Final

import pydantic

from . import framing
from ._statefields import host_only, saved, saved_fields, unmarked_fields
from .abi import GDT_ENTRIES, IDT_ENTRIES, LHCALL_RING_SIZE, MAX_CPUS, PAGE_SIZE, TLS_ENTRIES
from .guest import Death
from .limits import Limits

MAGIC: Final = b"LGSTATE\n"
_U32: Final = 0xFFFFFFFF
VERSION: Final = 2  # 2: several CPUs, each with its own lguest_data

__all__ = [
    "CpuState",
    "GuestState",
    "StateError",
    "host_only",
    "saved",
    "saved_fields",
    "unmarked_fields",
]


_CONFIG = pydantic.ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")


class StateError(ValueError):
    """A state value that cannot be decoded or revived (the message says why)."""


@dataclass(frozen=True, slots=True)
class CpuState:
    """One CPU: its registers and the Host's state for it."""

    __pydantic_config__ = _CONFIG

    id: int
    start: int  # the entry point it was started at
    context: bytes  # registers, as this Unicorn build saves them
    irqs_pending: int
    halted: bool
    online: bool  # started (CPU 0 always is)
    lguest_data: int | None  # guest-physical, once its LGUEST_INIT ran
    hcall: tuple[int, int, int, int] | None  # a direct hypercall trapped but not done
    next_hcall: int  # next slot of the async hypercall ring
    pending_notify: int  # a notify not yet handed to the Launcher
    break_out: bool  # a Waker's break not yet released
    ts: int
    idt: tuple[tuple[int, int], ...]
    gdt: tuple[int, int]  # guest-physical table, entries
    tls: bytes
    stack: tuple[int, int, int]  # ss, esp, pages
    limits: Limits
    stats: tuple[tuple[str, int | float], ...]  # CpuStats' fields, in order
    timer_ns: int | None  # the clock event's remaining time, if armed

    def __post_init__(self) -> None:
        if len(self.idt) != IDT_ENTRIES:
            raise StateError(f"cpu {self.id}: IDT has {len(self.idt)} entries, not {IDT_ENTRIES}")
        # The IDT, stack and TS flag live in 32-bit fields shared with the native code
        # (supervisor.cpu): a value that does not fit would not come back as it was.
        if not all(0 <= lo <= _U32 and 0 <= hi <= _U32 for lo, hi in self.idt):
            raise StateError(f"cpu {self.id}: an IDT entry is not two 32-bit values")
        if not all(0 <= v <= _U32 for v in self.stack):
            raise StateError(f"cpu {self.id}: stack {self.stack} is not three 32-bit values")
        if self.ts not in (0, 1):
            raise StateError(f"cpu {self.id}: TS flag {self.ts}")
        if not 0 <= self.next_hcall < LHCALL_RING_SIZE:
            raise StateError(f"cpu {self.id}: hypercall ring position {self.next_hcall}")
        if self.tls and len(self.tls) != TLS_ENTRIES * 8:
            raise StateError(f"cpu {self.id}: TLS is {len(self.tls)} bytes")
        if not 0 <= self.gdt[1] <= GDT_ENTRIES:
            raise StateError(f"cpu {self.id}: {self.gdt[1]} GDT entries")
        if self.timer_ns is not None and self.timer_ns <= 0:
            raise StateError(f"cpu {self.id}: timer in {self.timer_ns} ns")


@dataclass(frozen=True, slots=True)
class GuestState:
    """A guest's whole state except its memory.  Immutable; ``==``; pickles.

    ``memory_size`` is the size of the Launcher memory the guest lived in and
    ``base`` where its window starts in it: a revived guest needs memory of the
    same size, holding the same bytes.
    """

    __pydantic_config__ = _CONFIG

    memory_size: int
    base: int
    pfn_limit: int
    pgdir: int
    noirq_start: int
    noirq_end: int
    kernel_address: int
    dead: Death | None
    cpus: tuple[CpuState, ...]
    unicorn: str  # the Unicorn version whose context layout ``CpuState.context`` uses

    def __post_init__(self) -> None:
        limit = self.pfn_limit * PAGE_SIZE
        if self.memory_size % PAGE_SIZE or self.base % PAGE_SIZE:
            raise StateError("memory size and base must be page multiples")
        if self.pfn_limit <= 0 or self.base + limit > self.memory_size:
            raise StateError(
                f"guest window {self.base:#x}+{limit:#x} outside memory of {self.memory_size:#x}"
            )
        if self.pgdir % PAGE_SIZE or self.pgdir + PAGE_SIZE > limit:
            raise StateError(f"page directory {self.pgdir:#x} outside guest memory")
        if not self.cpus:
            raise StateError("a guest has at least one CPU")
        if len(self.cpus) > MAX_CPUS:
            raise StateError(f"{len(self.cpus)} CPUs: at most {MAX_CPUS}")
        if [c.id for c in self.cpus] != list(range(len(self.cpus))):
            raise StateError("CPUs must be numbered 0, 1, ... in order")
        if not self.cpus[0].online:
            raise StateError("CPU 0 is always online")
        for c in self.cpus:
            if c.lguest_data is not None and c.lguest_data >= limit:
                raise StateError(f"cpu {c.id}: lguest_data {c.lguest_data:#x} outside guest memory")

    @property
    def limit(self) -> int:
        """Bytes of guest-physical memory."""
        return self.pfn_limit * PAGE_SIZE

    # -- the encoding ------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """A versioned, checksummed encoding (CPU contexts as binary sections)."""
        return framing.pack(MAGIC, VERSION, self.meta(), self.blobs())

    @classmethod
    def from_bytes(cls, raw: bytes, name: str = "guest state") -> GuestState:
        """Decode :meth:`to_bytes`' output; :class:`StateError` says what is wrong with it."""
        try:
            meta, blobs = framing.unpack(raw, MAGIC, VERSION, kind="guest state")
        except framing.FormatError as exc:
            raise StateError(f"{name}: {exc}") from None
        return cls.from_parts(meta, blobs, name)

    @classmethod
    def from_parts(cls, meta: Any, blobs: dict[str, bytes], name: str) -> GuestState:
        """Rebuild from the JSON part and the binary sections (also used by snapshots)."""
        try:
            for entry in meta["cpus"]:
                entry["context"] = base64.b64encode(blobs[f"cpu{entry['id']}"]).decode()
            state = _ADAPTER.validate_json(json.dumps(meta))
        except StateError as exc:
            raise StateError(f"{name}: {exc}") from None
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise StateError(f"{name}: bad field {where}: {first['msg']}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{name}: malformed guest state: {exc!r}") from None
        if state.unicorn != _unicorn_version():
            raise StateError(
                f"{name}: made with Unicorn {state.unicorn}, this is {_unicorn_version()}"
            )
        return state

    def meta(self) -> Any:
        """The JSON part of the encoding (for containers such as snapshot files)."""
        return _ADAPTER.dump_python(self, mode="json", exclude=_CONTEXT_PATHS)

    def blobs(self) -> dict[str, bytes]:
        """The binary sections of the encoding."""
        return {f"cpu{c.id}": c.context for c in self.cpus}

    def __repr__(self) -> str:
        dead = f" dead: {self.dead.reason!r}" if self.dead else ""
        return f"<GuestState {len(self.cpus)} cpu(s), {self.limit:#x} bytes{dead}>"


def _unicorn_version() -> str:
    from . import _unicorn

    return _unicorn.VERSION


# Decoding validates every field's type (tuples from lists, bytes from base64).
_ADAPTER: pydantic.TypeAdapter[GuestState] = pydantic.TypeAdapter(GuestState)
_CONTEXT_PATHS = {"cpus": {"__all__": {"context"}}}
