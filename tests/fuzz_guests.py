"""Shared pieces of the hostile-guest, fuzzing, cancellation and leak tests.

* Hypothesis profiles: ``lguest-short`` (the default, keeps ``pytest`` fast) and
  ``lguest-long`` (``LGUEST_FUZZ_PROFILE=long``).  The tests apply them with
  :data:`FUZZ` instead of loading a global profile, so other tests are unaffected.
* A hostile guest image assembled once: ``LGUEST_INIT`` then a payload area
  that the tests fill with random bytes or with machine code built here by a
  tiny x86-32 encoder (no assembler run per example).
* A healthy neighbour that counts to a target and notifies.
* :func:`drive`, which reads a guest until it dies or is closed and lets only
  the documented ``OSError``\\ s through, and :func:`quiescent`, which asserts
  nothing is left pending (tasks, executor work, threads).
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from guestasm import COUNT_TO, Booted, Guest, assemble, load
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from supervisor import LguestDevice, abi
from supervisor.launcher.layout import IMAGE_BASE, PAGE_OFFSET

# -- profiles ---------------------------------------------------------------------

LONG = os.environ.get("LGUEST_FUZZ_PROFILE", "").lower() == "long"

settings.register_profile(
    "lguest-short",
    max_examples=25,
    deadline=None,
    # One device (a function-scoped fixture) serves every example of a test: that
    # is the point, the device must survive all of them.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "lguest-long",
    parent=settings.get_profile("lguest-short"),
    max_examples=400,
)
FUZZ = settings.get_profile("lguest-long" if LONG else "lguest-short")


def scaled(short: int, long: int) -> int:
    """A size for the default profile, or for the long one."""
    return long if LONG else short


# The errno values the device documents for read and write.
DOCUMENTED_ERRNOS = frozenset(
    {
        errno.EINVAL,
        errno.EFAULT,
        errno.EBUSY,
        errno.ENOENT,
        errno.EPERM,
        errno.EBADF,
        errno.EAGAIN,
        errno.ERESTART,
        errno.ENOMEM,
    }
)

# -- guests ----------------------------------------------------------------------

RAM = 256 << 10
EXECUTOR_IDLE = 60.0  # seconds: a bound for failing, never a wait for success
PAYLOAD_SIZE = 4096

HOSTILE_SOURCE = rf"""
main:
    LGUEST_INIT
payload:
    .fill {PAYLOAD_SIZE}, 1, 0xcc
payload_end:
    .fill 16, 1, 0xcc
.data
scratch: .space 64
"""

NEIGHBOUR_SOURCE = COUNT_TO

# Re-arms the clock event from its own tick handler: a timer storm.
TIMER_STORM_SOURCE = r"""
main:
    LGUEST_INIT
    IDT 32, tick
    HCALL 9, {delta}
1:  HCALL 10
    jmp 1b
tick:
    incl ticks
    HCALL 9, {delta}
    jmp irq_return
.data
ticks: .long 0
"""

# Like the storm, but with no gate for irq 0: the irq can never be delivered.
TIMER_NO_GATE_SOURCE = r"""
main:
    LGUEST_INIT
1:  HCALL 9, {delta}
    incl ticks
    hlt
    jmp 1b
