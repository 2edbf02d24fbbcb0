"""Build C guests: a toolchain that installs with pip, the guest runtime, ``lguest.h``.

``build(["prog.c"], "prog.elf")`` compiles C (and ``.S``) sources for 32-bit x86
and links them with the guest runtime (``runtime/crt0.S``, ``runtime/runtime.c``:
boot, lguest.h's helpers, the system calls musl makes) and musl libc into an
ELF32 image the Launcher loads (``guest.ld``: everything at 0x10000, a stack of
``__lguest_stack_size`` bytes after .bss, the heap from ``_end`` to the boot
info's ``free_end``).

The toolchain is Zig's C compiler from PyPI (``pip install 'lguest-supervisor[sdk]'``
or ``pip install ziglang``), which ships musl's sources and builds libc for the
target the first time it is needed (about a minute, cached afterwards in Zig's
global cache).  Without it every build fails with :class:`ToolchainError`
saying what to install.

Outputs are deterministic: the same sources, flags and toolchain version give
byte-identical images (no build id, no time stamps, no absolute paths unless
``debug=True``, whose DWARF names the source directory).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .elfstrip import strip_debug

SDK_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = SDK_DIR / "include"
RUNTIME_SOURCES = ("runtime/crt0.S", "runtime/runtime.c")
LINKER_SCRIPT = SDK_DIR / "guest.ld"
TARGET = ["-target", "x86-linux-musl", "-mcpu=i686"]
# i686 without SSE: the Host does not set CR4.OSFXSR, and x87 is enough for C's doubles.
COMMON_CFLAGS = [
    "-static",
    "-fno-pic",
    "-fno-pie",
    "-fno-sanitize=all",
    "-fno-stack-protector",
    "-ffunction-sections",
    "-fdata-sections",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
]
# The libc is built (and cached) for the link's optimization mode: always the same one.
LINK_FLAGS = [
    "-static",
    "-O2",
    "-Wl,--build-id=none",
    "-Wl,--gc-sections",
    "-Wl,-z,norelro",
    "-Wl,-e,_lguest_start",
    f"-Wl,-T,{LINKER_SCRIPT}",
]
INSTALL_HINT = (
    "no C toolchain for guests: install Zig's C compiler with "
    "`pip install 'lguest-supervisor[sdk]'` (or `pip install ziglang`)"
)
_NAME_OK = re.compile(r"[^A-Za-z0-9._+-]")


class ToolchainError(RuntimeError):
    """No usable C toolchain: the message says what to install."""


class BuildError(RuntimeError):
    """Compiling or linking failed: the message holds the compiler's output."""


@dataclass(frozen=True)
class Toolchain:
    """How to run the C compiler: ``cc + TARGET + flags``."""

    cc: tuple[str, ...]
    version: str

    def run(self, args: Sequence[str], cwd: Path) -> None:
        cmd = [*self.cc, *args]
        env = dict(os.environ, LC_ALL="C", SOURCE_DATE_EPOCH="0")
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).strip()
            raise BuildError(f"{' '.join(cmd)}\n{output}")


