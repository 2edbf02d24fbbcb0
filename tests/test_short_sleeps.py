"""Short sleeps: a CPU whose clock event is due within ``hibernation.PACK_SOON`` times
``PACK_AFTER`` when its pack comes due is left unpacked (its wake would unpack at once),
and ticks exactly as one that packs.  Counted (packs, rests, packs put off), never
timed: the choice depends on the due times alone, not on how late the loop runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from supervisor import GuestConfig, Supervisor, hibernation

LIMIT = 60  # seconds: a bound for failing, never a wait for success
TICKER = Path(__file__).resolve().parent.parent / "guests" / "ticker.img"
TICKED = ["tick 1", "tick 2", "tick 3", "done"]


async def _ticks(period_ms: int) -> tuple[list[str], int, int, int, int]:
    """A ticker's lines, its exit status, its rests, and the device's packs and packs
    put off."""
    config = GuestConfig(
        image=TICKER, memory="1M", cmdline=f"ticks=3 period_ms={period_ms}", console="capture"
    )
    async with Supervisor() as sup:
        guest = await sup.launch(config)
        async with asyncio.timeout(LIMIT):
            lines = [line async for line in guest.console]
            end = await guest.wait()
        dorm = sup.device.dormitory
        return lines, end.exit_status or 0, guest.stats.rests, dorm.packs, dorm.left_unpacked


async def test_a_ticker_that_sleeps_less_than_twice_pack_after_is_never_packed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each sleep is 80 ms: its pack is due after 50 ms, 30 ms before its tick.
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.05)
    lines, status, rests, packs, put_off = await _ticks(80)
    assert (lines, status) == (TICKED, 0)
    assert rests == packs == 0
    assert put_off >= 3  # at least once a sleep


async def test_a_ticker_that_sleeps_longer_is_packed_at_every_sleep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each sleep is 200 ms: its pack is due after 20 ms, 180 ms before its tick.
    monkeypatch.setattr(hibernation, "PACK_AFTER", 0.02)
    lines, status, rests, packs, put_off = await _ticks(200)
    assert (lines, status) == (TICKED, 0)
    assert rests == packs == 3
    assert put_off == 0
