"""What an idle guest holds in Python: one task (its read loop) until it rests (then none:
tests/test_resting.py), the Waker only while it breaks the guest out, one parsed image
shared by every guest of the same file."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from pathlib import Path
from typing import Any

import pytest

from supervisor import LguestDevice, testing
from supervisor.launcher.devices import Device, Slot
from supervisor.launcher.launcher import Launcher

needs_binutils = pytest.mark.skipif(shutil.which("as") is None, reason="binutils missing")

# Notifies its device (descriptor 0 of a 1 MiB guest's device page), then halts forever.
IDLER = r"""
main:
    LGUEST_INIT
    HCALL 17, 0x100000
1:  HCALL 10
    jmp 1b
"""


class Doorbell(Device):
    """Knows when the guest is up; counts the polls a wake() brings."""

    type = 0x44

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self.polls = 0
        self.polled = asyncio.Event()

    async def notify(self, slot: Slot) -> None:
        self.ready.set()

    def poll(self, slot: Slot) -> None:
        self.polls += 1
        self.polled.set()


def wakers() -> int:
    return sum(t.get_name() == "lguest-waker" and not t.done() for t in asyncio.all_tasks())


SPINNER = r"""
main:
    LGUEST_INIT
    HCALL 17, 0x100000
1:  jmp 1b
"""


async def _launched(
    dev: LguestDevice, tmp_path: Path, source: str
) -> tuple[Launcher, Doorbell, asyncio.Task[Any]]:
    from guestasm import assemble

    path = tmp_path / "guest.img"
    path.write_bytes(assemble(source).image)
    bell = Doorbell()
    launcher = Launcher(dev, path, ram_size=1 << 20, devices=[bell])
    running = asyncio.create_task(launcher.run())
    await asyncio.wait_for(bell.ready.wait(), 60)
    for _ in range(20):
        await asyncio.sleep(0)
    return launcher, bell, running


@needs_binutils
async def test_an_asleep_guest_is_woken_in_the_callers_turn_without_a_task(
    tmp_path: Path,
) -> None:
    async with LguestDevice() as dev:
        launcher, bell, running = await _launched(dev, tmp_path, IDLER)
        try:
            assert wakers() == 0 and bell.slot is not None
            for n in (1, 2):
                bell.slot.wake()  # every CPU halted: polled here, no break, no Waker task
                assert bell.polls == n and wakers() == 0
            assert launcher.stats.woken_at_once == 2
        finally:
            await launcher.kill("done")
            end = await running
    assert end.reason == "done"


@needs_binutils
async def test_a_running_guest_has_a_waker_task_only_while_it_breaks_it_out(
    tmp_path: Path,
) -> None:
    async with LguestDevice() as dev:
        launcher, bell, running = await _launched(dev, tmp_path, SPINNER)
        try:
            assert wakers() == 0 and bell.slot is not None
            bell.slot.wake()
            bell.slot.wake()  # a second wake before the first is answered: one break at most
            assert wakers() == 1 and bell.polls == 0
            await asyncio.wait_for(bell.polled.wait(), 60)
            for _ in range(1000):  # the break ends once the read loop writes BREAK 0
                if wakers() == 0:
                    break
                await asyncio.sleep(0.01)
            assert wakers() == 0 and 1 <= bell.polls <= 2
            bell.polled.clear()
            bell.slot.wake()  # the next wake starts the Waker again
            assert wakers() == 1
            await asyncio.wait_for(bell.polled.wait(), 60)
            assert launcher.stats.woken_at_once == 0
        finally:
            await launcher.kill("done")
            end = await running
    assert end.reason == "done"


def test_guests_of_one_image_file_share_one_parsed_image(tmp_path: Path) -> None:
    from supervisor.launcher.loader import FLAT_TRAILER, read_image

    path = tmp_path / "a.img"
    path.write_bytes(b"\x90" * 100 + FLAT_TRAILER)
    first = read_image(path)
    assert read_image(path) is first
    assert read_image(str(path)) is first
    path.write_bytes(b"\xf4" * 100 + FLAT_TRAILER)  # changed: read afresh
    second = read_image(path)
    assert second is not first and second.segments[0].data[:1] == b"\xf4"


@needs_binutils
def test_a_swarm_holds_no_task_per_running_guest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guestasm import assemble

    from supervisor import GuestConfig, Supervisor
    from supervisor import cli as cli_module
    from supervisor.host import Guest

    image = tmp_path / "sleeper.img"
    image.write_bytes(assemble(testing.SLEEPER).image)
    tasks: list[int] = []
    killers: list[asyncio.Task[None]] = []
    n = 5

    class Counting(Supervisor):
        async def launch(self, config: GuestConfig, **kwargs: Any) -> Guest:
            guest = await super().launch(config, **kwargs)
            tasks.append(len(asyncio.all_tasks()))
            if len(tasks) == n:  # all running: end them, so that the swarm ends
                killers.append(asyncio.create_task(self._kill_all()))
            return guest

        async def _kill_all(self) -> None:
            await asyncio.gather(*(each.kill("enough") for each in self.guests))

    monkeypatch.setattr(cli_module, "Supervisor", Counting)
    config = GuestConfig(image=image, memory="1M", console="null")
    assert asyncio.run(cli_module.run_swarm(config, n)) == 1  # they died: killed
    # Each launch adds the guest's own task and nothing else.
    assert [b - a for a, b in itertools.pairwise(tasks)] == [1] * (n - 1)


def test_objects_every_guest_has_keep_no_attribute_dict() -> None:
    from supervisor import GuestMemory
    from supervisor.flag import Flag
    from supervisor.host import Guest
    from supervisor.launcher.devices import Slot

    memory = GuestMemory(2 * 4096)
    try:
        slot = Slot(memory, 4096, 4096, 1, lambda irq: None, lambda: None)
        for thing in (memory, slot, Flag()):
            assert not hasattr(thing, "__dict__"), type(thing)
        assert Guest.__dictoffset__ == 0  # (one per guest: no attribute dict either)
    finally:
        memory.close()


def _bytes_each(make: Any, n: int = 200) -> float:
    """Python heap bytes one object from ``make()`` holds (tracemalloc, ``n`` of them)."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        made = [make() for _ in range(n)]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(made) == n
    return held / n


