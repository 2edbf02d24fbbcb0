"""A guest's whole state as one value: pause, capture and revive through the device's
public surface.

* the control surface: pause/resume/state errnos, a paused read stays pending;
* the value: ``==``, pickle, the encoding and its errors, every field marked;
* exactness: a property test pauses guests that compute, take timer interrupts,
  notify and halt at random moments, revives them in another device (and, in
  one test, another process) and checks memory, output and exit against an
  uninterrupted run;
* exits as values: the classifier and the run loop's decision, on fabricated values;
* the house rules: no ``Uc`` at import, the threading contract in debug mode (the
  others: tests/test_house_rules.py and the import contracts in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import pickle
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fuzz_guests import LONG
from guestasm import SPIN, Booted, assemble, boot, load, notified, until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from unicorn import unicorn_const as uc_const

from supervisor import LguestDevice, abi
from supervisor._statefields import saved_fields, unmarked_fields
from supervisor.cpu import PARTS, Hold, LgCpu, ThreadError
from supervisor.execute import SliceExit, classify
from supervisor.guest import Lguest
from supervisor.launcher.layout import IMAGE_BASE
from supervisor.memory import GuestMemory
from supervisor.run import RunState, pending_exit
from supervisor.state import CpuState, Exit, GuestState, StateError

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 60  # seconds: a bound for failing (a hang on a loaded machine), never a wait

# Computes over a table in STEPS steps; after each step it notifies (0x5000) and
# waits, halted, for a clock tick (a 1 ms timer re-armed by its handler).  The
# result depends on the computation alone: where ticks land changes nothing but
# the stack below esp, which the guest zeroes before powering off with its
# state as the status.
STEPS = 5
WORKER = rf"""
.set STEPS, {STEPS}
main:
    LGUEST_INIT
    IDT 32, tick
    HCALL 9, 1000000
step:
    mov $30000, %ecx
1:  mov state, %eax
    imul $1103515245, %eax, %eax
    add $12345, %eax
    mov %eax, state
    mov %eax, %edx
    and $0x3ff, %edx
    add %eax, table(,%edx,4)
    dec %ecx
    jnz 1b
    incl done
    HCALL 17, 0x5000
2:  mov done, %eax
    cmp ticks, %eax
    jbe 3f
    HCALL 10
    jmp 2b
3:  cmpl $STEPS, done
    jb step
    movl $0, lguest_data
    lea stack, %edi
    mov %esp, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb
    mov state, %ecx
    HCALL 2, msg, 1
tick:
    pusha
    incl ticks
    cmpl $STEPS, ticks
    jae 1f
    HCALL 9, 1000000
1:  popa
    jmp irq_return
