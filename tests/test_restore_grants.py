"""What a restored snapshot gets is its restorer's to grant: the network (``net``) and
room for its open files (``max_files``), never what the snapshot's config says.

The file guest is tests/c/fsprobe.c (as in test_files.py); the network guest is the
committed tcp_echo_server.  Needs the ``sdk`` extra (Zig's C compiler) for fsprobe.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_cli import cli

from supervisor import GuestConfig, Supervisor
from supervisor.cli import build_parser, restore_overrides
from supervisor.config import DirGrant
from supervisor.launcher import files
from supervisor.pytest_plugin import BuildGuest
from supervisor.snapshot import Snapshot, SnapshotError

# The subject is what a restore grants, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

HERE = Path(__file__).resolve().parent
LIMIT = 60  # seconds: a bound for failing, never a wait for success


@pytest.fixture
def fsprobe(build_guest: BuildGuest) -> Path:
    return build_guest((HERE / "c" / "fsprobe.c").read_text(), flags=("-O2",))


def member_names(sup: Supervisor) -> set[str]:
    return {m.name for m in sup.net.members}


async def test_a_restored_snapshot_joins_the_network_only_if_its_restorer_says_so() -> None:
    image = HERE.parent / "guests" / "c" / "tcp_echo_server.elf"
    config = GuestConfig(image=image, name="saved", cmdline="7 1", memory="4M", net=True)
    async with Supervisor() as sup:
        original = await sup.launch(config)
        await original.expect("listening on 7", LIMIT)
        snap = await asyncio.wait_for(original.snapshot(), LIMIT)
        await original.kill("snapshot taken")
        await asyncio.wait_for(original.wait(), LIMIT)

        alone = await sup.restore(snap, name="alone")
        assert not alone.config.net
        assert "alone" not in member_names(sup)
        joined = await sup.restore(snap, name="joined", net=True)
        assert joined.config.net
        assert "joined" in member_names(sup)
        # A cluster's worker restores a moved guest with the fields its config names.
        cluster = pytest.importorskip("supervisor.cluster")
        moved = await sup.restore(snap, **{**cluster.revive_fields(config), "name": "moved"})
        assert moved.config.net
        assert "moved" in member_names(sup)
        for guest in (alone, joined, moved):
            await guest.kill("done")


def test_run_restore_takes_net_from_the_command_line() -> None:
    parser = build_parser()
    assert restore_overrides(parser.parse_args(["run", "--restore", "f", "--net"]))["net"] is True
    assert restore_overrides(parser.parse_args(["run", "--restore", "f"]))["net"] is None


async def snapshot_with_open_files(fsprobe: Path, where: Path, count: int) -> Snapshot:
    """A snapshot of an fsprobe guest holding ``count`` open descriptors of ``/d/f``."""
    (where / "f").write_bytes(b"data")
    async with Supervisor() as sup, asyncio.timeout(LIMIT):
        g = await sup.launch(
            GuestConfig(image=fsprobe, memory="4M", dirs=[DirGrant(host=where, guest="/d")])
        )
        opens = ["open /d/f r"] * count
        g.send("".join(c + "\n" for c in opens))
        got = [await anext(aiter(g.console)) for _ in opens]
        assert got == [f"ok {files.FIRST_FD + i}" for i in range(count)]
        await g.pause()
        snap = await g.snapshot()
        await g.kill("snapshot taken")
        return snap


async def test_a_snapshot_holding_more_files_than_max_files_is_refused(
    fsprobe: Path, tmp_path: Path
) -> None:
    snap = await snapshot_with_open_files(fsprobe, tmp_path, 3)
    dirs = [DirGrant(host=tmp_path, guest="/d")]
    async with Supervisor() as sup, asyncio.timeout(LIMIT):
        with pytest.raises(SnapshotError, match="3 open files, more than max_files 2"):
            await sup.restore(snap, dirs=dirs, max_files=2)
        fits = await sup.restore(snap, dirs=dirs, max_files=3)
        fits.send("read 5 4\n")
        fits.send_eof()
        assert [line async for line in fits.console] == ["ok 4 data"]
        assert (await fits.wait()).ok

    saved = tmp_path / "three.snap"
    snap.save(saved)
    proc = cli("run", "--restore", str(saved), "--dir", f"{tmp_path}::/d", "--max-files", "2")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("supervisor: error: cannot restore ")
    assert "more than max_files 2" in proc.stderr


def test_the_file_device_refuses_a_state_with_more_descriptors_than_max_files() -> None:
    stale = {"grant": files.TMP_GRANT, "path": "", "flags": 0, "dir": False,
             "offset": 0, "position": 0, "stale": True}  # fmt: skip
    fds = [[files.FIRST_FD + i, 0, False] for i in range(3)]
    state = {"cwd": "/", "grants": [], "descriptions": [stale], "fds": fds}
    files.FilesDevice(max_files=3).restore(state)
    with pytest.raises(ValueError, match="more than max_files 2"):
        files.FilesDevice(max_files=2).restore(state)
