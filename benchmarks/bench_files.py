"""Reading a file through ``--dir``: 64 KiB ``read`` calls and stdio ``fgets``.

A C guest (benchmarks/c/readfile.c, built with ``supervisor build``) reads a
file of 80-byte text lines granted with ``dirs``; the time is from its "start"
line to its result line.  Raw: the host reading the same file in the same run,
``os.read`` of 64 KiB blocks, and line by line from a buffered binary file (the
host's own ``fgets``).  Both sums of the last byte of every read must match.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from supervisor import GuestConfig, Supervisor, sdk
from supervisor.config import DirGrant

from .harness import Profile, Result, now

SOURCE = Path(__file__).resolve().parent / "c" / "readfile.c"
LINE = 80


def _make_file(path: Path, size: int) -> None:
    line = bytes(range(48, 48 + LINE - 1)) + b"\n"
    block = line * ((1 << 20) // LINE)
    with path.open("wb") as f:
        written = 0
        while written < size:
            f.write(block)
            written += len(block)


def _host_read(path: Path) -> tuple[float, int, int]:
    fd = os.open(path, os.O_RDONLY)
    t0, total, checksum = now(), 0, 0
    try:
        while chunk := os.read(fd, 1 << 16):
            total += len(chunk)
            checksum += chunk[-1]
    finally:
        os.close(fd)
    return now() - t0, total, checksum & 0xFFFFFFFF


def _host_lines(path: Path) -> tuple[float, int, int]:
    t0, total, checksum = now(), 0, 0
    with path.open("rb") as f:
        for line in f:
            total += len(line)
            checksum += line[-1]
    return now() - t0, total, checksum & 0xFFFFFFFF


async def _guest_read(sup: Supervisor, image: Path, where: Path, mode: str) -> tuple[float, str]:
    config = GuestConfig(
        image=image,
        memory="4M",
        cmdline=f"{mode} /bench/data",
        dirs=[DirGrant(host=where, guest="/bench", read_only=True)],
    )
    guest = await sup.launch(config)
    lines = aiter(guest.console)
    assert await anext(lines) == "start"
    t0 = now()
    result = await anext(lines)
    t = now() - t0
    assert (await guest.wait()).ok
    return t, result


async def file_read(p: Profile) -> list[Result]:
    size = 100 << 20 if p.name == "full" else 20 << 20
    results = []
    with tempfile.TemporaryDirectory(prefix="lguest-bench-files-") as tmp:
        where = Path(tmp)
        image = where / "readfile.elf"
        sdk.build([SOURCE], image, sdk.BuildOptions(optimize="2"))
        data = where / "data"
        _make_file(data, size)
        size = data.stat().st_size
        async with Supervisor() as sup:
            for mode, host, goal in (("read", _host_read, 500.0), ("fgets", _host_lines, 50.0)):
                guest_times, host_times = [], []
                for _ in range(max(1, p.reps // 2)):
                    t, line = await _guest_read(sup, image, where, mode)
                    h, total, checksum = host(data)
                    assert line == f"bytes {total} sum {checksum}", (line, total, checksum)
                    guest_times.append(t)
                    host_times.append(h)
                mb = size / 1e6
                value, raw = mb / min(guest_times), mb / min(host_times)
                results.append(
                    Result(
                        f"file_{mode}",
                        f"reading {mb:.0f} MB through --dir with "
                        + ("64 KiB read()" if mode == "read" else "stdio fgets"),
                        "MB/s",
                        value,
                        raw,
                        value / raw,
                        goal,
                        "value",
                        "higher",
                        f"best of {len(guest_times)}; raw: the host reading the same file "
                        + ("(os.read, 64 KiB)" if mode == "read" else "(line by line)"),
                        {"guest_times": guest_times, "host_times": host_times, "bytes": size},
                    )
                )
    return results
