"""Render a results JSON as the Markdown tables in docs/performance.md.

``python -m benchmarks.report [benchmarks/results.json]``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .__main__ import _fmt


def _goal(r: dict[str, Any]) -> str:
    if r["goal"] is None:
        return "-"
    op = ">=" if r["better"] == "higher" else "<="
    what = "x raw" if r["goal_on"] == "ratio" else r["unit"]
    return f"{op} {_fmt(r['goal'])} {what}"


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    start = m.get("loadavg_at_start", [float("nan")])[0]
    end = data.get("loadavg_at_end", [float("nan")])[0]
    lines = [
        f"Profile `{data['profile']}`; Python {m['python']}, Unicorn {m['unicorn']}, "
        f"uvloop {m['uvloop']}; {m['cpus']} CPUs ({m['processor']}); load average "
        f"{start:.1f} at the start, {end:.1f} at the end; "
        f"{m.get('load_processes', 0)} CPU-bound load processes; slices: "
        f"{m.get('slicing', 'native block hook')}.",
        "",
    ]
    for loop, body in data["loops"].items():
        lines += [
            f"**{loop}**",
            "",
            "| figure | goal | measured | raw Unicorn | ratio | unit | met |",
            "|---|---|---:|---:|---:|---|---|",
        ]
        for r in body["results"]:
            met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
            lines.append(
                f"| {r['title']} | {_goal(r)} | {_fmt(r['value'])} | {_fmt(r['raw'])} | "
                f"{_fmt(r['ratio'])} | {r['unit']} | {met} |"
            )
        for name, err in body.get("errors", {}).items():
            lines.append(f"| {name} | failed: {err.strip().splitlines()[-1]} | | | | | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv else Path(__file__).parent / "results.json"
    print(markdown(json.loads(path.read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
