"""A GDB remote-serial-protocol server for one guest, on asyncio.

``gdb -ex 'set architecture i386' -ex 'target remote HOST:PORT'`` talks to it.
One client at a time; the guest's other neighbours keep running while it is
stopped.  Each CPU of the guest is a thread (``qfThreadInfo``, ``qC``, ``T``,
``qThreadExtraInfo``; thread id = CPU number + 1): ``Hg`` selects the CPU the
register packets read and write, ``vCont;s:ID`` steps that CPU alone; stops are
all-stop (:class:`~supervisor.debug.Debugger`) and name the CPU that stopped.
Supported: ``qSupported`` (with ``QStartNoAckMode``, ``swbreak``), ``?``,
``g``/``G``, ``p``/``P``, ``m``/``M``, ``c``/``C``/``s``/``S``,
``vCont?``/``vCont``, ``Z0``/``z0`` (and ``Z1``/``z1``: the same exact
breakpoints), ``k``/``vKill``, ``D``, and Ctrl-C (a ``0x03`` byte) to stop a
running guest.  Registers are gdb's i386 layout, 16 of them, 32 bits each:
eax ecx edx ebx esp ebp esi edi eip eflags cs ss ds es fs gs.

Packets with a bad checksum are answered with ``-`` (gdb resends); unknown
packets get the empty reply (gdb then does without); malformed arguments get
``E01``, unmapped memory ``E14``.  The guest's end is reported as ``W`` (it
powered off: its exit status) or ``X`` (it died; an ``O`` packet carrying the
reason comes first).  A client that disconnects without ``D`` (even in the
middle of a packet) leaves the guest as it was, minus its breakpoints, and the
next client can attach.

A guest that reboots gets a new file and so a new :class:`~supervisor.debug.Debugger`:
whoever runs it calls :meth:`GdbServer.attach` again (the Supervisor does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import struct
from typing import Any

from .debug import BREAKPOINT, PAUSE, REGISTERS, START, DebugError, Debugger, Stop
from .state import Exit

log = logging.getLogger(__name__)

INTERRUPT = 0x03
PACKET_SIZE = 0x4000
SIGINT = 2
SIGTRAP = 5
SIGKILL = 9
_HEX = re.compile(rb"[0-9a-fA-F]*")
_EOF = object()
_BREAK = object()


def checksum(data: bytes) -> int:
    return sum(data) & 0xFF


def frame(data: bytes) -> bytes:
    """``$data#cs`` with ``#``, ``$``, ``}`` and ``*`` escaped."""
    escaped = re.sub(rb"[#$}*]", lambda m: b"}" + bytes([m[0][0] ^ 0x20]), data)
    return b"$" + escaped + b"#" + b"%02x" % checksum(escaped)


class _BadPacket(Exception):
    pass


def _int(text: bytes) -> int:
    if not text or not _HEX.fullmatch(text):
        raise _BadPacket(text)
    return int(text, 16)


def _le32(value: int) -> bytes:
    return struct.pack("<I", value & 0xFFFFFFFF).hex().encode()


class GdbServer:
    """Serves gdb for one guest.  ``await start()``, then :meth:`attach` a debugger.

    ``target`` may be given now or later (a guest that has not booted yet);
    until then clients wait for it.
    """

    def __init__(self, target: Debugger | None = None) -> None:
        self._target = target
        self._changed = asyncio.Event()  # a new target, or the end
        self._session: _Session | None = None
        self._task: asyncio.Task[Any] | None = None
        self._server: asyncio.Server | None = None
        self._client: asyncio.StreamWriter | None = None
        self._ended: Exit | None = None
        self._ended_event = asyncio.Event()
        self.address: tuple[str, int] | None = None

    # -- lifecycle -----------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0: any free one); return the address bound."""
        self._server = await asyncio.start_server(self._serve, host, port)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self.address

    def attach(self, target: Debugger, *, stopped: bool = False) -> None:
        """Debug ``target`` (a new boot of the guest, not yet running) from now on.

        ``stopped=True`` holds it before its first instruction.  Otherwise the
        breakpoints the client has inserted are carried over to it.
        """
        self._target = target
        carried = self._session.inserted if self._session is not None else set()
        if stopped or carried:
            target.request_stop(START)
            for address in carried:
                target.add_breakpoint(address)
            if not stopped:
                target.resume()
        self._changed.set()

    def ended(self, death: Exit) -> None:
        """The guest has ended for good (told by its owner): report it and refuse new runs."""
        self._ended = death
        self._ended_event.set()
        self._changed.set()

    async def aclose(self) -> None:
        """Stop listening and drop the client."""
        if self._server is not None:
            self._server.close()
            self._server = None
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task})

    # -- one client --------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._client is not None:
            writer.close()  # one client at a time
            return
        self._client = writer
        self._task = asyncio.current_task()
        session = self._session = _Session(self, reader, writer)
        try:
            await session.run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # aclose(): end quietly (asyncio's stream callback reports a cancelled handler)
        except Exception:  # a bug here must not take the guest down
            log.exception("gdb session failed")
        finally:
            session.forget_breakpoints()
            self._client = None
            self._session = None
            self._task = None
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()


