"""The debugger core: exact breakpoints and steps, registers, memory, pause, kill."""

from __future__ import annotations

import asyncio

import pytest
from guestasm import SPIN, Booted, boot, present, run_to_end, until

from supervisor import LguestDevice, abi
from supervisor.debug import BREAKPOINT, START, STEP, DebugError, Debugger, debugger

# The subject is the debugger's stops, registers and memory, not the event loop:
# one loop (conftest).
pytestmark = pytest.mark.one_loop

COUNTER = r"""
main:
    LGUEST_INIT
    xor %eax, %eax
loop:
    inc %eax
    incl counter
    cmpl $50, counter
    jne loop
    mov %eax, result
    HCALL 2, msg, 1, 7
.data
counter: .long 0
result: .long 0
msg: .asciz "bye"
"""

# Each step below does one kind of exit: a plain instruction, a CPU-local
# hypercall done inside the hook, a hypercall that needs the run loop (notify),
# and a trap reflected to the guest's handler.
EXITS = r"""
main:
    LGUEST_INIT
    IDT 3, handler, 0xf
    mov $1, %ebx
before_local:
    HCALL 6, 200, 0, 0
before_notify:
    HCALL 17, 0x1234
before_trap:
    int3
after_trap:
    HCALL 2, msg, 1, 0
handler:
    incl hits
    iret
.data
hits: .long 0
msg: .asciz "bye"
"""


async def held(dev: LguestDevice, body: str) -> tuple[Booted, Debugger, asyncio.Task[str]]:
    g = await boot(dev, body)
    d = debugger(g.file)
    d.request_stop(START)
    reader = asyncio.create_task(run_to_end(g))
    assert (await d.wait_stop()).reason == START
    return g, d, reader


def eip(d: Debugger) -> int:
    return d.registers()[8]


async def test_breakpoint_stops_before_the_instruction_and_resume_passes_it_once(
    dev: LguestDevice,
) -> None:
    g, d, reader = await held(dev, COUNTER)
    assert eip(d) == abi.PAGE_SIZE * 16  # the image's first instruction (0x10000)
    loop = g.guest.symbols["loop"]
    d.add_breakpoint(loop + 1)  # incl counter
    d.resume()
    assert (await d.wait_stop()).reason == BREAKPOINT
    assert eip(d) == loop + 1
    assert (d.registers()[0], g.u32("counter")) == (1, 0)  # inc eax ran, incl not yet
    for expected in (1, 2, 3):
        d.resume()
        assert (await d.wait_stop()).reason == BREAKPOINT
        assert g.u32("counter") == expected
        assert d.registers()[0] == expected + 1
    d.remove_breakpoint(loop + 1)
    d.resume()
    assert await reader == "bye"
    assert g.u32("result") == 50


async def test_a_breakpoint_on_a_deterministic_cpu_stops_before_the_instruction() -> None:
    """A deterministic CPU's code looks for a stop only at block starts, where its block
    hook's stops land; a code hook turns the checks after each instruction back on, so
    the breakpoint stops before ``incl counter``, not at the next block."""
    async with LguestDevice(deterministic=True, seed=1) as dev:
        g, d, reader = await held(dev, COUNTER)
        loop = g.guest.symbols["loop"]
        d.add_breakpoint(loop + 1)  # incl counter
        for expected in (0, 1, 2):
            d.resume()
            assert (await d.wait_stop()).reason == BREAKPOINT
            assert eip(d) == loop + 1
            assert (d.registers()[0], g.u32("counter")) == (expected + 1, expected)
        d.remove_breakpoint(loop + 1)
        d.resume()
        assert await reader == "bye"
        assert g.u32("result") == 50


