"""Console output served inside the guest's read (``Console.notify_now``): a line the
console can take without waiting (no rate limit, no sink, room in its lines) goes on in
the same read, with no pass through the Launcher's read loop; one that would wait (the
reader is ``console_buffer`` behind) is awaited there as before, and nothing is lost or
reordered.  Counted, never timed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from supervisor import GuestConfig, Supervisor
from supervisor.launcher.console import LineStream
from supervisor.testing import until

LIMIT = 60  # seconds: a bound for failing, never a wait for success
TICKER = Path(__file__).resolve().parent.parent / "guests" / "ticker.img"


def test_put_now_adds_only_what_put_would_add_without_waiting() -> None:
    stream = LineStream(max_bytes=4096)
    assert stream.put_now(b"one\ntw")
    assert stream.take() == ["one"] and stream.partial == b"tw"
    # 64 bytes a line at most besides its text: 4096 bytes hold 4096 // 64 new bytes.
    held = stream.held
    assert not stream.put_now(b"x" * ((4096 - held) // LineStream.LINE_COST + 1))
    assert stream.held == held and stream.partial == b"tw"  # nothing added
    counted = LineStream(maxlen=0)  # keeps nothing: never full
    assert counted.put_now(b"a\n" * 10_000) and counted.dropped == 10_000


async def test_a_tickers_lines_are_served_inside_its_read() -> None:
    """Every console notify of a ticker (three ticks, each line written in three
    notifies, and "done") is served inside its read: none by the read loop."""
    config = GuestConfig(image=TICKER, memory="1M", cmdline="ticks=3 period_ms=1")
    async with Supervisor() as sup:
        guest = await sup.launch(config)
        lines = [line async for line in guest.console]
        assert (await asyncio.wait_for(guest.wait(), LIMIT)).ok
        stats = guest.stats
    assert lines == ["tick 1", "tick 2", "tick 3", "done"]
    assert stats.notifies >= 10 and stats.served_in_read == stats.notifies, stats


async def test_a_full_console_makes_the_guest_wait_and_loses_nothing() -> None:
    """With nobody reading, a 4 KiB console fills: the guest waits in the read loop's
    awaited notify (back-pressure), then goes on as its lines are read, every line
    once and in order."""
    ticks = 300  # "tick N" lines: a 4 KiB console holds about 56 unread
    config = GuestConfig(
        image=TICKER, memory="1M", cmdline=f"ticks={ticks} period_ms=0", console_buffer=4096
    )
    async with Supervisor() as sup:
        guest = await sup.launch(config)
        stream = guest.console
        await until(lambda: stream.held + LineStream.LINE_COST > stream.max_bytes, LIMIT)
        counts = []
        for _ in range(2):  # (the notify that found it full counts as it starts waiting)
            for _ in range(20):
                await asyncio.sleep(0.005)  # loop turns: a guest not held back would go on
            counts.append(guest.stats.notifies)
        assert not guest.done and counts[0] == counts[1]  # it waits
        lines = [line async for line in stream]
        assert (await asyncio.wait_for(guest.wait(), LIMIT)).ok
        stats = guest.stats
    assert lines == [f"tick {n}" for n in range(1, ticks + 1)] + ["done"]
    assert stats.notifies - stats.served_in_read >= 1, stats  # the awaited ones
