"""Hostile guests: whatever they run, they end in bounded time and nobody else notices.

Every example puts one to three hostile guests and one healthy neighbour on the
same :class:`LguestDevice` (the ``dev`` fixture, shared by all examples of a test:
it must survive them all).  The neighbour counts to a target and notifies; it
must finish with the right count every time.  Each hostile guest must either
die with a reason or still be running when the neighbour is done (it is then
closed, and its read ends with ``EBADF``); its reads may raise only the
documented ``OSError``\\ s; closing it must free its memory.

Profiles: see ``fuzz_guests`` (``LGUEST_FUZZ_PROFILE=long`` for the long one).
"""

from __future__ import annotations

import asyncio
import errno
import random
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeAlias

import pytest
from fuzz_guests import (
    FUZZ,
    HLT,
    PAYLOAD_SIZE,
    SET_TF,
    STI,
    TIMER_NO_GATE_SOURCE,
    TIMER_STORM_SOURCE,
    UD2,
    Outcome,
    boot_image,
    drive,
    gate,
    hcall,
    hostile_guest,
    hypercalls,
    int_n,
    jump_to,
    lgdt,
    lidt,
    ljmp,
    mov,
    mov_cr,
    neighbour_guest,
    programs,
    push,
    quiescent,
    reason_ok,
    release,
    ring_hypercalls,
    store,
)
from guestasm import Booted, assemble, until
from hypothesis import given
from hypothesis import strategies as st

import supervisor
from supervisor import LguestDevice, abi
from supervisor.launcher.layout import plan

TARGET = 200_000
# A hang fails the example instead of blocking the run.  A bound for failing, never a wait
# for success: beside a CPU-bound process per core the niced workers get about 1 % of a
# core, and the slowest example (a page-fault handler that faults, 5,000 deliveries until
# its stack runs out) needs about 0.5 s of CPU, so 50 s of wall time there.
EXAMPLE_TIMEOUT = 300.0
MIN_SLICES = 3  # a surviving hostile guest must have had at least this many slices

HOSTILE = hostile_guest()
SYMBOLS = HOSTILE.symbols
PGDIR = plan(256 << 10).pgdir


async def irq_storm(targets: list[Booted], stop: asyncio.Event, seed: int) -> int:
    """Write LHREQ_IRQ with random irqs to ``targets`` until ``stop``; count the writes."""
    rng = random.Random(seed)
    sent = 0
    while not stop.is_set():
        for b in targets:
            try:
                await b.file.write(abi.pack_words(abi.LHREQ_IRQ, rng.randrange(abi.LGUEST_IRQS)))
                sent += 1
            except OSError as e:
                assert e.errno in (errno.ENOENT, errno.EBADF), e  # dead, or closed by us
        await asyncio.sleep(0)
    return sent


async def neighbour_finishes(b: Booted) -> None:
    """The healthy neighbour: exactly TARGET increments, one notify, a clean power-off."""
    assert await b.file.read(abi.WORD_SIZE) == abi.pack_words(0xC0FFEE)
    assert b.u32("counter") == TARGET
    assert b.u32("regcount") == TARGET
    with pytest.raises(FileNotFoundError):
        await b.file.read(abi.WORD_SIZE)
    assert await b.file.read(64) == b"counted\0"
    death = b.file.death
    assert death is not None and death.exit_status == 0


def settled(b: Booted) -> bool:
    """Dead, asleep for good, or has had its share of slices."""
    f = b.file
    if f.death is not None:
        return True
    stats = f.stats
    assert stats is not None
    return f.cpu(0).halted or stats.slices >= MIN_SLICES


