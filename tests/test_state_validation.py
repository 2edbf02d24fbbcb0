"""Crafted guest states and snapshot files: every field is checked before anything is mapped.

* reproductions: a negative ``base`` aimed at another guest's memory, page directories,
  ``lguest_data``, irqs, hypercalls, addresses, counters and timers out of range, JSON
  nested too deeply, a Launcher part of the wrong shape; each is a one-line StateError
  naming the field, and ``run --restore`` of such a file is one line and exit 2;
* saved CPU contexts carry no host pointers (QEMU's debug-register breakpoint slots);
* a hypothesis fuzz of both encodings, bytes and decoded values, re-framed with valid
  checksums: decoding returns a state that passes validation, or raises StateError.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import math
import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from guestasm import boot, notified
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import cli

from supervisor import GuestConfig, LguestDevice, Supervisor, _unicorn, abi, framing
from supervisor.config import ConfigError
from supervisor.memory import GuestMemory
from supervisor.snapshot import Snapshot, SnapshotError
from supervisor.state import MAGIC, VERSION, GuestState, StateError

# The subject is the checks of crafted states and files, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

ROOT = Path(__file__).resolve().parent.parent
TICKER = ROOT / "guests" / "ticker.img"
SECRET = b"SECRET!!"

# Notifies with its clock armed, then powers off with status 7.
WAITER = r"""
main:
    LGUEST_INIT
    HCALL 9, 1000000
    HCALL 17, 0x5000
    HCALL 2, 0, 1, 7
"""

# Enables a breakpoint on dr0 (QEMU allocates one and keeps a host pointer to it in the
# CPU structure), notifies, then changes dr0 and dr7 (QEMU follows that pointer to free
# the breakpoint) and powers off with status 7.
DEBUG_REGISTERS = r"""
main:
    LGUEST_INIT
    mov $0x5000, %eax
    mov %eax, %dr0
    mov $1, %eax
    mov %eax, %dr7
    HCALL 17, 0x5000
    mov $0x6000, %eax
    mov %eax, %dr0
    xor %eax, %eax
    mov %eax, %dr7
    HCALL 2, 0, 1, 7
"""


async def _captured(source: str) -> tuple[GuestState, bytes]:
    """The state of a guest of ``source`` at its first notify, and its memory."""
    async with LguestDevice() as dev:
        g = await boot(dev, source)
        await notified(g)
        state = g.file.state()
        memory = g.memory.read(0, g.memory.size)
        await g.file.close()
        g.memory.close()
        return state, memory


@functools.cache
def real_state() -> GuestState:
    return asyncio.run(_captured(WAITER))[0]


async def _ticker_snapshot() -> Snapshot:
    async with Supervisor() as sup:
        config = GuestConfig(image=TICKER, memory="1M", cmdline="ticks=4 period_ms=20")
        guest = await sup.launch(config)
        async for _line in guest.console:
            break
        snap = await guest.snapshot()
        await guest.kill("snapshot taken")
        return snap


@functools.cache
def real_snapshot_bytes() -> bytes:
    return asyncio.run(_ticker_snapshot()).to_bytes()


def state_error(make: Callable[[], object], *words: str) -> str:
    """``make()`` raises a one-line StateError naming ``words``; its message."""
    with pytest.raises(StateError) as caught:
        make()
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    for word in words:
        assert word in message, message
    return message


def edited_state(change: Callable[[Any], object]) -> bytes:
    """The real state's encoding with ``change`` applied to its JSON part (valid checksum)."""
    meta, blobs = framing.unpack(real_state().to_bytes(), MAGIC, VERSION, kind="guest state")
    change(meta)
    return framing.pack(MAGIC, VERSION, meta, blobs)


def edited_snapshot(change: Callable[[Any], object]) -> bytes:
    """The real snapshot's encoding with ``change`` applied to its JSON part."""
    from supervisor.snapshot import MAGIC as SNAP_MAGIC
    from supervisor.snapshot import VERSION as SNAP_VERSION

    meta, blobs = framing.unpack(real_snapshot_bytes(), SNAP_MAGIC, SNAP_VERSION, kind="snapshot")
    change(meta)
    return framing.pack(SNAP_MAGIC, SNAP_VERSION, meta, blobs)