.data
state: .long 0x2468
done: .long 0
ticks: .long 0
msg: .asciz "worked"
.align 4096
table: .space 4096
"""


def comparable(booted_symbols: dict[str, int], memory: bytes) -> bytes:
    """Guest memory with lguest_data.time and .tsc_khz (the Host's wall clock and its
    TSC rate, measured by each process) blanked."""
    at = booted_symbols["lguest_data"] + abi.LGUEST_DATA_TIME
    memory = memory[:at] + bytes(8) + memory[at + 8 :]
    at = booted_symbols["lguest_data"] + abi.LGUEST_DATA_TSC_KHZ
    return memory[:at] + bytes(4) + memory[at + 4 :]


@dataclasses.dataclass(frozen=True)
class Outcome:
    memory: bytes
    output: tuple[int, ...]  # `done` at each notify: what the guest said, in order
    death: Exit | None


_reference: dict[str, Outcome] = {}
REVIVALS = [0, 0]  # revivals the property test made, and its examples run


async def worker_to_death(g: Booted) -> tuple[bytes, tuple[int, ...]]:
    """Read the worker until it dies: its comparable memory and what it notified."""
    output = []
    while True:
        try:
            await notified(g)
            output.append(g.u32("done"))
        except FileNotFoundError:
            break
    return comparable(g.guest.symbols, g.memory.read(0, g.memory.size)), tuple(output)


async def uninterrupted(dev: LguestDevice) -> Outcome:
    if "worker" not in _reference:
        g = await boot(dev, WORKER)
        memory, output = await worker_to_death(g)
        _reference["worker"] = Outcome(memory, output, g.file.death)
        await g.file.close()
        g.memory.close()
    return _reference["worker"]


async def run_with_pauses(devs: tuple[LguestDevice, LguestDevice], pauses: list[int]) -> Outcome:
    """Run the worker; before reads, maybe wait ``n`` loop turns, pause, capture, and go on in
    a guest revived from the capture on the other device (the original is closed)."""
    g = await boot(devs[0], WORKER)
    f, memory, here = g.file, g.memory, 0
    symbols = g.guest.symbols
    output: list[int] = []
    while True:
        read = asyncio.ensure_future(f.read(abi.WORD_SIZE))
        if pauses:
            for _ in range(pauses.pop(0)):
                await asyncio.sleep(0)
            try:
                await f.pause()
            except FileNotFoundError:
                pass  # it died meanwhile: nothing to capture
            else:
                if not read.done():  # a paused read stays pending: capture and move
                    state = f.state()
                    copy = GuestMemory(memory.size)
                    copy.write(0, memory.read(0, memory.size))
                    here = 1 - here
                    revived = devs[here].open(copy, state=state)
                    await f.close()
                    with pytest.raises(OSError) as closed:
                        await read
                    assert closed.value.errno == errno.EBADF
                    memory.close()
                    f, memory = revived, copy
                    REVIVALS[0] += 1
                    continue
                f.resume()
        try:
            await read
        except FileNotFoundError:
            break
        output.append(int.from_bytes(memory.read(symbols["done"], 4), "little"))
    outcome = Outcome(comparable(symbols, memory.read(0, memory.size)), tuple(output), f.death)
    await f.close()
    memory.close()
    return outcome


EXACT = settings(
    # Each example waits for five guest timer ticks, so it costs wall time however fast
    # the machine: the default run tries 150 pause patterns (under one loop: what is
    # captured and revived is the guest's, not the loop's), the long profile
    # (LGUEST_FUZZ_PROFILE=long) thousands.
    max_examples=2000 if LONG else 150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
async def two_devices() -> AsyncIterator[tuple[LguestDevice, LguestDevice]]:
    async with LguestDevice() as a, LguestDevice() as b:
        yield a, b


@pytest.mark.one_loop
@EXACT
@given(pauses=st.lists(st.integers(0, 300), max_size=4))
async def test_paused_captured_and_revived_anywhere_ends_exactly_as_uninterrupted(
    two_devices: tuple[LguestDevice, LguestDevice], pauses: list[int]
) -> None:
    expected = await uninterrupted(two_devices[0])
    assert expected.output == tuple(range(1, STEPS + 1))
    assert expected.death is not None and expected.death.reason == "worked"
    REVIVALS[1] += 1
    async with asyncio.timeout(LIMIT):
        got = await run_with_pauses(two_devices, list(pauses))
    assert got.output == expected.output  # nothing lost, nothing repeated
    assert got.death == expected.death  # same status: the computation's last value
    assert got.memory == expected.memory


def test_the_property_test_revived_guests_mid_run() -> None:
    """Runs after the property test (file order): it did catch reads mid-run, often."""
    if REVIVALS[1] == 0:
        pytest.skip("the property test did not run")
    assert REVIVALS[0] >= REVIVALS[1] // 2


REVIVE_IN_CHILD = r"""
import asyncio, sys
from supervisor import GuestMemory, LguestDevice, abi
from supervisor.state import GuestState

async def main():
    size = int(sys.argv[1])
    data = sys.stdin.buffer.read()
    state = GuestState.from_bytes(data[size:])
    memory = GuestMemory(size)
    memory.write(0, data[:size])
    async with LguestDevice() as dev:
        f = dev.open(memory, state=state)
        notifies = 0
        while True:
            try:
                await f.read(abi.WORD_SIZE)
                notifies += 1
            except FileNotFoundError:
                break
        sys.stdout.buffer.write(notifies.to_bytes(4, "little"))
        sys.stdout.buffer.write(memory.read(0, size))
        await f.close()
    memory.close()

