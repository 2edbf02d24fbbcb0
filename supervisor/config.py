"""``GuestConfig``: everything needed to launch one guest, validated by pydantic.

Loadable from TOML or JSON (:meth:`GuestConfig.load`); unknown keys are errors.
Every problem surfaces as :class:`ConfigError`, a ``ValueError`` whose message
is one line naming the field(s) at fault.  Later features (a gdb stub, resource
limits) add optional fields here.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .abi import MAX_CPUS, PAGE_SIZE
from .launcher.files import normalise
from .launcher.layout import CMDLINE_MAX, env_block
from .limits import Limits
from .net import parse_outbound

MIN_MEMORY = 128 << 10
MAX_MEMORY = 1 << 30
DEFAULT_MEMORY = 16 << 20
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_SIZE = re.compile(r"\s*(\d+)\s*([KMG]?)(?:I?B)?\s*", re.IGNORECASE)

ConsoleMode = Literal["stdio", "capture", "null"]


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line."""


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like ``"16M"``, ``"1G"``, ``"512KiB"``, ``"65536"``.

    Units are binary (K = 1024).  Raises ``ValueError`` for anything else.
    """
    if isinstance(value, bool):
        raise ValueError("memory size must be a number of bytes or a string like '16M'")
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(str(value))
    if not match:
        raise ValueError(f"bad size {value!r}: use bytes or a number with K, M or G (e.g. '16M')")
    return int(match[1]) * _UNITS[match[2].upper()]


def check_memory(size: int) -> int:
    """``size`` if it is a page multiple within the supported bounds, else ``ValueError``."""
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise ValueError(f"{size} bytes is outside {MIN_MEMORY >> 10}K..{MAX_MEMORY >> 30}G")
    if size % PAGE_SIZE:
        raise ValueError(f"{size} bytes is not a multiple of the {PAGE_SIZE}-byte page")
    return size


class DirGrant(BaseModel):
    """A host directory the guest sees as ``guest`` (``--dir HOST::GUEST``, ``--ro-dir``).

    ``host`` must be an existing directory; ``guest`` is an absolute guest path
    (default: ``host`` made absolute).  ``read_only`` grants refuse every change
    (EROFS).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: Path
    guest: str = ""
    read_only: bool = False

    @field_validator("host")
    @classmethod
    def _host(cls, value: Path) -> Path:
        if not value.exists():
            raise ValueError(f"no such directory: {value}")
        if not value.is_dir():
            raise ValueError(f"not a directory: {value}")
        return value.absolute()

    @field_validator("guest")
    @classmethod
    def _guest(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError(f"guest path {value!r} is not absolute")
        if "\0" in value:
            raise ValueError("guest path contains a NUL byte")
        return value

    def model_post_init(self, context: Any) -> None:
        if not self.guest:
            object.__setattr__(self, "guest", str(self.host))

    @classmethod
    def parse(cls, spec: str, *, read_only: bool = False) -> DirGrant:
        """``HOST`` or ``HOST::GUEST`` (the ``--dir`` syntax); ``ConfigError`` if unusable."""
        host, _, guest = spec.partition("::")
        try:
            return cls(host=Path(host), guest=guest, read_only=read_only)
        except ValidationError as exc:
            option = "--ro-dir" if read_only else "--dir"
            raise ConfigError(f"{option} {spec}: {describe(exc)}") from None


class GuestConfig(BaseModel):
    """One guest: its image, memory, devices, command line and limits.

    ``max_blocks`` and ``max_run_time`` (seconds of emulation) kill the guest
    when used up; ``console_rate`` caps console output in bytes per second by
    making the guest wait, so nothing it prints is lost; ``console_buffer``
    bounds the unread output of a ``capture`` console in bytes (default 1 MiB):
    beyond it the guest waits until ``Guest.console`` is read, so nothing is lost.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    image: FilePath
    name: str = ""
    memory: int = DEFAULT_MEMORY
    block: FilePath | None = None
    block_readonly: bool = False
    cmdline: str = ""
    # The guest's environment (envp): only this, never the host's.
    env: dict[str, str] = Field(default_factory=dict)
    console: ConsoleMode = "capture"
    # Whether the guest's standard input is a terminal (``isatty(0)``; its output always
    # is, so it is line buffered).  None: the truth, for a stdio console whether the
    # host's standard input is a terminal; a capture or null console's input is not.
    input_tty: bool | None = None
    max_blocks: PositiveInt | None = None
    max_run_time: PositiveFloat | None = None
    console_rate: PositiveInt | None = None
    # ``capture`` console: unread output held before the guest waits for the reader.
    console_buffer: int = Field(default=1 << 20, ge=4096)
    gdb: str | None = None  # "HOST:PORT": start held, serve gdb there (supervisor.gdbstub)
    # Seconds idle before the guest gives back its emulator: 0 at once, "off" (infinity)
    # never, None the device's default (supervisor.hibernation).  Only without the engine
    # pool (LGUEST_ENGINE_SWITCH=off): with it an idle guest holds no emulator anyway.
    hibernate_after: float | None = None
    # CPUs of the guest: CPU 0 boots, the guest starts the others (docs/abi.md).
    cpus: int = Field(default=1, ge=1, le=MAX_CPUS)
    # Files (docs/sdk.md, "Files"): directories granted to the guest, its working
    # directory, and how many files it may hold open at once.
    dirs: list[DirGrant] = Field(default_factory=list)
    workdir: str = "/"
    max_files: int = Field(default=1024, ge=1, le=1 << 16)
    # The network (docs/network.md): join the Supervisor's (``sup.net``), with at most
    # ``max_sockets`` sockets open at once (EMFILE beyond).
    net: bool = False
    max_sockets: int = Field(default=1024, ge=1, le=1 << 16)
    # Real addresses ("HOST:PORT") the guest may connect to (needs ``net``).
    allow_outbound: list[str] = Field(default_factory=list)

    @field_validator("allow_outbound")
    @classmethod
    def _allow_outbound(cls, value: list[str]) -> list[str]:
        for spec in value:
            parse_outbound(spec)  # ValueError: not HOST:PORT with an IPv4 HOST
        return value

    @model_validator(mode="after")
    def _outbound_needs_net(self) -> GuestConfig:
        if self.allow_outbound and not self.net:
            raise ValueError("allow_outbound needs net")
        return self

    @field_validator("dirs")
    @classmethod
    def _dirs(cls, value: list[DirGrant]) -> list[DirGrant]:
        seen: dict[str, DirGrant] = {}
        for grant in value:
            where = normalise(grant.guest)
            if where in seen:
                raise ValueError(f"{seen[where].host} and {grant.host} are both granted at {where}")
            seen[where] = grant
        return value

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"{value!r} is not an absolute guest path")
        return value

    @model_validator(mode="after")
    def _workdir_exists(self) -> GuestConfig:
        """The working directory names a directory the guest has: ``/``, ``/tmp``, a
        granted directory or a path beneath one, or a directory above a grant (the guest
        sees nothing else, so a working directory elsewhere could never be used)."""
        where = normalise(self.workdir)
        if where in ("/", "/tmp"):
            return self
        for grant in self.dirs:
            top = normalise(grant.guest)
            if top == "/" or where == top or where.startswith(top + "/"):
                return self
            if top.startswith(where + "/"):
                return self
        raise ValueError(
            f"workdir {self.workdir!r} is in no granted directory (--dir HOST::GUEST), "
            "nor / or /tmp"
        )

    @field_validator("hibernate_after", mode="before")
    @classmethod
    def _hibernate_after(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "off":
            return math.inf
        if isinstance(value, int | float) and not value >= 0:
            raise ValueError("must be a number of seconds >= 0, or 'off'")
        return value

    def __init__(self, **data: Any) -> None:
        """Validate ``data``; any problem is a :class:`ConfigError` with one line."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(describe(exc)) from None

    @field_validator("gdb")
    @classmethod
    def _gdb(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"gdb address {value!r} is not HOST:PORT")
        return value

    @property
    def limits(self) -> Limits:
        """The per-guest limits the device enforces."""
        return Limits(max_blocks=self.max_blocks, max_run_time=self.max_run_time)

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> int:
        if not isinstance(value, int | str):
            raise ValueError("memory must be a number of bytes or a string like '16M'")
        return check_memory(parse_size(value))

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, value: str) -> str:
        if len(value.encode()) >= CMDLINE_MAX:
            raise ValueError(f"longer than {CMDLINE_MAX - 1} bytes")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        env_block(value)  # ValueError: a bad name, a NUL, too long for the boot info page
        return value

    @property
    def display_name(self) -> str:
        """``name``, or the image's file name without extension."""
        return self.name or self.image.stem

    @classmethod
    def build(cls, **fields: Any) -> GuestConfig:
        """Validate ``fields``; raise :class:`ConfigError` (one line) on any problem."""
        return cls(**fields)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> GuestConfig:
        """Read a ``.toml`` or ``.json`` file; ``overrides`` replace its keys.

        Relative ``image`` and ``block`` paths in the file are relative to the
        file's directory.  Raises :class:`ConfigError` for an unreadable file,
        bad syntax, an unknown extension or invalid contents.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text") from None
        try:
            if path.suffix == ".toml":
                data: Any = tomllib.loads(text)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise ConfigError(f"{path}: config must be a .toml or .json file")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: bad {path.suffix[1:].upper()}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a table/object of settings")
        for key in ("image", "block"):
            if isinstance(data.get(key), str):
                data[key] = str(path.parent / data[key])
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def describe(exc: ValidationError) -> str:
    """One line for every error in ``exc``: ``field: message; field: message``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "config"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown setting"
        elif error["type"] == "missing":
            message = "required"
        elif error["type"] in ("path_not_file",) and "input" in error:
            given = Path(str(error["input"]))
            what = "not a regular file" if given.exists() else "no such file"
            message = f"{what}: {error['input']}"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)
