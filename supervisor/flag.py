"""Flag: :class:`asyncio.Event`'s ``set``/``clear``/``is_set``/``wait`` at a fraction of
its memory, for the objects every guest has.

An ``asyncio.Event`` allocates its waiter queue (a ``deque``, about 0.7 KiB) when it is
made; a guest has several, and most are never waited on while the guest is idle.  A
:class:`Flag` keeps no queue until a task waits.  Event loop only, as an Event.
"""

from __future__ import annotations

import asyncio
from typing import Literal


class Flag:
    """Set, clear, test, and wait until set (every waiter wakes on :meth:`set`)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        """Set the flag and wake every task waiting (a later :meth:`clear` does not
        take a wake back, as with an ``asyncio.Event``)."""
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> Literal[True]:
        """Return once the flag is set (at once if it is)."""
        if self._set:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:  # cancelled: stop waiting (a set() has already let the list go)
            waiters = self._waiters
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    self._waiters = None
        return True

    def __repr__(self) -> str:
        waiting = len(self._waiters or ())
        return f"<Flag {'set' if self._set else 'clear'}, {waiting} waiting>"
