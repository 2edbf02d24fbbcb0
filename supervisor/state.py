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

Trust: a state is validated whole whenever one is made (decoded, built, or
``dataclasses.replace``-d), before anything is mapped, as lguest checks every value
a Launcher hands it: every integer within the C width it lives in, every
guest-physical address inside the guest's window with room for what is read
there, the window inside its memory, every counter finite and non-negative.  A
damaged or crafted one raises a one-line :class:`StateError` naming the field and
the bad value and never crashes the host; its registers are whatever it says:
reviving one runs that guest, inside its own memory, like any other guest
(see docs/security.md).
"""

from __future__ import annotations

import base64
import dataclasses
import errno as _errno
import functools
import itertools
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Final

import pydantic

from . import framing
from ._statefields import host_only, saved, saved_fields, unmarked_fields
from .abi import (
    GDT_ENTRIES,
    GUEST_PL,
    IDT_ENTRIES,
    LGUEST_DATA_SIZE,
    LGUEST_IRQS,
    LHCALL_RING_SIZE,
    MAX_CPUS,
    PAGE_SIZE,
    SWITCHER_ADDR,
    TLS_ENTRIES,
)
from .limits import Limits

MAGIC: Final = b"LGSTATE\n"
_U32: Final = 0xFFFFFFFF
_IDT_WORDS: Final = struct.Struct(f"<{2 * IDT_ENTRIES}I")
_I64: Final = (1 << 63) - 1  # counters live in 64-bit C fields (the CPU's Fuel)
# A Launcher's memory is one mapping in the host's user address space (47 bits on x86-64).
MAX_MEMORY_SIZE: Final = 1 << 47
# The clock event is set with a 32-bit delta in nanoseconds (LHCALL_SET_CLOCKEVENT); the
# time left that a capture measures on the loop's float clock may round up by a little.
MAX_TIMER_NS: Final = _U32 + 1_000_000
MAX_CLOCK_NS: Final = (1 << 63) - 1  # a virtual clock's time: what a signed 64-bit counter holds
MAX_ERRNO: Final = 4095  # Linux's MAX_ERRNO
MAX_TEXT: Final = 1 << 16  # a death's reason, a counter's name, a version: short text
MAX_STATS: Final = 64
VERSION: Final = 2  # 2: several CPUs, each with its own lguest_data

__all__ = [
    "CpuState",
    "Exit",
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
class Exit:
    """How a guest ended: the one result type, from the device up to the Supervisor.

    ``exit_status`` is set when the guest powered off; ``died`` is True when it
    was killed (bad hypercall, fault, crash, ``kill()``, too many restarts);
    ``reason`` is the guest's or the Host's words; ``restarts`` counts the
    Launcher's reboots; ``errno`` is set for an end that reads as an error code
    at the device instead of a reason (``ERESTART``: the guest asked for a reboot).
    """

    exit_status: int | None
    reason: str
    restarts: int = 0
    died: bool = False
    errno: int | None = None

    @classmethod
    def of(cls, reason: str, err: int | None = None, exit_status: int | None = None) -> Exit:
        """A guest's end at the device: a power-off with ``exit_status``, a reboot
        request with ``err`` (``ERESTART``), or else a death."""
        return cls(exit_status, reason, died=exit_status is None and err is None, errno=err)

    @property
    def ok(self) -> bool:
        """True for a clean power-off with status 0."""
        return not self.died and self.exit_status == 0

    @property
    def restart(self) -> bool:
        """True for a guest that asked to be rebooted."""
        return self.errno == _errno.ERESTART


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
        where = f"cpu {self.id}: " if _is_int(self.id) else ""
        try:
            _check_cpu(self)
        except StateError as exc:
            raise StateError(f"{where}{exc}") from None


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
    dead: Exit | None
    cpus: tuple[CpuState, ...]
    unicorn: str  # the Unicorn version whose context layout ``CpuState.context`` uses
    # Deterministic mode: the guest's virtual clock (ns) when captured, which its clocks
    # continue from once revived in a deterministic device; None outside the mode.
    clock_ns: int | None = None

    def __post_init__(self) -> None:
        _check_guest(self)

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
        made_with = meta.get("unicorn") if isinstance(meta, dict) else None
        if isinstance(made_with, str) and made_with != _unicorn_version():
            # Before the fields: another build's CPU context does not fit this one's.
            raise StateError(
                f"{name}: made with Unicorn {made_with:.40}, this is {_unicorn_version()}"
            )
        try:
            for entry in meta["cpus"]:
                entry["context"] = base64.b64encode(blobs[f"cpu{entry['id']}"]).decode()
            state = _ADAPTER.validate_json(json.dumps(meta))
        except StateError as exc:
            raise StateError(f"{name}: {exc}") from None
        except pydantic.ValidationError as exc:
            raise StateError(f"{name}: {describe(exc)}") from None
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise StateError(f"{name}: malformed guest state: {_short(exc)}") from None
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


def describe(exc: pydantic.ValidationError) -> str:
    """One line for a pydantic error in a state: the first bad field and why."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"bad field {where}: {message}" if where else message


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:200] + "..."


