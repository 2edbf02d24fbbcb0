"""Flag: asyncio.Event's behaviour (set wakes every waiter, clear, cancel) without its queue."""

from __future__ import annotations

import asyncio
import sys

import pytest

from supervisor.flag import Flag


async def test_set_wakes_every_waiter_and_a_set_flag_does_not_wait() -> None:
    flag = Flag()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        assert await flag.wait() is True
        woken.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert woken == [] and not flag.is_set()
    flag.set()
    flag.clear()  # a wake once given is not taken back
    await asyncio.gather(*tasks)
    assert sorted(woken) == [0, 1, 2]
    flag.set()
    await asyncio.wait_for(flag.wait(), 1)
    assert "set, 0 waiting" in repr(flag)


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    flag = Flag()
    task = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    assert "1 waiting" in repr(flag)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "clear, 0 waiting" in repr(flag)
    other = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    flag.set()
    assert await other is True


def test_an_idle_flag_is_smaller_than_an_event() -> None:
    flag, event = Flag(), asyncio.Event()
    flag_size = sys.getsizeof(flag)
    event_size = sys.getsizeof(event) + sys.getsizeof(event.__dict__)
    event_size += sum(sys.getsizeof(v) for v in vars(event).values())
    assert not hasattr(flag, "__dict__")
    assert flag_size * 4 < event_size