HEADER = struct.Struct("<8sHHQ32s")  # supervisor.framing's header


def reframed(magic: bytes, version: int, payload: bytes) -> bytes:
    """A frame around ``payload`` with a valid checksum (whatever the payload says)."""
    digest = hashlib.sha256(payload).digest()
    return HEADER.pack(magic, version, 0, len(payload), digest) + payload


def reframed_like(raw: bytes, payload: bytes) -> bytes:
    """``payload`` framed with the magic and version of the frame ``raw``."""
    magic, version, _flags, _length, _digest = HEADER.unpack_from(raw)
    return reframed(magic, version, payload)


# -- the window: another guest's memory is out of reach ---------------------------------------
def test_a_negative_base_cannot_reach_another_guests_memory() -> None:
    state = real_state()
    memory = GuestMemory(state.memory_size)
    victim = GuestMemory(state.memory_size)  # another guest's RAM, mapped beside
    victim.write(0, SECRET)
    try:
        # The base that would put the revived guest's window on the victim's memory.
        aim = victim.address - memory.address
        state_error(lambda: dataclasses.replace(state, base=aim), "base")
        state_error(lambda: dataclasses.replace(state, base=-abi.PAGE_SIZE), "base", "-4096")
        state_error(lambda: GuestState.from_bytes(edited_state(lambda m: m.update(base=aim))))
        assert victim.read(0, len(SECRET)) == SECRET
        assert memory.read(0, memory.size) == bytes(memory.size)
    finally:
        memory.close()
        victim.close()


@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("base", lambda m: m.update(base=-4096)),
        ("base", lambda m: m.update(base=1 << 80)),
        ("memory_size", lambda m: m.update(memory_size=1 << 60)),
        ("pgdir", lambda m: m.update(pgdir=-4096)),
        ("pgdir", lambda m: m.update(pgdir=1 << 40)),
        ("pgdir", lambda m: m.update(pgdir=m["pfn_limit"] * 4096)),
        ("kernel_address", lambda m: m.update(kernel_address=1 << 70)),
        ("noirq_end", lambda m: m.update(noirq_end=-1)),
        ("clock_ns", lambda m: m.update(clock_ns=-1)),
        ("clock_ns", lambda m: m.update(clock_ns=1 << 63)),
        ("dead.errno", lambda m: m.update(dead={"reason": "x", "errno": -5, "exit_status": None})),
        ("dead.exit_status", lambda m: m.update(dead={"reason": "x", "exit_status": 1 << 40})),
        ("lguest_data", lambda m: m["cpus"][0].update(lguest_data=-1)),
        ("lguest_data", lambda m: m["cpus"][0].update(lguest_data=m["pfn_limit"] * 4096 - 4)),
        ("irqs_pending", lambda m: m["cpus"][0].update(irqs_pending=1 << 200)),
        ("irqs_pending", lambda m: m["cpus"][0].update(irqs_pending=-1)),
        ("irqs_pending", lambda m: m["cpus"][0].update(irqs_pending=1 << 32)),
        ("pending_notify", lambda m: m["cpus"][0].update(pending_notify=1 << 100)),
        ("hcall", lambda m: m["cpus"][0].update(hcall=[1 << 64, 0, 0, 0])),
        ("hcall", lambda m: m["cpus"][0].update(hcall=[17, -1, 0, 0])),
        ("start", lambda m: m["cpus"][0].update(start=1 << 32)),
        ("gdt", lambda m: m["cpus"][0].update(gdt=[m["pfn_limit"] * 4096 - 8, 2])),
        ("stack pages", lambda m: m["cpus"][0].update(stack=[0x68, 0x1000, 3])),
        ("stack segment", lambda m: m["cpus"][0].update(stack=[0x63, 0x1000, 1])),
        ("timer_ns", lambda m: m["cpus"][0].update(timer_ns=10**40)),
        ("timer_ns", lambda m: m["cpus"][0].update(timer_ns=-5)),
        ("stats.run_time", lambda m: m["cpus"][0].update(stats=[["run_time", math.nan]])),
        ("stats.run_time", lambda m: m["cpus"][0].update(stats=[["run_time", math.inf]])),
        ("stats.blocks", lambda m: m["cpus"][0].update(stats=[["blocks", 1.5]])),
        ("stats.slices", lambda m: m["cpus"][0].update(stats=[["slices", -1]])),
        ("max_run_time", lambda m: m["cpus"][0].update(limits={"max_run_time": math.nan})),
        ("max_blocks", lambda m: m["cpus"][0].update(limits={"max_blocks": 1 << 64})),
    ],
)
def test_each_field_out_of_range_is_a_one_line_state_error(
    field: str, change: Callable[[Any], object]
) -> None:
    state_error(lambda: GuestState.from_bytes(edited_state(change)), field)


