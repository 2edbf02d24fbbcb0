"""The slice meter on its own: exact stops, kicks that are never lost, the fallback.

These run on whichever path this process uses (``supervisor._slicing.PATH``;
``LGUEST_SLICING=count`` selects the fallback, and .ci/run runs the suite both ways).
"""

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from guestasm import boot, present, until
from unicorn import UC_ARCH_X86, UC_HOOK_BLOCK, UC_MODE_32, UC_PROT_ALL, Uc
from unicorn import x86_const as r

from supervisor import LguestDevice, _slicing
from supervisor.abi import LHREQ_IRQ, pack_words

# loop: inc dword [0x2000]; inc ebx; jmp loop.  The memory counter equals ebx, or
# ebx + 1 when stopped between the two; a replayed write makes it larger.
REPLAY_LOOP = bytes.fromhex("ff050020000043ebf7")
LOOP_AT = 0x1000
HLT_AT = 0x3000
NEVER = 1 << 32


def bare_cpu() -> tuple[Uc, _slicing.Fuel]:
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    uc.ctl_set_tcg_buffer_size(1 << 20)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    uc.mem_map(0, 0x10000, UC_PROT_ALL)
    uc.mem_write(LOOP_AT, REPLAY_LOOP)
    uc.reg_write(r.UC_X86_REG_EIP, LOOP_AT)
    return uc, _slicing.attach(uc)


def run_once(uc: Uc, fuel: _slicing.Fuel, seconds: float) -> None:
    fuel.stop = 0
    fuel.reason = _slicing.REASON_NONE
    fuel.budget = 20_000
    fuel.left = int(seconds * 1e9)
    fuel.mark = 0
    count = _slicing.run(uc, fuel, NEVER)[0]
    if count and fuel.reason == _slicing.REASON_NONE:
        _slicing.count_spent(fuel, count)


def test_stops_from_another_thread_and_deadlines_never_replay_a_write() -> None:
    uc, fuel = bare_cpu()
    done = threading.Event()

    def kicker() -> None:
        while not done.wait(0.0002):
            _slicing.kick(fuel)

    thread = threading.Thread(target=kicker)
    thread.start()
    stops = 0
    try:
        for _ in range(2_000):
            run_once(uc, fuel, 0.0003)
            stops += fuel.reason != _slicing.REASON_NONE
            memory = int.from_bytes(uc.mem_read(0x2000, 4), "little")
            ebx = uc.reg_read(r.UC_X86_REG_EBX)
            eip = uc.reg_read(r.UC_X86_REG_EIP)
            assert eip in (LOOP_AT, LOOP_AT + 6, LOOP_AT + 7), hex(eip)
            assert memory == ebx + (eip == LOOP_AT + 6), (memory, ebx, hex(eip))
    finally:
        done.set()
        thread.join()
    assert stops == 2_000
    assert uc.reg_read(r.UC_X86_REG_EBX) > 0


def test_a_kick_before_the_run_starts_still_ends_it() -> None:
    if not _slicing.NATIVE:
        pytest.skip("the fallback sees a kick only between runs (run_slice checks `stop` first)")
    uc, fuel = bare_cpu()
    for _ in range(200):
        fuel.reason = _slicing.REASON_NONE
        fuel.budget = 1 << 40
        fuel.left = 60 * 10**9
        fuel.mark = 0
        fuel.stop = 0
        _slicing.kick(fuel)
        finished = threading.Event()

        def one_run(finished: threading.Event = finished) -> None:
            _slicing.run(uc, fuel, NEVER)
            finished.set()

        thread = threading.Thread(target=one_run)
        thread.start()
        assert finished.wait(10), "a kick sent before emu_start began was lost"
        thread.join()
        assert fuel.reason == _slicing.REASON_STOP


def test_a_long_run_does_not_make_the_slicer_tick() -> None:
    """The slicer ticks (wakes every TICK_NS) only while short runs keep starting: a busy
    executor slice's run wakes it for its deadline, not for ticks that would each take a
    core from a busy slice."""
    uc, fuel = bare_cpu()
    if not (_slicing.NATIVE and fuel.exit_request):
        pytest.skip("the exit-request path only")
    time.sleep(0.05)  # (a tick an earlier short run asked for is over)
    before = _slicing.slicer_stats()
    assert before is not None
    run_once(uc, fuel, 0.05)
    after = _slicing.slicer_stats()
    assert after is not None
    assert fuel.reason == _slicing.REASON_BUDGET  # the slicer ended it at its deadline
    assert after.wakes > before.wakes
    assert after.ticks == before.ticks


