"""The working directory must name a directory the guest has (``GuestConfig.workdir``,
``--workdir``): ``/``, ``/tmp``, a granted directory, a path beneath one, or one above a
grant; anything else is a ``ConfigError`` (one line, exit 2 in the CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import cli

from supervisor import GuestConfig
from supervisor.config import ConfigError, DirGrant

HELLO = Path(__file__).resolve().parent.parent / "guests" / "c" / "hello.elf"


@pytest.mark.parametrize(
    ("workdir", "granted"),
    [
        ("/", None),
        ("/tmp", None),
        ("/tmp/", None),
        ("/data", "/data"),
        ("/data/in/deeper", "/data"),
        ("/a", "/a/b"),  # above a grant: a directory holding only the way to it
        ("/data/../tmp", None),
        ("/anything", "/"),
    ],
)
def test_a_workdir_the_guest_has_is_accepted(
    workdir: str, granted: str | None, tmp_path: Path
) -> None:
    dirs = [] if granted is None else [DirGrant(host=tmp_path, guest=granted)]
    assert GuestConfig(image=HELLO, workdir=workdir, dirs=dirs).workdir == workdir


@pytest.mark.parametrize(
    ("workdir", "granted"),
    [("/nowhere", None), ("/tmp/sub", None), ("/dat", "/data"), ("/data2", "/data")],
)
def test_a_workdir_in_no_granted_directory_is_refused(
    workdir: str, granted: str | None, tmp_path: Path
) -> None:
    dirs = [] if granted is None else [DirGrant(host=tmp_path, guest=granted)]
    with pytest.raises(ConfigError, match=f"workdir {workdir!r} is in no granted directory"):
        GuestConfig(image=HELLO, workdir=workdir, dirs=dirs)


def test_run_with_a_workdir_in_no_granted_directory_is_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    proc = cli("run", str(HELLO), "--workdir", "/nowhere")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("supervisor: error: ") and "'/nowhere'" in proc.stderr
    proc = cli("run", str(HELLO), "--dir", f"{tmp_path}::/data", "--workdir", "/data")
    assert proc.returncode == 0, proc.stderr
