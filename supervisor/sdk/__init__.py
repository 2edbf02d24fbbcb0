"""Build C guests: a toolchain that installs with pip, the guest runtime, ``lguest.h``.

``build(["prog.c"], "prog.elf")`` compiles C (and ``.S``) sources for 32-bit x86
and links them with the guest runtime (``runtime/crt0.S``, ``runtime/runtime.c``:
boot, lguest.h's helpers, the system calls musl makes; ``runtime/threads.c``:
clone, futex and the threads' scheduler), musl's portable C for the libm functions
whose i386 assembly the emulator's x87 does not compute as hardware does
(:mod:`supervisor.sdk.libm`, built once per Zig and cached) and musl libc into an
ELF32 image the Launcher loads (``guest.ld``: everything at 0x10000; at boot the
runtime puts the stack at the top of free memory, 8 MiB or ``__lguest_stack_size``
bytes, and the heap from ``_end`` up to the stack's guard page).

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

import contextlib
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import libm
from .elfstrip import strip_debug

SDK_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = SDK_DIR / "include"
RUNTIME_SOURCES = (
    "runtime/crt0.S",
    "runtime/runtime.c",
    "runtime/files.c",
    "runtime/threads.c",
    "runtime/net.c",
    "runtime/strings.c",
)
FREESTANDING_SOURCES = ("runtime/freestanding.c",)  # gcc builds: musl's part of the runtime
FREESTANDING_DIR = SDK_DIR / "freestanding"
LINKER_SCRIPT = SDK_DIR / "guest.ld"
TARGET = ["-target", "x86-linux-musl", "-mcpu=pentium4"]
# SSE2 (the Host enables SSE in CR4): float and double arithmetic in SSE registers at
# their own precision, as on x86-64, so compiler-rt's and musl's double routines are exact.
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
# The gcc fallback: SSE2 code like Zig's, no C library, the runtime's own string functions.
GCC_CFLAGS = [
    "-m32",
    "-march=pentium4",
    "-mfpmath=sse",
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
MIN_STACK_SIZE = 4 << 10
MAX_STACK_SIZE = 256 << 20  # a quarter of the largest guest RAM (GuestConfig: 1 GiB)
DEFAULT_TIMEOUT = 1800.0  # seconds for a whole build: a first build compiles musl (minutes)
SLOW_STEP = 3.0  # seconds a Zig link runs before the build says it is building the C library
OPTIMIZE_LEVELS = ("0", "1", "2", "3", "s", "z")
# Compiler flags that write files of their own (outside -o, which the build chooses) or
# run the preprocessor, assembler or linker with options the build does not see.
_WRITES_FILES = (
    "-o", "-M", "-Wp,", "-Wa,", "-Wl,", "-X", "-save-temps", "--save-temps", "-fdump-",
    "-fstack-usage", "-fcallgraph-info", "-aux-info", "-ftime-trace", "-fsave-optimization",
    "-foptimization-record", "--serialize-diagnostics", "-fcrash-diagnostics",
    "-gsplit-dwarf", "-fopt-info", "-fprofile", "-fcoverage", "--coverage", "-ftest-coverage",
    "-fmodules-cache-path", "-fmodule-file", "-fbuild-session", "-B", "-specs", "--specs",
    "@",
)  # fmt: skip


class ToolchainError(RuntimeError):
    """No usable C toolchain: the message says what to install."""


class BuildError(RuntimeError):
    """Compiling or linking failed: the message holds the compiler's output."""


class BuildTimeout(BuildError):
    """The build ran longer than its timeout; the compiler was killed (one line)."""