def test_a_deadline_moves_in_a_few_steps_for_a_thread_that_got_part_of_its_time() -> None:
    """A run whose thread did not get its whole share of CPU time by the deadline gets
    it: the slicer moves the deadline by what the missing time takes at the share the
    thread got, so a few times per run, not once for every halving of what is missing
    (about twenty times for a 0.1 s run at a quarter of a core).  The thread here blocks
    for 0.5 ms every 2,000 blocks, in a hook, so it gets a steady part of its time
    however loaded the machine is."""
    uc, fuel = bare_cpu()
    if not (_slicing.NATIVE and fuel.exit_request):
        pytest.skip("the exit-request path only")
    blocks = 0

    def nap(_uc: Uc, _address: int, _size: int, _data: object) -> None:
        nonlocal blocks
        blocks += 1
        if blocks % 2_000 == 0:
            time.sleep(0.0005)

    uc.hook_add(UC_HOOK_BLOCK, nap)
    runs = 3
    before = _slicing.slicer_stats()
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for _ in range(runs):
        run_once(uc, fuel, 0.1)
        assert fuel.reason == _slicing.REASON_BUDGET
    share = (time.thread_time() - cpu0) / (time.perf_counter() - wall0)
    after = _slicing.slicer_stats()
    assert before is not None and after is not None
    if not 0.2 <= share <= 0.5:
        pytest.skip(f"the runs got {share:.0%} of the time: not what this test measures")
    moved = after.moved - before.moved
    assert runs <= moved <= 8 * runs, (moved, share)


def test_a_deadlines_stop_to_a_thread_that_is_not_running_is_resent_ever_less_often() -> None:
    """The slicer sends a run's stop again while the run has not returned, in case it
    came before ``emu_start`` reset the stop state.  A deadline's stop comes after the
    thread used its time (or, at ``latest``, 50 spans): when the run does not return it
    is because its thread does not run, so the stop is resent at doubling intervals,
    not every 50 us (a thousand times here).  Here the thread blocks for 0.1 s in its
    first block, its deadline moves until ``latest`` (50 ms) and the stop is sent then."""
    uc, fuel = bare_cpu()
    if not (_slicing.NATIVE and fuel.exit_request):
        pytest.skip("the exit-request path only")
    naps = 0

    def nap(_uc: Uc, _address: int, _size: int, _data: object) -> None:
        nonlocal naps
        naps += 1
        if naps == 1:
            time.sleep(0.1)

    uc.hook_add(UC_HOOK_BLOCK, nap)
    before = _slicing.slicer_stats()
    run_once(uc, fuel, 0.001)
    after = _slicing.slicer_stats()
    assert before is not None and after is not None
    assert fuel.reason == _slicing.REASON_BUDGET
    if naps == 0:
        pytest.skip("the thread did not reach its first block in 50 ms")
    assert 1 <= after.resent - before.resent <= 20, after.resent - before.resent


@pytest.mark.parametrize("stop", ["irq", "kick"])
def test_a_stop_that_landed_is_resent_ever_less_often(stop: str) -> None:
    """An irq's or a kick's stop sent to a run whose thread is well past ``emu_start``'s
    reset of the stop state lands: the run is slow to return only because its thread
    does not run, so the stop is resent after 0.8 ms, then at doubling intervals, not
    every 50 us (a thousand times here).  Here the thread blocks in a hook after a few
    milliseconds of its run, the stop is sent, and the thread blocks 50 ms more (more
    on a loaded machine: the bound is the schedule's for the time the run took)."""
    uc, fuel = bare_cpu()
    if not (_slicing.NATIVE and fuel.exit_request):
        pytest.skip("the exit-request path only")
    blocks = 0
    blocked = threading.Event()
    sent = threading.Event()
    sent_at = 0.0

    def nap(_uc: Uc, _address: int, _size: int, _data: object) -> None:
        nonlocal blocks
        blocks += 1
        if blocks == 5_000:
            blocked.set()
            assert sent.wait(10)
            time.sleep(0.05)

    def stopper() -> None:
        nonlocal sent_at
        assert blocked.wait(10)
        sent_at = time.monotonic()
        if stop == "irq":
            assert _slicing.raise_irq(fuel, 0, False)
        else:
            _slicing.kick(fuel)
        sent.set()

    uc.hook_add(UC_HOOK_BLOCK, nap)
    thread = threading.Thread(target=stopper)
    thread.start()
    before = _slicing.slicer_stats()
    try:
        run_once(uc, fuel, 10.0)
        took = time.monotonic() - sent_at
    finally:
        thread.join()
    after = _slicing.slicer_stats()
    assert before is not None and after is not None
    assert fuel.reason == (_slicing.REASON_IRQ if stop == "irq" else _slicing.REASON_STOP)
    assert blocks == 5_000  # stopped at the block boundary after the nap
    # Resent after 0.8, 2.4, 5.6 and 12 ms, then every 6.4 ms (one more if the first
    # sending was not yet known to have landed); every 50 us would be 20 times as many.
    resent = after.resent - before.resent
    assert 1 <= resent <= 6 + took / 0.0064, (resent, took)


