"""Snapshots: a stopped guest's whole state, restorable (many times) into new guests.

Beyond the lguest ABI.  A :class:`Snapshot` is made of three parts and nothing else:

* the guest's memory: the non-zero pages of its whole :class:`~supervisor.GuestMemory`;
* the guest's state value, :class:`~supervisor.state.GuestState` (from
  :meth:`LguestFile.state`): registers, the Host's lguest state, pending
  interrupts, timers, limits, counters;
* optionally the Launcher's state (:mod:`supervisor.host` adds it, from
  :meth:`Launcher.state`): the guest's config and image, reboots so far, device
  state, irqs not yet sent.  A block device's file is not copied.

Take one while the guest is stopped (:func:`capture`), or let :func:`snapshot`
stop it for the moment.  :func:`restore` builds a new, independent guest from it
(:meth:`LguestDevice.open` with the state): fresh memory, a fresh CPU, nothing
shared, so any number may be forked from one.

``snap.save(path)`` / ``Snapshot.load(path)`` use a versioned file with a SHA-256
checksum (:mod:`supervisor.framing`); a damaged file raises
:class:`SnapshotError` saying what is wrong.  The checksum detects damage, not
tampering: everything a file says is checked when it is read, before anything is
mapped or run (the guest state by :class:`~supervisor.state.GuestState`, the
Launcher's part by :func:`check_launcher`, the memory runs here), and restoring
one never opens a file or a socket by itself (docs/security.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from . import framing
from .abi import LGUEST_IRQS, PAGE_SIZE
from .config import GuestConfig
from .debug import debugger
from .device import LguestDevice, LguestFile
from .launcher.layout import plan
from .memory import GuestMemory
from .state import GuestState, StateError, describe

MAGIC = b"LGSNAP\r\n"
VERSION = 3  # 3: guest state version 2 (several CPUs)
_ZERO_PAGE = bytes(PAGE_SIZE)


class SnapshotError(StateError):
    """A snapshot that cannot be taken, read or restored (the message says why)."""


# -- the Launcher's part, as a file may hold it -------------------------------------------------
_U32 = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
MAX_SEGMENTS = 1024
MAX_DEVICES = 256


class SavedConfig(GuestConfig):
    """A snapshot's copy of its guest's config: the image and block files need not exist
    any more (the snapshot carries the image; whoever restores names the block file)."""

    image: Path
    block: Path | None = None


class SavedImage(BaseModel):
    """The guest's image: its segments' bytes are the snapshot's ``segment{i}`` sections."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(max_length=4096)
    kind: Literal["flat", "elf"]
    entry: _U32
    segments: list[Annotated[list[_U32], Field(min_length=2, max_length=2)]] = Field(
        min_length=1, max_length=MAX_SEGMENTS
    )  # [guest-physical address, bytes in memory]


