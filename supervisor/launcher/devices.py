"""The device page: 64-byte descriptors the guest finds through the boot info page.

Descriptor ``i`` lives at ``layout.device_page + 64 * i``; its first two words
are the device type and its irq (``DEV_TYPE``, ``DEV_IRQ`` in guests/lguest.inc),
the rest belongs to the device.  A guest asks for service with
``LHCALL_NOTIFY(descriptor address)``; the Launcher looks the address up in
the :class:`DeviceTable` and awaits that device's :meth:`Device.notify`.

Devices only touch guest memory while the guest is stopped: while a notify is
being serviced, or in :meth:`Device.poll`, after a Waker broke the guest out or
while every CPU is asleep (halted until an interrupt).  Anything that happens
asynchronously (console input, a custom device's event) calls
:meth:`Slot.wake`, which makes the Launcher stop the guest (a break) unless it
is asleep, and poll every device.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..abi import LGUEST_IRQS, PAGE_SIZE
from ..memory import GuestMemory

DESC_SIZE = 64
DEV_MAX = PAGE_SIZE // DESC_SIZE
DEV_TYPE = 0
DEV_IRQ = 4
DEV_TYPE_CONSOLE = 1
DEV_TYPE_BLOCK = 2
MAX_DEVICES = LGUEST_IRQS - 1  # irq 0 is the clock; device i gets irq i + 1
_U32 = struct.Struct("<I")
# The layout of n consecutive 32-bit fields, at index n (n fits a descriptor).
_WORDS = [struct.Struct(f"<{n}I") for n in range(DESC_SIZE // 4 + 1)]
_LAST_FIELD = DESC_SIZE - 4


def descriptor(device_type: int, irq: int) -> bytes:
    """A descriptor as :meth:`DeviceTable.attach` starts it: type, irq, zeros."""
    desc = bytearray(DESC_SIZE)
    _U32.pack_into(desc, DEV_TYPE, device_type & 0xFFFFFFFF)
    _U32.pack_into(desc, DEV_IRQ, irq)
    return bytes(desc)


def write_descriptors(view: memoryview, device_page: int, types: Sequence[int]) -> None:
    """Start the descriptors of devices of ``types`` in ``view`` (a boot template:
    :meth:`DeviceTable.attach` then finds them written and leaves the page unwritten)."""
    for i, device_type in enumerate(types):
        address = device_page + i * DESC_SIZE
        view[address : address + DESC_SIZE] = descriptor(device_type, i + 1)


class Slot:
    """A device's window on one guest: its descriptor, guest RAM, and its irq.

    Every guest-physical access is bounds-checked against RAM (the device page
    itself is reachable only through :meth:`get` and :meth:`set`).
    """

    __slots__ = ("__weakref__", "_raise_irq", "_wake", "address", "irq", "memory", "ram_size")

    def __init__(
        self,
        memory: GuestMemory,
        ram_size: int,
        address: int,
        irq: int,
        raise_irq: Callable[[int], None],
        wake: Callable[[], None],
    ) -> None:
        self.memory = memory
        self.ram_size = ram_size
        self.address = address
        self.irq = irq
        self._raise_irq = raise_irq
        self._wake = wake

    # -- the descriptor ---------------------------------------------------------
    def get(self, offset: int) -> int:
        """The 32-bit little-endian field at ``offset`` of the descriptor."""
        if not 0 <= offset <= _LAST_FIELD:  # (every request makes several: no call to check)
            self._check_field(offset)
        value: int = _U32.unpack_from(self.memory.view, self.address + offset)[0]
        return value

    def set(self, offset: int, value: int) -> None:
        """Store a 32-bit field of the descriptor (the value is truncated to 32 bits)."""
        if not 0 <= offset <= _LAST_FIELD:
            self._check_field(offset)
        self.memory.write(self.address + offset, _U32.pack(value & 0xFFFFFFFF))

    def get_words(self, offset: int, count: int) -> tuple[int, ...]:
        """``count`` consecutive 32-bit fields from ``offset`` (one read of guest memory)."""
        if not 0 <= offset <= offset + 4 * (count - 1) <= _LAST_FIELD:
            self._check_field(offset)
            self._check_field(offset + 4 * (count - 1))
        words: tuple[int, ...] = _WORDS[count].unpack_from(self.memory.view, self.address + offset)
        return words

    def set_words(self, offset: int, values: tuple[int, ...] | list[int]) -> None:
        """Store consecutive 32-bit fields from ``offset`` (one write: the guest's CPUs
        drop stale translations of one range, not one per field)."""
        count = len(values)
        if not 0 <= offset <= offset + 4 * (count - 1) <= _LAST_FIELD:
            self._check_field(offset)
            self._check_field(offset + 4 * (count - 1))
        data = _WORDS[count].pack(*[v & 0xFFFFFFFF for v in values])
        self.memory.write(self.address + offset, data)

    def set_bytes(self, offset: int, data: bytes) -> None:
        """Store ``data`` (whole 32-bit fields, laid out by the caller) at ``offset`` of
        the descriptor, in one write."""
        if len(data) % 4 or not 0 <= offset <= offset + len(data) - 4 <= _LAST_FIELD:
            raise ValueError(
                f"descriptor bytes {offset}..{offset + len(data)} are not whole fields "
                f"of the {DESC_SIZE}-byte slot"
            )
        self.memory.write(self.address + offset, data)

    @staticmethod
    def _check_field(offset: int) -> None:
        if not 0 <= offset <= DESC_SIZE - 4:
            raise ValueError(f"descriptor offset {offset} is outside the {DESC_SIZE}-byte slot")

    # -- guest RAM --------------------------------------------------------------
    def in_ram(self, addr: int, size: int) -> bool:
        """True if ``[addr, addr+size)`` lies wholly in guest RAM."""
        return addr >= 0 and size >= 0 and addr + size <= self.ram_size

    def read(self, addr: int, size: int) -> bytes | None:
        """A copy of guest RAM at ``addr``, or None if any of it is outside RAM."""
        return self.memory.read(addr, size) if self.in_ram(addr, size) else None

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> bool:
        """Copy ``data`` into guest RAM at ``addr``; False (nothing written) if outside."""
        if not self.in_ram(addr, len(data)):
            return False
        self.memory.write(addr, data)
        return True

    # -- talking to the Launcher ---------------------------------------------
    def interrupt(self) -> None:
        """Raise this device's irq; it is sent before the guest runs again."""
        self._raise_irq(self.irq)

    def wake(self) -> None:
        """Ask the Launcher to call :meth:`Device.poll` soon, with the guest stopped (broken
        out, or asleep: then without a break)."""
        self._wake()