def test_short_runs_still_make_the_slicer_tick() -> None:
    """Runs that end by themselves long before their deadline (a notify round trip's)
    keep the slicer ticking, so that most of them need not wake it."""
    uc, fuel = bare_cpu()
    if not (_slicing.NATIVE and fuel.exit_request):
        pytest.skip("the exit-request path only")
    uc.mem_write(HLT_AT, bytes([_slicing.HLT]))
    before = _slicing.slicer_stats()
    assert before is not None
    for _ in range(2_000):
        uc.reg_write(r.UC_X86_REG_EIP, HLT_AT)
        run_once(uc, fuel, 0.0001)
        now = _slicing.slicer_stats()
        assert now is not None
        if now.ticks > before.ticks:
            break
    else:
        raise AssertionError("2,000 short runs never made the slicer tick")


async def test_hlt_halts_until_an_irq_on_every_path(dev: LguestDevice) -> None:
    g = await boot(
        dev,
        r"""
main:
    LGUEST_INIT
    IDT 35, handler
    movl $512, lguest_data
1:  hlt
    incl wakes
    jmp 1b
handler:
    incl irqs
    iret
.data
wakes: .long 0
irqs: .long 0
""",
    )
    reader = asyncio.create_task(g.file.read(8))
    cpu = g.file.cpu(0)
    for n in (1, 2, 3):
        await until(lambda: cpu.halted)
        slices = present(g.file.stats).slices
        for _ in range(20):
            await asyncio.sleep(0)
        assert present(g.file.stats).slices == slices, "a halted guest kept running"
        assert g.u32("wakes") == n - 1
        assert await g.file.write(pack_words(LHREQ_IRQ, 3)) == 0
        await until(lambda: g.u32("wakes") == n)  # noqa: B023 - awaited at once
    assert g.u32("irqs") == 3
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
        check=True,
    )


BLOCK_FUEL = """
import importlib.abc, sys, warnings
class NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "supervisor._fuel":
            raise ImportError("no C compiler at install time")
sys.meta_path.insert(0, NoExtension())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from supervisor import _slicing
print(_slicing.PATH)
for w in caught:
    print("WARNING", w.message)
"""


