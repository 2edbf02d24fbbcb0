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
global cache).  Without Zig, a system gcc that builds 32-bit x86 code is the
fallback: it builds *freestanding* guests (``lguest.h``, the compiler's own
headers and the runtime's ``string.h``; no C library), since the system's
32-bit libc (glibc) needs a startup and link layout of its own.  With neither,
every build fails with :class:`ToolchainError` saying what to install.
``LGUEST_TOOLCHAIN=zig`` or ``=gcc`` picks one (default: Zig if present, else gcc).

Outputs are deterministic: the same sources, flags and toolchain version give
byte-identical images (no build id, no time stamps, no absolute paths unless
``debug=True``, whose DWARF names the source directory).
"""

from __future__ import annotations

import functools
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
FREESTANDING_SOURCES = ("runtime/freestanding.c",)  # gcc builds: musl's part of the runtime
FREESTANDING_DIR = SDK_DIR / "freestanding"
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
# The gcc fallback: i686 code like Zig's, no C library, the runtime's own string functions.
GCC_CFLAGS = [
    "-m32",
    "-march=i686",
    "-mno-sse",
    "-mfpmath=387",
    "-ffreestanding",
    "-nostdinc",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-ffunction-sections",
    "-fdata-sections",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
]
GCC_LINK_FLAGS = [
    "-m32",
    "-static",
    "-nostdlib",
    "-no-pie",
    "-Wl,--build-id=none",
    "-Wl,--gc-sections",
    "-Wl,-z,norelro",
    "-Wl,-z,noexecstack",
    "-Wl,-e,_lguest_start",
    f"-Wl,-T,{LINKER_SCRIPT}",
]
ZIG_HINT = (
    "install Zig's C compiler with `pip install 'lguest-supervisor[sdk]'` "
    "(or `pip install ziglang`)"
)
GCC_HINT = "a gcc that builds 32-bit x86 code (Debian: `apt-get install gcc gcc-multilib`)"
INSTALL_HINT = (
    f"no C toolchain for guests: {ZIG_HINT}; or, for freestanding guests only "
    f"(lguest.h, no C library), {GCC_HINT}"
)
FREESTANDING_HINT = (
    "this build used the gcc fallback, which has no C library (freestanding guests: "
    f"lguest.h and the compiler's own headers); for the C library, {ZIG_HINT}"
)
_NAME_OK = re.compile(r"[^A-Za-z0-9._+-]")


class ToolchainError(RuntimeError):
    """No usable C toolchain: the message says what to install."""


class BuildError(RuntimeError):
    """Compiling or linking failed: the message holds the compiler's output."""


@dataclass(frozen=True)
class Toolchain:
    """How to run the C compiler: ``cc + TARGET + flags`` (Zig) or ``cc + GCC_CFLAGS +
    flags`` (``kind == "gcc"``, freestanding)."""

    cc: tuple[str, ...]
    version: str
    kind: str = "zig"  # "zig" or "gcc"
    include: str = ""  # gcc: the compiler's own header directory (stddef.h, stdint.h...)
    libgcc: str | None = None  # gcc: its 32-bit libgcc.a, if installed (64-bit division...)

    @property
    def freestanding(self) -> bool:
        return self.kind == "gcc"

    def run(self, args: Sequence[str], cwd: Path) -> None:
        cmd = [*self.cc, *args]
        env = dict(os.environ, LC_ALL="C", SOURCE_DATE_EPOCH="0")
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            output = (proc.stdout + proc.stderr).strip()
            raise BuildError(f"{' '.join(cmd)}\n{output}")


def find_toolchain(kind: str | None = None) -> Toolchain:
    """Zig's C compiler (the ``ziglang`` package, or ``zig`` on PATH), else a system gcc
    that builds 32-bit x86 code (freestanding guests only).

    ``kind`` (or else ``$LGUEST_TOOLCHAIN``): ``"zig"`` or ``"gcc"`` to accept only
    that one, ``"auto"`` (the default) for the order above.  Raises
    :class:`ToolchainError` naming what to install when there is none.
    """
    kind = kind or os.environ.get("LGUEST_TOOLCHAIN") or "auto"
    if kind not in ("auto", "zig", "gcc"):
        raise ToolchainError(f"LGUEST_TOOLCHAIN must be zig, gcc or auto, not {kind!r}")
    if kind in ("auto", "zig"):
        zig = _zig_command()
        if zig is not None:
            proc = subprocess.run([*zig, "version"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise ToolchainError(
                    f"{INSTALL_HINT}; `{' '.join(zig)} version` failed: {proc.stderr}"
                )
            return Toolchain((*zig, "cc"), proc.stdout.strip())
        if kind == "zig":
            raise ToolchainError(f"no Zig C compiler: {ZIG_HINT}")
    gcc = shutil.which("gcc")
    found = None if gcc is None else _probe_gcc(gcc)
    if isinstance(found, Toolchain):
        return found
    why = "" if found is None else f" (gcc is installed but cannot build 32-bit code: {found})"
    if kind == "gcc":
        raise ToolchainError(f"no gcc fallback: install {GCC_HINT}{why}")
    raise ToolchainError(INSTALL_HINT + why)


def _zig_command() -> tuple[str, ...] | None:
    if importlib.util.find_spec("ziglang") is not None:
        return (sys.executable, "-m", "ziglang")
    if shutil.which("zig"):
        return ("zig",)
    return None


@functools.cache
def _probe_gcc(gcc: str) -> Toolchain | str:
    """A :class:`Toolchain` if ``gcc`` compiles and links a freestanding 32-bit program,
    else the reason it does not."""
    include = subprocess.run([gcc, "-print-file-name=include"], capture_output=True, text=True)
    version = subprocess.run([gcc, "-dumpfullversion"], capture_output=True, text=True)
    if include.returncode or version.returncode:
        return (include.stderr + version.stderr).strip() or "gcc does not run"
    libgcc: str | None = subprocess.run(
        [gcc, "-m32", "-print-libgcc-file-name"], capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="lguest-gcc-probe-") as tmp:
        (Path(tmp) / "probe.c").write_text(
            "long double probe(unsigned long long a, unsigned long long b) { return a % b; }\n"
        )
        cmd = [gcc, "-m32", "-ffreestanding", "-nostdlib", "-static", "-no-pie",
               "-Wl,-e,probe", "probe.c", "-o", "probe"]  # fmt: skip
        proc = subprocess.run([*cmd, "-Wl,--unresolved-symbols=ignore-all"], cwd=tmp,
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            return (proc.stdout + proc.stderr).strip().splitlines()[-1]
        # Its libgcc: only if it is the 32-bit one (without gcc-multilib it is not).
        with_libgcc = subprocess.run([*cmd, str(libgcc)], cwd=tmp, capture_output=True)
        if not libgcc or with_libgcc.returncode:
            libgcc = None
    return Toolchain(
        cc=(gcc,),
        version=f"gcc {version.stdout.strip()}",
        kind="gcc",
        include=include.stdout.strip(),
        libgcc=libgcc,
    )


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
    if tc.freestanding:
        target = [*GCC_CFLAGS, "-isystem", tc.include, "-isystem", str(FREESTANDING_DIR)]
        link_flags = GCC_LINK_FLAGS
        runtime_sources: tuple[str, ...] = (*RUNTIME_SOURCES, *FREESTANDING_SOURCES)
        libs = [tc.libgcc] if tc.libgcc else []
    else:
        target = [*TARGET, *COMMON_CFLAGS]
        link_flags = [*TARGET, *LINK_FLAGS]
        runtime_sources = RUNTIME_SOURCES
        libs = []
    user_flags = [*target, f"-I{INCLUDE_DIR}", *opts.cflags()]
    runtime_flags = [*target, "-Iinclude", "-O2", "-Wall"]
    if tc.freestanding:  # no loop of the runtime may become a call to the memcpy it defines
        runtime_flags += ["-fno-builtin", "-fno-tree-loop-distribute-patterns"]
    if opts.debug:
        runtime_flags.append("-g")
    try:
        return _build(
            tc, srcs, out, name, opts, target, user_flags, runtime_flags, runtime_sources,
            link_flags, libs,
        )  # fmt: skip
    except BuildError as exc:
        if tc.freestanding:
            raise BuildError(f"{exc}\n({FREESTANDING_HINT})") from None
        raise


def _build(
    tc: Toolchain,
    srcs: list[Path],
    out: Path,
    name: str,
    opts: BuildOptions,
    target: list[str],
    user_flags: list[str],
    runtime_flags: list[str],
    runtime_sources: tuple[str, ...],
    link_flags: list[str],
    libs: list[str],
) -> Path:
    with tempfile.TemporaryDirectory(prefix="lguest-build-") as tmp:
        work = Path(tmp)
        objects: list[str] = []
        for i, rel in enumerate(runtime_sources):
            obj = work / f"rt{i}.o"
            tc.run([*runtime_flags, "-c", rel, "-o", str(obj)], cwd=SDK_DIR)
            objects.append(str(obj))
        (work / "progname.c").write_text(
            f'const char __lguest_progname[] = "{name}";\n', encoding="ascii"
        )
        tc.run([*target, "-c", "progname.c", "-o", "progname.o"], cwd=work)
        objects.append(str(work / "progname.o"))
        for i, src in enumerate(srcs):
            obj = work / f"u{i}-{src.stem}.o"
            # From the source's directory with a relative name: the only path the
            # object records (STT_FILE) is the file name.
            tc.run([*user_flags, "-c", src.name, "-o", str(obj)], cwd=src.parent)
            objects.append(str(obj))
        link = list(link_flags)
        if opts.stack_size is not None:
            link.append(f"-Wl,--defsym,__lguest_stack_size={opts.stack_size}")
        tmp_out = work / "guest.elf"
        tc.run([*link, *objects, *libs, "-o", str(tmp_out)], cwd=work)
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
    for rel in (*RUNTIME_SOURCES, *FREESTANDING_SOURCES, "include/lguest.h", "guest.ld"):
        h.update((SDK_DIR / rel).read_bytes())
    return h.hexdigest()[:20]
