"""Deltas: bytes kept as the runs where they differ from a base, which is what an idle
guest's memory and registers pack to; putting them back writes only those runs."""

from __future__ import annotations

import random
import zlib

import pytest

from supervisor import _unicorn, delta
from supervisor.abi import PAGE_SIZE


def changed(base: bytes, at: dict[int, int]) -> bytes:
    out = bytearray(base)
    for offset, value in at.items():
        out[offset] = value
    return bytes(out)


@pytest.mark.parametrize("seed", range(20))
def test_a_delta_gives_back_exactly_the_bytes_it_packed(seed: int) -> None:
    rng = random.Random(seed)
    base = bytes(rng.randrange(4) for _ in range(PAGE_SIZE))  # (zeros among the base's bytes)
    data = changed(base, {rng.randrange(PAGE_SIZE): rng.randrange(256) for _ in range(30)})
    assert delta.unpack(delta.pack(data, base), base) == data
    assert delta.unpack(delta.pack(base, base), base) == base  # nothing differs: no run


def test_only_the_runs_that_differ_are_kept_and_close_ones_are_one() -> None:
    base = bytes(PAGE_SIZE)
    near = changed(base, {100: 1, 100 + delta.GAP: 2})  # a gap of GAP - 1 zero bytes
    far = changed(base, {100: 1, 100 + delta.GAP + 2: 2})
    assert [(at, bytes(run)) for at, run in delta.runs(delta.pack(near, base))] == [
        (100, b"\x01" + bytes(delta.GAP - 1) + b"\x02")
    ]
    assert [(at, bytes(run)) for at, run in delta.runs(delta.pack(far, base))] == [
        (100, b"\x01"),
        (100 + delta.GAP + 2, b"\x02"),
    ]
    # What is inflated at the wake is the runs (and their places), not the page.
    assert len(zlib.decompress(delta.pack(far, base))) < 32


def test_runs_of_several_pages_land_at_their_offsets() -> None:
    memory = bytearray(4 * PAGE_SIZE)
    packer = delta.Delta()
    for page, value in ((1, 7), (3, 9)):
        data = changed(bytes(PAGE_SIZE), {5: value, PAGE_SIZE - 1: value})
        packer.add(data, bytes(PAGE_SIZE), page * PAGE_SIZE)
    delta.apply(packer.pack(), memory)
    assert [i for i, b in enumerate(memory) if b] == [
        PAGE_SIZE + 5,
        2 * PAGE_SIZE - 1,
        3 * PAGE_SIZE + 5,
        4 * PAGE_SIZE - 1,
    ]


def test_registers_pack_to_their_differences_from_a_new_instance() -> None:
    blank = _unicorn.blank_context()
    registers = changed(blank, {0: 0x42, 8: 0x10, len(blank) - 1: 0xFF})
    packed = _unicorn.pack_context(registers)
    assert _unicorn.unpack_context(packed) == registers
    assert len(zlib.decompress(packed)) < 64  # three runs, not 5 KiB of differences
