"""Deterministic mode's cost and its time compression, measured in one run.

``python -m benchmarks.determinism`` measures (docs/determinism.md):

- **cost**: ``benchmarks/c/corelike.c`` (CoreMark's four kinds of work: a linked
  list, a matrix, a state machine, CRC-16; built here with the SDK) supervised by
  the default Supervisor and by a deterministic one, interleaved, best of
  ``--reps``; the time is from the guest's first line to its result line, so it is
  compute (goal: deterministic at most 1.5x the default);
- **time compression**: ``--tickers`` guests (default 1,000) each sleeping 1 s
  between ``--ticks`` ticks (default 10), deterministic: the wall time of the whole
  swarm (goal: under 10 s) against the virtual time it covered;
- **reproducibility**: ``--repeat`` runs (default 100) of 20 guests whose console
  lines are relayed to an echo guest, one seed: how many transcripts are identical
  to the first (goal: all).

This is a measurement, not a test: nothing fails; the goals are printed beside
the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import tempfile
import time
from collections.abc import AsyncIterable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from supervisor import GuestConfig, Supervisor, sdk

ROOT = Path(__file__).resolve().parent.parent
CORELIKE = ROOT / "benchmarks" / "c" / "corelike.c"
TICKER = ROOT / "guests" / "ticker.img"
ECHO = ROOT / "guests" / "c" / "echo.elf"
COST_GOAL = 1.5
COMPRESSION_GOAL = 10.0
T = TypeVar("T")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


async def compute_time(image: Path, iterations: int, deterministic: bool) -> float:
    """Seconds from the guest's first line to its result line."""
    async with Supervisor(deterministic=deterministic, seed=1 if deterministic else None) as sup:
        guest = await sup.launch(GuestConfig.build(image=image, cmdline=f"iterations={iterations}"))
        lines = aiter(guest.console)
        first = await anext(lines)
        assert first.startswith("corelike"), first
        t0 = time.perf_counter()
        result = await anext(lines)
        elapsed = time.perf_counter() - t0
        assert result.startswith("crc "), result
        assert (await guest.wait()).exit_status == 0
    return elapsed


async def compression(tickers: int, ticks: int) -> tuple[float, float, int]:
    """(wall seconds, virtual seconds, quanta) of ``tickers`` guests sleeping 1 s
    between ``ticks`` ticks."""
    t0 = time.perf_counter()
    async with Supervisor(deterministic=True, seed=1) as sup:
        config = GuestConfig.build(
            image=TICKER, cmdline=f"ticks={ticks} period_ms=1000", console="null"
        )
        guests = [
            await sup.launch(config.model_copy(update={"name": f"t{i}"})) for i in range(tickers)
        ]
        for guest in guests:
            assert (await guest.wait()).exit_status == 0
        sim = sup.device.virtual
        assert sim is not None
        virtual_s, quanta = sim.time(), sim.quanta
    return time.perf_counter() - t0, virtual_s, quanta


async def transcript_hash(seed: int, guests: int) -> str:
    """The sha256 of the console transcript of ``guests`` tickers relayed to an echo guest."""
    lines: list[str] = []
    async with Supervisor(deterministic=True, seed=seed) as sup:
        tickers = [
            await sup.launch(
                GuestConfig.build(image=TICKER, name=f"t{i}", cmdline=f"ticks=3 period_ms={1 + i}")
            )
            for i in range(guests - 1)
        ]
        echo = await sup.launch(GuestConfig.build(image=ECHO, name="echo"))

        async def pump(name: str, source: AsyncIterable[str]) -> None:
            async for line in source:
                lines.append(f"{name}: {line}")
                if name != "echo":
                    echo.send(f"{name} said {line}\n")

        pumps = [asyncio.create_task(pump(g.name, g.console)) for g in [*tickers, echo]]
        for guest in tickers:
            await guest.wait()
        echo.send("quit\n")
        await echo.wait()
        await asyncio.gather(*pumps)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--tickers", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--loop", choices=sorted(LOOPS), default="uvloop")
    args = parser.parse_args()

    def run(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=LOOPS[args.loop]) as runner:
            return runner.run(coro)

    print(f"event loop: {args.loop}")

    with tempfile.TemporaryDirectory() as tmp:
        image = sdk.build([CORELIKE], Path(tmp) / "corelike.elf", sdk.BuildOptions("2"))
        default, deterministic = [], []
        for _ in range(args.reps):
            default.append(run(compute_time(image, args.iterations, False)))
            deterministic.append(run(compute_time(image, args.iterations, True)))
    ratio = min(deterministic) / min(default)
    print(
        f"cost (corelike, {args.iterations} iterations, best of {args.reps}): default "
        f"{min(default):.3f} s, deterministic {min(deterministic):.3f} s, ratio {ratio:.2f}x "
        f"(goal <= {COST_GOAL}x: {'met' if ratio <= COST_GOAL else 'NOT met'})"
    )

    wall, virtual_s, quanta = run(compression(args.tickers, args.ticks))
    print(
        f"time compression ({args.tickers} tickers, {args.ticks} ticks of 1 s): wall "
        f"{wall:.2f} s for {virtual_s:.2f} s virtual ({virtual_s / wall:.1f}x), {quanta} quanta "
        f"(goal < {COMPRESSION_GOAL} s: {'met' if wall < COMPRESSION_GOAL else 'NOT met'})"
    )

    if args.repeat:
        hashes = [run(transcript_hash(7, 20)) for _ in range(args.repeat)]
        same = sum(h == hashes[0] for h in hashes)
        print(
            f"reproducibility (20 guests relayed to an echo guest, seed 7): {same}/{args.repeat} "
            f"transcripts identical to the first "
            f"(goal: all: {'met' if same == args.repeat else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