asyncio.run(main())
"""


@pytest.mark.one_loop
async def test_a_state_revived_in_another_process_ends_exactly_as_uninterrupted(
    dev: LguestDevice,
) -> None:
    expected = await uninterrupted(dev)
    for stop_after in (0, 2, STEPS - 1):
        g = await boot(dev, WORKER)
        for _ in range(stop_after):
            await notified(g)
        read = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
        await asyncio.sleep(0)
        await g.file.pause()
        assert not read.done()
        encoded = g.file.state().to_bytes()
        image = g.memory.read(0, g.memory.size)
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", REVIVE_IN_CHILD, str(g.memory.size),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        out, _ = await child.communicate(image + encoded)
        assert child.returncode == 0
        assert int.from_bytes(out[:4], "little") == STEPS - stop_after
        assert comparable(g.guest.symbols, out[4:]) == expected.memory
        await g.file.close()
        with pytest.raises(OSError):
            await read
        g.memory.close()


# -- the control surface -----------------------------------------------------------------------


async def test_pause_holds_a_running_read_and_resume_lets_it_go_on(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    read = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
    await until(lambda: g.u32("counter") > 1000)
    await g.file.pause()
    assert g.file.paused() and g.file.reading() and g.file.hold_reason() == "pause"
    held = g.u32("counter")
    for _ in range(50):
        await asyncio.sleep(0)
    assert g.u32("counter") == held and not read.done()  # stopped, read still pending
    g.file.resume()
    with pytest.raises(OSError) as busy:
        g.file.state()  # running again: a read in flight and no hold
    assert busy.value.errno == errno.EBUSY
    await until(lambda: g.u32("counter") > held + 1000)
    assert not read.done()
    await g.file.close()
    with pytest.raises(OSError):
        await read


async def test_pause_of_an_idle_cpu_is_immediate_and_holds_it_until_resume(
    dev: LguestDevice,
) -> None:
    g = await boot(dev, "main:\n LGUEST_INIT\n HCALL 17, 0x42\n1: incl counter\n jmp 1b\n"
                   ".data\ncounter: .long 0\n")  # fmt: skip
    await g.file.pause()  # no read in flight: returns at once
    assert g.file.paused() and not g.file.reading()
    read = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not read.done()  # held: the read does not run it
    g.file.resume()
    assert await read == abi.pack_words(0x42)
    await g.file.close()


@pytest.mark.one_loop
async def test_pause_and_state_errnos(dev: LguestDevice) -> None:
    memory = GuestMemory(1 << 20)
    f = dev.open(memory)
    for call in (f.state, lambda: f.resume(0)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EINVAL  # before INITIALIZE
    with pytest.raises(OSError) as e:
        await f.pause()
    assert e.value.errno == errno.EINVAL
    await f.close()
    memory.close()

    g = await boot(dev, "main:\n LGUEST_INIT\n HCALL 2, 0, 1, 7\n")
    with pytest.raises(OSError) as e:
        await g.file.pause(1)
    assert e.value.errno == errno.EINVAL  # no CPU 1
    with pytest.raises(FileNotFoundError):
        await g.file.read(abi.WORD_SIZE)
    with pytest.raises(FileNotFoundError):
        await g.file.pause()  # a dead guest cannot be paused
    dead = g.file.state()  # ...but its state, death included, can be taken
    assert dead.dead is not None and dead.dead.exit_status == 7
    await g.file.close()
    for call in (g.file.state, g.file.resume):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EBADF
    with pytest.raises(OSError) as e:
        await g.file.pause()
    assert e.value.errno == errno.EBADF
    g.memory.close()


@pytest.mark.one_loop
async def test_a_guest_whose_window_starts_inside_the_memory_revives_there(
    dev: LguestDevice,
) -> None:
    """INITIALIZE's base need not be the memory's first page: the state remembers where."""
    expected = await uninterrupted(dev)
    image, layout = load(assemble(WORKER))
    skip = 3 * abi.PAGE_SIZE
    memory = GuestMemory(image.size + skip)
    memory.write(skip, image.read(0, image.size))
    image.close()
    f = dev.open(memory)
    await f.write(
        abi.pack_words(abi.LHREQ_INITIALIZE, memory.address + skip, layout.pfn_limit,
                       layout.pgdir, IMAGE_BASE)
    )  # fmt: skip
    await f.read(abi.WORD_SIZE)
    state = f.state()
    assert state.base == skip
    copy = GuestMemory(memory.size)
    copy.write(0, memory.read(0, memory.size))
    revived = dev.open(copy, state=state)
    while True:
        try:
            await revived.read(abi.WORD_SIZE)
        except FileNotFoundError:
            break
    assert revived.death == expected.death
    symbols = assemble(WORKER).symbols
    window = copy.read(skip, copy.size - skip)
    assert comparable(symbols, window) == expected.memory
    for file, mem in ((f, memory), (revived, copy)):
        await file.close()
        mem.close()


@pytest.mark.one_loop
async def test_reviving_needs_memory_of_the_same_size(dev: LguestDevice) -> None:
    g = await boot(dev, WORKER)
    await notified(g)
    state = g.file.state()
    small = GuestMemory(g.memory.size - abi.PAGE_SIZE)
    with pytest.raises(OSError) as e:
        dev.open(small, state=state)
    assert e.value.errno == errno.EINVAL
    small.close()
    await g.file.close()
    g.memory.close()


@pytest.mark.one_loop
async def test_reviving_past_the_device_limits_is_enomem() -> None:
    async with LguestDevice(max_guests=1) as dev:
        g = await boot(dev, WORKER)
        await notified(g)
        state = g.file.state()
        copy = GuestMemory(g.memory.size)
        with pytest.raises(OSError) as e:
            dev.open(copy, state=state)
        assert e.value.errno == errno.ENOMEM
        copy.close()
        await g.file.close()
        g.memory.close()


# -- the value ---------------------------------------------------------------------------------
@pytest.mark.one_loop
async def test_a_state_compares_pickles_and_encodes(dev: LguestDevice) -> None:
    g = await boot(dev, WORKER)
    await notified(g)
    a, b = g.file.state(), g.file.state()
    assert a == b and a is not b
    assert pickle.loads(pickle.dumps(a)) == a
    assert GuestState.from_bytes(a.to_bytes()) == a
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.pgdir = 0  # type: ignore[misc]  # the assignment a frozen value refuses
    await notified(g)
    assert g.file.state() != a  # it ran on
    await g.file.close()
    g.memory.close()


@pytest.mark.one_loop
async def test_bad_or_foreign_encodings_are_clear_errors(dev: LguestDevice) -> None:
    g = await boot(dev, WORKER)
    await notified(g)
    raw = g.file.state().to_bytes()
    await g.file.close()
    g.memory.close()

    def error(data: bytes) -> str:
        with pytest.raises(StateError) as e:
            GuestState.from_bytes(data)
        return str(e.value)

    assert "not a guest state" in error(b"")
    assert "not a guest state" in error(b"LGSNAP\r\n" + bytes(100))
    assert "truncated" in error(raw[:-1])
    assert "stray" in error(raw + b"\0")
    flipped = bytearray(raw)
    flipped[-3] ^= 1
    assert "checksum" in error(bytes(flipped))

    from supervisor import framing
    from supervisor.state import MAGIC, VERSION

    meta, blobs = framing.unpack(raw, MAGIC, VERSION, kind="guest state")

    def edited(change: Any) -> str:
        m = pickle.loads(pickle.dumps(meta))
        change(m)
        return error(framing.pack(MAGIC, VERSION, m, blobs))

    assert "pfn_limit" in edited(lambda m: m.update(pfn_limit="many"))
    assert "outside memory" in edited(lambda m: m.update(pfn_limit=1 << 16))
    assert "pfn_limit" in edited(lambda m: m.update(pfn_limit=1 << 20))
    assert "IDT" in edited(lambda m: m["cpus"][0].update(idt=[[0, 0]] * 3))
    assert "IDT entry" in edited(lambda m: m["cpus"][0].update(idt=[[0, 1 << 32]] * 256))
    assert "IDT entry" in edited(lambda m: m["cpus"][0].update(idt=[[-1, 0]] * 256))
    assert "stack" in edited(lambda m: m["cpus"][0].update(stack=[0x10, -4, 1]))
    assert "TS flag" in edited(lambda m: m["cpus"][0].update(ts=2))
    assert "ring position" in edited(lambda m: m["cpus"][0].update(next_hcall=99))
    assert "lguest_data" in edited(lambda m: m["cpus"][0].update(lguest_data=1 << 30))
    assert "CPU 0 is always online" in edited(lambda m: m["cpus"][0].update(online=False))
    assert "cpu" in edited(lambda m: m["cpus"][0].pop("halted"))
    assert "Unicorn 0.0" in edited(lambda m: m.update(unicorn="0.0"))
    with pytest.raises(StateError, match="malformed"):
        GuestState.from_parts(meta, {}, "no sections")


def test_every_field_of_the_cpu_and_the_guest_is_saved_or_marked_host_only() -> None:
    assert unmarked_fields(LgCpu) == ()
    assert unmarked_fields(Lguest) == ()
    for part in PARTS.values():
        assert unmarked_fields(part) == (), part.__name__
    # Every field of LgCpu that is a dataclass is one of its parts, under its name.
    types = {f.name: f.type for f in dataclasses.fields(LgCpu)}
    assert {name: types[name] for name in PARTS} == {n: c.__name__ for n, c in PARTS.items()}
    cpu_state = {f.name for f in dataclasses.fields(CpuState)}
    saved = list(saved_fields(LgCpu))
    for part in PARTS.values():
        saved += saved_fields(part)
    assert len(saved) == len(set(saved))  # one name, one field
    assert set(saved) == cpu_state - {"context", "timer_ns"}
    guest_state = {f.name for f in dataclasses.fields(GuestState)}
    # (clock_ns is the device's Simulation's: the guest's virtual clock)
    not_lguests = {"memory_size", "base", "cpus", "unicorn", "clock_ns"}
    assert set(saved_fields(Lguest)) == guest_state - not_lguests


# -- exits as values ---------------------------------------------------------------------------
def test_classify_turns_what_the_hooks_recorded_into_an_exit() -> None:
    from supervisor._slicing import REASON_BUDGET, REASON_NONE, REASON_STOP

    assert classify(abi.LGUEST_TRAP_ENTRY, None, REASON_NONE, None) is SliceExit.HYPERCALL
    assert classify(14, None, REASON_NONE, None) is SliceExit.TRAP
    assert classify(None, Hold.BREAKPOINT, REASON_NONE, None) is SliceExit.DEBUG_STOP
    assert classify(None, None, REASON_STOP, None) is SliceExit.KICK
    assert classify(None, None, REASON_BUDGET, None) is SliceExit.BUDGET
    assert classify(None, None, REASON_NONE, None) is SliceExit.HALT  # Unicorn stops at hlt
    assert classify(None, None, REASON_NONE, uc_const.UC_ERR_INSN_INVALID) is (
        SliceExit.INVALID_OPCODE
    )
    assert classify(None, None, REASON_NONE, uc_const.UC_ERR_READ_UNMAPPED) is SliceExit.BAD_ACCESS
    assert classify(None, None, REASON_NONE, uc_const.UC_ERR_EXCEPTION) is (
        SliceExit.EMULATION_ERROR
    )
    # A trap recorded beats how the fuel says the run ended: the hook stopped it.
    assert classify(abi.LGUEST_TRAP_ENTRY, None, REASON_STOP, None) is SliceExit.HYPERCALL


def fake_cpu(**changes: Any) -> Any:
    values: dict[str, Any] = {
        "closing": False, "hcall": None, "pending_notify": 0, "break_out": False,
        "hold": None, "halted": False, "irqs_pending": 0, "online": True, "lguest_data": None,
        "lg": SimpleNamespace(dead=None),
    }  # fmt: skip
    values.update(changes)
    run = {name: values.pop(name) for name in ("closing", "break_out", "hold")}
    return SimpleNamespace(run=SimpleNamespace(**run), **values)


def test_the_run_loop_decides_in_a_fixed_order() -> None:
    dead = SimpleNamespace(dead=Exit.of("x"))
    assert pending_exit(fake_cpu()) is None
    assert pending_exit(fake_cpu(halted=True)) is RunState.HALT  # no irq it could take
    assert pending_exit(fake_cpu(lg=dead, halted=True)) is RunState.DEATH
    # A CPU not started yet sleeps; a death, a break or close still end its read.
    assert pending_exit(fake_cpu(online=False)) is RunState.OFFLINE
    assert pending_exit(fake_cpu(online=False, lg=dead)) is RunState.DEATH
    assert pending_exit(fake_cpu(online=False, break_out=True)) is RunState.BREAK
    # The ring killed it: the direct call it trapped with is never done.
    assert pending_exit(fake_cpu(lg=dead, hcall=(1, 2, 3, 4))) is RunState.DEATH
    assert pending_exit(fake_cpu(lg=dead, break_out=True)) is RunState.BREAK
    assert pending_exit(fake_cpu(pending_notify=5, break_out=True)) is RunState.NOTIFY
    assert pending_exit(fake_cpu(hcall=(1, 2, 3, 4))) is RunState.HYPERCALL
    # The ring produced a notify: it goes first, the direct call waits for the next read.
    assert pending_exit(fake_cpu(hcall=(1, 2, 3, 4), pending_notify=5)) is RunState.NOTIFY
    # A held CPU does nothing, not even its trapped hypercall; only a break ends its read.
    assert pending_exit(fake_cpu(hold=Hold.PAUSE, hcall=(1, 2, 3, 4))) is RunState.HELD
    assert pending_exit(fake_cpu(hold=Hold.PAUSE, break_out=True)) is RunState.BREAK
    assert pending_exit(fake_cpu(hold=Hold.PAUSE, lg=dead)) is RunState.DEATH  # death ends a hold
    assert pending_exit(fake_cpu(closing=True, hold=Hold.PAUSE, hcall=(1, 2, 3, 4))) is (
        RunState.CLOSED
    )


# -- the house rules ---------------------------------------------------------------------------
def test_importing_supervisor_creates_no_unicorn_instance() -> None:
    probe = (
        "import unicorn\n"
        "made = []\n"
        "real = unicorn.Uc.__init__\n"
        "def counting(self, *a, **k):\n"
        "    made.append(1)\n"
        "    real(self, *a, **k)\n"
        "unicorn.Uc.__init__ = counting\n"
        "import supervisor, supervisor.cli, supervisor.snapshot, supervisor.host\n"
        "print(len(made))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


def _thread_errors(call: Callable[[], object]) -> list[ThreadError]:
    """The ThreadErrors that ``call`` raises in a thread of its own (none, or one)."""
    errors: list[ThreadError] = []

    def from_another_thread() -> None:
        try:
            call()
        except ThreadError as exc:
            errors.append(exc)

    thread = threading.Thread(target=from_another_thread)
    thread.start()
    thread.join()
    return errors


@contextlib.asynccontextmanager
async def _spinner_in_debug_mode() -> AsyncIterator[Any]:
    """A booted spinner on a device of its own, the loop in debug mode meanwhile."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    try:
        async with LguestDevice() as dev:
            yield await boot(dev, SPIN)
    finally:
        loop.set_debug(False)