class BuildInputError(ValueError):
    """The sources, output or options cannot be built as asked (one line, nothing run)."""


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

    def run(
        self,
        args: Sequence[str],
        cwd: Path,
        deadline: float | None = None,
        note: str | None = None,
        progress: TextIO | None = None,
        note_after: float = SLOW_STEP,
    ) -> None:
        """Run the compiler with ``args`` in ``cwd``; :class:`BuildError` if it fails.

        The compiler runs in a process group of its own, which is killed (all of it:
        Zig runs clang and the linker as children) when ``deadline`` (a
        ``time.monotonic()`` value) passes (:class:`BuildTimeout`) or anything
        interrupts the wait (Ctrl-C, a signal handler's exception), so no compiler
        outlives the build or writes into its removed directory.  ``note``: said on
        ``progress`` once the step has run ``note_after`` seconds (0: before it
        runs), with the elapsed time updated in place every second while it runs if
        ``progress`` is a terminal.
        """
        cmd = [*self.cc, *args]
        env = dict(os.environ, LC_ALL="C", SOURCE_DATE_EPOCH="0")
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True, start_new_session=True,
        )  # fmt: skip
        started = time.monotonic()
        told = False
        live = progress is not None and progress.isatty()
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise BuildTimeout(f"timed out: {' '.join(cmd)}")
                if note is not None and progress is not None and now - started >= note_after:
                    if live:
                        progress.write(f"\rsupervisor: {note}: {_clock(now - started)} ")
                    elif not told:
                        progress.write(f"supervisor: {note}\n")
                    progress.flush()
                    told = True
                wait = 1.0 if deadline is None else min(1.0, deadline - now)
                try:
                    stdout, stderr = proc.communicate(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    pass
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            if told and live and progress is not None:
                progress.write(f"\rsupervisor: {note}: {_clock(time.monotonic() - started)}\n")
                progress.flush()
        if proc.returncode != 0:
            output = (stdout + stderr).strip()
            raise BuildError(f"{' '.join(cmd)}\n{output}")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the compiler's whole process group, reap the compiler, close its pipes."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


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
    stack_size: int | None = None  # bytes; default 8 MiB (at most half the free memory)
    extra_cflags: list[str] = field(default_factory=list)  # passed to the compiler as they are

    def cflags(self) -> list[str]:
        flags = [f"-O{self.optimize}"] if self.optimize is not None else []
        if self.debug:
            flags.append("-g")
        flags += [f"-I{os.path.abspath(d)}" for d in self.include_dirs]
        flags += [f"-D{d}" for d in self.defines]
        flags += [f"-W{w}" for w in self.warnings]
        return flags + self.extra_cflags


def check_options(options: BuildOptions) -> None:
    """Raise :class:`BuildInputError` for options the build refuses: a flag that writes
    files of its own or passes options to the preprocessor, assembler or linker
    (``-o``, ``-M...``, ``-Wp,``/``-Wa,``/``-Wl,``, ``-save-temps``, ``-fdump-...``:
    the build writes only ``output``), an unknown ``-O`` level, a stack size out of
    :data:`MIN_STACK_SIZE`..:data:`MAX_STACK_SIZE`."""
    if options.optimize is not None and options.optimize not in OPTIMIZE_LEVELS:
        raise BuildInputError(f"-O{options.optimize}: the levels are {', '.join(OPTIMIZE_LEVELS)}")
    flags = [f"-W{w}" for w in options.warnings] + list(options.extra_cflags)
    for flag in flags:
        if flag.startswith(_WRITES_FILES):
            raise BuildInputError(
                f"{flag}: flags that write files or pass options to the preprocessor, "
                "assembler or linker are not accepted (the build writes only -o; "
                "the stack size is --stack-size)"
            )
    size = options.stack_size
    if size is not None and not (
        isinstance(size, int) and MIN_STACK_SIZE <= size <= MAX_STACK_SIZE
    ):
        raise BuildInputError(
            f"stack size {size!r} is outside {MIN_STACK_SIZE >> 10}K..{MAX_STACK_SIZE >> 20}M"
        )


def check_output(srcs: Sequence[Path], output: Path) -> None:
    """Raise :class:`BuildInputError` unless ``output`` can be written as the image: its
    directory exists (it is not created) and it names none of ``srcs``, the build's
    inputs (as gcc refuses)."""
    if output.is_dir():
        raise BuildInputError(f"{output}: is a directory")
    if not output.parent.is_dir():
        raise BuildInputError(f"{output}: no such directory: {output.parent}")
    if not os.access(output.parent, os.W_OK):
        raise BuildInputError(f"{output}: cannot write in {output.parent}")
    for src in srcs:
        if src == output or (output.exists() and os.path.samefile(src, output)):
            raise BuildInputError(f"{output}: the output would overwrite a source")


def build(
    sources: Sequence[str | Path],
    output: str | Path,
    options: BuildOptions | None = None,
    toolchain: Toolchain | None = None,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    progress: TextIO | None = None,
) -> Path:
    """Compile ``sources`` (``.c``, ``.S``, ``.s``) and link a guest image at ``output``.

    argv[0] of the guest is ``output``'s name without its suffix.  Everything the
    caller gives is checked before anything runs (:func:`check_options`,
    :func:`check_output`: :class:`BuildInputError`).  The build's intermediate
    files live in a temporary directory removed however the build ends; only
    ``output`` is written.  ``timeout``: seconds for the whole build (``None``: no
    limit), then :class:`BuildTimeout`.  ``progress`` (e.g. ``sys.stderr``) hears
    what a long step is doing (Zig building the C library the first time).

    Raises :class:`BuildInputError`, :class:`ToolchainError`, :class:`BuildError`, or
    ``FileNotFoundError`` for a missing source.
    """
    opts = options or BuildOptions()
    check_options(opts)
    if timeout is not None and not (isinstance(timeout, int | float) and 0 < timeout < 1e9):
        raise BuildInputError(f"timeout {timeout!r} must be a positive number of seconds")
    srcs = [Path(s).resolve() for s in sources]
    if not srcs:
        raise BuildError("no sources to build")
    for src in srcs:
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such source file")
        if src.suffix not in (".c", ".S", ".s"):
            raise BuildError(f"{src}: not a C or assembly source (.c, .S, .s)")
    out = Path(output).resolve()
    sdk_inputs = [SDK_DIR / rel for rel in (*RUNTIME_SOURCES, *FREESTANDING_SOURCES)]
    check_output([*srcs, *sdk_inputs, LINKER_SCRIPT], out)
    tc = toolchain or find_toolchain()
    deadline = None if timeout is None else time.monotonic() + timeout
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
    # No jump tables: an indirect jump costs the emulator a lookup (see runtime.c's clocks).
    runtime_flags = [*target, "-Iinclude", "-O2", "-Wall", "-fno-jump-tables"]
    if tc.freestanding:  # no loop of the runtime may become a call to the memcpy it defines
        runtime_flags += ["-fno-builtin", "-fno-tree-loop-distribute-patterns"]
    if opts.debug:
        runtime_flags.append("-g")
    try:
        return _build(
            tc, srcs, out, name, opts, target, user_flags, runtime_flags, runtime_sources,
            link_flags, libs, _Steps(deadline, progress),
        )  # fmt: skip
    except BuildTimeout:
        raise BuildTimeout(f"the build took longer than {timeout:g} seconds") from None
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
    steps: _Steps,
) -> Path:
    with tempfile.TemporaryDirectory(prefix="lguest-build-") as tmp:
        work = Path(tmp)
        objects: list[str] = []
        for i, rel in enumerate(runtime_sources):
            obj = work / f"rt{i}.o"
            steps.run(tc, [*runtime_flags, "-c", rel, "-o", str(obj)], cwd=SDK_DIR)
            objects.append(str(obj))
        progname = f'const char __lguest_progname[] = "{name}";\n'
        if opts.stack_size is not None:  # an absolute symbol (Zig's linker has no --defsym)
            progname += (
                f'__asm__(".globl __lguest_stack_size\\n.set __lguest_stack_size, '
                f'{int(opts.stack_size)}");\n'
            )
        (work / "progname.c").write_text(progname, encoding="ascii")
        steps.run(tc, [*target, "-c", "progname.c", "-o", "progname.o"], cwd=work)
        objects.append(str(work / "progname.o"))
        for i, src in enumerate(srcs):
            obj = work / f"u{i}-{src.stem}.o"
            # From the source's directory with a relative name: the only path the
            # object records (STT_FILE) is the file name.
            steps.run(tc, [*user_flags, "-c", src.name, "-o", str(obj)], cwd=src.parent)
            objects.append(str(obj))
        env = {} if tc.freestanding else libm.zig_env(tc.cc[:-1])
        if not tc.freestanding:  # before libc: its members replace libc's (sdk/libm.py)
            objects.append(str(_libm_archive(tc, target, steps, work, env)))
        link = list(link_flags)
        tmp_out = work / "guest.elf"
        # Zig builds (and caches) musl and compiler-rt here the first time: minutes.
        # Said at once when this Zig has never linked a guest, else if the link is slow.
        stamp = None if tc.freestanding else _libc_stamp(tc, env)
        first = stamp is not None and not stamp.exists()
        note = None if tc.freestanding else LIBC_NOTE
        steps.run(
            tc, [*link, *objects, *libs, "-o", str(tmp_out)], cwd=work, note=note,
            note_after=0 if first else SLOW_STEP,
        )  # fmt: skip
        if first and stamp is not None:
            with contextlib.suppress(OSError):
                stamp.touch()
        image = tmp_out.read_bytes()
        if not opts.debug:
            image = strip_debug(image)  # Zig's -s would drop the symbols too
        out.write_bytes(image)
    return out