class Device:
    """Base class of everything in the device page.  Subclass and override.

    Lifecycle: :meth:`start` once per Launcher (before the first boot), then for
    every boot :meth:`attach` with a fresh :class:`Slot`, then :meth:`notify` and
    :meth:`poll` while the guest runs; :meth:`stop` once at the end.
    """

    type: int = 0
    slot: Slot | None = None

    async def start(self) -> None:
        """Acquire resources (open files, start feeder tasks).  Runs on the event loop."""

    def attach(self, slot: Slot) -> None:
        """A new boot: remember ``slot`` and fill the descriptor beyond type and irq."""
        self.slot = slot

    async def notify(self, slot: Slot) -> None:
        """The guest notified this device's descriptor; the guest waits until this returns."""

    def notify_now(self, slot: Slot) -> bool:
        """Serve the guest's notify here and now, without awaiting, if this request can be:
        True if it was (the Launcher then sends the irqs raised and the guest goes on in
        the same read, with no trip through the Launcher's task), False if :meth:`notify`
        must be awaited instead (nothing done).  An exception is a failing device, as
        from :meth:`notify`."""
        return False

    def poll(self, slot: Slot) -> None:
        """The guest is stopped (some device called :meth:`Slot.wake`): catch up."""

    async def stop(self) -> None:
        """Release resources.  Called once, even if the guest died."""

    def state(self) -> Any:
        """What a snapshot must keep of this device, as JSON-able data (None: nothing).

        Taken while the guest is held inside the Launcher's read (no request is
        half-served); what lives in guest memory (the descriptor) is kept anyway.
        """
        return None

    def restore(self, state: Any) -> None:
        """Take back :meth:`state`'s value, after :meth:`attach` on a restored guest's
        first boot.  Raise ``ValueError`` for a value this device cannot use."""


class DeviceTable:
    """The registry: the devices in descriptor order, looked up by notify address."""

    def __init__(self, devices: list[Device] | None = None) -> None:
        self._devices: list[Device] = []
        self._slots: dict[int, tuple[Device, Slot]] = {}
        for device in devices or []:
            self.add(device)

    def add(self, device: Device) -> int:
        """Append ``device``; return its index.  Raises ``ValueError`` when full or repeated."""
        if len(self._devices) >= min(DEV_MAX, MAX_DEVICES):
            raise ValueError(f"at most {min(DEV_MAX, MAX_DEVICES)} devices fit a guest")
        if any(d is device for d in self._devices):
            raise ValueError("device added twice")
        self._devices.append(device)
        return len(self._devices) - 1

    def __len__(self) -> int:
        return len(self._devices)

    @property
    def types(self) -> tuple[int, ...]:
        """Each device's type, in descriptor order."""
        return tuple(device.type for device in self._devices)

    def __iter__(self) -> Iterator[Device]:
        return iter(self._devices)

    def attach(
        self,
        memory: GuestMemory,
        ram_size: int,
        device_page: int,
        raise_irq: Callable[[int], None],
        wake: Callable[[], None],
    ) -> None:
        """Write every descriptor into the device page of ``memory`` and attach the devices.

        Descriptor ``i`` gets type, irq ``i + 1`` and zeros elsewhere before the
        device fills it; one that holds exactly that already (a boot template's,
        :func:`write_descriptors`) is not written, so the page stays shared until
        someone changes it.  Previous slots are forgotten.
        """
        self._slots.clear()
        for i, device in enumerate(self._devices):
            address = device_page + i * DESC_SIZE
            start = descriptor(device.type, i + 1)
            if memory.read(address, DESC_SIZE) != start:
                memory.write(address, start)
            slot = Slot(memory, ram_size, address, i + 1, raise_irq, wake)
            self._slots[address] = (device, slot)
            device.attach(slot)

    def lookup(self, address: int) -> tuple[Device, Slot] | None:
        """The device whose descriptor starts at ``address`` (what the guest notifies)."""
        return self._slots.get(address)

    def slots(self) -> list[tuple[Device, Slot]]:
        """Every attached device with its slot, in descriptor order."""
        return list(self._slots.values())
