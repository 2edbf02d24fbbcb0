"""Snapshots: taken mid-run, restored (and forked) exactly; the file format's errors."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
from pathlib import Path

import pytest
from guestasm import Booted, boot, until

from supervisor import Guest, GuestConfig, LguestDevice, LguestFile, Supervisor, abi
from supervisor.debug import debugger
from supervisor.snapshot import Snapshot, SnapshotError, capture, restore, snapshot

# The subject is the snapshot's bytes and the guest's exact run, not the event loop:
# one loop (conftest).
pytestmark = pytest.mark.one_loop

GUESTS = Path(__file__).resolve().parent.parent / "guests"
LIMIT = 60  # seconds: a bound for failing (a hang on a loaded machine), never a wait

# Scribbles a pseudo-random walk over a table, notifies 0x5000 every 2^18 steps,
# and stops with the walk's last value as the reason's status.
WALK = r"""
main:
    LGUEST_INIT
    movl $0x12345, %esi
1:  imul $1103515245, %esi, %esi
    add $12345, %esi
    mov %esi, %edx
    and $0x3ff, %edx
    add %esi, table(,%edx,4)
    incl counter
    testl $0x3ffff, counter
    jnz 1b
    HCALL 17, 0x5000
    cmpl $0x200000, counter
    jb 1b
    mov %esi, %ecx
    mov $2, %eax
    mov $msg, %edx
    mov $1, %ebx
    int $0x1f
.data
counter: .long 0
msg: .asciz "walked"
.align 4096
table: .space 4096
"""


async def run_file(f: LguestFile) -> tuple[int, str]:
    """Read until death; return (notifies seen, reason)."""
    notifies = 0
    while True:
        try:
            await f.read(abi.WORD_SIZE)
            notifies += 1
        except FileNotFoundError:
            return notifies, (await f.read(64)).rstrip(b"\0").decode()


def without_clock(g: Booted, memory: bytes) -> bytes:
    """Guest memory with lguest_data.time (wall-clock, written by the Host) blanked."""
    at = g.guest.symbols["lguest_data"] + abi.LGUEST_DATA_TIME
    return memory[:at] + bytes(8) + memory[at + 8 :]


async def test_a_guest_snapshotted_mid_run_and_restored_ends_exactly_like_an_unstopped_one(
    dev: LguestDevice, tmp_path: Path
) -> None:
    reference = await boot(dev, WALK)
    assert await run_file(reference.file) == (8, "walked")
    expected = without_clock(reference, reference.memory.read(0, reference.memory.size))

    g = await boot(dev, WALK)
    assert abi.unpack_words(await g.file.read(abi.WORD_SIZE)) == (0x5000,)
    runner = asyncio.create_task(run_file(g.file))
    await until(lambda: g.u32("counter") > 0x50000)
    snap = await snapshot(g.file)  # stops it, captures, lets it run on
    assert 0 < snap.page_count() < g.memory.size // abi.PAGE_SIZE  # only non-zero pages
    snap.save(tmp_path / "walk.snap")
    loaded = Snapshot.load(tmp_path / "walk.snap")
    done, reason = await runner
    assert reason == "walked"
    assert without_clock(g, g.memory.read(0, g.memory.size)) == expected

    copy = await restore(loaded, dev)
    restored_done, reason = await run_file(copy)
    assert reason == "walked"
    assert copy.death == g.file.death  # same status: the walk's last value
    assert 1 + done == 8 and restored_done == done  # the same notifies after the snapshot
    assert without_clock(g, copy.memory.read(0, copy.memory.size)) == expected


async def test_ten_forks_of_one_snapshot_share_nothing(dev: LguestDevice) -> None:
    g = await boot(dev, WALK)
    for _ in range(6):  # between reads the guest is not running: capture needs no pause
        await g.file.read(abi.WORD_SIZE)
    snap = capture(g.file)
    runner = asyncio.create_task(run_file(g.file))
    at = snap_counter = g.guest.symbols["counter"]
    forks = [await restore(snap, dev) for _ in range(10)]
    # Each fork has its own memory: poking one changes no other.
    forks[0].memory.write(at, (0).to_bytes(4, "little"))
    assert all(f.memory.read(snap_counter, 4) != bytes(4) for f in forks[1:])
    forks[0].memory.write(at, snap_at(snap, at))
    results = await asyncio.gather(*(run_file(f) for f in forks))
    await runner
    assert {reason for _, reason in results} == {"walked"}
    assert {f.death for f in forks} == {g.file.death}
    for f in forks:
        assert f.memory.read(0x10000, 0x2000) == g.memory.read(0x10000, 0x2000)
        await f.close()
        f.memory.close()


def snap_at(snap: Snapshot, address: int) -> bytes:
    """4 bytes of the snapshot's memory at ``address``."""
    page = address // abi.PAGE_SIZE
    offset = 0
    for first, count in snap.runs:
        if first <= page < first + count:
            at = offset + address - first * abi.PAGE_SIZE
            return snap.data[at : at + 4]
        offset += count * abi.PAGE_SIZE
    return bytes(4)


