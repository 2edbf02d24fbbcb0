"""Debugging, pausing and snapshots for Launcher-run guests (what :mod:`supervisor.host` uses).

A :class:`GuestControl` rides on a Launcher's ``on_boot`` hook: every boot's
file gets a :class:`~supervisor.debug.Debugger`; a gdb server follows the
guest across reboots; a pause asked for between boots holds the next boot.
(A restored guest's first boot continues the snapshot: the Launcher does that,
from a :class:`~supervisor.launcher.launcher.Resume`.)

The Launcher-level part of a snapshot (``Snapshot.launcher``) is the guest's
config and image plus :meth:`Launcher.state`: the reboots so far, the irqs the
devices raised but the Launcher has not sent, and each device's
:meth:`~supervisor.launcher.devices.Device.state` (a console's input not yet
delivered and whether it has told the guest about EOF).  A block device's
backing file is not part of the snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from .config import GuestConfig
from .debug import PAUSE, DebugError, Debugger, debugger
from .device import LguestFile
from .gdbstub import GdbServer
from .launcher.launcher import Launcher, Resume
from .launcher.loader import Image, Segment
from .snapshot import Snapshot, SnapshotError, capture, check_launcher
from .state import Exit


class GuestControl:
    """Per-guest plumbing over a Launcher: debugger per boot, pause, snapshot, restore, gdb."""

    def __init__(
        self,
        launcher: Launcher,
        config: GuestConfig,
        *,
        gdb: GdbServer | None = None,
    ) -> None:
        self.launcher = launcher
        self.config = config
        self.gdb = gdb
        self._boots = 0
        self._hold = False
        self._debugger: Debugger | None = None
        self._changed = asyncio.Event()
        self.task: asyncio.Task[Exit] | None = None
        self._closing: asyncio.Task[None] | None = None  # the gdb server's close, once it ended
        launcher.on_boot.append(self._on_boot)

    def watch(self, task: asyncio.Task[Exit]) -> None:
        """The task running the Launcher: its end ends the gdb server and pending waits."""
        self.task = task
        task.add_done_callback(self._ended)

    # -- the hook ------------------------------------------------------------------------
    def _on_boot(self, file: LguestFile) -> None:
        self._boots += 1
        d = self._debugger = debugger(file)
        if self._hold:
            d.request_stop(PAUSE)
        if self.gdb is not None:
            self.gdb.attach(d, stopped=self._boots == 1)
        self._changed.set()

    def _ended(self, task: asyncio.Task[Exit]) -> None:
        self._changed.set()
        if self.gdb is None:
            return
        failed = task.cancelled() or task.exception() is not None
        self.gdb.ended(Exit(None, "the supervisor failed", died=True) if failed else task.result())
        self._closing = asyncio.get_running_loop().create_task(self.gdb.aclose())

    # -- pause, resume, snapshot ---------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    async def pause(self) -> Debugger:
        """Stop the guest inside its Launcher's read (a clean point); return its debugger.

        Raises :class:`SnapshotError` if the guest ends first.
        """
        self._hold = True
        while True:
            if self.done:
                raise SnapshotError("the guest has ended")
            d = self._debugger
            if d is not None and not d.file.closed:
                stop = await self._race(d.stop(PAUSE, parked=True))
                if stop is not None and stop.death is None:
                    return d
                if stop is not None:
                    await self._race(self._next_boot(d))  # it died: a reboot may follow
                continue
            self._changed.clear()
            await self._race(self._changed.wait())

    async def _next_boot(self, old: Debugger) -> None:
        while self._debugger is old and not self.done:
            self._changed.clear()
            await self._changed.wait()

    async def _race(self, coro: Any) -> Any:
        """Await ``coro`` unless the guest ends first (then None); a closed file is None too."""
        waiter = asyncio.ensure_future(coro)
        if self.task is None:
            try:
                return await waiter
            except DebugError:
                return None
        await asyncio.wait({waiter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError, DebugError):
                await waiter
            return None
        try:
            return waiter.result()
        except DebugError:
            return None

    def resume(self) -> None:
        """Let a paused guest run on (no effect on one that runs, or that a debugger stopped)."""
        self._hold = False
        d = self._debugger
        if d is not None and d.stopped and d.stop_reason == PAUSE:
            d.resume()

    async def snapshot(self) -> Snapshot:
        """Pause (unless already stopped), capture guest and Launcher state, run on as before."""
        d = self._debugger
        was_held = self._hold or (d is not None and d.stop_reason is not None)
        d = await self.pause()
        try:
            snap = capture(d.file)
            snap.launcher, blobs = launcher_state(self.launcher, self.config)
            snap.blobs.update(blobs)
            return snap
        finally:
            if not was_held:
                self.resume()


# -- Launcher state ------------------------------------------------------------------------------
def launcher_state(
    launcher: Launcher, config: GuestConfig
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The Launcher-level part of a snapshot (JSON) and its image (a section)."""
    image = launcher.image
    blobs = {f"segment{i}": s.data for i, s in enumerate(image.segments)}
    state = {
        "config": config.model_dump(mode="json"),
        "image": {
            "name": image.name,
            "kind": image.kind,
            "entry": image.entry,
            "segments": [[s.paddr, s.memsz] for s in image.segments],
        },
        **launcher.state(),
    }
    return state, blobs