.data
ticks: .long 0
"""


def hostile_guest() -> Guest:
    return assemble(HOSTILE_SOURCE)


def neighbour_guest(target: int) -> Guest:
    return assemble(NEIGHBOUR_SOURCE.format(target=target))


async def boot_image(
    dev: LguestDevice, guest: Guest, payload: bytes = b"", ram_size: int = RAM
) -> Booted:
    """Load ``guest`` with ``payload`` copied over its ``payload`` area, INITIALIZE it."""
    memory, layout = load(guest, ram_size)
    if payload:
        assert len(payload) <= PAYLOAD_SIZE, len(payload)
        memory.write(guest.symbols["payload"], payload)
    f = dev.open(memory)
    try:
        await f.write(
            abi.pack_words(
                abi.LHREQ_INITIALIZE, memory.address, layout.pfn_limit, layout.pgdir, IMAGE_BASE
            )
        )
    except BaseException:
        await f.close()
        memory.close()
        raise
    return Booted(f, memory, layout, guest)


async def release(booted: Booted) -> None:
    """Close the file, then the memory: fails if the device still holds the memory."""
    await booted.file.close()
    booted.memory.close()


# -- a tiny x86-32 encoder ----------------------------------------------------------

_REGS = {"eax": 0, "ecx": 1, "edx": 2, "ebx": 3, "esp": 4, "ebp": 5, "esi": 6, "edi": 7}


def u32(v: int) -> bytes:
    return struct.pack("<I", v & 0xFFFFFFFF)


def mov(reg: str, value: int) -> bytes:
    return bytes([0xB8 + _REGS[reg]]) + u32(value)


def hcall(nr: int, a1: int = 0, a2: int = 0, a3: int = 0) -> bytes:
    return mov("eax", nr) + mov("edx", a1) + mov("ebx", a2) + mov("ecx", a3) + b"\xcd\x1f"


def int_n(vector: int) -> bytes:
    return bytes([0xCD, vector & 0xFF])


def store(addr: int, value: int) -> bytes:
    """movl $value, addr"""
    return b"\xc7\x05" + u32(addr) + u32(value)


def store_byte(addr: int, value: int) -> bytes:
    """movb $value, addr"""
    return b"\xc6\x05" + u32(addr) + bytes([value & 0xFF])


def load_from(addr: int) -> bytes:
    """mov addr, %eax"""
    return b"\xa1" + u32(addr)


def jump_to(addr: int) -> bytes:
    """mov $addr, %eax; jmp *%eax"""
    return mov("eax", addr) + b"\xff\xe0"


def mov_cr(n: int, value: int) -> bytes:
    """mov $value, %eax; mov %eax, %crN"""
    return mov("eax", value) + bytes([0x0F, 0x22, 0xC0 | (n << 3)])


def lgdt(addr: int) -> bytes:
    return b"\x0f\x01\x15" + u32(addr)


def lidt(addr: int) -> bytes:
    return b"\x0f\x01\x1d" + u32(addr)


def ljmp(selector: int, offset: int) -> bytes:
    return b"\xea" + u32(offset) + struct.pack("<H", selector & 0xFFFF)


def push(value: int) -> bytes:
    return b"\x68" + u32(value)


UD2 = b"\x0f\x0b"
HLT = b"\xf4"
CLI = b"\xfa"
STI = b"\xfb"
IRET = b"\xcf"
SPIN = b"\xeb\xfe"
SET_TF = b"\x9c\x81\x0c\x24" + u32(0x100) + b"\x9d"  # pushf; orl $0x100,(%esp); popf
REP_STOSB = b"\xf3\xaa"


def gate(handler: int, type_: int = 0xE, present: bool = True) -> tuple[int, int]:
    lo = (0x08 << 16) | (handler & 0xFFFF)
    hi = (handler & 0xFFFF0000) | (type_ << 8) | (0x8000 if present else 0)
    return lo, hi


def queue(lguest_data: int, slot: int, nr: int, a1: int, a2: int, a3: int) -> bytes:
    """Put a call in slot ``slot`` of the async hypercall ring, then mark it pending."""
    base = lguest_data + abi.LGUEST_DATA_HCALLS + abi.HCALL_ARGS_SIZE * slot
    return (
        store(base, nr)
        + store(base + 4, a1)
        + store(base + 8, a2)
        + store(base + 12, a3)
        + store_byte(lguest_data + abi.LGUEST_DATA_HCALL_STATUS + slot, 0)
    )


# -- strategies -------------------------------------------------------------------

_GUEST = None


def _symbols() -> dict[str, int]:
    global _GUEST
    if _GUEST is None:
        _GUEST = hostile_guest()
    return _GUEST.symbols


def addresses() -> st.SearchStrategy[int]:
    """Guest-virtual addresses worth poking: structures, edges of memory, garbage."""
    s = _symbols()
    from supervisor.launcher.layout import plan

    layout = plan(RAM)
    limit = layout.pfn_limit * abi.PAGE_SIZE
    data = s["lguest_data"]
    interesting = [
        0,
        4,
        s["payload"],
        s["payload"] + 64,
        s["scratch"],
        data,
        data + abi.LGUEST_DATA_BLOCKED_INTERRUPTS,
        data + abi.LGUEST_DATA_HCALL_STATUS,
        data + abi.LGUEST_DATA_HCALLS,
        data + abi.LGUEST_DATA_NOIRQ_START,
        data + abi.LGUEST_DATA_SYSCALL_VEC,
        s["stack_top"] - 4,
        s["stack_top"],
        s["irq_return"],
        layout.pgdir,
        layout.pgdir + 4,
        layout.pgdir + 4 * (PAGE_OFFSET >> 22),
        layout.pgdir + abi.PAGE_SIZE,
        layout.pgdir + abi.PAGE_SIZE + 4 * (IMAGE_BASE >> 12),
        layout.device_page,
        limit - 4,
        limit,
        PAGE_OFFSET + s["scratch"],
        PAGE_OFFSET + limit,
        0x7FFFFFFF,
        0xFFFFFFFC,
        0xFFFFFFFF,
    ]
    return st.one_of(
        st.sampled_from(interesting), st.integers(0, limit), st.integers(0, 0xFFFFFFFF)
    )


def words() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, 0x80, 0x100, 0x200, 0x1000, 0x7FFFFFFF, 0xFFFFFFFF]),
        addresses(),
        st.integers(0, 0xFFFFFFFF),
    )


KNOWN_HYPERCALLS = sorted(abi.HYPERCALL_NAMES)


def hypercall_numbers() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from(KNOWN_HYPERCALLS),
        st.integers(0, 40),
        st.integers(0, 0xFFFFFFFF),
    )


@st.composite
def hypercalls(draw: st.DrawFn) -> bytes:
    """One direct hypercall with a random number and arguments."""
    return hcall(draw(hypercall_numbers()), draw(words()), draw(words()), draw(words()))


@st.composite
def ring_hypercalls(draw: st.DrawFn) -> bytes:
    """Random calls queued on the async ring, then usually flushed."""
    data = _symbols()["lguest_data"]
    code = b""
    for _ in range(draw(st.integers(1, 4))):
        slot = draw(st.integers(0, abi.LHCALL_RING_SIZE - 1))
        nr = draw(hypercall_numbers())
        code += queue(data, slot, nr, draw(words()), draw(words()), draw(words()))
    if draw(st.booleans()):
        code += hcall(abi.LHCALL_FLUSH_ASYNC)
    return code


@st.composite
def instructions(draw: st.DrawFn) -> bytes:
    """One interesting instruction (or a short group of them)."""
    s = _symbols()
    kind = draw(
        st.sampled_from(
            [
                "hcall",
                "ring",
                "int",
                "store",
                "load",
                "ud2",
                "hlt",
                "cli",
                "sti",
                "lgdt",
                "lidt",
                "ljmp",
                "iret",
                "jump",
                "cr",
                "esp",
                "pagetable",
                "selfmod",
                "idt",
                "clock",
                "irq_enabled",
                "blocked",
                "trapflag",
                "rep_stosb",
                "notify",
            ]
        )
    )
    if kind == "hcall":
        return draw(hypercalls())
    if kind == "ring":
        return draw(ring_hypercalls())
    if kind == "int":
        vectors = st.sampled_from([0x1F, 0x80, 3, 8, 14, 32]) | st.integers(0, 255)
        return int_n(draw(vectors))
    if kind == "store":
        return store(draw(addresses()), draw(words()))
    if kind == "load":
        return load_from(draw(addresses()))
    if kind == "ud2":
        return UD2
    if kind == "hlt":
        return HLT
    if kind == "cli":
        return CLI
    if kind == "sti":
        return STI
    if kind == "lgdt":
        return lgdt(draw(addresses()))
    if kind == "lidt":
        return lidt(draw(addresses()))
    if kind == "ljmp":
        return ljmp(draw(st.sampled_from([0, 8, 0x10, 0x18, 0x61, 0xFFFF])), draw(addresses()))
    if kind == "iret":
        return (
            push(draw(words()))
            + push(draw(st.sampled_from([8, 0x10, 0x61])))
            + push(draw(addresses()))
            + IRET
        )
    if kind == "jump":
        return jump_to(draw(addresses()))
    if kind == "cr":
        return mov_cr(draw(st.sampled_from([0, 3, 4])), draw(words()))
    if kind == "esp":
        return mov("esp", draw(addresses()))
    if kind == "pagetable":
        from supervisor.launcher.layout import plan

        pgdir = plan(RAM).pgdir
        where = pgdir + 4 * draw(st.integers(0, 2 * 1024 - 1))  # directory and first table
        code = store(where, draw(words()))
        return code + draw(st.sampled_from([b"", hcall(abi.LHCALL_FLUSH_TLB, 1), mov_cr(3, pgdir)]))
    if kind == "selfmod":
        offset = draw(st.integers(0, PAYLOAD_SIZE - 4))
        return store(s["payload"] + offset, draw(words()))
    if kind == "idt":
        vectors = st.sampled_from([0, 3, 6, 13, 14, 32, 33, 0x80]) | st.integers(0, 300)
        vector = draw(vectors)
        handler = draw(st.sampled_from([s["irq_return"], s["payload"]]) | addresses())
        lo, hi = gate(handler, draw(st.sampled_from([0xE, 0xF, 0x5])), draw(st.booleans()))
        return hcall(abi.LHCALL_LOAD_IDT_ENTRY, vector, lo, hi)
    if kind == "clock":
        delta = draw(st.one_of(st.integers(0, 2_000), st.sampled_from([0, 100, 0xFFFFFFFF])))
        return hcall(abi.LHCALL_SET_CLOCKEVENT, delta)
    if kind == "irq_enabled":
        return store(s["lguest_data"], draw(st.sampled_from([0, 0x200, 0xFFFFFFFF])))
    if kind == "blocked":
        return store(s["lguest_data"] + abi.LGUEST_DATA_BLOCKED_INTERRUPTS, draw(words()))
    if kind == "trapflag":
        return SET_TF
    if kind == "rep_stosb":
        return mov("edi", draw(addresses())) + mov("ecx", draw(st.integers(0, 1 << 20))) + REP_STOSB
    assert kind == "notify"
    return hcall(abi.LHCALL_NOTIFY, draw(words()))


@st.composite
def programs(draw: st.DrawFn) -> bytes:
    """A random program for the payload area: interesting instructions, then a tail."""
    s = _symbols()
    code = b"".join(draw(st.lists(instructions(), min_size=1, max_size=12)))
    tail = draw(
        st.sampled_from(
            [
                b"",  # fall into the 0xcc filler: int3, usually fatal
                SPIN,  # keep running
                jump_to(s["payload"]),  # do it all again, forever
                hcall(abi.LHCALL_NOTIFY, 0x1234) + jump_to(s["payload"]),
                STI + HLT + jump_to(s["payload"]),
                hcall(abi.LHCALL_SHUTDOWN, s["scratch"], 1, 0),
            ]
        )
    )
    return (code + tail)[:PAYLOAD_SIZE]


# -- running and checking ------------------------------------------------------------


@dataclass
class Outcome:
    """How :func:`drive` ended: the guest died, or its file was closed under it."""

    died: bool
    reason: str = ""
    errno: int | None = None
    notifies: int = 0
    errors: list[int] = field(default_factory=list)


async def drive(booted: Booted, *, breaks: bool = False) -> Outcome:
    """Read ``booted`` until it dies or is closed.

    A notify is counted and the read repeated.  ``EAGAIN`` is only expected when
    somebody writes breaks (``breaks``): the read is then retried.  Any
    ``OSError`` outside the documented set, and any other exception, propagates.
    """
    f = booted.file
    notifies = 0
    while True:
        try:
            word = await f.read(abi.WORD_SIZE)
        except OSError as e:
            if e.errno not in DOCUMENTED_ERRNOS:
                raise
            if e.errno == errno.EBADF:
                return Outcome(died=False, notifies=notifies)
            if e.errno in (errno.ENOENT, errno.ERESTART):
                death = f.death
                assert death is not None, "read said dead but the file has no death"
                if e.errno == errno.ENOENT:
                    text = (await f.read(4096)).rstrip(b"\0").decode()
                    assert text == death.reason[: len(text)], (text, death)
                return Outcome(died=True, reason=death.reason, errno=e.errno, notifies=notifies)
            if e.errno == errno.EAGAIN and breaks:
                await asyncio.sleep(0)  # let whoever broke us out release the break
                continue
            raise
        assert len(word) == abi.WORD_SIZE
        notifies += 1


def reason_ok(outcome: Outcome, booted: Booted) -> bool:
    """A dead guest gives a reason; the one exception is a guest's own power-off or
    restart with an empty message (see ``test_hostile``'s xfail for that)."""
    if outcome.reason:
        return True
    death = booted.file.death
    return death is not None and (death.exit_status is not None or death.restart)


def lguest_threads(baseline: Iterable[threading.Thread]) -> list[threading.Thread]:
    """Threads started since ``baseline``; fails on any that is not a device CPU thread."""
    base = set(baseline)
    extra = [t for t in threading.enumerate() if t not in base]
    strays = [t.name for t in extra if not t.name.startswith("lguest-cpu")]
    assert not strays, f"stray threads: {strays}"
    return extra


async def executor_idle(dev: LguestDevice) -> None:
    """The executor has no queued work: a sentinel submitted now runs promptly (within
    EXECUTOR_IDLE seconds)."""
    ran = threading.Event()
    async with asyncio.timeout(EXECUTOR_IDLE):
        await asyncio.wrap_future(dev.executor.submit(ran.set))
    assert ran.is_set()


async def quiescent(
    dev: LguestDevice,
    tasks_before: set[asyncio.Task[object]],
    threads_before: Iterable[threading.Thread],
) -> None:
    """Nothing left pending: no new task, an idle executor, only device threads."""
    stray = {t for t in asyncio.all_tasks() if t not in tasks_before and not t.done()}
    assert not stray, f"stray tasks: {stray}"
    await executor_idle(dev)
    lguest_threads(threads_before)
    for f in dev.files:
        assert not any(f.reading(n) for n in range(f.cpu_count)), "a CPU is still marked reading"


class LoopErrors:
    """Install on the running loop: records every call of its exception handler."""

    def __init__(self) -> None:
        self.calls: list[dict[str, object]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._old: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None

    def __enter__(self) -> LoopErrors:
        self._loop = asyncio.get_running_loop()
        self._old = self._loop.get_exception_handler()
        self._loop.set_exception_handler(lambda _loop, ctx: self.calls.append(ctx))
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.set_exception_handler(self._old)