def test_a_state_is_checked_however_it_is_made() -> None:
    state = real_state()
    cpu = state.cpus[0]
    state_error(lambda: dataclasses.replace(state, pgdir=-4096), "pgdir")
    state_error(lambda: dataclasses.replace(cpu, irqs_pending=1 << 200), "cpu 0", "irqs_pending")
    state_error(lambda: dataclasses.replace(cpu, stats=(("run_time", math.nan),)), "run_time")
    limit = state.limit
    bad_cpu = dataclasses.replace(cpu, lguest_data=limit - 4)  # fine alone: 32 bits
    state_error(lambda: dataclasses.replace(state, cpus=(bad_cpu,)), "lguest_data")
    assert dataclasses.replace(state) == state
    assert pickle.loads(pickle.dumps(state)) == state


def test_json_nested_too_deeply_is_a_state_error() -> None:
    deep = b"[" * 200_000
    payload = struct.pack("<I", len(deep)) + deep
    state_error(lambda: GuestState.from_bytes(reframed(MAGIC, VERSION, payload)), "nested")
    from supervisor.snapshot import MAGIC as SNAP_MAGIC
    from supervisor.snapshot import VERSION as SNAP_VERSION

    snap = reframed(SNAP_MAGIC, SNAP_VERSION, payload)
    state_error(lambda: Snapshot.from_bytes(snap), "nested")


def test_the_launcher_part_of_a_snapshot_is_validated(tmp_path: Path) -> None:
    def load(change: Callable[[Any], object]) -> str:
        path = tmp_path / "crafted.snap"
        path.write_bytes(edited_snapshot(change))
        with pytest.raises(SnapshotError) as caught:
            Snapshot.load(path)
        assert isinstance(caught.value, StateError)
        message = str(caught.value)
        assert "\n" not in message, message
        return message

    assert "Launcher state" in load(lambda m: m.update(launcher=5))
    assert "config" in load(lambda m: m["launcher"].update(config=5))
    assert "image" in load(lambda m: m["launcher"]["config"].update(image=12))
    assert "memory" in load(lambda m: m["launcher"]["config"].update(memory="2M"))
    assert "segments" in load(lambda m: m["launcher"]["image"].update(segments="junk"))
    assert "segments" in load(lambda m: m["launcher"]["image"].update(segments=[[1, 2, 3]]))
    assert "segment 0" in load(lambda m: m["launcher"]["image"].update(segments=[[0x1000, 1]]))
    assert "entry" in load(lambda m: m["launcher"]["image"].update(entry=1 << 40))
    assert "restarts" in load(lambda m: m["launcher"].update(restarts=-1))
    assert "irqs" in load(lambda m: m["launcher"].update(irqs=[1 << 100]))
    assert "devices" in load(lambda m: m["launcher"].update(devices=[{"type": "console"}]))
    assert "memory run" in load(lambda m: m.update(runs=[["a", 1]]))
    assert "irqs_pending" in load(lambda m: m["state"]["cpus"][0].update(irqs_pending=-1))
    # The snapshot as taken still loads, and restores through its checked config.
    snap = Snapshot.from_bytes(real_snapshot_bytes())
    assert snap.launcher is not None and snap.launcher["config"]["memory"] == 1 << 20


