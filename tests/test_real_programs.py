"""Real programs, unmodified, in guests, against a native build of the same sources.

zlib (zlib-ng in zlib-compat mode): its own ``test/example.c``, and ``minigzip``
compressing and decompressing a 10 MB file under ``--dir``.  SQLite: the
amalgamation's shell runs a SQL script that writes a database into a ``--dir``;
Python's ``sqlite3`` reads it back.  ERFA: its own validation program ``t_erfa_c -v``
prints every check, with the double it wants and the one it got.  The sources come
from PyPI sdists, built by tests/realprograms.py in the background while the rest of
the suite runs; these tests run last.  Without PyPI they skip (one line saying so).
The preparation's own checks (the pinned hash, the tarball's members, the generated
headers) are tested here too, without the network.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import realprograms

LIMIT = 600  # seconds: a bound for failing, never a wait for success
DATA_SIZE = 10 * 1024 * 1024

SCRIPT = """\
CREATE TABLE dept(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, budget REAL);
CREATE TABLE emp(id INTEGER PRIMARY KEY, name TEXT, dept_id INTEGER REFERENCES dept(id),
                 salary REAL, hired TEXT);
CREATE INDEX emp_dept ON emp(dept_id);
CREATE INDEX emp_salary ON emp(salary DESC);
BEGIN;
INSERT INTO dept(name, budget)
  VALUES ('kernel', 1.5e6), ('network', 987654.321), ('storage', 0.1), ('tools', 2.0 / 3.0);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
INSERT INTO emp(name, dept_id, salary, hired)
  SELECT 'e' || i, 1 + (i * 7) % 4, 1000.0 + (i * 37 % 1000) / 7.0 + i * 0.01,
         date('2020-01-01', '+' || (i * 13 % 1500) || ' days')
  FROM n;
COMMIT;
BEGIN;
DELETE FROM emp WHERE id % 10 = 0;
UPDATE dept SET budget = budget * 1.1 WHERE name = 'network';
ROLLBACK;
BEGIN;
UPDATE emp SET salary = salary * 1.05 WHERE dept_id = 2;
DELETE FROM emp WHERE id % 97 = 0;
COMMIT;
SELECT d.name, count(*), printf('%.6f', avg(e.salary)), printf('%.17g', sum(e.salary)),
       min(e.hired), max(e.hired)
  FROM emp e JOIN dept d ON d.id = e.dept_id GROUP BY d.name ORDER BY d.name;
SELECT name, printf('%.17g', budget), printf('%e', budget), printf('%g', budget)
  FROM dept ORDER BY id;
SELECT e.name, d.name, printf('%.3f', e.salary) FROM emp e JOIN dept d ON d.id = e.dept_id
  WHERE e.salary > 1140 ORDER BY e.salary DESC, e.id LIMIT 8;
SELECT count(*), total(salary), printf('%.17g', sd) FROM emp,
  (SELECT sqrt(avg(salary * salary) - avg(salary) * avg(salary)) AS sd FROM emp);
SELECT 0.1 + 0.2, 1e308 * 10, -0.0, 1.0 / 3, printf('%.20f', 1.0 / 3), 2.5e-310,
       round(2.675, 2), 12345678901234567 * 1.0, exp(1), ln(10), pow(2, 0.5);
SELECT substr(hired, 1, 4) AS y, count(*) FROM emp GROUP BY y HAVING count(*) > 10 ORDER BY y;
PRAGMA integrity_check;
"""

# What the test asks of both databases through Python's sqlite3 module.
QUERIES = (
    "SELECT d.name, count(*), avg(e.salary), sum(e.salary) FROM emp e"
    " JOIN dept d ON d.id = e.dept_id GROUP BY d.name ORDER BY d.name",
    "SELECT * FROM dept ORDER BY id",
    "SELECT id, name, dept_id, salary, hired FROM emp WHERE dept_id = 2 ORDER BY salary DESC",
    "SELECT count(*) FROM emp WHERE id % 10 = 0",
    "SELECT name FROM sqlite_schema WHERE type = 'index' ORDER BY name",
    "PRAGMA integrity_check",
)


def run_guest(
    image: Path, args: Sequence[str], grant: Path, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """``supervisor run IMAGE`` with ``grant`` as ``/w`` (also the working directory); the
    command line in ``--cmdline=`` form, since it may start with ``-``."""
    cmd = [
        sys.executable, "-m", "supervisor", "run", str(image), "--dir", f"{grant}::/w",
        "--workdir", "/w", "--env", "HOME=/w", f"--cmdline={' '.join(args)}",
    ]  # fmt: skip
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=LIMIT)


def run_native(
    exe: Path, args: Sequence[str], cwd: Path, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """``exe`` in ``cwd``, with nothing from the user's home (no ~/.sqliterc)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), "LC_ALL": "C"}
    return subprocess.run(
        [str(exe), *args], input=stdin, capture_output=True, cwd=cwd, env=env, timeout=LIMIT
    )


