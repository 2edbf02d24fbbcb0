"""Limits as a user sets them: GuestConfig, Supervisor, the console rate, the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import types
from pathlib import Path

import pytest

from supervisor import GuestConfig, Supervisor
from supervisor.config import ConfigError
from supervisor.launcher import console as console_module
from supervisor.launcher.console import RateLimit
from supervisor.testing import until

# The subject is the limits' validation and accounting, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

GUESTS = Path(__file__).resolve().parent.parent / "guests"
ROOT = GUESTS.parent


async def test_block_budget_from_config_kills_the_spinner() -> None:
    async with Supervisor() as sup:
        guest = await sup.launch(
            GuestConfig(image=GUESTS / "spinner.img", memory="1M", max_blocks=200_000)
        )
        result = await asyncio.wait_for(guest.wait(), 30)
    assert result.died
    assert result.reason == "instruction budget exhausted (200000 blocks)"


async def test_run_time_budget_from_config_kills_the_spinner() -> None:
    async with Supervisor() as sup:
        guest = await sup.launch(
            GuestConfig(image=GUESTS / "spinner.img", memory="1M", max_run_time=0.05)
        )
        result = await asyncio.wait_for(guest.wait(), 30)
    assert result.reason == "run time limit exceeded (0.05 s)"


async def test_supervisor_guest_limit_refuses_the_extra_guest_only() -> None:
    async with Supervisor(max_guests=1) as sup:
        first = await sup.launch(GuestConfig(image=GUESTS / "spinner.img", memory="1M"))
        await until(lambda: first.stats.run_time > 0)  # the first one runs
        second = await sup.launch(GuestConfig(image=GUESTS / "hello.img", memory="1M"))
        result = await asyncio.wait_for(second.wait(), 60)
        assert result.died and result.reason == "cannot start: Cannot allocate memory"
        assert not first.done


@pytest.mark.parametrize(
    "fields",
    [{"max_blocks": 0}, {"max_run_time": -1.0}, {"console_rate": 0}, {"max_blocks": "lots"}],
)
def test_bad_limits_are_config_errors(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as e:
        GuestConfig.build(image=GUESTS / "hello.img", **fields)
    assert next(iter(fields)) in str(e.value)


async def test_console_rate_makes_the_guest_wait_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float, *args: object, **kwargs: object) -> None:
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr("supervisor.launcher.console.asyncio.sleep", recording_sleep)
    async with Supervisor() as sup:
        guest = await sup.launch(
            GuestConfig(image=GUESTS / "hello.img", memory="1M", console_rate=10)
        )
        lines = [line async for line in guest.console]
        result = await guest.wait()
    assert lines == ["Hello from an lguest guest!"]
    assert result.exit_status == 0
    # 28 bytes at 10 bytes/s with a 10-byte burst: the guest waited 1.8 s in all
    assert sum(waits) == pytest.approx(1.8, abs=0.05)


async def test_rate_limit_refills_over_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a clock the test moves: waits are counted in the bucket's own seconds."""
    clock = [1000.0]
    waits: list[float] = []

    async def sleep(delay: float) -> None:
        waits.append(delay)
        clock[0] += delay

    fake = types.SimpleNamespace(
        get_running_loop=lambda: types.SimpleNamespace(time=lambda: clock[0]), sleep=sleep
    )
    monkeypatch.setattr(console_module, "asyncio", fake)
    bucket = RateLimit(100)
    await bucket.take(100)  # the burst: no wait
    assert waits == []
    await bucket.take(50)  # half a second's worth past the burst
    assert waits == [pytest.approx(0.5)]
    clock[0] += 0.2  # 20 bytes refill meanwhile
    await bucket.take(20)
    assert waits == [pytest.approx(0.5)]
    clock[0] += 10  # refills to one second's worth, not more
    await bucket.take(150)
    assert waits == [pytest.approx(0.5), pytest.approx(0.5)]
    with pytest.raises(ValueError):
        RateLimit(0)


def test_cli_budget_option_kills_and_reports() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor",
            "run",
            str(GUESTS / "spinner.img"),
            "--memory",
            "1M",
            "--max-blocks",
            "50000",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "supervisor: spinner died: instruction budget exhausted (50000 blocks)"
    )