def test_a_hand_built_snapshot_gets_the_same_checks() -> None:
    snap = Snapshot.from_bytes(real_snapshot_bytes())
    assert snap.launcher is not None
    snap.launcher["config"]["image"] = 12

    async def restore() -> None:
        async with Supervisor() as sup:
            await sup.restore(snap)

    with pytest.raises((SnapshotError, ConfigError), match="image"):
        asyncio.run(restore())


def test_run_restore_of_a_crafted_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for name, change in (
        ("base", lambda m: m["state"].update(base=-4096)),
        ("lguest_data", lambda m: m["state"]["cpus"][0].update(lguest_data=1 << 30)),
        ("config", lambda m: m["launcher"].update(config=5)),
        ("image", lambda m: m["launcher"]["config"].update(image=3)),
    ):
        path = tmp_path / f"{name}.snap"
        path.write_bytes(edited_snapshot(change))
        proc = cli("run", "--restore", str(path))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"supervisor: error: cannot restore {path}: "), proc.stderr
        assert proc.stderr.count("\n") == 1 and name in proc.stderr, proc.stderr
        assert proc.stderr.count(str(path)) == 1, proc.stderr


# -- saved CPU contexts hold no host pointers ----------------------------------------------------
def test_a_context_with_host_pointers_is_refused() -> None:
    cpu = real_state().cpus[0]
    start, end = _unicorn._breakpoint_slots()
    assert not any(cpu.context[start:end])
    planted = (
        cpu.context[:start] + (0x4141414141414141).to_bytes(8, "little") + cpu.context[start + 8 :]
    )
    state_error(lambda: dataclasses.replace(cpu, context=planted), "context", "host pointers")
    state_error(lambda: dataclasses.replace(cpu, context=cpu.context[:-1]), "context")


def test_a_state_of_another_unicorn_build_says_so_before_its_context_does_not_fit() -> None:
    def foreign(meta: Any) -> None:
        meta["unicorn"] = "2.0.0"

    raw = edited_state(foreign)
    meta, blobs = framing.unpack(raw, MAGIC, VERSION, kind="guest state")
    blobs["cpu0"] = blobs["cpu0"] + bytes(64)  # another build's context has another size
    state_error(lambda: GuestState.from_bytes(framing.pack(MAGIC, VERSION, meta, blobs)), "2.0.0")


async def test_a_guest_using_debug_registers_is_captured_and_revived(dev: LguestDevice) -> None:
    """QEMU keeps a pointer to the breakpoint it made for dr0: a capture leaves it out, so
    the revived guest's next dr0/dr7 writes (which free the old breakpoint) are safe."""
    g = await boot(dev, DEBUG_REGISTERS)
    await notified(g)
    state = g.file.state()
    start, end = _unicorn._breakpoint_slots()
    assert not any(state.cpus[0].context[start:end])
    copy = GuestMemory(g.memory.size)
    copy.write(0, g.memory.read(0, g.memory.size))
    await g.file.close()
    g.memory.close()
    revived = dev.open(copy, state=state)
    while True:
        try:
            await revived.read(abi.WORD_SIZE)
        except FileNotFoundError:
            break
    assert revived.death is not None and revived.death.exit_status == 7, revived.death
    await revived.close()
    copy.close()


async def test_a_hibernated_guest_keeps_no_stale_breakpoint_pointer(dev: LguestDevice) -> None:
    """Hibernation closes the emulator (and the breakpoints QEMU made in it): the kept
    registers must not point at them when the guest changes dr0/dr7 after waking."""
    g = await boot(dev, DEBUG_REGISTERS)
    await notified(g)
    cpu = g.file.cpu(0)
    cpu.hibernate()  # (with an engine pool it gave its engine back at the notify already)
    assert cpu.engine.frozen is not None
    start, end = _unicorn._breakpoint_slots()
    assert not any(cpu.engine.frozen[start:end])
    while True:
        try:
            await g.file.read(abi.WORD_SIZE)
        except FileNotFoundError:
            break
    assert g.file.death is not None and g.file.death.exit_status == 7, g.file.death
    await g.file.close()
    g.memory.close()


