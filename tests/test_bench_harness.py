"""The benchmarks' measuring method: interleaved rounds, paired ratios, the latency goals
(benchmarks/harness.py, benchmarks/__main__.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import struct
from pathlib import Path

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import bench_speedtest, harness, raw_sdk
from supervisor import abi


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


# -- a C guest on a bare Unicorn (benchmarks/raw_sdk.py) ----------------------------------
C_GUESTS = Path(__file__).resolve().parent.parent / "guests" / "c"


def test_the_raw_runner_serves_a_c_guest_as_the_host_does() -> None:
    guest = raw_sdk.RawSdkGuest(C_GUESTS / "hello.elf", 16 << 20, "")
    try:
        run = guest.run()
    finally:
        guest.close()
    assert (run.status, run.stdout, run.stderr) == (0, b"Hello from an lguest guest!\n", b"")
    # one INIT, the GDT, the runtime's IDT and page-table calls, one print, the power-off
    calls = run.hypercalls
    assert calls[abi.LHCALL_LGUEST_INIT] == calls[abi.LHCALL_SHUTDOWN] == 1
    assert calls[abi.LHCALL_NOTIFY] >= 1 and calls[abi.LHCALL_LOAD_IDT_ENTRY] > 32
    assert calls[abi.LHCALL_SET_PTE] >= 2  # page 0 and the stack's guard page unmapped


def test_the_raw_runner_stops_at_what_it_does_not_serve(tmp_path: Path) -> None:
    entry = 0x10000
    code = b"\xcc"  # int3: a trap the raw runner does not reflect
    header = struct.pack(
        "<16sHHIIIIIHHHHHH", b"\x7fELF\x01\x01\x01" + bytes(9), 2, 3, 1, entry, 52, 0, 0,
        52, 32, 1, 40, 0, 0,
    )  # fmt: skip
    phdr = struct.pack("<8I", 1, 84, entry, entry, len(code), len(code), 7, 4096)
    path = tmp_path / "trap.elf"
    path.write_bytes(header + phdr + code)
    guest = raw_sdk.RawSdkGuest(path, 1 << 20, "")
    try:
        with pytest.raises(raw_sdk.RawGuestError, match="trap 3 at eip 0x10001"):
            guest.run()
    finally:
        guest.close()


def test_speedtest1_without_its_source_is_skipped_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delenv(bench_speedtest.SOURCE_ENV, raising=False)
    assert asyncio.run(bench_speedtest.speedtest1(harness.QUICK)) == []
    assert capsys.readouterr().out.startswith("  c_speedtest1: skipped: set LGUEST_SPEEDTEST1")
    monkeypatch.setenv(bench_speedtest.SOURCE_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="not a file"):
        bench_speedtest.source()


def test_speedtest1_runs_compare_by_test_names_not_times() -> None:
    out = (
        "-- Speedtest1 for SQLite 3.50.4\n"
        " 100 - 2500 INSERTs into table with no index.......    0.005s\n"
        " 110 - 2500 ordered INSERTS with one index/PK......    1.250s\n"
        "       TOTAL.....................................    1.255s\n"
    )
    assert bench_speedtest.test_names(out) == [
        " 100 - 2500 INSERTs into table with no index",
        " 110 - 2500 ordered INSERTS with one index/PK",
    ]


def test_a_scaling_round_takes_the_mean_of_its_two_one_alone_runs() -> None:
    # The machine slowed during the round: one alone took 1.0, then 1.2; two at once 1.1.
    # Against the first run alone the scaling would be 1.82, against the second 2.18.
    r = harness.ScalingRound(1.0, 1.1, 1.2)
    assert r.scale == pytest.approx(2.0) and r.one == pytest.approx(1.1) and r.sound


def test_a_round_is_unsound_when_its_one_alone_runs_disagree_or_it_scales_past_two() -> None:
    assert not harness.ScalingRound(1.0, 1.0, 1.3).sound  # the machine changed under it
    assert harness.ScalingRound(1.0, 1.125, 1.25).sound
    # Two loops cannot do more than twice the work of one: 3.68x means slow baselines.
    assert not harness.ScalingRound(1.84, 1.0, 1.84).sound
    assert harness.ScalingRound(1.0, 1.0, 1.0).sound


def test_scaling_is_of_the_rounds_sound_on_both_sides_with_spread_and_baseline() -> None:
    sup = [
        harness.ScalingRound(1.0, 1.0, 1.0),  # 2.0
        harness.ScalingRound(1.8, 1.0, 1.8),  # 3.6: impossible, left out with its raw round
        harness.ScalingRound(1.0, 1.25, 1.0),  # 1.6
        harness.ScalingRound(1.0, 1.1, 1.0),  # 1.82; its raw round drifted: left out
    ]
    raw = [
        harness.ScalingRound(1.0, 1.0, 1.0),
        harness.ScalingRound(1.0, 1.0, 1.0),
        harness.ScalingRound(0.8, 1.0, 0.8),
        harness.ScalingRound(1.0, 1.0, 1.5),
    ]
    got = harness.scaling(sup, raw)
    assert (got.rounds, got.sound, got.chosen) == (4, 2, 2)
    assert got.sup == pytest.approx(1.8) and got.sup_spread == pytest.approx((1.6, 2.0))
    assert got.raw == pytest.approx(1.8) and got.raw_spread == pytest.approx((1.6, 2.0))
    assert got.ratio == pytest.approx(1.0)
    # One guest alone against raw's one thread: 1.0 and 1.25 (raw's 0.8).
    assert got.baseline == pytest.approx(1.125) and got.baseline_spread == pytest.approx(
        (1.0, 1.25)
    )


def test_scaling_falls_back_to_every_round_when_fewer_than_half_are_sound() -> None:
    sup = [harness.ScalingRound(1.0, 1.0, 1.5), harness.ScalingRound(1.0, 1.0, 1.0)]
    sup.append(harness.ScalingRound(2.0, 1.0, 2.0))
    raw = [harness.ScalingRound(1.0, 1.0, 1.0)] * 3
    got = harness.scaling(sup, raw)
    assert (got.rounds, got.sound, got.chosen) == (3, 1, 3)
    assert got.sup == pytest.approx(2.5) and got.sup_spread == pytest.approx((2.0, 4.0))
