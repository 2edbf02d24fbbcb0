"""The console device: guest output as lines (and raw bytes), host input as chunks.

Descriptor fields (offsets in guests/lguest.inc): ``out_addr``/``out_len`` for
output, ``out_stream`` saying which stream it is (0 stdout, 1 stderr),
``in_addr``/``in_size``/``in_len`` for an input buffer the guest arms,
``flags`` (bit 0: end of input; bit 1: the input is a terminal).

* Output: on a notify with ``out_len > 0`` the bytes at ``out_addr`` go to the
  raw sink (if any) and the :class:`LineStream` of their stream (``lines``, or
  ``err_lines`` and ``err_sink`` for stderr); ``out_len`` is then zeroed so a
  later notify (e.g. re-arming input) does not repeat them.  One descriptor
  carries both streams, each write tagged: their writes stay in the order the
  guest made them, and a guest that never sets the tag writes stdout.
* Input: when the guest's buffer is armed (``in_size > 0``, ``in_len == 0``)
  and input is pending, up to ``in_size`` bytes are copied, ``in_len`` is set
  and the console irq raised.  Once all input is consumed and the source has
  ended, ``flags`` gets the EOF bit (and the irq is raised) once.
* Terminal: ``flags`` bit 1 says whether the input is a terminal (``input_tty``);
  the runtime answers ``isatty(0)`` with it.  It is written at every boot and
  restore, so a restored guest learns its restorer's console, not its snapshot's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import inspect
import os
import queue
import re
import sys
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any, AnyStr

from ..flag import Flag
from .devices import DEV_TYPE_CONSOLE, Device, Slot

CON_OUT_ADDR = 8
CON_OUT_LEN = 12
CON_IN_ADDR = 16
CON_IN_SIZE = 20
CON_IN_LEN = 24
CON_FLAGS = 28
CON_OUT_STREAM = 32
CON_FLAG_EOF = 1
CON_FLAG_INPUT_TTY = 2
STREAM_STDERR = 1


class ConsoleEnded(EOFError):
    """The console's output ended before :meth:`LineStream.expect` found its pattern.

    ``output`` is what was left unread (nothing was consumed).
    """

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output


_KEEP_NONE: deque[bytes] = deque(maxlen=0)  # the lines of every maxlen=0 stream: none


class _Piece(bytes):
    """A held line piece with no newline after it: a cut of an over-long line, or the
    last bytes flushed at close."""


class LineStream:
    """Console output as text lines, for one consumer at a time.

    Iterating yields each complete line (decoded as UTF-8, errors replaced,
    without its ``\\n``) and ends once the stream is closed and drained; a
    trailing partial line is yielded at close, and a line longer than
    ``MAX_LINE`` bytes is cut into pieces of that size.

    Bounds: at most ``max_bytes`` of unread output are held, counting
    ``LINE_COST`` bytes per line for Python's bookkeeping (lines are kept as
    bytes and decoded by the reader, so the producer's cost is a copy and a
    split at C speed); :meth:`put` makes the producer wait for the reader beyond
    that, so nothing is lost.  ``maxlen`` (lines) instead drops the oldest unread lines,
    counted in :attr:`dropped`; ``maxlen=0`` keeps nothing (the ``null``
    console) and only counts lines.

    Besides iteration, :meth:`readline` (one line with its ``\n``, like a file's)
    and :meth:`expect` (a regular expression over the unread output, partial line
    included, pexpect's way) read the same output: what one consumes the others
    do not see again.
    """

    MAX_LINE = 64 << 10
    DEFAULT_MAX_BYTES = 1 << 20
    LINE_COST = 64  # bytes counted per held line besides its text: what Python spends on it
    BATCH = 256  # lines a reader gets before the iterator yields to the event loop

    def __init__(self, maxlen: int | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < self.LINE_COST:
            raise ValueError(f"max_bytes must be at least {self.LINE_COST}")
        # maxlen=0 keeps no line: every such stream shares one deque that holds none.
        # A stream's own deque comes with its first line (an idle guest's stderr never
        # has one); until then, and for ever with maxlen=0, the shared empty one.
        self._lines: deque[bytes] = _KEEP_NONE
        self._maxlen = maxlen
        self.max_bytes = max_bytes
        self._held = 0  # bytes in _lines and _partial
        self._partial = bytearray()
        self._partial_len = 0  # for maxlen=0, which keeps no bytes
        self._changed = Flag()
        self._room = Flag()
        self._room.set()
        self.closed = False
        self.dropped = 0

    @property
    def held(self) -> int:
        """Bytes of output not yet read."""
        return self._held

    async def put(self, data: bytes) -> None:
        """Add output, waiting (in pieces) while ``max_bytes`` of it are unread."""
        view = memoryview(data)
        while view and not self.closed:
            while self._full() and not self.closed:
                self._room.clear()
                await self._room.wait()
            # Each byte may end a line, which costs LINE_COST: this much always fits.
            room = (self.max_bytes - self._held) // self.LINE_COST
            take = len(view) if self._maxlen is not None else max(room, 1)
            self.push(bytes(view[:take]))
            view = view[take:]

    def _full(self) -> bool:
        return self._maxlen is None and self._held + self.LINE_COST > self.max_bytes

    def push(self, data: bytes) -> None:
        """Add raw output bytes now (no waiting: :meth:`put` is the bounded way)."""
        if self.closed or not data:
            return
        if self._maxlen == 0:
            self._count_only(data)
            return
        self._held += len(data)
        if b"\n" in data:
            *complete, rest = (bytes(self._partial) + data).split(b"\n")
            self._partial = bytearray(rest)
            self._extend(complete, len(complete))  # the newlines are not kept
        else:
            self._partial += data
            self._changed.set()  # expect() matches a line not ended yet (a prompt)
        while len(self._partial) >= self.MAX_LINE:
            self._extend([_Piece(self._partial[: self.MAX_LINE])])
            del self._partial[: self.MAX_LINE]

    def take(self) -> list[str]:
        """Every complete line waiting now, removed from the stream, without waiting.

        With the guest paused nothing can arrive meanwhile, so the lines taken
        and :attr:`partial` together are exactly the output not yet consumed.
        """
        lines = [line.decode("utf-8", "replace") for line in self._lines]
        self._held -= sum(len(line) + self.LINE_COST for line in self._lines)
        self._lines.clear()
        self._room.set()
        return lines

    @property
    def partial(self) -> bytes:
        """Output bytes of a line not yet ended by ``\\n`` (what :meth:`close` would flush)."""
        return bytes(self._partial)

    def _count_only(self, data: bytes) -> None:
        lines = data.count(b"\n")
        if lines:
            self.dropped += lines
            self._partial_len = len(data) - data.rindex(b"\n") - 1
        else:
            self._partial_len += len(data)
        cuts, self._partial_len = divmod(self._partial_len, self.MAX_LINE)
        self.dropped += cuts

    def _extend(self, lines: list[bytes], newlines: int = 0) -> None:
        """Append complete lines whose text (plus ``newlines`` dropped) is already held."""
        if self._lines is _KEEP_NONE and self._maxlen != 0:
            self._lines = deque()
        self._lines.extend(lines)
        self._held += len(lines) * self.LINE_COST - newlines
        if self._maxlen is not None:
            while len(self._lines) > self._maxlen:
                self._held -= len(self._lines.popleft()) + self.LINE_COST
                self.dropped += 1
        self._changed.set()

    def close(self) -> None:
        """No more output: flush the partial line and let iterators (and writers) finish."""
        if self.closed:
            return
        if self._partial:
            self._extend([_Piece(self._partial)])
            self._partial.clear()
        self.closed = True
        self._changed.set()
        self._room.set()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        while True:
            batch = 0
            while self._lines:
                yield self._pop().decode("utf-8", "replace")
                batch += 1
                if batch % self.BATCH == 0:
                    await asyncio.sleep(0)  # a fast reader of a flood lets the loop breathe
            if self.closed:
                return
            self._changed.clear()
            await self._changed.wait()

    def _pop(self) -> bytes:
        line = self._lines.popleft()
        self._held -= len(line) + self.LINE_COST
        if not self._full():
            self._room.set()
        return line

    async def readline(self) -> str:
        """The next line with its ``\n`` (a cut piece of a long line, or the last
        unended line, without); ``""`` once the output has ended and been read."""
        while not self._lines:
            if self.closed:
                return ""
            self._changed.clear()
            await self._changed.wait()
        line = self._pop()
        ending = "" if isinstance(line, _Piece) else "\n"
        return line.decode("utf-8", "replace") + ending

    async def expect(
        self,
        pattern: AnyStr | re.Pattern[AnyStr],
        timeout: float | None = None,  # noqa: ASYNC109 (pexpect's signature; TimeoutError)
    ) -> re.Match[AnyStr]:
        """Wait until the unread output matches ``pattern`` (``re.search``); consume the
        output up to the match's end and return the match.

        The output searched is every unread byte, newlines included, and the line not
        ended yet, so a prompt matches as soon as it is printed; a match may span any
        number of console writes.  A ``str`` pattern sees the output decoded as UTF-8
        (bytes that are not UTF-8 as lone surrogates, so what is consumed is exact);
        a ``bytes`` pattern sees the bytes.  The match's ``string`` is the output
        searched, so ``output[:match.start()]`` is what came before it.

        Raises ``TimeoutError`` after ``timeout`` seconds (``None``: no limit) and
        :class:`ConsoleEnded` if the output ends first; neither consumes anything.
        A console that keeps no output (``maxlen=0``: ``stdio``, ``null``) raises
        ``RuntimeError``.  Unread output stays bounded by ``max_bytes``: when it is
        full and nothing matches, the older half is consumed (it comes before any
        later match) so that the guest can go on writing; a match then has to fit
        in half of ``max_bytes``.
        """
        if self._maxlen == 0:
            raise RuntimeError(
                "this console keeps no output (console 'stdio' or 'null'): "
                "expect needs console='capture'"
            )
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._changed.clear()
                    output = self._unread()
                    found = _search(regex, output)
                    if found is not None:
                        match, size = found
                        self._consume(size)
                        return match
                    if self.closed:
                        raise ConsoleEnded(
                            f"the console ended before a match for {regex.pattern!r}",
                            output.decode("utf-8", "replace"),
                        )
                    if self._full():  # consume the older half: the guest goes on writing
                        self._consume(max(1, len(output) // 2))
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"no match for {regex.pattern!r} within {timeout} seconds") from None

    def _unread(self) -> bytes:
        """Every unread byte as the guest wrote it: held lines, their newlines, the partial."""
        parts: list[bytes] = []
        for line in self._lines:
            parts.append(line)
            if not isinstance(line, _Piece):
                parts.append(b"\n")
        parts.append(bytes(self._partial))
        return b"".join(parts)

    def _consume(self, size: int) -> None:
        """Remove the first ``size`` bytes of :meth:`_unread` (a line cut in the middle
        keeps its rest, still ended by its newline)."""
        while size > 0 and self._lines:
            line = self._lines[0]
            whole = len(line) + (0 if isinstance(line, _Piece) else 1)
            if size >= whole:
                self._pop()
                size -= whole
                continue
            rest = line[size:]
            self._lines[0] = _Piece(rest) if isinstance(line, _Piece) else rest
            self._held -= size
            size = 0
        if size > 0:
            del self._partial[:size]
            self._held -= size
        if not self._full():
            self._room.set()


def _search(regex: re.Pattern[AnyStr], output: bytes) -> tuple[re.Match[AnyStr], int] | None:
    """``regex``'s first match in ``output`` and the bytes up to its end, or None."""
    if isinstance(regex.pattern, str):
        text = output.decode("utf-8", "surrogateescape")
        match = regex.search(text)
        if match is None:
            return None
        return match, len(text[: match.end()].encode("utf-8", "surrogateescape"))
    found = regex.search(output)
    return None if found is None else (found, found.end())


class Console(Device):
    """A console: output to ``lines`` and ``sink``; input from ``feed`` and ``source``.

    Output tagged stderr goes to ``err_lines`` and ``err_sink`` if there is an
    ``err_lines``, else with stdout to ``lines`` and ``sink`` (as ``2>&1``).
    ``source`` (an async iterable of bytes) is read from :meth:`start` on; when
    it ends, input ends.  ``eof=True`` starts with input already ended (the
    guest sees EOF as soon as it arms its buffer).  ``input_tty`` tells the guest its
    input is a terminal (``isatty(0)``); a console's input is not one unless asked.
    """

    type = DEV_TYPE_CONSOLE

    def __init__(
        self,
        *,
        lines: LineStream | None = None,
        sink: Callable[[bytes], Awaitable[None] | None] | None = None,
        source: AsyncIterable[bytes] | None = None,
        eof: bool = False,
        rate: int | None = None,
        err_lines: LineStream | None = None,
        err_sink: Callable[[bytes], Awaitable[None] | None] | None = None,
        input_tty: bool = False,
    ) -> None:
        self.input_tty = input_tty
        self.lines = lines if lines is not None else LineStream()
        self.err_lines = err_lines
        self.err_sink = err_sink if err_lines is not None else sink
        self._throttle = RateLimit(rate) if rate else None
        self.sink = sink
        self.source = source
        self._pending = bytearray()
        self._eof = eof
        self._eof_told = False
        self._feeder: asyncio.Task[None] | None = None

    # -- host side ----------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Queue input for the guest (ignored after :meth:`end_input`)."""
        if self._eof or not data:
            return
        self._pending += data
        if self.slot is not None:
            self.slot.wake()

    def end_input(self) -> None:
        """No more input: the guest sees EOF once it has read what is queued."""
        if not self._eof:
            self._eof = True
            if self.slot is not None:
                self.slot.wake()

    async def start(self) -> None:
        if self.source is not None:
            self._feeder = asyncio.create_task(self._feed_from(self.source))

    async def _feed_from(self, source: AsyncIterable[bytes]) -> None:
        try:
            async for chunk in source:
                self.feed(chunk)
        finally:
            self.end_input()

    async def stop(self) -> None:
        if self._feeder is not None:
            self._feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._feeder
        self.lines.close()
        if self.err_lines is not None:
            self.err_lines.close()

    def state(self) -> dict[str, Any]:
        """Input not yet delivered, whether input has ended and whether the guest was
        told (the output already delivered is the caller's: it has read it)."""
        return {
            "pending": base64.b64encode(bytes(self._pending)).decode(),
            "eof": self._eof,
            "eof_told": self._eof_told,
        }

    def restore(self, state: Any) -> None:
        """Take back :meth:`state`: its input goes before anything fed since."""
        try:
            pending = base64.b64decode(state["pending"], validate=True)
            eof, eof_told = state["eof"], state["eof_told"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad console state: {exc!r}") from None
        if not isinstance(eof, bool) or not isinstance(eof_told, bool):
            raise ValueError("bad console state: eof flags must be booleans")
        self._pending[:0] = pending
        self._eof = self._eof or eof
        self._eof_told = eof_told
        if self.slot is not None:
            self._tell_tty(self.slot)  # the restored memory holds the snapshot's console's
        if self.slot is not None and (self._pending or self._eof):
            self.slot.wake()

    # -- guest side ---------------------------------------------------------
    def attach(self, slot: Slot) -> None:
        super().attach(slot)
        self._eof_told = False
        self._tell_tty(slot)
        if self._pending or self._eof:
            slot.wake()  # fed before this boot: a resumed guest may already wait for it

    def _tell_tty(self, slot: Slot) -> None:
        flags = slot.get(CON_FLAGS)
        told = flags & ~CON_FLAG_INPUT_TTY | (CON_FLAG_INPUT_TTY if self.input_tty else 0)
        if told != flags:  # (unchanged, the device page stays the boot template's)
            slot.set(CON_FLAGS, told)

    async def notify(self, slot: Slot) -> None:
        length = slot.get(CON_OUT_LEN)
        if length:
            data = slot.read(slot.get(CON_OUT_ADDR), length)
            slot.set(CON_OUT_LEN, 0)
            stderr = slot.get(CON_OUT_STREAM) == STREAM_STDERR
            lines, sink = self.lines, self.sink
            if stderr:
                lines, sink = self.err_lines or self.lines, self.err_sink
            if data is not None and self._throttle is not None:
                await self._throttle.take(len(data))  # the guest waits: nothing is lost
            if data is not None:
                await lines.put(data)  # waits while the reader is max_bytes behind
                if sink is not None:
                    written = sink(data)
                    if inspect.isawaitable(written):
                        await written  # an async sink: the guest waits for it
        self.poll(slot)

    def poll(self, slot: Slot) -> None:
        if slot.get(CON_IN_LEN) != 0:
            return  # the guest has not consumed the last chunk yet
        size = slot.get(CON_IN_SIZE)
        if self._pending and size:
            chunk = bytes(self._pending[:size])
            if slot.write(slot.get(CON_IN_ADDR), chunk):
                del self._pending[: len(chunk)]
                slot.set(CON_IN_LEN, len(chunk))
                slot.interrupt()
        elif self._eof and not self._pending and not self._eof_told:
            self._eof_told = True
            slot.set(CON_FLAGS, slot.get(CON_FLAGS) | CON_FLAG_EOF)
            slot.interrupt()


class RateLimit:
    """A token bucket: ``rate`` bytes per second, with a burst of one second's worth."""

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._tokens = float(rate)
        self._stamp: float | None = None

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may pass (event loop only)."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._stamp is not None:
            self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= n
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


_Chunk = tuple[bytes, asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class _StdoutWriter:
    """Writes to the process's standard output (or error) on a daemon thread, one chunk
    at a time.

    The guest's NOTIFY waits for its chunk to be written (back-pressure: a slow
    terminal or pipe slows only that guest), and the event loop never blocks in
    a write, so Ctrl-C works even when nobody reads the pipe.  Once the reader
    has gone (``EPIPE``) every write raises ``BrokenPipeError`` at once.
    """

    def __init__(self, name: str = "stdout") -> None:
        self.name = name  # "stdout" or "stderr": the sys attribute written to
        self._queue: queue.SimpleQueue[_Chunk] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.closed = False

    async def __call__(self, data: bytes) -> None:
        if self.closed:
            raise BrokenPipeError(errno.EPIPE, f"standard {self.name[3:]} is closed")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"lguest-{self.name}", daemon=True
            )
            self._thread.start()
        self._queue.put((data, loop, done))
        await done

    def _run(self) -> None:
        while True:
            data, loop, done = self._queue.get()
            error: OSError | None = None
            try:
                stream = getattr(sys, self.name).buffer
                stream.write(data)
                stream.flush()
            except BrokenPipeError as exc:
                self.closed = True
                error = exc
            except (OSError, ValueError) as exc:  # ValueError: stdout was closed
                error = exc if isinstance(exc, OSError) else OSError(errno.EBADF, str(exc))
            with contextlib.suppress(RuntimeError):  # RuntimeError: that loop is closed
                loop.call_soon_threadsafe(_settle, done, error)


def _settle(done: asyncio.Future[None], error: OSError | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


stdout_sink = _StdoutWriter()
"""The raw sink of a ``stdio`` console: the process's standard output (see _StdoutWriter)."""

stderr_sink = _StdoutWriter("stderr")
"""The raw sink of a ``stdio`` console's stderr: the process's standard error."""


def stdout_closed() -> bool:
    """True once a write to standard output found its reader gone."""
    return stdout_sink.closed


async def stdin_source(fd: int = 0, chunk: int = 4096) -> AsyncIterator[bytes]:
    """Chunks read from ``fd`` until end of file.

    A daemon thread does the blocking reads, so a terminal that never sends
    EOF cannot keep the process alive or block loop shutdown.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def reader() -> None:
        while True:
            try:
                data = os.read(fd, chunk)
            except OSError:
                data = b""
            try:
                loop.call_soon_threadsafe(queue.put_nowait, data)
            except RuntimeError:  # the loop is closed
                return
            if not data:
                return

    threading.Thread(target=reader, name="lguest-stdin", daemon=True).start()
    while data := await queue.get():
        yield data