async def contest(
    dev: LguestDevice,
    hostiles: list[Booted],
    *,
    storm_seed: int | None = None,
    ready: Callable[[], bool] = lambda: True,
) -> list[Outcome]:
    """Run ``hostiles`` next to a fresh neighbour; check everything; close them all."""
    tasks_before = set(asyncio.all_tasks())
    threads_before = threading.enumerate()
    neighbour = await boot_image(dev, neighbour_guest(TARGET))
    everyone = [neighbour, *hostiles]
    stop = asyncio.Event()
    storm = None
    try:
        async with asyncio.timeout(EXAMPLE_TIMEOUT):
            drivers = [asyncio.create_task(drive(h)) for h in hostiles]
            if storm_seed is not None:
                storm = asyncio.create_task(irq_storm(everyone, stop, storm_seed))
            await neighbour_finishes(neighbour)
            await until(lambda: ready() and all(settled(h) for h in hostiles), EXAMPLE_TIMEOUT)
            stop.set()
            for h in hostiles:
                await h.file.close()  # never hangs, whatever the guest does
            outcomes = await asyncio.gather(*drivers)
            if storm is not None:
                assert await storm >= 0
    finally:
        stop.set()
        for b in everyone:
            await release(b)  # fails if the device still holds the memory
    for h, outcome in zip(hostiles, outcomes, strict=True):
        if outcome.died:
            assert reason_ok(outcome, h), f"died without a reason: {h.file.death!r}"
        else:
            assert h.file.death is None or h.file.closed
    assert not (set(dev.files) & {b.file for b in everyone})
    await quiescent(dev, tasks_before, threads_before)
    return outcomes


async def boot_all(dev: LguestDevice, payloads: list[bytes]) -> list[Booted]:
    return [await boot_image(dev, HOSTILE, p) for p in payloads]


# -- property tests -------------------------------------------------------------------


@FUZZ
@given(
    payloads=st.lists(st.binary(min_size=1, max_size=512), min_size=1, max_size=3),
    storm=st.none() | st.integers(0, 2**32),
)
async def test_random_bytes_after_init(
    dev: LguestDevice, payloads: list[bytes], storm: int | None
) -> None:
    await contest(dev, await boot_all(dev, payloads), storm_seed=storm)


@FUZZ
@given(
    payloads=st.lists(programs(), min_size=1, max_size=3),
    storm=st.none() | st.integers(0, 2**32),
)
async def test_random_programs(dev: LguestDevice, payloads: list[bytes], storm: int | None) -> None:
    await contest(dev, await boot_all(dev, payloads), storm_seed=storm)


@FUZZ
@given(
    streams=st.lists(
        st.lists(hypercalls() | ring_hypercalls(), min_size=1, max_size=20),
        min_size=1,
        max_size=3,
    ),
    storm=st.none() | st.integers(0, 2**32),
)
async def test_random_hypercall_streams(
    dev: LguestDevice, streams: list[list[bytes]], storm: int | None
) -> None:
    """Random hypercall numbers and arguments, direct and on the ring, repeated forever."""
    loop_back = jump_to(SYMBOLS["payload"])
    payloads = [(b"".join(s))[: PAYLOAD_SIZE - len(loop_back)] + loop_back for s in streams]
    await contest(dev, await boot_all(dev, payloads), storm_seed=storm)


@FUZZ
@given(
    deltas=st.lists(st.integers(1, 5_000), min_size=1, max_size=3),
    no_gate=st.integers(1, 5_000) | st.none(),
    sleepers=st.integers(0, 2),
    seed=st.integers(0, 2**32),
)
async def test_timer_and_interrupt_storms(
    dev: LguestDevice, deltas: list[int], no_gate: int | None, sleepers: int, seed: int
) -> None:
    """Clock events every few nanoseconds, irqs from the Launcher as fast as it can write."""
    storms = [await boot_image(dev, assemble(TIMER_STORM_SOURCE.format(delta=d))) for d in deltas]
    others = []
    if no_gate is not None:
        others.append(await boot_image(dev, assemble(TIMER_NO_GATE_SOURCE.format(delta=no_gate))))
    # Guests that take every irq the storm sends them and sleep again.
    sleeper = b"".join(
        hcall(abi.LHCALL_LOAD_IDT_ENTRY, 32 + i, *gate(SYMBOLS["irq_return"]))
        for i in range(abi.LGUEST_IRQS)
    )
    sleeper += STI + HLT + jump_to(SYMBOLS["payload"] + len(sleeper))
    others += await boot_all(dev, [sleeper] * sleepers)
    hostiles = storms + others

    def stormed() -> bool:
        # The storm really happens: each storm guest takes a few ticks before it is closed.
        return all(s.u32("ticks") >= 3 for s in storms)

    outcomes = await contest(dev, hostiles, storm_seed=seed, ready=stormed)
    for outcome in outcomes[: len(storms)]:
        assert not outcome.died, f"a timer storm guest died: {outcome.reason}"