async def test_in_debug_mode_touching_a_cpu_from_the_wrong_thread_raises() -> None:
    async with _spinner_in_debug_mode() as g:
        cpu = g.file.cpu(0)
        assert cpu.threads.enabled
        cpu.eip  # noqa: B018 - the event loop owns an idle CPU
        errors = _thread_errors(lambda: cpu.eip)
        assert len(errors) == 1 and "event loop owns it" in str(errors[0])

        read = asyncio.ensure_future(g.file.read(abi.WORD_SIZE))
        await until(lambda: cpu.running)
        with pytest.raises(ThreadError):
            cpu.eip  # noqa: B018 - a slice owns a running CPU
        await g.file.close()
        with pytest.raises(OSError):
            await read
        g.memory.close()


@pytest.mark.one_loop
async def test_in_debug_mode_taking_an_engine_from_the_wrong_thread_raises() -> None:
    # An engine is taken (and given back) only by the CPU's owner: a take beside the
    # owner's release would be undone by it, and the CPU left with no engine.
    async with _spinner_in_debug_mode() as g:
        cpu = g.file.cpu(0)
        cpu.hibernate()  # (a new CPU takes its first engine at its first slice)
        assert cpu.engine.frozen is not None and cpu.engine.uc is None
        errors = _thread_errors(cpu.take_engine)
        assert len(errors) == 1 and "event loop owns it" in str(errors[0])
        assert cpu.engine.frozen is not None and cpu.engine.uc is None  # nothing taken
        assert cpu.take_engine() is not None and cpu.engine.uc is not None  # the owner's
        await g.file.close()
        g.memory.close()


async def test_outside_debug_mode_there_is_no_check(dev: LguestDevice) -> None:
    g = await boot(dev, SPIN)
    assert not g.file.cpu(0).threads.enabled
    await g.file.close()
    g.memory.close()
