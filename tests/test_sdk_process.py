"""C guests start as a Linux process does: FPU and SSE reset values, exact double
arithmetic (SSE2), and what the runtime hands ``main`` (environment, auxv, stack).

Needs the ``sdk`` extra (Zig's C compiler); without it these tests skip.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from refused import refused_here

from supervisor import Exit, GuestConfig, Supervisor, sdk
from supervisor.launcher.console import LineStream
from supervisor.pytest_plugin import BuildGuest
from supervisor.sdk import libm

# The subject is a C guest's start-up state, not the event loop: one loop (conftest).
pytestmark = pytest.mark.one_loop

HERE = Path(__file__).resolve().parent
FPTABLE = HERE / "c" / "fptable.c"
LIBMSWEEP = HERE / "c" / "libmsweep.c"
LIMIT = 120  # seconds: a bound for failing, never a wait for success
SWEEP_ARGUMENTS = 400  # per function in the default run; the soak run takes libmsweep's 4,000


def _zig() -> sdk.Toolchain:
    try:
        return sdk.find_toolchain("zig")
    except sdk.ToolchainError as exc:
        pytest.skip(str(exc))


async def _run(
    image: Path, stdin: str | None = None, memory: str = "16M", **config: object
) -> tuple[list[str], Exit]:
    async with Supervisor() as sup:
        guest = await sup.launch(GuestConfig(image=image, memory=memory, **config))
        if stdin is not None:
            guest.send(stdin)
            guest.send_eof()
        async with asyncio.timeout(LIMIT):
            lines = [line async for line in guest.console]
            return lines, await guest.wait()


FPU_STATE = r"""
#include <stdio.h>
#include <time.h>
static void show(const char *when) {
    unsigned mxcsr; unsigned short fcw;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(fcw));
    printf("%s mxcsr=%#x fcw=%#x\n", when, mxcsr, fcw);
}
int main(void) {
    show("start");
    unsigned down = 0x3f80; unsigned short cw = 0x27f;  /* round down; 53-bit x87 */
    __asm__ volatile("ldmxcsr %0" : : "m"(down));
    __asm__ volatile("fldcw %0" : : "m"(cw));
    struct timespec a, b;  /* the snapshot is taken while it spins here */
    clock_gettime(CLOCK_MONOTONIC, &a);
    do clock_gettime(CLOCK_MONOTONIC, &b);
    while ((b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec) < 500000000);
    show("after");
    return 0;
}
"""


async def test_fpu_and_sse_start_as_after_reset_and_survive_a_snapshot(
    build_guest: BuildGuest,
) -> None:
    """FCW 0x37F and MXCSR 0x1F80 at start (SSE enabled: stmxcsr would be #UD without
    CR4.OSFXSR), and what the guest set is still there in a restored snapshot."""
    _zig()
    image = build_guest(FPU_STATE, flags=["-O2"])
    async with Supervisor() as sup, asyncio.timeout(LIMIT):
        guest = await sup.launch(GuestConfig(image=image, memory="16M"))
        async for line in guest.console:
            assert line == "start mxcsr=0x1f80 fcw=0x37f"
            break
        await guest.pause()
        snap = await guest.snapshot()
        await guest.kill("snapshot taken")
        copy = await sup.restore(snap)
        assert [line async for line in copy.console] == ["after mxcsr=0x3f80 fcw=0x27f"]
        assert (await copy.wait()).ok


def test_double_arithmetic_is_bit_identical_to_x86_64(tmp_path: Path) -> None:
    """tests/c/fptable.c (floor, ceil, trunc, round, rint, nearbyint, lrint, modf, fmod,
    pow, exp, log, sqrt, fma, printf's %.17g/%a, the rounding modes, over zeros,
    infinities, NaN, halves, 2^52 neighbours, subnormals) prints the same bytes in a
    guest as the same source built natively for x86_64-linux-musl.

    The reference is x86-64 rather than a native i386 build of the guest's own flags:
    x86-64 does doubles in SSE2 by its ABI, independent of the guest's build choices,
    whereas an i386 build with the guest's flags would agree with a guest even where
    both were wrong (x87 extended precision rounds twice: floor(0.5 + 2^52 - 2^52),
    exp's last bit).  Both use musl's portable C for these functions."""
    zig = _zig()
    native = tmp_path / "fptable"
    subprocess.run(
        [*zig.cc, "-target", "x86_64-linux-musl", "-static", "-O2", "-Wall", "-Werror",
         str(FPTABLE), "-o", str(native)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    expected = subprocess.run([native], capture_output=True, timeout=60, check=True).stdout
    image = sdk.build([FPTABLE], tmp_path / "fptable.elf",
                      sdk.BuildOptions(optimize="2", warnings=["all", "error"]), zig)  # fmt: skip
    got = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", str(image), "--memory", "16M"],
        capture_output=True, timeout=600,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert len(expected.splitlines()) > 6000
    assert got.stdout.decode().splitlines() == expected.decode().splitlines()


def _native_x86_64(
    zig: sdk.Toolchain,
    out: Path,
    *sources: Path,
    flags: Sequence[str] = (),
    args: Sequence[str] = (),
) -> str:
    subprocess.run(
        [*zig.cc, "-target", "x86_64-linux-musl", "-static", "-O2", *flags,
         *map(str, sources), "-o", str(out)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    done = subprocess.run([out, *args], capture_output=True, timeout=120, check=True, text=True)
    return done.stdout


@pytest.mark.parametrize(
    "arguments",
    [SWEEP_ARGUMENTS, pytest.param(None, marks=pytest.mark.soak, id="all")],
)
def test_libm_is_bit_identical_to_x86_64_over_many_arguments(
    tmp_path: Path, arguments: int | None
) -> None:
    """tests/c/libmsweep.c: the functions whose musl i386 versions are x87 assembly
    (atan2, atan2f, asinf, the remainders, ldexp, scalbn, llrint and their long double
    forms, logl, expl...) and the common ones beside them, over ``arguments`` each
    (None: the program's default, 4,000, in the soak run).

    double and float: the same bits as x86-64's musl.  long double: x86-64's musl
    computes these with x87 transcendental instructions, which the emulator rounds
    through host doubles; the guest links musl's portable C for them instead
    (sdk/libm.py), so the guest equals x86-64 running that same C."""
    zig = _zig()
    args = [] if arguments is None else [str(arguments)]
    plain = _native_x86_64(
        zig, tmp_path / "sweep", LIBMSWEEP, flags=["-Wall", "-Werror"], args=args
    )
    env = libm.zig_env(zig.cc[:-1])
    musl = Path(env["lib_dir"]) / "libc" / "musl"
    alltypes = Path(env["lib_dir"]) / "libc" / "include" / "x86_64-linux-musl"
    objects = []
    for name in libm.LONG_DOUBLE_SOURCES:
        obj = tmp_path / f"{name}.o"
        subprocess.run(
            [*zig.cc, "-target", "x86_64-linux-musl", "-O2",
             *libm.musl_flags(musl, "x86_64", alltypes), "-c", f"{name}.c", "-o", str(obj)],
            check=True, capture_output=True, timeout=600, cwd=musl / "src" / "math",
        )  # fmt: skip
        objects.append(obj)
    with_c = _native_x86_64(zig, tmp_path / "sweep-c", LIBMSWEEP, *objects, args=args)
    image = sdk.build([LIBMSWEEP], tmp_path / "sweep.elf",
                      sdk.BuildOptions(optimize="2", warnings=["all", "error"]), zig)  # fmt: skip
    cmdline = ["--cmdline", *args] if args else []
    got = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", str(image), "--memory", "16M", *cmdline],
        capture_output=True, timeout=600, text=True,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    lines = got.stdout.splitlines()
    assert len(lines) > 80
    count = "4000" if arguments is None else str(arguments)
    assert all(line.split()[2] == count for line in lines)  # (the arguments asked for)
    assert lines == with_c.splitlines()
    exact = [line for line in lines if line.split()[1] != "ld"]
    assert len(exact) > 50
    assert exact == [line for line in plain.splitlines() if line.split()[1] != "ld"]


CLOCKS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
extern unsigned long __lguest_syscalls;  /* the runtime's count of system calls served */
int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 0, back = 0;
    struct timespec prev, now, rt = {0, 0};
    struct timeval tv = {0, 0};
    unsigned long before = __lguest_syscalls;
    clock_gettime(CLOCK_MONOTONIC, &prev);
    for (long i = 0; i < n; i++) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec < prev.tv_sec || (now.tv_sec == prev.tv_sec && now.tv_nsec < prev.tv_nsec))
            back++;
        if (now.tv_nsec < 0 || now.tv_nsec >= 1000000000) back++;
        prev = now;
        clock_gettime(CLOCK_REALTIME, &rt);
        gettimeofday(&tv, NULL);
        if (time(NULL) < rt.tv_sec || tv.tv_usec < 0 || tv.tv_usec >= 1000000) back++;
    }
    unsigned long during = __lguest_syscalls - before;
    syscall(SYS_clock_gettime64, CLOCK_MONOTONIC, &now);  /* the system call path counts */
    unsigned long control = __lguest_syscalls - before - during;
    for (int i = 0; i < 1000; i++) {  /* the fast path agrees with the system call's */
        struct timespec a, b, c;
        clock_gettime(CLOCK_MONOTONIC, &a);
        syscall(SYS_clock_gettime64, CLOCK_MONOTONIC, &b);
        clock_gettime(CLOCK_MONOTONIC, &c);
        long long na = a.tv_sec * 1000000000LL + a.tv_nsec;
        long long nb = b.tv_sec * 1000000000LL + b.tv_nsec;
        long long nc = c.tv_sec * 1000000000LL + c.tv_nsec;
        if (na > nb || nb > nc || a.tv_nsec >= 1000000000 || c.tv_nsec >= 1000000000) back++;
    }
    printf("%ld %lu %lu %lld %lld\n", back, during, control, (long long)rt.tv_sec,
           (long long)tv.tv_sec);
    return 0;
}
"""


async def test_clocks_make_no_system_call_and_never_go_back(build_guest: BuildGuest) -> None:
    """clock_gettime, gettimeofday and time are the runtime's own functions, as a vDSO's
    are: 20,000 rounds of them reach the system call dispatcher zero times (one direct
    syscall does, so the count works), the monotonic clock never goes back, nanoseconds
    stay in range, the fast path's time lies between its neighbours' through the system
    call, and the realtime clock is the host's."""
    _zig()
    image = build_guest(CLOCKS, flags=["-O2"])
    lines, result = await _run(image, cmdline="20000")
    assert result.ok, result
    back, during, control, realtime, tv_sec = map(int, lines[0].split())
    assert (back, during, control) == (0, 0, 1)
    assert abs(realtime - time.time()) < 60 and tv_sec in (realtime, realtime + 1)


PROCESS = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/random.h>
extern char **environ;
extern unsigned __lguest_stack_guard_page, __lguest_stack_top;
__attribute__((noinline)) static long use(volatile char *pad, long n) {
    for (int i = 0; i < 1024; i += 64) pad[i] = (char)n;
    return pad[0];
}
__attribute__((noinline)) static long deep(long n) {
    volatile char pad[1024];
    long here = use(pad, n);
    return n ? deep(n - 1) + here - (char)n + 1 : 0;
}
int main(int argc, char **argv) {
    for (char **e = environ; *e; e++) printf("env %s\n", *e);
    unsigned char *r = (unsigned char *)getauxval(AT_RANDOM), a[16], b[16];
    printf("auxv pagesz=%lu sse2=%lu random=", getauxval(AT_PAGESZ), getauxval(AT_HWCAP) >> 26 & 1);
    for (int i = 0; i < 16; i++) printf("%02x", r[i]);
    long got = getrandom(a, sizeof a, 0) + getrandom(b, sizeof b, 0);
    printf("\ngetrandom %ld %s\n", got, memcmp(a, b, 16) ? "differ" : "same");
    printf("stack %u\n", __lguest_stack_top - __lguest_stack_guard_page - 4096);
    fflush(stdout);
    long frames = argc > 1 ? atol(argv[1]) : 0;
    printf("deep %ld\n", deep(frames));
    return 0;
}
"""


@pytest.fixture(scope="module")
def process_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tc = _zig()
    src = tmp_path_factory.mktemp("process") / "process.c"
    src.write_text(PROCESS)
    return sdk.build([src], src.with_suffix(".elf"), sdk.BuildOptions(optimize="1"), tc)


def _env_and_rest(lines: list[str]) -> tuple[list[str], dict[str, str]]:
    env = [line.removeprefix("env ") for line in lines if line.startswith("env ")]
    rest = dict(line.split(" ", 1) for line in lines if not line.startswith("env "))
    return env, rest


async def test_the_environment_is_exactly_the_configured_one(
    process_guest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GuestConfig.env reaches environ in order; nothing of the host's environment does."""
    monkeypatch.setenv("LGUEST_HOST_SECRET", "leaked")
    env = {"PATH": "/bin:/usr/bin", "HOME": "/", "SPACES": "a b  c", "EMPTY": "", "U": "é"}
    lines, result = await _run(process_guest, env=env)
    assert result.ok, result
    seen, _rest = _env_and_rest(lines)
    assert seen == [f"{k}={v}" for k, v in env.items()]
    lines, result = await _run(process_guest)
    assert result.ok and _env_and_rest(lines)[0] == []


def test_env_from_the_command_line_and_its_errors(process_guest: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "supervisor", "run", str(process_guest), *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    done = run("--env", "A=1", "--env", "B=x=y", "--env", "A=2")
    assert done.returncode == 0, done.stderr
    assert _env_and_rest(done.stdout.splitlines())[0] == ["A=2", "B=x=y"]
    for bad, message in (
        ("NOEQUALS", "supervisor: error: --env 'NOEQUALS' is not NAME=VALUE"),
        ("=x", "supervisor: error: --env '=x' is not NAME=VALUE"),
        ("X=" + "a" * 2000, "supervisor: error: env: environment of 2003 bytes, more than "
         "the 1792 allowed"),
    ):  # fmt: skip
        done = refused_here("run", str(process_guest), "--env", bad)
        assert (done.returncode, done.stderr) == (2, message + "\n")


def test_a_bad_environment_is_a_config_error(process_guest: Path) -> None:
    from supervisor.config import ConfigError

    for env in ({"A=B": "x"}, {"": "x"}, {"A": "x\0y"}, {"BIG": "v" * 1800}):
        with pytest.raises(ConfigError, match=r"^env"):
            GuestConfig(image=process_guest, env=env)
    GuestConfig(image=process_guest, env={"FITS": "v" * 1780})


async def test_auxv_getrandom_and_an_8_mib_stack(process_guest: Path) -> None:
    """AT_PAGESZ, AT_HWCAP (SSE2), 16 AT_RANDOM bytes that differ between boots,
    getrandom; an 8 MiB stack takes 7 MiB of 1 KiB frames, 9 MiB hit the guard page."""
    first, result = await _run(process_guest, cmdline="7000")
    assert result.ok, result
    again, result = await _run(process_guest, memory="32M")
    assert result.ok, result
    _env, one = _env_and_rest(first)
    _env, two = _env_and_rest(again)
    pagesz, sse2, random = one["auxv"].split()
    assert (pagesz, sse2) == ("pagesz=4096", "sse2=1")
    assert len(random) == len("random=") + 32 and random != two["auxv"].split()[2]
    assert one["getrandom"] == "32 differ"
    assert one["stack"] == two["stack"] == str(8 << 20)
    assert one["deep"] == "7000"
    _lines, result = await _run(process_guest, cmdline="9500")
    assert result.died and "cannot push interrupt frame" in result.reason, result


async def test_small_memory_halves_the_default_stack_and_a_too_big_one_says_so(
    process_guest: Path, tmp_path: Path
) -> None:
    lines, result = await _run(process_guest, memory="4M")
    assert result.ok, result
    stack = int(_env_and_rest(lines)[1]["stack"])
    assert 1 << 20 < stack < 2 << 20  # half of ~3.9 MiB free
    src = tmp_path / "big.c"
    src.write_text(PROCESS)
    big = sdk.build([src], tmp_path / "big.elf", sdk.BuildOptions(stack_size=32 << 20), _zig())
    lines, result = await _run(big, memory="16M")
    assert result.died
    assert result.reason.startswith(
        "CRASH: stack (--stack-size) of 0x02000000 bytes does not fit in the memory free "
        "for it (give more --memory: free 0x"
    ), result.reason
    lines, result = await _run(big, memory="64M")
    assert result.ok and _env_and_rest(lines)[1]["stack"] == str(32 << 20)


STREAMS = r"""
#include <stdio.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    printf("out 1\n");
    fprintf(stderr, "err 1\n");
    fflush(stdout);
    if (argc > 1) {  /* snapshot: taken while it spins here */
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        do clock_gettime(CLOCK_MONOTONIC, &b);
        while ((b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec) < 500000000);
    }
    puts("out 2");
    fputs("err 2 without newline", stderr);
    write(2, "\n", 1);
    return 3;
}
"""


@pytest.fixture(scope="module")
def streams_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tc = _zig()
    src = tmp_path_factory.mktemp("streams") / "streams.c"
    src.write_text(STREAMS)
    return sdk.build([src], src.with_suffix(".elf"), sdk.BuildOptions(optimize="1"), tc)


def test_run_writes_the_guest_s_stderr_to_stderr(streams_guest: Path) -> None:
    """`run IMAGE 2>/dev/null` keeps exactly the guest's stdout, and its stderr is on ours."""
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", str(streams_guest)],
        capture_output=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 3
    assert done.stdout == b"out 1\nout 2\n"
    assert done.stderr == b"err 1\nerr 2 without newline\n"


def test_swarm_prefix_shows_both_streams(streams_guest: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "swarm", str(streams_guest), "-n", "2",
         "--console", "prefix"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    for i in range(2):
        out = [line for line in done.stdout.splitlines() if line.startswith(f"streams-{i}: ")]
        err = [line for line in done.stderr.splitlines() if line.startswith(f"streams-{i}: ")]
        assert out == [f"streams-{i}: out 1", f"streams-{i}: out 2"]
        assert err == [f"streams-{i}: err 1", f"streams-{i}: err 2 without newline"]


async def test_guest_stderr_is_a_stream_of_its_own_and_survives_a_snapshot(
    streams_guest: Path,
) -> None:
    lines, result = await _run(streams_guest)
    assert lines == ["out 1", "out 2"] and result.exit_status == 3
    async with Supervisor() as sup, asyncio.timeout(LIMIT):
        guest = await sup.launch(GuestConfig(image=streams_guest, cmdline="spin"))
        stdout, stderr = await asyncio.gather(_first(guest.console), _first(guest.stderr))
        assert (stdout, stderr) == ("out 1", "err 1")
        await guest.pause()
        snap = await guest.snapshot()
        await guest.kill("snapshot taken")
        copy = await sup.restore(snap)
        out, err = await asyncio.gather(_all(copy.console), _all(copy.stderr))
        assert (out, err) == (["out 2"], ["err 2 without newline"])
        assert (await copy.wait()).exit_status == 3


async def _first(lines: LineStream) -> str:
    async for line in lines:
        return line
    raise AssertionError("no line")


async def _all(lines: LineStream) -> list[str]:
    return [line async for line in lines]
