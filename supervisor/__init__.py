"""lguest for asyncio: a supervisor that hosts many emulated x86-32 guests.

The device layer mirrors Linux's ``/dev/lguest``::

    dev = LguestDevice()
    mem = GuestMemory(16 << 20)
    async with dev.open(mem) as f:
        await f.write(abi.pack_words(abi.LHREQ_INITIALIZE, mem.address, pfns, pgdir, start))
        addr = await f.read(abi.WORD_SIZE)

Most users want the Launcher on top of it: :class:`Supervisor` and :class:`GuestConfig`.
"""

from . import abi
from .config import GuestConfig
from .device import LguestDevice, LguestFile, Waker
from .guest import Death
from .host import Exit, Guest, Supervisor
from .limits import Limits
from .memory import GuestMemory

__all__ = [
    "Death",
    "Exit",
    "Guest",
    "GuestConfig",
    "GuestMemory",
    "LguestDevice",
    "LguestFile",
    "Limits",
    "Supervisor",
    "Waker",
    "abi",
]
