"""The benchmarks' measuring method: interleaved rounds, paired ratios, the latency goals
(benchmarks/harness.py, benchmarks/__main__.py)."""

from __future__ import annotations

import asyncio
import dataclasses

from benchmarks import __main__ as bench_main
from benchmarks import harness


def test_interleave_alternates_which_side_goes_first() -> None:
    order: list[str] = []

    def raw() -> float:
        order.append("raw")
        return float(len(order))

    async def sup() -> float:
        order.append("sup")
        return float(len(order))

    raws, sups = asyncio.run(harness.interleave(4, raw, sup))
    assert order == ["raw", "sup", "sup", "raw", "raw", "sup", "sup", "raw"]
    # Each side's values in round order, whichever went first in its round.
    assert raws == [1.0, 4.0, 5.0, 8.0] and sups == [2.0, 3.0, 6.0, 7.0]


def test_a_paired_ratio_is_the_median_of_the_rounds_ratios() -> None:
    # One round a neighbour slowed (raw 3.0 against 1.0 elsewhere) moves only its own
    # ratio; a ratio of the two sides' best values would pair different moments.
    raw = [1.0, 3.0, 1.0, 1.0, 1.0]
    sup = [1.25, 1.0, 1.1, 1.2, 1.3]
    assert harness.paired_ratio(raw, sup) == 1.0 / 1.2
    assert min(raw) / min(sup) == 1.0


def _latency(goal: float, goal_on: str, value: float, raw: float) -> harness.Result:
    return harness.Result(
        "break_latency", "BREAK", "ms", value, raw, value / raw, goal, goal_on, "lower"
    )


def test_latency_goals_are_absolute_quiet_and_relative_to_raw_under_load() -> None:
    from benchmarks import cases

    assert cases.latency_goal(harness.QUICK) == (1.0, "value")
    assert cases.latency_goal(dataclasses.replace(harness.FULL, load=2)) == (1.5, "ratio")
    quiet = _latency(*cases.latency_goal(harness.QUICK), 0.9, 0.1)
    loaded = _latency(*cases.latency_goal(dataclasses.replace(harness.QUICK, load=1)), 9.0, 7.0)
    assert quiet.met and loaded.met
    assert not _latency(1.5, "ratio", 11.0, 7.0).met
    assert bench_main.goal_text(quiet) == "<= 1.00 ms"
    assert bench_main.goal_text(loaded) == "<= 1.50 x raw"
    # The table says when the goals are relative, and why.
    assert "load processes" in bench_main.table("asyncio", [loaded], load=2)
    assert "load processes" not in bench_main.table("asyncio", [quiet])
