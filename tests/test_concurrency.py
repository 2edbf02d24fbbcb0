"""Many guests on one device: they all finish, and spinners cannot starve each other."""

import asyncio

import pytest
from guestasm import SPIN, Booted, boot, notified, present, until

from supervisor import LguestDevice, abi

COUNT_TO = r"""
main:
    LGUEST_INIT
1:  incl counter
    cmpl $50000, counter
    jne 1b
    HCALL 17, 0x600d
    HCALL 2, msg, 1, 0
.data
counter: .long 0
msg: .asciz "done"
"""


async def test_a_hundred_concurrent_guests_all_finish(dev: LguestDevice) -> None:
    guests = await asyncio.gather(*(boot(dev, COUNT_TO, ram_size=256 << 10) for _ in range(100)))
    addresses = await asyncio.gather(*(notified(g) for g in guests))
    assert addresses == [0x600D] * 100
    assert all(g.u32("counter") == 50000 for g in guests)
    for g in guests:
        with pytest.raises(FileNotFoundError):
            await g.file.read(8)
        assert present(g.file.death).exit_status == 0


def jain(values: list[int]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


SPINNERS = 8
WINDOW_SLICES = 40  # per spinner on average: many rounds of the whole crowd


def slices(g: Booted) -> int:
    return present(g.file.stats).slices


async def test_spinning_guests_cannot_starve_each_other(dev: LguestDevice) -> None:
    """Over a window of many rounds of slices, every spinner counts about as far as the
    others.  The window is counted in slices, not in the guests' counts: on the
    ``count=`` fallback a slice's budget adapts to the wall time it takes, so on a
    loaded machine a slice counts far less and a fixed count may take minutes, while a
    round of slices is still a round."""
    guests = [await boot(dev, SPIN, ram_size=256 << 10) for _ in range(SPINNERS)]
    readers = [asyncio.create_task(g.file.read(8)) for g in guests]
    # Wait until every guest has run, then for many more slices among them all.
    await until(lambda: all(g.u32("counter") for g in guests))
    start = [g.u32("counter") for g in guests]
    begun = sum(slices(g) for g in guests)
    await until(lambda: sum(slices(g) for g in guests) - begun >= SPINNERS * WINDOW_SLICES)
    progress = [g.u32("counter") - s for g, s in zip(guests, start, strict=True)]
    for r in readers:
        r.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    assert min(progress) > 0, progress
    assert jain(progress) > 0.8, progress


async def test_a_halted_guest_costs_no_slices_while_others_spin(dev: LguestDevice) -> None:
    halted = await boot(dev, "main:\n LGUEST_INIT\n HCALL 10\n HCALL 17, 1\n")
    spinner = await boot(dev, SPIN)
    h_reader = asyncio.create_task(halted.file.read(8))
    s_reader = asyncio.create_task(spinner.file.read(8))
    await until(lambda: halted.file.cpu(0).halted)
    halted_slices = slices(halted)
    before = slices(spinner)
    await until(lambda: slices(spinner) >= before + 20)  # (slices, not counts: as above)
    assert slices(halted) == halted_slices
    await halted.file.write(abi.pack_words(abi.LHREQ_IRQ, 0))  # no gate: just wakes it
    s_reader.cancel()
    h_reader.cancel()
    await asyncio.gather(h_reader, s_reader, return_exceptions=True)
