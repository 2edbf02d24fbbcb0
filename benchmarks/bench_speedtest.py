"""SQLite's ``speedtest1`` in a guest, against the same image on a bare Unicorn.

``speedtest1.c`` is in SQLite's source tree (``test/speedtest1.c``), which no package
CI reaches carries: the figure takes it from the path in ``$LGUEST_SPEEDTEST1`` (the
file of the release matching the amalgamation, 3.50.4) and is skipped with one line
without it.  The amalgamation (``sqlite3.c``, ``sqlite3.h``) comes from the
``sqlean-py`` sdist that tests/realprograms.py downloads, pinned and cached there.
Both are built once with ``supervisor build -O2`` (the defines of the real-program
proof, plus R-Tree, which speedtest1's default test mix uses, and temporary files kept
in memory, since the raw runner serves no files) and the image is cached
beside the proofs' programs, keyed by what went into it.

Supervised: ``Supervisor.launch`` to ``Guest.wait``.  Raw: the same image booted on a
bare Unicorn by :class:`benchmarks.raw_sdk.RawSdkGuest`, one ``emu_start`` from the
entry point to power-off, on a thread niced as the device's workers are; the SDK
runtime inside the image serves the program's system calls the same way in both runs.
Each side is timed by the wall clock and by the
process's CPU time (every thread's: the supervised run's workers and event loop
included); the ratio is the supervised CPU time over the raw one, round by round
(the machine is shared: CPU time is what a neighbour's load changes least), and both
runs must print the same test names.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

from supervisor import GuestConfig, Supervisor, _slicing, sdk
from supervisor.cpu import DEFAULT_TCG_BUFFER
from supervisor.launcher.launcher import translation_buffer
from supervisor.launcher.loader import read_image
from supervisor.slicepool import DEFAULT_NICE

from .harness import Profile, Result, cpu_seconds, median, now
from .raw_sdk import RawSdkGuest

SOURCE_ENV = "LGUEST_SPEEDTEST1"
RAM = 64 << 20
GOAL = 1.2  # supervised time over raw, at most
# R-Tree for speedtest1's default mix; temporary files (VACUUM's, large sorts') in memory,
# since the raw runner serves no files.
EXTRA_DEFINES = ("-DSQLITE_ENABLE_RTREE", "-DSQLITE_TEMP_STORE=3")
# speedtest1's default mix ("mix1") without "app", which reopens its database file and so
# cannot run on :memory:.
TESTSET = "main,orm/25,cte/20,json/20,fp/3,parsenumber/25,rtree/10,star"
_TESTS = Path(__file__).resolve().parent.parent / "tests"


def realprograms() -> ModuleType:
    """tests/realprograms.py: the pinned sdists, their cache and their download."""
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))
    return importlib.import_module("realprograms")


def source() -> Path | None:
    """``$LGUEST_SPEEDTEST1`` if it names a file; None if unset.  ValueError if it is
    set to something that is not a file."""
    given = os.environ.get(SOURCE_ENV)
    if not given:
        return None
    path = Path(given)
    if not path.is_file():
        raise ValueError(f"{SOURCE_ENV}={given}: not a file")
    return path


def build(speedtest1: Path) -> Path:
    """The guest image of ``speedtest1`` with the sqlean-py amalgamation, built once."""
    rp = realprograms()
    cache: Path = rp.cache_root()
    tarball = rp.fetch(rp.SQLEAN, cache)
    tc = sdk.find_toolchain()
    defines = (*rp.SQLITE_DEFINES, *EXTRA_DEFINES)
    key = sdk.content_key(
        rp.SQLEAN.sha256, hashlib.sha256(speedtest1.read_bytes()).hexdigest(),
        f"{tc.kind} {tc.version}", rp.GUEST_OPT, *defines,
    )  # fmt: skip
    image = cache / f"speedtest1-{key}" / "speedtest1.img"
    if image.exists():
        return image
    with tempfile.TemporaryDirectory(prefix="lguest-speedtest1-", dir=cache) as tmp:
        src = rp.extract(tarball, rp.SQLEAN, "sqlite", Path(tmp) / "sqlite")
        shutil.copyfile(speedtest1, src / "speedtest1.c")
        options = sdk.BuildOptions(
            optimize=rp.GUEST_OPT.removeprefix("-O"),
            include_dirs=[str(src)],
            defines=[d.removeprefix("-D") for d in defines],
        )
        out = Path(tmp) / "speedtest1.img"
        sdk.build([src / "sqlite3.c", src / "speedtest1.c"], out, options)
        image.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, image)
    return image


def test_names(output: str) -> list[str]:
    """The test lines' number and name (``" 100 - 2500 INSERTs ..."``), without times."""
    return [line.rsplit(" ", 1)[0].rstrip(". ") for line in output.splitlines() if " - " in line]


