"""Real programs from PyPI sdists, built as guests and natively (tests/test_real_programs.py).

Three sdists carry real, unmodified sources:

* ``sqlean-py``: ``sqlite/sqlite3.c`` and ``sqlite3.h`` (the SQLite amalgamation) and
  ``sqlite/shell.c`` (the ``sqlite3`` command-line shell).  Its extensions
  (``sqlite/sqlean-*.c``) and Python module (``src/``) are not used.
* ``zlib-ng``: ``src/zlib_ng/zlib-ng/`` is zlib-ng's tree, with ``test/example.c`` and
  ``test/minigzip.c``; built in zlib-compat mode (a drop-in zlib), generic C only.
* ``pyerfa``: ``liberfa/erfa/`` is ERFA, the IAU SOFA-derived astronomy library (double
  arithmetic and libm throughout); ``src/t_erfa_c.c`` is ERFA's own validation program,
  built with the library's C files (not the other ``t_*.c``).

:func:`prepare` downloads them with pip (each sdist's sha256 is pinned here and
checked), builds every program twice, as a guest with ``python -m supervisor build``
and natively with the host's gcc (``t_erfa_c`` a third time, for x86-64 with Zig and
musl, the guest's own C library), and returns where the programs are.  Everything
lives in a cache directory (:func:`cache_root`): the verified sdists, and the built
programs in directories named by a hash of what went into them (the sdist's sha256,
the flags, the guest SDK's runtime and the compilers' versions), so a second run
builds nothing.  The sources are extracted into a temporary directory that is
removed after the build.

The pytest side (:class:`Plugin`, registered by tests/conftest.py) starts the
preparation in a background process as soon as the session knows these tests will
run, and moves them to the end, so the compile overlaps the rest of the suite.

Run as a script (``python tests/realprograms.py RESULT.json``) it prepares and writes
the outcome as JSON: ``{"status": "ok", "programs": {...}}``, ``{"status":
"unreachable", "reason": ...}`` (pip could not reach the package index) or
``{"status": "failed", "reason": ...}``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import pytest

from supervisor import sdk

MARKER = "real_programs"
RESULT_TIMEOUT = 3600.0  # seconds: a bound for a hung preparation, never a wait for success
TAIL_LINES = 30  # of a failed compiler's output, in the failure


@dataclass(frozen=True)
class Sdist:
    """A source distribution on PyPI, pinned by version and sha256."""

    project: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.project.replace('-', '_')}-{self.version}.tar.gz"

    @property
    def root(self) -> str:
        """The directory every member of the tarball lies in."""
        return self.filename.removesuffix(".tar.gz")


SQLEAN = Sdist(
    "sqlean-py", "3.50.4.5", "9764b565e7ab430ab6e9e43cb2816199c2b39926dffc93c212a52f0019278459"
)
ZLIB_NG = Sdist(
    "zlib-ng", "1.1.0", "08a3a8468d4f130e3dc80d28ec42fcc7a878a57dfed616233e791066327d78a3"
)
ERFA = Sdist(
    "pyerfa", "2.0.1.5", "17d6b24fe4846c65d5e7d8c362dcb08199dc63b30a236aedd73875cc83e1f6c0"
)

# The shell without threads or dlopen (the guest has no dynamic loader), with the SQL
# math functions that the shell's own build enables.
SQLITE_DEFINES = (
    "-DSQLITE_THREADSAFE=0",
    "-DSQLITE_OMIT_LOAD_EXTENSION",
    "-DSQLITE_ENABLE_MATH_FUNCTIONS",
)
# sqlean appends a `core_init` hook to sqlite3.c that calls its extensions; nothing
# calls the hook (that takes -DSQLITE_EXTRA_INIT=core_init), so unused sections are
# dropped to link without the extensions.  Zig's linker drops them by default.
NATIVE_SQLITE_LINK = ("-ffunction-sections", "-Wl,--gc-sections", "-lm")
# What zlib-ng's `configure --zlib-compat --without-optimizations` passes.
ZLIB_DEFINES = ("-DZLIB_COMPAT", "-DWITH_GZFILEOP", "-DWITH_ALL_FALLBACKS")
ZLIB_DIR = "src/zlib_ng/zlib-ng"
ERFA_DIR = "liberfa/erfa"
# erfaversion.c takes its version strings from config.h (see configure_erfa).
ERFA_DEFINES = ("-DHAVE_CONFIG_H",)
GUEST_OPT = "-O2"
# The native build is the reference for what the programs print, not for speed; gcc
# compiles sqlite3.c at -O2 several times slower than at -O1.
NATIVE_OPT = "-O1"
# The reference with the guest's own C library: musl for x86-64, built by the guest's Zig.
MUSL_TARGET = ("-target", "x86_64-linux-musl", "-static")

PIP_NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "NameResolutionError",
    "Network is unreachable",
    "Max retries exceeded",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Connection refused",
)


class Unreachable(Exception):
    """pip could not reach the package index."""


class PrepareError(Exception):
    """A download, check or build failed; the message says which and why."""


@dataclass(frozen=True)
class Program:
    """One program built both ways."""

    guest: Path  # the guest image
    native: Path  # the host executable
    musl: Path | None = None  # the same sources for x86-64 with Zig and musl (t_erfa_c)


def cache_root() -> Path:
    """``$LGUEST_PROOFS_CACHE``, else ``$XDG_CACHE_HOME/lguest-supervisor/proofs``
    (``~/.cache`` without it)."""
    explicit = os.environ.get("LGUEST_PROOFS_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lguest-supervisor" / "proofs"


def is_network_failure(pip_output: str) -> bool:
    """True if pip's output says it could not reach the index (not: no such version)."""
    return any(sign in pip_output for sign in PIP_NETWORK_ERRORS)


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def fetch(sdist: Sdist, cache: Path) -> Path:
    """The sdist's tarball in ``cache/sdists``, downloaded with pip if absent; its sha256
    is checked either way (:class:`PrepareError` if it differs)."""
    store = cache / "sdists"
    store.mkdir(parents=True, exist_ok=True)
    path = store / sdist.filename
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=store) as tmp:
            cmd = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                sdist.project, "--retries", "1", "--timeout", "20", "--disable-pip-version-check",
                "-d", tmp, f"{sdist.project}=={sdist.version}",
            ]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            output = done.stdout + done.stderr
            if done.returncode != 0:
                if is_network_failure(output):
                    raise Unreachable(f"PyPI is unreachable: pip download {sdist.project} failed")
                raise PrepareError(f"pip download {sdist.project} failed:\n{tail(output)}")
            got = Path(tmp) / sdist.filename
            if not got.exists():
                raise PrepareError(f"pip download gave no {sdist.filename}:\n{tail(output)}")
            os.replace(got, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sdist.sha256:
        path.unlink()
        raise PrepareError(f"{sdist.filename}: sha256 {digest}, expected {sdist.sha256}")
    return path


def extract(tarball: Path, sdist: Sdist, under: str, dest: Path) -> Path:
    """Extract the regular files of ``tarball`` below ``ROOT/under`` into ``dest``; the
    directory they are in.  Links, devices and paths that leave ``dest`` are refused."""
    prefix = PurePosixPath(sdist.root, under)
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar:
            name = PurePosixPath(member.name)
            if not name.is_relative_to(prefix) or member.isdir():
                continue
            rel = name.relative_to(prefix)
            if not member.isfile() or ".." in rel.parts or name.is_absolute():
                raise PrepareError(f"{tarball.name}: unexpected member {member.name!r}")
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(member)
            assert data is not None  # a regular file
            target.write_bytes(data.read())
    return dest


def configure_zlib_ng(src: Path, out: Path) -> None:
    """Write the headers ``configure --zlib-compat`` generates into ``out``: zlib.h and
    gzread_mangle.h with no symbol prefix, zlib_name_mangling.h empty, and zconf.h
    with ``unistd.h`` (which every POSIX system, musl included, has)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("zlib.h", "gzread_mangle.h"):
        text = (src / f"{name}.in").read_text()
        (out / name).write_text(text.replace("@ZLIB_SYMBOL_PREFIX@", ""))
    shutil.copyfile(src / "zlib_name_mangling.h.empty", out / "zlib_name_mangling.h")
    zconf, count = re.subn(
        r"^#ifdef HAVE_UNISTD_H(.*) may be set to #if 1",
        r"#if 1\1 was set to #if 1",
        (src / "zconf.h.in").read_text(),
        flags=re.MULTILINE,
    )
    if count != 1:
        raise PrepareError("zconf.h.in: no `#ifdef HAVE_UNISTD_H` line to configure")
    (out / "zconf.h").write_text(zconf)


def zlib_library_sources(src: Path) -> list[Path]:
    """The library's C files, as its Makefile.in lists them (OBJZ and OBJG, generic
    code only: nothing from ``$(ARCH_STATIC_OBJS)``)."""
    makefile = (src / "Makefile.in").read_text()
    sources: list[Path] = []
    for var in ("OBJZ", "OBJG"):
        found = re.search(rf"^{var} =((?:.*\\\n)*.*)$", makefile, re.MULTILINE)
        if found is None:
            raise PrepareError(f"Makefile.in: no {var} list")
        for word in found.group(1).replace("\\\n", " ").split():
            if word.endswith(".o"):
                sources.append(src / (word.removesuffix(".o") + ".c"))
    if not sources:
        raise PrepareError("Makefile.in: empty library source list")
    return sources


def configure_erfa(erfa: Path, out: Path) -> None:
    """Write the ``config.h`` that ERFA's ``configure`` (and pyerfa's setup.py, which
    scans configure.ac the same way) generates into ``out``: the package and SOFA
    versions, the only things ``erfaversion.c`` takes from it."""
    configure = (erfa / "configure.ac").read_text()
    version = re.search(r"^AC_INIT\(\[erfa\],\s*\[(\d+)\.(\d+)\.(\d+)\]\)", configure,
                        re.MULTILINE)  # fmt: skip
    sofa = re.search(r'^AC_DEFINE\(\[SOFA_VERSION\],\s*\["(\d{8}(?:_\w)?)"\]', configure,
                     re.MULTILINE)  # fmt: skip
    if version is None or sofa is None:
        raise PrepareError("configure.ac: no AC_INIT([erfa],[X.Y.Z]) or SOFA_VERSION")
    major, minor, micro = version.groups()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.h").write_text(
        f'#define PACKAGE_VERSION "{major}.{minor}.{micro}"\n'
        f"#define PACKAGE_VERSION_MAJOR {major}\n"
        f"#define PACKAGE_VERSION_MINOR {minor}\n"
        f"#define PACKAGE_VERSION_MICRO {micro}\n"
        f'#define SOFA_VERSION "{sofa.group(1)}"\n'
    )


def erfa_library_sources(src: Path) -> list[Path]:
    """The library's C files: every ``src/*.c`` but the test programs (``t_*.c``)."""
    sources = sorted(p for p in src.glob("*.c") if not p.name.startswith("t_"))
    if not sources:
        raise PrepareError(f"{src}: no ERFA library sources")
    return sources


