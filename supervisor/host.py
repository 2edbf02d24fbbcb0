"""The library front door: a :class:`Supervisor` launches :class:`Guest` objects.

::

    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image="guests/hello.img"))
        async for line in guest.console:
            print(line)
        print(await guest.wait())

Each guest runs its Launcher (and so its CPU) in an asyncio task of its own, none while
it rests (idle, its registers packed: ``Launcher.start``).
Leaving the ``async with`` kills the guests still running and closes the device; the
event loop's shutdown (the end of ``asyncio.run``) does so for a Supervisor left open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, AnyStr

from .config import GuestConfig
from .debug import PAUSE, DebugError, Debugger, debugger
from .device import LguestDevice, LguestFile
from .flag import Flag
from .gdbstub import GdbServer
from .guestctl import launcher_state, resume_from, snapshot_config, snapshot_image, start_gdb
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
from .launcher.files import FilesDevice, grants_for
from .launcher.launcher import DEFAULT_MAX_RESTARTS, GuestStats, Launcher
from .net import Network
from .slicepool import DEFAULT_NICE as DEFAULT_WORKER_NICE
from .snapshot import Snapshot, SnapshotError, capture
from .state import Exit

__all__ = ["ConsoleEnded", "Exit", "Guest", "GuestStats", "Supervisor"]


class Guest:
    """A running (or finished) guest.  Get one from :meth:`Supervisor.launch`.

    It rides on its Launcher's ``on_boot`` hook: every boot's file gets a
    :class:`~supervisor.debug.Debugger`; a gdb server follows the guest across
    reboots; a pause asked for between boots holds the next boot.
    """

    # (One per guest, idle or not: no attribute dict.)
    __slots__ = (
        "__weakref__", "_boots", "_changed", "_closing", "_console", "_debugger", "_file",
        "_gdb", "_hold", "_launcher", "_on_end", "_task", "config", "name",
    )  # fmt: skip

    def __init__(
        self,
        config: GuestConfig,
        launcher: Launcher,
        console: Console,
        gdb: GdbServer | None = None,
        on_end: Callable[[Guest], object] | None = None,
    ) -> None:
        """``on_end(guest)``: the Supervisor's part of the guest's end, called in its one
        done callback (a callback of its own would keep a closure and a context each
        guest, idle or not)."""
        self.config = config
        self._on_end = on_end
        self.name = config.display_name
        self._launcher = launcher
        self._console = console
        self._gdb = gdb
        self._boots = 0
        self._hold = False  # a pause asked for: every boot is held until resume()
        self._file: LguestFile | None = None  # the current boot's
        # The current boot's debugger, made on first use (_debug): most guests are never
        # paused, snapshotted or debugged, and one costs about 0.5 KiB.
        self._debugger: Debugger | None = None
        self._changed = Flag()  # a boot began or the guest ended
        self._closing: asyncio.Task[None] | None = None  # the gdb server's close, once it ended
        launcher.on_boot.append(self._on_boot)
        # (Its Exit: the Launcher runs in tasks of its own, none while the guest rests.)
        self._task: asyncio.Future[Exit] = launcher.start()
        self._task.add_done_callback(self._ended)

    @property
    def gdb(self) -> GdbServer | None:
        """The gdb server of a guest launched with ``config.gdb``."""
        return self._gdb

    # -- the Launcher's hook and end ----------------------------------------------------
    def _on_boot(self, file: LguestFile) -> None:
        self._boots += 1
        self._file = file
        self._debugger = None
        if self._hold or self._gdb is not None:
            d = debugger(file)
            self._debugger = d
            if self._hold:
                d.request_stop(PAUSE)
            if self._gdb is not None:
                self._gdb.attach(d, stopped=self._boots == 1)
        self._changed.set()

    def _debug(self) -> Debugger | None:
        """The current boot's debugger (made now if it has none); None before the first
        boot and once its file is closed."""
        if self._debugger is None and self._file is not None and not self._file.closed:
            self._debugger = debugger(self._file)
        return self._debugger

    def _ended(self, task: asyncio.Future[Exit]) -> None:
        self._changed.set()
        if self._on_end is not None:
            self._on_end(self)
        if self._gdb is None:
            return
        failed = task.cancelled() or task.exception() is not None
        self._gdb.ended(Exit(None, "the supervisor failed", died=True) if failed else task.result())
        self._closing = asyncio.get_running_loop().create_task(self._gdb.aclose())

    # -- pause, resume, snapshot ----------------------------------------------------------
    async def pause(self) -> None:
        """Stop the guest at an instruction boundary, inside its Launcher's read (no
        device request half-served); ``SnapshotError`` if it has ended."""
        await self._pause()

    async def _pause(self) -> Debugger:
        self._hold = True
        while True:
            if self.done:
                raise SnapshotError("the guest has ended")
            d = self._debug()
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
        while self._file is old.file and not self.done:
            self._changed.clear()
            await self._changed.wait()

    async def _race(self, coro: Any) -> Any:
        """Await ``coro`` unless the guest ends first (then None); a closed file is None too."""
        waiter = asyncio.ensure_future(coro)
        await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
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
        """The guest's whole state: guest and Launcher state, taken paused; it runs on
        afterwards unless it was paused or stopped in gdb."""
        d = self._debugger
        was_held = self._hold or (d is not None and d.stop_reason is not None)
        d = await self._pause()
        try:
            snap = capture(d.file)
            snap.launcher, blobs = launcher_state(self._launcher, self.config)
            snap.blobs.update(blobs)
            return snap
        finally:
            if not was_held:
                self.resume()

    @property
    def console(self) -> LineStream:
        """Console output as an async iterator of lines (``str`` without ``\\n``).

        It ends when the guest has ended and every line has been read.  It also has
        ``await readline()`` (one line with its ``\\n``; ``""`` at the end) and
        ``await expect(pattern)`` (as :meth:`Guest.expect`).
        """
        return self._console.lines

    async def expect(
        self,
        pattern: AnyStr | re.Pattern[AnyStr],
        timeout: float | None = None,  # noqa: ASYNC109 (pexpect's signature; TimeoutError)
    ) -> re.Match[AnyStr]:
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

    async def rested(self, times: int = 1) -> bool:
        """Wait until the guest's read has rested ``times`` times in all (``stats.rests``:
        asleep in a halt with its registers packed, it holds no task; docs/performance.md,
        "Resting reads") or it has ended; whether it rested so often."""
        return await self._launcher.rested(times)

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
        self._kill_now(reason)
        return await self.wait()

    def _kill_now(self, reason: str) -> None:
        if not self._task.done():
            self._launcher.kill_now(reason)

    def __repr__(self) -> str:
        state = "running" if not self.done else "ended"
        return f"<Guest {self.name} {state}>"


class Supervisor:
    """Owns one :class:`~supervisor.LguestDevice` and the guests launched on it.

    Use as ``async with Supervisor() as sup``; leaving kills what still runs.  One left
    open is closed as its event loop shuts down (``loop.shutdown_asyncgens``, which
    ``asyncio.run`` calls): its resting guests, which have no task to cancel, end too.
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
        network: Network | None = None,
        deterministic: bool = False,
        seed: int | None = None,
        max_engines: int | None = None,
    ) -> None:
        """``max_guests`` and ``max_memory`` (bytes) bound the guests running at once:
        a launch past them ends at once with "cannot start: Cannot allocate memory".
        ``hibernate_after``: seconds an idle guest keeps its emulator when the device
        has no engine pool (``LGUEST_ENGINE_SWITCH=off``; with the pool, the default, an
        idle guest holds none; a guest's config may say otherwise; see
        :mod:`supervisor.hibernation`).
        ``keep_ended=False`` lets :attr:`guests` forget a guest once it has ended
        (a long swarm then holds only the guests alive).  ``workers``, ``worker_nice``
        and ``idle_workers``: the device's executor threads (:class:`LguestDevice`).
        ``network``: the guests' network, to choose its seed, clock, timeouts and
        buffers (default: a ``Network()``); it must not serve another Supervisor.
        ``deterministic`` and ``seed``: run every guest on virtual time and a seeded
        schedule (docs/determinism.md); guests launched together start together, and
        the default network draws its faults from the seed and times them in virtual
        time.  ``max_engines``: the bound of the device's engine pool
        (:class:`LguestDevice`; default: what an eighth of the memory holds)."""
        self.device = LguestDevice(
            workers=workers,
            worker_nice=worker_nice,
            idle_workers=idle_workers,
            max_guests=max_guests,
            max_memory=max_memory,
            hibernate_after=hibernate_after,
            deterministic=deterministic,
            seed=seed,
            max_engines=max_engines,
        )
        self._launches = 0  # launch order: a deterministic schedule's order of guests
        self.max_restarts = max_restarts
        # The guests' network: GuestConfig(net=True) joins it.
        sim = self.device.virtual
        if network is None and sim is not None:
            network = Network(seed=sim.random("net").getrandbits(64), clock=sim)
        self.net = Network() if network is None else network
        self._guests: dict[Guest, None] = {}  # launched (and, unless keep_ended, not ended)
        self._keep_ended = keep_ended
        self._forget = self._forget_guest  # (one bound method for every guest's end)
        self._closed = False
        # Started at the first launch: the loop's shutdown closes it, and its close
        # closes this Supervisor if nobody has (_closed_at_shutdown).
        self._at_shutdown: AsyncGenerator[None, None] | None = None

    @property
    def seed(self) -> int | None:
        """The seed of a deterministic Supervisor (None otherwise): the same seed, the
        same guests and the same host inputs give the same run."""
        return self.device.seed

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
        that cannot be opened as asked.  Outside deterministic mode it returns after
        one turn of the event loop, in which the guest starts (and, as a rule, boots
        to its first wait): guests launched in a loop boot one after the other.
        """
        return await self._launch(config, devices, snapshot)

    async def _launch(
        self,
        config: GuestConfig,
        devices: Sequence[Device],
        snapshot: Snapshot | None,
        console_partial: bytes = b"",
    ) -> Guest:
        """:meth:`launch`, its console holding ``console_partial`` before the guest runs."""
        if self._closed:
            raise RuntimeError("the Supervisor is closed: it launches no more guests")
        if self._at_shutdown is None:
            hook = _closed_at_shutdown(weakref.ref(self))
            await anext(hook)  # (its first step: the running loop now knows it)
            self._at_shutdown = hook
        console = _console_for(config)
        # Before the guest runs: its first write (in the turn below) goes on from there.
        console.lines.push(console_partial)
        table: list[Device] = [console]
        if config.block is not None:
            block = BlockDevice(config.block, readonly=config.block_readonly)
            block.open()
            table.append(block)
        table.extend(devices)
        # Last, so that the devices above keep their places in the device page.
        try:  # ValueError: the name is on the network already
            name, most, allowed = config.display_name, config.max_sockets, config.allow_outbound
            member = self.net.join(name, max_sockets=most, outbound=allowed) if config.net else None
        except ValueError:
            for device in table:
                await device.stop()
            raise
        files = FilesDevice(grants_for(config.dirs), workdir=config.workdir,
                            max_files=config.max_files, net=member)  # fmt: skip
        table.append(files)
        gdb = None
        try:
            files.open()  # OSError: a directory gone since the config was checked
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
        sim = self.device.virtual
        if sim is not None:
            # Nothing runs until this guest's CPUs are in the schedule (or it ended): guests
            # launched together start together, whatever their boots wait for.
            start = sim.hold()
            rank = self._launches

            def booted(f: LguestFile, rank: int = rank) -> None:
                f.rank(rank)
                start.release()

            launcher.on_boot.append(booted)
        self._launches += 1
        guest = Guest(config, launcher, console, gdb, None if self._keep_ended else self._forget)
        if sim is not None:
            guest.when_done(start.release)
        self._guests[guest] = None
        if sim is None:
            # One turn of the loop: the guest boots (to its first halt, as a rule) before
            # the caller makes the next one.  Guests launched in a loop then never all
            # boot together: the transient objects of each boot are freed and reused
            # before the next guests' long-lived ones are placed, instead of leaving
            # holes between them in both heaps; and a swarm's admission reads the memory
            # of guests that run, not of guests that have not started.
            await asyncio.sleep(0)
        return guest

    def _forget_guest(self, guest: Guest) -> None:
        self._guests.pop(guest, None)

    async def restore(
        self, snap: Snapshot, *, console_partial: bytes = b"", **overrides: Any
    ) -> Guest:
        """A new guest that continues exactly where ``snap`` was taken.

        ``overrides`` change the snapshot's config (``name``, ``console``, ``gdb``...,
        not ``memory``).  Any number of guests may be restored from one snapshot.
        ``console_partial``: the line the snapshot's guest had half written (its
        console's ``partial``), which the new console starts with, so that the line
        the guest goes on writing comes out whole (the guest may write in the turn of
        the loop before this returns).
        """
        return await self._launch(snapshot_config(snap, **overrides), (), snap, console_partial)

    def kill_all(self, reason: str = "supervisor closed") -> None:
        """Ask every guest still running to end now, without waiting: each one's read
        is cancelled, so its next turn on the event loop ends it instead of running it
        (what has not ended yet ends as :meth:`aclose` waits)."""
        for guest in list(self._guests):
            guest._kill_now(reason)

    async def aclose(self) -> None:
        """Kill every guest still running, then close the device.  Safe to call twice.

        Every guest is asked first (no coroutine or task each), then their ends are
        awaited together: each kill withdraws its queued slice, so none waits its turn."""
        self._closed = True
        hook, self._at_shutdown = self._at_shutdown, None
        self.kill_all()
        running = [guest._task for guest in self._guests if not guest.done]
        if running:
            await asyncio.wait(running)
        for task in running:  # (a Host failure is the guest's wait()'s to raise, not ours)
            if not task.cancelled():
                task.exception()
        await self.net.aclose()
        await self.device.aclose()
        if hook is not None:
            await hook.aclose()  # (closed already: its close does nothing more)

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _closed_at_shutdown(sup: weakref.ref[Supervisor]) -> AsyncGenerator[None, None]:
    """Closes ``sup`` as the event loop shuts down, if nobody closed it.

    A guest that rests has no task (``Launcher.start``), so a program that returns from
    ``asyncio.run`` without :meth:`Supervisor.aclose` would otherwise leave it, its
    file, memory and devices, as they are, while every other guest's task is cancelled
    (which ends that guest).  An async generator started on the loop is what the loop's
    shutdown (``loop.shutdown_asyncgens``, which ``asyncio.run`` calls after cancelling
    the tasks left) closes: its close runs the Supervisor's, which kills the resting
    guests too.  It holds the Supervisor weakly: one nobody holds is not kept for it.
    """
    try:
        yield
    finally:
        owner = sup()
        if owner is not None and not owner._closed:
            owner._at_shutdown = None  # (this close is the hook's: aclose leaves it)
            await owner.aclose()


def _console_for(config: GuestConfig) -> Console:
    rate = config.console_rate
    tty = config.input_tty
    if config.console == "stdio":  # the terminal has the output: no lines are kept
        return Console(
            lines=LineStream(maxlen=0),
            sink=stdout_sink,
            err_lines=LineStream(maxlen=0),
            err_sink=stderr_sink,
            source=stdin_source(),
            rate=rate,
            # The truth unless the config says: the guest reads the host's stdin.
            input_tty=os.isatty(0) if tty is None else tty,
        )
    if config.console == "null":
        return Console(
            lines=LineStream(maxlen=0),
            err_lines=LineStream(maxlen=0),
            eof=True,
            rate=rate,
            input_tty=bool(tty),
        )
    return Console(
        lines=LineStream(max_bytes=config.console_buffer),
        err_lines=LineStream(max_bytes=config.console_buffer),
        rate=rate,
        input_tty=bool(tty),
    )
