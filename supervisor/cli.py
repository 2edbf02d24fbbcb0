"""``python -m supervisor``: run one guest on the terminal, or a swarm of them.

``run IMAGE``
    The guest's console is the terminal: its output goes to stdout, stdin is
    its input (EOF on stdin is EOF on the console).  Exit status: the guest's
    power-off status (values over 255 become 255); a guest that died (killed
    by the Host, crashed, too many reboots) prints ``supervisor: <name> died:
    <reason>`` on stderr and exits 1.  Ctrl-C kills the guest and exits 130.
``run IMAGE --gdb HOST:PORT`` / ``run --restore FILE``
    Hold the guest at its first instruction and serve gdb on HOST:PORT (port 0:
    any; the address is printed on stderr).  ``--restore`` continues a snapshot.
``snapshot IMAGE -o FILE --after-lines N`` (or ``--after SECONDS``)
    Run the guest (console on stdout), snapshot it at that point, save, stop.
``build SOURCES... -o OUT [-O2] [-g] [-I DIR] [-D NAME[=VALUE]] [-W...]``
    Compile C (and ``.S``) sources into a guest image (ELF32) linked with the
    guest runtime and musl (``supervisor.sdk``; needs the ``sdk`` extra).
``swarm -n N IMAGE``
    N copies with no console; live progress on stderr when it is a terminal,
    then a summary table on stdout.  Exit status 0 when every guest powered
    off with status 0, else 1.
``swarm -n N IMAGE --cluster ray`` (or ``--cluster ray://HOST:PORT``)
    The same on Ray workers (supervisor.cluster; ``--workers``,
    ``--checkpoint-every SECONDS``), plus a table row per worker.

Bad input (missing file, not an image, bad size, bad config, bad option) is
one line ``supervisor: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn

from .config import ConfigError, GuestConfig
from .host import Exit, Guest, Supervisor
from .launcher.loader import ImageError
from .snapshot import Snapshot

EXIT_DIED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class BadInput(Exception):
    """Something the user gave us is unusable; the message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"supervisor: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m supervisor", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--memory", help="guest RAM, e.g. 16M (default 16M)")
        p.add_argument("--cmdline", help="guest command line (boot info page)")
        p.add_argument(
            "--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop"
        )
        p.add_argument("--max-blocks", type=int, help="kill a guest after this many blocks")
        p.add_argument(
            "--max-run-time", type=float, help="kill a guest after this many seconds of CPU"
        )
        p.add_argument("--console-rate", type=int, help="console output cap, bytes/second")
        p.add_argument(
            "--hibernate-after",
            metavar="SECONDS",
            help="free an idle guest's emulator after SECONDS (0: at once, off: never; "
            "default 1)",
        )

    run = sub.add_parser("run", help="run one guest on the terminal")
    run.add_argument("image", nargs="?", help="flat binary or ELF32 image")
    run.add_argument("--block", help="file backing the block device")
    run.add_argument("--readonly", action="store_true", help="make the block device read-only")
    run.add_argument("--config", help="GuestConfig as .toml or .json (options override it)")
    run.add_argument("--gdb", metavar="HOST:PORT", help="start held and serve gdb there")
    run.add_argument("--restore", metavar="FILE", help="continue the guest saved in FILE")
    common(run)

    snap = sub.add_parser("snapshot", help="run a guest and save a snapshot of it mid-run")
    snap.add_argument("image", help="flat binary or ELF32 image")
    snap.add_argument("-o", "--output", required=True, help="snapshot file to write")
    when = snap.add_mutually_exclusive_group(required=True)
    when.add_argument("--after-lines", type=int, help="once the console printed N lines")
    when.add_argument("--after", type=float, help="after SECONDS of wall time")
    common(snap)

    build = sub.add_parser("build", help="compile C guests into an image (needs the sdk extra)")
    build.add_argument("sources", nargs="+", help=".c / .S sources")
    build.add_argument("-o", "--output", required=True, help="image to write (ELF32)")
    build.add_argument("-O", dest="optimize", choices=["0", "1", "2", "3", "s", "z"])
    build.add_argument("-g", dest="debug", action="store_true", help="DWARF for gdb")
    build.add_argument("-I", dest="include_dirs", action="append", default=[], metavar="DIR")
    build.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME[=VALUE]")
    build.add_argument("-W", dest="warnings", action="append", default=[], metavar="WARNING")
    build.add_argument("--stack-size", help="the guest's stack, e.g. 256K (default 64K)")

    swarm = sub.add_parser("swarm", help="run N copies of a guest and summarize")
    swarm.add_argument("-n", type=int, default=10, help="how many guests (default 10)")
    swarm.add_argument("image", help="flat binary or ELF32 image")
    swarm.add_argument("--gdb", metavar="HOST:PORT", help="serve gdb for one guest")
    swarm.add_argument("--gdb-guest", type=int, default=0, help="that guest's index (default 0)")
    swarm.add_argument(
        "--console",
        choices=["none", "prefix", "tail"],
        default="none",
        help="guest output: none; prefix (every line on stdout as NAME: LINE); "
        "tail (the last lines of each guest in a table at the end)",
    )
    swarm.add_argument(
        "--tail-lines", type=int, default=3, help="lines per guest kept by --console tail"
    )
    swarm.add_argument(
        "--cluster",
        metavar="ray|ray://HOST:PORT",
        help="run on Ray workers: a local Ray ('ray') or the cluster at ray://HOST:PORT",
    )
    swarm.add_argument("--workers", type=int, help="with --cluster: how many (default: per CPU)")
    swarm.add_argument(
        "--checkpoint-every",
        type=float,
        metavar="SECONDS",
        help="with --cluster: checkpoint every guest this often (a lost worker costs no guest)",
    )
    common(swarm)
    return parser


