"""The GDB remote-serial-protocol server: a real gdb in batch mode, and a raw socket client."""

from __future__ import annotations

import asyncio
import shutil
import struct

import pytest
from guestasm import SPIN, Booted, boot, present, run_to_end, until

from supervisor import LguestDevice
from supervisor.debug import START, debugger
from supervisor.gdbstub import GdbServer, checksum

GDB = shutil.which("gdb")
LIMIT = 60  # seconds: a bound for failing (a hang on a loaded machine), never a wait

# Exits with the value of ebx as its status: gdb changes it on the way.
STATUS_FROM_EBX = r"""
main:
    LGUEST_INIT
    mov $3, %ebx
    xor %esi, %esi
loop:
    inc %esi
    cmp $100, %esi
    jne loop
    mov %ebx, %ecx
    mov $2, %eax
    mov $msg, %edx
    mov $1, %ebx
    int $0x1f
.data
msg: .asciz "power off"
"""


async def served(dev: LguestDevice, body: str) -> tuple[Booted, GdbServer, asyncio.Task[str]]:
    """A guest held at its first instruction, a reader running it, a server on a free port."""
    g = await boot(dev, body)
    d = debugger(g.file)
    d.request_stop(START)
    server = GdbServer(d)
    await server.start("127.0.0.1", 0)
    reader = asyncio.create_task(run_to_end(g))
    return g, server, reader


@pytest.mark.skipif(GDB is None, reason="gdb is not installed")
async def test_real_gdb_breaks_steps_changes_a_register_and_continues_to_the_exit(
    dev: LguestDevice,
) -> None:
    g, server, reader = await served(dev, STATUS_FROM_EBX)
    loop = g.guest.symbols["loop"]
    host, port = present(server.address)
    commands = [
        "set architecture i386",
        f"target remote {host}:{port}",
        "info registers eip",
        f"break *{loop:#x}",
        "continue",
        "info registers esi",
        "stepi",
        "info registers eip esi",
        "delete",
        "set $ebx = 42",
        "continue",
    ]
    args = [present(GDB), "-batch", "-nx"]
    for command in commands:
        args += ["-ex", command]
    gdb = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(LIMIT):
        out = (await gdb.communicate())[0].decode()
        reason = await reader
    assert gdb.returncode == 0, out
    assert "eip            0x10000" in out
    assert f"Breakpoint 1, {loop:#010x} in ?? ()" in out
    assert "esi            0x0" in out
    assert f"eip            {loop + 1:#x}" in out  # exactly one instruction: inc %esi
    assert "esi            0x1" in out
    assert "exited with code 052" in out  # octal: the 42 we put in ebx
    assert reason == "power off"
    assert present(g.file.death).exit_status == 42
    await server.aclose()


