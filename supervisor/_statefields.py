"""Marks on dataclass fields: part of the guest's state value, or deliberately not.

Every field of the classes a :class:`~supervisor.state.GuestState` is built from
(``LgCpu``, ``Lguest``) carries one of these marks next to its declaration;
``tests/test_state.py`` fails when a field carries neither, so a new field is
either serialized or consciously left out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

STATE: Final = "state"  # the metadata key
SAVED: Final = "saved"
HOST_ONLY: Final = "host"


def saved(**kwargs: Any) -> Any:
    """A dataclass field that is part of the guest's state value (same name there)."""
    return dataclasses.field(metadata={STATE: SAVED}, **kwargs)


def host_only(**kwargs: Any) -> Any:
    """A dataclass field that is deliberately not part of the state value."""
    return dataclasses.field(metadata={STATE: HOST_ONLY}, **kwargs)


def saved_fields(cls: type) -> tuple[str, ...]:
    """Names of ``cls``'s fields marked :func:`saved`."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(STATE) == SAVED)


def unmarked_fields(cls: type) -> tuple[str, ...]:
    """Names of ``cls``'s fields marked neither :func:`saved` nor :func:`host_only`."""
    return tuple(f.name for f in dataclasses.fields(cls) if STATE not in f.metadata)
