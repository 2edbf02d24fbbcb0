"""Idle guests as the tests of sleeping, packed and resting guests use them.

The HALT_COUNTER guest: booted, run into its halt with a read in flight, woken by irq 1,
and its memory at the end (clocks blanked) to compare with a run that slept without
packing or resting.  guests/echo.img under a Supervisor: woken by a line it echoes,
snapshotted and forked while idle, and the fork echoing on to its exit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from guestasm import HALT_COUNTER, Booted, boot, until
from test_state import comparable

from supervisor import GuestConfig, LguestDevice, Supervisor, abi
from supervisor.host import Guest
from supervisor.snapshot import Snapshot

LIMIT = 60  # seconds: a bound for failing, never a wait for success
ECHO = GuestConfig(
    image=Path(__file__).resolve().parent.parent / "guests" / "echo.img", memory="1M"
)


async def halt_counter(dev: LguestDevice) -> Booted:
    """A HALT_COUNTER guest, INITIALIZEd; its CPU runs at its first read."""
    return await boot(dev, HALT_COUNTER)


async def asleep(g: Booted) -> asyncio.Future[bytes]:
    """Start a read of ``g`` and wait until its CPU sleeps in the halt (hibernated)."""
    reader = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
    cpu = g.file.cpu(0)
    await until(lambda: cpu.halted and cpu.hibernated)
    return reader


async def sleeper(dev: LguestDevice) -> tuple[Booted, asyncio.Future[bytes]]:
    """A HALT_COUNTER guest asleep in its halt, a read in flight."""
    g = await halt_counter(dev)
    return g, await asleep(g)


async def wake(g: Booted, reader: asyncio.Future[bytes], hit: int) -> None:
    """Raise irq 1: the handler's notify ends ``reader``, and it has counted ``hit`` irqs."""
    await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
    assert await reader == abi.pack_words(0x33)
    assert g.u32("hits") == hit


async def final_memory(g: Booted, reader: asyncio.Future[bytes] | None = None) -> bytes:
    """Close ``g`` (its read in flight, if any, ends with an OSError), then its memory,
    clocks blanked; the memory is closed."""
    await g.file.close()
    if reader is not None:
        with pytest.raises(OSError):
            await reader
    image = comparable(g.guest.symbols, g.memory.read(0, g.memory.size))
    g.memory.close()
    return image


async def echoed(sup: Supervisor, settle: Callable[[], Awaitable[None]]) -> Guest:
    """An echo guest launched in ``sup``: settled (``settle`` waits until it is idle as
    the test wants it), woken by a line that it echoes, settled again."""
    guest = await sup.launch(ECHO)
    await settle()
    guest.send("hello\n")  # a device's news for an idle guest: it wakes and echoes
    async with asyncio.timeout(LIMIT):
        assert await guest.console.readline() == "hello\n"
    await settle()
    return guest


async def forked(sup: Supervisor, guest: Guest) -> Guest:
    """A snapshot of the (idle) ``guest``, through its bytes, restored as "fork"."""
    snap = await guest.snapshot()
    return await sup.restore(Snapshot.from_bytes(snap.to_bytes()), name="fork")


async def echoes_to_the_end(fork: Guest) -> None:
    """``fork`` echoes two more lines and exits 0 at "quit"."""
    fork.send("again\nquit\n")
    async with asyncio.timeout(LIMIT):
        assert [line async for line in fork.console] == ["again", "quit", "bye"]
    assert (await fork.wait()).exit_status == 0
