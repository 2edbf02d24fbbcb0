"""The tests' guest toolkit: supervisor.testing, plus the old name ``Guest``."""

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
    "run_to_end",
    "until",
]
