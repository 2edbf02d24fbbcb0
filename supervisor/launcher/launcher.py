"""The Launcher: boot one guest through the public device API and serve its devices.

One boot: fresh :class:`~supervisor.GuestMemory` holding the image, page tables
and boot info, the device page filled, ``LHREQ_INITIALIZE``; then the read loop,
as lguest's Launcher did it:

* a full read returns a notify address: the device there is serviced, then
  any irqs the devices raised are sent (``LHREQ_IRQ``) before the next read;
* ``EAGAIN``: the Waker broke the guest out because a device has news; every
  device is polled, irqs are sent, and ``LHREQ_BREAK 0`` releases the Waker
  (a guest whose every CPU is asleep, halted until an interrupt, is stopped
  already: the Waker polls the devices and sends their irqs itself, no break);
* ``ENOENT``: the guest died; the next read returns the reason;
* ``ERESTART``: the guest asked for a reboot; the image is read again and the
  guest boots afresh, at most ``max_restarts`` times.

The Waker coroutine holds only ``f.waker()``: when a device calls
:meth:`~supervisor.launcher.devices.Slot.wake` it writes ``LHREQ_BREAK 1``,
unless every CPU is asleep (then it polls the devices itself and sends their
irqs).  It runs only while a device wants attention (a task started by the wake,
ended once no wake is left to answer).  An idle guest with one CPU has no task at all
once its registers are packed: its read rests and the read loop's task ends, and the
CPU's next wake starts another (:meth:`Launcher.start`).

The image, page tables and boot info of a boot are built once per (image, memory
size, command line, environment, CPUs, device types) into a
:class:`~supervisor.memory.MemoryTemplate` (:func:`boot_template`, a small
most-recently-used cache), and each boot maps it copy-on-write: a thousand guests
of one image hold one copy of every page none of them writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .. import abi
from ..device import LguestDevice, LguestFile, Waker
from ..flag import Flag
from ..limits import Limits
from ..memory import GuestMemory, MemoryTemplate
from ..state import Exit, GuestState
from ..virtual import Hold
from .devices import Device, DeviceTable, write_descriptors
from .layout import (
    CMDLINE_MAX,
    Layout,
    build_pagetables,
    env_block,
    plan,
    write_boot_info,
)
from .loader import Image, check_fits, load_image, read_image

REASON_SIZE = 1024
TEMPLATES_KEPT = 32  # boot templates cached (each holds its image's pages, once)
_templates: OrderedDict[tuple[object, ...], MemoryTemplate] = OrderedDict()


def boot_template(
    image: Image, layout: Layout, devices: Sequence[int], cmdline: bytes, cpus: int, env: bytes
) -> MemoryTemplate:
    """The memory a boot starts from: ``image`` loaded, page tables and boot info
    written, the device page holding the descriptors of devices of the types
    ``devices`` as a boot starts them; built on first use, then shared from the cache.

    ``image`` must fit ``layout`` (:func:`~supervisor.launcher.loader.check_fits`).
    """
    types = tuple(devices)
    key = (image.segments, layout.memory_size, types, cmdline, cpus, env)
    template = _templates.get(key)
    if template is not None:
        _templates.move_to_end(key)
        return template

    def fill(view: memoryview) -> None:
        load_image(image, view, layout)
        build_pagetables(view, layout)
        write_boot_info(view, layout, len(types), cmdline, cpus, env)
        write_descriptors(view, layout.device_page, types)

    template = _templates[key] = MemoryTemplate(layout.memory_size, fill)
    while len(_templates) > TEMPLATES_KEPT:
        _templates.popitem(last=False)[1].close()
    return template


# A guest's translation buffer holds the host code its hot guest code became: about 8
# bytes per byte of x86 (docs/performance.md, "A real program against raw Unicorn").  A
# buffer too small for that is emptied whenever it fills, and everything is translated
# again.  A buffer of 2 MiB or more costs a huge page of RSS (about 2 MiB) as soon as
# anything is translated, then what is translated into it, whatever its size.
TRANSLATED_PER_IMAGE_BYTE = 8
MAX_TCG_BUFFER = 64 << 20


def translation_buffer(image: Image, least: int) -> int:
    """The translation buffer for ``image``'s CPUs: ``least`` (the device's), doubled
    until it holds :data:`TRANSLATED_PER_IMAGE_BYTE` times the image's loaded bytes, at
    most :data:`MAX_TCG_BUFFER` (and never below ``least``).  Small guests keep the
    device's small buffer (its memory per guest); a real program gets room for its
    code."""
    want = TRANSLATED_PER_IMAGE_BYTE * sum(len(s.data) for s in image.segments)
    size = least
    while size < want and size < MAX_TCG_BUFFER:
        size *= 2
    return max(least, min(size, MAX_TCG_BUFFER))


# GuestStats fields the Launcher counts itself (the others sum its CPUs' CpuStats).
_LAUNCHER_COUNTS = ("notifies", "breaks", "woken_at_once", "served_in_read", "rests")


class _Killed(Exception):
    """Raised inside the read loop when the Launcher ends the guest itself."""


class _Resting(Exception):
    """Raised inside the read loop when its read ended resting (``LguestFile.rest_when_idle``):
    the task ends, the boot and the devices stay as they are, and the CPU's next wake
    starts another task that reads on (:meth:`Launcher.start`)."""


DEFAULT_MAX_RESTARTS = 8

# What a task waiting in Launcher.rested waits on, by Launcher: made only when one waits,
# so that a guest nobody waits for holds nothing more.  Set as each task of start() ends
# (the read rested, or the guest ended).
_segment_ends: weakref.WeakKeyDictionary[Launcher, Flag] = weakref.WeakKeyDictionary()


@dataclass
class GuestStats:
    """Counters summed over every boot of one guest (see :class:`supervisor.cpu.CpuStats`)."""

    blocks: int = 0  # translated blocks executed
    slices: int = 0  # slices run (each enters the guest until the run loop is needed)
    exits: int = 0
    hypercalls: int = 0
    interrupts: int = 0
    notifies: int = 0
    breaks: int = 0  # times the Waker broke the guest out for a device's news
    # times a device's news found it asleep and woke it at once, without the Waker's task
    woken_at_once: int = 0
    # notifies a device served inside the guest's read, without the read loop's pass
    served_in_read: int = 0
    run_time: float = 0.0  # seconds inside guest slices
    hibernations: int = 0  # times the guest gave back its emulator while idle
    wakes: int = 0  # times it took a new one
    rests: int = 0  # times its read ended resting: no task served it until its next wake

    def add(self, other: GuestStats) -> GuestStats:
        return GuestStats(
            *(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self))
        )


@dataclass(frozen=True)
class Resume:
    """How a Launcher's first boot continues a guest instead of booting it afresh.

    ``fill`` writes the guest's memory into the (zeroed) memory of the first boot;
    ``state`` is its :class:`~supervisor.state.GuestState`; ``launcher`` is what
    :meth:`Launcher.state` returned for it (None: nothing to restore).
    """

    fill: Callable[[GuestMemory], None]
    state: GuestState
    launcher: dict[str, Any] | None = None


class Launcher:
    """Runs one guest from ``image`` with ``devices`` in ``ram_size`` bytes of RAM.

    Construction validates the layout and the image fit (``ValueError`` /
    :class:`~supervisor.launcher.loader.ImageError`); :meth:`run` boots it and
    returns its :class:`Exit`.  :meth:`kill` ends it from any other task.
    """

    # (One per guest: an idle guest's largest object without them.)
    __slots__ = (
        "__weakref__", "_attention", "_breaking", "_breaks", "_dev", "_done_stats",
        "_ended", "_irqs", "_killed", "_notifies", "_open", "_rejoin", "_resting", "_rests",
        "_result", "_resume", "_served", "_served_in_read", "_source", "_started", "_task",
        "_waker", "_waking", "_woken_at_once", "cmdline", "cpus", "devices", "env", "file",
        "hibernate_after", "image", "layout", "limits", "max_restarts", "on_boot", "restarts",
    )  # fmt: skip

    def __init__(
        self,
        device: LguestDevice,
        image: Image | str | Path,
        *,
        ram_size: int,
        devices: Sequence[Device] = (),
        cmdline: str | bytes = b"",
        max_restarts: int = DEFAULT_MAX_RESTARTS,
        limits: Limits | None = None,
        resume: Resume | None = None,
        hibernate_after: float | None = None,
        cpus: int = 1,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``env`` is the guest's environment (boot info page, ``layout.env_block``).
        ``resume`` continues a guest (a snapshot's) on the first boot; its memory
        size must be this layout's.  ``cpus`` is how many CPUs the guest has (CPU 0
        boots; the guest starts the others); each is read by a task of its own."""
        if resume is not None:
            cpus = len(resume.state.cpus)  # the guest it continues has them
        if not 1 <= cpus <= abi.MAX_CPUS:
            raise ValueError(f"a guest has 1 to {abi.MAX_CPUS} CPUs, not {cpus}")
        self.cpus = cpus
        self._dev = device
        self.limits = limits
        self._source = image if isinstance(image, str | Path) else None
        self.image = read_image(image) if isinstance(image, str | Path) else image
        self.layout: Layout = plan(ram_size)
        self.devices = DeviceTable(list(devices))
        self.cmdline = cmdline.encode() if isinstance(cmdline, str) else cmdline
        self.env = env_block(env or {})
        self.max_restarts = max_restarts
        self.restarts = 0
        self.file: LguestFile | None = None
        self._done_stats = GuestStats()
        self._notifies = 0
        self._breaks = 0
        self._irqs: set[int] = set()
        self._attention = False  # a device called wake(): the Waker has a break to write
        self._waker: Waker | None = None  # this boot's, while it is served
        self._served: LguestFile | None = None  # this boot's file, while it is served
        self._breaking: asyncio.Task[None] | None = None  # the Waker, while it writes
        self._waking = False  # _woke_asleep is polling (a wake meanwhile goes to the Waker)
        self._woken_at_once = 0
        self._served_in_read = 0
        self._killed: str | None = None
        self._ended = False
        self._task: asyncio.Task[Any] | None = None  # the task serving it (None: resting)
        self._result: asyncio.Future[Exit] | None = None  # start()'s
        self._resting = False  # its read rests: no task until the CPU's next wake
        self._rests = 0
        self._started = False  # the devices were started
        self._open: tuple[GuestMemory, LguestFile] | None = None  # a resting boot's
        # Called with each boot's file after INITIALIZE, before it runs (debugger, restore).
        self.on_boot: list[Callable[[LguestFile], None]] = []
        self._resume = resume
        self.hibernate_after = hibernate_after  # None: the device's
        # Deterministic mode: no quantum runs from a boot's end that reboots to the next
        # boot's CPUs being in the schedule (or the end), so the guest rejoins it where
        # it left, however long the reload takes on the host.
        self._rejoin: Hold | None = None
        self._check()

    def _check(self) -> None:
        check_fits(self.image, self.layout)
        if len(self.cmdline) >= CMDLINE_MAX:
            raise ValueError(f"command line longer than {CMDLINE_MAX - 1} bytes")
        resume = self._resume
        if resume is not None:
            if resume.state.memory_size != self.layout.memory_size:
                raise ValueError(
                    f"the guest to resume had {resume.state.memory_size} bytes of memory, "
                    f"this layout has {self.layout.memory_size}"
                )
            if resume.launcher is not None:
                self._check_state(resume.launcher)

    # -- the Launcher's part of a snapshot ------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Reboots so far, irqs the devices raised but not yet sent, each device's state.

        Take it while the guest is held inside the read (see ``Guest.pause``):
        then no device request is half-served.
        """
        return {
            "restarts": self.restarts,
            "irqs": sorted(self._irqs),
            "devices": [{"type": d.type, "state": d.state()} for d in self.devices],
        }

    def _check_state(self, state: dict[str, Any]) -> None:
        """``ValueError`` unless ``state`` is a :meth:`state` this Launcher can take."""
        restarts, irqs, devices = state.get("restarts"), state.get("irqs"), state.get("devices")
        if not isinstance(restarts, int) or restarts < 0:
            raise ValueError(f"bad Launcher state: restarts {restarts!r}")
        if not isinstance(irqs, list) or not all(
            isinstance(i, int) and 0 <= i < abi.LGUEST_IRQS for i in irqs
        ):
            raise ValueError(f"bad Launcher state: irqs {irqs!r}")
        if not isinstance(devices, list) or not all(
            isinstance(d, dict) and isinstance(d.get("type"), int) and "state" in d for d in devices
        ):
            raise ValueError("bad Launcher state: devices")

    def _restore(self, state: dict[str, Any]) -> None:
        """Take back :meth:`state` (first boot of a resumed guest, devices attached)."""
        self.restarts = state["restarts"]
        self._irqs.update(state["irqs"])
        for device, entry in zip(self.devices, state["devices"], strict=False):
            if device.type == entry["type"] and entry["state"] is not None:
                device.restore(entry["state"])

    def _rejoined(self) -> None:
        if self._rejoin is not None:
            self._rejoin.release()
            self._rejoin = None

    def _fresh_memory(self) -> GuestMemory:
        """Memory holding the image, page tables and boot info (copy-on-write)."""
        template = boot_template(
            self.image, self.layout, self.devices.types, self.cmdline, self.cpus, self.env
        )
        return GuestMemory(self.layout.memory_size, template)

    # -- public ----------------------------------------------------------------
    @property
    def stats(self) -> GuestStats:
        """Counters so far, including every earlier boot."""
        return self._done_stats.add(self._current_stats())

    def _current_stats(self) -> GuestStats:
        total = GuestStats(
            notifies=self._notifies,
            breaks=self._breaks,
            woken_at_once=self._woken_at_once,
            served_in_read=self._served_in_read,
            rests=self._rests,
        )
        for s in self.file.cpu_stats if self.file is not None else ():
            shared = {f.name: getattr(s, f.name) for f in dataclasses.fields(GuestStats)
                      if f.name not in _LAUNCHER_COUNTS}  # fmt: skip
            total = total.add(GuestStats(**shared))
        return total

    async def kill(self, reason: str = "killed") -> None:
        """End the guest: :meth:`run` returns ``Exit(died=True, reason=reason)``.

        The running read is cancelled (which stops the guest where it is) and
        :meth:`run` frees everything itself; await it (or the task running it)
        to see the end.  No effect on a guest that has already ended.
        """
        self.kill_now(reason)

    def kill_now(self, reason: str = "killed") -> None:
        """:meth:`kill` without a coroutine: a caller ending many guests at once asks
        each in turn, then waits for their ends together."""
        if self._killed is not None or self._ended:
            return
        self._killed = reason
        if self._resting:
            self._restart()  # its task ends it
        elif self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()

    def _die(self, reason: str) -> NoReturn:
        """End the guest from inside the read loop (a Host-side verdict)."""
        self._killed = reason
        raise _Killed(reason)

    def start(self) -> asyncio.Future[Exit]:
        """Run the guest as :meth:`run` does, in tasks of its own; the future gets its
        :class:`Exit` (or what the Host raised).

        While a guest with one CPU sleeps in a halt with its registers packed, no task
        serves it: its read rests (``LguestFile.rest_when_idle``), the task ends with
        the boot, its file and the devices left as they are, and the CPU's next wake (an
        irq, a timer, a device's news, a hold, a kill) starts a task that reads on.
        """
        self._result = asyncio.get_running_loop().create_future()
        self._segment()
        return self._result

    def _segment(self) -> None:
        # (run() sets _task in its first step: a kill before that finds none to cancel
        # and the task sees _killed instead, as a kill before run() does.)
        asyncio.get_running_loop().create_task(self._drive(), name="lguest-launcher")

    def _restart(self) -> None:
        """The resting CPU's wake (or a kill): a task serves the guest on."""
        if self._resting:
            self._resting = False
            self._segment()

    async def rested(self, times: int = 1) -> bool:
        """Wait until the guest's read has rested ``times`` times in all (``stats.rests``,
        every boot's; see :meth:`start`) or the guest has ended; whether it rested so
        often.  At once if it has already; False at once for a Launcher not started with
        :meth:`start` (its read never rests)."""
        while self.stats.rests < times:
            if self._result is None or self._result.done():
                return False
            ended = _segment_ends.get(self)
            if ended is None:
                ended = _segment_ends[self] = Flag()
            ended.clear()
            await ended.wait()
        return True

    async def _drive(self) -> None:
        """One task of :meth:`start`: :meth:`run` until it ends or rests."""
        result = self._result
        assert result is not None
        try:
            end = await self.run()
        except _Resting:
            self._task = None
            self._resting = True
            return
        except asyncio.CancelledError:
            result.cancel()
            raise
        except BaseException as exc:
            result.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        else:
            result.set_result(end)
        finally:
            ended = _segment_ends.get(self) if _segment_ends else None
            if ended is not None:
                ended.set()

    async def run(self) -> Exit:
        """Start the devices, boot (and reboot) the guest; return how it ended.

        Devices are stopped and the device file and memory freed before this
        returns, whatever happens (cancellation included).
        """
        self._task = asyncio.current_task()
        resting = False
        try:
            if not self._started:
                self._started = True
                for device in self.devices:
                    await device.start()
            return await self._lifetime()
        except _Resting:
            resting = True
            raise
        except (_Killed, asyncio.CancelledError):
            if self._killed is None:
                raise  # cancelled by someone else: not ours to swallow
            if self._task is not None and self._task.cancelling():
                self._task.uncancel()
            return Exit(None, self._killed, self.restarts, died=True)
        finally:
            if not resting:
                self._ended = True
                self._rejoined()
                for device in self.devices:
                    with contextlib.suppress(Exception):
                        await device.stop()

    async def _lifetime(self) -> Exit:
        while True:
            if self._killed is not None and self._open is None:
                raise _Killed(self._killed)
            end = await self._boot()
            if not end.restart:
                return dataclasses.replace(end, restarts=self.restarts)
            if self.restarts >= self.max_restarts:
                reason = f"too many restarts ({self.restarts}): {end.reason}"
                return Exit(None, reason, self.restarts, died=True)
            self.restarts += 1
            if self._source is not None:
                try:  # read afresh: it may have changed, or be gone
                    self.image = read_image(self._source)
                    self._check()
                except (OSError, ValueError) as exc:
                    reason = f"cannot reboot: {exc}"
                    return Exit(None, reason, self.restarts, died=True)

    # -- one boot ----------------------------------------------------------------
    async def _boot(self) -> Exit:
        """Run one boot (the first of a resumed guest continues it); return its end.
        A boot whose read rests (:meth:`start`) is served on from where it rested."""
        opened, self._open = self._open, None
        if opened is not None:
            return await self._serve_boot(*opened, resumed=True)
        resume, self._resume = self._resume, None
        if resume is None:
            memory = self._fresh_memory()
            entry = self.image.entry
        else:
            memory, entry = GuestMemory(self.layout.memory_size), 0
        try:
            self._irqs.clear()
            self.devices.attach(
                memory, self.layout.ram_size, self.layout.device_page, self._irqs.add, self._wake
            )
            if resume is not None:
                resume.fill(memory)  # after attach: the descriptors are the guest's, as saved
            if resume is not None and resume.launcher is not None:
                try:
                    self._restore(resume.launcher)
                except ValueError as exc:
                    self._die(f"cannot resume: {exc}")
            try:
                f = self._dev.open(
                    memory,
                    limits=self.limits,
                    state=None if resume is None else resume.state,
                    hibernate_after=self.hibernate_after,
                    tcg_buffer=translation_buffer(self.image, self._dev.tcg_buffer),
                )
            except OSError as exc:
                self._die(f"cannot start: {exc.strerror}")
            try:
                self.file = f
                try:
                    try:
                        if resume is None:
                            await f.write(
                                abi.pack_words(
                                    abi.LHREQ_INITIALIZE,
                                    memory.address,
                                    self.layout.pfn_limit,
                                    self.layout.pgdir,
                                    entry,
                                    *([self.cpus] if self.cpus > 1 else []),
                                )
                            )
                    except OSError as exc:
                        self._die(f"cannot start: {exc.strerror}")
                    f.serve_notifies(functools.partial(self._notify_now, f))
                    if self._result is not None and self.cpus == 1:
                        f.rest_when_idle(self._restart)
                    for hook in self.on_boot:
                        hook(f)
                    self._rejoined()
                except BaseException:
                    self._end_boot()
                    raise
            except BaseException:
                await f.close()
                raise
        except BaseException:
            memory.close()
            raise
        return await self._serve_boot(memory, f)

    async def _serve_boot(self, memory: GuestMemory, f: LguestFile, resumed: bool = False) -> Exit:
        """Serve a booted guest until it ends (its end) or rests (:class:`_Resting`: the
        file and memory are kept for the next task); then close the file and the memory."""
        resting = False
        try:
            try:
                try:
                    if resumed and self._killed is not None:
                        raise _Killed(self._killed)  # killed while resting
                    end = await self._serve(f)
                    sim = self._dev.virtual
                    if end.restart and sim is not None and self._rejoin is None:
                        self._rejoin = sim.hold()
                    return end
                except _Resting:
                    resting = True
                    self._open = (memory, f)
                    raise
                finally:
                    if not resting:
                        self._end_boot()
            finally:
                if not resting:
                    await f.close()
        finally:
            if not resting:
                memory.close()

    def _end_boot(self) -> None:
        self._done_stats = self._done_stats.add(self._current_stats())
        self._notifies = 0
        self._breaks = 0
        self._woken_at_once = 0
        self._served_in_read = 0
        self._rests = 0
        self.file = None

    def _wake(self) -> None:
        self._attention = True
        if self._breaking is None and self._waker is not None and self._served is not None:
            if not self._waking and self._woke_asleep(self._served):
                return
            self._breaking = asyncio.create_task(
                self._break_out(self._served, self._waker), name="lguest-waker"
            )

    def _woke_asleep(self, f: LguestFile) -> bool:
        """If every CPU of ``f`` is asleep, poll the devices and send their irqs now, in
        the caller's turn of the loop, and return True: the irq wakes the CPU's run loop
        directly, with no Waker task to schedule first.  False (nothing sent) if a CPU is
        awake or a device failed (the Waker then breaks it out and the read loop's poll
        kills with the reason), or if a device asked again meanwhile (the Waker sees to
        it)."""
        self._waking = True
        self._attention = False
        try:
            if not self._polled_asleep(f):
                self._attention = True
                return False
            while self._irqs:
                f.send_irq(self._irqs.pop())
            self._woken_at_once += 1
        except OSError:  # it died meanwhile: nothing to wake
            return True
        finally:
            self._waking = False
        return not self._attention

    async def _serve(self, f: LguestFile) -> Exit:
        """Read every CPU, each in a task of its own, until the guest ends; every
        read loop ends with the same end.  The Waker breaks CPU 0 out, and device
        interrupts go to CPU 0.  A resting read loop (:class:`_Resting`) keeps the Waker."""
        if self._served is not f:  # (else a resting boot's, served on)
            self._served = f
            self._waker = f.waker()
            if self._attention:  # woken before this boot was served
                self._poll_unstarted(f)
        resting = False
        try:
            if f.cpu_count == 1:
                try:
                    return await self._read_loop(f, 0)
                except _Resting:
                    resting = True
                    raise
            async with asyncio.TaskGroup() as readers:
                loops = [
                    readers.create_task(self._read_loop(f, n), name=f"lguest-cpu{n}")
                    for n in range(f.cpu_count)
                ]
            return loops[0].result()
        except* _Killed as group:
            raise group.exceptions[0] from None
        finally:
            breaking = self._breaking
            if not resting:
                self._waker = None
                self._served = None
                if breaking is not None:
                    breaking.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await breaking

    def _poll_unstarted(self, f: LguestFile) -> None:
        """A device asked for attention before the boot's first read (a ``null`` console's
        end of input, input fed before the boot): no CPU of ``f`` has run since, so the
        guest is stopped, and the devices are polled now and their irqs sent, for its
        first slice to take (an irq waits until the guest can take it).  Without this the
        Waker would find the guest asleep after its first halt and wake it once more just
        for that.  A device that fails leaves it to the Waker, whose break's poll kills
        with the reason."""
        self._attention = False
        for device, slot in self.devices.slots():
            try:
                device.poll(slot)
            except Exception:
                self._wake()
                return
        try:
            while self._irqs:
                f.send_irq(self._irqs.pop())
        except OSError:
            return  # dead already: its first read says why
        if self._attention:  # (asked again meanwhile)
            self._wake()

    async def _read_loop(self, f: LguestFile, cpu: int) -> Exit:
        while True:
            try:
                data = await f.read(REASON_SIZE, cpu)
            except BlockingIOError:  # EAGAIN: the Waker broke us out
                await self._poll()
                try:
                    await self._send_irqs(f)
                    await f.write(abi.pack_words(abi.LHREQ_BREAK, 0))
                except FileNotFoundError:
                    pass  # it died in the same slice: the next read says why
                continue
            except FileNotFoundError:  # ENOENT: it died; the next read says why
                continue
            except OSError as exc:
                if exc.errno == errno.ERESTART and f.death is not None:
                    return f.death
                raise
            if not data:  # resting: the CPU's next wake reads on
                self._rests += 1
                raise _Resting
            if f.death is not None:
                reason = data.split(b"\0", 1)[0].decode("utf-8", "replace")
                return dataclasses.replace(f.death, reason=reason or f.death.reason)
            (address,) = abi.unpack_words(data[: abi.WORD_SIZE])
            await self._notify(f, address)

    async def _notify(self, f: LguestFile, address: int) -> None:
        """Service the device at ``address``; a bad address or a failing device kills."""
        self._notifies += 1
        found = self.devices.lookup(address)
        if found is None:
            self._die(f"notify of unknown device address {address:#x}")
        device, slot = found
        try:
            await device.notify(slot)
        except Exception as exc:
            self._die(f"device {type(device).__name__} failed: {exc}")
        await self._send_irqs(f)

    def _notify_now(self, f: LguestFile, address: int) -> bool:
        """The file's notify handler (``LguestFile.serve_notifies``): inside the guest's
        read, have the device at ``address`` serve the request now if it can
        (``Device.notify_now``) and send the irqs raised; the guest goes on without a
        pass through the read loop.  False (nothing done) otherwise: the read returns
        the address to :meth:`_read_loop`, which also kills for a bad one.  A failing
        device kills, as in :meth:`_notify`."""
        found = self.devices.lookup(address)
        if found is None:
            return False
        device, slot = found
        try:
            if not device.notify_now(slot):
                return False
        except Exception as exc:
            self._die(f"device {type(device).__name__} failed: {exc}")
        self._notifies += 1
        self._served_in_read += 1
        try:
            while self._irqs:
                f.send_irq(self._irqs.pop())
        except OSError:
            pass  # dead meanwhile: the run loop's next pass sees it
        return True

    async def _poll(self) -> None:
        """Let every device catch up; a failing device kills the guest."""
        for device, slot in self.devices.slots():
            try:
                device.poll(slot)
            except Exception as exc:
                self._die(f"device {type(device).__name__} failed: {exc}")

    async def _send_irqs(self, f: LguestFile) -> None:
        """Send every irq the devices raised (``ENOENT`` if the guest is dead)."""
        while self._irqs:
            await f.write(abi.pack_words(abi.LHREQ_IRQ, self._irqs.pop()))

    async def _break_out(self, f: LguestFile, waker: Waker) -> None:
        """The Waker: while a device wants attention, have the devices polled, until
        none wants it or the file dies.

        A guest whose every CPU is asleep (halted until an interrupt, no slice queued)
        is stopped already: the devices are polled here and their irqs sent, which
        wakes it, without the break's round trip through the read loop.  Otherwise it
        writes ``LHREQ_BREAK 1``, which waits for the read loop's ``LHREQ_BREAK 0``.  A
        device that fails in the asleep poll is polled again by the read loop after a
        break, which kills the guest with the reason."""
        try:
            while self._attention:
                self._attention = False
                try:
                    if self._polled_asleep(f):
                        await self._send_irqs(f)
                        continue
                    self._breaks += 1
                    await waker.brk(True)
                except OSError:  # the file died: nothing more to break this boot
                    if self._waker is waker:
                        self._waker = None
                    return
        finally:
            self._breaking = None

    def _polled_asleep(self, f: LguestFile) -> bool:
        """Poll every device now if every CPU of ``f`` is asleep; whether it did."""
        if f.closed or f.death is not None:
            return False
        if not f.cpu_count or not all(f.asleep(n) for n in range(f.cpu_count)):
            return False
        for device, slot in self.devices.slots():
            try:
                device.poll(slot)
            except Exception:
                return False  # the break's poll (in the read loop) kills with the reason
        return True
