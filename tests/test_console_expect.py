"""The console's pexpect-style API: ``expect`` and ``readline`` beside line iteration."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from supervisor import ConsoleEnded, GuestConfig, Supervisor
from supervisor.launcher.console import LineStream

# The subject is the console API's matching, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

GUESTS = Path(__file__).resolve().parent.parent / "guests"
LIMIT = 60  # seconds: a bound for failing (a hang on a loaded machine), never a wait


async def lines_of(stream: LineStream) -> list[str]:
    return [line async for line in stream]


async def test_a_prompt_without_a_newline_matches_and_is_consumed() -> None:
    stream = LineStream()
    stream.push(b"boot ok\nlogin: ")
    match = await stream.expect(r"login: $")
    assert (match.group(), match.string[: match.start()]) == ("login: ", "boot ok\n")
    assert stream.held == 0  # everything up to the match's end is consumed
    stream.push(b"after\n")
    stream.close()
    assert await lines_of(stream) == ["after"]


async def test_a_pattern_split_across_two_writes_matches_once_both_arrived() -> None:
    stream = LineStream()
    waiting = asyncio.ensure_future(stream.expect(r"pass(word)?: "))
    stream.push(b"pass")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not waiting.done()  # "pass" alone does not match "pass: " yet
    stream.push(b"word: ")
    match = await asyncio.wait_for(waiting, LIMIT)
    assert (match.group(), match.group(1)) == ("password: ", "word")


async def test_a_match_in_the_middle_of_a_line_leaves_its_rest_for_the_reader() -> None:
    stream = LineStream()
    stream.push(b"one\ntwo three\nfour\n")
    match = await stream.expect(r"t(\w+)")
    assert match.group(1) == "wo"
    assert await stream.readline() == " three\n"
    stream.close()
    assert await lines_of(stream) == ["four"]


async def test_a_match_may_span_lines_and_bytes_patterns_see_bytes() -> None:
    stream = LineStream()
    stream.push(b"a\nb\xff\nc")
    match = await stream.expect(re.compile(rb"b\xff\nc"))
    assert match.group() == b"b\xff\nc"
    stream.push(b"d\n")
    stream.close()
    assert await lines_of(stream) == ["d"]


async def test_a_str_pattern_consumes_exactly_the_bytes_matched_even_past_bad_utf8() -> None:
    stream = LineStream()
    stream.push("\xe9t\xe9 \xff ok\nnext\n".encode("latin-1"))
    match = await stream.expect("ok")
    assert match.group() == "ok"
    stream.close()
    assert await lines_of(stream) == ["", "next"]  # the rest of "... ok" is the empty line


async def test_timeout_raises_timeout_error_and_consumes_nothing() -> None:
    stream = LineStream()
    stream.push(b"nothing here\npartial")
    with pytest.raises(TimeoutError, match="never"):
        await stream.expect("never", timeout=0.01)
    stream.close()
    assert await lines_of(stream) == ["nothing here", "partial"]


async def test_the_end_of_output_before_a_match_raises_console_ended() -> None:
    stream = LineStream()
    stream.push(b"last words\nno newline")
    waiting = asyncio.ensure_future(stream.expect("never"))
    await asyncio.sleep(0)
    stream.close()
    with pytest.raises(ConsoleEnded, match="ended before a match for 'never'") as info:
        await asyncio.wait_for(waiting, LIMIT)
    assert isinstance(info.value, EOFError)
    assert info.value.output == "last words\nno newline"
    assert await lines_of(stream) == ["last words", "no newline"]


async def test_readline_keeps_newlines_and_returns_empty_at_the_end() -> None:
    stream = LineStream()
    reading = asyncio.ensure_future(stream.readline())
    await asyncio.sleep(0)
    assert not reading.done()  # a partial line is not a line yet
    stream.push(b"first\nsecond")
    assert await asyncio.wait_for(reading, LIMIT) == "first\n"
    stream.close()
    assert [await stream.readline() for _ in range(3)] == ["second", "", ""]


async def test_a_cut_long_line_is_searched_without_a_newline_at_the_cut() -> None:
    stream = LineStream()
    stream.push(b"x" * (LineStream.MAX_LINE - 2) + b"abcd\n")
    match = await stream.expect("abcd\n")  # spans the cut at MAX_LINE
    assert match.start() == LineStream.MAX_LINE - 2
    assert stream.held == 0


async def test_a_full_buffer_without_a_match_is_consumed_so_the_writer_goes_on() -> None:
    stream = LineStream(max_bytes=LineStream.LINE_COST * 4)
    writer = asyncio.ensure_future(stream.put(b"y\n" * 1000 + b"END"))
    match = await asyncio.wait_for(stream.expect("END"), LIMIT)
    await asyncio.wait_for(writer, LIMIT)
    assert (match.group(), stream.held) == ("END", 0)


async def test_a_console_that_keeps_nothing_refuses_expect() -> None:
    with pytest.raises(RuntimeError, match="capture"):
        await LineStream(maxlen=0).expect("x")


@pytest.fixture
async def sup() -> AsyncIterator[Supervisor]:
    async with Supervisor() as s:
        yield s


async def test_guest_expect_and_readline_on_a_real_guest(sup: Supervisor) -> None:
    guest = await sup.launch(GuestConfig(image=GUESTS / "echo.img", memory="1M"))
    guest.send("prompt> ")  # echo writes back what it reads: a line with no newline
    match = await guest.expect(r"(\w+)> $", timeout=LIMIT)
    assert match.group(1) == "prompt"
    guest.send("hello\nquit\n")
    async with asyncio.timeout(LIMIT):
        assert await guest.console.readline() == "hello\n"
        assert [line async for line in guest.console] == ["quit", "bye"]
    assert (await guest.wait()).exit_status == 0


async def test_guest_expect_names_the_guest_and_how_it_ended(sup: Supervisor) -> None:
    guest = await sup.launch(GuestConfig(image=GUESTS / "hello.img", memory="1M", name="greeter"))
    with pytest.raises(ConsoleEnded, match=r"greeter ended: power off; .*'never'") as info:
        await guest.expect("never", timeout=LIMIT)
    assert info.value.output == "Hello from an lguest guest!\n"


def test_the_names_users_look_for_are_exported_without_importing_ray() -> None:
    program = (
        "import sys\n"
        "from supervisor import ConfigError, ConsoleEnded, ImageError, Snapshot, StateError\n"
        "from supervisor import SnapshotError\n"
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
        "assert issubclass(ConsoleEnded, EOFError)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