def succeeded(done: subprocess.CompletedProcess[bytes]) -> str:
    """The run's stdout; a failure message with its stderr if it did not exit 0."""
    assert done.returncode == 0, (
        f"exit status {done.returncode}\nstdout: {done.stdout[-2000:]!r}\n"
        f"stderr: {done.stderr[-2000:]!r}"
    )
    return done.stdout.decode()


@pytest.mark.real_programs
@pytest.mark.slow
def test_zlib_example_passes_as_natively(pytestconfig: pytest.Config, tmp_path: Path) -> None:
    """zlib's own test program: every check passes and prints what the native build
    prints.  The first line's ``compile flags`` encode type sizes: the guest is ILP32
    (uLong and pointers 32 bits), the host LP64, and z_off_t is 64 bits on both."""
    example = realprograms.wait(pytestconfig)["example"]
    (tmp_path / "guest").mkdir()
    (tmp_path / "native").mkdir()
    guest = succeeded(run_guest(example.guest, [], tmp_path / "guest"))
    native = succeeded(run_native(example.native, [], tmp_path / "native"))

    flags = re.compile(r"^(zlib-ng version .* compile flags = )0x([0-9a-f]+)\n", re.MULTILINE)
    g, n = flags.match(guest), flags.match(native)
    assert g is not None and n is not None, (guest, native)
    uint, ulong, voidpf, z_off_t = 0x3, 0x3 << 2, 0x3 << 4, 0x3 << 6
    bits32, bits64 = 1, 2
    native_flags = int(n.group(2), 16)
    assert native_flags & (ulong | voidpf | z_off_t) == (bits64 << 2 | bits64 << 4 | bits64 << 6)
    expected = native_flags & ~(ulong | voidpf) | bits32 << 2 | bits32 << 4
    assert int(g.group(2), 16) == expected
    assert native_flags & uint == bits32
    assert guest[g.end() :] == native[n.end() :]
    assert "deflatePrime(): OK" in guest  # the last of its checks
    # its gz file test wrote foo.gz in the working directory, the same bytes both ways
    assert (tmp_path / "guest" / "foo.gz").read_bytes() == (
        tmp_path / "native" / "foo.gz"
    ).read_bytes()


def deterministic_data(size: int) -> bytes:
    """Text-like lines that deflate finds matches in, from SHA-256 of a counter."""
    words = (
        b"the quick brown fox jumps over lazy dog zlib deflate inflate guest host lguest "
        b"asyncio window huffman literal length distance block"
    ).split()
    out = bytearray()
    i = 0
    while len(out) < size:
        h = hashlib.sha256(i.to_bytes(8, "little")).digest()
        out += b"%08d " % i + b" ".join(words[b % len(words)] for b in h[:12])
        out += b" " + h[12:20].hex().encode() + b"\n"
        i += 1
    return bytes(out[:size])


