"""Files for C guests: --dir grants, the file device, escapes, limits, leaks, snapshots.

The guest is tests/c/fsprobe.c (a command interpreter over musl's file calls,
built once and cached); each test feeds it commands on stdin and reads one
answer per command.  Needs the ``sdk`` extra (Zig's C compiler).
"""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from guestasm import open_descriptors
from refused import refused_here
from slotrequests import Requests, slot_at_1m

from supervisor import Exit, GuestConfig, Supervisor, cli
from supervisor.config import ConfigError, DirGrant
from supervisor.launcher import files
from supervisor.memory import GuestMemory
from supervisor.pytest_plugin import BuildGuest
from supervisor.testing import until

# The subject is the file device's answers to a C guest, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

HERE = Path(__file__).resolve().parent
LIMIT = 60  # seconds: a bound for failing, never a wait for success


@pytest.fixture
def fsprobe(build_guest: BuildGuest) -> Path:
    return build_guest((HERE / "c" / "fsprobe.c").read_text(), flags=("-O2",))


@pytest.fixture(params=["openat2", "fallback"])
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of resolving paths beneath a grant: openat2, and component by component."""
    if request.param == "openat2":
        if not files.have_openat2():
            pytest.skip("this host's kernel has no openat2")
    else:
        monkeypatch.setattr(files, "_openat2_works", False)
    return str(request.param)


@pytest.fixture
def host_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the guests' private /tmp directories are made (watched by the tests)."""
    where = tmp_path / "host-tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


async def run_probe(image: Path, commands: list[str], **config: Any) -> tuple[list[str], Exit]:
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=image, memory="4M", **config))
        guest.send("".join(c + "\n" for c in commands))
        guest.send_eof()
        async with asyncio.timeout(LIMIT):
            lines = [line async for line in guest.console]
            return lines, await guest.wait()


def _entries(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir())


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def grant(host: Path, guest: str = "/data", read_only: bool = False) -> DirGrant:
    return DirGrant(host=host, guest=guest, read_only=read_only)


# -- round trips ---------------------------------------------------------------------------
async def test_stdio_and_posix_round_trips(fsprobe: Path, tmp_path: Path, resolution: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "given.txt").write_text("hello from the host\n")
    lines, result = await run_probe(
        fsprobe,
        [
            "cwd",
            "put /data/lines.txt 1000",  # fopen/fprintf/fclose
            "cat /data/lines.txt",  # fopen/fgets
            "open /data/given.txt r",  # fd 3
            "read 3 5",
            "read 3 1",
            "seek 3 -3 2",
            "read 3 100",
            "pread 3 4 6",
            "dup 3",  # 4: shares the offset
            "seek 4 0 0",
            "read 3 5",
            "dup2 3 9",
            "getfl 9",
            "cloexec 9",
            "isatty 3",
            "fstat 3",
            "close 3",
            "read 3 1",
            "read 4 6",
            "open /data/new.bin bct",  # fd 3 again: the lowest free
            "write 3 abcdef",
            "pwrite 3 XY 2",
            "writev 3 gh ij",
            "trunc 3 4",
            "fsync 3",
            "seek 3 0 0",
            "read 3 100",
            "mkdir /data/sub",
            "mkdir /data/sub",
            "rename /data/new.bin /data/sub/moved.bin",
            "ls /data/sub",
            "stat /data/sub",
            "cd /data/sub",
            "cwd",
            "stat moved.bin",
            "access moved.bin rw",
            "access nothing r",
            "rmdir /data/sub",
            "unlink moved.bin",
            "cd ..",
            "rmdir sub",
            "ls /data",
            "open /data d",
            "open /data/given.txt w",
            "getfl 6",
            "open /data/given.txt rd",
            "open /data wc",
            "read 1 1",
        ],
        dirs=[grant(data)],
    )
    assert lines == [
        "ok /",
        "ok",
        "ok 1000 lines",
        "ok 3",
        "ok 5 hello",
        "ok 1  ",
        "ok 17",
        "ok 3 st",  # "st\n": the newline ends the console line
        "",
        "ok 4 from",
        "ok 4",
        "ok 0",
        "ok 5 hello",  # dup'ed descriptors share the offset
        "ok 9",
        "ok 0",
        "ok 1",
        "err ENOTTY",
        "ok file 20",
        "ok",
        "err EBADF",
        "ok 6  from ",
        "ok 3",
        "ok 6",
        "ok 2",
        "ok 4",
        "ok",
        "ok",
        "ok 0",
        "ok 4 abXY",
        "ok",
        "err EEXIST",
        "ok",
        "ok moved.bin (3)",
        "ok dir",
        "ok",
        "ok /data/sub",
        "ok file 4",
        "ok",
        "err ENOENT",
        "err ENOTEMPTY",
        "ok",
        "ok",
        "ok",
        "ok given.txt lines.txt (4)",
        "ok 5",
        "ok 6",
        "ok 1",
        "err ENOTDIR",
        "err EISDIR",
        "err EBADF",
    ]
    assert result == Exit(0, "power off", 0, died=False)
    assert (data / "lines.txt").read_text() == "".join(f"line {i}\n" for i in range(1000))
    assert (data / "given.txt").read_text() == "hello from the host\n"
    assert sorted(p.name for p in data.iterdir()) == ["given.txt", "lines.txt"]