def _gcc_version() -> str:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise PrepareError("the native builds need the host's gcc (not found on PATH)")
    return subprocess.run([gcc, "--version"], capture_output=True, text=True, check=True).stdout


def _outputs(program: Program) -> list[Path]:
    return [program.guest, program.native] + ([program.musl] if program.musl else [])


def _zig_cc() -> tuple[str, ...]:
    try:
        return sdk.find_toolchain("zig").cc
    except sdk.ToolchainError as exc:
        raise PrepareError(f"the musl builds need Zig's C compiler: {exc}") from None


def _guest_toolchain() -> str:
    try:
        tc = sdk.find_toolchain()
    except sdk.ToolchainError as exc:
        raise PrepareError(f"the guest builds need Zig's C compiler: {exc}") from None
    return f"{tc.kind} {tc.version}"


@dataclass(frozen=True)
class _Job:
    out: Path
    cmd: list[str]


def _build_all(todo: Sequence[_Job], jobs: int) -> None:
    """Run the builds, ``jobs`` at a time, each writing ``OUT`` then renamed to its
    ``out``.  At the first failure the other builds are stopped (SIGTERM to each one's
    process group: ``supervisor build`` then kills its compiler's own group) and a
    :class:`PrepareError` with the failed compiler's last lines is raised."""
    waiting = list(todo)
    running: dict[subprocess.Popen[bytes], tuple[_Job, Path, IO[bytes]]] = {}
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                job = waiting.pop(0)
                tmp = job.out.with_name(f"{job.out.name}.{os.getpid()}.tmp")
                log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the build ends
                proc = subprocess.Popen(
                    [str(tmp) if part == "OUT" else part for part in job.cmd],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    process_group=0,
                )  # fmt: skip
                running[proc] = (job, tmp, log)
            time.sleep(0.1)
            for proc in [proc for proc in running if proc.poll() is not None]:
                job, tmp, log = running.pop(proc)
                log.seek(0)
                output = log.read().decode(errors="replace")
                log.close()
                if proc.returncode != 0 or not tmp.exists():
                    tmp.unlink(missing_ok=True)
                    raise PrepareError(
                        f"building {job.out.name} failed ({' '.join(job.cmd[:4])} ...):\n"
                        f"{tail(output)}"
                    )
                os.replace(tmp, job.out)
    finally:
        for proc in running:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc, (_, tmp, log) in running.items():
            proc.wait()
            tmp.unlink(missing_ok=True)
            log.close()


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One preparation at a time per cache (pytest sessions of several checkouts)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prepare(cache: Path, jobs: int = 2) -> dict[str, Program]:
    """Download, check and build what is not in ``cache`` yet; the programs by name
    (``example``, ``minigzip``, ``sqlite3``, ``t_erfa_c``).  Raises :class:`Unreachable` or
    :class:`PrepareError`."""
    with _locked(cache):
        for stale in (*cache.glob("lguest-proofs-*"), *cache.glob("*/*.tmp")):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        guest_tc = _guest_toolchain()
        gcc = _gcc_version()
        tarballs = {sdist: fetch(sdist, cache) for sdist in (ZLIB_NG, SQLEAN, ERFA)}
        keys = {
            name: sdk.content_key(sdist.sha256, name, guest_tc, gcc, GUEST_OPT, NATIVE_OPT,
                                  *SQLITE_DEFINES, *NATIVE_SQLITE_LINK, *ZLIB_DEFINES)
            for name, sdist in (("example", ZLIB_NG), ("minigzip", ZLIB_NG), ("sqlite3", SQLEAN))
        }  # fmt: skip
        keys["t_erfa_c"] = sdk.content_key(ERFA.sha256, "t_erfa_c", guest_tc, gcc, GUEST_OPT,
                                           NATIVE_OPT, *ERFA_DEFINES, "-lm",
                                           *MUSL_TARGET)  # fmt: skip
        programs: dict[str, Program] = {}
        for name, key in keys.items():
            where = cache / f"{name}-{key}"
            musl = where / f"{name}.musl" if name == "t_erfa_c" else None
            programs[name] = Program(where / f"{name}.img", where / f"{name}.native", musl)
        missing = [p for prog in programs.values() for p in _outputs(prog)]
        if all(p.exists() for p in missing):
            return programs
        with tempfile.TemporaryDirectory(prefix="lguest-proofs-", dir=cache) as tmp:
            work = Path(tmp)
            todo: list[_Job] = []
            need_zlib = any(not programs[n].guest.exists() or not programs[n].native.exists()
                            for n in ("example", "minigzip"))  # fmt: skip
            if need_zlib:
                zsrc = extract(tarballs[ZLIB_NG], ZLIB_NG, ZLIB_DIR, work / "zlib-ng")
                configure_zlib_ng(zsrc, work / "zlib-gen")
                lib = [str(p) for p in zlib_library_sources(zsrc)]
                inc = ["-I", str(work / "zlib-gen"), "-I", str(zsrc)]
                for name in ("example", "minigzip"):
                    main = str(zsrc / "test" / f"{name}.c")
                    todo.append(_Job(programs[name].guest, [
                        sys.executable, "-m", "supervisor", "build", GUEST_OPT, *ZLIB_DEFINES,
                        *inc, *lib, main, "-o", "OUT",
                    ]))  # fmt: skip
                    todo.append(_Job(programs[name].native, [
                        "gcc", NATIVE_OPT, *ZLIB_DEFINES, *inc, *lib, main, "-o", "OUT",
                    ]))  # fmt: skip
            sqlite = programs["sqlite3"]
            if not sqlite.guest.exists() or not sqlite.native.exists():
                ssrc = extract(tarballs[SQLEAN], SQLEAN, "sqlite", work / "sqlite")
                srcs = [str(ssrc / "sqlite3.c"), str(ssrc / "shell.c")]
                # the longest build first, so the other builds share the second core
                todo.insert(0, _Job(sqlite.guest, [
                    sys.executable, "-m", "supervisor", "build", GUEST_OPT, *SQLITE_DEFINES,
                    *srcs, "-o", "OUT",
                ]))  # fmt: skip
                todo.insert(1, _Job(sqlite.native, [
                    "gcc", NATIVE_OPT, *SQLITE_DEFINES, *srcs, "-o", "OUT", *NATIVE_SQLITE_LINK,
                ]))  # fmt: skip
            erfa = programs["t_erfa_c"]
            if not all(p.exists() for p in _outputs(erfa)):
                edir = extract(tarballs[ERFA], ERFA, ERFA_DIR, work / "erfa")
                configure_erfa(edir, work / "erfa-gen")
                esrc = edir / "src"
                # t_erfa_c.c includes <erfa.h>: the source directory is on the path
                srcs = [str(p) for p in erfa_library_sources(esrc)] + [str(esrc / "t_erfa_c.c")]
                inc = ["-I", str(work / "erfa-gen"), "-I", str(esrc)]
                todo.append(_Job(erfa.guest, [
                    sys.executable, "-m", "supervisor", "build", GUEST_OPT, *ERFA_DEFINES,
                    *inc, *srcs, "-o", "OUT",
                ]))  # fmt: skip
                todo.append(_Job(erfa.native, [
                    "gcc", NATIVE_OPT, *ERFA_DEFINES, *inc, *srcs, "-o", "OUT", "-lm",
                ]))  # fmt: skip
                assert erfa.musl is not None
                todo.append(_Job(erfa.musl, [
                    *_zig_cc(), *MUSL_TARGET, GUEST_OPT, *ERFA_DEFINES, *inc, *srcs, "-o", "OUT",
                ]))  # fmt: skip
            todo = [job for job in todo if not job.out.exists()]
            for job in todo:
                job.out.parent.mkdir(parents=True, exist_ok=True)
            _build_all(todo, jobs)
        return programs


