from __future__ import annotations

import asyncio
import math
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import uvloop

sys.path.insert(0, str(Path(__file__).parent))

import realprograms

from supervisor import LguestDevice, engines, execute, run

SOAK = "soak"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        help="also run the tests marked soak (longer variants of default tests)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(realprograms.Plugin(), "lguest-real-programs")
    # A run started in the background of a non-interactive shell (``pytest &``, nohup)
    # inherits SIGINT ignored, and so would every command a test starts, which then
    # could not be interrupted as the tests of Ctrl-C expect.  A handler, unlike an
    # ignore, is reset by exec: the commands start with SIGINT's default again.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs under the default loop and under uvloop: where the loop
    matters (the run loop, slicing, wakes, signals, the network), both must hold.

    Tests marked ``one_loop`` run under the default loop only: those whose subject is not
    the event loop (what a guest, the C runtime, a file format or a check does: the
    supervisor has no code of its own for either loop) and costly set-ups (Ray workers).
    """
    if item.get_closest_marker("one_loop") is not None:
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``soak`` (a longer sweep or soak of what a default test shows with
    less) are deselected unless ``--soak`` is given: the default run stays short, and
    ``--soak -m soak`` runs only them.

    Under ``LGUEST_ENGINE_SWITCH=always`` every slice runs on an engine switched from
    another CPU: tests marked ``own_engines`` check what that mode replaces (inline
    slices and busy runs on warm engines)."""
    if not config.getoption("--soak"):
        soak = [item for item in items if item.get_closest_marker(SOAK) is not None]
        if soak:
            config.hook.pytest_deselected(items=soak)
            items[:] = [item for item in items if item.get_closest_marker(SOAK) is None]
    if engines.mode_from_env() != "always":
        return
    skip = pytest.mark.skip(reason="LGUEST_ENGINE_SWITCH=always: engines come from the pool")
    for item in items:
        if item.get_closest_marker("own_engines") is not None:
            item.add_marker(skip)


@pytest.fixture
def whole_inline_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices on the event loop run until the guest stops by itself (a notify the read
    returns, a halt, its end): no yield (``run.YIELD_TIME``) and no time bound (the
    inline slices' LONG_INLINE_TIME and INLINE_TIME of CPU, which a loaded machine can
    use up: a process's first translations beside CPU-bound processes take about 0.9 ms
    of CPU, or its thread is preempted past the slicer's wall-clock bound of 50 times
    that; the slice then ends with BUDGET and the guest goes on on a worker).  For tests
    that count what a read does in one turn of the loop, whatever the load."""
    monkeypatch.setattr(run, "YIELD_TIME", math.inf)
    minute = 60 * 10**9  # ns of CPU time: never reached by a slice that ends by itself
    monkeypatch.setattr(execute, "_INLINE_NS", minute)
    monkeypatch.setattr(execute, "_LONG_INLINE_NS", minute)


@pytest.fixture
async def dev() -> AsyncIterator[LguestDevice]:
    device = LguestDevice()
    try:
        yield device
    finally:
        await device.aclose()
