"""lguest-supervisor (or python -m supervisor): run one guest on the terminal, or a swarm.

``run IMAGE``
    The guest's console is the terminal: its output goes to stdout (what it
    writes to fd 2 to stderr), stdin is its input (EOF on stdin is EOF on the
    console).  Exit status: the guest's
    power-off status (values over 255 become 255); a guest that died (killed
    by the Host, crashed, too many reboots) prints ``supervisor: <name> died:
    <reason>`` on stderr and exits 1.  Ctrl-C kills the guest and exits 130,
    SIGTERM 143; a closed stdout (``run ... | head``) ends it quietly with 141.
``run IMAGE --gdb HOST:PORT`` / ``run --restore FILE``
    Hold the guest at its first instruction and serve gdb on HOST:PORT (port 0:
    any; the address is printed on stderr).  ``--restore`` continues a snapshot.
``snapshot IMAGE -o FILE --after-lines N`` (or ``--after SECONDS``)
    Run the guest (console on stdout), snapshot it at that point, save, stop.
``build SOURCES... -o OUT [-O2] [-g] [-I DIR] [-D NAME[=VALUE]] [-W...]``
    Compile C (and ``.S``) sources into a guest image (ELF32) linked with the
    guest runtime and musl (``supervisor.sdk``; needs the ``sdk`` extra).  It
    writes OUT only (docs/sdk.md); ``--timeout SECONDS`` (default 1800).
``swarm -n N IMAGE``
    N copies with no console; live progress on stderr when it is a terminal,
    then a summary table on stdout.  Exit status 0 when every guest powered
    off with status 0, else 1.  Ctrl-C (130) or SIGTERM (143) stops the guests
    and still prints the table; ``--console prefix`` into a closed stdout stops
    them and exits 141.
    A swarm of thousands runs in a process per CPU (``--processes N``,
    supervisor.shards), with the same output, table and exit status.
``swarm -n N IMAGE --cluster ray`` (or ``local``, ``auto``, ``HOST:PORT``, ``ray://HOST:PORT``)
    The same on Ray workers (supervisor.cluster; ``--workers``,
    ``--checkpoint-every SECONDS``), plus a table row per worker.

Bad input (missing file, not an image, bad size, bad config, bad option, a
number out of its range) is one line ``supervisor: error: ...`` on stderr and
exit status 2, before anything runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import os
import random
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterable, Callable, Coroutine, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import shards
from .abi import MAX_CPUS
from .admission import Admission, Collector
from .config import ConfigError, DirGrant, GuestConfig
from .flag import Flag
from .host import Exit, Guest, Supervisor
from .launcher.console import stdin_source, stdout_closed
from .launcher.loader import ImageError
from .snapshot import Snapshot
from .virtual import MAX_SEED

EXIT_DIED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM
PROG = "lguest-supervisor"  # the console script (pyproject.toml); python -m supervisor is the same
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE: what a tool whose reader went away ends with


class BadInput(Exception):
    """Something the user gave us is unusable; the message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"supervisor: error: {message} (see --help)\n")


MAX_SECONDS = 1e9  # any duration option: about 31 years, far past any run
MIN_LAUNCH_RATE = 1 / 3600  # guests a second: one an hour, the slowest pace that is a pace


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _positive_float(text: str) -> float:
    """Seconds greater than 0, at most :data:`MAX_SECONDS` (an argparse ``type``)."""
    value = _number(text)
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {MAX_SECONDS:g}")
    return value


def _seconds(text: str) -> float:
    """Seconds from 0 to :data:`MAX_SECONDS` (an argparse ``type``)."""
    value = _number(text)
    if not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_SECONDS:g} seconds")
    return value


def _seconds_or_off(text: str) -> float | str:
    """``off``, or seconds from 0 to :data:`MAX_SECONDS` (``--hibernate-after``)."""
    if text.strip().lower() == "off":
        return "off"
    return _seconds(text)


def _launch_rate(text: str) -> float:
    """Guests a second: at least :data:`MIN_LAUNCH_RATE` (a slower pace waits for hours
    between launches), finite."""
    value = _number(text)
    if not value >= MIN_LAUNCH_RATE:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_LAUNCH_RATE:.6f} guests a second (one an hour)"
        )
    return value


