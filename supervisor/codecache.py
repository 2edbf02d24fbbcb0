"""Host writes into guest memory and the guest's translated code.

Unicorn (QEMU's TCG) notices when the *guest* writes over code it has
translated, but not when the Host or the Launcher does (a block read, console
input, a user device, a restore): the guest's memory is also the Launcher's,
and their writes bypass the emulated MMU.  So every such write is recorded
here (:func:`note`, any thread: it only appends and stops the CPU's run), and the
CPU's own thread drops the translations of the recorded ranges (:func:`drop_stale`)
before it enters the guest again.

Guarantee: once a write through :meth:`GuestMemory.write` (and so every
:class:`~supervisor.launcher.devices.Slot` write) or :meth:`Lguest.write`
has returned, the guest executes the new bytes from its next basic block on.

Unicorn's range invalidation takes a guest-*virtual* address; the range's
physical address is used when the guest maps it there (the Launcher's low
linear map), else its ``kernel_address`` alias; if neither maps it, or the
guest runs in user mode (where the lookup could fault), the whole translation
cache is flushed, which is always correct, only slower.  Pages the CPU cannot run
code from (user pages under ``CR4.SMEP``, see :func:`_remove_code`) are skipped.
On the native paths (``_slicing.NATIVE``, the guest's memory given to the interrupt
hook) the register reads, the walks and the engine calls are one C call
(``_slicing.drop``), with the same aliases, the same skipped pages and the same
fall-back to a flush; the Python walk below is for the other CPUs.
"""

from __future__ import annotations

from unicorn import x86_const as r

from . import _slicing, _unicorn
from .cpu import LgCpu
from .pagetables import CR4_SMEP, fetchable, guest_pa

KERNEL_ALIAS = 0xC0000000  # the Launcher's high linear map (launcher.layout.PAGE_OFFSET)


def note(cpu: LgCpu, start: int, end: int) -> None:
    """Guest-physical ``[start, end)`` was written by the Host (any thread)."""
    cpu.stale_code.append((start, end))
    cpu.heed_write()


def drop_stale(cpu: LgCpu) -> None:
    """Drop the translations of every recorded range (the CPU's thread, between runs)."""
    stale = cpu.stale_code
    if cpu.hibernated:
        if cpu.engine.pool is None:  # no instance: the next one starts with no translations
            stale.clear()
        return  # (a pool's engine may come back to it translations and all: dropped then)
    cpu.check_thread()
    ranges = _merged(stale)
    # The same lookups and engine calls in C, if this CPU can (else None).
    done = _slicing.drop(cpu.fuel, ranges, cpu.lg.kernel_address)
    if done:
        return
    uc = cpu.emulator
    if done is not None:  # user mode, or a range not mapped where it is looked for
        uc.ctl_flush_tb()
        return
    user_mode = cpu.reg(r.UC_X86_REG_CS) & 3 == 3
    control = cpu.control()
    for start, end in ranges:
        where = None if user_mode else _mapped_at(cpu, start, control)
        if where is None:
            uc.ctl_flush_tb()
            break
        _remove_code(cpu, where, where + (end - start), control)


def _remove_code(cpu: LgCpu, begin: int, end: int, control: tuple[int, int, int]) -> None:
    """Drop the translations of guest-virtual ``[begin, end)``, except on the pages the
    CPU cannot run code from (``pagetables.fetchable``: a user page under ``CR4.SMEP``).

    Unicorn finds a page's translations by probing it for an instruction fetch; on such
    a page the probe raises a page fault that Unicorn ignores but leaves in the CPU's
    exception state, so that the guest's next real page fault would become a double
    fault.  Nothing runs from there through this mapping, and a guest's own stores
    through a mapping it cannot run code from are not checked for code either (QEMU's
    self-modifying-code check is only on executable mappings): code is written where
    it runs, or the page is made executable before it runs (the C runtime does).
    """
    uc = cpu.emulator
    if not control[2] & CR4_SMEP:
        _unicorn.remove_cache(uc, begin, end)
        return
    page = begin
    while page < end:
        stop = min((page | 0xFFF) + 1, end)
        if fetchable(cpu, page, control):
            _unicorn.remove_cache(uc, page, stop)
        page = stop


def _merged(stale: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Take every recorded range, overlapping and adjacent ones joined: one lookup and
    one engine call each instead of one per Host write.  A range is joined to the one
    before it only if it starts in a page that one already covers, so no page is
    taken as mapped like its neighbour unless a single write already spanned both."""
    # Only this thread removes, and others only append at the end: the first n ranges
    # are copied, then deleted in one (atomic) step, so a range another thread appends
    # meanwhile is left for the next call, never cleared unseen.
    n = len(stale)
    if n == 1:  # the common case: one Host write since the CPU last ran
        return [stale.pop(0)]
    ranges = stale[:n]
    del stale[:n]
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1] and start >> 12 == (merged[-1][1] - 1) >> 12:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _mapped_at(cpu: LgCpu, pa: int, control: tuple[int, int, int]) -> int | None:
    """A guest-virtual address mapped to guest-physical ``pa`` right now, if a cheap one is
    (``control``: the CPU's cr0, cr3, cr4)."""
    for alias in (0, cpu.lg.kernel_address, KERNEL_ALIAS):
        va = pa + alias
        if va <= 0xFFFFFFFF and guest_pa(cpu, va, control=control) == pa:
            return va
    return None