def resume_from(snap: Snapshot) -> Resume:
    """What a Launcher needs to continue the guest of ``snap`` on its first boot."""
    return Resume(fill=snap.write_memory, state=snap.state, launcher=snap.launcher)


def _launcher_part(snap: Snapshot) -> dict[str, Any]:
    """The snapshot's Launcher state, checked (:func:`~supervisor.snapshot.check_launcher`:
    a Snapshot built by hand gets the same checks as one read from a file)."""
    if snap.launcher is None:
        raise SnapshotError("this snapshot has no Launcher state (take it with Guest.snapshot())")
    return check_launcher(snap.launcher, snap.blobs, snap.memory_size)


def snapshot_image(snap: Snapshot) -> Image:
    """The guest's image, as the snapshot carries it."""
    info = _launcher_part(snap)["image"]
    segments = tuple(
        Segment(paddr, snap.blobs[f"segment{i}"], memsz)
        for i, (paddr, memsz) in enumerate(info["segments"])
    )
    return Image(info["name"], info["kind"], segments, info["entry"])


def snapshot_config(snap: Snapshot, **overrides: Any) -> GuestConfig:
    """The snapshot's GuestConfig with ``overrides`` (not ``memory``).

    The image file need not exist any more: the snapshot carries the image.
    """
    fields = dict(_launcher_part(snap)["config"])
    if "memory" in overrides and overrides["memory"] != fields["memory"]:
        raise SnapshotError("a restored guest keeps the snapshot's memory size")
    # A snapshot is data: the files and sockets it names are never opened.  The caller
    # names the block file (the guest had one: it cannot run on without) and gdb address.
    saved_block = fields.get("block")
    fields["block"] = fields["gdb"] = None
    if saved_block is not None and overrides.get("block") is None:
        raise SnapshotError(
            f"the snapshot's guest had a block device ({str(saved_block)!r}): "
            "name the file to restore it with (block=..., run --restore FILE --block PATH)"
        )
    fields.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("image", "block"):
        if fields.get(key) is not None:
            fields[key] = Path(fields[key])
    if Path(fields["image"]).is_file():
        return GuestConfig.build(**fields)
    return GuestConfig.model_construct(**fields)


async def start_gdb(address: str) -> GdbServer:
    """A gdb server listening on ``HOST:PORT`` (``OSError`` if it cannot)."""
    host, _, port = address.rpartition(":")
    server = GdbServer()
    # Shielded: a caller cancelled mid-bind must not leave a listening socket behind.
    starting = asyncio.ensure_future(server.start(host or "127.0.0.1", int(port)))
    try:
        await asyncio.shield(starting)
    except asyncio.CancelledError:
        await asyncio.wait({starting})
        await server.aclose()
        raise
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve gdb on {address}: {exc.strerror or exc}") from None
    return server
