"""Record and replay a deterministic run's host inputs (``run --record`` / ``--replay``).

A recording is a JSON file: the seed, a digest of the image, of the rest of the
guest's configuration and of the files under its ``--dir`` grants, and every host
input with the step of the schedule it took effect at
(:attr:`supervisor.virtual.Simulation.step`): console input, and the connections
made to published ports (their opening, the bytes the host sent on them, their
end).  Input is applied by the schedule itself at a settled point, in the recording
run and in the replay alike, so the replay feeds the same bytes at the same point
of the run.  Files are not recorded: what the guest reads from them follows from
their contents, which the replay checks are the recording's before anything runs.

The file is data, never authority: it names no host path or address (the image,
configuration and files appear only as SHA-256 digests, a connection only as a
number and the guest's port), and it is checked whole (its format, the order of
its inputs, the digests) before anything runs.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import virtual
from .config import GuestConfig
from .host import Guest
from .net import Network
from .virtual import MAX_SEED, Simulation

MAX_CHUNK = 1 << 20  # bytes of one recorded input (stdin reads are at most 4 KiB)
MAX_INPUTS = 1 << 20
MAX_FILE = 256 << 20  # bytes of a recording file


class ReplayError(ValueError):
    """A recording that is unusable, or does not match the run asked for (one line)."""


class Input(BaseModel):
    """One host input: bytes (base64), or the end of input, on the console (``conn``
    None) or on connection ``conn``; ``port`` opens that connection to the guest's port."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    step: int = Field(ge=0)
    data: str | None = Field(default=None, max_length=(MAX_CHUNK + 2) // 3 * 4)
    eof: bool = False
    conn: int | None = Field(default=None, ge=0, le=MAX_INPUTS)
    port: int | None = Field(default=None, ge=1, le=65535)

    def payload(self) -> bytes:
        if self.data is None:
            return b""
        try:
            return base64.b64decode(self.data, validate=True)
        except ValueError:
            raise ReplayError(f"input at step {self.step}: data is not base64") from None


class Recording(BaseModel):
    """A recording file's contents."""

    model_config = ConfigDict(extra="forbid", strict=True)
    format: Literal["lguest-replay"] = "lguest-replay"
    version: Literal[1] = 1
    seed: int = Field(ge=0, le=MAX_SEED)
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    files_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    emulator: str = Field(max_length=200)  # what counts the steps (:func:`emulator`)
    guests: int = Field(default=1, ge=1, le=1 << 24)  # a swarm's -n
    inputs: list[Input] = Field(default_factory=list, max_length=MAX_INPUTS)


def emulator() -> str:
    """What counts a recording's steps here (:func:`supervisor.virtual.counting`): a
    replay where it differs would apply the inputs at other points of the run."""
    return virtual.counting()


def digests(config: GuestConfig, start: str | None = None) -> tuple[str, str]:
    """(SHA-256 of what the run starts from, SHA-256 of the rest of the configuration
    that decides the run).  The run starts from the image's bytes, or the snapshot
    file's if ``start`` names one (its config is then ``config``).  Console, name and
    gdb do not change what the guest computes, nor where on the host a ``--dir``
    grant's files are (:func:`files_digest`)."""
    image = hashlib.sha256(Path(start or config.image).read_bytes()).hexdigest()
    rest = config.model_dump(mode="json", exclude={"image", "console", "name", "gdb"})
    for grant in rest.get("dirs", []):
        grant.pop("host", None)
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    return image, hashlib.sha256(text.encode()).hexdigest()


def files_digest(config: GuestConfig) -> str:
    """SHA-256 of what the guest can read under its ``--dir`` grants, in grant order:
    each entry's path inside the grant, kind, permission bits, and contents (a
    file's bytes, a symbolic link's target).  Modification times are left out (a
    copy of the files keeps their digest)."""
    sha = hashlib.sha256()
    for grant in config.dirs:
        sha.update(f"grant {grant.guest}\0".encode())
        for top, dirs, files in os.walk(grant.host):
            dirs.sort()
            for name in sorted(dirs + files):
                path = os.path.join(top, name)
                rel = os.path.relpath(path, grant.host)
                st = os.lstat(path)
                perms = stat.S_IMODE(st.st_mode)
                if stat.S_ISLNK(st.st_mode):
                    body = os.readlink(path).encode(errors="surrogateescape")
                    sha.update(f"link {rel} {len(body)}\0".encode(errors="surrogateescape"))
                    sha.update(body)
                elif stat.S_ISREG(st.st_mode):
                    sha.update(
                        f"file {rel} {perms:o} {st.st_size}\0".encode(errors="surrogateescape")
                    )
                    with open(path, "rb") as f:
                        while chunk := f.read(1 << 20):
                            sha.update(chunk)
                else:
                    kind = "dir" if stat.S_ISDIR(st.st_mode) else "other"
                    sha.update(f"{kind} {rel} {perms:o}\0".encode(errors="surrogateescape"))
    return sha.hexdigest()


def load(path: str, config: GuestConfig, start: str | None = None, guests: int = 1) -> Recording:
    """The recording at ``path``, checked against ``config`` (and the snapshot file
    ``start``, for a run restored from it; ``guests``: a swarm's number of guests);
    ``ReplayError`` (one line) for a file that cannot be read, is not a recording,
    or was made for another image, snapshot, configuration, files or swarm."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise ReplayError(f"{path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE:
        raise ReplayError(f"{path}: larger than {MAX_FILE} bytes: not a recording")
    try:
        recording = Recording.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "file"
        raise ReplayError(f"{path}: not a recording ({where}: {first['msg']})") from None
    steps = [entry.step for entry in recording.inputs]
    if steps != sorted(steps):
        raise ReplayError(f"{path}: not a recording (inputs out of order)")
    opened: set[int] = set()
    for entry in recording.inputs:
        if (entry.port is None and (entry.data is None) == (not entry.eof)) or entry.data == "":
            # (each input is bytes or an end, never both, never nothing: the replay
            # would otherwise have to guess which one was recorded)
            raise ReplayError(
                f"{path}: not a recording (an input at step {entry.step} is not bytes or an end)"
            )
        entry.payload()
        if entry.port is not None:
            if entry.conn is None or entry.conn in opened or entry.data is not None or entry.eof:
                raise ReplayError(
                    f"{path}: not a recording (a bad connection at step {entry.step})"
                )
            opened.add(entry.conn)
        elif entry.conn is not None and entry.conn not in opened:
            raise ReplayError(f"{path}: not a recording (connection {entry.conn} never opened)")
    if recording.emulator != emulator():
        raise ReplayError(
            f"{path}: recorded on {recording.emulator}, not on {emulator()}: "
            "its inputs would land at other points of the run"
        )
    if opened and not config.net:
        raise ReplayError(f"{path}: recorded connections to a guest on the network: needs --net")
    image, rest = digests(config, start)
    if recording.image_sha256 != image:
        what = f"snapshot than {start}" if start else f"image than {config.image}"
        raise ReplayError(f"{path}: recorded with another {what}")
    if recording.config_sha256 != rest:
        raise ReplayError(f"{path}: recorded with another configuration (memory, cmdline, ...)")
    if recording.guests != guests:
        raise ReplayError(f"{path}: recorded with {recording.guests} guests, not {guests}")
    if recording.files_sha256 != files_digest(config):
        raise ReplayError(f"{path}: the files under --dir are not the ones recorded with")
    return recording


class Connections:
    """The host's connections into one guest, opened and fed at settled points of the
    schedule, the same way in a recording run and in its replay.

    A connection is opened to the guest's port by a task started at its point (it
    connects within the event-loop passes before the next choice, or waits for the
    guest's accept as any host connect does); bytes and the end of input that come
    before it is open wait for it, in order.  What the guest sends back is read as
    it comes, whatever the other end does with it, so the guest never waits on the
    host's pace.  A connection the guest refuses ends, with what was to go on it."""

    def __init__(self, net: Network, name: str) -> None:
        self.net = net
        self.name = name
        self._writers: dict[int, asyncio.StreamWriter | None] = {}  # None: refused or ended
        self._pending: dict[int, list[bytes]] = {}  # b"": the end of input
        self._tasks: set[asyncio.Task[None]] = set()

    def connect(
        self, conn: int, port: int, out: Callable[[bytes], None], refused: Callable[[], None]
    ) -> None:
        """Open connection ``conn`` to the guest's ``port``; ``out(data)`` gets what the
        guest sends on it (``b""``: its end), ``refused()`` is called if it cannot open."""
        self._pending[conn] = []
        task = asyncio.create_task(self._open(conn, port, out, refused))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(
        self, conn: int, port: int, out: Callable[[bytes], None], refused: Callable[[], None]
    ) -> None:
        try:
            reader, writer = await self.net.open_connection(self.name, port)
        except OSError:
            self._writers[conn] = None
            self._pending.pop(conn, None)
            refused()
            return
        self._writers[conn] = writer
        for data in self._pending.pop(conn, []):
            write_to(writer, data)
        while data := await reader.read(1 << 16):
            out(data)
        out(b"")

    def send(self, conn: int, data: bytes) -> None:
        """Bytes on ``conn`` to the guest (``b""``: the end of the host's input)."""
        pending = self._pending.get(conn)
        if pending is not None:
            pending.append(data)
            return
        writer = self._writers.get(conn)
        if writer is not None:
            write_to(writer, data)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers.values():
            if writer is not None:
                writer.close()


def _discard(data: bytes) -> None:
    """Where a replay's guest output on a connection goes: nowhere (no host is there)."""


def replay(
    recording: Recording, sim: Simulation, guest: Guest, connections: Connections | None = None
) -> None:
    """Schedule every recorded input for ``guest`` at its step (``connections``: where
    the recorded connections are opened; needed if the recording has any)."""
    for entry in recording.inputs:
        if entry.conn is not None:
            if connections is None:
                raise ValueError("the recording has connections: pass connections=")
            if entry.port is not None:
                call = functools.partial(
                    connections.connect, entry.conn, entry.port, _discard, lambda: None
                )
            else:
                call = functools.partial(connections.send, entry.conn, entry.payload())
            sim.at_step(entry.step, call)
        elif entry.eof:
            sim.at_step(entry.step, guest.send_eof)
        else:
            sim.at_step(entry.step, functools.partial(guest.send, entry.payload()))


class Recorder:
    """Collects the input a deterministic run applies, with its steps."""

    def __init__(self, sim: Simulation, config: GuestConfig, start: str | None = None) -> None:
        self.sim = sim
        self.image, self.config = digests(config, start)
        self.files = files_digest(config)
        self.inputs: list[Input] = []
        self._conns = 0

    def _keep(self, data: bytes, conn: int | None) -> None:
        if data:
            text = base64.b64encode(data).decode()
            self.inputs.append(Input(step=self.sim.step, data=text, conn=conn))
        else:
            self.inputs.append(Input(step=self.sim.step, eof=True, conn=conn))

    def feed(self, guest: Guest, data: bytes) -> None:
        """Give ``guest`` ``data`` (empty: the end of input) at the schedule's next
        settled point, and keep it with that point's step."""

        def apply() -> None:
            self._keep(data, None)
            if data:
                guest.send(data)
            else:
                guest.send_eof()

        self.sim.post(apply)

    def connect(
        self,
        connections: Connections,
        port: int,
        out: Callable[[bytes], None],
        refused: Callable[[], None],
    ) -> int:
        """Open a connection to the guest's ``port`` at the next settled point (see
        :meth:`Connections.connect`), keep it, and return its number for :meth:`send`."""
        conn = self._conns
        self._conns += 1

        def apply() -> None:
            self.inputs.append(Input(step=self.sim.step, conn=conn, port=port))
            connections.connect(conn, port, out, refused)

        self.sim.post(apply)
        return conn

    def send(self, connections: Connections, conn: int, data: bytes) -> None:
        """Bytes on connection ``conn`` (empty: its end) at the next settled point, kept."""

        def apply() -> None:
            self._keep(data, conn)
            connections.send(conn, data)

        self.sim.post(apply)

    def save(self, path: str) -> None:
        recording = Recording(
            seed=self.sim.seed,
            image_sha256=self.image,
            config_sha256=self.config,
            files_sha256=self.files,
            emulator=emulator(),
            inputs=self.inputs,
        )
        save(recording, path)


def save(recording: Recording, path: str) -> None:
    """Write ``recording`` to ``path`` (whole or not at all)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(recording.model_dump_json(indent=1, exclude_none=True))
    os.replace(tmp, path)


def write_to(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Pass what a guest sent on to a host stream: bytes are written, an empty chunk is
    the guest's end of stream (EOF, where the transport can half-close); nothing once
    the host closed it."""
    if writer.is_closing():
        return
    if data:
        writer.write(data)
    elif writer.can_write_eof():
        writer.write_eof()
