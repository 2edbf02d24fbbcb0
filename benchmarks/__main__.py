"""Command line: run the figures under each event loop, print a table, write JSON."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import unicorn

from supervisor import _slicing

from .cases import FIGURES
from .harness import FULL, QUICK, Profile, Result

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
try:
    import uvloop

    LOOPS["uvloop"] = uvloop.new_event_loop
except ImportError:  # pragma: no cover
    pass


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def goal_text(r: Result) -> str:
    if r.goal is None:
        return "-"
    op = ">=" if r.better == "higher" else "<="
    what = "x raw" if r.goal_on == "ratio" else r.unit
    return f"{op} {_fmt(r.goal)} {what}"


def table(loop: str, results: list[Result], load: int = 0) -> str:
    head = ["figure", "goal", "measured", "raw", "ratio", "unit", "met"]
    rows = [head]
    for r in results:
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        rows.append([r.title, goal_text(r), _fmt(r.value), _fmt(r.raw), _fmt(r.ratio), r.unit, met])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    under = f"; {load} CPU-bound load processes: latency goals are x raw's p99" if load else ""
    lines = [f"## loop: {loop} (slices: {_slicing.PATH}{under})"]
    for k, row in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def run_all(profile: Profile, only: list[str]) -> tuple[list[Result], dict[str, str]]:
    results: list[Result] = []
    errors: dict[str, str] = {}
    for name, fig in FIGURES.items():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            got = await fig(profile)
        except Exception:
            errors[name] = traceback.format_exc()
            print(f"  {name}: FAILED\n{errors[name]}", file=sys.stderr, flush=True)
            continue
        results.extend(got)
        spent = time.perf_counter() - t0
        for r in got:
            print(
                f"  {r.name}: {_fmt(r.value)} {r.unit} (raw {_fmt(r.raw)}, ratio {_fmt(r.ratio)})"
                f"  [{spent:.1f} s]",
                flush=True,
            )
            if r.met is False and r.note:  # a missed goal: how it was measured, what it was made of
                print(f"    {r.note}", flush=True)
    return results, errors


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "unicorn": unicorn.__version__,
        "uvloop": getattr(sys.modules.get("uvloop"), "__version__", None),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "loadavg_at_start": os.getloadavg(),
        "slicing": _slicing.PATH,
    }


# One CPU-bound process per requested core: the "loaded machine" of the goals.
_SPIN = "while True: pass"


@contextlib.contextmanager
def machine_load(processes: int) -> Any:
    """Run ``processes`` busy-looping child processes for the duration of the block."""
    children = [
        subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL)
        for _ in range(processes)
    ]
    try:
        if children:
            time.sleep(1.0)  # let them take their share before anything is measured
        yield
    finally:
        for child in children:
            child.kill()
        for child in children:
            child.wait()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a ~1 minute smoke run (CI)")
    ap.add_argument("--loop", choices=["asyncio", "uvloop", "both"], default="both")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results.json")
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        choices=sorted(FIGURES),
        help="run only this figure (repeatable)",
    )
    ap.add_argument(
        "--load",
        type=int,
        default=0,
        metavar="N",
        help="load the machine with N CPU-bound processes while measuring (0: none; "
        "-1: one per core)",
    )
    ap.add_argument(
        "--idle-guests",
        type=int,
        metavar="N",
        help="the idle_guests figure's guests (default 20,000, --quick 500; the goal's "
        "1,000,000 needs about 12 GiB and stops launching below 2 GiB available)",
    )
    args = ap.parse_args(argv)
    load = (os.cpu_count() or 1) if args.load < 0 else args.load
    profile = dataclasses.replace(QUICK if args.quick else FULL, load=load)
    if args.idle_guests is not None:
        profile = dataclasses.replace(profile, idle_guests=args.idle_guests)
    loops = list(LOOPS) if args.loop == "both" else [args.loop]
    info = machine()
    print(
        f"benchmarks ({profile.name}): Python {info['python']}, Unicorn {info['unicorn']}, "
        f"uvloop {info['uvloop']}, {info['cpus']} CPUs ({info['processor']}), "
        f"load average {info['loadavg_at_start'][0]:.2f}; slices: {info['slicing']}; "
        f"{load} CPU-bound load processes",
        flush=True,
    )
    info["load_processes"] = load
    out: dict[str, Any] = {"machine": info, "profile": profile.name, "loops": {}}
    tables: list[str] = []
    t_start = time.perf_counter()
    with machine_load(load):
        _run_loops(args, profile, loops, out, tables)
    out["seconds"] = time.perf_counter() - t_start
    out["loadavg_at_end"] = os.getloadavg()
    print()
    print("\n\n".join(tables))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2, default=str))
    print(
        f"\nwrote {args.json} ({out['seconds']:.0f} s; load average at the end "
        f"{out['loadavg_at_end'][0]:.2f})"
    )
    return 1 if out["failed"] else 0


def _run_loops(
    args: argparse.Namespace,
    profile: Profile,
    loops: list[str],
    out: dict[str, Any],
    tables: list[str],
) -> None:
    failed = False
    for loop in loops:
        if loop not in LOOPS:
            print(f"loop {loop} is not available", file=sys.stderr)
            failed = True
            continue
        print(f"== {loop}", flush=True)
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            results, errors = runner.run(run_all(profile, args.only))
        failed = failed or bool(errors)
        out["loops"][loop] = {"results": [r.as_dict() for r in results], "errors": errors}
        tables.append(table(loop, results, profile.load))
        out["loadavg_after_" + loop] = os.getloadavg()
    out["failed"] = failed


if __name__ == "__main__":
    sys.exit(main())