def run_config(args: argparse.Namespace) -> GuestConfig:
    """The GuestConfig for ``run``: the --config file (if any) overridden by options."""
    fields: dict[str, Any] = {
        "image": args.image,
        "memory": args.memory,
        "block": args.block,
        "block_readonly": True if args.readonly else None,
        "cmdline": args.cmdline,
        "console": "stdio",
        "gdb": args.gdb,
        **limit_fields(args),
    }
    if args.config:
        return GuestConfig.load(args.config, **fields)
    if args.image is None:
        raise BadInput("run needs an IMAGE or --config FILE")
    return GuestConfig.build(**{k: v for k, v in fields.items() if v is not None})


def limit_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The GuestConfig limit settings given as options."""
    return {
        "max_blocks": args.max_blocks,
        "max_run_time": args.max_run_time,
        "console_rate": args.console_rate,
        "hibernate_after": args.hibernate_after,
    }


async def launch(sup: Supervisor, config: GuestConfig) -> Guest:
    """``sup.launch`` with the user's mistakes turned into :class:`BadInput`."""
    try:
        return await sup.launch(config)
    except (ImageError, ValueError) as exc:
        raise BadInput(str(exc)) from None
    except OSError as exc:
        raise BadInput(f"{exc.filename or config.block}: {exc.strerror or exc}") from None


async def run_one(
    config: GuestConfig | None, restore: str | None = None, gdb: str | None = None
) -> int:
    """Run one guest (or restore one) on the terminal; return the process exit status."""
    async with Supervisor() as sup:
        if restore is not None:
            try:
                guest = await sup.restore(Snapshot.load(restore), console="stdio", gdb=gdb)
            except (ValueError, OSError) as exc:
                raise BadInput(str(exc)) from None
        else:
            assert config is not None
            guest = await launch(sup, config)
        if guest.gdb is not None and guest.gdb.address is not None:
            host, port = guest.gdb.address
            print(f"supervisor: gdb server on {host}:{port}", file=sys.stderr, flush=True)
        try:
            result = await guest.wait()
        except asyncio.CancelledError:
            await guest.kill("interrupted")
            raise
    return exit_status(guest.name, result)


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
            print(f"supervisor: no snapshot: {exc}", file=sys.stderr)
            return EXIT_DIED
        snap.save(path)
        await guest.kill("snapshot taken")
    print(f"supervisor: snapshot of {guest.name} saved to {path}", file=sys.stderr)
    return 0


