"""The tests' guest toolkit: supervisor.testing, plus the old name ``Guest`` and
:func:`present`."""

import contextlib
import os
from typing import TypeVar

from supervisor.testing import (
    CACHE,
    COUNT_TO,
    POSTLUDE,
    PRELUDE,
    SPIN,
    AsmGuest,
    Booted,
    assemble,
    boot,
    initialize_words,
    load,
    notified,
    run_to_end,
    until,
)

Guest = AsmGuest
T = TypeVar("T")


def present(value: T | None) -> T:
    """``value``, which the test knows is there (e.g. ``file.stats`` after INITIALIZE,
    ``file.death`` once the guest died): a typed assertion."""
    assert value is not None
    return value


def open_descriptors() -> int:
    """The process's open descriptors, less ``/proc/self/pagemap``: supervisor/memory.py
    opens it once per process, when a first guest memory packs (after PACK_AFTER idle
    seconds, which more guests reach on a loaded machine), and keeps it.  What a leak
    test counts is what each guest holds."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (listdir's own descriptor: closed by now)
            count += not os.readlink(f"/proc/self/fd/{fd}").endswith("/pagemap")
    return count


__all__ = [
    "CACHE",
    "COUNT_TO",
    "POSTLUDE",
    "PRELUDE",
    "SPIN",
    "AsmGuest",
    "Booted",
    "Guest",
    "assemble",
    "boot",
    "initialize_words",
    "load",
    "notified",
    "open_descriptors",
    "present",
    "run_to_end",
    "until",
]


# Sleeps in a halt; irq 1 (vector 33) counts a hit in `hits` and notifies 0x33.
HALT_COUNTER = r"""
main:
    LGUEST_INIT
    IDT 33, handler
1:  HCALL 10
    jmp 1b
handler:
    incl hits
    HCALL 17, 0x33
    jmp irq_return
.data
hits: .long 0
"""
