#!/usr/bin/env python3
"""Build the toy lguest guests: guests/*.S -> *.img (+ hello.elf), guests/c/*.c -> c/*.elf.

Each NAME.S is assembled with ``as --32`` (with ``-I guests`` so that
``.include "lguest.inc"`` works), linked with ``ld -m elf_i386`` using
guests/guest.ld (single PT_LOAD at 0x10000, no build-id) and flattened with
``objcopy -O binary``.  Nothing time- or path-dependent ends up in the
output, so rebuilds are byte-identical.

Usage:
    python3 guests/build.py              # build next to the sources
    python3 guests/build.py --out DIR    # write outputs to DIR instead
    python3 guests/build.py --check      # rebuild in a temp dir, compare with
                                         # the committed outputs (or --out DIR),
                                         # exit 1 on any difference/missing file
    python3 guests/build.py NAME ...     # only these guests (e.g. hello ticker c/hello)
    python3 guests/build.py --only asm   # only the assembly (or: c) guests
Stdlib only (Python 3.11); needs binutils (as, ld, objcopy) for i386.

The C guests (guests/c/NAME.c) are built with ``supervisor.sdk`` (-O2), which
needs the ``sdk`` extra (Zig's C compiler, pinned in pyproject.toml so that
rebuilds are byte-identical); without it they are skipped with a message.
Names select C guests too (``c/hello`` or ``hello.c``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GUESTS_DIR = Path(__file__).resolve().parent
C_DIR = GUESTS_DIR / "c"
LINKER_SCRIPT = "guest.ld"
# Guests that are also shipped as an ELF32 executable (for the ELF loader).
ELF_OUTPUTS = {"hello"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env["SOURCE_DATE_EPOCH"] = "0"
    return env


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0 or proc.stderr.strip():
        sys.stderr.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise SystemExit(f"build failed: {cmd[0]} exited {proc.returncode}")


def _ld_flags() -> list[str]:
    flags = ["-m", "elf_i386", "-static", "-nostdlib", "--build-id=none",
             "-z", "noexecstack", "-z", "max-page-size=0x1000",
             "-T", str(GUESTS_DIR / LINKER_SCRIPT)]
    help_text = subprocess.run(["ld", "--help"], capture_output=True, text=True,
                               env=_env()).stdout
    if "--no-warn-rwx-segments" in help_text:
        flags.append("--no-warn-rwx-segments")
    return flags


def sources(names: list[str] | None = None) -> list[Path]:
    srcs = sorted(GUESTS_DIR.glob("*.S"))
    if names:
        wanted = {n.removesuffix(".S") for n in names}
        srcs = [s for s in srcs if s.stem in wanted]
        missing = wanted - {s.stem for s in srcs}
        if missing:
            raise SystemExit(f"no such guest(s): {', '.join(sorted(missing))}")
    return srcs


def outputs_for(src: Path) -> list[str]:
    outs = [src.stem + ".img"]
    if src.stem in ELF_OUTPUTS:
        outs.append(src.stem + ".elf")
    return outs


def build_one(src: Path, work: Path, out: Path) -> list[Path]:
    """Build one guest; intermediate files in work, outputs in out."""
    obj = work / (src.stem + ".o")
    elf = work / (src.stem + ".elf")
    img = work / (src.stem + ".img")
    # Assemble from inside guests/ with a relative file name, so the only
    # path recorded (the STT_FILE symbol) is "NAME.S".
    _run(["as", "--32", "-I", ".", "-o", str(obj), src.name], cwd=GUESTS_DIR)
    _run(["ld", *_ld_flags(), "-o", str(elf), str(obj)], cwd=work)
    _run(["objcopy", "-O", "binary", str(elf), str(img)], cwd=work)
    results = []
    for name in outputs_for(src):
        dest = out / name
        shutil.copyfile(work / name, dest)
        results.append(dest)
    return results


def c_sources(names: list[str] | None = None) -> list[Path]:
    srcs = sorted(C_DIR.glob("*.c"))
    if names:
        wanted = {n.removeprefix("c/").removesuffix(".c") for n in names}
        srcs = [s for s in srcs if s.stem in wanted]
    return srcs


def build_c(srcs: list[Path], out: Path) -> list[Path]:
    """Build C guests into out/NAME.elf; [] (and a message) without the toolchain."""
    if not srcs:
        return []
    sys.path.insert(0, str(GUESTS_DIR.parent))
    from supervisor import sdk

    try:
        toolchain = sdk.find_toolchain("zig")  # the committed images are Zig's
    except sdk.ToolchainError as exc:
        print(f"skipping C guests: {exc}", file=sys.stderr)
        return []
    out.mkdir(parents=True, exist_ok=True)
    built = []
    for src in srcs:
        built.append(sdk.build([src], out / f"{src.stem}.elf", sdk.BuildOptions("2"), toolchain))
    return built


def build_all(srcs: list[Path], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    built: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="lguest-guests-") as tmp:
        for src in srcs:
            built += build_one(src, Path(tmp), out)
    return built


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="output directory (default: guests/)")
    ap.add_argument("--check", action="store_true",
                    help="rebuild in a temp dir; fail if committed outputs differ")
    ap.add_argument("--only", choices=["asm", "c"], help="only the assembly or only the C guests")
    ap.add_argument("names", nargs="*", help="guest names (default: all *.S and c/*.c)")
    args = ap.parse_args(argv)

    if args.names:
        c_names = [n for n in args.names if n.startswith("c/") or n.endswith(".c")]
        asm_names = [n for n in args.names if n not in c_names]
        srcs = sources(asm_names) if asm_names else []
        c_srcs = c_sources(c_names) if c_names else []
    else:
        srcs, c_srcs = sources(), c_sources()
    if args.only == "asm":
        c_srcs = []
    elif args.only == "c":
        srcs = []
    if not srcs and not c_srcs:
        print("no guest sources found", file=sys.stderr)
        return 1
    target = (args.out or GUESTS_DIR).resolve()
    c_target = target / "c" if args.out else C_DIR

    if not args.check:
        for path in build_all(srcs, target) + build_c(c_srcs, c_target):
            print(f"built {path} ({path.stat().st_size} bytes)")
        return 0

    bad = 0
    with tempfile.TemporaryDirectory(prefix="lguest-guests-check-") as tmp:
        fresh_c = build_c(c_srcs, Path(tmp) / "c")
        pairs = [(f, target / f.name) for f in build_all(srcs, Path(tmp))]
        pairs += [(f, c_target / f.name) for f in fresh_c]
        for fresh, committed in pairs:
            if not committed.exists():
                print(f"MISSING  {committed}")
                bad += 1
            elif committed.read_bytes() != fresh.read_bytes():
                print(f"DIFFERS  {committed}")
                bad += 1
            else:
                print(f"ok       {committed}")
    if bad:
        print(f"{bad} output(s) out of date; run guests/build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
