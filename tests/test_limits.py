"""Resource limits: per-guest budgets and per-device admission."""

import errno

import pytest
from guestasm import SPIN, assemble, boot, load, notified, present, run_to_end

from supervisor import GuestMemory, LguestDevice, LguestFile, Limits, _slicing, abi
from supervisor.launcher.layout import IMAGE_BASE, Layout

# The subject is the budgets and the admission counts, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop


async def initialize(
    dev: LguestDevice, memory: GuestMemory, layout: Layout, limits: Limits | None = None
) -> LguestFile:
    f = dev.open(memory, limits=limits)
    await f.write(
        abi.pack_words(
            abi.LHREQ_INITIALIZE, memory.address, layout.pfn_limit, layout.pgdir, IMAGE_BASE
        )
    )
    return f


@pytest.mark.skipif(
    not _slicing.NATIVE, reason="the count= fallback meters instructions, not blocks"
)
async def test_instruction_budget_kills_exactly_at_the_limit() -> None:
    async with LguestDevice(limits=Limits(max_blocks=100_000)) as dev:
        g = await boot(dev, SPIN)
        assert await run_to_end(g) == "instruction budget exhausted (100000 blocks)"
        assert present(g.file.stats).blocks == 100_000
        # the spin loop is one block per iteration, after ~70 blocks of start-up
        assert 100_000 - 100 < g.u32("counter") <= 100_000


async def test_run_time_limit_kills_a_spinner() -> None:
    async with LguestDevice(limits=Limits(max_run_time=0.05)) as dev:
        g = await boot(dev, SPIN)
        assert await run_to_end(g) == "run time limit exceeded (0.05 s)"
        assert present(g.file.stats).run_time >= 0.05


async def test_limits_apply_per_guest_and_open_can_override() -> None:
    async with LguestDevice(limits=Limits(max_blocks=1000)) as dev:
        memory, layout = load(assemble("main:\n LGUEST_INIT\n HCALL 17, 9\n"))
        f = await initialize(dev, memory, layout, limits=Limits())
        assert abi.unpack_words(await f.read(8)) == (9,)


def test_bad_limits_are_rejected() -> None:
    with pytest.raises(ValueError):
        Limits(max_blocks=0)
    with pytest.raises(ValueError):
        Limits(max_run_time=-1)


async def test_too_many_guests_is_enomem_and_closing_one_makes_room() -> None:
    async with LguestDevice(max_guests=2) as dev:
        guests = [await boot(dev, SPIN) for _ in range(2)]
        memory, layout = load(assemble(SPIN))
        with pytest.raises(OSError) as e:
            await initialize(dev, memory, layout)
        assert e.value.errno == errno.ENOMEM
        await guests[0].file.close()
        f = await initialize(dev, memory, layout)
        assert not f.closed


async def test_total_guest_memory_is_bounded() -> None:
    ram = 1 << 20
    async with LguestDevice(max_memory=2 * (ram + abi.PAGE_SIZE)) as dev:
        await boot(dev, SPIN, ram)
        await boot(dev, SPIN, ram)
        memory, layout = load(assemble(SPIN), 128 << 10)
        with pytest.raises(OSError) as e:
            await initialize(dev, memory, layout)
        assert e.value.errno == errno.ENOMEM


async def test_a_limited_guest_does_not_limit_its_neighbour() -> None:
    async with LguestDevice() as dev:
        limited = await boot(dev, SPIN)
        # boot() uses the device's defaults; give this one a budget through open()
        memory, layout = load(assemble(SPIN))
        f = await initialize(dev, memory, layout, limits=Limits(max_blocks=5000))
        with pytest.raises(FileNotFoundError):
            while True:
                await f.read(8)
        assert present(f.death).reason.startswith("instruction budget exhausted")
        assert limited.file.death is None
        ok = await boot(dev, "main:\n LGUEST_INIT\n HCALL 17, 1\n")
        assert await notified(ok) == 1