@pytest.mark.real_programs
@pytest.mark.slow
def test_minigzip_10mb_round_trip_byte_identical(
    pytestconfig: pytest.Config, tmp_path: Path
) -> None:
    minigzip = realprograms.wait(pytestconfig)["minigzip"]
    data = deterministic_data(DATA_SIZE)
    guest_dir, native_dir = tmp_path / "guest", tmp_path / "native"
    for d in (guest_dir, native_dir):
        d.mkdir()
        (d / "data").write_bytes(data)

    succeeded(run_guest(minigzip.guest, ["-k", "/w/data"], guest_dir))
    succeeded(run_native(minigzip.native, ["-k", "data"], native_dir))
    packed = (guest_dir / "data.gz").read_bytes()
    assert len(packed) < len(data) // 2
    assert packed == (native_dir / "data.gz").read_bytes()
    assert gzip.decompress(packed) == data  # and Python's zlib reads it

    (guest_dir / "data").unlink()
    succeeded(run_guest(minigzip.guest, ["-d", "/w/data.gz"], guest_dir))
    assert not (guest_dir / "data.gz").exists()  # minigzip -d removes its input
    assert (guest_dir / "data").read_bytes() == data


def rows(db: Path) -> list[list[tuple[object, ...]]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [con.execute(query).fetchall() for query in QUERIES]
    finally:
        con.close()


@pytest.mark.real_programs
@pytest.mark.slow
def test_sqlite_shell_writes_the_database_native_writes(
    pytestconfig: pytest.Config, tmp_path: Path
) -> None:
    shell = realprograms.wait(pytestconfig)["sqlite3"]
    guest_dir, native_dir = tmp_path / "guest", tmp_path / "native"
    guest_dir.mkdir()
    native_dir.mkdir()
    script = SCRIPT.encode()

    guest = run_guest(shell.guest, ["-batch", "/w/test.db"], guest_dir, stdin=script)
    native = run_native(shell.native, ["-batch", "test.db"], native_dir, stdin=script)
    output = succeeded(guest)
    assert output == succeeded(native)
    assert guest.stderr == native.stderr == b""
    assert output.endswith("\nok\n")  # integrity_check, after every query printed
    assert "|0.33333333333333330000|" in output  # printf('%.20f', 1.0 / 3)

    guest_db, native_db = guest_dir / "test.db", native_dir / "test.db"
    assert sorted(p.name for p in guest_dir.iterdir()) == ["test.db"]  # no journal left
    got = rows(guest_db)
    assert got == rows(native_db)
    # the rolled-back DELETE kept its 200 rows; 2 of them (ids 970, 1940) went with % 97
    assert got[3] == [(200 - 2,)]
    assert got[-1] == [("ok",)]
    assert len(got[2]) == 500 - 5  # dept 2 (ids % 4 == 3), less the 5 of them that % 97
    # The same SQLite, the same statements: the same file, page for page.
    assert guest_db.read_bytes() == native_db.read_bytes()


# `NAME passed: WHAT want X got Y`, as t_erfa_c's vvd() (doubles, %.20g) and viv() print
ERFA_CHECK = re.compile(r"^(\w+) passed: (.*) want (\S+) got (\S+)$")
ERFA_DOUBLE_CHECK = re.compile(r"^\w+ passed: .* want \S*[.e]\S* got \S+$")


@pytest.mark.real_programs
@pytest.mark.slow
def test_erfa_validation_passes_with_the_native_results(
    pytestconfig: pytest.Config, tmp_path: Path
) -> None:
    """ERFA's own validation program succeeds in a guest and prints exactly what the
    same sources print built for x86-64 with musl (the guest's C library), line for
    line: every double bit for bit, libm included.

    A native gcc build (glibc's libm) prints the same lines with one exception: a
    check's ``got`` (its result, at %.20g) may differ when both builds passed it with
    the same ``want``.  glibc's and musl's sin, cos, atan2, pow... may round a result
    differently in the last bit (neither promises correct rounding), and ERFA's series
    and iterations carry that into their results.  Such a difference stays below 1e-12
    of the check's scale; ERFA's own tolerance has passed it on both sides."""
    erfa = realprograms.wait(pytestconfig)["t_erfa_c"]
    assert erfa.musl is not None
    for side in ("guest", "native", "musl"):
        (tmp_path / side).mkdir()
    guest = succeeded(run_guest(erfa.guest, ["-v"], tmp_path / "guest")).splitlines()
    native = succeeded(run_native(erfa.native, ["-v"], tmp_path / "native")).splitlines()
    musl = succeeded(run_native(erfa.musl, ["-v"], tmp_path / "musl")).splitlines()

    assert len(guest) > 1000
    assert guest == musl
    assert guest[-1] == native[-1] == "t_erfa_c validation successful"
    assert len(guest) == len(native) > 1000  # every check printed, in the same order
    assert not [line for line in guest if " failed" in line]
    differ = 0
    for g, n in zip(guest, native, strict=True):
        if g == n:
            continue
        gm, nm = ERFA_CHECK.match(g), ERFA_CHECK.match(n)
        assert gm is not None and nm is not None, (g, n)
        assert ERFA_DOUBLE_CHECK.match(g), (g, n)  # integer checks never differ
        assert gm.group(1, 2, 3) == nm.group(1, 2, 3), (g, n)  # same check, same want
        got_g, got_n, want = float(gm.group(4)), float(nm.group(4)), float(gm.group(3))
        assert abs(got_g - got_n) <= 1e-12 * max(1.0, abs(want)), (g, n)
        differ += 1
    # Most results are bit for bit the native ones: double arithmetic in SSE2 is exact.
    assert differ <= len(guest) // 10, differ
    doubles = [line for line in guest if ERFA_DOUBLE_CHECK.match(line)]
    assert len(doubles) > 1000  # the output is numbers, compared above


def test_erfa_is_configured_as_its_configure_does(tmp_path: Path) -> None:
    erfa = tmp_path / "erfa"
    (erfa / "src").mkdir(parents=True)
    (erfa / "configure.ac").write_text(
        "AC_PREREQ([2.71])\nAC_INIT([erfa],[2.0.1])\n"
        'AC_DEFINE([SOFA_VERSION], ["20231011"], [Define to the version of SOFA])\n'
    )
    for name in ("a2af.c", "zr.c", "t_erfa_c.c", "t_erfa_c_extra.c", "erfa.h"):
        (erfa / "src" / name).write_text("")
    realprograms.configure_erfa(erfa, tmp_path / "gen")
    assert (tmp_path / "gen" / "config.h").read_text() == (
        '#define PACKAGE_VERSION "2.0.1"\n#define PACKAGE_VERSION_MAJOR 2\n'
        "#define PACKAGE_VERSION_MINOR 0\n#define PACKAGE_VERSION_MICRO 1\n"
        '#define SOFA_VERSION "20231011"\n'
    )
    assert realprograms.erfa_library_sources(erfa / "src") == [
        erfa / "src" / "a2af.c",
        erfa / "src" / "zr.c",
    ]
    (erfa / "configure.ac").write_text("AC_INIT([erfa])\n")
    with pytest.raises(realprograms.PrepareError, match=r"configure\.ac"):
        realprograms.configure_erfa(erfa, tmp_path / "gen2")


def test_pip_failures_tell_the_network_apart() -> None:
    offline = (
        "WARNING: Retrying (Retry(total=0, ...)) after connection broken by "
        "'NameResolutionError(\"HTTPSConnection(host='pypi.org', port=443): Failed to "
        "resolve 'pypi.org' ([Errno -3] Temporary failure in name resolution)\")'\n"
        "ERROR: No matching distribution found for zlib-ng==1.1.0"
    )
    missing = (
        "ERROR: Could not find a version that satisfies the requirement zlib-ng==9.9 "
        "(from versions: 0.1.0, 1.1.0)\nERROR: No matching distribution found for zlib-ng==9.9"
    )
    assert realprograms.is_network_failure(offline)
    assert not realprograms.is_network_failure(missing)


def test_a_cached_sdist_with_another_hash_is_refused(tmp_path: Path) -> None:
    sdist = realprograms.ZLIB_NG
    (tmp_path / "sdists").mkdir()
    cached = tmp_path / "sdists" / sdist.filename
    cached.write_bytes(b"not the pinned tarball")
    with pytest.raises(realprograms.PrepareError, match="sha256"):
        realprograms.fetch(sdist, tmp_path)
    assert not cached.exists()  # the next run downloads it again


def tarball(path: Path, members: dict[str, bytes | str]) -> None:
    """A .tar.gz with regular files (bytes) and symlinks (str: the target)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def test_extract_takes_only_regular_files_beneath_the_directory(tmp_path: Path) -> None:
    sdist = realprograms.Sdist("demo", "1.0", "")
    good = tmp_path / "good.tar.gz"
    tarball(
        good,
        {"demo-1.0/setup.py": b"x", "demo-1.0/src/a.c": b"int a;", "demo-1.0/src/d/b.h": b"//"},
    )
    out = realprograms.extract(good, sdist, "src", tmp_path / "out")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "a.c",
        "d/b.h",
    ]
    assert (out / "a.c").read_bytes() == b"int a;"

    bads: list[dict[str, bytes | str]] = [
        {"demo-1.0/src/../../evil": b"x"},
        {"demo-1.0/src/link": "/etc/passwd"},
    ]
    for bad in bads:
        path = tmp_path / "bad.tar.gz"
        tarball(path, bad)
        with pytest.raises(realprograms.PrepareError, match="unexpected member"):
            realprograms.extract(path, sdist, "src", tmp_path / "a" / "bad")
    assert not (tmp_path / "evil").exists()  # where `a/bad/../../evil` would land


def test_zlib_ng_is_configured_as_its_configure_does(tmp_path: Path) -> None:
    src = tmp_path / "zlib-ng"
    src.mkdir()
    (src / "zlib.h.in").write_text("#define @ZLIB_SYMBOL_PREFIX@deflateInit(s, l) x\n")
    (src / "gzread_mangle.h.in").write_text("#undef @ZLIB_SYMBOL_PREFIX@gzgetc\n")
    (src / "zlib_name_mangling.h.empty").write_text("/* empty */\n")
    (src / "zconf.h.in").write_text(
        "#ifdef HAVE_UNISTD_H    /* may be set to #if 1 by configure/cmake/etc */\n"
        "#  define Z_HAVE_UNISTD_H\n#endif\n"
    )
    (src / "Makefile.in").write_text(
        "OBJZ = \\\n\tarch/generic/adler32_c.o \\\n\tdeflate.o \\\n\t$(ARCH_STATIC_OBJS)\n\n"
        "OBJG = \\\n\tgzlib.o\n\nTESTOBJG =\n"
    )
    realprograms.configure_zlib_ng(src, tmp_path / "gen")
    gen = tmp_path / "gen"
    assert (gen / "zlib.h").read_text() == "#define deflateInit(s, l) x\n"
    assert (gen / "gzread_mangle.h").read_text() == "#undef gzgetc\n"
    assert (gen / "zlib_name_mangling.h").read_text() == "/* empty */\n"
    assert (
        (gen / "zconf.h")
        .read_text()
        .startswith(
            "#if 1    /* was set to #if 1 by configure/cmake/etc */\n#  define Z_HAVE_UNISTD_H\n"
        )
    )
    assert realprograms.zlib_library_sources(src) == [
        src / "arch/generic/adler32_c.c",
        src / "deflate.c",
        src / "gzlib.c",
    ]


@pytest.mark.real_programs
@pytest.mark.slow
def test_speedtest1_completes_and_prints_a_time() -> None:
    """SQLite's own ``speedtest1`` (``test/speedtest1.c``, which no registry this suite
    reaches carries: its path comes from ``$LGUEST_SPEEDTEST1``, as for the benchmark)
    built with the pinned amalgamation runs the tests of its mix in a guest and prints
    its total time."""
    bench = pytest.importorskip("benchmarks.bench_speedtest")
    source = bench.source()
    if source is None:
        pytest.skip(f"set {bench.SOURCE_ENV} to SQLite 3.50.4's test/speedtest1.c")
    image = bench.build(source)
    cmdline = f"--size 1 --testset {bench.TESTSET} :memory:"
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "run", str(image), "--memory", "64M",
         f"--cmdline={cmdline}"],
        capture_output=True, timeout=LIMIT,
    )  # fmt: skip
    out = succeeded(done)
    assert re.search(r"TOTAL\.+\s+\d+\.\d+s", out), out[-2000:]
    assert len(bench.test_names(out)) > 20, out[-2000:]  # (the mix: some 60 tests)
