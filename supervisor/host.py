"""The library front door: a :class:`Supervisor` launches :class:`Guest` objects.

::

    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image="guests/hello.img"))
        async for line in guest.console:
            print(line)
        print(await guest.wait())

Each guest runs its Launcher (and so its CPU) in its own asyncio task.
Leaving the ``async with`` kills the guests still running and closes the device.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from typing import Any, overload

from .config import GuestConfig
from .device import LguestDevice
from .gdbstub import GdbServer
from .guestctl import GuestControl, resume_from, snapshot_config, snapshot_image, start_gdb
from .hibernation import DEFAULT_HIBERNATE_AFTER
from .launcher.block import BlockDevice
from .launcher.console import (
    Console,
    ConsoleEnded,
    LineStream,
    stderr_sink,
    stdin_source,
    stdout_sink,
)
from .launcher.devices import Device
from .launcher.launcher import DEFAULT_MAX_RESTARTS, GuestStats, Launcher
from .slicepool import DEFAULT_NICE as DEFAULT_WORKER_NICE
from .snapshot import Snapshot
from .state import Exit

__all__ = ["ConsoleEnded", "Exit", "Guest", "GuestStats", "Supervisor"]


class Guest:
    """A running (or finished) guest.  Get one from :meth:`Supervisor.launch`."""

    def __init__(
        self,
        config: GuestConfig,
        launcher: Launcher,
        console: Console,
        control: GuestControl | None = None,
    ) -> None:
        self.config = config
        self.name = config.display_name
        self._launcher = launcher
        self._console = console
        self._task = asyncio.create_task(launcher.run(), name=f"guest-{self.name}")
        self.control = control or GuestControl(launcher, config)
        self.control.watch(self._task)

    @property
    def gdb(self) -> GdbServer | None:
        """The gdb server of a guest launched with ``config.gdb``."""
        return self.control.gdb

    async def pause(self) -> None:
        """Stop the guest at an instruction boundary; ``SnapshotError`` if it has ended."""
        await self.control.pause()

    def resume(self) -> None:
        """Let a paused guest run on."""
        self.control.resume()

    async def snapshot(self) -> Snapshot:
        """The guest's whole state (it runs on afterwards unless it was paused or in gdb)."""
        return await self.control.snapshot()

    @property
    def console(self) -> LineStream:
        """Console output as an async iterator of lines (``str`` without ``\\n``).

        It ends when the guest has ended and every line has been read.  It also has
        ``await readline()`` (one line with its ``\\n``; ``""`` at the end) and
        ``await expect(pattern)`` (as :meth:`Guest.expect`).
        """
        return self._console.lines

    @overload
    async def expect(
        self,
        pattern: str | re.Pattern[str],
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> re.Match[str]: ...

    @overload
    async def expect(
        self,
        pattern: bytes | re.Pattern[bytes],
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> re.Match[bytes]: ...

    async def expect(
        self,
        pattern: str | bytes | re.Pattern[str] | re.Pattern[bytes],
        timeout: float | None = None,  # noqa: ASYNC109 (pexpect's signature; TimeoutError)
    ) -> re.Match[str] | re.Match[bytes]:
        """Wait until the console's unread output matches ``pattern`` (``re.search``),
        consume it up to the match's end, return the ``re.Match``.

        A prompt with no newline yet matches; see :meth:`LineStream.expect`.  Raises
        ``TimeoutError`` after ``timeout`` seconds and :class:`ConsoleEnded` (an
        ``EOFError`` naming the guest and how it ended) if the guest's output ends
        first.  Needs a ``capture`` console (the library's default).
        """
        try:
            return await self._console.lines.expect(pattern, timeout)
        except ConsoleEnded as exc:
            try:  # the console closes as the guest's task ends: say how it ended
                how = f" ended: {(await self.wait()).reason}"
            except Exception:  # the Host failed: wait() raises that, for the caller's wait
                how = ""
            raise ConsoleEnded(f"{self.name}{how}; {exc}", exc.output) from None

    @property
    def stderr(self) -> LineStream:
        """The guest's standard error (fd 2) as an async iterator of lines, apart from
        :attr:`console` (stdout), with the same bounds; it ends with the guest."""
        err = self._console.err_lines
        assert err is not None  # _console_for always gives the console one
        return err

    def send(self, text: str | bytes) -> None:
        """Queue console input for the guest (UTF-8 encoded if ``str``)."""
        self._console.feed(text.encode() if isinstance(text, str) else text)

    def send_eof(self) -> None:
        """End console input: the guest sees EOF after what is already queued."""
        self._console.end_input()

    @property
    def stats(self) -> GuestStats:
        """Counters so far: blocks, exits, hypercalls, interrupts, notifies, run time."""
        return self._launcher.stats

    @property
    def restarts(self) -> int:
        return self._launcher.restarts

    @property
    def done(self) -> bool:
        """True once the guest has ended (``wait()`` then returns at once)."""
        return self._task.done()

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the event loop) once the guest has ended."""
        self._task.add_done_callback(lambda _task: callback())

    async def wait(self) -> Exit:
        """Wait for the guest to end and return how.  Cancelling the wait leaves it running.

        Raises whatever the Launcher raised if the Host itself failed.
        """
        return await asyncio.shield(self._task)

    async def kill(self, reason: str = "killed") -> Exit:
        """End the guest now (no effect if it has already ended); return its :class:`Exit`."""
        if not self._task.done():
            await self._launcher.kill(reason)
        return await self.wait()

    def __repr__(self) -> str:
        state = "running" if not self.done else "ended"
        return f"<Guest {self.name} {state}>"


class Supervisor:
    """Owns one :class:`~supervisor.LguestDevice` and the guests launched on it.

    Use as ``async with Supervisor() as sup``; leaving kills what still runs.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        max_guests: int | None = None,
        max_memory: int | None = None,
        hibernate_after: float = DEFAULT_HIBERNATE_AFTER,
        keep_ended: bool = True,
        worker_nice: int = DEFAULT_WORKER_NICE,
        idle_workers: bool = False,
    ) -> None:
        """``max_guests`` and ``max_memory`` (bytes) bound the guests running at once:
        a launch past them ends at once with "cannot start: Cannot allocate memory".
        ``hibernate_after``: seconds an idle guest keeps its emulator (a guest's
        config may say otherwise; see :mod:`supervisor.hibernation`).
        ``keep_ended=False`` lets :attr:`guests` forget a guest once it has ended
        (a long swarm then holds only the guests alive).  ``workers``, ``worker_nice``
        and ``idle_workers``: the device's executor threads (:class:`LguestDevice`)."""
        self.device = LguestDevice(
            workers=workers,
            worker_nice=worker_nice,
            idle_workers=idle_workers,
            max_guests=max_guests,
            max_memory=max_memory,
            hibernate_after=hibernate_after,
        )
        self.max_restarts = max_restarts
        self._guests: dict[Guest, None] = {}  # launched (and, unless keep_ended, not ended)
        self._keep_ended = keep_ended
        self._closed = False

    @property
    def guests(self) -> list[Guest]:
        """The guests launched, in order (only those still running if ``keep_ended`` is off)."""
        return list(self._guests)

    async def launch(
        self,
        config: GuestConfig,
        *,
        devices: Sequence[Device] = (),
        snapshot: Snapshot | None = None,
    ) -> Guest:
        """Start a guest from ``config``, with extra ``devices`` after console and block.

        Checks everything that can be checked first and raises before anything
        runs: :class:`~supervisor.launcher.loader.ImageError` (a ``ValueError``)
        for a bad image or one that does not fit, ``OSError`` for a block file
        that cannot be opened as asked.
        """
        if self._closed:
            raise RuntimeError("the Supervisor is closed: it launches no more guests")
        console = _console_for(config)
        table: list[Device] = [console]
        if config.block is not None:
            block = BlockDevice(config.block, readonly=config.block_readonly)
            block.open()
            table.append(block)
        table.extend(devices)
        gdb = None
        try:
            launcher = Launcher(
                self.device,
                config.image if snapshot is None else snapshot_image(snapshot),
                ram_size=config.memory,
                devices=table,
                cmdline=config.cmdline,
                env=config.env,
                max_restarts=self.max_restarts,
                limits=config.limits,
                resume=None if snapshot is None else resume_from(snapshot),
                hibernate_after=config.hibernate_after,
                cpus=config.cpus,
            )
            gdb = await start_gdb(config.gdb) if config.gdb else None
        except BaseException:
            if gdb is not None:
                await gdb.aclose()
            for device in table:
                await device.stop()
            raise
        control = GuestControl(launcher, config, gdb=gdb)
        guest = Guest(config, launcher, console, control)
        self._guests[guest] = None
        if not self._keep_ended:
            guest.when_done(lambda: self._guests.pop(guest, None))
        return guest

    async def restore(self, snap: Snapshot, **overrides: Any) -> Guest:
        """A new guest that continues exactly where ``snap`` was taken.

        ``overrides`` change the snapshot's config (``name``, ``console``, ``gdb``...,
        not ``memory``).  Any number of guests may be restored from one snapshot.
        """
        return await self.launch(snapshot_config(snap, **overrides), snapshot=snap)

    async def aclose(self) -> None:
        """Kill every guest still running, then close the device.  Safe to call twice."""
        self._closed = True
        # Every guest at once: each kill withdraws its queued slice, so none waits its turn.
        await asyncio.gather(
            *(guest.kill("supervisor closed") for guest in self._guests), return_exceptions=True
        )
        await self.device.aclose()

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _console_for(config: GuestConfig) -> Console:
    rate = config.console_rate
    if config.console == "stdio":  # the terminal has the output: no lines are kept
        return Console(
            lines=LineStream(maxlen=0),
            sink=stdout_sink,
            err_lines=LineStream(maxlen=0),
            err_sink=stderr_sink,
            source=stdin_source(),
            rate=rate,
        )
    if config.console == "null":
        return Console(
            lines=LineStream(maxlen=0), err_lines=LineStream(maxlen=0), eof=True, rate=rate
        )
    return Console(
        lines=LineStream(max_bytes=config.console_buffer),
        err_lines=LineStream(max_bytes=config.console_buffer),
        rate=rate,
    )