def _libm_archive(
    tc: Toolchain, target: list[str], steps: _Steps, work: Path, env: dict[str, str]
) -> Path:
    """musl's portable C for the libm functions whose i386 assembly the emulator's
    x87 does not compute as hardware does (:mod:`supervisor.sdk.libm`), cached."""
    zig = tc.cc[:-1]

    def run(tool: str, args: list[str], cwd: Path) -> None:
        Toolchain((*zig, tool), tc.version).run(args, cwd, steps.deadline)

    try:
        return libm.archive(env, target, tc.version, run, work)
    except FileNotFoundError as exc:
        raise BuildError(f"this Zig cannot build the guests' libm: {exc}") from None


LIBC_NOTE = (
    "linking; the first build with this Zig also builds musl libc for the guests "
    "(a few minutes, cached afterwards in Zig's global cache)"
)


def _libc_stamp(tc: Toolchain, env: dict[str, str]) -> Path | None:
    """The file in Zig's global cache (``env``: ``zig env``) that says this Zig has
    linked a guest (and so has musl for the guests' target cached), or None if Zig does
    not say where its cache is.

    It lives in the cache so that clearing the cache clears it too."""
    cache = env.get("global_cache_dir")
    if not cache:
        return None
    name = _NAME_OK.sub("_", f"lguest-guest-libc-{tc.version}")
    return Path(cache) / name


@dataclass(frozen=True)
class _Steps:
    """The compiler runs of one build: its deadline and where progress goes."""

    deadline: float | None
    progress: TextIO | None

    def run(
        self,
        tc: Toolchain,
        args: list[str],
        cwd: Path,
        note: str | None = None,
        note_after: float = SLOW_STEP,
    ) -> None:
        tc.run(args, cwd, self.deadline, note, self.progress, note_after)


def content_key(*parts: str | bytes) -> str:
    """A short hash naming a build by what went into it (for caches)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    sdk_files = (*RUNTIME_SOURCES, *FREESTANDING_SOURCES, "include/lguest.h", "guest.ld", "libm.py")
    for rel in sdk_files:
        h.update((SDK_DIR / rel).read_bytes())
    return h.hexdigest()[:20]
