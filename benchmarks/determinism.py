"""Deterministic mode's cost and its time compression, measured in one run.

``python -m benchmarks.determinism`` measures (docs/determinism.md):

- **cost**: ``benchmarks/c/corelike.c`` (CoreMark's four kinds of work: a linked
  list, a matrix, a state machine, CRC-16; built here with the SDK) supervised by
  the default Supervisor and by a deterministic one, interleaved, best of
  ``--reps``; the time is from the guest's first line to its result line, so it is
  compute (goal: deterministic at most 1.5x the default), in wall time and in the
  process's CPU time (which other programs on a shared machine move less);
- **time compression**: ``--tickers`` guests (default 1,000) each sleeping 1 s
  between ``--ticks`` ticks (default 10), deterministic: the wall time of the whole
  swarm (goal: under 10 s) against the virtual time it covered, and the process's
  CPU time (what the wall time is on an idle machine: the run uses one core);
- **reproducibility**: ``--repeat`` runs (default 100) of 20 guests whose console
  lines are relayed to an echo guest, one seed: how many transcripts are identical
  to the first (goal: all);
- **networked reproducibility**: ``--repeat`` runs of 20 guests on the network, an
  echo server and 19 clients, each client's link to it lossy, delayed and jittery
  (the faults drawn from the seed), one seed: how many transcripts are identical to
  the first (goal: all), and whether another seed gives another interleaving.

``--parts`` chooses which of ``cost,compression,console,net`` to run (default: all).

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
TCP_SERVER = ROOT / "guests" / "c" / "tcp_echo_server.elf"
TCP_CLIENT = ROOT / "guests" / "c" / "tcp_echo_client.elf"
PARTS = ("cost", "compression", "console", "net")
COST_GOAL = 1.5
COMPRESSION_GOAL = 10.0
T = TypeVar("T")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


async def compute_time(image: Path, iterations: int, deterministic: bool) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) from the guest's first line to its result line."""
    async with Supervisor(deterministic=deterministic, seed=1 if deterministic else None) as sup:
        guest = await sup.launch(GuestConfig.build(image=image, cmdline=f"iterations={iterations}"))
        lines = aiter(guest.console)
        first = await anext(lines)
        assert first.startswith("corelike"), first
        t0, c0 = time.perf_counter(), time.process_time()
        result = await anext(lines)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert result.startswith("crc "), result
        assert (await guest.wait()).exit_status == 0
    return elapsed, cpu


async def compression(tickers: int, ticks: int) -> tuple[float, float, float, int]:
    """(wall seconds, process CPU seconds, virtual seconds, quanta) of ``tickers`` guests
    sleeping 1 s between ``ticks`` ticks."""
    t0, c0 = time.perf_counter(), time.process_time()
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
    return time.perf_counter() - t0, time.process_time() - c0, virtual_s, quanta


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


