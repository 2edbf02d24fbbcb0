"""musl's portable C for the libm functions whose i386 versions are x87 assembly.

musl's i386 libm computes some functions with the x87's transcendental and
remainder instructions (``fpatan``, ``fyl2x``, ``fyl2xp1``, ``f2xm1``,
``fprem1``).  The emulator (Unicorn, QEMU 5's x87) computes those through host
doubles: its results differ from hardware in the last bits (``atan2``),
carry only a double's 53 bits where ``long double`` has 64 (``logl``,
``expl``), or are wrong outright (``fprem1``: ``remainder(-0.1, 0.18)`` is
-0.1).  The guest links musl's portable C versions of these functions
instead, from the musl sources Zig ships: built for the guests' target (SSE2
doubles), the double and float ones compute exactly what musl computes on
x86-64; the long double ones use only x87 arithmetic that the emulator rounds
as hardware does (add, multiply, divide, square root).

The functions are built once per Zig into an archive in Zig's global cache, and
every link puts it before libc, so that its members replace libc's.  Functions
whose i386 assembly the emulator computes exactly stay libc's: ``ldexp``,
``scalbn`` and ``scalbln`` (``fscale`` or an exact multiply), ``llrint``
(``fistp``), ``sqrt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

# src/math/NAME.c of musl, each replacing libc's member of the same name (and every
# symbol that member defines: remainder's drem, remainderf's dremf).
LIBM_SOURCES = (
    # double and float: fpatan (atan2, atan2f, asinf), fprem1 (the remainders)
    "atan2", "atan2f", "asinf", "remquo", "remquof", "remainder", "remainderf",
    # long double: fpatan, fyl2x, fyl2xp1, f2xm1, fprem1
    "__invtrigl", "acosl", "asinl", "atan2l", "exp2l", "expl", "expm1l",
    "log10l", "log1pl", "log2l", "logl", "remquol", "remainderl",
)  # fmt: skip
# The long double ones: x86-64's musl computes these with the x87 too (its own assembly).
LONG_DOUBLE_SOURCES = tuple(name for name in LIBM_SOURCES if name.endswith("l"))
# How musl's own build compiles its sources (C99, no contraction of a*b+c into an fma,
# rounding modes honoured when folding constants).
MUSL_CFLAGS = [
    "-std=c99",
    "-ffreestanding",
    "-frounding-math",
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    "-D_XOPEN_SOURCE=700",
    "-w",
]
ARCHIVE_PREFIX = "lguest-libm-"

# Runs a Zig tool: (tool, args, cwd) -> None for `zig TOOL ARGS...` (tool "cc" or "ar"),
# raising BuildError if it fails.
Runner = Callable[[str, list[str], Path], None]


def zig_env(zig: tuple[str, ...]) -> dict[str, str]:
    """``zig env``'s string fields (``lib_dir``, ``global_cache_dir``, ``version``...)
    for the Zig command ``zig``; empty if it does not say.  Directories are absolute:
    Zig gives them relative to the directory it ran in when they lie below it (a
    virtual environment in the working directory), and builds run elsewhere."""
    try:
        proc = subprocess.run(
            [*zig, "env"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
            timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if proc.returncode:
        return {}
    fields = dict(re.findall(r'^\s*\.?"?(\w+)"?\s*[=:]\s*"([^"]*)"', proc.stdout, re.MULTILINE))
    return {
        key: os.path.abspath(value) if key.endswith("_dir") and value else value
        for key, value in fields.items()
    }


def musl_flags(musl: Path, arch: str, libc_include: Path) -> list[str]:
    """The include path of musl's own build for ``arch`` (``i386``, ``x86_64``):
    its architecture's headers, its internal ones (``libm.h``), the generated
    ``bits/alltypes.h`` (Zig's ``libc_include``), its public ones."""
    dirs = [musl / "arch" / arch, musl / "arch" / "generic", musl / "src" / "include",
            musl / "src" / "internal", libc_include, musl / "include"]  # fmt: skip
    flags = [*MUSL_CFLAGS, "-nostdinc"]
    for d in dirs:
        flags += ["-I", str(d)]
    return flags


def archive(env: dict[str, str], target: list[str], version: str, run: Runner, work: Path) -> Path:
    """The archive of :data:`LIBM_SOURCES` built with ``target`` (the guests' target
    and code flags) by the Zig whose :func:`zig_env` is ``env``: from its global
    cache, or built now (in ``work``, a directory of the caller's) and put there.

    Written under a temporary name and renamed into place, so a reader sees a whole
    archive or none; when the cache cannot be written, the archive in ``work`` is
    the one returned.  Raises BuildError (through ``run``) if it does not build,
    FileNotFoundError if this Zig ships no musl sources."""
    lib_dir = env.get("lib_dir")
    if not lib_dir:
        raise FileNotFoundError("`zig env` does not say where Zig's lib is")
    musl = Path(lib_dir) / "libc" / "musl"
    math = musl / "src" / "math"
    libc_include = Path(lib_dir) / "libc" / "include" / "x86-linux-musl"
    flags = [*target, "-O2", *musl_flags(musl, "i386", libc_include)]
    h = hashlib.sha256(version.encode())
    for part in (*flags, *LIBM_SOURCES):
        h.update(b"\0" + part.encode())
    for name in LIBM_SOURCES:
        h.update((math / f"{name}.c").read_bytes())
    name = f"{ARCHIVE_PREFIX}{h.hexdigest()[:20]}.a"
    cache = env.get("global_cache_dir")
    cached = Path(cache) / name if cache else None
    if cached is not None and cached.is_file():
        return cached
    out = work / "libm"
    out.mkdir()
    objects = []
    for src in LIBM_SOURCES:
        # From musl's math directory with a relative name: the object records no path.
        run("cc", [*flags, "-c", f"{src}.c", "-o", str(out / f"{src}.o")], math)
        objects.append(f"{src}.o")
    run("ar", ["rcD", name, *objects], out)  # D: no time stamps, owners or modes
    built = out / name
    if cached is None:
        return built
    tmp: str | None = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=ARCHIVE_PREFIX, dir=cached.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(built.read_bytes())
        os.chmod(tmp, 0o644)  # as Zig's own cache files
        os.replace(tmp, cached)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return built
    return cached