def write_result(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def main(argv: Sequence[str]) -> int:
    """``realprograms.py RESULT.json``: prepare at low priority, write the outcome."""
    os.nice(10)
    # SIGTERM (a session that ends early) unwinds, so the work directory is removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result_path = Path(argv[0])
    started = time.monotonic()
    try:
        programs = prepare(cache_root())
    except Unreachable as exc:
        write_result(result_path, {"status": "unreachable", "reason": str(exc)})
    except PrepareError as exc:
        write_result(result_path, {"status": "failed", "reason": str(exc)})
    else:
        write_result(result_path, {
            "status": "ok",
            "seconds": time.monotonic() - started,
            "programs": {n: [str(f) for f in _outputs(p)] for n, p in programs.items()},
        })  # fmt: skip
    return 0


# -- pytest ------------------------------------------------------------------------------

_STARTED = pytest.StashKey[tuple[subprocess.Popen[bytes], Path]]()


def start(config: pytest.Config) -> tuple[subprocess.Popen[bytes], Path]:
    """Start :func:`main` in a process of its own (once per session); the process and the
    file its result will be in."""
    if _STARTED in config.stash:
        return config.stash[_STARTED]
    out = Path(tempfile.mkdtemp(prefix="lguest-proofs-result-"))
    result = out / "result.json"
    log = open(out / "log", "wb")  # noqa: SIM115 - the child writes it; closed below
    try:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(result)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            process_group=0,
        )  # fmt: skip
    finally:
        log.close()
    config.stash[_STARTED] = (proc, result)
    return proc, result


