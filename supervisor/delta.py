"""Bytes kept as the runs where they differ from a base: what an idle guest's memory and
registers pack to.

An idle guest's written pages differ from its template (or from zeros) in a few hundred
bytes, and its registers from a new instance's in under a hundred, so a delta holds
only those runs (two runs closer than ``GAP`` bytes are one), deflated.  Putting the
bytes back writes only the runs over the base, so its cost is that of the bytes that
differ, not of the pages or the registers' whole size: no inflating of kilobytes of
zeros, no copying of pages the base already holds.
"""

from __future__ import annotations

import re
import zlib
from array import array
from collections.abc import Iterator

# Zero bytes between two runs that still make them one: each run costs 8 bytes of spans
# and a copy of its own, a byte of gap one byte more (deflated to nearly nothing).
GAP = 32
_RUNS = re.compile(rb"[^\x00]+(?:\x00{1,%d}[^\x00]+)*" % GAP)
_SPAN = array("I").itemsize


class Delta:
    """Runs collected (:meth:`add`), then packed into one bytes object (:meth:`pack`)."""

    __slots__ = ("_parts", "_spans")

    def __init__(self) -> None:
        self._spans = array("I")  # (offset, length) pairs, in the order added
        self._parts: list[memoryview | bytes] = []

    def add(self, data: memoryview | bytes, base: bytes, at: int = 0) -> None:
        """Add the runs where ``data`` differs from ``base`` (the same length), at offset
        ``at`` plus their place in ``data``."""
        size = len(data)
        xor = int.from_bytes(data, "little") ^ int.from_bytes(base, "little")
        delta = xor.to_bytes(size, "little")
        view = data if isinstance(data, memoryview) else memoryview(data)
        spans, parts = self._spans, self._parts
        for run in _RUNS.finditer(delta):
            start, end = run.span()
            spans.append(at + start)
            spans.append(end - start)
            parts.append(view[start:end])

    def pack(self) -> bytes:
        """The runs as one bytes object: their count, spans and bytes, deflated."""
        count = array("I", (len(self._spans) // 2,))
        return zlib.compress(b"".join((count.tobytes(), self._spans.tobytes(), *self._parts)), 1)


def runs(packed: bytes) -> Iterator[tuple[int, memoryview]]:
    """Each run of a :meth:`Delta.pack` value: its offset and its bytes."""
    raw, spans, end = _open(packed)
    for i in range(0, len(spans), 2):
        at, size = spans[i], spans[i + 1]
        yield at, raw[end : end + size]
        end += size


def apply(packed: bytes, target: memoryview | bytearray) -> None:
    """Write each run of ``packed`` into ``target`` (which holds the base) at its offset."""
    raw, spans, end = _open(packed)  # (the loop of runs() without a generator: the wake's)
    for i in range(0, len(spans), 2):
        at, size = spans[i], spans[i + 1]
        target[at : at + size] = raw[end : end + size]
        end += size


def _open(packed: bytes) -> tuple[memoryview, memoryview, int]:
    """A packed delta inflated: its bytes, its spans (as unsigned ints, in place) and
    where the runs' bytes begin."""
    raw = memoryview(zlib.decompress(packed))
    end = _SPAN * (1 + 2 * raw[:_SPAN].cast("I")[0])
    return raw, raw[_SPAN:end].cast("I"), end


def pack(data: bytes, base: bytes) -> bytes:
    """``data`` as the runs where it differs from ``base`` (the same length)."""
    delta = Delta()
    delta.add(data, base)
    return delta.pack()


def unpack(packed: bytes, base: bytes) -> bytes:
    """The bytes :func:`pack` packed against ``base``."""
    out = bytearray(base)
    apply(packed, out)
    return bytes(out)
