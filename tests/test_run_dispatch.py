"""run_guest's dispatch, driven by fabricated values: no emulator, no guest.

``pending_exit`` is replaced by a script of :class:`RunState` values and the slice
by a recorder, so each test checks what the run loop does with each state (and
with a slice's :class:`SliceExit`) in order.
"""

from __future__ import annotations

import asyncio
import errno
import math
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor import hypercalls, run, timers
from supervisor.cpu import Hold
from supervisor.execute import SliceExit
from supervisor.run import RunState
from supervisor.state import Exit


class Script:
    """A fabricated CPU and a record of what the run loop did with it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, states: list[RunState | None]) -> None:
        self.done: list[str] = []
        self.states: Iterator[RunState | None] = iter(states)
        other = SimpleNamespace(id=1, wake=lambda: self.done.append("wake cpu 1"))
        self.lg = SimpleNamespace(dead=None, cpus=[], virtual=None)
        self.cpu: Any = SimpleNamespace(
            id=0,
            lg=self.lg,
            fuel=SimpleNamespace(stop=1),
            engine=SimpleNamespace(frozen=None, pool=None, packed=False),
            irqs_pending=0,
            pending_notify=0x1234,
            lguest_data=0x1000,  # (started: a hypercall ends its inline slice)
            trap=SimpleNamespace(debug=None),
            # (It never yields to the loop before a slice: run.YIELD_TIME never passes.)
            run=SimpleNamespace(
                hold=None,
                inline=True,
                wakeup=asyncio.Event(),
                yielded_at=math.inf,
                detached=None,
                rest=None,  # (a reader that lets it rest: none here)
                resting=False,
            ),
            debug=SimpleNamespace(
                on_hold=lambda: self.done.append(f"told holder: {self.cpu.run.hold}")
            ),
        )
        self.lg.cpus = [self.cpu]
        self.other = other
        monkeypatch.setattr(run, "pending_exit", self.next_state)
        monkeypatch.setattr(hypercalls, "do_hypercalls", lambda c: self.done.append("hcall"))
        monkeypatch.setattr(timers, "write_timestamp", lambda c: None)

    def next_state(self, cpu: Any) -> RunState | None:
        assert cpu is self.cpu
        return next(self.states)

    def slices(self, monkeypatch: pytest.MonkeyPatch, exits: list[SliceExit]) -> None:
        """The inline slices end with ``exits``, in order."""
        ends = iter(exits)

        def one_slice(cpu: Any, budget: int | None, **_options: Any) -> SliceExit:
            ended = next(ends)
            self.done.append(f"slice: {ended.name}")
            if ended is SliceExit.DEBUG_STOP:
                cpu.trap.debug = Hold.BREAKPOINT  # what a breakpoint hook records
            return ended

        monkeypatch.setattr(run, "run_slice", one_slice)


async def test_each_state_is_handled_in_turn_until_the_notify(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = Script(
        monkeypatch,
        [None, RunState.HYPERCALL, RunState.HELD, RunState.NOTIFY, RunState.NOTIFY],
    )
    script.slices(monkeypatch, [SliceExit.BUDGET])
    address = await run.run_guest(script.cpu, executor=None)  # type: ignore[arg-type]
    assert address == 0x1234
    # A held CPU tells its holder, then sleeps unless something is pending (a notify).
    assert script.done == ["slice: BUDGET", "hcall", "told holder: None"]
    assert script.cpu.fuel.stop == 0  # every pass clears the kick first
    assert script.cpu.run.inline is False  # a slice that used up its time goes to the pool


async def test_a_debug_stop_is_turned_into_a_hold_by_the_run_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = Script(monkeypatch, [None, RunState.HELD, RunState.BREAK, RunState.BREAK])
    script.slices(monkeypatch, [SliceExit.DEBUG_STOP])
    with pytest.raises(BlockingIOError):
        await run.run_guest(script.cpu, executor=None)  # type: ignore[arg-type]
    assert script.cpu.run.hold is Hold.BREAKPOINT
    assert script.done == ["slice: DEBUG_STOP", f"told holder: {Hold.BREAKPOINT}"]


@pytest.mark.parametrize(
    ("state", "code"),
    [(RunState.CLOSED, errno.EBADF), (RunState.BREAK, errno.EAGAIN)],
)
async def test_a_closed_file_and_a_break_end_the_read(
    monkeypatch: pytest.MonkeyPatch, state: RunState, code: int
) -> None:
    script = Script(monkeypatch, [state])
    with pytest.raises(OSError) as raised:
        await run.run_guest(script.cpu, executor=None)  # type: ignore[arg-type]
    assert raised.value.errno == code
    assert script.done == []


@pytest.mark.parametrize(
    ("end", "code"),
    [(Exit.of("bad"), errno.ENOENT), (Exit.of("reboot", errno.ERESTART), errno.ERESTART)],
)
async def test_a_death_wakes_the_other_cpus_and_tells_the_holder(
    monkeypatch: pytest.MonkeyPatch, end: Exit, code: int
) -> None:
    script = Script(monkeypatch, [RunState.DEATH])
    script.lg.dead = end
    script.lg.cpus.append(script.other)
    with pytest.raises(OSError) as raised:
        await run.run_guest(script.cpu, executor=None)  # type: ignore[arg-type]
    assert raised.value.errno == code
    assert script.done == ["wake cpu 1", "told holder: None"]


async def test_a_halted_cpu_sleeps_until_woken(monkeypatch: pytest.MonkeyPatch) -> None:
    script = Script(
        monkeypatch, [RunState.HALT, RunState.HALT, RunState.NOTIFY]
    )  # the pass, the sleep's check, the pass after the wake
    reader = asyncio.ensure_future(run.run_guest(script.cpu, executor=None))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not reader.done()  # asleep on its wakeup event
    script.cpu.run.wakeup.set()
    assert await reader == 0x1234
