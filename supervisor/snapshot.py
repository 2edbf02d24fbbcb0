"""Snapshots: a stopped guest's whole state, restorable (many times) into new guests.

Beyond the lguest ABI.  A :class:`Snapshot` holds:

* the CPU: Unicorn's saved context (general, segment with their descriptor
  caches, control, debug and descriptor-table registers, flags, FPU/SSE), bytes
  as Unicorn stores them, so a snapshot only restores on the same Unicorn build;
* the guest's memory: the non-zero pages of its whole :class:`~supervisor.GuestMemory`;
* the Host's state: ``lguest_data`` and the no-irq range, the IDT, GDT, TLS and
  kernel stack the guest registered, TS, pending interrupts, the halted state,
  a hypercall or notify not yet done, the async ring position, the Waker's
  break, and the clock event's remaining time;
* optionally the Launcher's state (:mod:`supervisor.host` adds it): the guest's
  config and image, reboots so far, device state (console input not yet
  delivered), irqs not yet sent.  A block device's file is not copied.

Take one while the guest is stopped (:func:`capture`), or let :func:`snapshot`
stop it for the moment.  :func:`restore` builds a new, independent guest from it:
fresh memory, a fresh CPU, nothing shared, so any number may be forked from one.

``snap.save(path)`` / ``Snapshot.load(path)`` use a versioned file with a SHA-256
checksum; a damaged file raises :class:`SnapshotError` saying what is wrong.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import unicorn

from . import timers
from .abi import LHREQ_INITIALIZE, PAGE_SIZE, pack_words
from .cpu import LgCpu
from .debug import DebugError, debugger, file_cpu
from .device import LguestDevice, LguestFile
from .memory import GuestMemory

MAGIC = b"LGSNAP\r\n"
VERSION = 1
_HEADER = struct.Struct("<8sHHQ32s")  # magic, version, flags, payload length, sha256(payload)
_ZERO_PAGE = bytes(PAGE_SIZE)
_SIZE_T = struct.Struct("N")


class SnapshotError(ValueError):
    """A snapshot that cannot be taken, read or restored (the message says why)."""


@dataclass(eq=False)
class Snapshot:
    """One guest's state.  Immutable in practice: restoring never changes it."""

    memory_size: int  # bytes of the whole GuestMemory
    base: int  # offset of the guest's window in that memory (INITIALIZE's base)
    pfn_limit: int
    pgdir: int
    start: int
    context: bytes  # Unicorn's CPU context (the data part)
    runs: list[tuple[int, int]]  # (first page, page count) of the non-zero memory
    data: bytes  # those pages, in order
    host: dict[str, Any]
    launcher: dict[str, Any] | None = None
    blobs: dict[str, bytes] = field(default_factory=dict)  # extra sections (the image)

    # -- memory ---------------------------------------------------------------
    def page_count(self) -> int:
        return sum(n for _, n in self.runs)

    def write_memory(self, memory: GuestMemory, *, clear: bool = False) -> None:
        """Copy the snapshot's memory into ``memory`` (zero-filled, or ``clear=True``)."""
        if memory.size != self.memory_size:
            raise SnapshotError(f"memory is {memory.size} bytes, the snapshot {self.memory_size}")
        if clear:
            _zero(memory)
        view = memory.view
        offset = 0
        for first, count in self.runs:
            n = count * PAGE_SIZE
            view[first * PAGE_SIZE : first * PAGE_SIZE + n] = self.data[offset : offset + n]
            offset += n

    # -- files ------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        blobs = {"context": self.context, "pages": self.data, **self.blobs}
        meta = {
            "memory_size": self.memory_size,
            "base": self.base,
            "pfn_limit": self.pfn_limit,
            "pgdir": self.pgdir,
            "start": self.start,
            "runs": self.runs,
            "host": self.host,
            "launcher": self.launcher,
            "unicorn": unicorn.__version__,
            "sections": [[name, len(blob)] for name, blob in blobs.items()],
        }
        encoded = json.dumps(meta, separators=(",", ":")).encode()
        payload = b"".join([struct.pack("<I", len(encoded)), encoded, *blobs.values()])
        digest = hashlib.sha256(payload).digest()
        return _HEADER.pack(MAGIC, VERSION, 0, len(payload), digest) + payload

    @classmethod
    def from_bytes(cls, raw: bytes, name: str = "snapshot") -> Snapshot:
        if not raw:
            raise SnapshotError(f"{name}: not a snapshot file (it is empty)")
        if len(raw) < _HEADER.size:
            if not MAGIC.startswith(raw[: len(MAGIC)]):
                raise SnapshotError(f"{name}: not a snapshot file")
            raise SnapshotError(f"{name}: truncated: {len(raw)} bytes, not even a header")
        magic, version, _flags, length, digest = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise SnapshotError(f"{name}: not a snapshot file")
        if version != VERSION:
            raise SnapshotError(f"{name}: snapshot format version {version}, expected {VERSION}")
        payload = memoryview(raw)[_HEADER.size :]
        if len(payload) < length:
            raise SnapshotError(
                f"{name}: truncated: {len(payload)} of {length} payload bytes present"
            )
        if len(payload) > length:
            raise SnapshotError(f"{name}: {len(payload) - length} stray bytes after the snapshot")
        if hashlib.sha256(payload).digest() != digest:
            raise SnapshotError(f"{name}: corrupt: checksum mismatch")
        try:
            (size,) = struct.unpack_from("<I", payload)
            meta = json.loads(bytes(payload[4 : 4 + size]))
            offset = 4 + size
            blobs: dict[str, bytes] = {}
            for section, n in meta["sections"]:
                blobs[section] = bytes(payload[offset : offset + n])
                offset += n
            snap = cls(
                memory_size=meta["memory_size"],
                base=meta["base"],
                pfn_limit=meta["pfn_limit"],
                pgdir=meta["pgdir"],
                start=meta["start"],
                context=blobs.pop("context"),
                runs=[(a, b) for a, b in meta["runs"]],
                data=blobs.pop("pages"),
                host=meta["host"],
                launcher=meta["launcher"],
                blobs=blobs,
            )
        except (KeyError, ValueError, TypeError, struct.error) as exc:
            raise SnapshotError(f"{name}: malformed snapshot contents: {exc}") from None
        if meta.get("unicorn") != unicorn.__version__:
            raise SnapshotError(
                f"{name}: made with Unicorn {meta.get('unicorn')}, this is {unicorn.__version__}"
            )
        if len(snap.data) != snap.page_count() * PAGE_SIZE:
            raise SnapshotError(f"{name}: malformed snapshot contents: page data size")
        return snap

    def save(self, path: str | Path) -> None:
        """Write the snapshot to ``path`` (atomically: a temporary file, then rename)."""
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(self.to_bytes())
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | Path) -> Snapshot:
        """Read a snapshot file; :class:`SnapshotError` if it is not one, truncated or corrupt."""
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise SnapshotError(f"{path}: cannot read: {exc.strerror or exc}") from None
        return cls.from_bytes(raw, str(path))


