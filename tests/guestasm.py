"""The tests' guest toolkit: supervisor.testing, plus the old name ``Guest`` and
:func:`present`."""

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
    "present",
    "run_to_end",
    "until",
]