def find_toolchain() -> Toolchain:
    """Zig's C compiler (the ``ziglang`` package, or ``zig`` on PATH).

    Raises :class:`ToolchainError` naming the package to install when there is none.
    """
    if importlib.util.find_spec("ziglang") is not None:
        cc: tuple[str, ...] = (sys.executable, "-m", "ziglang")
    elif shutil.which("zig"):
        cc = ("zig",)
    else:
        raise ToolchainError(INSTALL_HINT)
    proc = subprocess.run([*cc, "version"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolchainError(f"{INSTALL_HINT}; `{' '.join(cc)} version` failed: {proc.stderr}")
    return Toolchain((*cc, "cc"), proc.stdout.strip())


@dataclass
class BuildOptions:
    """What ``supervisor build`` accepts besides the sources and the output."""

    optimize: str | None = None  # "0", "1", "2", "3", "s", "z"
    debug: bool = False
    include_dirs: list[str] = field(default_factory=list)
    defines: list[str] = field(default_factory=list)  # NAME or NAME=VALUE
    warnings: list[str] = field(default_factory=list)  # the part after -W
    stack_size: int | None = None  # bytes; default 64 KiB
    extra_cflags: list[str] = field(default_factory=list)  # passed to the compiler as they are

    def cflags(self) -> list[str]:
        flags = [f"-O{self.optimize}"] if self.optimize is not None else []
        if self.debug:
            flags.append("-g")
        flags += [f"-I{os.path.abspath(d)}" for d in self.include_dirs]
        flags += [f"-D{d}" for d in self.defines]
        flags += [f"-W{w}" for w in self.warnings]
        return flags + self.extra_cflags


def build(
    sources: Sequence[str | Path],
    output: str | Path,
    options: BuildOptions | None = None,
    toolchain: Toolchain | None = None,
) -> Path:
    """Compile ``sources`` (``.c``, ``.S``, ``.s``) and link a guest image at ``output``.

    argv[0] of the guest is ``output``'s name without its suffix.  Raises
    :class:`ToolchainError`, :class:`BuildError`, or ``FileNotFoundError`` for a
    missing source.
    """
    opts = options or BuildOptions()
    tc = toolchain or find_toolchain()
    srcs = [Path(s).resolve() for s in sources]
    if not srcs:
        raise BuildError("no sources to build")
    for src in srcs:
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such source file")
        if src.suffix not in (".c", ".S", ".s"):
            raise BuildError(f"{src}: not a C or assembly source (.c, .S, .s)")
    out = Path(output).resolve()
    name = _NAME_OK.sub("_", out.name.split(".")[0]) or "guest"
    user_flags = [*TARGET, *COMMON_CFLAGS, f"-I{INCLUDE_DIR}", *opts.cflags()]
    runtime_flags = [*TARGET, *COMMON_CFLAGS, "-Iinclude", "-O2", "-Wall"]
    if opts.debug:
        runtime_flags.append("-g")
    with tempfile.TemporaryDirectory(prefix="lguest-build-") as tmp:
        work = Path(tmp)
        objects: list[str] = []
        for i, rel in enumerate(RUNTIME_SOURCES):
            obj = work / f"rt{i}.o"
            tc.run([*runtime_flags, "-c", rel, "-o", str(obj)], cwd=SDK_DIR)
            objects.append(str(obj))
        (work / "progname.c").write_text(
            f'const char __lguest_progname[] = "{name}";\n', encoding="ascii"
        )
        tc.run([*TARGET, *COMMON_CFLAGS, "-c", "progname.c", "-o", "progname.o"], cwd=work)
        objects.append(str(work / "progname.o"))
        for i, src in enumerate(srcs):
            obj = work / f"u{i}-{src.stem}.o"
            # From the source's directory with a relative name: the only path the
            # object records (STT_FILE) is the file name.
            tc.run([*user_flags, "-c", src.name, "-o", str(obj)], cwd=src.parent)
            objects.append(str(obj))
        link = [*TARGET, *LINK_FLAGS]
        if opts.stack_size is not None:
            link.append(f"-Wl,--defsym,__lguest_stack_size={opts.stack_size}")
        tmp_out = work / "guest.elf"
        tc.run([*link, *objects, "-o", str(tmp_out)], cwd=work)
        image = tmp_out.read_bytes()
        if not opts.debug:
            image = strip_debug(image)  # Zig's -s would drop the symbols too
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(image)
    return out


def content_key(*parts: str | bytes) -> str:
    """A short hash naming a build by what went into it (for caches)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    for rel in (*RUNTIME_SOURCES, "include/lguest.h", "guest.ld"):
        h.update((SDK_DIR / rel).read_bytes())
    return h.hexdigest()[:20]