class _Session:
    def __init__(
        self, server: GdbServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.acks = True
        self.swbreak = False
        self.items: asyncio.Queue[object] = asyncio.Queue()
        self.running: asyncio.Task[None] | None = None
        self.last: bytes = b""
        self.signal = SIGTRAP
        self.detached = False
        self.inserted: set[int] = set()

    # -- input: a task splits the byte stream into packets, acks and Ctrl-C ---------
    async def _read_packets(self) -> None:
        try:
            while True:
                byte = await self.reader.read(1)
                if not byte:
                    break
                if byte[0] == INTERRUPT:
                    self.items.put_nowait(_BREAK)
                elif byte == b"-" and self.last:
                    self.writer.write(self.last)  # gdb asks for a resend
                elif byte == b"$":
                    body = await self.reader.readuntil(b"#")
                    body = body[:-1]
                    given = await self.reader.readexactly(2)
                    if _HEX.fullmatch(given) and int(given, 16) == checksum(body):
                        if self.acks:
                            self.writer.write(b"+")
                        self.items.put_nowait(_unescape(body))
                    elif self.acks:
                        self.writer.write(b"-")
                # '+' and any noise between packets are ignored
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self.items.put_nowait(_EOF)

    def send(self, data: bytes) -> None:
        self.last = frame(data)
        self.writer.write(self.last)

    # -- the conversation ----------------------------------------------------------------
    async def run(self) -> None:
        reader = asyncio.create_task(self._read_packets())
        try:
            while not self.detached:
                item = await self.items.get()
                if item is _EOF:
                    break
                if item is _BREAK:
                    target = self.server._target
                    if self.running is not None and target is not None:
                        self.signal = SIGINT
                        target.request_stop(PAUSE)
                    continue
                assert isinstance(item, bytes)
                if self.running is not None and not self.running.done():
                    continue  # all-stop mode: nothing but Ctrl-C while it runs
                try:
                    reply = await self.handle(item)
                except _BadPacket:
                    reply = b"E01"
                except DebugError:
                    reply = b"E14"
                if reply is not None:
                    self.send(reply)
                await self.writer.drain()
        finally:
            reader.cancel()
            if self.running is not None:
                self.running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.running

    async def target(self, old: Debugger | None = None) -> Debugger:
        """The guest's debugger (a new one, if ``old`` is given); DebugError once it ended."""
        server = self.server
        while True:
            current = server._target
            if current is not None and current is not old and not current.file.closed:
                return current
            if server._ended is not None:
                raise DebugError("the guest has ended")
            server._changed.clear()
            await server._changed.wait()

    async def stopped(self) -> Debugger | Exit:
        """The target, stopped (stopping it if it runs), or how the guest ended."""
        if self.server._ended is not None:
            return self.server._ended
        try:
            target = await self.target()
        except DebugError:
            assert self.server._ended is not None
            return self.server._ended
        stop = await target.stop() if not target.stopped else None
        if stop is not None and stop.death is not None:
            return stop.death
        return target

    async def handle(self, packet: bytes) -> bytes | None:
        """The reply to one packet (None: no reply)."""
        head = packet[:1]
        if packet.startswith(b"qSupported"):
            self.swbreak = b"swbreak+" in packet
            features = f"PacketSize={PACKET_SIZE:x};QStartNoAckMode+;vContSupported+"
            return features.encode() + (b";swbreak+" if self.swbreak else b"")
        if packet == b"QStartNoAckMode":
            self.send(b"OK")
            self.acks = False
            return None
        if packet == b"vCont?":
            return b"vCont;c;C;s;S"
        if packet.startswith(b"vCont;"):
            first = packet[6:].split(b";")[0]
            action, _, thread = first.partition(b":")
            if action[:1] not in (b"c", b"C", b"s", b"S"):
                raise _BadPacket(packet)
            step = action[:1] in (b"s", b"S")
            if step and thread:
                await self.select(thread)
            return await self.resume(step=step, address=None)
        if packet.startswith(b"vKill") or packet == b"k":
            await self.kill()
            return b"OK" if head == b"v" else None
        if packet.startswith(b"v"):
            return b""
        if packet in (b"qAttached",) or packet.startswith(b"qAttached:"):
            return b"1"
        if packet in (b"qfThreadInfo", b"qsThreadInfo", b"qC") or packet.startswith(
            b"qThreadExtraInfo,"
        ):
            return await self.threads(packet)
        if head == b"H":
            if packet[1:2] == b"g":  # which CPU the register packets mean
                await self.select(packet[2:])
            return b"OK"
        if head == b"T":
            state = await self.stopped()
            if isinstance(state, Exit):
                return b"E01"
            n = _thread(packet[1:])
            return b"OK" if n is not None and 0 <= n < state.cpu_count else b"E01"
        if head == b"?":
            return await self.stop_reply_now()
        if head == b"D":
            target = self.server._target
            self.forget_breakpoints()
            if target is not None:
                target.detach()
            self.detached = True
            return b"OK"
        if head in (b"c", b"s", b"C", b"S"):
            address = None
            args = packet[1:]
            if head in (b"C", b"S"):
                args = args.split(b";", 1)[1] if b";" in args else b""
            if args:
                address = _int(args)
            return await self.resume(step=head in (b"s", b"S"), address=address)
        if head in (b"g", b"G", b"p", b"P", b"m", b"M", b"Z", b"z"):
            state = await self.stopped()
            if isinstance(state, Exit):
                return b"E01"
            return self.inspect(state, packet)
        return b""

    # -- threads: one per CPU, gdb thread id = CPU number + 1 ------------------------------------
    async def select(self, thread: bytes) -> None:
        """``Hg``/``vCont;s:``: inspect (and step) that CPU; -1 or 0 keep the current one."""
        n = _thread(thread)
        if n is None:
            return
        state = await self.stopped()
        if not isinstance(state, Exit):
            state.select(n)

    async def threads(self, packet: bytes) -> bytes:
        state = await self.stopped()
        if isinstance(state, Exit):
            return b"E01"
        if packet == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % (n + 1) for n in range(state.cpu_count))
        if packet == b"qsThreadInfo":
            return b"l"
        if packet == b"qC":
            return b"QC%x" % (state.selected + 1)
        n = _thread(packet.split(b",", 1)[1])
        if n is None or not 0 <= n < state.cpu_count:
            return b"E01"
        return state.cpu_summary(n).encode().hex().encode()

    def inspect(self, target: Debugger, packet: bytes) -> bytes:
        head, body = packet[:1], packet[1:]
        if head == b"g":
            return b"".join(_le32(v) for v in target.registers())
        if head == b"G":
            if len(body) < 8 * len(REGISTERS) or not _HEX.fullmatch(body):
                raise _BadPacket(packet)
            raw = bytes.fromhex(body[: 8 * len(REGISTERS)].decode())
            for i, (value,) in enumerate(struct.iter_unpack("<I", raw)):
                target.set_register(i, value)
            return b"OK"
        if head == b"p":
            index = _int(body)
            if index >= len(REGISTERS):
                return b"E45"
            return _le32(target.register(index))
        if head == b"P":
            number, _, value = body.partition(b"=")
            index = _int(number)
            if index >= len(REGISTERS) or len(value) != 8 or not _HEX.fullmatch(value):
                return b"E45" if index >= len(REGISTERS) else b"E01"
            target.set_register(index, int.from_bytes(bytes.fromhex(value.decode()), "little"))
            return b"OK"
        if head == b"m":
            address, _, length = body.partition(b",")
            size = _int(length)
            if size > PACKET_SIZE // 2:
                size = PACKET_SIZE // 2
            return target.read_memory(_int(address), size).hex().encode()
        if head == b"M":
            where, _, data = body.partition(b":")
            address, _, length = where.partition(b",")
            if not _HEX.fullmatch(data) or len(data) != 2 * _int(length):
                raise _BadPacket(packet)
            target.write_memory(_int(address), bytes.fromhex(data.decode()))
            return b"OK"
        # Z / z: type, address, kind
        parts = body.split(b",")
        if len(parts) < 3:
            raise _BadPacket(packet)
        if parts[0] not in (b"0", b"1"):
            return b""  # watchpoints: not supported
        breakpoint_at = _int(parts[1])
        if head == b"Z":
            target.add_breakpoint(breakpoint_at)
            self.inserted.add(breakpoint_at)
        else:
            target.remove_breakpoint(breakpoint_at)
            self.inserted.discard(breakpoint_at)
        return b"OK"

    def forget_breakpoints(self) -> None:
        """Remove the breakpoints this client inserted (if the guest is stopped)."""
        target = self.server._target
        if target is None or not target.stopped:
            return
        for address in self.inserted:
            with contextlib.suppress(DebugError):
                target.remove_breakpoint(address)
        self.inserted.clear()

    # -- running -------------------------------------------------------------------------------
    async def resume(self, *, step: bool, address: int | None) -> bytes | None:
        state = await self.stopped()
        if isinstance(state, Exit):
            return _exit_packet(state)
        if address is not None:
            state.set_register("eip", address)
        self.signal = SIGTRAP
        if step:
            state.step()
        else:
            state.resume()
        self.running = asyncio.create_task(self._report_stop(state))
        return None

    async def _report_stop(self, target: Debugger) -> None:
        """Wait for the running guest to stop (across reboots) and tell gdb."""
        ended = asyncio.ensure_future(self.server._ended_event.wait())
        try:
            while True:
                waiter = asyncio.ensure_future(target.wait_stop())
                await asyncio.wait({waiter, ended}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
                    assert self.server._ended is not None
                    self._send_exit(self.server._ended)
                    return
                try:
                    stop: Stop | None = waiter.result()
                except DebugError:
                    stop = None  # its file was closed: killed, or rebooting into a new one
                if stop is not None and stop.death is None:
                    self.send(self._stop_packet(stop))
                    return
                if stop is not None and stop.death is not None and not stop.death.restart:
                    self._send_exit(stop.death)
                    return
                try:
                    target = await self.target(old=target)
                except DebugError:
                    assert self.server._ended is not None
                    self._send_exit(self.server._ended)
                    return
        finally:
            ended.cancel()
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    def _send_exit(self, death: Exit) -> None:
        if death.exit_status is None:
            self.send(b"O" + f"guest died: {death.reason}\n".encode().hex().encode())
        self.send(_exit_packet(death))

    def _stop_packet(self, stop: Stop) -> bytes:
        signal = SIGINT if stop.reason == PAUSE and self.signal == SIGINT else SIGTRAP
        extra = b"swbreak:;" if stop.reason == BREAKPOINT and self.swbreak else b""
        return b"T%02xthread:%x;" % (signal, stop.cpu + 1) + extra

    async def stop_reply_now(self) -> bytes:
        state = await self.stopped()
        if isinstance(state, Exit):
            return _exit_packet(state)
        return self._stop_packet(Stop(state.stop_reason or PAUSE, cpu=state.stop_cpu))

    async def kill(self) -> None:
        self.forget_breakpoints()
        target = self.server._target
        if target is not None and self.server._ended is None:
            target.kill("killed by gdb")
        self.detached = True


def _exit_packet(death: Exit) -> bytes:
    if death.exit_status is not None:
        return b"W%02x" % min(death.exit_status & 0xFFFFFFFF, 255)
    return b"X%02x" % SIGKILL


def _thread(text: bytes) -> int | None:
    """The CPU a gdb thread id names; None for -1 (all) and 0 (any)."""
    if text in (b"-1", b"0", b""):
        return None
    return _int(text) - 1


def _unescape(body: bytes) -> bytes:
    if b"}" not in body:
        return body
    out = bytearray()
    escaped = False
    for byte in body:
        if escaped:
            out.append(byte ^ 0x20)
            escaped = False
        elif byte == 0x7D:
            escaped = True
        else:
            out.append(byte)
    return bytes(out)
