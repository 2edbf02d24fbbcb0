"""Stopping a crowd: a Supervisor closed, or a swarm stopped, with a few hundred guests
alive ends every guest at once (no task or await of its own each) and says what it
stopped."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from guestasm import until

from supervisor import GuestConfig, Supervisor
from supervisor import cli as cli_module
from supervisor.host import Guest

ROOT = Path(__file__).resolve().parent.parent
CROWD = 300
LIMIT = 120.0  # seconds: a bound for failing on a loaded machine, never a wait for success
ENDLESS = GuestConfig(
    image=str(ROOT / "guests" / "ticker.img"),
    memory=1 << 20,
    cmdline="ticks=10000000 period_ms=50",
    console="null",
)


async def _crowd(sup: Supervisor) -> list[Guest]:
    guests = [await sup.launch(ENDLESS.model_copy(update={"name": f"g{i}"})) for i in range(CROWD)]
    await until(lambda: all(g.stats.notifies > 0 for g in guests), LIMIT)  # every one runs
    return guests


async def test_closing_a_supervisor_asks_every_guest_before_it_waits() -> None:
    sup = Supervisor()
    guests = await _crowd(sup)
    tasks = asyncio.all_tasks()
    # A guest that sleeps long enough (a loaded machine delays its ticks) rests with no
    # task of its own, and its kill starts the one that ends it (Launcher.start).
    resting = CROWD - sum(t.get_name() == "lguest-launcher" for t in tasks)
    closing = asyncio.ensure_future(sup.aclose())
    await asyncio.sleep(0)  # aclose's first step: every guest asked, nothing awaited yet
    # (aclose itself, and the resting guests' own): no task per guest for the closing
    assert len(asyncio.all_tasks()) <= len(tasks) + 1 + resting
    async with asyncio.timeout(LIMIT):
        await closing
    assert not sup.device.files  # every guest's file closed, its memory freed
    ends = {(await g.wait()).reason for g in guests}
    assert ends == {"supervisor closed"}


async def test_a_stopped_swarm_closes_every_guest_and_counts_them_stopped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    made: list[Supervisor] = []

    class Watched(Supervisor):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            made.append(self)

    monkeypatch.setattr(cli_module, "Supervisor", Watched)
    swarm = asyncio.ensure_future(cli_module.run_swarm(ENDLESS, CROWD))
    await until(lambda: bool(made) and len(made[0].guests) == CROWD, LIMIT)
    guests = made[0].guests
    await until(lambda: all(g.stats.notifies > 0 for g in guests), LIMIT)
    swarm.cancel()  # as Ctrl-C or SIGTERM does
    async with asyncio.timeout(LIMIT):
        with pytest.raises(asyncio.CancelledError):
            await swarm
    assert not made[0].device.files
    assert all(g.done for g in guests)
    out = capsys.readouterr().out
    # Stopped, not died: the table's finished, failed and died cells are all 0.
    assert re.search(r"│\s+0 │\s+0 │\s+0 │", out), out
    assert f"interrupted: {CROWD} guests stopped, 0 never launched" in out


def test_a_signalled_swarm_of_hundreds_exits_143_with_its_table() -> None:
    args = ["swarm", "-n", str(CROWD), "guests/ticker.img", "--memory", "1M", "--cmdline",
            "ticks=10000000 period_ms=50", "--console", "prefix", "--processes", "1"]  # fmt: skip
    swarm = subprocess.Popen(
        [sys.executable, "-m", "supervisor", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert swarm.stdout is not None
        # Running, every guest launched: the last one's first line (a launch boots its
        # guest before the next, so the first lines come before the last launch).
        last = f"ticker-{CROWD - 1}: "
        assert any(line.startswith(last) for line in swarm.stdout)
        swarm.send_signal(signal.SIGTERM)
        out, err = swarm.communicate(timeout=LIMIT)
    finally:
        swarm.kill()
    assert (swarm.returncode, err) == (143, "supervisor: terminated\n")
    assert f"interrupted: {CROWD} guests stopped, 0 never launched" in out