class Client:
    """A bare-bones gdb: frames packets, checks acks and checksums."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, server: GdbServer) -> Client:
        host, port = present(server.address)
        return cls(*await asyncio.open_connection(host, port))

    async def send(self, data: bytes, *, good: bool = True) -> None:
        cs = checksum(data) if good else (checksum(data) + 1) & 0xFF
        self.writer.write(b"$" + data + b"#%02x" % cs)
        await self.writer.drain()
        assert await self.reader.readexactly(1) == (b"+" if good else b"-")

    async def recv(self) -> bytes:
        assert await self.reader.readuntil(b"$")  # skip acks
        body = (await self.reader.readuntil(b"#"))[:-1]
        cs = await self.reader.readexactly(2)
        assert int(cs, 16) == checksum(body)
        self.writer.write(b"+")
        return body

    async def recv_noack(self) -> bytes:
        await self.reader.readuntil(b"$")
        body = (await self.reader.readuntil(b"#"))[:-1]
        assert int(await self.reader.readexactly(2), 16) == checksum(body)
        return body

    async def cmd(self, data: bytes) -> bytes:
        await self.send(data)
        return await self.recv()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def test_protocol_basics_over_a_raw_socket(dev: LguestDevice) -> None:
    g, server, reader = await served(dev, STATUS_FROM_EBX)
    c = await Client.connect(server)
    async with asyncio.timeout(LIMIT):
        features = await c.cmd(b"qSupported:multiprocess+;swbreak+;xmlRegisters=i386")
        assert b"PacketSize=" in features and b"swbreak+" in features
        assert await c.cmd(b"vCont?") == b"vCont;c;C;s;S"
        assert await c.cmd(b"?") == b"T05thread:1;"
        regs = await c.cmd(b"g")
        assert len(regs) == 16 * 8
        eip = struct.unpack("<16I", bytes.fromhex(regs.decode()))[8]
        assert eip == 0x10000
        assert await c.cmd(b"p8") == regs[64:72]
        assert await c.cmd(b"p30") == b"E45"
        assert await c.cmd(b"qNoSuchThing") == b""  # unknown: empty reply
        assert await c.cmd(b"mzz,4") == b"E01"  # malformed
        assert await c.cmd(b"mfffff000,4") == b"E14"  # not mapped
        assert await c.cmd(b"m10000,2") == g.memory.read(0x10000, 2).hex().encode()
        # A bad checksum is refused with '-', then the resend is answered.
        await c.send(b"m10000,1", good=False)
        assert await c.cmd(b"m10000,1") == g.memory.read(0x10000, 1).hex().encode()
        # Write a register and memory.
        assert await c.cmd(b"P0=78563412") == b"OK"
        assert debugger(g.file).registers()[0] == 0x12345678
        msg = g.guest.symbols["msg"]
        assert await c.cmd(b"M%x,3:4f4b00" % msg) == b"OK"
        assert g.memory.read(msg, 3) == b"OK\0"
        # vCont;s steps one instruction; Z0/vCont;c stops at a breakpoint.
        assert await c.cmd(b"vCont;s:1") == b"T05thread:1;"
        loop = g.guest.symbols["loop"]
        assert await c.cmd(b"Z0,%x,1" % loop) == b"OK"
        assert await c.cmd(b"vCont;c") == b"T05thread:1;swbreak:;"
        assert debugger(g.file).registers()[8] == loop
        assert await c.cmd(b"z0,%x,1" % loop) == b"OK"
        assert await c.cmd(b"Z2,%x,4" % loop) == b""  # watchpoints: not supported
        assert await c.cmd(b"c") == b"W03"  # the guest powered off with status 3
        assert await c.cmd(b"?") == b"W03"
    assert await reader == "OK"  # the shutdown message we rewrote
    await c.close()
    await server.aclose()


async def test_ctrl_c_stops_a_running_guest_and_kill_ends_it(dev: LguestDevice) -> None:
    g, server, reader = await served(dev, SPIN)
    c = await Client.connect(server)
    async with asyncio.timeout(LIMIT):
        assert await c.cmd(b"QStartNoAckMode") == b"OK"
        c.writer.write(b"$c#63")  # no acks from here on
        await c.writer.drain()
        await until(lambda: g.u32("counter") > 1000)
        c.writer.write(b"\x03")
        body = await c.recv_noack()
        assert body == b"T02thread:1;"
        frozen = g.u32("counter")
        c.writer.write(b"$vKill;1#6e")
        assert await c.recv_noack() == b"OK"
        assert await reader == "killed by gdb"
        assert g.u32("counter") == frozen
    await c.close()
    await server.aclose()


async def test_a_client_that_disconnects_mid_packet_leaves_the_guest_to_the_next(
    dev: LguestDevice,
) -> None:
    g, server, reader = await served(dev, STATUS_FROM_EBX)
    async with asyncio.timeout(LIMIT):
        c = await Client.connect(server)
        assert await c.cmd(b"?") == b"T05thread:1;"
        assert await c.cmd(b"Z0,%x,1" % g.guest.symbols["loop"]) == b"OK"
        c.writer.write(b"$m10000,")  # and hang up
        await c.close()
        c = await Client.connect(server)  # the server takes the next client
        assert await c.cmd(b"?") == b"T05thread:1;"
        # The first client's breakpoint went with it: continue runs to the end.
        assert await c.cmd(b"c") == b"W03"
        await c.close()
        assert await reader == "power off"
    await server.aclose()


async def test_death_is_an_x_packet_with_the_reason_first(dev: LguestDevice) -> None:
    _g, server, reader = await served(
        dev,
        r"""
main:
    LGUEST_INIT
    HCALL 99
""",
    )
    async with asyncio.timeout(LIMIT):
        c = await Client.connect(server)
        await c.send(b"c")
        output = await c.recv()
        assert output.startswith(b"O")
        assert b"Bad hypercall 99" in bytes.fromhex(output[1:].decode())
        assert await c.recv() == b"X09"
        assert await c.cmd(b"g") == b"E01"
        await c.send(b"D")
        assert await c.recv() == b"OK"
        await c.close()
        assert await reader == "Bad hypercall 99"
    await server.aclose()


async def test_detach_lets_the_guest_run_free(dev: LguestDevice) -> None:
    g, server, reader = await served(dev, STATUS_FROM_EBX)
    async with asyncio.timeout(LIMIT):
        c = await Client.connect(server)
        assert await c.cmd(b"Z0,%x,1" % g.guest.symbols["loop"]) == b"OK"
        assert await c.cmd(b"D") == b"OK"
        assert await reader == "power off"
        assert present(g.file.death).exit_status == 3
        await c.close()
    await server.aclose()
