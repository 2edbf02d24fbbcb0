"""The pytest plugin (entry point pytest11 "lguest"): a suite using only its fixtures
passes under pytest-asyncio in strict mode and in auto mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import sdk

SUITE = Path(__file__).resolve().parent / "plugin_suite" / "suite_guests.py"
# The inner suites that need no isolation from this process (no blocked import, no
# cache of their own) run in it: pytester.runpytest_inprocess, no interpreter start.
# Their files' names are none of this suite's modules' (tests/test_net.py is imported
# already in a whole run, and an inner test_net.py would not be collected).
pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pytest cache for both runs: the second finds the first's images."""
    return tmp_path_factory.mktemp("plugin-cache")


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_fixture_only_suite_passes(mode: str, tmp_path: Path, shared_cache: Path) -> None:
    try:
        sdk.find_toolchain("zig")  # the suite's C guest uses the C library
    except sdk.ToolchainError as exc:
        pytest.skip(str(exc))
    if shutil.which("as") is None:
        pytest.skip("the asm case needs GNU binutils")
    shutil.copy(SUITE, tmp_path / "test_suite.py")
    (tmp_path / "pytest.ini").write_text(
        f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"
        f"cache_dir = {shared_cache}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 passed" in done.stdout


def test_the_plugin_is_registered() -> None:
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert names.get("lguest") == "supervisor.pytest_plugin"


def test_without_pytest_asyncio_the_async_fixtures_skip_and_say_why(tmp_path: Path) -> None:
    blocker = tmp_path / "blocked" / "pytest_asyncio"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('not installed')\n")
    (tmp_path / "test_x.py").write_text(
        "def test_uses_it(lguest_supervisor):\n    raise AssertionError('not reached')\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:asyncio", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "blocked")},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout
    assert "need pytest-asyncio" in done.stdout


DETERMINISTIC_SUITE = """
import pytest
from supervisor import GuestConfig

TICKER = {ticker!r}


@pytest.mark.asyncio
@pytest.mark.lguest_deterministic(seed=1234)
async def test_marked_with_a_seed(lguest_supervisor):
    assert lguest_supervisor.seed == 1234
    guest = await lguest_supervisor.launch(
        GuestConfig.build(image=TICKER, cmdline="ticks=1 period_ms=1000")
    )
    assert (await guest.wait()).exit_status == 0
    assert lguest_supervisor.device.virtual.now_ns >= 1_000_000_000  # slept virtual time
    assert False, "fails on purpose"


@pytest.mark.asyncio
@pytest.mark.lguest_deterministic
async def test_seed_from_the_option(lguest_device):
    assert lguest_device.seed == 77
    assert False, "fails on purpose"


@pytest.mark.asyncio
async def test_not_deterministic(lguest_supervisor):
    assert lguest_supervisor.seed is None
    assert False, "fails on purpose"
"""


def test_a_failing_deterministic_test_prints_its_seed(pytester: pytest.Pytester) -> None:
    """The marker makes the fixtures deterministic (its seed, else --lguest-seed); each
    failing deterministic test's report names its seed, and a plain test's does not."""
    ticker = str(Path(__file__).resolve().parent.parent / "guests" / "ticker.img")
    pytester.makepyfile(test_inner_seeded=DETERMINISTIC_SUITE.format(ticker=ticker))
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    done = pytester.runpytest_inprocess(
        "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "--lguest-seed", "77"
    )
    out = done.stdout.str()
    done.assert_outcomes(failed=3)
    assert out.count("fails on purpose") >= 3  # each failed where it meant to
    assert "seed 1234: reproduce it with --lguest-seed 1234" in out
    assert "lguest_deterministic(seed=1234)" in out
    assert "seed 77: reproduce it with --lguest-seed 77" in out
    assert out.count(": reproduce it with --lguest-seed") == 2


NETWORKED_SUITE = """
import json
import pytest
from supervisor import GuestConfig

SERVER = {server!r}
CLIENT = {client!r}
OUT = {out!r}


async def scenario(sup, name):
    assert sup.seed == 11 and sup.net.clock is sup.device.virtual
    guests = [await sup.launch(GuestConfig.build(image=SERVER, name="srv", cmdline="7 3"))]
    guests += [
        await sup.launch(GuestConfig.build(image=CLIENT, name=f"c{{i}}", cmdline=f"srv 7 hi {{i}}"))
        for i in range(3)
    ]
    for i in range(3):
        sup.net.link("srv", f"c{{i}}", delay=0.001, jitter=0.05)
    lines = []
    for guest in guests:
        assert (await guest.wait()).exit_status == 0
    for guest in guests:
        lines += [f"{{guest.name}}: {{line}}" async for line in guest.console]
    with open(f"{{OUT}}.{{name}}", "a") as f:
        f.write(json.dumps([lines, sup.device.virtual.now_ns, sup.net.random.random()]) + "\\n")


@pytest.mark.asyncio
@pytest.mark.lguest_deterministic
async def test_default_network(lguest_net_supervisor):
    await scenario(lguest_net_supervisor, "default")


@pytest.mark.asyncio
@pytest.mark.lguest_deterministic
@pytest.mark.lguest_network(stream_timeout=30)
async def test_network_with_options(lguest_net_supervisor):
    assert lguest_net_supervisor.net.stream_timeout == 30
    await scenario(lguest_net_supervisor, "options")
"""


def test_a_deterministic_networked_test_gives_the_same_transcript_twice(
    pytester: pytest.Pytester,
) -> None:
    """Under lguest_deterministic, lguest_net_supervisor's network (with or without
    lguest_network options) draws its jitter from the test's seed and times it on
    the virtual clock: two runs of the suite write the same transcripts, virtual
    times and next draws."""
    guests = Path(__file__).resolve().parent.parent / "guests" / "c"
    out = str(pytester.path / "transcript")
    pytester.makepyfile(
        test_inner_networked=NETWORKED_SUITE.format(
            server=str(guests / "tcp_echo_server.elf"),
            client=str(guests / "tcp_echo_client.elf"),
            out=out,
        )
    )
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    for _ in range(2):
        done = pytester.runpytest_inprocess(
            "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "--lguest-seed", "11"
        )
        assert done.ret == 0, done.stdout.str() + done.stderr.str()
        done.assert_outcomes(passed=2)
    for name in ("default", "options"):
        first, second = Path(f"{out}.{name}").read_text().splitlines()
        assert first == second
        lines, now_ns, _draw = json.loads(first)
        assert lines[0] == "srv: listening on 7"
        assert sorted(lines[-3:]) == [f"c{i}: hi {i}" for i in range(3)]
        assert now_ns > 0
