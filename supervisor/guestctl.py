"""Snapshots and gdb for Launcher-run guests: the parts :class:`supervisor.host.Guest` uses.

A restored guest's first boot continues the snapshot: the Launcher does that,
from a :class:`~supervisor.launcher.launcher.Resume` (:func:`resume_from`).

The Launcher-level part of a snapshot (``Snapshot.launcher``) is the guest's
config and image plus :meth:`Launcher.state`: the reboots so far, the irqs the
devices raised but the Launcher has not sent, and each device's
:meth:`~supervisor.launcher.devices.Device.state` (a console's input not yet
delivered and whether it has told the guest about EOF).  A block device's
backing file is not part of the snapshot.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from .config import GuestConfig
from .gdbstub import GdbServer
from .launcher.files import DEV_TYPE_FILES
from .launcher.launcher import Launcher, Resume
from .launcher.loader import Image, Segment
from .snapshot import Snapshot, SnapshotError, check_launcher


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
    part = _launcher_part(snap)
    fields = dict(part["config"])
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
    # The same for directories: the restoring guest's own grants (guest paths in the same
    # order) serve its open files; the host paths in the snapshot are never opened.
    saved_dirs = fields.get("dirs") or []
    fields["dirs"] = []
    if saved_dirs and overrides.get("dirs") is None:
        guest_paths = ", ".join(str(d.get("guest")) for d in saved_dirs)
        raise SnapshotError(
            f"the snapshot's guest had directories ({guest_paths}): name the host directories "
            "to restore it with (dirs=..., run --restore FILE --dir HOST::GUEST)"
        )
    # The network and the outside addresses the guest may reach are the restoring
    # caller's to grant (net=True, allow_outbound=..., run --restore FILE --net
    # --allow-outbound HOST:PORT), never the snapshot's: a crafted or borrowed snapshot
    # joins no network and reaches nothing by itself.
    fields["net"] = False
    fields["allow_outbound"] = []
    fields.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("image", "block"):
        if fields.get(key) is not None:
            fields[key] = Path(fields[key])
    if Path(fields["image"]).is_file():
        config = GuestConfig.build(**fields)
    else:
        config = GuestConfig.model_construct(**fields)
    _check_open_files(part["devices"], config.max_files)
    return config


def _check_open_files(devices: list[dict[str, Any]], max_files: int) -> None:
    """``SnapshotError`` if the saved guest holds more descriptors than the restoring
    config's ``max_files``: the limit holds for a restored guest as for a running one
    (the file device refuses such a state too, but only once the guest starts)."""
    for entry in devices:
        state = entry.get("state")
        if entry.get("type") != DEV_TYPE_FILES or not isinstance(state, dict):
            continue
        fds = state.get("fds")
        if isinstance(fds, list) and len(fds) > max_files:
            raise SnapshotError(
                f"the snapshot's guest holds {len(fds)} open files, more than max_files "
                f"{max_files} (restore it with a larger max_files=..., --max-files N)"
            )


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