def _shard(text: str) -> shards.Shard:
    try:
        return shards.Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_from(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` (to ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}")
        return value

    parse.__name__ = "integer"
    return parse


MAX_ENGINES_OPTION = 1 << 20  # --max-engines: past any machine's memory at 1 MiB each


class EngineOptions(BaseModel):
    """The engine pool's options (``--max-engines``), validated by pydantic."""

    model_config = ConfigDict(extra="forbid")

    max_engines: int | None = Field(default=None, ge=1, le=MAX_ENGINES_OPTION)


def engine_options(p: argparse.ArgumentParser) -> None:
    """--max-engines (docs/performance.md, "Engines")."""
    p.add_argument(
        "--max-engines",
        metavar="N",
        help="the engine pool's bound: at most N warm emulators at once, whatever the"
        " guests do (default: what an eighth of the memory holds, at most 4096; never"
        " fewer than the workers plus 3)",
    )


def engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """Supervisor's ``max_engines`` from ``--max-engines`` (BadInput if it is not an
    integer from 1 to :data:`MAX_ENGINES_OPTION`, or with a deterministic run, which
    has no engine pool)."""
    given = getattr(args, "max_engines", None)
    if given is None:
        return {}
    try:
        options = EngineOptions(max_engines=given)
    except ValidationError as exc:
        message = "; ".join(str(error["msg"]) for error in exc.errors())
        raise BadInput(f"--max-engines {given}: {message}") from None
    if args.deterministic or args.record or args.replay:
        raise BadInput("--max-engines is for the engine pool: a deterministic run has none")
    return {"max_engines": options.max_engines}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--memory", help="guest RAM, e.g. 16M (default 16M)")
        p.add_argument("--cmdline", help="guest command line (boot info page)")
        p.add_argument(
            "--env",
            action="append",
            metavar="NAME=VALUE",
            help="set a guest environment variable (repeatable; nothing comes from the host's)",
        )
        p.add_argument(
            "--cpus",
            type=_int_from(1, MAX_CPUS),
            help="CPUs per guest (default 1; the guest starts them)",
        )
        p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop")
        p.add_argument(
            "--max-blocks", type=_int_from(1), help="kill a guest after this many blocks"
        )
        p.add_argument(
            "--max-run-time",
            type=_positive_float,
            metavar="SECONDS",
            help="kill a guest after this many seconds of emulation",
        )
        p.add_argument("--console-rate", type=_int_from(1), help="console output cap, bytes/second")
        files_options(p)
        p.add_argument(
            "--hibernate-after",
            type=_seconds_or_off,
            metavar="SECONDS",
            help=(
                "with the engines off (LGUEST_ENGINE_SWITCH=off), free an idle guest's"
                " emulator after SECONDS (0: at once, off: never; default 1); no effect"
                " with the engine pool, the default, where an idle guest holds no"
                " emulator anyway"
            ),
        )

    run = sub.add_parser("run", help="run one guest on the terminal")
    run.add_argument("image", nargs="?", help="flat binary or ELF32 image")
    run.add_argument("--block", help="file backing the block device")
    run.add_argument("--readonly", action="store_true", help="make the block device read-only")
    run.add_argument("--config", help="GuestConfig as .toml or .json (options override it)")
    run.add_argument("--gdb", metavar="HOST:PORT", help="start held and serve gdb there")
    run.add_argument("--restore", metavar="FILE", help="continue the guest saved in FILE")
    deterministic_options(run)
    engine_options(run)
    recorded = run.add_mutually_exclusive_group()
    recorded.add_argument(
        "--record",
        metavar="FILE",
        help="deterministic, and write the seed, the console input and the connections "
        "to --publish'ed ports, with when they took effect, to FILE",
    )
    recorded.add_argument(
        "--replay",
        metavar="FILE",
        help="run again what --record wrote to FILE (same image, options and --dir files; "
        "the input and connections come from FILE, not stdin or ports)",
    )
    common(run)
    run.add_argument(  # run only: a published port forwards to one guest
        "--publish",
        action="append",
        default=[],
        metavar="[HOSTADDR:]HOSTPORT:GUESTPORT",
        help="forward a real TCP port (default address 127.0.0.1) to the guest's port (with --net)",
    )

    snap = sub.add_parser("snapshot", help="run a guest and save a snapshot of it mid-run")
    snap.add_argument("image", help="flat binary or ELF32 image")
    snap.add_argument("-o", "--output", required=True, help="snapshot file to write")
    when = snap.add_mutually_exclusive_group(required=True)
    when.add_argument("--after-lines", type=_int_from(0), help="once the console printed N lines")
    when.add_argument(
        "--after", type=_seconds, metavar="SECONDS", help="after SECONDS of wall time"
    )
    common(snap)

    build = sub.add_parser(
        "build",
        help="compile C guests into an image (needs the sdk extra)",
        description="Compile C (and .S) sources into a guest image.  Toolchain: Zig's C "
        "compiler (pip install 'lguest-supervisor[sdk]'), else a system gcc that builds "
        "32-bit code (freestanding guests only: no C library); LGUEST_TOOLCHAIN=zig|gcc "
        "picks one (docs/sdk.md).",
    )
    build.add_argument("sources", nargs="+", help=".c / .S sources")
    build.add_argument("-o", "--output", required=True, help="image to write (ELF32)")
    build.add_argument("-O", dest="optimize", choices=["0", "1", "2", "3", "s", "z"])
    build.add_argument("-g", dest="debug", action="store_true", help="DWARF for gdb")
    build.add_argument("-I", dest="include_dirs", action="append", default=[], metavar="DIR")
    build.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME[=VALUE]")
    build.add_argument("-W", dest="warnings", action="append", default=[], metavar="WARNING")
    build.add_argument(
        "--stack-size",
        help="CPU 0's stack, 4K..256M, e.g. 1M (default 8M if that leaves 4M for the heap, "
        "else half the free memory)",
    )
    build.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="give up (and kill the compiler) after SECONDS (default 1800: a first "
        "build compiles musl)",
    )

    swarm = sub.add_parser("swarm", help="run N copies of a guest and summarize")
    swarm.add_argument("-n", type=_int_from(1), default=10, help="how many guests (default 10)")
    swarm.add_argument("image", help="flat binary or ELF32 image")
    swarm.add_argument(
        "--gdb",
        metavar="HOST:PORT",
        help="serve gdb on HOST:PORT for one guest, held at its first instruction",
    )
    swarm.add_argument(
        "--gdb-guest",
        type=_int_from(0),
        default=0,
        metavar="INDEX",
        help="with --gdb: which guest gdb gets, 0 to N-1 (default 0, the first launched; "
        "it is named IMAGE-INDEX)",
    )
    swarm.add_argument(
        "--console",
        choices=["none", "prefix", "tail"],
        default="none",
        help="guest output: none; prefix (every line as NAME: LINE, stdout on stdout, "
        "stderr on stderr); "
        "tail (the last lines of each guest in a table at the end)",
    )
    swarm.add_argument(
        "--tail-lines",
        type=_int_from(1, 100_000),
        default=3,
        help="lines per guest kept by --console tail",
    )
    swarm.add_argument(
        "--cluster",
        metavar="ray|local|auto|HOST:PORT|ray://HOST:PORT",
        help="run on Ray workers: 'ray' joins the cluster 'ray start' started on this machine "
        "or starts a local Ray; 'local' always starts one; or the cluster at this address",
    )
    swarm.add_argument(
        "--workers", type=_int_from(1), help="with --cluster: how many (default: per CPU)"
    )
    swarm.add_argument(
        "--checkpoint-every",
        type=_positive_float,
        metavar="SECONDS",
        help="with --cluster: checkpoint every guest this often (a lost worker costs no guest)",
    )
    swarm.add_argument(
        "--max-alive",
        type=_int_from(1),
        help="guests running at once (default: as many as memory holds, measured)",
    )
    swarm.add_argument(
        "--processes",
        type=_int_from(1),
        metavar="N",
        help="run the swarm in N processes, an event loop each (default: one per CPU "
        f"available, at most one per {shards.PER_PROCESS:,} guests; 1 with --deterministic, "
        "--gdb, --record or --replay)",
    )
    swarm.add_argument("--shard", type=_shard, help=argparse.SUPPRESS)
    swarm.add_argument(
        "--launch-rate",
        type=_launch_rate,
        metavar="PER_SECOND",
        help="launch at most this many guests a second (default: as fast as they start)",
    )
    deterministic_options(swarm)
    engine_options(swarm)
    swarm_recorded = swarm.add_mutually_exclusive_group()
    swarm_recorded.add_argument(
        "--record",
        metavar="FILE",
        help="deterministic, and write the seed and what the run is checked against to FILE",
    )
    swarm_recorded.add_argument(
        "--replay",
        metavar="FILE",
        help="run again the swarm --record wrote to FILE (same image, options and -n)",
    )
    common(swarm)
    return parser


def deterministic_options(p: argparse.ArgumentParser) -> None:
    """--deterministic and --seed (docs/determinism.md)."""
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="virtual time and a seeded schedule: the same seed gives the same run",
    )
    p.add_argument(
        "--seed",
        type=_int_from(0, MAX_SEED),
        help="with --deterministic: the schedule's seed, 0 to 2**64-1 (default: a random one, "
        "printed on stderr)",
    )


def deterministic_args(args: argparse.Namespace) -> dict[str, Any]:
    """Supervisor's ``deterministic`` and ``seed`` from the options (BadInput for a
    --seed without --deterministic)."""
    if args.seed is not None and not args.deterministic:
        raise BadInput("--seed needs --deterministic")
    return {"deterministic": args.deterministic, "seed": args.seed}


def say_seed(sup: Supervisor) -> None:
    """On stderr, the seed that reproduces a deterministic run."""
    if sup.seed is not None:
        print(f"supervisor: deterministic run, seed {sup.seed}", file=sys.stderr, flush=True)


def files_options(p: argparse.ArgumentParser) -> None:
    """--dir, --ro-dir, --workdir, --max-files (docs/sdk.md, "Files"); --net and
    --max-sockets (docs/network.md)."""
    p.add_argument(
        "--dir",
        dest="dirs",
        action="append",
        default=[],
        metavar="HOST[::GUEST]",
        help="let the guest use directory HOST, seen as GUEST (default: HOST's path)",
    )
    p.add_argument(
        "--ro-dir",
        dest="ro_dirs",
        action="append",
        default=[],
        metavar="HOST[::GUEST]",
        help="the same, read-only",
    )
    p.add_argument("--workdir", metavar="GUEST", help="the guest's working directory (default /)")
    p.add_argument(
        "--max-files", type=_int_from(1, 1 << 16), help="files a guest may hold open (default 1024)"
    )
    p.add_argument(
        "--net",
        action="store_true",
        help="join the guests' network: sockets, each guest reachable by its name",
    )
    p.add_argument(
        "--max-sockets",
        type=_int_from(1, 1 << 16),
        help="sockets a guest may hold open (default 1024)",
    )
    p.add_argument(
        "--allow-outbound",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="let guests connect to this real address (HOST: an IPv4 address or localhost; "
        "a guest reaches the host's loopback as host:PORT)",
    )


def files_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The GuestConfig file settings given as options (``ConfigError`` for a bad --dir).

    ``--allow-outbound`` without ``--net`` is refused here, in the options' own names,
    unless a config file or a snapshot may supply ``net`` (then GuestConfig decides).
    """
    supplied = getattr(args, "config", None) or getattr(args, "restore", None)
    if args.allow_outbound and not args.net and not supplied:
        raise BadInput("--allow-outbound needs --net")
    dirs = [DirGrant.parse(d) for d in args.dirs]
    dirs += [DirGrant.parse(d, read_only=True) for d in args.ro_dirs]
    return {
        "dirs": dirs or None,
        "workdir": args.workdir,
        "max_files": args.max_files,
        "net": True if args.net else None,
        "max_sockets": args.max_sockets,
        "allow_outbound": args.allow_outbound or None,
    }


def run_config(args: argparse.Namespace) -> GuestConfig:
    """The GuestConfig for ``run``: the --config file (if any) overridden by options.

    The console is the terminal (``stdio``) unless the config file says ``null``.
    """
    fields: dict[str, Any] = {
        "image": args.image,
        "memory": args.memory,
        "block": args.block,
        "block_readonly": True if args.readonly else None,
        "cmdline": args.cmdline,
        "env": env_option(args.env),
        "cpus": args.cpus,
        "gdb": args.gdb,
        **limit_fields(args),
    }
    if args.config:
        config = GuestConfig.load(args.config, **fields)
        if "console" not in config.model_fields_set:
            config = config.model_copy(update={"console": "stdio"})
        elif config.console == "capture":
            raise BadInput(f"{args.config}: console 'capture' is for the library; run: stdio|null")
    elif args.image is None:
        raise BadInput("run needs an IMAGE or --config FILE")
    else:
        config = GuestConfig.build(
            console="stdio", **{k: v for k, v in fields.items() if v is not None}
        )
    if config.block_readonly and config.block is None:
        raise BadInput("--readonly needs a block device (--block FILE)")
    return config


def restore_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """What ``run --restore`` takes from the command line; the rest is the snapshot's."""
    kept = [
        name
        for name, given in (
            ("IMAGE", args.image),
            ("--memory", args.memory),
            ("--cmdline", args.cmdline),
            ("--env", args.env),
            ("--cpus", args.cpus),
            ("--config", args.config),
        )
        if given is not None
    ]
    if kept:
        raise BadInput(f"--restore continues the snapshot's guest: {', '.join(kept)} cannot change")
    if args.readonly and args.block is None:
        raise BadInput("--readonly needs a block device (--block FILE)")
    return {
        "console": "stdio",
        "gdb": args.gdb,
        "block": args.block,
        "block_readonly": True if args.readonly else None,
        **limit_fields(args),
    }


def env_option(given: list[str] | None) -> dict[str, str] | None:
    """``--env NAME=VALUE`` options as a dict (a later NAME wins), or None if none."""
    if not given:
        return None
    env: dict[str, str] = {}
    for item in given:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise BadInput(f"--env {item!r} is not NAME=VALUE")
        env[name] = value
    return env


def limit_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The GuestConfig limit settings given as options."""
    return {
        "max_blocks": args.max_blocks,
        "max_run_time": args.max_run_time,
        "console_rate": args.console_rate,
        "hibernate_after": args.hibernate_after,
        **files_fields(args),
    }


async def launch(sup: Supervisor, config: GuestConfig) -> Guest:
    """``sup.launch`` with the user's mistakes turned into :class:`BadInput`."""
    try:
        return await sup.launch(config)
    except (ImageError, ValueError) as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise BadInput(_os_message(exc)) from None


def _os_message(exc: OSError) -> str:
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc.strerror or exc)


def print_gdb_address(guest: Guest) -> None:
    if guest.gdb is not None and guest.gdb.address is not None:
        host, port = guest.gdb.address
        print(f"supervisor: gdb server on {host}:{port}", file=sys.stderr, flush=True)


def publish_spec(spec: str) -> tuple[str, int, int]:
    """(host address, host port, guest port) of ``--publish [HOSTADDR:]HOSTPORT:GUESTPORT``."""
    rest, _, guest = spec.rpartition(":")
    addr, _, host = rest.rpartition(":")
    if not all(p.isdigit() and 1 <= int(p) <= 65535 for p in (host, guest)):
        raise BadInput(f"--publish {spec}: not [HOSTADDR:]HOSTPORT:GUESTPORT (ports 1-65535)")
    return addr.strip("[]") or "127.0.0.1", int(host), int(guest)


async def publish_ports(sup: Supervisor, config: GuestConfig, specs: list[str]) -> None:
    """Open ``run --publish``'s real ports for ``config``'s guest (BadInput if taken)."""
    if specs and not config.net:
        raise BadInput("--publish needs --net")
    for spec in specs:
        addr, host_port, guest_port = publish_spec(spec)
        try:
            await sup.net.publish(config.display_name, guest_port, host_port, addr)
        except OSError as exc:
            raise BadInput(f"--publish {spec}: {_os_message(exc)}") from None


async def run_one(
    config: GuestConfig | None,
    restore: str | None = None,
    overrides: dict[str, Any] | None = None,
    publish: list[str] | None = None,
    deterministic: bool = False,
    seed: int | None = None,
    max_engines: int | None = None,
) -> int:
    """Run one guest (or restore one) on the terminal; return the process exit status.

    ``restore`` names a snapshot file; ``overrides`` are what the caller names for
    it (block file, gdb address, limits): a snapshot opens nothing by itself.
    ``deterministic``, ``seed`` and ``max_engines``: see :class:`~supervisor.host.Supervisor`.
    """
    async with Supervisor(deterministic=deterministic, seed=seed, max_engines=max_engines) as sup:
        say_seed(sup)
        if restore is not None:
            try:
                snap = Snapshot.load(restore)
                guest = await sup.restore(snap, **(overrides or {}))
            except (ValueError, OSError) as exc:  # StateError, ConfigError, ImageError ...
                message = _os_message(exc) if isinstance(exc, OSError) else str(exc)
                raise BadInput(cannot_restore(restore, message)) from None
        else:
            assert config is not None
            await publish_ports(sup, config, publish or [])
            guest = await launch(sup, config)
        print_gdb_address(guest)
        try:
            result = await guest.wait()
        except asyncio.CancelledError:
            await guest.kill("interrupted")
            raise
        except Exception as exc:  # a snapshot whose contents cannot be restored
            if restore is None:
                raise
            raise BadInput(cannot_restore(restore, f"{type(exc).__name__}: {exc}")) from None
    if stdout_closed():  # the reader went away (run ... | head): end quietly, like other tools
        _drop_stdout()
        return EXIT_STDOUT_CLOSED
    return exit_status(guest.name, result)


def run_recorded(config: GuestConfig | None, args: argparse.Namespace) -> Coroutine[Any, Any, int]:
    """``run --record FILE`` or ``run --replay FILE`` (docs/determinism.md, "Record and
    replay"), of ``config``'s guest or of ``--restore``'s snapshot (``config`` None);
    everything is checked, the recording included, before anything runs."""
    from . import replay
    from .guestctl import snapshot_config

    snap = None
    overrides: dict[str, Any] = {}
    if config is None:
        overrides = restore_overrides(args)
        try:
            snap = Snapshot.load(args.restore)
            config = snapshot_config(snap, **overrides)
        except (ValueError, OSError) as exc:
            message = _os_message(exc) if isinstance(exc, OSError) else str(exc)
            raise BadInput(cannot_restore(args.restore, message)) from None
    recordable(config)
    recording = None
    if args.replay:
        if args.publish:
            raise BadInput("--replay feeds the recorded connections: no --publish")
        if args.seed is not None:
            raise BadInput("--replay takes the seed from the recording: not with --seed")
        try:
            recording = replay.load(args.replay, config, args.restore)
        except replay.ReplayError as exc:
            raise BadInput(str(exc)) from None
        seed: int | None = recording.seed
    else:
        folder = Path(args.record).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise BadInput(
                f"{args.record}: cannot write there (no such directory, or not writable)"
            )
        seed = args.seed
        if args.publish and not config.net:
            raise BadInput("--publish needs --net")
        specs = [publish_spec(spec) for spec in args.publish]
    start = None if snap is None else (args.restore, snap, overrides)
    return _run_recorded(config, seed, args.record, recording, specs if args.record else [], start)


async def _run_recorded(
    config: GuestConfig,
    seed: int | None,
    path: str | None,
    recording: Any,
    publish: list[tuple[str, int, int]],
    start: tuple[str, Snapshot, dict[str, Any]] | None,
) -> int:
    from . import replay

    async with Supervisor(deterministic=True, seed=seed) as sup:
        say_seed(sup)
        sim = sup.device.virtual
        assert sim is not None
        connections = replay.Connections(sup.net, config.display_name)
        recorder = None
        feeding = None
        servers: list[asyncio.Server] = []
        if recording is None:
            recorder = replay.Recorder(sim, config, None if start is None else start[0])
            for addr, host_port, guest_port in publish:
                serve = functools.partial(_record_connection, recorder, connections, guest_port)
                try:
                    servers.append(await asyncio.start_server(serve, addr, host_port))
                except OSError as exc:
                    raise BadInput(
                        f"--publish {addr}:{host_port}:{guest_port}: {_os_message(exc)}"
                    ) from None
        if start is None:
            guest = await launch(sup, config.model_copy(update={"console": "capture"}))
        else:
            restore, snap, overrides = start
            try:
                guest = await sup.restore(snap, **{**overrides, "console": "capture"})
            except (ValueError, OSError) as exc:
                message = _os_message(exc) if isinstance(exc, OSError) else str(exc)
                raise BadInput(cannot_restore(restore, message)) from None
        if recording is not None:
            replay.replay(recording, sim, guest, connections)
        else:
            assert recorder is not None
            feeding = asyncio.create_task(_record_stdin(recorder, guest))

        async def show(lines: AsyncIterable[str], out: TextIO) -> None:
            async for line in lines:
                print(line, file=out, flush=True)

        shown = asyncio.gather(show(guest.console, sys.stdout), show(guest.stderr, sys.stderr))
        try:
            result = await guest.wait()
            await shown
        finally:
            if feeding is not None:
                feeding.cancel()
            for server in servers:
                server.close()
            await connections.aclose()
            if recorder is not None and path is not None:
                recorder.save(path)
    return exit_status(guest.name, result)


def recordable(config: GuestConfig) -> None:
    """BadInput for a guest whose run takes input that a recording cannot keep."""
    if config.allow_outbound:
        raise BadInput(
            "--allow-outbound reaches the real network, which is not recorded: "
            "not with --record or --replay"
        )


def swarm_recording(config: GuestConfig, args: argparse.Namespace) -> dict[str, Any]:
    """``swarm --record FILE`` / ``--replay FILE``: the Supervisor's ``deterministic``
    and ``seed``.  A swarm takes no host input (no stdin, ports or files), so its
    recording is the seed and what it is checked against (image, configuration, the
    number of guests), written before anything runs; a replay checks them and takes
    the seed (BadInput, one line, for a file that does not match)."""
    from . import replay

    recordable(config)
    if args.replay:
        if args.seed is not None:
            raise BadInput("--replay takes the seed from the recording: not with --seed")
        try:
            recording = replay.load(args.replay, config, guests=args.n)
        except replay.ReplayError as exc:
            raise BadInput(str(exc)) from None
        if recording.inputs:
            raise BadInput(f"{args.replay}: a recording of a run with input, not of a swarm")
        return {"deterministic": True, "seed": recording.seed}
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(64)
    image, rest = replay.digests(config)
    recording = replay.Recording(
        seed=seed,
        image_sha256=image,
        config_sha256=rest,
        files_sha256=replay.files_digest(config),
        emulator=replay.emulator(),
        guests=args.n,
    )
    try:
        replay.save(recording, args.record)
    except OSError as exc:
        raise BadInput(f"{args.record}: {_os_message(exc)}") from None
    return {"deterministic": True, "seed": seed}


async def _record_connection(
    recorder: Any,
    connections: Any,
    guest_port: int,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """A host connection to a published port, recorded: its opening, what the host
    sends and its end go to the guest through the recorder; what the guest sends
    back is written to the host as it comes (never waiting for the host to read)."""
    from . import replay

    conn = recorder.connect(
        connections, guest_port, functools.partial(replay.write_to, writer), writer.close
    )
    try:
        while data := await reader.read(1 << 16):
            recorder.send(connections, conn, data)
    except OSError:
        pass  # a reset ends the host's input like a close
    recorder.send(connections, conn, b"")


async def _record_stdin(recorder: Any, guest: Guest) -> None:
    """Standard input to ``guest`` through the recorder (the end of input too)."""
    async for chunk in stdin_source():
        recorder.feed(guest, chunk)
    recorder.feed(guest, b"")


def cannot_restore(path: str, message: str) -> str:
    """The one line for a snapshot file that cannot be restored (the file named once)."""
    detail = " ".join(message.removeprefix(f"{path}: ").split())
    return f"cannot restore {path}: {detail}"


def exit_status(name: str, result: Exit) -> int:
    """The process exit status for ``result`` (and the stderr line for a death)."""
    if result.died or result.exit_status is None:
        print(f"supervisor: {name} died: {result.reason}", file=sys.stderr)
        return EXIT_DIED
    return min(result.exit_status, 255)


async def snapshot_to_file(
    config: GuestConfig, path: str, lines: int | None, seconds: float | None
) -> int:
    """Run ``config`` (console lines on stdout) until the point asked, then save a snapshot."""
    folder = Path(path).parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise BadInput(f"{path}: cannot write there (no such directory, or not writable)")
    async with Supervisor() as sup:
        guest = await launch(sup, config)
        seen = 0
        if lines is not None and lines > 0:
            async for line in guest.console:
                print(line, flush=True)
                seen += 1
                if seen >= lines:
                    break
        elif seconds is not None:
            await asyncio.wait({asyncio.ensure_future(guest.wait())}, timeout=seconds)
        try:
            snap = await guest.snapshot()
        except ValueError as exc:  # SnapshotError: it ended first
            why = f" ({(await guest.wait()).reason})" if guest.done else ""
            print(f"supervisor: no snapshot: {exc}{why}", file=sys.stderr)
            return EXIT_DIED
        try:
            snap.save(path)
        except OSError as exc:
            raise BadInput(_os_message(exc)) from None
        finally:
            await guest.kill("snapshot taken")
    print(f"supervisor: snapshot of {guest.name} saved to {path}", file=sys.stderr)
    return 0


def _swarm_progress(err: Any, *, shown: bool) -> Any:
    """The swarm's progress bar on ``err`` (a rich Console on stderr): drawn only when
    ``shown`` and stderr is a terminal, and gone once the swarm ends."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]swarm"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=err,
        disable=not shown or not sys.stderr.isatty(),
        transient=True,
    )


async def run_swarm(
    config: GuestConfig,
    n: int,
    gdb: str | None = None,
    gdb_guest: int = 0,
    console: str = "none",
    tail_lines: int = 3,
    max_alive: int | None = None,
    launch_rate: float | None = None,
    deterministic: bool = False,
    seed: int | None = None,
    max_engines: int | None = None,
    shard: shards.Shard | None = None,
) -> int:
    """Run ``n`` copies of ``config``; print progress and a summary; return the exit status.

    ``console``: ``"none"`` ignores guest output; ``"prefix"`` prints each line on
    stdout as ``NAME: LINE`` as it arrives (stderr lines on stderr); ``"tail"`` keeps the last
    ``tail_lines`` lines of each guest and prints them in a table at the end.
    At most ``max_alive`` guests run at once (default: as many as the host's memory
    holds at what a guest is measured to cost, :class:`~supervisor.admission.Admission`);
    the others are launched as earlier ones end, so memory stays bounded and progress
    shows from the start.  ``launch_rate`` caps launches per second, so that a
    hundred thousand start-ups do not starve the guests already running.
    ``deterministic`` (and ``seed``): every guest is launched before any runs, on one
    virtual clock and a seeded schedule, so the same seed prints the same lines in
    the same order (``max_alive`` and ``launch_rate`` do not apply).
    ``shard``: run only that shard's guests (:mod:`supervisor.shards`; ``max_alive`` is
    its share) and report to its pipe instead of printing the tables.
    """
    from rich.console import Console as RichConsole

    err = RichConsole(file=sys.stderr)
    progress = _swarm_progress(err, shown=shard is None)
    reporter = shards.Reporter(shard) if shard is not None else None
    if reporter is not None:
        shards.stop_when_orphaned()
    indexes = shard.guests(n) if shard is not None else range(n)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    tails: dict[str, deque[str]] = {}
    outcomes: dict[str, str] = {}
    totals = {"blocks": 0, "cpu": 0.0}
    rss = _RssMeter()
    stdout_gone = asyncio.Event()  # a --console prefix write found the reader gone

    async def pump(guest: Guest) -> None:
        tail = tails[guest.name] = deque(maxlen=tail_lines)

        async def stream(lines: AsyncIterable[str], out: TextIO, mark: str) -> None:
            async for line in lines:
                if console == "prefix":
                    try:
                        print(f"{guest.name}: {line}", file=out, flush=True)
                    except BrokenPipeError:
                        if out is sys.stdout:
                            stdout_gone.set()
                        return
                else:
                    tail.append(mark + line)

        # stdout lines on stdout, stderr lines on stderr (tail: marked "stderr: ").
        await asyncio.gather(
            stream(guest.console, sys.stdout, ""), stream(guest.stderr, sys.stderr, "stderr: ")
        )

    started = time.perf_counter()
    if deterministic:
        max_alive = n  # every guest launched before any runs: they start at virtual 0
    admission = Admission(max_alive=max_alive, shares=1 if shard is None else shard.count)
    launched = 0
    async with (
        Collector() as collector,
        Supervisor(
            keep_ended=False, deterministic=deterministic, seed=seed, max_engines=max_engines
        ) as sup,
    ):
        say_seed(sup)
        sim = sup.device.virtual
        with progress:
            bar = progress.add_task("swarm", total=n, state="starting")

            def show(launched: int) -> None:
                if reporter is not None:  # (a shard: its parent shows launches as they go)
                    reporter.progress(launched, counts)
                    return
                state = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                progress.update(bar, state=f"{launched} launched; {state}")

            async def one(guest: Guest, pumping: asyncio.Task[None] | None) -> None:
                """A guest's end: its outcome in the table (started once it ended)."""
                try:
                    result = await guest.wait()
                    if pumping is not None:
                        await pumping
                finally:
                    admission.ended()
                    collector.ended(admission.alive, more=launched < len(indexes))
                outcome = outcomes[guest.name] = _outcome(result)
                counts[outcome] += 1
                if result.died:
                    reasons[result.reason] += 1
                stats = guest.stats
                totals["blocks"] += stats.blocks
                totals["cpu"] += stats.run_time
                rss.ended()
                progress.advance(bar)
                if reporter is not None:
                    reporter.progress(launched, counts)

            async def launch_all() -> None:
                nonlocal launched
                # A running guest holds no task of the swarm's (a callback on its end
                # starts one), so a hundred thousand idle guests cost no extra tasks.
                ending: set[asyncio.Task[None]] = set()
                pumps: set[asyncio.Task[None]] = set()
                failures: list[BaseException] = []
                all_ended = Flag()
                ended = 0

                def finished(task: asyncio.Task[None]) -> None:
                    nonlocal ended
                    ending.discard(task)
                    ended += 1
                    error = None if task.cancelled() else task.exception()
                    if error is not None:
                        failures.append(error)
                    if ended == len(indexes) or failures:
                        all_ended.set()

                def on_end(guest: Guest, pumping: asyncio.Task[None] | None) -> None:
                    if interrupted:  # (stopped, not ended: the table counts it so)
                        admission.ended()
                        return
                    task = asyncio.create_task(one(guest, pumping))
                    ending.add(task)
                    task.add_done_callback(finished)

                start = sim.hold() if sim is not None else None
                try:
                    for i in indexes:
                        await admission.admit()
                        if launch_rate:
                            delay = started + i / launch_rate - time.perf_counter()
                            if delay > 0:
                                await asyncio.sleep(delay)
                        name = f"{config.display_name}-{i}"
                        update = {"name": name, "gdb": gdb if i == gdb_guest else None}
                        guest = await launch(sup, config.model_copy(update=update))
                        if i == gdb_guest:
                            print_gdb_address(guest)
                        pumping = None
                        if console != "none":
                            pumping = asyncio.create_task(pump(guest))
                            pumps.add(pumping)
                            pumping.add_done_callback(pumps.discard)
                        guest.when_done(functools.partial(on_end, guest, pumping))
                        launched += 1
                        rss.launched()
                        show(launched)
                    if reporter is not None:  # (the last launches: reports are paced)
                        reporter.progress(launched, counts, force=True)
                    if start is not None:
                        start.release()
                    if ended < len(indexes):
                        await all_ended.wait()
                    if failures:
                        raise failures[0]
                finally:
                    if start is not None:
                        start.release()
                    for task in (*ending, *pumps):
                        task.cancel()

            interrupted = False
            work = asyncio.ensure_future(launch_all())
            gone = asyncio.ensure_future(stdout_gone.wait())
            try:
                await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:  # Ctrl-C or SIGTERM: stop, then say what ran
                interrupted = True
                # Every guest at once, before the loop's next turn would run them again:
                # their ends then come together as the Supervisor closes.
                sup.kill_all()
            finally:
                gone.cancel()
                if not work.done():
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
            if stdout_gone.is_set():
                progress.stop()
            elif not interrupted:
                work.result()  # BadInput from a launch
            elif not work.cancelled():
                work.exception()  # (a launch failed as the stop came: the stop is what is said)
        # Leaving the Supervisor kills the guests still running.
        wall = time.perf_counter() - started
        virtual_s = sim.time() if sim is not None else None
    if stdout_gone.is_set():  # the reader went away (swarm ... | head): end quietly
        _drop_stdout()
        return EXIT_STDOUT_CLOSED
    if reporter is not None:
        reporter.progress(launched, counts, force=True)
        for name, lines in tails.items():
            index = int(name.rpartition("-")[2])
            reporter.send("tail", [index, name, outcomes.get(name, "-"), list(lines)])
        done = {
            "counts": dict(counts), "reasons": dict(reasons), "blocks": int(totals["blocks"]),
            "cpu": totals["cpu"], "launched": launched, "most_alive": rss.most_alive,
            "peak": rss.peak, "base": rss.base, "stopped": interrupted,
        }  # fmt: skip
        reporter.send("done", done)
        reporter.close()
        if interrupted:
            raise asyncio.CancelledError
        return 0 if counts["finished"] == len(indexes) else 1
    _summary(
        n, counts, reasons, int(totals["blocks"]), totals["cpu"], wall, rss, config.cpus,
        virtual_s,
    )  # fmt: skip
    if interrupted:
        stopped = launched - sum(counts.values())
        print(f"interrupted: {stopped} guests stopped, {n - launched} never launched", flush=True)
        raise asyncio.CancelledError  # the exit status says how it was interrupted
    if console == "tail":
        _tails(tails, outcomes)
    return 0 if counts["finished"] == n else 1


async def run_sharded_swarm(
    argv: Sequence[str], n: int, processes: int, console: str, tail_lines: int, cpus: int
) -> int:
    """``swarm --processes N`` (N > 1): the swarm ``argv`` in N shard processes
    (:mod:`supervisor.shards`), with :func:`run_swarm`'s progress, table, output and
    exit status."""
    from rich.console import Console as RichConsole

    progress = _swarm_progress(RichConsole(file=sys.stderr), shown=True)
    started = time.perf_counter()
    with progress:
        bar = progress.add_task("swarm", total=n, state="starting")

        def show(launched: int, counts: Counter[str]) -> None:
            state = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            progress.update(bar, completed=counts.total(), state=f"{launched} launched; {state}")

        tally = await shards.run(argv, processes, show)
    wall = time.perf_counter() - started
    if tally.error is not None:
        raise BadInput(tally.error)
    if tally.stdout_gone:
        _drop_stdout()
        return EXIT_STDOUT_CLOSED
    for lost in tally.lost:
        print(f"supervisor: {lost}", file=sys.stderr)
    memory = tally.memory(_rss_kib("VmHWM"))
    _summary(n, tally.counts, tally.reasons, tally.blocks, tally.cpu, wall, memory, cpus,
             processes=processes)  # fmt: skip
    if tally.stopped:
        stopped = tally.launched - tally.counts.total()
        print(
            f"interrupted: {stopped} guests stopped, {n - tally.launched} never launched",
            flush=True,
        )
        raise asyncio.CancelledError  # the exit status says how it was interrupted
    if console == "tail":
        ordered = sorted(tally.tails.items())
        _tails(
            {name: deque(lines) for _i, (name, _o, lines) in ordered},
            {name: outcome for _i, (name, outcome, _l) in ordered},
        )
    return 0 if tally.counts["finished"] == n else 1


def swarm_processes(args: argparse.Namespace, deterministic: bool) -> int:
    """How many processes a swarm runs in (:mod:`supervisor.shards`): ``--processes``,
    or by default one per CPU available for large swarms; one, and no more, for a
    deterministic swarm (one virtual clock) and one served to gdb."""
    one_process = "--deterministic, --record or --replay" if deterministic else None
    if args.gdb is not None:
        one_process = "--gdb"
    if args.processes is None:
        processes = 1 if one_process else shards.default_processes(args.n)
    elif one_process and args.processes > 1:
        raise BadInput(f"--processes: a swarm with {one_process} runs in one process")
    else:
        processes = min(args.processes, args.n)
    return min(processes, args.max_alive or processes)


def _drop_stdout() -> None:
    """Point standard output at /dev/null: nothing left to flush into a closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class _RssMeter:
    """Resident memory for the swarm's table: the process's peak (the kernel's VmHWM)
    and, per guest, the growth over the start divided by the most guests alive at once."""

    def __init__(self) -> None:
        self.base = _rss_kib("VmRSS")
        self.alive = 0
        self.most_alive = 0

    def launched(self) -> None:
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)

    def ended(self) -> None:
        self.alive -= 1

    @property
    def peak(self) -> int:
        """Peak resident memory of the process, KiB."""
        return _rss_kib("VmHWM")

    @property
    def per_guest(self) -> float:
        """KiB per guest at most (the peak's growth over the most guests alive at once)."""
        return max(0, self.peak - self.base) / max(1, self.most_alive)


def _rss_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def run_cluster_swarm(config: GuestConfig, n: int, args: argparse.Namespace) -> int:
    """``swarm --cluster``: ``n`` copies on Ray workers; the table plus a row per worker."""
    if args.cluster == "ray":
        address = None
    elif args.cluster in ("local", "auto") or re.fullmatch(
        r"(ray://)?[\w.-]+:\d{1,5}|(ray://)?\[[\w:]+\]:\d{1,5}", args.cluster
    ):
        address = args.cluster
    else:
        raise BadInput(
            "--cluster must be 'ray', 'local', 'auto', HOST:PORT or ray://HOST:PORT, "
            f"not {args.cluster!r}"
        )
    if args.gdb is not None:
        raise BadInput("--gdb cannot be used with --cluster")
    if args.workers is not None and args.workers < 1:
        raise BadInput("--workers must be at least 1")
    if args.checkpoint_every is not None and not args.checkpoint_every > 0:
        raise BadInput("--checkpoint-every must be a positive number of seconds")
    try:
        from .cluster import Cluster
    except ImportError as exc:
        raise BadInput(str(exc)) from None
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    cluster = Cluster(address, args.workers, args.checkpoint_every)
    try:
        cl = await cluster.__aenter__()
    except (ConnectionError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"cannot use Ray at {args.cluster}: {reason}") from None
    try:
        started = time.perf_counter()  # the workers are up: time the guests only
        guests = []
        for i in range(n):
            named = config.model_copy(update={"name": f"{config.display_name}-{i}"})
            try:
                guests.append(await cl.launch(named))
            except (ImageError, ValueError) as exc:
                raise BadInput(str(exc)) from None
        for next_done in asyncio.as_completed([g.wait() for g in guests]):
            result = await next_done
            counts[_outcome(result)] += 1
            if result.died:
                reasons[result.reason] += 1
        wall = time.perf_counter() - started
        stats = [g.stats for g in guests]
        workers = [
            (w.name, _node(w.node, w.node_id), str(w.pid or "-"), w.placed, _alive(w.alive))
            for w in cl.workers
        ]
    finally:
        await cl.aclose()
    _summary(
        n, counts, reasons, sum(s.blocks for s in stats), sum(s.run_time for s in stats), wall,
        cpus=config.cpus,
    )  # fmt: skip
    _workers_table(workers)
    return 0 if counts["finished"] == n else 1


def _alive(alive: bool) -> str:
    return "alive" if alive else "lost"


def _node(address: str | None, node_id: str | None) -> str:
    """A worker's node: its address and the start of Ray's id (nodes may share an address)."""
    return f"{address or '-'} {node_id[:8]}" if node_id else address or "-"


def _workers_table(rows: list[tuple[str, str, str, int, str]]) -> None:
    from rich.console import Console as RichConsole
    from rich.table import Table

    table = Table(title="workers")
    for column in ("worker", "node", "pid", "guests placed", "state"):
        table.add_column(column, justify="right")
    for name, node, pid, placed, state in rows:
        table.add_row(name, node, pid, str(placed), state)
    RichConsole(file=sys.stdout).print(table)


def _outcome(result: Exit) -> str:
    if result.died:
        return "died"
    return "finished" if result.exit_status == 0 else "failed"


def _summary(
    n: int,
    counts: Counter[str],
    reasons: Counter[str],
    blocks: int,
    cpu: float,
    wall: float,
    rss: _RssMeter | shards.Memory | None = None,
    cpus: int = 1,
    virtual_s: float | None = None,
    processes: int = 1,
) -> None:
    """The swarm's table; ``cpu time`` sums every CPU of every guest.  ``virtual_s``: a
    deterministic swarm's virtual time (its blocks are counted).  ``processes``: the
    swarm ran in that many (its peak RSS adds theirs up)."""
    from rich.console import Console as RichConsole
    from rich.table import Table

    title = f"swarm of {n}" + (f", {cpus} CPUs each" if cpus > 1 else "")
    table = Table(title=title + (f", in {processes} processes" if processes > 1 else ""))
    columns = ["finished", "failed", "died"]
    row = [str(counts["finished"]), str(counts["failed"]), str(counts["died"])]
    from . import _slicing

    # Only the block-hook path counts every block (deterministic mode runs on it).
    counted = _slicing.COUNTS_BLOCKS or virtual_s is not None
    if counted:
        columns += ["blocks", "blocks/s"]
        row += [f"{blocks:,}", f"{blocks / wall:,.0f}" if wall > 0 else "-"]
    columns += ["cpu time", "wall time"]
    row += [f"{cpu:.2f}s", f"{wall:.2f}s"]
    if rss is not None:
        columns += ["peak alive", "peak RSS", "RSS/guest"]
        row += [f"{rss.most_alive:,}", f"{rss.peak / 1024:,.0f} MiB", f"{rss.per_guest:,.0f} KiB"]
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(*row)
    out = RichConsole(file=sys.stdout, width=None if sys.stdout.isatty() else 160)
    out.print(table)
    if not counted:
        why = f"{_slicing.ENV}=hook counts them" if _slicing.NATIVE else "no native slicer"
        out.print(f"blocks: not counted ({why})", highlight=False)
    if virtual_s is not None:
        out.print(f"virtual time: {virtual_s:.9f} s (deterministic)", highlight=False)
    for reason, count in reasons.most_common(5):
        out.print(f"died x{count}: {reason}", highlight=False, markup=False)


def _tails(tails: dict[str, deque[str]], outcomes: dict[str, str]) -> None:
    from rich.console import Console as RichConsole
    from rich.table import Table
    from rich.text import Text

    table = Table(title="last console lines")
    for column in ("guest", "outcome", "console"):
        table.add_column(column)
    for name, lines in tails.items():
        table.add_row(name, outcomes.get(name, "-"), Text("\n".join(lines)))
    RichConsole(file=sys.stdout).print(table)


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def build_image(args: argparse.Namespace) -> int:
    """``build``: compile and link a C guest; compiler output goes to stderr.

    SIGTERM ends it like Ctrl-C: the compiler's process group is killed and the
    build's temporary directory removed before the exit (143, or 130 for Ctrl-C).
    """
    from . import sdk
    from .config import parse_size

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        stack = parse_size(args.stack_size) if args.stack_size else None
        options = sdk.BuildOptions(
            optimize=args.optimize,
            debug=args.debug,
            include_dirs=args.include_dirs,
            defines=args.defines,
            warnings=args.warnings,
            stack_size=stack,
        )
        timeout = sdk.DEFAULT_TIMEOUT if args.timeout is None else args.timeout
        out = sdk.build(args.sources, args.output, options, timeout=timeout, progress=sys.stderr)
    except sdk.BuildTimeout as exc:
        print(f"supervisor: error: {exc} (--timeout)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except sdk.BuildError as exc:
        print(str(exc), file=sys.stderr)
        print("supervisor: error: build failed", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (sdk.ToolchainError, FileNotFoundError, ValueError) as exc:
        print(f"supervisor: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("supervisor: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("supervisor: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"built {out} ({out.stat().st_size} bytes)", file=sys.stderr)
    return 0


class Terminated(BaseException):
    """SIGTERM arrived: unwind (cleanup runs) and exit with :data:`EXIT_TERMINATED`."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def run_coroutine(
    coro: Coroutine[Any, Any, int], loop: str = "asyncio", quiet: bool = False
) -> int:
    """Run a command's coroutine on a fresh ``loop``; return its exit status.

    The first Ctrl-C or SIGTERM cancels it (guests are killed, files closed, a swarm
    prints its table); then the process exits 130 (Ctrl-C) or 143 (SIGTERM).  A second
    one ends the process at once with that status, whatever is still running.
    ``quiet``: say nothing on stderr when stopped (a swarm's shard: its parent says it).
    """
    signals = _Signals()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with _WakeOnSignals() as wake, asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
            wake.watch(runner.get_loop())  # also while the Runner closes: cleanup can hang
            return runner.run(_second_interrupt_exits(coro, signals))
    except (KeyboardInterrupt, asyncio.CancelledError):
        if not signals.terminated:
            raise
        if not quiet:
            print("supervisor: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _WakeOnSignals:
    """Every signal wakes the event loop from its wait, so that its handler runs at once.

    CPython runs a signal's Python handler in the main thread, between bytecodes.  A
    signal that arrives after the loop's last bytecode and before its ``epoll_wait``
    (or that the kernel gives another thread) interrupts no wait: its handler would
    run at the loop's next event, which for a loop with nothing to do may be hours
    away, and Ctrl-C would seem ignored.  The C-level handler also writes the signal's
    number to the wakeup fd: this socket pair's, whose other end the loop watches.
    (uvloop sets a wakeup fd of its own while it runs and gives this one back after.)
    A no-op outside the main thread, where no handler is installed.
    """

    def __init__(self) -> None:
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._previous = -1

    def __enter__(self) -> _WakeOnSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._pair = socket.socketpair()
        for end in self._pair:
            end.setblocking(False)
        self._previous = signal.set_wakeup_fd(self._pair[1].fileno(), warn_on_full_buffer=False)
        return self

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drain the wakeup bytes in ``loop``: readable, the socket ends its wait."""
        if self._pair is not None:
            loop.add_reader(self._pair[0].fileno(), self._drain)

    def _drain(self) -> None:
        assert self._pair is not None
        with contextlib.suppress(OSError):  # (empty: BlockingIOError)
            self._pair[0].recv(4096)

    def __exit__(self, *exc: object) -> None:
        if self._pair is None:
            return
        signal.set_wakeup_fd(self._previous)  # the loop is closed: it watches no more
        for end in self._pair:
            end.close()
        self._pair = None


class _Signals:
    """Which signal stopped a command: SIGTERM, or else Ctrl-C."""

    def __init__(self) -> None:
        self.terminated = False


async def _second_interrupt_exits(coro: Coroutine[Any, Any, int], signals: _Signals) -> int:
    if threading.current_thread() is not threading.main_thread():
        return await coro
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    first = signal.getsignal(signal.SIGINT)  # asyncio.Runner's (unless SIGINT is ignored)

    def no_more_cleanup() -> None:
        signal.signal(signal.SIGTERM, _exit_now)
        if callable(first):
            signal.signal(signal.SIGINT, _exit_now)

    def on_term(signum: int, frame: FrameType | None) -> None:
        signals.terminated = True
        no_more_cleanup()
        # As asyncio.Runner does for Ctrl-C: cancelled here, the task's next step comes
        # in the loop's next turn, not the one after (a turn of many guests is long).
        task.cancel()
        loop.call_soon_threadsafe(lambda: None)  # (wakes a loop waiting in select)

    signal.signal(signal.SIGTERM, on_term)
    if callable(first):

        def on_first(signum: int, frame: FrameType | None) -> None:
            no_more_cleanup()
            first(signum, frame)  # cancels the task; the Runner then raises KeyboardInterrupt

        signal.signal(signal.SIGINT, on_first)
    return await coro


def _exit_now(signum: int, frame: FrameType | None) -> None:
    """The second Ctrl-C (or SIGTERM): no more cleanup (block writes are already synced
    per request)."""
    terminated = signum == signal.SIGTERM
    shards.kill_all()
    with contextlib.suppress(OSError):
        os.write(2, b"supervisor: terminated\n" if terminated else b"supervisor: interrupted\n")
    os._exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command, return the exit status (never raises for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # argparse has printed its line (or the help)
        return done.code if isinstance(done.code, int) else 2
    if args.command == "build":
        return build_image(args)
    try:
        coro: Coroutine[Any, Any, int]
        engines = engine_args(args) if args.command in ("run", "swarm") else {}
        if args.command == "run" and args.restore and (args.record or args.replay):
            coro = run_recorded(None, args)
        elif args.command == "run" and args.restore:
            if args.publish:
                raise BadInput("--publish is for a launched guest, not --restore")
            coro = run_one(
                None,
                args.restore,
                restore_overrides(args),
                **deterministic_args(args),
                **engines,
            )
        elif args.command == "run" and (args.record or args.replay):
            coro = run_recorded(run_config(args), args)
        elif args.command == "run":
            coro = run_one(
                run_config(args), publish=args.publish, **deterministic_args(args), **engines
            )
        elif args.command == "snapshot":
            fields = {
                "image": args.image,
                "memory": args.memory,
                "cmdline": args.cmdline,
                "env": env_option(args.env),
                "cpus": args.cpus,
                **limit_fields(args),
            }
            config = GuestConfig.build(**{k: v for k, v in fields.items() if v is not None})
            coro = snapshot_to_file(config, args.output, args.after_lines, args.after)
        else:
            if args.gdb is not None and not 0 <= args.gdb_guest < args.n:
                raise BadInput(f"--gdb-guest {args.gdb_guest} is not one of the {args.n} guests")
            if args.gdb is None and args.gdb_guest != 0:
                raise BadInput("--gdb-guest needs --gdb HOST:PORT")
            fields = {
                "image": args.image,
                "memory": args.memory,
                "cmdline": args.cmdline,
                "env": env_option(args.env),
                "cpus": args.cpus,
                **limit_fields(args),
            }
            config = GuestConfig.build(
                console="null" if args.console == "none" else "capture",
                **{k: v for k, v in fields.items() if v is not None},
            )
            deterministic = bool(args.deterministic or args.record or args.replay)
            if deterministic and args.cluster is not None:
                raise BadInput("--deterministic runs on one device: not with --cluster")
            if deterministic and (args.max_alive or args.launch_rate):
                raise BadInput("--deterministic launches every guest at once: "
                               "not with --max-alive or --launch-rate")  # fmt: skip
            if args.record or args.replay:  # checked, or written, before anything runs
                determinism = swarm_recording(config, args)
            else:
                determinism = deterministic_args(args)
            if args.cluster is not None:
                if engines:
                    raise BadInput("--max-engines is for one device: not with --cluster")
                if args.processes is not None:
                    raise BadInput("--processes is for a swarm on this machine "
                                   "(--workers with --cluster)")  # fmt: skip
                if args.console != "none":
                    raise BadInput("--console is not supported with --cluster")
                coro = run_cluster_swarm(config, args.n, args)
            elif args.workers is not None or args.checkpoint_every is not None:
                raise BadInput("--workers and --checkpoint-every need --cluster")
            elif args.shard is not None:
                max_alive = args.max_alive
                if max_alive is not None:
                    max_alive = shards.share(max_alive, args.shard.index, args.shard.count)
                coro = run_swarm(
                    config, args.n, None, 0, args.console, args.tail_lines, max_alive,
                    args.launch_rate, shard=args.shard, **engines,
                )  # fmt: skip
            elif (processes := swarm_processes(args, deterministic)) > 1:
                argv += ["--processes", "1"]
                coro = run_sharded_swarm(
                    argv, args.n, processes, args.console, args.tail_lines, config.cpus
                )
            else:
                coro = run_swarm(
                    config, args.n, args.gdb, args.gdb_guest, args.console, args.tail_lines,
                    args.max_alive, args.launch_rate, **determinism, **engines,
                )  # fmt: skip
        return run_coroutine(coro, args.loop, quiet=args.command == "swarm" and bool(args.shard))
    except (BadInput, ConfigError) as exc:
        if args.command == "swarm" and args.shard is not None:  # the parent says it once
            shards.Reporter(args.shard).send("error", str(exc))
            return EXIT_BAD_INPUT
        print(f"supervisor: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("supervisor: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