class SavedDevice(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Annotated[int, Field(ge=0, le=255)]  # lguest_device_desc.type is a byte
    state: Any  # JSON data the device's own restore() checks (ValueError: a death)


class LauncherPart(BaseModel):
    """What :func:`supervisor.guestctl.launcher_state` saves: config, image, Launcher.state()."""

    model_config = ConfigDict(extra="forbid", strict=True)

    config: dict[str, Any]  # checked as a SavedConfig
    image: SavedImage
    restarts: _U32
    irqs: list[Annotated[int, Field(ge=0, lt=LGUEST_IRQS)]] = Field(max_length=LGUEST_IRQS)
    devices: list[SavedDevice] = Field(max_length=MAX_DEVICES)


def check_launcher(
    launcher: Any, blobs: dict[str, bytes], memory_size: int, name: str = "snapshot"
) -> dict[str, Any]:
    """The Launcher's part of a snapshot, validated (its config normalized), or a
    one-line :class:`SnapshotError`.

    Checks its shape and every number, the config as a :class:`GuestConfig` would
    (``ConfigError`` rules, minus the files' existence), that each image segment's
    bytes are present and fit, and that the config's memory is the guest state's.
    """
    try:
        part = LauncherPart.model_validate(launcher)
    except pydantic.ValidationError as exc:
        raise SnapshotError(f"{name}: Launcher state: {describe(exc)}") from None
    try:
        config = SavedConfig.model_validate(part.config)
    except pydantic.ValidationError as exc:
        raise SnapshotError(f"{name}: Launcher state: config: {describe(exc)}") from None
    for i, (paddr, memsz) in enumerate(part.image.segments):
        data = blobs.get(f"segment{i}")
        if data is None:
            raise SnapshotError(f"{name}: Launcher state: image segment {i} has no bytes")
        if len(data) > memsz or paddr + memsz > 1 << 32:
            raise SnapshotError(
                f"{name}: Launcher state: image segment {i} ({len(data)} bytes in "
                f"{memsz} at {paddr:#x}) does not fit"
            )
    try:
        layout = plan(config.memory)
    except ValueError as exc:
        raise SnapshotError(f"{name}: Launcher state: config: memory: {exc}") from None
    if layout.memory_size != memory_size:
        raise SnapshotError(
            f"{name}: Launcher state: config: memory {config.memory} does not match "
            f"the guest's {memory_size} bytes"
        )
    return {**launcher, "config": config.model_dump(mode="json")}


@dataclass(eq=False)
class Snapshot:
    """One guest's memory, state value and (optionally) Launcher state.  Restoring never
    changes it."""

    memory_size: int  # bytes of the whole GuestMemory
    runs: list[tuple[int, int]]  # (first page, page count) of the non-zero memory
    data: bytes  # those pages, in order
    state: GuestState
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
            memory.clear()
        view = memory.view
        offset = 0
        for first, count in self.runs:
            n = count * PAGE_SIZE
            view[first * PAGE_SIZE : first * PAGE_SIZE + n] = self.data[offset : offset + n]
            offset += n

    # -- files ------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        meta = {
            "memory_size": self.memory_size,
            "runs": self.runs,
            "state": self.state.meta(),
            "launcher": self.launcher,
        }
        blobs = {"pages": self.data, **self.state.blobs(), **self.blobs}
        return framing.pack(MAGIC, VERSION, meta, blobs)

    @classmethod
    def from_bytes(cls, raw: bytes, name: str = "snapshot") -> Snapshot:
        try:
            meta, blobs = framing.unpack(raw, MAGIC, VERSION, kind="snapshot file")
        except framing.FormatError as exc:
            raise SnapshotError(f"{name}: {exc}") from None
        try:
            size = meta["memory_size"]
            runs = meta["runs"]
            launcher = meta["launcher"]
            state = GuestState.from_parts(meta["state"], blobs, name)
            data = blobs.pop("pages")
        except StateError as exc:
            raise SnapshotError(str(exc)) from None
        except (KeyError, ValueError, TypeError) as exc:
            raise SnapshotError(f"{name}: malformed snapshot contents: {exc!r}") from None
        for cpu in state.cpus:
            blobs.pop(f"cpu{cpu.id}", None)
        if isinstance(size, bool) or not isinstance(size, int) or size != state.memory_size:
            raise SnapshotError(f"{name}: memory size {size!r} does not match its guest state")
        runs = _check_runs(runs, size // PAGE_SIZE, name)
        if launcher is not None:
            launcher = check_launcher(launcher, blobs, size, name)
        snap = cls(size, runs, data, state, launcher, blobs)
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
    """The state of a guest that is not running right now (held, or not being read).

    Raises :class:`SnapshotError` for a guest not initialized, dead, closed or running.
    """
    if file.closed or file.cpu_count == 0:
        raise SnapshotError("the guest is not initialized or already closed")
    if file.death is not None:
        raise SnapshotError(f"the guest is dead: {file.death.reason}")
    try:
        state = file.state()
    except OSError as exc:
        raise SnapshotError("the guest is running: stop it first") from exc
    runs, data = _nonzero_pages(file.memory.view)
    return Snapshot(memory_size=file.memory.size, runs=runs, data=data, state=state)


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
        file = device.open(memory, state=snap.state)
    except BaseException:
        memory.close()
        raise
    if stopped:
        debugger(file).request_stop()
    return file


# -- the pieces -------------------------------------------------------------------------------
def _check_runs(runs: Any, pages: int, name: str) -> list[tuple[int, int]]:
    """The memory runs: ``[first page, page count]`` pairs, in order, inside ``pages``."""
    if not isinstance(runs, list):
        raise SnapshotError(f"{name}: malformed snapshot contents: memory runs {runs!r:.60}")
    checked: list[tuple[int, int]] = []
    end = 0
    for run in runs:
        if (
            not isinstance(run, list)
            or len(run) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in run)
        ):
            raise SnapshotError(f"{name}: malformed snapshot contents: memory run {run!r:.60}")
        first, count = run
        if first < end or count <= 0 or first + count > pages:
            raise SnapshotError(f"{name}: memory run {first}+{count} outside {pages} pages")
        end = first + count
        checked.append((first, count))
    return checked


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
