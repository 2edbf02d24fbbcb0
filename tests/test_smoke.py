import errno

import pytest
from guestasm import boot

from supervisor import LguestDevice, abi

NOTIFY_LOOP = r"""
main:
    LGUEST_INIT
    mov $0, %esi
1:  incl counter
    HCALL 17, 0x1234
    jmp 1b
.data
counter: .long 0
"""


async def test_notify_returns_address(dev: LguestDevice) -> None:
    g = await boot(dev, NOTIFY_LOOP)
    for i in range(1, 4):
        data = await g.file.read(abi.WORD_SIZE)
        assert abi.unpack_words(data) == (0x1234,)
        assert g.u32("counter") == i
    await g.file.close()
    with pytest.raises(OSError) as e:
        await g.file.read(8)
    assert e.value.errno == errno.EBADF