async def run_swarm(
    config: GuestConfig,
    n: int,
    gdb: str | None = None,
    gdb_guest: int = 0,
    console: str = "none",
    tail_lines: int = 3,
) -> int:
    """Run ``n`` copies of ``config``; print progress and a summary; return the exit status.

    ``console``: ``"none"`` ignores guest output; ``"prefix"`` prints each line on
    stdout as ``NAME: LINE`` as it arrives; ``"tail"`` keeps the last
    ``tail_lines`` lines of each guest and prints them in a table at the end.
    """
    from rich.console import Console as RichConsole
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = RichConsole(file=sys.stderr)
    progress = Progress(
        TextColumn("[bold]swarm"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=err,
        disable=not sys.stderr.isatty(),
        transient=True,
    )
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    tails: dict[str, deque[str]] = {}
    outcomes: dict[str, str] = {}

    async def pump(guest: Guest) -> None:
        tail = tails[guest.name] = deque(maxlen=tail_lines)
        async for line in guest.console:
            if console == "prefix":
                print(f"{guest.name}: {line}", flush=True)
            else:
                tail.append(line)

    started = time.perf_counter()
    async with Supervisor() as sup:
        guests = []
        pumps = []
        for i in range(n):
            update = {"name": f"{config.display_name}-{i}", "gdb": gdb if i == gdb_guest else None}
            named = config.model_copy(update=update)
            guests.append(await launch(sup, named))
            if console != "none":
                pumps.append(asyncio.create_task(pump(guests[-1])))
        with progress:
            bar = progress.add_task("swarm", total=n, state="")
            for next_done in asyncio.as_completed([g.wait() for g in guests]):
                result = await next_done
                counts[_outcome(result)] += 1
                if result.died:
                    reasons[result.reason] += 1
                state = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
                progress.update(bar, advance=1, state=state)
        await asyncio.gather(*pumps)
        wall = time.perf_counter() - started
        stats = [g.stats for g in guests]
        for g in guests:
            outcomes[g.name] = _outcome(await g.wait())
    _summary(n, counts, reasons, sum(s.blocks for s in stats), sum(s.run_time for s in stats), wall)
    if console == "tail":
        _tails(tails, outcomes)
    return 0 if counts["finished"] == n else 1


async def run_cluster_swarm(config: GuestConfig, n: int, args: argparse.Namespace) -> int:
    """``swarm --cluster``: ``n`` copies on Ray workers; the table plus a row per worker."""
    if args.cluster == "ray":
        address = None
    elif args.cluster.startswith("ray://"):
        address = args.cluster
    else:
        raise BadInput(f"--cluster must be 'ray' or ray://HOST:PORT, not {args.cluster!r}")
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
            (w.name, w.node or "-", str(w.pid or "-"), w.placed, "alive" if w.alive else "lost")
            for w in cl.workers
        ]
    finally:
        await cl.aclose()
    _summary(n, counts, reasons, sum(s.blocks for s in stats), sum(s.run_time for s in stats), wall)
    _workers_table(workers)
    return 0 if counts["finished"] == n else 1


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
    n: int, counts: Counter[str], reasons: Counter[str], blocks: int, cpu: float, wall: float
) -> None:
    from rich.console import Console as RichConsole
    from rich.table import Table

    table = Table(title=f"swarm of {n}")
    for column in ("finished", "failed", "died", "blocks", "blocks/s", "cpu time", "wall time"):
        table.add_column(column, justify="right")
    table.add_row(
        str(counts["finished"]),
        str(counts["failed"]),
        str(counts["died"]),
        f"{blocks:,}" if blocks else "-",  # "-": not counted (the exit-request path)
        f"{blocks / wall:,.0f}" if wall > 0 and blocks else "-",
        f"{cpu:.2f}s",
        f"{wall:.2f}s",
    )
    out = RichConsole(file=sys.stdout)
    out.print(table)
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
    """``build``: compile and link a C guest; compiler output goes to stderr."""
    from . import sdk
    from .config import parse_size

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
        out = sdk.build(args.sources, args.output, options)
    except sdk.BuildError as exc:
        print(str(exc), file=sys.stderr)
        print("supervisor: error: build failed", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (sdk.ToolchainError, FileNotFoundError, ValueError) as exc:
        print(f"supervisor: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"built {out} ({out.stat().st_size} bytes)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command, return the exit status (never raises for bad input)."""
    args = build_parser().parse_args(argv)
    if args.command == "build":
        return build_image(args)
    try:
        coro: Coroutine[Any, Any, int]
        if args.command == "run" and args.restore:
            coro = run_one(None, args.restore, args.gdb)
        elif args.command == "run":
            coro = run_one(run_config(args))
        elif args.command == "snapshot":
            fields = {"image": args.image, "memory": args.memory, "cmdline": args.cmdline}
            config = GuestConfig.build(**{k: v for k, v in fields.items() if v is not None})
            coro = snapshot_to_file(config, args.output, args.after_lines, args.after)
        else:
            if args.n < 1:
                raise BadInput("-n must be at least 1")
            fields = {
                "image": args.image,
                "memory": args.memory,
                "cmdline": args.cmdline,
                **limit_fields(args),
            }
            if args.tail_lines < 1:
                raise BadInput("--tail-lines must be at least 1")
            config = GuestConfig.build(
                console="null" if args.console == "none" else "capture",
                **{k: v for k, v in fields.items() if v is not None},
            )
            if args.cluster is not None:
                if args.console != "none":
                    raise BadInput("--console is not supported with --cluster")
                coro = run_cluster_swarm(config, args.n, args)
            elif args.workers is not None or args.checkpoint_every is not None:
                raise BadInput("--workers and --checkpoint-every need --cluster")
            else:
                coro = run_swarm(
                    config, args.n, args.gdb, args.gdb_guest, args.console, args.tail_lines
                )
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            return runner.run(coro)
    except (BadInput, ConfigError) as exc:
        print(f"supervisor: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("supervisor: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
