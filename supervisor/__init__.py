"""lguest for asyncio: a supervisor that hosts many emulated x86-32 guests.

The device layer mirrors Linux's ``/dev/lguest``::

    dev = LguestDevice()
    mem = GuestMemory(16 << 20)
    async with dev.open(mem) as f:
        await f.write(abi.pack_words(abi.LHREQ_INITIALIZE, mem.address, pfns, pgdir, start))
        addr = await f.read(abi.WORD_SIZE)

Most users want the Launcher on top of it: :class:`Supervisor` and :class:`GuestConfig`.
The errors a user meets are here too: :class:`ConfigError` (a bad config),
:class:`ImageError` (not an image), :class:`SnapshotError` and :class:`StateError`
(a snapshot or state that cannot be used), :class:`ConsoleEnded` (``Guest.expect``
met the end of the output).  ``supervisor.cluster`` (which needs Ray, and is not
imported here) has ``Cluster`` and ``ClusterError``.
"""

from . import abi
from .config import ConfigError, GuestConfig
from .device import LguestDevice, LguestFile, Waker
from .host import ConsoleEnded, Exit, Guest, Supervisor
from .launcher.loader import ImageError
from .limits import Limits
from .memory import GuestMemory
from .snapshot import Snapshot, SnapshotError
from .state import StateError

__all__ = [
    "ConfigError",
    "ConsoleEnded",
    "Exit",
    "Guest",
    "GuestConfig",
    "GuestMemory",
    "ImageError",
    "LguestDevice",
    "LguestFile",
    "Limits",
    "Snapshot",
    "SnapshotError",
    "StateError",
    "Supervisor",
    "Waker",
    "abi",
]