# -- one of each, deterministically ---------------------------------------------------

EACH = {
    "ud2": UD2,
    "int3": int_n(3),
    "int 0x80 without a gate": int_n(0x80),
    "int 8": int_n(8),
    "divide by zero": b"\x31\xc9\xf7\xf1",
    "garbage lgdt then reload ds": lgdt(0xFFFFFFF0) + b"\x66\xb8\x10\x00\x8e\xd8",
    "garbage lidt then int3": lidt(SYMBOLS["scratch"]) + int_n(3),
    "far jump to a bad selector": ljmp(0x1234, 0),
    "iret to garbage": push(0x100) + push(8) + push(0) + b"\xcf",
    "cr3 outside memory": mov_cr(3, 0xFFFFF000) + b"\x90",
    "paging off": b"\x0f\x20\xc0\x25\xff\xff\xff\x7f\x0f\x22\xc0" + store(0x200000, 1),
    "pae on": b"\x0f\x20\xe0\x83\xc8\x20\x0f\x22\xe0\x90",
    "trap flag": SET_TF + b"\x90\x90",
    "wipe the page directory": b"".join(store(PGDIR + 4 * i, 0) for i in range(4)),
    "page-table entry past the limit, then SET_PTE": hcall(
        abi.LHCALL_SET_PTE, PGDIR, 0x1000, 0x7FFFF007
    ),
    "rep stosb over everything": mov("edi", 0) + mov("ecx", 0xFFFFFFFF) + b"\xf3\xaa",
    "stack in the void, then a trap": mov("esp", 0xDEADBEEF)
    + hcall(abi.LHCALL_LOAD_IDT_ENTRY, 3, *gate(SYMBOLS["irq_return"]))
    + int_n(3),
    "trap handler that faults forever": hcall(abi.LHCALL_LOAD_IDT_ENTRY, 6, *gate(0x7FFFFFF0))
    + UD2,
    "page fault handler at an unmapped page": hcall(
        abi.LHCALL_LOAD_IDT_ENTRY, 14, *gate(0xC8000000)
    )
    + store(0x80000000, 1),
    "jump outside memory": jump_to(0x7FFFFFF0),
    "bad hypercall": hcall(0xFFFFFFFF),
    "LGUEST_INIT again": hcall(abi.LHCALL_LGUEST_INIT, SYMBOLS["lguest_data"]),
    "LOAD_GDT with too many entries": hcall(abi.LHCALL_LOAD_GDT, 0, 33),
    "NEW_PGTABLE past the limit": hcall(abi.LHCALL_NEW_PGTABLE, 0x7FFFF000),
    "bad ring entry": store(SYMBOLS["lguest_data"] + abi.LGUEST_DATA_HCALLS, 99)
    + b"\xc6\x05"
    + (SYMBOLS["lguest_data"] + abi.LGUEST_DATA_HCALL_STATUS).to_bytes(4, "little")
    + b"\x00"
    + hcall(abi.LHCALL_FLUSH_ASYNC),
    "crash with a message outside memory": hcall(abi.LHCALL_SHUTDOWN, 0xFFFFFF00, 0),
}


@pytest.mark.one_loop
@pytest.mark.parametrize("name", sorted(EACH))
async def test_each_hostile_snippet_dies_with_a_reason(dev: LguestDevice, name: str) -> None:
    h = await boot_image(dev, HOSTILE, EACH[name])
    neighbour = await boot_image(dev, neighbour_guest(TARGET))
    try:
        async with asyncio.timeout(EXAMPLE_TIMEOUT):
            outcome, _ = await asyncio.gather(drive(h), neighbour_finishes(neighbour))
    finally:
        await release(h)
        await release(neighbour)
    assert outcome.died, name
    assert outcome.reason, name