async def test_host_state_pending_irqs_break_halted_and_clock_survive(dev: LguestDevice) -> None:
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    IDT 33, handler
    HCALL 9, 50000000
    HCALL 10
    HCALL 17, 0x77
    HCALL 2, msg, 1, 0
handler:
    incl hits
    jmp irq_return
.data
hits: .long 0
msg: .asciz "bye"
""",
    )
    reader = asyncio.create_task(g.file.read(abi.WORD_SIZE))
    await until(lambda: g.file.cpu(0).halted)
    d = debugger(g.file)
    await d.stop()
    await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 5))  # blocked: stays pending
    cpu = g.file.cpu(0)
    cpu.run.break_out = True  # as if a Waker had broken it out
    snap = capture(g.file)
    st = snap.state.cpus[0]
    assert st.halted and st.break_out
    assert st.irqs_pending == 1 << 5
    assert st.timer_ns is not None and 0 < st.timer_ns <= 50_000_000
    assert st.idt[33] != (0, 0)
    cpu.run.break_out = False
    d.kill("done with it")
    with pytest.raises(FileNotFoundError):
        await reader

    copy = await restore(snap, dev)
    c = copy.cpu(0)
    assert (c.halted, c.run.break_out, c.irqs_pending) == (True, True, 1 << 5)
    assert c.clock.event is not None and not c.run.break_released.is_set()
    with pytest.raises(BlockingIOError):  # the break is still on: the Launcher must see it
        await copy.read(abi.WORD_SIZE)
    await copy.write(abi.pack_words(abi.LHREQ_BREAK, 0))
    # The restored clock event fires irq 0, which has no handler; irq 1 (vector 33) wakes it.
    await copy.write(abi.pack_words(abi.LHREQ_IRQ, 1))
    assert await copy.read(abi.WORD_SIZE) == abi.pack_words(0x77)
    await copy.close()
    copy.memory.close()


async def test_a_running_or_dead_guest_cannot_be_captured(dev: LguestDevice) -> None:
    g = await boot(dev, WALK)
    runner = asyncio.create_task(run_file(g.file))
    await until(lambda: g.u32("counter") > 0)
    with pytest.raises(SnapshotError, match="running"):
        capture(g.file)
    await runner
    with pytest.raises(SnapshotError, match="dead"):
        capture(g.file)


async def test_corrupt_truncated_and_foreign_files_are_clear_errors(
    dev: LguestDevice, tmp_path: Path
) -> None:
    g = await boot(dev, WALK)
    await g.file.read(abi.WORD_SIZE)
    snap = capture(g.file)
    path = tmp_path / "s.snap"
    snap.save(path)
    raw = path.read_bytes()
    again = Snapshot.load(path)
    assert (again.runs, again.data, again.state) == (snap.runs, snap.data, snap.state)

    def load(data: bytes) -> str:
        path.write_bytes(data)
        with pytest.raises(SnapshotError) as e:
            Snapshot.load(path)
        return str(e.value)

    assert "truncated" in load(raw[:-10])
    assert "truncated" in load(raw[:20])
    assert "not a snapshot" in load(b"hello world, this is not a snapshot at all......")
    assert "not a snapshot" in load(b"")
    flipped = bytearray(raw)
    flipped[-100] ^= 0xFF
    assert "checksum" in load(bytes(flipped))
    newer = bytearray(raw)
    newer[8] = 99
    assert "version 99" in load(bytes(newer))
    assert "stray" in load(raw + b"x")
    with pytest.raises(SnapshotError, match="cannot read"):
        Snapshot.load(tmp_path / "missing.snap")


# -- through the Supervisor: console output and devices ------------------------------------

LINES = r"""
        .include "lguest.inc"
        LGUEST_BOOT
main:
        call    lg_init
        call    lg_console_setup
        movl    $1, %ebp
line:
        movl    $100000, %edi
1:      movl    state, %eax
        imull   $1103515245, %eax, %eax
        addl    $12345, %eax
        movl    %eax, state
        movl    %eax, %edx
        andl    $0x3ff, %edx
        addl    %eax, table(,%edx,4)
        decl    %edi
        jnz     1b
        movl    state, %eax
        call    print_line
        incl    %ebp
        cmpl    $12, %ebp
        jbe     line
        xorl    %eax, %eax              # the table's sum: the memory, in one line
        xorl    %ecx, %ecx
