"""Benchmark guests: assembled from source with binutils by supervisor.testing.

Each guest is the common prelude (stack, flat GDT, hypercall macros), the
benchmark's own code starting at ``main``, and the common data (``lguest_data``,
a stack, an interrupt-return stub inside the no-irq range).  The same image is
loaded for the supervised run and for the raw Unicorn baseline, so both execute
byte-identical code under the same page tables.
"""

from __future__ import annotations

import contextlib

from supervisor.launcher.layout import Layout
from supervisor.testing import AsmGuest as Image
from supervisor.testing import Booted, assemble, boot, initialize_words, load

__all__ = [
    "NOTIFY",
    "SMALL_RAM",
    "Booted",
    "Image",
    "Layout",
    "assemble",
    "boot",
    "close",
    "initialize_words",
    "load",
]

NOTIFY = 17
SMALL_RAM = 128 << 10  # the smallest RAM the Launcher's layout accepts for these images


async def close(booted: Booted) -> None:
    await booted.file.close()
    with contextlib.suppress(BufferError):  # still exported: the garbage collector frees it
        booted.memory.close()
