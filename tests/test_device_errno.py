"""Every errno path of the device file, as lguest's /dev/lguest has them."""

import asyncio
import errno
from collections.abc import Awaitable

import pytest
from guestasm import SPIN, assemble, boot, load, until

from supervisor import GuestMemory, LguestDevice, abi
from supervisor.abi import LHREQ_BREAK, LHREQ_INITIALIZE, LHREQ_IRQ, pack_words
from supervisor.launcher.layout import IMAGE_BASE

# The subject is the device's errnos, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

POWEROFF = r"""
main:
    LGUEST_INIT
    HCALL 2, msg, 1, 7
.data
msg: .asciz "all done here"
"""


def errno_of(exc_info: pytest.ExceptionInfo[OSError]) -> int | None:
    return exc_info.value.errno


async def expect(code: int, coro: Awaitable[object]) -> OSError:
    with pytest.raises(OSError) as e:
        await coro
    assert e.value.errno == code, f"expected {errno.errorcode[code]}, got {e.value!r}"
    return e.value


def init_words(mem: GuestMemory, pfns: int, pgdir: int, start: int = IMAGE_BASE) -> bytes:
    return pack_words(LHREQ_INITIALIZE, mem.address, pfns, pgdir, start)


async def test_errors_are_the_matching_oserror_subclasses(dev: LguestDevice) -> None:
    g = await boot(dev, POWEROFF)
    with pytest.raises(FileNotFoundError):
        await g.file.read(8)
    with pytest.raises(FileNotFoundError):
        await g.file.write(pack_words(LHREQ_IRQ, 1))
    with pytest.raises(PermissionError):
        await g.file.waker().read(8)


async def test_initialize_returns_the_four_words_length(dev: LguestDevice) -> None:
    memory, layout = load(assemble(SPIN))
    f = dev.open(memory)
    n = await f.write(init_words(memory, layout.pfn_limit, layout.pgdir))
    assert n == 4 * abi.WORD_SIZE


async def test_initialize_with_fewer_than_four_words_is_einval(dev: LguestDevice) -> None:
    memory, layout = load(assemble(SPIN))
    f = dev.open(memory)
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_INITIALIZE, memory.address, 1, 0)))
    await expect(errno.EINVAL, f.write(b"\0\0\0"))  # not even a request word
    # nothing was created: a proper INITIALIZE still works
    await f.write(init_words(memory, layout.pfn_limit, layout.pgdir))


async def test_initialize_twice_is_ebusy(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    again = init_words(g.memory, g.layout.pfn_limit, g.layout.pgdir)
    await expect(errno.EBUSY, g.file.write(again))
    await expect(errno.EBUSY, g.file.write(pack_words(LHREQ_INITIALIZE)))


@pytest.mark.parametrize(
    ("base_delta", "pfns_delta", "pgdir", "code"),
    [
        (-abi.PAGE_SIZE, 0, None, errno.EFAULT),  # base below the memory
        (abi.PAGE_SIZE, 0, None, errno.EFAULT),  # limit runs past the end
        (0, 1, None, errno.EFAULT),  # one page too many
        (1, 0, None, errno.EINVAL),  # base not page aligned
        (0, 0, 0x1001, errno.EINVAL),  # pgdir not page aligned
        (0, 0, 1 << 30, errno.EFAULT),  # pgdir outside guest memory
    ],
)
async def test_initialize_bounds(
    dev: LguestDevice, base_delta: int, pfns_delta: int, pgdir: int | None, code: int
) -> None:
    memory, layout = load(assemble(SPIN))
    f = dev.open(memory)
    words = pack_words(
        LHREQ_INITIALIZE,
        memory.address + base_delta,
        layout.pfn_limit + pfns_delta,
        layout.pgdir if pgdir is None else pgdir,
        IMAGE_BASE,
    )
    await expect(code, f.write(words))


async def test_an_entry_point_past_32_bits_is_einval(dev: LguestDevice) -> None:
    """eip is 32 bits wide: a start that does not fit is refused, and nothing was created."""
    memory, layout = load(assemble(SPIN))
    f = dev.open(memory)
    await expect(errno.EINVAL, f.write(init_words(memory, layout.pfn_limit, layout.pgdir, 1 << 32)))
    await f.write(init_words(memory, layout.pfn_limit, layout.pgdir))


async def test_zero_pages_is_einval(dev: LguestDevice) -> None:
    memory, _ = load(assemble(SPIN))
    f = dev.open(memory)
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_INITIALIZE, memory.address, 0, 0, 0)))