async def test_stepi_runs_exactly_one_instruction_whatever_the_exit(dev: LguestDevice) -> None:
    g, d, reader = await held(dev, EXITS)
    s = g.guest.symbols
    d.add_breakpoint(s["before_local"])
    d.resume()
    await d.wait_stop()
    d.remove_breakpoint(s["before_local"])
    # HCALL is 5 movs/int: step through the local hypercall's instructions.
    trail = []
    while eip(d) != s["before_trap"]:
        assert (await d.stepi()).reason == STEP
        trail.append(eip(d))
    assert trail.count(s["before_notify"]) == 1
    assert len(trail) == 10  # two HCALLs of five instructions each, one stop per instruction
    assert g.file.cpu(0).idt[200] == (0, 0)  # vector 200 was cleared, harmlessly
    assert (await d.stepi()).reason == STEP  # int3: the trap goes to the guest's handler
    assert eip(d) == s["handler"]
    assert g.u32("hits") == 0
    await d.stepi()
    assert g.u32("hits") == 1
    await d.stepi()  # iret
    assert eip(d) == s["after_trap"]
    d.resume()
    assert await reader == "bye"


async def test_an_interrupt_before_the_resumed_instruction_does_not_skip_its_breakpoint(
    dev: LguestDevice,
) -> None:
    g, d, reader = await held(
        dev,
        r"""
main:
    LGUEST_INIT
    IDT 33, handler
    movl $512, lguest_data
loop:
    incl counter
    jmp loop
handler:
    incl hits
    jmp irq_return
.data
counter: .long 0
hits: .long 0
""",
    )
    loop = g.guest.symbols["loop"]
    d.add_breakpoint(loop)
    d.resume()
    await d.wait_stop()
    assert (eip(d), g.u32("counter")) == (loop, 0)
    await g.file.write(abi.pack_words(abi.LHREQ_IRQ, 1))
    d.resume()  # the irq is delivered first; its handler returns to `loop`: stop there again
    assert (await d.wait_stop()).reason == BREAKPOINT
    assert (eip(d), g.u32("counter"), g.u32("hits")) == (loop, 0, 1)
    d.resume()  # now incl runs once and the loop comes back
    await d.wait_stop()
    assert (eip(d), g.u32("counter"), g.u32("hits")) == (loop, 1, 1)
    d.kill("enough")
    assert await reader == "enough"


async def test_pause_registers_and_memory_while_other_guests_run(dev: LguestDevice) -> None:
    g, d, reader = await held(dev, SPIN)
    other = await boot(dev, SPIN)
    other_reader = asyncio.create_task(run_to_end(other))
    await until(lambda: other.u32("counter") > 1000)  # g stays held meanwhile
    assert g.u32("counter") == 0
    d.resume()
    await until(lambda: g.u32("counter") > 1000)
    stop = await d.stop()
    assert stop.reason == "pause" and d.stopped
    frozen = g.u32("counter")
    mark = other.u32("counter")
    await until(lambda: other.u32("counter") > mark + 1000)
    assert g.u32("counter") == frozen
    counter = g.guest.symbols["counter"]
    assert d.read_memory(counter, 4) == frozen.to_bytes(4, "little")
    d.write_memory(counter, (7).to_bytes(4, "little"))
    assert g.u32("counter") == 7
    with pytest.raises(DebugError):
        d.read_memory(0xFFFFF000, 4)  # not mapped by the guest's page tables
    d.set_register("eax", 0xDEADBEEF)
    assert d.registers()[0] == 0xDEADBEEF
    with pytest.raises(DebugError):
        d.set_register("xmm0", 1)
    d.resume()
    with pytest.raises(DebugError):
        d.registers()  # running: refused
    await until(lambda: g.u32("counter") > 7)
    d.kill("stop spinning")
    debugger(other.file).kill("stop spinning")
    assert await reader == "stop spinning"
    assert await other_reader == "stop spinning"


async def test_death_is_reported_to_a_waiting_debugger(dev: LguestDevice) -> None:
    _g, d, reader = await held(dev, COUNTER)
    d.resume()
    stop = await d.wait_stop()
    assert stop.dead and present(stop.death).exit_status == 7
    assert await reader == "bye"
