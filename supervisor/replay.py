"""Record and replay a deterministic run's console input (``run --record`` / ``--replay``).

A recording is a JSON file: the seed, a digest of the image and of the rest of the
guest's configuration, and every piece of console input with the step of the
schedule it took effect at (:attr:`supervisor.virtual.Simulation.step`).  Input is
applied by the schedule itself at a settled point, in the recording run and in the
replay alike, so the replay feeds the same bytes at the same point of the run.

The file is data, never authority: it names no host path or address (the image and
configuration appear only as SHA-256 digests), and it is checked whole (its format,
the digests against the image and configuration given) before anything runs.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import GuestConfig
from .host import Guest
from .virtual import MAX_SEED, Simulation

MAX_CHUNK = 1 << 20  # bytes of one recorded input (stdin reads are at most 4 KiB)
MAX_INPUTS = 1 << 20
MAX_FILE = 256 << 20  # bytes of a recording file


class ReplayError(ValueError):
    """A recording that is unusable, or does not match the run asked for (one line)."""


class Input(BaseModel):
    """One piece of console input: bytes (base64), or the end of input."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    step: int = Field(ge=0)
    data: str | None = Field(default=None, max_length=(MAX_CHUNK + 2) // 3 * 4)
    eof: bool = False

    def payload(self) -> bytes:
        if self.data is None:
            return b""
        try:
            return base64.b64decode(self.data, validate=True)
        except ValueError:
            raise ReplayError(f"input at step {self.step}: data is not base64") from None


class Recording(BaseModel):
    """A recording file's contents."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["lguest-replay"] = "lguest-replay"
    version: Literal[1] = 1
    seed: int = Field(ge=0, le=MAX_SEED)
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[Input] = Field(default_factory=list, max_length=MAX_INPUTS)


def digests(config: GuestConfig) -> tuple[str, str]:
    """(SHA-256 of the image's bytes, SHA-256 of the rest of the configuration that
    decides the run); console, name and gdb do not change what the guest computes."""
    image = hashlib.sha256(Path(config.image).read_bytes()).hexdigest()
    rest = config.model_dump(mode="json", exclude={"image", "console", "name", "gdb"})
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    return image, hashlib.sha256(text.encode()).hexdigest()


def load(path: str, config: GuestConfig) -> Recording:
    """The recording at ``path``, checked against ``config``; ``ReplayError`` (one line)
    for a file that cannot be read, is not a recording, or was made for another
    image or configuration."""
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
    for entry in recording.inputs:
        entry.payload()
    image, rest = digests(config)
    if recording.image_sha256 != image:
        raise ReplayError(f"{path}: recorded with another image than {config.image}")
    if recording.config_sha256 != rest:
        raise ReplayError(f"{path}: recorded with another configuration (memory, cmdline, ...)")
    return recording


def replay(recording: Recording, sim: Simulation, guest: Guest) -> None:
    """Schedule every recorded input for ``guest`` at its step."""
    for entry in recording.inputs:
        if entry.eof:
            sim.at_step(entry.step, guest.send_eof)
        else:
            sim.at_step(entry.step, functools.partial(guest.send, entry.payload()))


class Recorder:
    """Collects the input a deterministic run applies, with its steps."""

    def __init__(self, sim: Simulation, config: GuestConfig) -> None:
        self.sim = sim
        self.image, self.config = digests(config)
        self.inputs: list[Input] = []

    def feed(self, guest: Guest, data: bytes) -> None:
        """Give ``guest`` ``data`` (empty: the end of input) at the schedule's next
        settled point, and keep it with that point's step."""

        def apply() -> None:
            if data:
                text = base64.b64encode(data).decode()
                self.inputs.append(Input(step=self.sim.step, data=text))
                guest.send(data)
            else:
                self.inputs.append(Input(step=self.sim.step, eof=True))
                guest.send_eof()

        self.sim.post(apply)

    def save(self, path: str) -> None:
        recording = Recording(
            seed=self.sim.seed,
            image_sha256=self.image,
            config_sha256=self.config,
            inputs=self.inputs,
        )
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(recording.model_dump_json(indent=1))
        os.replace(tmp, path)
