"""The device's control surface: hold, resume, watch and kill are the only way in.

Tools above the device (the debugger, the snapshot code) reach a CPU's control state
only through :class:`LguestFile`'s requests; the run loop is the one writer of the
hold once a slice stopped for a debugger.
"""

from __future__ import annotations

import ast
import asyncio
import errno
from collections.abc import Callable
from pathlib import Path

import pytest
from guestasm import SPIN, boot, until

from supervisor import LguestDevice
from supervisor.cpu import Hold

ROOT = Path(__file__).resolve().parent.parent
# The control state of a CPU: only its owners (the device and the run loop) assign it.
CONTROL = {"hold", "on_hold", "break_out", "reading", "closing", "queued_slice", "inline"}
OWNERS = {"device.py", "run.py", "cpu.py"}


async def test_hold_parks_a_running_cpu_and_tells_its_watcher(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    parked: list[Hold | None] = []
    g.file.watch(0, lambda: parked.append(g.file.hold_reason(0)))
    reader = asyncio.ensure_future(g.file.read(8))
    await until(lambda: g.u32("counter") > 1000)
    g.file.hold(0, Hold.BREAKPOINT)
    await until(lambda: bool(parked))
    assert parked == [Hold.BREAKPOINT] and g.file.paused(0) and not reader.done()
    counter = g.u32("counter")
    g.file.hold(0, Hold.PAUSE)  # already held: the first reason stays
    assert g.file.hold_reason(0) is Hold.BREAKPOINT
    await asyncio.sleep(0.01)
    assert g.u32("counter") == counter  # held: it does not run
    g.file.resume(0)
    await until(lambda: g.u32("counter") > counter)
    g.file.watch(0, None)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


async def test_kill_ends_a_held_guest_and_releases_its_hold(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    told: list[str] = []
    g.file.watch(0, lambda: told.append("parked" if g.file.hold_reason(0) else "dead"))
    reader = asyncio.ensure_future(g.file.read(64))
    await until(lambda: g.file.reading(0))
    await g.file.pause(0)
    g.file.kill("stopped by the test")
    with pytest.raises(FileNotFoundError):
        await reader
    assert g.file.hold_reason(0) is None and told[-1] == "dead"
    assert await g.file.read(64) == b"stopped by the test\0"
    g.file.hold(0, Hold.PAUSE)  # no effect on a dead guest
    assert g.file.hold_reason(0) is None
    g.file.kill("again")  # the first end counts
    assert g.file.death is not None and g.file.death.reason == "stopped by the test"


async def test_the_control_requests_check_the_file_and_the_cpu(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    with pytest.raises(OSError) as bad:
        g.file.hold(1, Hold.PAUSE)
    assert bad.value.errno == errno.EINVAL
    with pytest.raises(OSError) as bad:
        g.file.watch(2, None)
    assert bad.value.errno == errno.EINVAL
    await g.file.close()
    requests: list[Callable[[], None]] = [
        lambda: g.file.hold(0, Hold.PAUSE),
        lambda: g.file.watch(0, None),
    ]
    for request in requests:
        with pytest.raises(OSError) as closed:
            request()
        assert closed.value.errno == errno.EBADF
    g.file.kill("after close")  # no effect
    assert g.file.death is None


def test_only_the_owners_assign_a_cpus_control_state() -> None:
    for path in sorted((ROOT / "supervisor").rglob("*.py")):
        if path.name in OWNERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in CONTROL:
                    owner = ast.unparse(target.value)
                    where = f"{path.name}:{target.lineno}"
                    assert owner == "self", f"{where} assigns {owner}.{target.attr}"


async def test_a_debug_port_reads_a_held_cpu_and_checks_addresses(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    port = g.file.debug_port(0)
    await g.file.pause(0)
    assert port.index == 0 and port.online and port.death is None
    counter = g.guest.symbols["counter"]
    pa = port.physical(counter, 4)  # the guest's own mapping of its data
    assert pa is not None and port.read(pa, 4) == g.memory.read(counter, 4)
    assert port.physical(0xFFFFF000, 4) is None  # no such guest memory
    with pytest.raises(OSError) as bad:
        g.file.debug_port(3)
    assert bad.value.errno == errno.EINVAL
    await g.file.close()
    with pytest.raises(OSError) as closed:
        g.file.debug_port(0)
    assert closed.value.errno == errno.EBADF


def test_one_result_type_from_the_device_up() -> None:
    import supervisor
    from supervisor import host
    from supervisor.launcher import launcher
    from supervisor.state import Exit

    assert supervisor.Exit is host.Exit is Exit
    assert vars(launcher)["Exit"] is Exit  # the Launcher has no result type of its own
    assert not hasattr(supervisor, "Death")
    killed, off = Exit.of("bad page"), Exit.of("power off", exit_status=0)
    reboot = Exit.of("reboot", errno.ERESTART)
    assert killed.died and not killed.ok and not killed.restart
    assert off.ok and not off.died and off == Exit(0, "power off", 0, died=False)
    assert reboot.restart and not reboot.died and reboot.exit_status is None
