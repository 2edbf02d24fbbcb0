"""C guests: `supervisor build`, the guest runtime (crt0 + system calls over musl), lguest.h.

Needs the ``sdk`` extra (Zig's C compiler); without it these tests skip and say
what to install.  The first build on a machine compiles musl (a minute or more).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor import Exit, GuestConfig, Supervisor, cli, sdk
from supervisor.pytest_plugin import BuildGuest
from supervisor.sdk import libm

# The subject is the build and the C runtime, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

HERE = Path(__file__).resolve().parent
PORTABLE = HERE / "c" / "portable.c"
LIMIT = 60  # seconds: a bound for failing, never a wait for success
PORTABLE_ARGS = ["one", "0x10", "-5", "two"]
PORTABLE_INPUT = "hello world 42\n  -7 abc 3x 100\n\n9 1\nlast line without newline 5"


def _toolchain() -> sdk.Toolchain:
    try:
        return sdk.find_toolchain("zig")  # these guests need the C library
    except sdk.ToolchainError as exc:
        pytest.skip(str(exc))


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
    )


async def run_guest(
    image: Path, cmdline: str = "", stdin: str | None = None, memory: str = "4M"
) -> tuple[list[str], Exit]:
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=image, memory=memory, cmdline=cmdline))
        if stdin is not None:
            guest.send(stdin)
            guest.send_eof()
        async with asyncio.timeout(LIMIT):
            lines = [line async for line in guest.console]
            return lines, await guest.wait()


@pytest.fixture(scope="module")
def portable_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _toolchain()
    out = tmp_path_factory.mktemp("portable") / "portable.elf"
    done = _cli("build", str(PORTABLE), "-o", str(out), "-O2", "-Wall", "-Werror")
    assert done.returncode == 0, done.stderr
    return out


def test_portable_program_prints_what_the_native_build_prints(
    portable_guest: Path, tmp_path: Path
) -> None:
    """`supervisor build` + `supervisor run` prints what the host gcc's build prints."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs the host's gcc to build the native reference")
    native = tmp_path / "portable"
    subprocess.run([gcc, "-O2", "-o", str(native), str(PORTABLE), "-lm"], check=True)
    expected = subprocess.run(
        ["portable", *PORTABLE_ARGS],
        executable=native,
        input=PORTABLE_INPUT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    got = _cli(
        "run", str(portable_guest), "--memory", "16M", "--cmdline", " ".join(PORTABLE_ARGS),
        stdin=PORTABLE_INPUT,
    )  # fmt: skip
    assert got.stdout == expected.stdout
    assert got.returncode == expected.returncode == 9  # 6 numbers read, + 3
    assert "floats: 3.141593" in got.stdout  # x87 rounding as a process gets it
    assert "nanosleep 30 ms: ok" in got.stdout


async def test_the_monotonic_clock_counts_real_time(build_guest: BuildGuest) -> None:
    """rdtsc scaled by lguest_data.tsc_khz: a guest's 200 ms sleep takes 200 ms of ours."""
    image = build_guest(
        r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    struct timespec a, b, req = {0, 200000000};
    clock_gettime(CLOCK_MONOTONIC, &a);
    nanosleep(&req, NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%ld\n", (long)((b.tv_sec - a.tv_sec) * 1000 + (b.tv_nsec - a.tv_nsec) / 1000000));
    return 0;
}
""",
        flags=["-O2"],
    )
    start = time.monotonic()
    lines, result = await run_guest(image)
    host_ms = (time.monotonic() - start) * 1000
    assert result.ok, result
    guest_ms = int(lines[0])
    assert guest_ms >= 200
    assert host_ms >= 190  # the guest's clock does not run fast
    assert guest_ms <= host_ms + 20  # nor slow


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("int *volatile p = 0; return *p;", "CRASH: NULL pointer dereference: read at 0x00000000"),
        ("int *volatile p = (int *)8; *p = 1; return 0;",
         "CRASH: NULL pointer dereference: write at 0x00000008"),
        ("abort();", "CRASH: killed by signal SIGABRT"),
    ],
)  # fmt: skip
async def test_faults_kill_the_guest_with_a_reason(
    build_guest: BuildGuest, body: str, expected: str
) -> None:
    image = build_guest(f"#include <stdlib.h>\nint main(void) {{ {body} }}\n")
    _lines, result = await run_guest(image)
    assert result.died
    assert result.reason.startswith(expected), result.reason


async def test_exit_status_tls_enosys_and_argv(build_guest: BuildGuest) -> None:
    image = build_guest(
        r"""
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <lguest.h>
static _Thread_local int counter = 40;
static void bye(void) { printf("atexit ran, counter %d\n", counter); }
int main(int argc, char **argv) {
    atexit(bye);
    counter += 2;
    long r = syscall(SYS_pipe, 0);
    printf("pipe: %ld %s\n", r, errno == ENOSYS ? "ENOSYS" : "?");
    printf("link: %d %s\n", link("x", "y"), errno == ENOSYS ? "ENOSYS" : "?");
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    printf("cmdline '%s', tsc_khz %s\n", lguest_cmdline(),
           lguest_data.tsc_khz > 1000 ? "set" : "unset");
    fflush(stdout);
    exit(counter);
}
"""
    )
    lines, result = await run_guest(image, cmdline="a  b")
    assert lines == [
        "pipe: -1 ENOSYS",
        "link: -1 ENOSYS",
        f"argv[0]={image.stem}",
        "argv[1]=a",
        "argv[2]=b",
        "cmdline 'a  b', tsc_khz set",
        "atexit ran, counter 42",
    ]
    assert result == Exit(42, "power off", 0, died=False)


async def test_a_big_heap_and_a_deep_stack(build_guest: BuildGuest) -> None:
    image = build_guest(
        r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static int depth(int n) {
    volatile char pad[1000];
    pad[0] = (char)n;
    return n ? depth(n - 1) + pad[0] - n + 1 : 0;
}
int main(void) {
    size_t got = 0;
    void *keep[64];
    int n = 0;
    for (; n < 64; n++) {  /* 1 MiB blocks until memory runs out */
        keep[n] = malloc(1 << 20);
        if (!keep[n]) break;
        memset(keep[n], n, 1 << 20);
        got += 1 << 20;
    }
    printf("malloc gave %zu MiB then %s\n", got >> 20, n < 64 ? "NULL" : "more");
    while (n--) free(keep[n]);
    void *again = malloc(2 << 20);
    printf("after free: %s\n", again ? "ok" : "NULL");
    printf("depth %d\n", depth(50));
    return 0;
}
""",
        flags=["-O1"],
    )
    lines, result = await run_guest(image, memory="16M")
    assert result.ok, result
    mib = int(lines[0].split()[2])
    assert 4 <= mib < 8 and lines[0].endswith("then NULL")
    assert lines[1:] == ["after free: ok", "depth 50"]


NO_TOOLCHAIN = (
    "supervisor: error: no C toolchain for guests: install Zig's C compiler with "
    "`pip install 'lguest-supervisor[sdk]'` (or `pip install ziglang`); or, for "
    "freestanding guests only (lguest.h, no C library), a gcc that builds 32-bit x86 "
    "code (Debian: `apt-get install gcc gcc-multilib`)"
)


def test_build_without_a_toolchain_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("LGUEST_TOOLCHAIN", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no ziglang
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no zig, no gcc
    with pytest.raises(sdk.ToolchainError, match=r"pip install 'lguest-supervisor\[sdk\]'"):
        sdk.build([PORTABLE], tmp_path / "x.elf")
    assert cli.main(["build", str(PORTABLE), "-o", str(tmp_path / "x.elf")]) == 2
    assert capsys.readouterr().err.strip() == NO_TOOLCHAIN
    assert not (tmp_path / "x.elf").exists()


def test_toolchain_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Zig first, then a gcc that builds 32-bit code; LGUEST_TOOLCHAIN picks one."""
    monkeypatch.delenv("LGUEST_TOOLCHAIN", raising=False)
    gcc = sdk.Toolchain(("/usr/bin/gcc",), "gcc 12", "gcc", "/inc", None)
    monkeypatch.setattr(sdk, "_probe_gcc", lambda path: gcc)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    if sdk._zig_command() is not None and importlib.util.find_spec("ziglang") is not None:
        assert sdk.find_toolchain().kind == "zig"
    monkeypatch.setattr(sdk, "_zig_command", lambda: None)
    assert sdk.find_toolchain() is gcc and gcc.freestanding
    assert sdk.find_toolchain("gcc") is gcc
    with pytest.raises(sdk.ToolchainError, match=r"^no Zig C compiler: install Zig's"):
        sdk.find_toolchain("zig")
    monkeypatch.setenv("LGUEST_TOOLCHAIN", "zig")
    with pytest.raises(sdk.ToolchainError, match=r"^no Zig C compiler"):
        sdk.find_toolchain()
    monkeypatch.setenv("LGUEST_TOOLCHAIN", "clang")
    with pytest.raises(sdk.ToolchainError, match="must be zig, gcc or auto"):
        sdk.find_toolchain()
    monkeypatch.delenv("LGUEST_TOOLCHAIN")
    # A gcc that cannot build 32-bit code is not used, and the error says why.
    monkeypatch.setattr(sdk, "_probe_gcc", lambda path: "cannot find crt1.o")
    with pytest.raises(sdk.ToolchainError) as exc:
        sdk.find_toolchain()
    assert str(exc.value).startswith("no C toolchain for guests: install Zig's")
    assert str(exc.value).endswith(
        "(gcc is installed but cannot build 32-bit code: cannot find crt1.o)"
    )
    with pytest.raises(sdk.ToolchainError, match=r"^no gcc fallback: install a gcc that"):
        sdk.find_toolchain("gcc")


FREESTANDING = r"""
#include <lguest.h>
#include <stdint.h>
#include <string.h>

struct big { char b[300]; };
static struct big copy(struct big x) { return x; }

static size_t put_u64(char *out, uint64_t v)
{
    char tmp[24];
    size_t n = 0, k = 0;
    do tmp[n++] = '0' + v % 10; while ((v /= 10) != 0);
    while (n) out[k++] = tmp[--n];
    return k;
}

int main(int argc, char **argv)
{
    char line[256];
    size_t n = 0;
    struct big a, b;
    memset(&a, 'x', sizeof a);
    b = copy(a);                                /* gcc calls memcpy for this */
    for (int i = 0; i < argc; i++) {
        size_t k = strlen(argv[i]);
        memcpy(line + n, argv[i], k);
        n += k;
        line[n++] = ' ';
    }
    volatile uint64_t big = 0xfedcba9876543210ull, by = 1000003;
    volatile int64_t neg = -12345678901234ll, sby = 7;
    n += put_u64(line + n, big / by);           /* libgcc's 64-bit division */
    line[n++] = ' ';
    n += put_u64(line + n, big % by);
    line[n++] = ' ';
    n += put_u64(line + n, (uint64_t)-(neg / sby));
    line[n++] = ' ';
    n += put_u64(line + n, (uint64_t)-(neg % sby));
    line[n++] = '\n';
    lguest_console_write(line, n);
    return b.b[299] == 'x' ? 40 + argc : 99;
}
"""


def _gcc() -> sdk.Toolchain:
    try:
        return sdk.find_toolchain("gcc")
    except sdk.ToolchainError as exc:
        pytest.skip(str(exc))


async def test_the_gcc_fallback_builds_freestanding_guests(tmp_path: Path) -> None:
    gcc = _gcc()
    src = tmp_path / "free.c"
    src.write_text(FREESTANDING)
    image = sdk.build([src], tmp_path / "free.elf", sdk.BuildOptions("2"), gcc)
    lines, result = await run_guest(image, cmdline="a bc")
    big, by, neg = 0xFEDCBA9876543210, 1000003, 12345678901234
    assert lines == [f"free a bc {big // by} {big % by} {neg // 7} {neg % 7}"]
    assert result.exit_status == 43  # main's return value, argc == 3
    # Without a C library, <stdio.h> is not there: the error says where to get one.
    hosted = tmp_path / "hosted.c"
    hosted.write_text('#include <stdio.h>\nint main(void) { puts("hi"); return 0; }\n')
    with pytest.raises(sdk.BuildError) as exc:
        sdk.build([hosted], tmp_path / "hosted.elf", toolchain=gcc)
    assert "stdio.h" in str(exc.value)
    assert str(exc.value).endswith(f"({sdk.FREESTANDING_HINT})")


def test_the_gcc_fallback_from_the_command_line(tmp_path: Path) -> None:
    _gcc()
    src = tmp_path / "free.c"
    src.write_text(FREESTANDING)
    out = tmp_path / "free.elf"
    env = dict(os.environ, LGUEST_TOOLCHAIN="gcc")
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "build", str(src), "-o", str(out), "-O2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ran = _cli("run", str(out), "--cmdline", "x")
    assert ran.returncode == 42, ran.stderr
    assert ran.stdout.startswith("free x ")


def test_build_errors_are_one_line_and_status_2(tmp_path: Path) -> None:
    _toolchain()
    missing = _cli("build", str(tmp_path / "nope.c"), "-o", str(tmp_path / "x.elf"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith("supervisor: error: ")
    bad = tmp_path / "bad.c"
    bad.write_text("int main(void) { return undeclared; }\n")
    failed = _cli("build", str(bad), "-o", str(tmp_path / "x.elf"))
    assert failed.returncode == 2
    assert "undeclared" in failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == "supervisor: error: build failed"
    assert not (tmp_path / "x.elf").exists()


def test_builds_are_deterministic_and_keep_symbols(portable_guest: Path, tmp_path: Path) -> None:
    a, b = portable_guest, tmp_path / "again" / "portable.elf"
    b.parent.mkdir()  # the build creates no directory
    done = _cli("build", str(PORTABLE), "-o", str(b), "-O2", "-Wall", "-Werror")
    assert done.returncode == 0, done.stderr
    assert a.read_bytes() == b.read_bytes()
    data = a.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 1  # ELF32
    assert b"\0main\0" in data and b"__lguest_syscall" in data  # symbols kept
    ziglang = importlib.util.find_spec("ziglang")
    assert ziglang is not None
    zig = Path(ziglang.origin or "").parent
    assert os.fsencode(str(zig)) not in data and os.fsencode(str(HERE)) not in data  # no DWARF
    assert len(data) < 200_000
    debug = tmp_path / "g" / "portable.elf"
    debug.parent.mkdir()
    done = _cli("build", str(PORTABLE), "-o", str(debug), "-g")
    assert done.returncode == 0, done.stderr
    assert b".debug_line" in debug.read_bytes()


ATAN2 = r"""
#include <math.h>
#include <stdio.h>
int main(void) {
    volatile double y = 0.3, x = -2.5;
    printf("%a %a\n", atan2(y, x), remainder(x, y));
    return 0;
}
"""


def test_zig_env_gives_directories_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zig names its lib directory relative to where it ran when that lies below it (a
    virtual environment in the working directory); builds compile in another directory,
    so zig_env makes every directory absolute and leaves other fields alone."""
    monkeypatch.chdir(tmp_path)
    said = "\n".join(
        [
            ".{",
            '.lib_dir = ".venv/zig/lib",',
            '.global_cache_dir = "/abs/cache",',
            '.version = "1.0",',
            "}",
        ]
    )
    fake = (sys.executable, "-c", f"print({said!r})")
    env = libm.zig_env(fake)
    assert env["lib_dir"] == str(tmp_path / ".venv" / "zig" / "lib")
    assert env["global_cache_dir"] == "/abs/cache" and env["version"] == "1.0"


def test_the_libm_archive_is_built_once_per_zig_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """musl's C for the x87-assembly libm functions (sdk/libm.py) is built into Zig's
    global cache by the first build and only read by the next; a build that cannot
    write the cache builds it for itself.  The images are the same bytes every way,
    and link the C versions (their objects name their source files)."""
    tc = _toolchain()
    real = libm.zig_env(tc.cc[:-1])
    cache = tmp_path / "cache"

    def env(zig: tuple[str, ...]) -> dict[str, str]:
        return {**real, "global_cache_dir": str(cache)}

    monkeypatch.setattr(libm, "zig_env", env)
    src = tmp_path / "atan2.c"
    src.write_text(ATAN2)
    for name in ("first", "again", "alone"):  # the image's name is its argv[0]: the same
        (tmp_path / name).mkdir()
    first = sdk.build([src], tmp_path / "first" / "g.elf", sdk.BuildOptions(optimize="2"), tc)
    archives = list(cache.glob(f"{libm.ARCHIVE_PREFIX}*.a"))
    assert len(archives) == 1
    built = archives[0].stat()
    again = sdk.build([src], tmp_path / "again" / "g.elf", sdk.BuildOptions(optimize="2"), tc)
    now = archives[0].stat()
    assert (now.st_ino, now.st_mtime_ns) == (built.st_ino, built.st_mtime_ns)
    left = [p for p in cache.iterdir() if p.name.startswith(libm.ARCHIVE_PREFIX)]
    assert left == archives  # no temporary file left behind
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "cache"  # cannot be created
    alone = sdk.build([src], tmp_path / "alone" / "g.elf", sdk.BuildOptions(optimize="2"), tc)
    assert not cache.exists()
    assert first.read_bytes() == again.read_bytes() == alone.read_bytes()
    symbols = first.read_bytes()
    assert b"\0atan2.c\0" in symbols and b"\0remainder.c\0" in symbols
    assert b"\0logl.c\0" not in symbols  # members the program does not call stay out


# -- the C guests in guests/c -------------------------------------------------------------

GUESTS = HERE.parent / "guests"
PINNED_ZIG = "0.17.1"  # pyproject.toml's sdk extra: the version the images were built with


def test_committed_c_guests_rebuild_byte_identical() -> None:
    toolchain = _toolchain()
    if toolchain.version != PINNED_ZIG:
        pytest.skip(f"images were built with Zig {PINNED_ZIG}, this is {toolchain.version}")
    names = [f"c/{src.stem}" for src in sorted((GUESTS / "c").glob("*.c"))]
    assert len(names) >= 5
    done = subprocess.run(
        [sys.executable, str(GUESTS / "build.py"), "--check", "--only", "c"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == len(names)


async def test_c_hello() -> None:
    lines, result = await run_guest(GUESTS / "c" / "hello.elf")
    assert lines == ["Hello from an lguest guest!"]
    assert result == Exit(0, "power off", 0, died=False)


async def test_c_echo() -> None:
    lines, result = await run_guest(GUESTS / "c" / "echo.elf", stdin="hello\nquit\nmore\n")
    assert lines == ["hello", "quit", "bye"]
    assert result.ok
    lines, result = await run_guest(GUESTS / "c" / "echo.elf", stdin="no quit\nat all")
    assert lines == ["no quit", "at all"]
    assert result.ok


async def test_c_ticker() -> None:
    lines, result = await run_guest(GUESTS / "c" / "ticker.elf", cmdline="ticks=3 period_ms=1")
    assert lines == ["tick 1", "tick 2", "tick 3", "done"]
    assert result.ok


async def test_c_blockcopy(tmp_path: Path) -> None:
    data = os.urandom(20 * 512)
    disk = tmp_path / "disk.img"
    disk.write_bytes(data)
    async with Supervisor() as sup:
        image = GUESTS / "c" / "blockcopy.elf"
        guest = await sup.launch(GuestConfig(image=image, memory="1M", block=disk))
        async with asyncio.timeout(LIMIT):
            assert [line async for line in guest.console] == ["blockcopy ok"]
            assert (await guest.wait()).ok
        after = disk.read_bytes()
        assert after[8 * 512 : 16 * 512] == data[: 8 * 512]
        assert after[16 * 512 :] == data[16 * 512 :]
        guest = await sup.launch(
            GuestConfig(image=image, memory="1M", block=disk, block_readonly=True)
        )
        async with asyncio.timeout(LIMIT):
            assert [line async for line in guest.console] == ["read-only block device"]
            assert (await guest.wait()).exit_status == 3
        guest = await sup.launch(GuestConfig(image=image, memory="1M"))
        async with asyncio.timeout(LIMIT):
            assert [line async for line in guest.console] == ["no block device"]
            assert (await guest.wait()).exit_status == 2


async def test_c_sieve_checksum() -> None:
    lines, result = await run_guest(GUESTS / "c" / "sieve.elf", cmdline="n=100000", memory="1M")
    assert lines == ["sieve n=100000 rounds=1", "primes up to 100000: 9592, checksum 454396537"]
    assert result.ok


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")
def test_a_g_build_shows_c_source_lines_in_gdb(tmp_path: Path) -> None:
    _toolchain()
    image = tmp_path / "sieve.elf"
    done = _cli("build", str(GUESTS / "c" / "sieve.c"), "-o", str(image), "-g", "-O1")
    assert done.returncode == 0, done.stderr
    sup = subprocess.Popen(
        [sys.executable, "-m", "supervisor", "run", str(image), "--memory", "4M",
         "--cmdline", "n=1000", "--gdb", "127.0.0.1:0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sup.stderr is not None
        banner = sup.stderr.readline()
        host, port = banner.split()[-1].rsplit(":", 1)
        gdb = subprocess.run(
            [str(shutil.which("gdb")), "-batch", "-nx",
             "-ex", "set architecture i386",
             "-ex", f"target remote {host}:{port}",
             "-ex", "break sieve_rounds",
             "-ex", "continue",
             "-ex", "bt 2",
             "-ex", "delete",
             "-ex", "continue", str(image)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        out, _err = sup.communicate(timeout=60)
    finally:
        sup.kill()
    assert re.search(r"sieve_rounds \(composite=.*n=1000, rounds=1.*at sieve\.c:\d+", gdb.stdout), (
        gdb.stdout + gdb.stderr
    )
    assert re.search(r"in main \(argc=2, argv=.*at sieve\.c:\d+", gdb.stdout)
    assert out.endswith("primes up to 1000: 168, checksum 76127\n")


async def test_a_stack_overflow_hits_the_guard_page(build_guest: BuildGuest) -> None:
    """The stack (8 MiB by default, at most half the free memory) sits above an unmapped
    guard page."""
    source = r"""
#include <stdio.h>
static int deep(int n) {
    volatile char pad[512];
    pad[0] = (char)n;
    return n ? deep(n - 1) + pad[0] : 0;
}
extern unsigned __lguest_stack_guard_page;
int main(int argc, char **argv) {
    printf("%#x\n", __lguest_stack_guard_page);
    fflush(stdout);
    printf("%d\n", deep(argc > 1 ? 1000000 : 10));
    return 0;
}
"""
    image = build_guest(source, flags=["-O1"])
    lines, result = await run_guest(image)
    assert result.ok and lines[1:] == ["55"]  # shallow: fine
    lines, result = await run_guest(image, cmdline="deep")
    assert result.died
    # The Host cannot push the page fault's frame on a stack inside the guard page.
    match = re.fullmatch(
        r"cannot push interrupt frame: stack at (0x[0-9a-f]+) is not writable", result.reason
    )
    assert match, result.reason
    guard = int(lines[0], 16)
    assert guard <= int(match[1], 16) < guard + 4096


def test_every_sdk_file_is_packaged_by_the_package_of_its_folder() -> None:
    """An installed wheel carries the sdk's headers, runtime sources and linker script:
    each folder under supervisor/ that holds files is a package of pyproject.toml (so
    setuptools neither warns that an importable folder is left out nor drops its files),
    and each non-Python file matches that package's package-data patterns."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parent.parent
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, data = set(tool["packages"]), tool["package-data"]
    sdk = root / "supervisor" / "sdk"
    shipped = [p for p in sdk.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.suffix == ".h" for p in shipped) and any(p.suffix == ".c" for p in shipped)
    for path in shipped:
        package = ".".join(path.parent.relative_to(root).parts)
        assert package in packages, f"{package} is not a package of pyproject.toml"
        if path.suffix != ".py":
            patterns = data.get(package, [])
            assert any(fnmatch.fnmatch(path.name, pat) for pat in patterns), path