async def test_console_input_beyond_the_runtime_buffer_arrives_whole(fsprobe: Path) -> None:
    """Input queued faster than the guest reads it (more than the runtime's 1 KiB
    buffer) is delivered in order, none of it written over a chunk being read."""
    commands = [f"cwd {'x' * 60} {i}" for i in range(40)]
    lines, result = await run_probe(fsprobe, commands)
    assert lines == ["ok /"] * 40 and result.ok


# -- escapes ---------------------------------------------------------------------------------
@pytest.fixture
def jail(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A granted directory with symlinks out of it, and a sentinel file outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    sentinel = outside / "sentinel"
    sentinel.write_text("do not touch\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "inside.txt").write_text("inside\n")
    (data / "sub").mkdir()
    os.symlink(sentinel, data / "abs-link")  # absolute, outside
    os.symlink("../outside/sentinel", data / "rel-link")  # relative, climbs out
    os.symlink("../outside", data / "dir-link")  # a directory outside
    os.symlink("inside.txt", data / "good-link")  # stays inside
    os.symlink("../inside.txt", data / "sub" / "up-link")  # climbs, but stays inside
    os.symlink("/proc/self/environ", data / "proc-link")
    os.mkfifo(data / "fifo")
    yield data, sentinel
    assert sentinel.read_text() == "do not touch\n"
    assert sorted(p.name for p in outside.iterdir()) == ["sentinel"]


async def test_escape_attempts_get_guest_errors(
    fsprobe: Path, jail: tuple[Path, Path], resolution: str
) -> None:
    data, sentinel = jail
    beneath = resolution == "openat2"  # the fallback follows no symlink at all
    attempts = {
        f"open {sentinel} r": "err ENOENT",  # a host path is no guest path
        "open /data/../outside/sentinel r": "err ENOENT",
        "open ../../../../outside/sentinel r": "err ENOENT",
        "open /data/abs-link r": "err EXDEV" if beneath else "err ELOOP",
        "open /data/rel-link r": "err EXDEV" if beneath else "err ELOOP",
        "open /data/rel-link bct": "err EXDEV" if beneath else "err ELOOP",
        "open /data/dir-link/sentinel r": "err EXDEV" if beneath else "err ENOTDIR",
        "open /data/dir-link/new bc": "err EXDEV" if beneath else "err ENOTDIR",
        "open /data/proc-link r": "err EXDEV" if beneath else "err ELOOP",
        "stat /data/abs-link": "err EXDEV" if beneath else "err ELOOP",
        "stat /data/dir-link/sentinel": "err EXDEV" if beneath else "err ENOTDIR",
        "lstat /data/abs-link": "ok link",
        "readlink /data/rel-link": "ok ../outside/sentinel",
        "access /data/rel-link r": "err EXDEV" if beneath else "err ELOOP",
        "unlink /data/dir-link/sentinel": "err EXDEV" if beneath else "err ENOTDIR",
        "rename /data/inside.txt /data/dir-link/stolen": "err EXDEV" if beneath else "err ENOTDIR",
        "rename /data/dir-link/sentinel /data/mine": "err EXDEV" if beneath else "err ENOTDIR",
        "mkdir /data/dir-link/newdir": "err EXDEV" if beneath else "err ENOTDIR",
        "ls /data/dir-link": "err EXDEV" if beneath else "err ELOOP",
        "stat /data/good-link": "ok file 7" if beneath else "err ELOOP",
        "cd /data/dir-link": "err EXDEV" if beneath else "err ELOOP",
        f"link /data/inside.txt {sentinel}": "err ENOSYS",
        f"link {sentinel} /data/hard": "err ENOSYS",
        f"symlink {sentinel} /data/new-link": "err ENOSYS",
        "open /data/fifo r": "err EACCES",  # never opened for I/O: would block, or worse
        "open /data/fifo w": "err EACCES",
        "open /proc/self/environ r": "err ENOENT",
        "open /dev/null w": "err ENOENT",
        "open /etc/passwd r": "err ENOENT",
        "ls /": "err ENOENT",
        "open /data/good-link r": "ok 3" if beneath else "err ELOOP",
        "open /data/sub/up-link r": "ok 4" if beneath else "err ELOOP",
    }
    lines, result = await run_probe(fsprobe, list(attempts), dirs=[grant(data)])
    assert dict(zip(attempts, lines, strict=True)) == attempts
    assert result.ok
    assert sorted(p.name for p in data.iterdir()) == [
        "abs-link", "dir-link", "fifo", "good-link", "inside.txt", "proc-link", "rel-link", "sub"
    ]  # fmt: skip


async def test_device_files_are_refused(fsprobe: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    try:
        os.mknod(data / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs privileges this test does not have")
    lines, _ = await run_probe(
        fsprobe, ["open /data/null w", "open /data/null r", "stat /data/null"], dirs=[grant(data)]
    )
    assert lines == ["err EACCES", "err EACCES", "ok chr"]


async def test_read_only_grants_refuse_every_change(fsprobe: Path, tmp_path: Path) -> None:
    data = tmp_path / "ro"
    data.mkdir()
    (data / "f.txt").write_text("12345\n")
    (data / "d").mkdir()
    before = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    commands = {
        "cat /ro/f.txt": "ok 1 lines",
        "open /ro/f.txt r": "ok 3",
        "write 3 x": "err EBADF",
        "trunc 3 0": "err EROFS",
        "open /ro/f.txt w": "err EROFS",
        "open /ro/f.txt b": "err EROFS",
        "open /ro/new.txt wc": "err EROFS",
        "open /ro/f.txt rt": "err EROFS",
        "unlink /ro/f.txt": "err EROFS",
        "rmdir /ro/d": "err EROFS",
        "mkdir /ro/e": "err EROFS",
        "rename /ro/f.txt /ro/g.txt": "err EROFS",
        "access /ro/f.txt w": "err EROFS",
        "access /ro/f.txt r": "ok",
        "put /ro/out.txt 3": "err EROFS",
        "put /rw/out.txt 3": "ok",
        "rename /ro/f.txt /rw/f.txt": "err EROFS",
        "rename /rw/out.txt /rw/out2.txt": "ok",
    }
    rw = tmp_path / "rw"
    rw.mkdir()
    lines, _ = await run_probe(
        fsprobe, list(commands), dirs=[grant(data, "/ro", read_only=True), grant(rw, "/rw")]
    )
    assert dict(zip(commands, lines, strict=True)) == commands
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == before
    assert (data / "f.txt").read_text() == "12345\n"
    assert [p.name for p in rw.iterdir()] == ["out2.txt"]


async def test_renames_across_grants_are_exdev(fsprobe: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("x")
    lines, _ = await run_probe(fsprobe, ["rename /a/f /b/f"], dirs=[grant(a, "/a"), grant(b, "/b")])
    assert lines == ["err EXDEV"]
    assert (a / "f").exists() and not (b / "f").exists()


# -- /tmp and the working directory -----------------------------------------------------------
async def test_tmp_is_private_and_removed_at_the_end(fsprobe: Path, host_tmp: Path) -> None:
    async with Supervisor() as sup:
        config = GuestConfig(image=fsprobe, memory="4M")
        one, two = await sup.launch(config), await sup.launch(config)
        one.send("put /tmp/mine 2\nls /tmp\n")
        two.send("ls /tmp\nput /tmp/other 1\nls /tmp\n")
        async with asyncio.timeout(LIMIT):
            got_one = [await anext(aiter(one.console)) for _ in range(2)]
            got_two = [await anext(aiter(two.console)) for _ in range(3)]
            assert got_one == ["ok", "ok mine (3)"]
            assert got_two == ["ok (2)", "ok", "ok other (3)"]
            assert len(_entries(host_tmp)) == 2  # one host directory per guest
            one.send_eof()
            two.send_eof()
            assert (await one.wait()).ok and (await two.wait()).ok
    assert _entries(host_tmp) == []  # emptied and removed


async def test_a_guest_that_never_uses_tmp_makes_no_directory(
    fsprobe: Path, host_tmp: Path
) -> None:
    lines, result = await run_probe(fsprobe, ["cwd"])
    assert lines == ["ok /"] and result.ok
    assert _entries(host_tmp) == []


async def test_a_dir_mapped_on_tmp_replaces_the_private_one(
    fsprobe: Path, tmp_path: Path, host_tmp: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    lines, _ = await run_probe(fsprobe, ["put /tmp/kept 1"], dirs=[grant(shared, "/tmp")])
    assert lines == ["ok"]
    assert (shared / "kept").read_text() == "line 0\n"
    assert _entries(host_tmp) == []


async def test_workdir_sets_where_relative_paths_start(fsprobe: Path, tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "here.txt").write_text("a\nb\n")
    lines, _ = await run_probe(
        fsprobe,
        ["cwd", "cat here.txt", "cd /", "cwd", "cat here.txt", "cd /nowhere"],
        dirs=[grant(tmp_path / "w", "/work/w")],
        workdir="/work/w",
    )
    assert lines == ["ok /work/w", "ok 2 lines", "ok", "ok /", "err ENOENT", "err ENOENT"]


# -- limits and leaks ---------------------------------------------------------------------------
async def test_opening_without_end_gets_emfile_at_max_files(fsprobe: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    lines, _ = await run_probe(
        fsprobe, ["openmany /d/f", "open /d/f r", "close 3", "open /d/f r"],
        dirs=[grant(tmp_path, "/d")], max_files=40,
    )  # fmt: skip
    assert lines == ["opened 40, then err EMFILE", "err EMFILE", "ok", "ok 3"]
    default, _ = await run_probe(fsprobe, ["openmany /d/f"], dirs=[grant(tmp_path, "/d")])
    assert default == ["opened 1024, then err EMFILE"]


async def test_host_descriptors_return_to_baseline_after_many_guests(
    fsprobe: Path, tmp_path: Path, host_tmp: Path
) -> None:
    (tmp_path / "f").write_text("some data\n")
    config = GuestConfig(image=fsprobe, memory="2M", dirs=[grant(tmp_path, "/d")])
    guests = 60  # three batches: each way to end (exit, kill) thirty times
    async with Supervisor() as sup:
        # One guest first: the thread pool and anything else made once exist from now on.
        (await sup.launch(config)).send_eof()
        await asyncio.sleep(0)
        for g in list(sup.guests):
            await g.wait()
        baseline = open_descriptors()
        for _batch in range(guests // 20):
            launched = []
            for i in range(20):
                g = await sup.launch(config)
                g.send("open /d/f r\nopen /d/f r\nput /tmp/t 3\nopen /tmp/t r\nopen /d/new bc\n")
                if i % 2:
                    g.send("exit 3\n")  # ends with its files open
                launched.append(g)
            async with asyncio.timeout(LIMIT):
                for i, g in enumerate(launched):
                    lines = [await anext(aiter(g.console)) for _ in range(5)]
                    assert lines[0] == "ok 3"
                    if i % 2:
                        assert (await g.wait()).exit_status == 3
                    else:
                        await g.kill("killed with open files")
        assert open_descriptors() == baseline
    assert (tmp_path / "new").exists()
    assert _entries(host_tmp) == []  # every private /tmp removed, killed or not


async def test_a_guest_killed_mid_write_leaves_whole_writes(fsprobe: Path, tmp_path: Path) -> None:
    record = 4096
    async with Supervisor() as sup:
        g = await sup.launch(GuestConfig(image=fsprobe, memory="4M", dirs=[grant(tmp_path, "/d")]))
        g.send("records /d/out\n")
        target = tmp_path / "out"
        async with asyncio.timeout(LIMIT):
            assert await anext(aiter(g.console)) == "ok writing"
            await until(lambda: _size(target) >= 50 * record, timeout=LIMIT)
            await g.kill("mid-write")
    data = target.read_bytes()
    assert len(data) % record == 0 and len(data) >= 50 * record
    for i in range(len(data) // record):
        chunk = data[i * record : (i + 1) * record]
        assert chunk[:9] == b"%08u\n" % i
        assert chunk[16:] == bytes([ord("a") + i % 26]) * (record - 16)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["--dir", "--ro-dir"])
def test_a_dir_that_is_missing_or_a_file_is_one_line_and_status_2(
    option: str, tmp_path: Path
) -> None:
    image = str(HERE.parent / "guests" / "c" / "hello.elf")
    afile = tmp_path / "file"
    afile.write_text("x")
    for spec, why in [
        (str(tmp_path / "missing"), "no such directory"),
        (f"{afile}::/x", "not a directory"),
        (f"{tmp_path}::relative", "is not absolute"),
    ]:
        for command in (["run", image], ["swarm", "-n", "2", image]):
            done = refused_here(*command, option, spec)
            assert done.returncode == 2, done.stderr
            assert done.stderr.count("\n") == 1 and done.stderr.startswith("supervisor: error: ")
            assert why in done.stderr and done.stdout == ""


def test_dir_options_reach_the_config(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(
        ["run", "x.img", "--dir", str(tmp_path), "--ro-dir", f"{tmp_path}::/ro",
         "--workdir", "/ro", "--max-files", "7"]
    )  # fmt: skip
    fields = cli.files_fields(args)
    assert fields["dirs"] == [
        DirGrant(host=tmp_path, guest=str(tmp_path)),
        DirGrant(host=tmp_path, guest="/ro", read_only=True),
    ]
    assert (fields["workdir"], fields["max_files"]) == ("/ro", 7)
    with pytest.raises(ConfigError, match="workdir"):
        GuestConfig(image=HERE.parent / "guests" / "c" / "hello.elf", workdir="rel")


def test_two_grants_at_one_guest_path_are_refused(tmp_path: Path) -> None:
    """The longest-prefix match would serve only the first: the second is refused, not
    silently shadowed (``/a`` and ``/a/`` are one guest path)."""
    image = HERE.parent / "guests" / "c" / "hello.elf"
    (tmp_path / "b").mkdir()
    with pytest.raises(ConfigError, match="both granted at /a"):
        GuestConfig(
            image=image,
            dirs=[DirGrant(host=tmp_path, guest="/a"),
                  DirGrant(host=tmp_path / "b", guest="/a/", read_only=True)],
        )  # fmt: skip
    done = refused_here(
        "run", str(image), "--dir", f"{tmp_path}::/a", "--ro-dir", f"{tmp_path}::/a"
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "both granted at /a" in done.stderr
    nested = [DirGrant(host=tmp_path, guest="/a"), DirGrant(host=tmp_path / "b", guest="/a/b")]
    config = GuestConfig(image=image, dirs=nested)
    assert len(config.dirs) == 2


async def test_malformed_requests_kill_and_bad_arguments_are_errors(tmp_path: Path) -> None:
    memory = GuestMemory((1 << 20) + 4096)
    dev = files.FilesDevice([files.Grant(tmp_path, "/d")])
    await dev.start()
    try:
        slot = slot_at_1m(memory)
        dev.attach(slot)
        assert slot.get(files.FS_MAX_IO) == files.MAX_IO
        request = Requests(dev, slot)

        memory.write(0x1000, b"/d/x")
        fd = await request(files.OP_OPENAT, files.AT_FDCWD & 0xFFFFFFFF, 0x1000, 4, 0o102, 0o644)
        assert fd == 3
        assert await request(files.OP_WRITE, 3, 0x2000, 10) == 10
        assert await request(files.OP_READ, 7, 0x2000, 10) == -9  # EBADF
        assert await request(files.OP_WRITE, 3, (1 << 20) - 4, 10) == -14  # EFAULT
        assert await request(files.OP_OPENAT, 3, 0xFFFFFF00, 4, 0, 0) == -14
        memory.write(0x1000, b"/d/\0x")
        assert await request(files.OP_OPENAT, 3, 0x1000, 5, 0, 0) == -22  # EINVAL
        for op, args, why in [
            (99, (), "unknown file request 99"),
            (files.OP_READ, (0x2000, files.MAX_IO + 1), "transfer of"),
            (files.OP_GETDENTS64, (0x2000, files.MAX_IO + 1), "transfer of"),
            (files.OP_OPENAT, (0x1000, files.PATH_MAX + 1, 0, 0), "path of"),
        ]:
            with pytest.raises(files.FileRequestError, match=why):
                await request(op, 3, *args)
        assert (tmp_path / "x").read_bytes() == bytes(10)
    finally:
        await dev.stop()
        memory.close()
    assert dev.open_files == 0


async def test_requests_from_two_cpus_at_once_are_served_one_after_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile SMP guest NOTIFYs a close while its write is on a worker thread: the
    close waits, so the thread never writes to a host descriptor closed (and perhaps
    reused) under it."""
    import threading

    entered, release = threading.Event(), threading.Event()
    real_write = files._write

    def slow_write(fd: int, view: memoryview, offset: int | None) -> int:
        entered.set()
        release.wait()
        return real_write(fd, view, offset)

    monkeypatch.setattr(files, "_write", slow_write)
    memory = GuestMemory((1 << 20) + 4096)
    dev = files.FilesDevice([files.Grant(tmp_path, "/d")])
    await dev.start()
    try:
        slot = slot_at_1m(memory)
        dev.attach(slot)

        def put(op: int, fd: int, *args: int) -> None:
            slot.set(files.FS_OP, op)
            slot.set(files.FS_FD, fd)
            for i, value in enumerate([*args, 0, 0, 0, 0, 0, 0, 0][:7]):
                slot.set(files.FS_A0 + 4 * i, value)

        memory.write(0x1000, b"/d/x")
        put(files.OP_OPENAT, files.AT_FDCWD & 0xFFFFFFFF, 0x1000, 4, 0o102, 0o644)
        await dev.notify(slot)
        assert slot.get(files.FS_RESULT) == 3
        memory.write(0x2000, b"0123456789")
        put(files.OP_WRITE, 3, 0x2000, 10)
        writing = asyncio.create_task(dev.notify(slot))
        await asyncio.to_thread(entered.wait)  # the write has read its request
        put(files.OP_CLOSE, 3)
        closing = asyncio.create_task(dev.notify(slot))
        for _ in range(20):  # loop turns: a close that did not wait would be done
            await asyncio.sleep(0)
        closed_during_write = closing.done()
        release.set()
        await asyncio.gather(writing, closing)
        assert not closed_during_write
        assert (tmp_path / "x").read_bytes() == b"0123456789"
        assert dev.open_files == 0
    finally:
        release.set()
        await dev.stop()
        memory.close()


async def test_an_open_cancelled_on_its_thread_closes_what_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest is killed while its open runs on a worker thread: the request waits for
    the thread, then closes the host descriptor it made (nobody else will)."""
    import threading

    entered, release = threading.Event(), threading.Event()
    opened: list[int] = []
    real_open = files.FilesDevice._open_file

    def slow_open(
        self: files.FilesDevice, base: int, rel: str, flags: int, mode: int
    ) -> tuple[int, bool]:
        entered.set()
        release.wait()
        result = real_open(self, base, rel, flags, mode)
        opened.append(result[0])
        return result

    monkeypatch.setattr(files.FilesDevice, "_open_file", slow_open)
    (tmp_path / "x").write_bytes(b"x")
    memory = GuestMemory((1 << 20) + 4096)
    dev = files.FilesDevice([files.Grant(tmp_path, "/d")])
    await dev.start()
    try:
        slot = slot_at_1m(memory)
        dev.attach(slot)
        memory.write(0x1000, b"/d/x")
        slot.set(files.FS_OP, files.OP_OPENAT)
        slot.set(files.FS_FD, files.AT_FDCWD & 0xFFFFFFFF)
        for i, value in enumerate([0x1000, 4, 0, 0, 0, 0, 0]):
            slot.set(files.FS_A0 + 4 * i, value)
        opening = asyncio.create_task(dev.notify(slot))
        await asyncio.to_thread(entered.wait)
        opening.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await opening
        assert len(opened) == 1 and dev.open_files == 0
        with pytest.raises(OSError):  # closed (not reused: nothing opened since)
            os.fstat(opened[0])
    finally:
        release.set()
        await dev.stop()
        memory.close()


# -- snapshots ------------------------------------------------------------------------------------
async def test_a_restored_guest_reopens_its_files_through_its_own_grants(
    fsprobe: Path, tmp_path: Path
) -> None:
    from supervisor.snapshot import SnapshotError

    first, second = tmp_path / "first", tmp_path / "second"
    for where, tag in ((first, b"A"), (second, b"B")):
        (where / "sub").mkdir(parents=True)
        (where / "f").write_bytes(b"0123456789" * 3 + tag)
    async with Supervisor() as sup, asyncio.timeout(LIMIT):
        g = await sup.launch(GuestConfig(image=fsprobe, memory="4M", dirs=[grant(first, "/d")]))
        setup = ["open /d/f r", "read 3 4", "dup 3", "cd /d/sub", "put /tmp/t 1", "open /tmp/t r"]
        g.send("".join(c + "\n" for c in setup))
        got = [await anext(aiter(g.console)) for _ in setup]
        assert got == ["ok 3", "ok 4 0123", "ok 4", "ok", "ok", "ok 5"]
        await g.pause()
        snap = await g.snapshot()
        await g.kill("snapshot taken")

        with pytest.raises(SnapshotError, match="name the host directories"):
            await sup.restore(snap)
        copy = await sup.restore(snap, dirs=[grant(second, "/d")])
        copy.send("read 3 3\nread 4 30\ncwd\nread 5 1\nopen ../f r\nfgetfl 3\n")
        copy.send_eof()
        lines = [line async for line in copy.console]
        assert lines == [
            "ok 3 456",
            "ok 24 78901234567890123456789B",  # through the restoring guest's grant
            "ok /d/sub",
            "err ESTALE",  # the private /tmp's contents are not part of a snapshot
            "ok 6",
            "unknown fgetfl",
        ]
        assert (await copy.wait()).ok

        other = await sup.restore(snap, dirs=[grant(second, "/elsewhere")])
        result = await other.wait()
        assert result.died and "cannot resume" in result.reason and "/elsewhere" in result.reason


async def test_buffered_reads_leave_the_offset_where_the_guest_read_to(
    fsprobe: Path, tmp_path: Path
) -> None:
    """Small reads are served from a read-ahead buffer; the shared offset of a dup'ed
    descriptor still moves by exactly what was read, whatever call comes next."""
    (tmp_path / "f").write_bytes(b"abcdefghijklmnopqrstuvwxyz")
    lines, _ = await run_probe(
        fsprobe,
        ["open /d/f r", "dup 3", "read 3 2", "close 3", "read 4 3", "read 4 2", "seek 4 0 1",
         "open /d/f r", "read 3 1", "fstat 3", "read 3 1", "dup2 3 4", "read 4 1"],
        dirs=[grant(tmp_path, "/d")],
    )  # fmt: skip
    assert lines == [
        "ok 3", "ok 4", "ok 2 ab", "ok", "ok 3 cde", "ok 2 fg", "ok 7",
        "ok 3", "ok 1 a", "ok file 26", "ok 1 b", "ok 4", "ok 1 c",
    ]  # fmt: skip


async def test_a_directory_gone_before_launch_fails_it_and_leaks_nothing(
    fsprobe: Path, tmp_path: Path
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(4096))
    config = GuestConfig(image=fsprobe, memory="4M", block=disk, dirs=[grant(gone)])
    gone.rmdir()
    async with Supervisor() as sup:
        baseline = open_descriptors()
        with pytest.raises(FileNotFoundError):
            await sup.launch(config)
        assert open_descriptors() == baseline  # the block device's file is closed again
        assert sup.guests == []


KSTAT_GUEST = r"""
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static void show(const char *what, long r, const unsigned char *k)
{
    uint32_t mode, nlink;
    int64_t size;
    uint64_t ino;
    memcpy(&mode, k + 16, 4), memcpy(&nlink, k + 20, 4), memcpy(&size, k + 44, 8);
    memcpy(&ino, k + 88, 8);
    printf("%s %ld mode %o nlink %u size %lld ino %llu\n", what, r, mode, nlink,
           (long long)size, (unsigned long long)ino);
}

int main(void)
{
    unsigned char k[96];
    struct stat st;
    int fd = open("/d/f", O_RDONLY);
    stat("/d/f", &st);
    printf("statx 0 mode %o nlink %u size %lld ino %llu\n", (unsigned)st.st_mode,
           (unsigned)st.st_nlink, (long long)st.st_size, (unsigned long long)st.st_ino);
    show("fstat64", syscall(SYS_fstat64, fd, k), k);
    show("stat64", syscall(SYS_stat64, "/d/f", k), k);
    show("lstat64", syscall(SYS_lstat64, "/d/f", k), k);
    show("fstatat64", syscall(SYS_fstatat64, AT_FDCWD, "/d/f", k, 0), k);
    return 0;
}
"""


async def test_the_old_stat_calls_fill_the_kernels_struct_stat64(
    build_guest: BuildGuest, tmp_path: Path
) -> None:
    """musl asks statx; stat64, lstat64, fstat64 and fstatat64 give the same answers in
    the i386 kernel's 96-byte layout (what older libraries read)."""
    (tmp_path / "f").write_bytes(b"x" * 1234)
    st = (tmp_path / "f").stat()
    image = build_guest(KSTAT_GUEST)
    async with Supervisor() as sup:
        guest = await sup.launch(
            GuestConfig(image=image, memory="4M", dirs=[grant(tmp_path, "/d")])
        )
        async with asyncio.timeout(LIMIT):
            lines = [line async for line in guest.console]
    fields = f"mode {st.st_mode:o} nlink 1 size 1234 ino {st.st_ino}"
    assert lines == [f"{call} 0 {fields}" for call in ("statx", "fstat64", "stat64", "lstat64",
                                                      "fstatat64")]  # fmt: skip
