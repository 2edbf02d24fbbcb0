"""The pytest plugin (entry point pytest11 "lguest"): a suite using only its fixtures
passes under pytest-asyncio in strict mode and in auto mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import sdk

SUITE = Path(__file__).resolve().parent / "plugin_suite" / "suite_guests.py"


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