2:      addl    table(,%ecx,4), %eax
        roll    $1, %eax
        incl    %ecx
        cmpl    $1024, %ecx
        jb      2b
        call    print_line
        xorl    %eax, %eax
        jmp     lg_poweroff

print_line:                             # "<eax>\n" in one write: a pause never splits it
        pushl   %ebx
        pushl   %esi
        subl    $16, %esp
        leal    15(%esp), %esi
        movb    $10, (%esi)
        movl    $10, %ebx
1:      xorl    %edx, %edx
        divl    %ebx
        addb    $'0', %dl
        decl    %esi
        movb    %dl, (%esi)
        testl   %eax, %eax
        jnz     1b
        leal    16(%esp), %ecx
        subl    %esi, %ecx
        call    lg_write
        addl    $16, %esp
        popl    %esi
        popl    %ebx
        ret

        .data
state:  .long   0x12345
        .align  4
table:  .space  4096
        LGUEST_LIB
"""


@pytest.fixture(scope="module")
def lines_image() -> Path:
    out = Path(tempfile.mkdtemp(prefix="lguest-snapshot-test-"))
    (out / "lines.S").write_text(LINES)
    flags = ["-m", "elf_i386", "-static", "-nostdlib", "--build-id=none"]
    for cmd in (
        ["as", "--32", "-I", str(GUESTS), "-o", "lines.o", "lines.S"],
        ["ld", *flags, "-T", str(GUESTS / "guest.ld"), "-o", "lines.elf", "lines.o"],
        ["objcopy", "-O", "binary", "lines.elf", "lines.img"],
    ):
        subprocess.run(cmd, cwd=out, check=True, capture_output=True)
    return out / "lines.img"


async def collect(guest: Guest) -> list[str]:
    return [line async for line in guest.console]


async def test_supervisor_restore_continues_the_console_exactly(
    lines_image: Path, tmp_path: Path
) -> None:
    config = GuestConfig(image=lines_image, memory="1M")
    async with Supervisor() as sup, asyncio.timeout(LIMIT):
        whole = await collect(await sup.launch(config))
        assert len(whole) == 13

        g = await sup.launch(config)
        seen = []
        async for line in g.console:
            seen.append(line)
            if len(seen) == 4:
                break
        await g.pause()
        snap = await g.snapshot()  # paused: stays paused
        await g.kill("snapshot taken")
        seen += await collect(g)
        snap.save(tmp_path / "lines.snap")
        loaded = Snapshot.load(tmp_path / "lines.snap")
        forks = [await sup.restore(loaded, name=f"fork{i}") for i in range(3)]
        outputs = await asyncio.gather(*(collect(f) for f in forks))
        for output, fork in zip(outputs, forks, strict=True):
            assert seen + output == whole
            assert (await fork.wait()).ok


async def test_a_snapshot_keeps_console_input_not_yet_delivered(tmp_path: Path) -> None:
    config = GuestConfig(image=GUESTS / "echo.img", memory="1M")
    async with Supervisor() as sup, asyncio.timeout(LIMIT):
        g = await sup.launch(config)
        g.send("one\n")
        async for line in g.console:
            assert line == "one"
            break
        await g.pause()
        g.send("two\nquit\n")  # queued while paused: delivered only after the snapshot
        snap = await g.snapshot()
        await g.kill("snapshot taken")
        copy = await sup.restore(snap)
        assert await collect(copy) == ["two", "quit", "bye"]
        assert (await copy.wait()).ok


@pytest.mark.usefixtures("whole_inline_slices")
async def test_a_restore_starts_its_console_with_the_half_written_line() -> None:
    """``console_partial`` is in the new console before the guest runs: the guest writes
    in the turn of the loop the restore gives it (with whole inline slices its first
    read echoes the input it holds without letting another task run), and the line it
    goes on writing comes out whole."""
    config = GuestConfig(image=GUESTS / "echo.img", memory="1M")
    async with Supervisor() as sup, asyncio.timeout(LIMIT):
        g = await sup.launch(config)
        await g.pause()
        g.send("ne\nquit\n")
        snap = await g.snapshot()
        await g.kill("snapshot taken")
        copy = await sup.restore(snap, console_partial=b"half a li")
        assert copy.console.held > 0  # it has written already
        assert await collect(copy) == ["half a line", "quit", "bye"]
        assert (await copy.wait()).ok
