"""The CLI's debugging and snapshot commands, as a user runs them (real processes, real gdb)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from guestasm import present
from test_cli import cli

from supervisor import GuestConfig
from supervisor.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
GDB = shutil.which("gdb")


@pytest.mark.skipif(GDB is None, reason="gdb is not installed")
def test_run_with_gdb_breaks_steps_sets_a_register_and_continues_to_the_exit() -> None:
    sup = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", "guests/ticker.img", "--memory", "1M",
         "--cmdline", "ticks=2 period_ms=1", "--gdb", "127.0.0.1:0"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert sup.stderr is not None
        banner = sup.stderr.readline()  # printed once the server listens
        match = re.fullmatch(r"supervisor: gdb server on (\S+):(\d+)\n", banner)
        assert match, banner
        gdb = subprocess.run(
            [present(GDB), "-batch", "-nx",
             "-ex", "set architecture i386",
             "-ex", f"target remote {match[1]}:{match[2]}",
             "-ex", "break *0x10001",
             "-ex", "continue",
             "-ex", "stepi",
             "-ex", "info registers eip",
             "-ex", "set $edi = 0x1234",
             "-ex", "info registers edi",
             "-ex", "delete",
             "-ex", "continue"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        out, _err = sup.communicate(timeout=30)
    finally:
        sup.kill()
    assert "Breakpoint 1, 0x00010001 in ?? ()" in gdb.stdout, gdb.stdout + gdb.stderr
    assert re.search(r"eip\s+0x1000[2-9a-f]", gdb.stdout)  # one instruction past the break
    assert re.search(r"edi\s+0x1234", gdb.stdout)
    assert "exited normally" in gdb.stdout
    assert (sup.returncode, out) == (0, "tick 1\ntick 2\ndone\n")


def test_snapshot_then_run_restore_continues_the_ticker(tmp_path: Path) -> None:
    snap = tmp_path / "ticker.snap"
    args = ["guests/ticker.img", "--memory", "1M", "--cmdline", "ticks=5 period_ms=20"]
    taken = cli("snapshot", *args, "-o", str(snap), "--after-lines", "2")
    assert taken.returncode == 0, taken.stderr
    assert taken.stdout == "tick 1\ntick 2\n"
    assert f"saved to {snap}" in taken.stderr
    for _ in range(2):  # the same file restores any number of times
        restored = cli("run", "--restore", str(snap))
        assert (restored.returncode, restored.stdout) == (0, "tick 3\ntick 4\ntick 5\ndone\n")


def test_bad_snapshot_file_and_gdb_address_are_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"LGSNAP\r\n" + bytes(50))
    proc = cli("run", "--restore", str(bad))
    assert proc.returncode == 2
    assert "supervisor: error:" in proc.stderr and "bad.snap" in proc.stderr
    proc = cli("run", "guests/hello.img", "--gdb", "nowhere")
    assert proc.returncode == 2 and "gdb" in proc.stderr
    with pytest.raises(ConfigError, match="gdb"):
        GuestConfig.build(image=ROOT / "guests" / "hello.img", gdb="host:99999")