async def test_reads_and_writes_before_initialize_are_einval(dev: LguestDevice) -> None:
    f = dev.open(GuestMemory(1 << 20))
    await expect(errno.EINVAL, f.read(8))
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_IRQ, 1)))
    await expect(errno.EINVAL, f.write(pack_words(LHREQ_BREAK, 1)))
    await expect(errno.EINVAL, f.waker().write(pack_words(LHREQ_BREAK, 1)))
    await expect(errno.EINVAL, f.waker().read(8))


async def test_unknown_request_bad_irq_bad_cpu(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    await expect(errno.EINVAL, g.file.write(pack_words(abi.LHREQ_GETDMA, 0)))
    await expect(errno.EINVAL, g.file.write(pack_words(99)))
    await expect(errno.EINVAL, g.file.write(pack_words(LHREQ_IRQ, 32)))
    await expect(errno.EINVAL, g.file.write(pack_words(LHREQ_IRQ)))  # no irq word
    await expect(errno.EINVAL, g.file.write(pack_words(LHREQ_BREAK)))  # no on/off word
    await expect(errno.EINVAL, g.file.write(pack_words(LHREQ_IRQ, 1), offset=1))
    await expect(errno.EINVAL, g.file.read(8, offset=1))
    await expect(errno.EINVAL, g.file.read(-1))
    assert await g.file.write(pack_words(LHREQ_IRQ, 31)) == 0


async def test_everything_after_close_is_ebadf(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    await g.file.close()
    await expect(errno.EBADF, g.file.read(8))
    await expect(errno.EBADF, g.file.write(pack_words(LHREQ_IRQ, 1)))
    await expect(errno.EBADF, g.file.write(init_words(g.memory, 1, 0)))
    await expect(errno.EBADF, g.file.waker().write(pack_words(LHREQ_BREAK, 0)))
    await g.file.close()  # harmless
    uninitialized = dev.open(GuestMemory(1 << 16))
    await uninitialized.close()
    await expect(errno.EBADF, uninitialized.read(8))


async def test_dead_guest_reads_enoent_then_the_reason(dev: LguestDevice) -> None:
    g = await boot(dev, POWEROFF)
    await expect(errno.ENOENT, g.file.read(8))
    assert await g.file.read(100) == b"all done here\0"
    assert await g.file.read(4) == b"all "
    assert await g.file.read(0) == b""
    await expect(errno.ENOENT, g.file.write(pack_words(LHREQ_IRQ, 1)))
    await expect(errno.ENOENT, g.file.write(pack_words(LHREQ_BREAK, 1)))
    await expect(errno.ENOENT, g.file.write(pack_words(77)))  # ENOENT comes before EINVAL
    assert g.file.death is not None and g.file.death.exit_status == 7


async def test_restart_reads_erestart_every_time(dev: LguestDevice) -> None:
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    HCALL 2, msg, 2
.data
msg: .asciz "reboot please"
""",
    )
    await expect(errno.ERESTART, g.file.read(8))
    await expect(errno.ERESTART, g.file.read(8))
    await expect(errno.ENOENT, g.file.write(pack_words(LHREQ_IRQ, 1)))
    assert g.file.death is not None and g.file.death.restart


async def test_waker_may_only_break(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    waker = g.file.waker()
    await expect(errno.EPERM, waker.write(pack_words(LHREQ_IRQ, 1)))
    await expect(errno.EPERM, waker.write(pack_words(99)))
    await expect(errno.EPERM, waker.write(init_words(g.memory, 1, 0)))
    await expect(errno.EPERM, waker.read(8))
    await expect(errno.EINVAL, waker.read(8, offset=3))  # bad cpu is checked first
    assert await waker.write(pack_words(LHREQ_BREAK, 0)) == 0


async def test_second_read_on_a_running_cpu_is_ebusy(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    reader = asyncio.create_task(g.file.read(8))
    await until(lambda: g.u32("counter") != 0)  # the guest runs: the first read owns the CPU
    await expect(errno.EBUSY, g.file.read(8))
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


async def test_open_after_device_close_is_enodev() -> None:
    from supervisor import LguestDevice

    device = LguestDevice()
    await device.aclose()
    with pytest.raises(OSError) as e:
        device.open(GuestMemory(1 << 16))
    assert e.value.errno == errno.ENODEV