# -- taking -------------------------------------------------------------------------------
def capture(file: LguestFile) -> Snapshot:
    """The state of a guest that is not running right now (stopped, or not being read).

    Raises :class:`SnapshotError` for a guest not initialized, dead, closed or running.
    """
    try:
        cpu = file_cpu(file)
    except DebugError as exc:
        raise SnapshotError(str(exc)) from None
    lg = cpu.lg
    if lg.dead is not None:
        raise SnapshotError(f"the guest is dead: {lg.dead.reason}")
    if cpu.reading and not debugger(file).stopped:
        raise SnapshotError("the guest is running: stop it first")
    memory = file.memory
    base = _window_offset(file)
    runs, data = _nonzero_pages(memory.view)
    return Snapshot(
        memory_size=memory.size,
        base=base,
        pfn_limit=lg.pfn_limit,
        pgdir=lg.pgdir,
        start=cpu.start,
        context=_context_data(cpu.uc),
        runs=runs,
        data=data,
        host=_host_state(cpu),
    )


async def snapshot(file: LguestFile) -> Snapshot:
    """Stop the guest if it runs, capture it, and let it run on as it was."""
    dbg = debugger(file)
    was_stopped = dbg.stop_reason is not None
    stop = await dbg.stop()
    if stop.death is not None:
        raise SnapshotError(f"the guest is dead: {stop.death.reason}")
    try:
        return capture(file)
    finally:
        if not was_stopped and dbg.stopped:
            dbg.resume()


# -- restoring --------------------------------------------------------------------------------
async def restore(snap: Snapshot, device: LguestDevice, *, stopped: bool = False) -> LguestFile:
    """A new guest on ``device`` in the snapshot's state; read it to run it.

    The file owns fresh memory (``file.memory``; close it after the file).
    ``stopped=True`` holds the guest for a debugger before its next instruction.
    """
    memory = GuestMemory(snap.memory_size)
    try:
        snap.write_memory(memory)
        file = device.open(memory)
        words = (memory.address + snap.base, snap.pfn_limit, snap.pgdir, snap.start)
        await file.write(pack_words(LHREQ_INITIALIZE, *words))
        apply(snap, file, memory_written=True)
    except BaseException:
        if "file" in locals():
            await file.close()
        memory.close()
        raise
    if stopped:
        debugger(file).request_stop()
    return file


def apply(snap: Snapshot, file: LguestFile, *, memory_written: bool = False) -> None:
    """Put a just-initialized file (that has not run yet) into the snapshot's state.

    Its memory is overwritten with the snapshot's unless ``memory_written``.
    """
    cpu = file_cpu(file)
    lg = cpu.lg
    if file.memory.size != snap.memory_size or lg.pfn_limit != snap.pfn_limit:
        raise SnapshotError("the guest's memory does not match the snapshot's")
    if not memory_written:
        snap.write_memory(file.memory, clear=True)
    _restore_context(cpu.uc, snap.context)
    cpu.flush_tlb()
    cpu.uc.ctl_flush_tb()
    _apply_host_state(cpu, snap.host)