def _nice_thread() -> None:
    """Run this thread as far below the caller as the device's workers run (their
    default ``worker_nice``): on a loaded machine both sides then get the same share."""
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + DEFAULT_NICE)


def run_raw(image: Path, cmdline: str) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stdout) of one raw run, on a thread niced as the
    supervised run's workers are."""
    with ThreadPoolExecutor(1, initializer=_nice_thread) as worker:
        return worker.submit(_run_raw, image, cmdline).result()


def _run_raw(image: Path, cmdline: str) -> tuple[float, float, str]:
    # the buffer a Launcher gives this image's CPUs: the same translations on both sides
    tcg = translation_buffer(read_image(image), DEFAULT_TCG_BUFFER)
    guest = RawSdkGuest(image, RAM, cmdline, tcg_buffer=tcg, block_exits=_slicing.EXIT_REQUEST)
    try:
        c0 = cpu_seconds()
        got = guest.run()
        cpu = cpu_seconds() - c0
    finally:
        guest.close()
    assert got.status == 0, (got.status, got.stderr)
    return got.seconds, cpu, got.stdout.decode()


async def run_supervised(sup: Supervisor, image: Path, cmdline: str) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, stdout) of one supervised run."""
    c0, t0 = cpu_seconds(), now()
    guest = await sup.launch(GuestConfig(image=image, memory=RAM, cmdline=cmdline))
    lines = [line async for line in guest.console]
    exit_ = await guest.wait()
    wall, cpu = now() - t0, cpu_seconds() - c0
    assert exit_.ok, exit_
    return wall, cpu, "\n".join(lines)


async def speedtest1(p: Profile) -> list[Result]:
    given = source()
    if given is None:
        print(
            f"  c_speedtest1: skipped: set {SOURCE_ENV} to SQLite 3.50.4's test/speedtest1.c "
            "(it is in SQLite's source tree, not in any package this project installs)",
            flush=True,
        )
        return []
    try:
        image = build(given)
    except realprograms().Unreachable as exc:
        print(f"  c_speedtest1: skipped: {exc}", flush=True)
        return []
    size = 2 if p.name == "quick" else 10
    cmdline = f"--size {size} --testset {TESTSET} :memory:"
    rounds = max(1, p.pairs // 2) if p.name == "quick" else p.pairs
    raw_wall: list[float] = []
    raw_cpu: list[float] = []
    sup_wall: list[float] = []
    sup_cpu: list[float] = []
    names: list[str] = []
    async with Supervisor() as sup:
        for k in range(rounds):  # A/B then B/A, so a drift of the machine hits both alike
            for side in ("raw", "sup") if k % 2 == 0 else ("sup", "raw"):
                if side == "raw":
                    wall, cpu, out = run_raw(image, cmdline)
                    raw_wall.append(wall)
                    raw_cpu.append(cpu)
                else:
                    wall, cpu, out = await run_supervised(sup, image, cmdline)
                    sup_wall.append(wall)
                    sup_cpu.append(cpu)
                got = test_names(out)
                assert got and "TOTAL" in out, out[-2000:]
                assert not names or got == names, (got, names)
                names = got
    ratios = [s / r for s, r in zip(sup_cpu, raw_cpu, strict=True)]
    extra: dict[str, Any] = {
        "cmdline": cmdline,
        "tests": len(names),
        "raw_wall": raw_wall,
        "raw_cpu": raw_cpu,
        "sup_wall": sup_wall,
        "sup_cpu": sup_cpu,
        "cpu_ratios": ratios,
        "wall_ratios": [s / r for s, r in zip(sup_wall, raw_wall, strict=True)],
    }
    return [
        Result(
            "c_speedtest1",
            f"SQLite speedtest1 --size {size} (mix1 but app, :memory:)",
            "s CPU",
            min(sup_cpu),
            min(raw_cpu),
            median(ratios),
            GOAL,
            "ratio",
            "lower",
            f"median of {rounds} paired rounds of process CPU time; raw: the same image on a "
            "bare Unicorn (benchmarks/raw_sdk.py)",
            extra,
        )
    ]
