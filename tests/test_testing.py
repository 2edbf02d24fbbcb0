"""supervisor.testing, the toolkit users write guest tests with."""

import pytest

from supervisor import LguestDevice
from supervisor.testing import assemble, boot, notified, run_to_end

# The subject is the guest toolkit, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop


async def test_boot_and_notify_from_source() -> None:
    async with LguestDevice() as dev:
        g = await boot(
            dev,
            "main:\n LGUEST_INIT\n movl $7, value\n HCALL 17, 0x42\n"
            ' HCALL 2, msg, 1, 0\n.data\nvalue: .long 0\nmsg: .asciz "bye"\n',
        )
        assert await notified(g) == 0x42
        assert g.u32("value") == 7
        g.set_u32("value", 9)
        assert g.u32("value") == 9
        assert await run_to_end(g) == "bye"


def test_assembler_errors_are_reported() -> None:
    with pytest.raises(RuntimeError, match="as failed"):
        assemble("main:\n this is not an instruction\n")


def test_assembly_is_cached_by_content() -> None:
    a = assemble("main:\n HCALL 17, 1\n")
    b = assemble("main:\n HCALL 17, 1\n")
    assert a == b and a.symbols["main"] > 0
