"""zlib, unmodified, in C guests: its own test/example.c, and minigzip compressing
and decompressing a 10 MB file under --dir, byte-identical to a native build.

zlib's sources are not part of this repository.  Get them with

    git clone --depth 1 https://github.com/madler/zlib tests/third_party/zlib

or point ``LGUEST_ZLIB_SRC`` at a checkout; without them these tests skip and say
so.  The native build needs a host C compiler (``cc``).  Both builds are cached
in pytest's cache directory, keyed by the sources and the guest runtime.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import sdk

HERE = Path(__file__).resolve().parent
ZLIB = Path(os.environ.get("LGUEST_ZLIB_SRC", HERE / "third_party" / "zlib"))
LIBRARY = [
    "adler32.c", "compress.c", "crc32.c", "deflate.c", "gzclose.c", "gzlib.c", "gzread.c",
    "gzwrite.c", "infback.c", "inffast.c", "inflate.c", "inftrees.c", "trees.c", "uncompr.c",
    "zutil.c",
]  # fmt: skip
DEFINES = ["-DZ_HAVE_UNISTD_H"]  # what zlib's configure puts in zconf.h on any Unix
LIMIT = 900  # seconds: a bound for failing; a loaded 2-core machine needs minutes


def _sources(program: str) -> list[Path]:
    if not (ZLIB / "zlib.h").is_file():
        pytest.skip(
            f"zlib's sources are absent ({ZLIB}): git clone --depth 1 "
            "https://github.com/madler/zlib tests/third_party/zlib, or set LGUEST_ZLIB_SRC"
        )
    return [ZLIB / name for name in LIBRARY] + [ZLIB / "test" / program]


@pytest.fixture
def zlib_builds(pytestconfig: pytest.Config) -> dict[str, tuple[Path, Path]]:
    """{program: (guest image, native executable)} for example.c and minigzip.c."""
    try:
        toolchain = sdk.find_toolchain("zig")
    except sdk.ToolchainError as exc:
        pytest.skip(str(exc))
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("the native comparison needs a host C compiler (cc)")
    cache = Path(pytestconfig.cache.mkdir("lguest-zlib")) if pytestconfig.cache else HERE
    built = {}
    for program in ("example.c", "minigzip.c"):
        sources = _sources(program)
        key = sdk.content_key(program, *DEFINES, *(p.read_bytes() for p in sources))
        guest, native = cache / f"{key}.elf", cache / f"{key}.native"
        if not guest.exists():
            options = sdk.BuildOptions(optimize="2", include_dirs=[str(ZLIB)], extra_cflags=DEFINES)
            sdk.build(sources, guest, options, toolchain)
        if not native.exists():
            subprocess.run(
                [cc, "-O2", *DEFINES, f"-I{ZLIB}", *map(str, sources), "-o", str(native)],
                check=True,
            )
        built[program] = (guest, native)
    return built


def _guest(image: Path, where: Path, cmdline: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "run", str(image), "--memory", "16M",
         "--dir", f"{where}::/w", "--workdir", "/w", "--cmdline", cmdline],
        capture_output=True, text=True, timeout=LIMIT,
    )  # fmt: skip


def test_zlib_example_passes_in_a_guest(
    zlib_builds: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    guest_image, native = zlib_builds["example.c"]
    (tmp_path / "native").mkdir()
    (tmp_path / "guest").mkdir()
    want = subprocess.run([native], cwd=tmp_path / "native", capture_output=True, text=True)
    got = _guest(guest_image, tmp_path / "guest", "")
    assert got.returncode == want.returncode == 0, got.stderr

    def comparable(out: str) -> list[str]:  # the flags say 32 or 64 bits: they differ
        return [line.split(", compile flags")[0] for line in out.splitlines()]

    assert comparable(got.stdout) == comparable(want.stdout)
    assert "large_inflate(): OK" in got.stdout
    assert (tmp_path / "guest" / "foo.gz").read_bytes() == (
        tmp_path / "native" / "foo.gz"
    ).read_bytes()


@pytest.mark.slow
def test_minigzip_compresses_10_mb_like_native(
    zlib_builds: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    guest_image, native = zlib_builds["minigzip.c"]
    rng = random.Random(23)
    words = [bytes(rng.choices(b"etaoinshrdlucmfw", k=rng.randint(2, 8))) for _ in range(300)]
    lines = []
    size = 0
    while size < 10 << 20:
        line = b" ".join(rng.choices(words, k=12)) + b"\n"
        lines.append(line)
        size += len(line)
    original = b"".join(lines)[: 10 << 20]
    for side in ("native", "guest"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "big").write_bytes(original)
    subprocess.run([native, "big"], cwd=tmp_path / "native", check=True)
    done = _guest(guest_image, tmp_path / "guest", "big")
    assert done.returncode == 0, done.stderr
    compressed = (tmp_path / "guest" / "big.gz").read_bytes()
    assert compressed == (tmp_path / "native" / "big.gz").read_bytes()
    assert not (tmp_path / "guest" / "big").exists()  # minigzip unlinks what it compressed
    done = _guest(guest_image, tmp_path / "guest", "-d big.gz")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "guest" / "big").read_bytes() == original
    assert not (tmp_path / "guest" / "big.gz").exists()