def wait(config: pytest.Config) -> dict[str, Program]:
    """The programs, once the background preparation is done (started now if it was
    not); skips the calling test if PyPI is unreachable, fails it if a build failed."""
    proc, result = start(config)
    try:
        proc.wait(timeout=RESULT_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(config)
        pytest.fail(f"preparing the real programs took over {RESULT_TIMEOUT:g} s")
    if not result.exists():
        log = (result.parent / "log").read_text(errors="replace")
        pytest.fail(f"preparing the real programs died (status {proc.returncode}):\n{tail(log)}")
    outcome = json.loads(result.read_text())
    if outcome["status"] == "unreachable":
        pytest.skip(outcome["reason"])
    if outcome["status"] != "ok":
        pytest.fail(outcome["reason"], pytrace=False)
    return {n: Program(*map(Path, files)) for n, files in outcome["programs"].items()}


def stop(config: pytest.Config) -> None:
    """Kill the preparation if it still runs (its compilers too) and remove its files."""
    started = config.stash.get(_STARTED, None)
    if started is None:
        return
    proc, result = started
    if proc.poll() is None:
        # SIGTERM: `supervisor build` then kills its compiler's own process group
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    shutil.rmtree(result.parent, ignore_errors=True)


class Plugin:
    """Starts the preparation as soon as these tests are selected, and runs them last."""

    @pytest.hookimpl(trylast=True)  # after -m / -k deselection
    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        real = [item for item in items if item.get_closest_marker(MARKER) is not None]
        if not real:
            return
        items[:] = [item for item in items if item.get_closest_marker(MARKER) is None] + real
        if not config.option.collectonly:
            start(config)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        stop(config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