@pytest.mark.one_loop
async def test_the_device_outlives_a_hundred_deaths(dev: LguestDevice) -> None:
    """Many quick deaths in a row, then a neighbour on the same device still counts right."""
    snippets = list(EACH.values())
    for i in range(0, 100):
        h = await boot_image(dev, HOSTILE, snippets[i % len(snippets)])
        async with asyncio.timeout(EXAMPLE_TIMEOUT):
            outcome = await drive(h)
        await release(h)
        assert outcome.died
    neighbour = await boot_image(dev, neighbour_guest(TARGET))
    async with asyncio.timeout(EXAMPLE_TIMEOUT):
        await neighbour_finishes(neighbour)
    await release(neighbour)


@pytest.mark.one_loop
async def test_power_off_with_an_empty_message_still_gives_a_reason(dev: LguestDevice) -> None:
    empty = SYMBOLS["scratch"]  # zero-filled
    h = await boot_image(dev, HOSTILE, hcall(abi.LHCALL_SHUTDOWN, empty, 1, 0))
    async with asyncio.timeout(EXAMPLE_TIMEOUT):
        outcome = await drive(h)
    await release(h)
    assert outcome.died
    assert outcome.reason != ""


# -- fairness: a hostile guest may not hold a CPU thread for long -----------------------

HOGS = {
    # A plain spinner: the slice budget adapts, the neighbour hardly notices.
    "spin": "main:\n LGUEST_INIT\n1: jmp 1b\n",
    # Hypercalls the Host does inside the slice (LHCALL_TS), as fast as possible.
    "local hypercalls": "main:\n LGUEST_INIT\n1: HCALL 8, 1\n jmp 1b\n",
    # Traps reflected to the guest's own handler, as fast as possible.
    "reflected traps": "main:\n LGUEST_INIT\n IDT 3, handler, 0xf\n1: int $3\n jmp 1b\n"
    "handler: iret\n",
}


def slices(b: Booted) -> int:
    stats = b.file.stats
    assert stats is not None
    return stats.slices


@pytest.mark.parametrize(
    "hog",
    [
        "spin",
        "local hypercalls",
        "reflected traps",
    ],
)
async def test_hogs_cannot_starve_the_neighbour(hog: str) -> None:
    """As many hogs as the device has threads, then a neighbour: counted, not timed.

    The neighbour can run only on a thread a hog gives back, so it reaching its exact
    end while the hogs' slices keep ending beside it is the mechanism; how long it
    waits is benchmarks/isolation.py's ``hogs`` figure.
    """
    workers = 2
    async with LguestDevice(workers=workers) as dev:
        hogs = [await boot_image(dev, assemble(HOGS[hog])) for _ in range(workers)]
        readers = [asyncio.create_task(drive(h)) for h in hogs]
        async with asyncio.timeout(EXAMPLE_TIMEOUT):
            # The neighbour arrives while the hogs run their first slices, before
            # the slice budget has adapted to them.
            await until(lambda: all(h.file.reading(0) for h in hogs))
            neighbour = await boot_image(dev, neighbour_guest(TARGET))
            before = [slices(h) for h in hogs]
            await neighbour_finishes(neighbour)
            during = [slices(h) - n for h, n in zip(hogs, before, strict=True)]
            assert not any(h.file.cpu(0).halted for h in hogs)
            assert slices(neighbour) > 0
            for h in [*hogs, neighbour]:
                await release(h)
            outcomes = await asyncio.gather(*readers)
        assert not any(o.died for o in outcomes)
        assert sum(during) >= 1, during  # a hog gave its thread back while it ran


# -- code the Host writes into guest memory runs as written -----------------------------