# -- validation ------------------------------------------------------------------------------
def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_u32(value: object) -> bool:
    return _is_int(value) and 0 <= value <= _U32  # type: ignore[operator]


def _show(value: object) -> str:
    """A bad value, short enough for one line."""
    if _is_int(value):
        assert isinstance(value, int)
        if value.bit_length() > 64:
            return f"{'-' if value < 0 else ''}a {value.bit_length()}-bit integer"
        return f"{value:#x}" if abs(value) > 0xFFFF else str(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _int(field: str, value: object, low: int, high: int, why: str = "") -> int:
    """``value`` if it is an integer in ``[low, high]``; else a StateError naming ``field``."""
    if not _is_int(value):
        raise StateError(f"{field} {_show(value)}: not an integer")
    assert isinstance(value, int)
    if not low <= value <= high:
        raise StateError(f"{field} {_show(value)}: {why or f'outside {low}..{_show(high)}'}")
    return value


def _u32(field: str, value: object) -> int:
    return _int(field, value, 0, _U32, "not a 32-bit value")


def _bool(field: str, value: object) -> None:
    if not isinstance(value, bool):
        raise StateError(f"{field} {_show(value)}: not a boolean")


def _pair(field: str, value: object, n: int) -> tuple[object, ...]:
    if not isinstance(value, tuple) or len(value) != n:
        raise StateError(f"{field} {_show(value)}: not {n} values")
    return value


def _check_cpu(c: CpuState) -> None:
    """Everything a CPU's state says that does not depend on its guest's memory."""
    _int("id", c.id, 0, MAX_CPUS - 1)
    _u32("start", c.start)
    if not isinstance(c.context, bytes):
        raise StateError(f"context {_show(c.context)}: not bytes")
    _int("irqs_pending", c.irqs_pending, 0, (1 << LGUEST_IRQS) - 1, "not a set of the 32 irqs")
    for name in ("halted", "online", "break_out"):
        _bool(name, getattr(c, name))
    if c.lguest_data is not None:
        _u32("lguest_data", c.lguest_data)
    if c.hcall is not None:
        for value in _pair("hcall", c.hcall, 4):
            _u32("hcall", value)
    _int("next_hcall", c.next_hcall, 0, LHCALL_RING_SIZE - 1, "not a hypercall ring position")
    _u32("pending_notify", c.pending_notify)
    _int("ts", c.ts, 0, 1, "not a TS flag")
    if not isinstance(c.idt, tuple) or len(c.idt) != IDT_ENTRIES:
        count = len(c.idt) if isinstance(c.idt, tuple) else _show(c.idt)
        raise StateError(f"IDT has {count} entries, not {IDT_ENTRIES}")
    # The IDT, stack and TS flag live in 32-bit fields shared with the native code
    # (supervisor.cpu): a value that does not fit would not come back as it was.
    gates = c.idt
    try:  # all of it at C speed (a capture checks it too); the gate at fault if not
        if set(map(type, gates)) != {tuple} or set(map(len, gates)) != {2}:
            raise TypeError
        _IDT_WORDS.pack(*itertools.chain.from_iterable(gates))
    except (TypeError, struct.error):
        for gate in gates:
            if not (isinstance(gate, tuple) and len(gate) == 2 and all(map(_is_u32, gate))):
                raise StateError(f"IDT entry {_show(gate)}: not two 32-bit values") from None
        raise StateError("IDT entries: not 32-bit values") from None
    table, entries = _pair("gdt", c.gdt, 2)
    _u32("gdt table", table)
    _int("gdt entries", entries, 0, GDT_ENTRIES)
    if not isinstance(c.tls, bytes) or len(c.tls) not in (0, TLS_ENTRIES * 8):
        raise StateError(f"TLS {_show(c.tls)}: not {TLS_ENTRIES * 8} bytes")
    ss, esp, pages = _pair("stack", c.stack, 3)
    _u32("stack segment", ss)
    _u32("stack pointer", esp)
    _int("stack pages", pages, 0, 2)
    assert isinstance(ss, int)
    if ss & 3 != GUEST_PL:
        raise StateError(f"stack segment {_show(ss)}: not ring {GUEST_PL}")
    _check_limits(c.limits)
    _check_stats(c.stats)
    if c.timer_ns is not None:
        _int("timer_ns", c.timer_ns, 1, MAX_TIMER_NS, "not a clock event's time left")
    from . import _unicorn

    try:
        _unicorn.check_context(c.context)
    except ValueError as exc:
        raise StateError(f"context: {exc}") from None


def _check_limits(limits: object) -> None:
    if not isinstance(limits, Limits):
        raise StateError(f"limits {_show(limits)}: not Limits")
    if limits.max_blocks is not None:
        _int("limits.max_blocks", limits.max_blocks, 1, _I64)
    run_time = limits.max_run_time
    if run_time is not None and (
        not isinstance(run_time, int | float) or isinstance(run_time, bool) or not run_time > 0
    ):
        raise StateError(f"limits.max_run_time {_show(run_time)}: not a positive time")


def _check_stats(stats: object) -> None:
    if not isinstance(stats, tuple) or len(stats) > MAX_STATS:
        raise StateError(f"stats {_show(stats)}: not at most {MAX_STATS} counters")
    kinds = _stat_kinds()
    for entry in stats:
        name, value = _pair("stats", entry, 2)
        if not isinstance(name, str) or len(name) > MAX_TEXT:
            raise StateError(f"stats: counter name {_show(name)}")
        field = f"stats.{name}"
        kind = kinds.get(name, "float")  # a counter this build does not keep is dropped
        if kind == "bool":
            _int(field, int(value) if isinstance(value, bool) else value, 0, 1, "not a flag")
        elif kind == "int":
            _int(field, value, 0, _I64)
        elif isinstance(value, int):  # (a bool too: True counts 1)
            _int(field, int(value), 0, _I64)
        elif not isinstance(value, float) or not (math.isfinite(value) and 0 <= value <= _I64):
            raise StateError(f"{field} {_show(value)}: not a finite count >= 0")


@functools.cache
def _stat_kinds() -> dict[str, str]:
    """Each counter of ``CpuStats`` and its type ("int", "float" or "bool")."""
    from .cpu import CpuStats

    return {f.name: str(f.type) for f in dataclasses.fields(CpuStats)}


def _check_guest(g: GuestState) -> None:
    """The guest's values, its window in its memory, and its CPUs' addresses in the window."""
    size = _int("memory_size", g.memory_size, PAGE_SIZE, MAX_MEMORY_SIZE)
    base = _int("base", g.base, 0, MAX_MEMORY_SIZE)
    if size % PAGE_SIZE or base % PAGE_SIZE:
        raise StateError("memory size and base must be page multiples")
    pfn_limit = _int("pfn_limit", g.pfn_limit, 1, SWITCHER_ADDR // PAGE_SIZE)
    limit = pfn_limit * PAGE_SIZE
    if base + limit > size:
        raise StateError(f"guest window {base:#x}+{limit:#x} outside memory of {size:#x}")
    pgdir = _int("pgdir", g.pgdir, 0, _U32)
    if pgdir % PAGE_SIZE or pgdir + PAGE_SIZE > limit:
        raise StateError(f"pgdir {_show(pgdir)}: page directory outside guest memory")
    for name in ("noirq_start", "noirq_end", "kernel_address"):
        _u32(name, getattr(g, name))
    if g.dead is not None:
        _check_death(g.dead)
    if not isinstance(g.unicorn, str) or len(g.unicorn) > MAX_TEXT:
        raise StateError(f"unicorn {_show(g.unicorn)}: not a version")
    if g.clock_ns is not None:
        _int("clock_ns", g.clock_ns, 0, MAX_CLOCK_NS, "not a virtual clock's time")
    cpus = g.cpus
    if not isinstance(cpus, tuple) or not all(isinstance(c, CpuState) for c in cpus):
        raise StateError(f"cpus {_show(cpus)}: not CPU states")
    if not cpus:
        raise StateError("a guest has at least one CPU")
    if len(cpus) > MAX_CPUS:
        raise StateError(f"{len(cpus)} CPUs: at most {MAX_CPUS}")
    if [c.id for c in cpus] != list(range(len(cpus))):
        raise StateError("CPUs must be numbered 0, 1, ... in order")
    if not cpus[0].online:
        raise StateError("CPU 0 is always online")
    for c in cpus:
        data = c.lguest_data
        if data is not None and data + LGUEST_DATA_SIZE > limit:
            raise StateError(
                f"cpu {c.id}: lguest_data {_show(data)}: its {LGUEST_DATA_SIZE} bytes are "
                "outside guest memory"
            )
        table, entries = c.gdt
        if entries and table + entries * 8 > limit:
            raise StateError(f"cpu {c.id}: gdt table {_show(table)}: outside guest memory")


def _check_death(dead: object) -> None:
    reason = getattr(dead, "reason", None)
    if not isinstance(reason, str) or len(reason) > MAX_TEXT:
        raise StateError(f"dead.reason {_show(reason)}: not a short text")
    err, status = getattr(dead, "errno", None), getattr(dead, "exit_status", None)
    if err is not None:
        _int("dead.errno", err, 1, MAX_ERRNO)
    if status is not None:
        _u32("dead.exit_status", status)
    _u32("dead.restarts", getattr(dead, "restarts", None))
    _bool("dead.died", getattr(dead, "died", None))


def _unicorn_version() -> str:
    from . import _unicorn

    return _unicorn.VERSION


# Decoding validates every field's type (tuples from lists, bytes from base64).
_ADAPTER: pydantic.TypeAdapter[GuestState] = pydantic.TypeAdapter(GuestState)
_CONTEXT_PATHS = {"cpus": {"__all__": {"context"}}}