# -- the pieces -------------------------------------------------------------------------------
def _window_offset(file: LguestFile) -> int:
    lg = file_cpu(file).lg
    inner = ctypes.addressof(ctypes.c_char.from_buffer(lg.ram)) if not lg.ram.readonly else None
    if inner is None:  # pragma: no cover - guest RAM is always writable
        raise SnapshotError("guest memory is read-only")
    return inner - file.memory.address


def _nonzero_pages(view: memoryview) -> tuple[list[tuple[int, int]], bytes]:
    raw = view.tobytes()
    runs: list[tuple[int, int]] = []
    chunks: list[bytes] = []
    pages = len(raw) // PAGE_SIZE
    run_start = -1
    for page in range(pages + 1):
        nonzero = page < pages and raw[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] != _ZERO_PAGE
        if nonzero and run_start < 0:
            run_start = page
        elif not nonzero and run_start >= 0:
            runs.append((run_start, page - run_start))
            chunks.append(raw[run_start * PAGE_SIZE : page * PAGE_SIZE])
            run_start = -1
    return runs, b"".join(chunks)


def _zero(memory: GuestMemory) -> None:
    """Zero all of ``memory``, giving its pages back to the host kernel where possible."""
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = getattr(libc, "madvise", None)
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if madvise is not None and advice is not None:
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if madvise(memory.address, memory.size, advice) == 0:
            return
    ctypes.memset(memory.address, 0, memory.size)


def _context_data(uc: Any) -> bytes:
    raw = bytes(uc.context_save())
    (size,) = _SIZE_T.unpack_from(raw)  # struct uc_context starts with the data's size
    return raw[len(raw) - size :]


def _restore_context(uc: Any, data: bytes) -> None:
    context = uc.context_save()
    raw = bytes(context)
    (size,) = _SIZE_T.unpack_from(raw)
    if size != len(data):
        raise SnapshotError(f"CPU context is {len(data)} bytes, this Unicorn's is {size}")
    address = ctypes.cast(context.context, ctypes.c_void_p).value
    assert address is not None
    ctypes.memmove(address + len(raw) - size, data, size)
    uc.context_restore(context)


def _host_state(cpu: LgCpu) -> dict[str, Any]:
    lg = cpu.lg
    clock_ns = None
    if cpu.clock is not None:
        remaining = cpu.clock.when() - asyncio.get_running_loop().time()
        clock_ns = max(1, int(remaining * 1e9))
    return {
        "lguest_data": lg.lguest_data,
        "noirq": [lg.noirq_start, lg.noirq_end],
        "kernel_address": lg.kernel_address,
        "irqs_pending": cpu.irqs_pending,
        "halted": cpu.halted,
        "hcall": list(cpu.hcall) if cpu.hcall is not None else None,
        "next_hcall": cpu.next_hcall,
        "pending_notify": cpu.pending_notify,
        "break_out": cpu.break_out,
        "ts": cpu.ts,
        "idt": {str(i): list(gate) for i, gate in enumerate(cpu.idt) if gate != (0, 0)},
        "gdt": list(cpu.gdt),
        "tls": cpu.tls.hex(),
        "stack": list(cpu.stack),
        "clock_ns": clock_ns,
        "budget": cpu.budget,
    }


def _apply_host_state(cpu: LgCpu, state: dict[str, Any]) -> None:
    lg = cpu.lg
    lg.lguest_data = state["lguest_data"]
    lg.noirq_start, lg.noirq_end = state["noirq"]
    lg.kernel_address = state["kernel_address"]
    cpu.irqs_pending = state["irqs_pending"]
    cpu.halted = state["halted"]
    hcall = state["hcall"]
    cpu.hcall = (hcall[0], hcall[1], hcall[2], hcall[3]) if hcall is not None else None
    cpu.next_hcall = state["next_hcall"]
    cpu.pending_notify = state["pending_notify"]
    cpu.break_out = state["break_out"]
    if cpu.break_out:
        cpu.break_released.clear()
    else:
        cpu.break_released.set()
    cpu.ts = state["ts"]
    idt = [(0, 0)] * len(cpu.idt)
    for vector, (lo, hi) in state["idt"].items():
        idt[int(vector)] = (lo, hi)
    cpu.idt = idt
    cpu.gdt = (state["gdt"][0], state["gdt"][1])
    cpu.tls = bytes.fromhex(state["tls"])
    ss, esp, pages = state["stack"]
    cpu.stack = (ss, esp, pages)
    cpu.budget = state["budget"]
    timers.cancel(cpu)
    if state["clock_ns"] is not None:
        timers.set_clockevent(cpu, state["clock_ns"])