HOST_WRITTEN_CODE = r"""
.set BLOCK, {block}
main:
    LGUEST_INIT
    call func
    mov %eax, first
    movl $1, BLOCK+16          # command: read
    movl $0, BLOCK+20          # sector 0
    movl $1, BLOCK+24          # one sector
    movl $func, BLOCK+28       # over the function just called
    HCALL 17, BLOCK
    call func                  # must run what the disk held
    imul $10, first, %ecx
    add %eax, %ecx             # power off with status first * 10 + second
    mov $2, %eax
    mov $msg, %edx
    mov $1, %ebx
    int $0x1f
.data
msg: .asciz "done"
first: .long 0
.align 4096
func:
    mov $1, %eax
    ret
    .space 4090
"""


@pytest.mark.one_loop
async def test_code_read_from_the_block_device_runs_as_read(tmp_path: Path) -> None:
    """A guest runs a function, reads new code over it from disk, runs it again."""
    from supervisor import GuestConfig, Supervisor

    block = plan(1 << 20).device_page + 64  # descriptor 1: console first, then block
    source = HOST_WRITTEN_CODE.replace("{block}", hex(block))
    image = tmp_path / "g.img"
    image.write_bytes(assemble(source).image)
    disk = tmp_path / "disk"
    disk.write_bytes(b"\xb8\x02\x00\x00\x00\xc3".ljust(512, b"\0"))  # mov $2, %eax; ret
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=image, memory="1M", block=disk))
        result = await asyncio.wait_for(guest.wait(), EXAMPLE_TIMEOUT)
    assert result.exit_status == 12, result  # 11: the old translation ran


# A page that ran code is made a user page under CR4.SMEP (no code runs from it), the
# Host writes new code there, and the page is made the kernel's again (invlpg): the new
# code must run, as on a CPU.  (%ebx and %edi are loaded again after the NOTIFY: the
# hypercall takes its arguments in them.)
SMEP_FLIPPED_CODE = r"""
.set BLOCK, {block}
main:
    LGUEST_INIT
    call func
    mov %eax, first
    call table
    xor %ecx, %ecx
1:  andl $~4, (%edi,%ecx,4)     # every page of the first MiB: the kernel's
    inc %ecx
    cmp $256, %ecx
    jne 1b
    orl $4, (%edi,%ebx,4)       # but func's: a user page
    mov %cr3, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x100000, %eax          # CR4.SMEP: func's page runs no code now
    mov %eax, %cr4
    movl $1, BLOCK+16           # read sector 0 over func
    movl $0, BLOCK+20
    movl $1, BLOCK+24
    movl $func, BLOCK+28
    HCALL 17, BLOCK
    call table
    andl $~4, (%edi,%ebx,4)     # func's page: the kernel's again
    invlpg func
    call func                   # must run what the disk held
    imul $10, first, %ecx
    add %eax, %ecx
    mov $2, %eax
    mov $msg, %edx
    mov $1, %ebx
    int $0x1f
table:                          # %edi: the first page table; %ebx: func's entry in it
    mov %cr3, %edi
    and $0xfffff000, %edi
    mov (%edi), %edi
    and $0xfffff000, %edi
    mov $func, %ebx
    shr $12, %ebx
    ret
.data
msg: .asciz "done"
first: .long 0
.align 4096
func:
    mov $1, %eax
    ret
    .space 4090
"""


@pytest.mark.one_loop
@pytest.mark.xfail(
    strict=True,
    reason="a Host write to a page the CPU cannot run code from (a user page under "
    "CR4.SMEP) keeps the page's old translations, which run once the page is made "
    "runnable again (codecache._remove_code skips such pages)",
)
async def test_code_written_while_its_page_cannot_run_runs_as_written(tmp_path: Path) -> None:
    from supervisor import GuestConfig, Supervisor

    block = plan(1 << 20).device_page + 64
    image = tmp_path / "g.img"
    image.write_bytes(assemble(SMEP_FLIPPED_CODE.replace("{block}", hex(block))).image)
    disk = tmp_path / "disk"
    disk.write_bytes(b"\xb8\x02\x00\x00\x00\xc3".ljust(512, b"\0"))  # mov $2, %eax; ret
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=image, memory="1M", block=disk))
        result = await asyncio.wait_for(guest.wait(), EXAMPLE_TIMEOUT)
    assert result.exit_status == 12, result  # 11: the old translation ran