def test_without_the_extension_the_fallback_runs_and_says_so_once() -> None:
    out = _python(BLOCK_FUEL, LGUEST_SLICING="").stdout.splitlines()
    assert out[0] == "emu_start(count=) fallback"
    warnings = [line for line in out if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert "C compiler" in warnings[0] and "apt-get install gcc" in warnings[0]


def test_the_environment_selects_the_fallback_quietly() -> None:
    code = BLOCK_FUEL.replace("sys.meta_path.insert(0, NoExtension())", "")
    out = _python(code, LGUEST_SLICING="count").stdout.splitlines()
    assert out == ["emu_start(count=) fallback"]
    out = _python(code, LGUEST_SLICING="hook").stdout.splitlines()
    assert out == ["native block hook"]


def test_the_ctypes_mirror_matches_every_fuel_t_field() -> None:
    """_slicing.Fuel mirrors _fuel.c's fuel_t by hand: every field's offset and size must
    equal the C compiler's (a reordered, resized, added or dropped field is named)."""
    fuel = pytest.importorskip("supervisor._fuel")
    assert list(fuel.fuel_layout) == [name for name, *_ in _slicing.Fuel._fields_]
    assert _slicing.layout_differences(fuel.fuel_layout, fuel.fuel_size) == []
    swapped = dict(fuel.fuel_layout)
    swapped["stop"], swapped["reason"] = swapped["reason"], swapped["stop"]
    del swapped["pad2"]
    swapped["extra"] = (fuel.fuel_size, 4)
    assert _slicing.layout_differences(swapped, fuel.fuel_size + 4) == [
        "stop: (offset, size) (4, 4) in fuel_t, (0, 4) in _slicing.Fuel",
        "reason: (offset, size) (0, 4) in fuel_t, (4, 4) in _slicing.Fuel",
        "pad2: not in fuel_t",
        "extra: not in _slicing.Fuel",
        f"size: {fuel.fuel_size + 4} in fuel_t, {fuel.fuel_size} in _slicing.Fuel",
    ]


def test_a_differing_fuel_t_layout_stops_the_import() -> None:
    pytest.importorskip("supervisor._fuel")
    code = (
        "import importlib\n"
        "from supervisor import _fuel, _slicing\n"
        "_fuel.fuel_layout['budget'] = (4, 8)\n"
        "try:\n"
        "    importlib.reload(_slicing)\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = _python(code).stdout
    assert "different fuel_t layout" in out
    assert "budget: (offset, size) (4, 8) in fuel_t, (8, 8) in _slicing.Fuel" in out


def test_the_tsc_is_read_on_first_use_not_at_import() -> None:
    """Importing the clock maps no executable memory and reads no counter; the rate comes
    from the native counter read or, without it, from a Unicorn instance's rdtsc."""
    code = (
        "import re\n"
        "def rwx():\n"
        "    maps = open('/proc/self/maps').read()\n"
        "    return len(re.findall(r'^\\S+ rwx', maps, re.M))\n"
        "before = rwx()\n"
        "from supervisor import timers\n"
        "print(rwx() - before, timers.tsc_khz.cache_info().currsize)\n"
        "timers._slicing.rdtsc = None\n"
        "print(timers.tsc_khz() > 0)\n"
    )
    assert _python(code).stdout.split() == ["0", "0", "True"]
    if _slicing.rdtsc is not None:
        a = _slicing.rdtsc()
        b = _slicing.rdtsc()
        assert 0 < a < b


def test_a_handler_delivered_mid_slice_keeps_time_to_run() -> None:
    # An interrupt delivered after a run stopped for it: the slice's account is brought
    # up to now, and its handler gets at least LONG_INLINE_TIME of what is left.
    import time

    from supervisor import execute

    fuel = _slicing.Fuel()
    fuel.left = 2_000_000
    fuel.mark = time.thread_time_ns() - 5_000_000  # the run began 5 ms of CPU ago: spent
    assert execute.keep_time_for_handler(fuel)  # the handler's time is the slice's end
    assert fuel.left == execute._LONG_INLINE_NS
    assert 0 <= time.thread_time_ns() - fuel.mark < 5_000_000
    fuel.left = 2_000_000
    fuel.mark = time.thread_time_ns() - 100_000  # 0.1 ms ago: 1.9 ms left, kept
    assert not execute.keep_time_for_handler(fuel)  # the slice's own time ends it
    assert 1_000_000 < fuel.left <= 1_900_000


@pytest.mark.skipif(not _slicing.EXIT_REQUEST, reason="the exit-request path's lone slices")
def test_cutting_a_lone_slice_takes_its_extra_time_off_once() -> None:
    import ctypes

    fuel = _slicing.Fuel()
    fuel.address = ctypes.addressof(fuel)
    fuel.exit_request = 1
    fuel.left, fuel.lone, fuel.deadline = 20_000_000, 18_000_000, 123
    assert _slicing.cut(fuel)
    assert (fuel.left, fuel.lone) == (2_000_000, 0)
    assert fuel.deadline == 123  # (no run in progress: its next run takes `left`)
    assert not _slicing.cut(fuel)  # once: nothing left to cut
    assert fuel.left == 2_000_000
    fuel.lone, fuel.exit_request = 5, 0  # the block hook's CPUs run no lone slices
    assert not _slicing.cut(fuel) and fuel.left == 2_000_000


def _c_functions(source: str) -> dict[str, str]:
    """The body of each top-level function of a C source, by name (a function starts at a
    line ``name(`` in column 0, after its return type, and ends at a ``}`` in column 0)."""
    bodies: dict[str, str] = {}
    for match in re.finditer(
        r"^[A-Za-z_][\w \*]*?\b(\w+)\(([^;{]*?)\)\n\{\n(.*?)^\}", source, re.S | re.M
    ):
        bodies[match.group(1)] = match.group(3)
    return bodies


def test_the_slicer_is_woken_only_after_its_lock_is_let_go() -> None:
    """The slicer thread runs at a real-time priority where it may: woken while the
    waker still holds the slicer's lock, it preempts the waker only to wait for that
    lock, and a niced worker preempted so on a loaded machine keeps the lock for
    milliseconds, while the event loop's next kick or irq waits for it holding the GIL
    (``SlicerStats.lock_waits``).  So every wake-up of the slicer comes after the unlock:
    ``pthread_cond_signal`` appears once in ``_fuel.c``, in ``unlock_and_wake``, after
    ``pthread_mutex_unlock``, and every function that takes the lock and signals does so
    through it."""
    source = (Path(_slicing.__file__).parent / "_fuel.c").read_text()
    bodies = _c_functions(source)
    assert source.count("pthread_cond_signal(") == 1
    waker = bodies["unlock_and_wake"]
    assert waker.index("pthread_mutex_unlock(&lock)") < waker.index("pthread_cond_signal(")
    signalling = {name for name, body in bodies.items() if "unlock_and_wake(" in body}
    assert {"do_enter", "kick", "interrupt", "hurry", "cut"} <= signalling
    # (The check itself: a body that signals before it unlocks is found.)
    wrong = (
        "static void f(void)\n{\n"
        "    pthread_cond_signal(&wake);\n    pthread_mutex_unlock(&lock);\n}\n"
    )
    body = _c_functions(wrong)["f"]
    assert body.index("pthread_cond_signal(") < body.index("pthread_mutex_unlock(&lock)")