# -- fuzz: whatever the bytes, a valid state or a StateError -----------------------------------
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.sampled_from([0, 1, -1, 1 << 31, 1 << 32, (1 << 32) - 4, 1 << 63, 1 << 64, 1 << 200])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a decoded JSON value (dict keys and list positions)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:4]):  # the IDT's 256 gates: the first few will do
            found += _paths(item, (*prefix, i))
    return found


def _mutated(meta: Any, data: st.DataObject) -> Any:
    """``meta`` with one value replaced, deleted, or wrapped, as ``data`` draws."""
    paths = [p for p in _paths(meta) if p]
    path = data.draw(st.sampled_from(paths))
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    how = data.draw(st.sampled_from(["replace", "delete", "wrap"]))
    if how == "delete":
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    elif how == "wrap":
        parent[path[-1]] = [parent[path[-1]]]
    else:
        parent[path[-1]] = data.draw(JSON_VALUES)
    return meta


def _decode_or_state_error(decode: Callable[[bytes], Any], raw: bytes) -> Any:
    try:
        return decode(raw)
    except StateError as exc:
        assert "\n" not in str(exc), str(exc)
        return None


def _byte_mutation(raw: bytes, data: st.DataObject) -> bytes:
    payload = bytearray(raw[HEADER.size :])
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        kind = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if kind == "flip":
            payload[at] ^= data.draw(st.integers(1, 255))
        elif kind == "insert":
            payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del payload[at : at + data.draw(st.integers(1, 8))]
    return reframed_like(raw, bytes(payload))


def _valid_state(state: GuestState) -> None:
    assert dataclasses.replace(state) == state  # the checks pass again
    assert GuestState.from_bytes(state.to_bytes()) == state


@FUZZ
@given(data=st.data())
def test_fuzz_guest_state_values(data: st.DataObject) -> None:
    raw = edited_state(lambda m: _mutated(m, data))
    state = _decode_or_state_error(GuestState.from_bytes, raw)
    if state is not None:
        _valid_state(state)


@FUZZ
@given(data=st.data())
def test_fuzz_guest_state_bytes(data: st.DataObject) -> None:
    state = _decode_or_state_error(
        GuestState.from_bytes, _byte_mutation(real_state().to_bytes(), data)
    )
    if state is not None:
        _valid_state(state)


@FUZZ
@given(data=st.data())
def test_fuzz_snapshot_values(data: st.DataObject) -> None:
    def change(meta: Any) -> None:
        _mutated(meta if data.draw(st.booleans()) else meta["launcher"], data)

    snap = _decode_or_state_error(Snapshot.from_bytes, edited_snapshot(change))
    if snap is not None:
        _valid_state(snap.state)
        again = Snapshot.from_bytes(snap.to_bytes())
        assert again.launcher == snap.launcher and again.runs == snap.runs


@FUZZ
@given(data=st.data())
def test_fuzz_snapshot_json_part(data: st.DataObject) -> None:
    """The JSON part itself mangled: truncated, re-typed, or replaced by drawn JSON."""
    raw = real_snapshot_bytes()
    payload = raw[HEADER.size :]
    (size,) = struct.unpack_from("<I", payload)
    text = payload[4 : 4 + size]
    kind = data.draw(st.sampled_from(["cut", "junk", "json"]))
    if kind == "cut":
        text = text[: data.draw(st.integers(0, len(text)))]
    elif kind == "junk":
        text = data.draw(st.binary(max_size=64))
    else:
        text = json.dumps(data.draw(JSON_VALUES)).encode()
    body = struct.pack("<I", len(text)) + text + payload[4 + size :]
    _decode_or_state_error(Snapshot.from_bytes, reframed_like(raw, body))