async def net_transcript(seed: int, guests: int) -> tuple[str, float]:
    """(sha256 of the transcript, virtual seconds) of an echo server and ``guests - 1``
    clients on the network, each client's link to the server with a 2 ms delay, up to
    3 ms of jitter and 20 % loss.  The clients are launched once the server listens and
    the device is idle (launched with it, some would connect before it listens)."""
    lines: list[str] = []
    async with Supervisor(deterministic=True, seed=seed) as sup:
        sim = sup.device.virtual
        assert sim is not None
        clients = guests - 1
        server = await sup.launch(
            GuestConfig.build(image=TCP_SERVER, name="srv", net=True, cmdline=f"7 {clients}")
        )
        await server.expect("listening on 7\n")
        await sim.idle()
        launched = [server]
        for i in range(clients):
            config = GuestConfig.build(
                image=TCP_CLIENT, name=f"c{i}", net=True, cmdline=f"srv 7 hello from c{i}"
            )
            launched.append(await sup.launch(config))
            sup.net.link(f"c{i}", "srv", delay=0.002, jitter=0.003, loss=0.2)

        async def pump(name: str, source: AsyncIterable[str]) -> None:
            async for line in source:
                lines.append(f"{name}: {line}")

        pumps = [asyncio.create_task(pump(g.name, g.console)) for g in launched]
        pumps += [asyncio.create_task(pump(f"{g.name} (stderr)", g.stderr)) for g in launched]
        for guest in launched:
            end = await guest.wait()
            assert end.exit_status == 0, (guest.name, end)
        await asyncio.gather(*pumps)
        assert sum(": hello from" in line for line in lines) == clients
        return hashlib.sha256("\n".join(lines).encode()).hexdigest(), sim.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--tickers", type=int, default=1000)
    parser.add_argument("--ticks", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--loop", choices=sorted(LOOPS), default="uvloop")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS)
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        parser.error(f"unknown part(s): {', '.join(sorted(parts - set(PARTS)))}")

    def run(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=LOOPS[args.loop]) as runner:
            return runner.run(coro)

    print(f"event loop: {args.loop}")
    if "cost" in parts:
        cost(args.reps, args.iterations, run)
    if "compression" in parts:
        wall, cpu, virtual_s, quanta = run(compression(args.tickers, args.ticks))
        print(
            f"time compression ({args.tickers} tickers, {args.ticks} ticks of 1 s): wall "
            f"{wall:.2f} s (cpu {cpu:.2f} s) for {virtual_s:.2f} s virtual "
            f"({virtual_s / wall:.1f}x), {quanta} quanta "
            f"(goal < {COMPRESSION_GOAL} s: {'met' if wall < COMPRESSION_GOAL else 'NOT met'})"
        )
    if "console" in parts and args.repeat:
        hashes = [run(transcript_hash(7, 20)) for _ in range(args.repeat)]
        same = sum(h == hashes[0] for h in hashes)
        print(
            f"reproducibility (20 guests relayed to an echo guest, seed 7): {same}/{args.repeat} "
            f"transcripts identical to the first "
            f"(goal: all: {'met' if same == args.repeat else 'NOT met'})"
        )
    if "net" in parts and args.repeat:
        t0 = time.perf_counter()
        runs = [run(net_transcript(7, 20)) for _ in range(args.repeat)]
        wall = (time.perf_counter() - t0) / args.repeat
        same = sum(r == runs[0] for r in runs)
        other = run(net_transcript(8, 20))
        print(
            f"networked reproducibility (an echo server and 19 clients over lossy, jittery "
            f"links, seed 7): {same}/{args.repeat} transcripts identical to the first "
            f"(goal: all: {'met' if same == args.repeat else 'NOT met'}); "
            f"{runs[0][1] * 1000:.1f} ms virtual, {wall:.2f} s wall a run; "
            f"seed 8 gives {'another' if other[0] != runs[0][0] else 'the SAME'} transcript; "
            f"seed 7's sha256 {runs[0][0][:16]} (compare across loops with --loop)"
        )


def cost(
    reps: int,
    iterations: int,
    run: Callable[[Coroutine[Any, Any, tuple[float, float]]], tuple[float, float]],
) -> None:
    """Print corelike's compute time, default against deterministic, best of ``reps``."""
    with tempfile.TemporaryDirectory() as tmp:
        image = sdk.build([CORELIKE], Path(tmp) / "corelike.elf", sdk.BuildOptions("2"))
        default, deterministic = [], []
        for _ in range(reps):
            default.append(run(compute_time(image, iterations, False)))
            deterministic.append(run(compute_time(image, iterations, True)))
    walls = [min(w for w, _ in times) for times in (default, deterministic)]
    cpus = [min(c for _, c in times) for times in (default, deterministic)]
    ratio = walls[1] / walls[0]
    print(
        f"cost (corelike, {iterations} iterations, best of {reps}): default "
        f"{walls[0]:.3f} s, deterministic {walls[1]:.3f} s, ratio {ratio:.2f}x "
        f"(goal <= {COST_GOAL}x: {'met' if ratio <= COST_GOAL else 'NOT met'}); "
        f"cpu {cpus[0]:.3f} s against {cpus[1]:.3f} s, ratio {cpus[1] / cpus[0]:.2f}x"
    )


if __name__ == "__main__":
    main()