# -- a console flood is paid for by the flooder -----------------------------------------

FLOOD_IMAGE = Path(__file__).resolve().parent.parent / "guests" / "flood.img"
FLOOD_LINES = 32_768  # flood.img: 64 KiB of 2-byte lines per NOTIFY
COUNTER = r"""
main:
    LGUEST_INIT
1:  incl counter
    cmpl $1000000, counter
    jne 1b
    HCALL 2, msg, 1, 0
.data
counter: .long 0
msg: .asciz "counted"
"""
PACKAGE = str(Path(supervisor.__file__).resolve().parent)
TraceFunction: TypeAlias = Callable[[FrameType, str, Any], "TraceFunction | None"]
# Python steps (lines run and C functions called by the package's code on the event loop)
# the Host may spend on one flood NOTIFY: far fewer than one per line of it, so that the
# loop's cost of a flood is per NOTIFY, which the flooder pays for with its own round trip.
STEPS_PER_NOTIFY = FLOOD_LINES // 8


class StepCounter:
    """Counts the package's Python lines and C calls on this thread while active."""

    def __init__(self) -> None:
        self.steps = 0

    def _local(self, frame: FrameType, event: str, arg: Any) -> TraceFunction:
        self.steps += event == "line"
        return self._local

    def _trace(self, frame: FrameType, event: str, arg: Any) -> TraceFunction | None:
        return self._local if frame.f_code.co_filename.startswith(PACKAGE) else None

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and frame.f_code.co_filename.startswith(PACKAGE):
            self.steps += 1

    def __enter__(self) -> StepCounter:
        sys.settrace(self._trace)
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.settrace(None)
        sys.setprofile(None)


@pytest.mark.parametrize("console", ["null", "capture"])
async def test_a_console_flood_does_not_starve_the_neighbour(tmp_path: Path, console: str) -> None:
    """Counted, not timed: the neighbour runs to its end while the flood goes on, and the
    flood costs the loop a bounded number of steps per NOTIFY (``null``: its lines are
    counted at C speed, none is kept) or stops at the unread buffer (``capture``: the
    flooder waits for a reader, the library's default).  benchmarks/isolation.py's
    ``flood`` figures time the neighbour beside a flood against the same guest alone."""
    from supervisor import GuestConfig, Supervisor

    image = tmp_path / "count.img"
    image.write_bytes(assemble(COUNTER).image)
    counter = GuestConfig(image=image, memory="128K", console="null")
    async with Supervisor() as sup:
        flood = await sup.launch(GuestConfig(image=FLOOD_IMAGE, memory="1M", console=console))
        await until(lambda: flood.stats.notifies >= (10 if console == "null" else 1))
        if console == "capture":  # nobody reads: it fills the buffer, then waits
            await until(lambda: flood.console.held > flood.console.max_bytes // 2)
        before = flood.stats.notifies
        with StepCounter() as counted:
            neighbour = await sup.launch(counter)
            async with asyncio.timeout(EXAMPLE_TIMEOUT):
                if console == "null":  # the flood runs on beside the neighbour
                    await until(lambda: flood.stats.notifies >= before + 10, EXAMPLE_TIMEOUT)
                result = await neighbour.wait()
        during = flood.stats.notifies - before
        assert result.reason == "counted" and result.exit_status == 0, result
        assert not flood.done, "the flooder is still flooding"
        if console == "null":
            assert during >= 10
            assert flood.console.held == 0  # counted, not kept
            assert flood.console.dropped >= FLOOD_LINES * flood.stats.notifies - FLOOD_LINES
            assert counted.steps < STEPS_PER_NOTIFY * (during + 1), (counted.steps, during)
        else:
            assert during <= 1, during  # back-pressure: no reader, no more NOTIFYs
            assert flood.console.held <= flood.console.max_bytes
        await flood.kill()