async def test_a_cpu_run_state_holds_no_waiter_queues() -> None:
    from supervisor.cpu import RunControl

    # Its three flags (wakeup, idle, break_released) keep no deque until a task waits:
    # asyncio.Events would take about 0.7 KiB each.
    assert _bytes_each(RunControl) < 1024


def test_a_console_that_keeps_no_output_holds_no_line_queue() -> None:
    from supervisor.launcher.console import LineStream

    assert _bytes_each(lambda: LineStream(maxlen=0)) < 600  # (a deque alone: about 0.6 KiB)
    quiet = [LineStream(maxlen=0) for _ in range(2)]
    for stream in quiet:
        stream.push(b"one\ntwo\n")
        stream.close()
        assert stream.dropped == 2 and stream.take() == [] and stream.held == 0


@needs_binutils
async def test_a_launch_returns_once_its_guest_has_started(tmp_path: Path) -> None:
    """Launching in a loop boots the guests one after the other, never all together
    (whose transient objects would leave holes among the long-lived ones): each launch
    gives its guest a turn of the loop, in which it opens its file and boots."""
    from guestasm import assemble

    from supervisor import GuestConfig, Supervisor

    image = tmp_path / "sleeper.img"
    image.write_bytes(assemble(testing.SLEEPER).image)
    config = GuestConfig(image=image, memory="1M", console="null")
    opened: list[int] = []
    async with Supervisor() as sup:
        for _ in range(5):
            await sup.launch(config)
            opened.append(len(sup.device.files))
    assert opened == [1, 2, 3, 4, 5]
