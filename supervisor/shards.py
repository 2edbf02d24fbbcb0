"""A swarm across processes: one event loop per core, each with its own Supervisor.

One event loop runs on one core, and a swarm of short-lived guests is bound by it:
its launches, boots, ticks and ends are all loop work.  ``swarm --processes N``
starts N shards, child processes of ``python -m supervisor swarm`` given the same
options and ``--shard INDEX,COUNT,FD``: shard ``k`` runs guests ``k``, ``k + N``,
``k + 2N`` ... under their swarm-wide names (``IMAGE-INDEX``) and writes what it
counted to the pipe ``FD``, one JSON object a line:

* ``{"progress": [launched, finished, failed, died]}`` now and then;
* ``{"tail": [index, name, outcome, lines]}`` per guest with ``--console tail``;
* ``{"error": message}`` for bad input (the parent prints it once and exits 2);
* ``{"done": {...}}`` last: its counts, reasons of death, blocks, CPU, guests
  launched, most alive at once, peak and starting resident memory (KiB), and
  whether it was stopped.

The parent relays each shard's stdout and stderr a whole line at a time (a line
is never cut by another shard's, and a guest's lines stay in order, since a guest
lives in one shard), shows the progress, and adds the shards' figures into the
one table.  A shard lives in its own session, so a Ctrl-C at the terminal reaches
only the parent, which stops every shard once (SIGTERM) and still prints the
table; a shard whose parent is gone (its stdin reaches EOF) stops itself; shards
still running when the parent exits at once (a second Ctrl-C) are killed by
:func:`kill_all`.  A shard that ends without its last report (killed, out of
memory) is named on stderr, and its guests not reported ended are not counted as
finished (the exit status is 1); the other shards carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

PER_PROCESS = 1000  # guests a shard is given at least before another process pays off
PROGRESS_EVERY = 0.25  # seconds between a shard's progress reports
_RELAY_CHUNK = 1 << 16
_LIVE: set[int] = set()  # the pids of shards not yet reaped


def cpus_available() -> int:
    """The CPUs this process may run on (its affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_processes(n: int) -> int:
    """How many processes a swarm of ``n`` runs in by default: one per CPU available,
    but no more than one per :data:`PER_PROCESS` guests (a process costs about half a
    second of start-up, which a small swarm does not win back)."""
    return max(1, min(cpus_available(), n // PER_PROCESS))


def share(total: int, index: int, count: int) -> int:
    """Shard ``index``'s part of ``total`` split over ``count`` shards (the parts add up)."""
    return total // count + (1 if index < total % count else 0)


@dataclass(frozen=True, slots=True)
class Shard:
    """What a shard process is (``--shard INDEX,COUNT,FD``)."""

    index: int
    count: int
    fd: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count, fd = (int(part) for part in text.split(","))
        except ValueError:
            raise ValueError(f"--shard: not INDEX,COUNT,FD: {text!r}") from None
        if not 0 <= index < count or fd < 0:
            raise ValueError(f"--shard: out of range: {text!r}")
        return cls(index, count, fd)

    def guests(self, n: int) -> range:
        """The swarm-wide indexes of this shard's guests."""
        return range(self.index, n, self.count)

    def argument(self) -> str:
        return f"{self.index},{self.count},{self.fd}"


class Reporter:
    """A shard's side of the report pipe (see the module's docstring).

    Writes are whole lines, blocking: the parent reads every shard's pipe all along.
    A parent that went away (a broken pipe) makes the writes no-ops: the shard is
    being stopped through its stdin anyway."""

    __slots__ = ("_last", "_out")

    def __init__(self, shard: Shard) -> None:
        self._out: IO[str] | None = os.fdopen(shard.fd, "w", buffering=1, closefd=True)
        self._last = 0.0

    def send(self, kind: str, value: object) -> None:
        if self._out is None:
            return
        try:
            self._out.write(json.dumps({kind: value}, separators=(",", ":")) + "\n")
        except (BrokenPipeError, ValueError):
            self._out = None

    def progress(self, launched: int, counts: Counter[str], force: bool = False) -> None:
        """Report the progress at most every :data:`PROGRESS_EVERY` seconds (``force``: now)."""
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_EVERY:
            self._last = now
            self.send("progress", [launched, counts["finished"], counts["failed"], counts["died"]])

    def close(self) -> None:
        if self._out is not None:
            with contextlib.suppress(OSError):
                self._out.close()
            self._out = None


def stop_when_orphaned() -> None:
    """In a shard: stop as on SIGTERM (the table's figures still reported) when stdin,
    the parent's pipe, reaches EOF, that is when the parent is gone."""
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(0)
            os.kill(os.getpid(), signal.SIGTERM)

    loop.add_reader(0, readable)


@dataclass(slots=True)
class Memory:
    """The resident-memory cells of the swarm's table (KiB)."""

    most_alive: int
    peak: int
    per_guest: float


@dataclass(slots=True)
class Tally:
    """What the shards counted, added up."""

    counts: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    blocks: int = 0
    cpu: float = 0.0
    launched: int = 0
    most_alive: int = 0
    peak_kib: int = 0
    growth_kib: int = 0
    stopped: bool = False  # the parent was stopped (Ctrl-C, SIGTERM), and so every shard
    tails: dict[int, tuple[str, str, list[str]]] = field(default_factory=dict)
    error: str | None = None
    stdout_gone: bool = False
    lost: list[str] = field(default_factory=list)  # what became of shards that did not finish

    def add(self, done: dict[str, Any]) -> None:
        self.counts.update(done["counts"])
        self.reasons.update(done["reasons"])
        self.blocks += int(done["blocks"])
        self.cpu += float(done["cpu"])
        self.launched += int(done["launched"])
        self.most_alive += int(done["most_alive"])
        self.peak_kib += int(done["peak"])
        self.growth_kib += max(0, int(done["peak"]) - int(done["base"]))

    def memory(self, own_peak_kib: int) -> Memory:
        """The table's memory cells: the shards' peaks and the parent's added (an upper
        bound: the peaks need not coincide), and the shards' growth per guest alive."""
        return Memory(
            self.most_alive,
            self.peak_kib + own_peak_kib,
            self.growth_kib / max(1, self.most_alive),
        )


Progress = Callable[[int, Counter[str]], None]


class _Child:
    """One shard process and the tasks that read it."""

    def __init__(self, proc: asyncio.subprocess.Process, report: asyncio.StreamReader) -> None:
        self.proc = proc
        self.report = report
        self.launched = 0
        self.counts: Counter[str] = Counter()
        self.done = False

    def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)


async def run(argv: Sequence[str], processes: int, progress: Progress) -> Tally:
    """Run the swarm ``argv`` (``python -m supervisor`` arguments, ``swarm`` first) in
    ``processes`` shards; relay their output; return what they counted.

    Cancelled (Ctrl-C, SIGTERM), it stops every shard and still returns what they
    counted, with ``stopped`` set."""
    tally = Tally()
    children: list[_Child] = []
    stopping = False

    def stop_all() -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            child.stop()

    def show() -> None:
        counts: Counter[str] = Counter()
        for child in children:
            counts.update(child.counts)
        progress(sum(child.launched for child in children), counts)

    async def relay(source: asyncio.StreamReader | None, out: IO[bytes], is_stdout: bool) -> None:
        """Copy ``source`` to ``out`` a whole line at a time (what follows the last
        newline waits for the rest of its line); once stdout's reader is gone, drain."""
        assert source is not None
        held = b""
        while chunk := await source.read(_RELAY_CHUNK):
            if (is_stdout and tally.stdout_gone) or tally.error is not None:
                continue  # (after bad input, the parent's one line is all that is said)
            held += chunk
            cut = held.rfind(b"\n") + 1
            if cut:
                line, held = held[:cut], held[cut:]
                try:
                    out.write(line)
                    out.flush()
                except BrokenPipeError:
                    if is_stdout:
                        tally.stdout_gone = True
                        stop_all()
        if held and not (is_stdout and tally.stdout_gone) and tally.error is None:
            with contextlib.suppress(BrokenPipeError):
                out.write(held)
                out.flush()

    async def read_reports(child: _Child) -> None:
        while line := await child.report.readline():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "progress" in message:
                launched, finished, failed, died = message["progress"]
                child.launched = launched
                child.counts = Counter(finished=finished, failed=failed, died=died)
                show()
            elif "tail" in message:
                index, name, outcome, lines = message["tail"]
                tally.tails[int(index)] = (str(name), str(outcome), [str(x) for x in lines])
            elif "error" in message:
                if tally.error is None:
                    tally.error = str(message["error"])
                stop_all()
            elif "done" in message:
                child.done = True
                tally.add(message["done"])
                if message["done"]["stopped"] and not stopping:
                    tally.lost.append(f"shard {children.index(child)} was stopped")

    async def watch(child: _Child) -> None:
        proc = child.proc
        await asyncio.gather(
            relay(proc.stdout, sys.stdout.buffer, True),
            relay(proc.stderr, sys.stderr.buffer, False),
            read_reports(child),
        )
        await proc.wait()
        _LIVE.discard(proc.pid)
        if child.done:
            return
        # What it said last counts (a shard stopped as it started says nothing).
        tally.launched += child.launched
        tally.counts.update(child.counts)
        if tally.error is None and not stopping:
            # The others carry on: a shard's guests are no concern of theirs.
            tally.lost.append(
                f"shard {children.index(child)} ended with status {proc.returncode}, its "
                f"guests not counted after the {child.counts.total():,} it reported ended"
            )

    loop = asyncio.get_running_loop()
    watchers: list[asyncio.Task[None]] = []
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        for index in range(processes):
            read_end, write_end = os.pipe()
            try:
                shard = Shard(index, processes, write_end)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "supervisor", *argv, "--shard", shard.argument(),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, pass_fds=(write_end,),
                    start_new_session=True,
                )  # fmt: skip
            except BaseException:
                os.close(read_end)
                raise
            finally:
                os.close(write_end)
            _LIVE.add(proc.pid)
            report = asyncio.StreamReader(limit=1 << 24)
            await loop.connect_read_pipe(
                functools.partial(asyncio.StreamReaderProtocol, report),
                os.fdopen(read_end, "rb", buffering=0),
            )
            child = _Child(proc, report)
            children.append(child)
            watchers.append(asyncio.create_task(watch(child)))
            if stopping:
                child.stop()
        await asyncio.wait(watchers)
    except asyncio.CancelledError:  # (asyncio.wait leaves the watchers running)
        tally.stopped = True
        stop_all()
        if watchers:
            await asyncio.wait(watchers)
    else:
        for watcher in watchers:
            watcher.result()  # (a bug in the relay, not the shards' doing)
    finally:
        for child in children:
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                await child.proc.wait()
            _LIVE.discard(child.proc.pid)
            if child.proc.stdin is not None:
                child.proc.stdin.close()
    return tally


def kill_all() -> None:
    """Kill every shard still running (the parent is exiting at once)."""
    for pid in list(_LIVE):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
