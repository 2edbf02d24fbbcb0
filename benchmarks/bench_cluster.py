"""supervisor.cluster on a local Ray: swarm throughput, migration, worker loss.

    python -m benchmarks.bench_cluster [--guests N] [--notifies N] [--moves N] [--workers N]

Needs Ray (``pip install -e '.[cluster]'``).  Four figures, each against its goal:

* a notify-bound swarm (``counter spin=0``: two console notifies per line,
  nothing else) on 2 workers against the same swarm in this one process;
  throughput = notifies per second of wall time;
* migration of a running 16 MiB guest between two workers, end to end
  (``await cl.migrate``: pause, capture, ship, revive, resume), median and max;
* a counting guest migrated ``--moves`` times mid-count ends with the exact count
  and its whole console, in order, once;
* a swarm with ``checkpoint_every=1`` loses a worker mid-run: every guest still
  ends with status 0 and exactly its console output;
* the network across workers (``--net-only`` runs just these): a 1-byte round trip
  and 64 KiB-write throughput between two C guests (benchmarks/c/netbench.c) on
  different workers, against the same two guests on one worker in the same run;
  and the same two figures between a guest on a worker and the driver's ``host``
  (``cl.net.start_server``), against the same guest in a Supervisor of the
  driver's own process and its ``sup.net.start_server``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import ray

from supervisor import GuestConfig, Supervisor, sdk
from supervisor.cluster import Cluster, ClusterError, RemoteGuest
from supervisor.host import Guest

from .harness import poll

GUESTS = Path(__file__).resolve().parent.parent / "guests"
NETBENCH = Path(__file__).resolve().parent / "c" / "netbench.c"
COUNTER = GUESTS / "counter.img"


def counter(lines: int, spin: int, **fields: object) -> GuestConfig:
    return GuestConfig(image=COUNTER, cmdline=f"lines={lines} spin={spin}", **fields)


def counted(lines: int, spin: int) -> list[str]:
    return [*map(str, range(1, lines + 1)), f"count {lines * spin} {lines * spin}"]


async def swarm_local(n: int, lines: int) -> tuple[float, float]:
    """Notifies per second of ``n`` notify-bound guests in this process, and the cores
    it kept busy (CPU seconds per wall second: slices also run on executor threads)."""
    config = counter(lines, 0, memory="1M", console="null")
    async with Supervisor() as sup:
        start, cpu = time.perf_counter(), time.process_time()
        guests = [await sup.launch(config.model_copy(update={"name": f"g{i}"})) for i in range(n)]
        results = await asyncio.gather(*(g.wait() for g in guests))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert all(r.ok for r in results), results
    return sum(g.stats.notifies for g in guests) / wall, cpu / wall


async def swarm_cluster(cl: Cluster, n: int, lines: int) -> tuple[float, float]:
    """The same swarm on the cluster's workers; notifies per second and the cores the
    workers kept busy."""
    config = counter(lines, 0, memory="1M", console="null")
    cpu = await asyncio.gather(*(w.cpu_time() for w in cl.workers))
    start = time.perf_counter()
    guests = [await cl.launch(config.model_copy(update={"name": f"g{i}"})) for i in range(n)]
    results = await asyncio.gather(*(g.wait() for g in guests))
    wall = time.perf_counter() - start
    used = sum(await asyncio.gather(*(w.cpu_time() for w in cl.workers))) - sum(cpu)
    assert all(r.ok for r in results), results
    return sum(g.stats.notifies for g in guests) / wall, used / wall


async def migrations(cl: Cluster, moves: int) -> tuple[list[float], bool, int]:
    """Move a running 16 MiB counting guest after each line it prints, ``moves`` times
    (mid-count: it is spinning towards the next line); (times, exact, moves done)."""
    lines, spin = moves + 10, 50_000
    guest = await cl.launch(counter(lines, spin, memory="16M"))
    times: list[float] = []
    seen = []
    async for line in guest.console:
        seen.append(line)
        if len(times) < moves and not guest.done:
            start = time.perf_counter()
            try:
                await cl.migrate(guest)
            except ClusterError as exc:
                if "ended" not in str(exc):
                    print(f"  a move failed: {exc}")
                continue
            times.append(time.perf_counter() - start)
    result = await guest.wait()
    return times, result.ok and seen == counted(lines, spin), guest.moves


async def _collect(guest: RemoteGuest) -> list[str]:
    return [line async for line in guest.console]


async def worker_loss(cl: Cluster, n: int) -> tuple[int, int, float]:
    """``n`` counting guests, one worker killed mid-run: (guests right, revived, seconds)."""
    lines, spin = 20, 300_000
    start = time.perf_counter()
    guests = [await cl.launch(counter(lines, spin, memory="1M", name=f"c{i}")) for i in range(n)]
    readers = [asyncio.create_task(_collect(g)) for g in guests]
    async with asyncio.timeout(120):
        await poll(lambda: all(g.checkpoints >= 1 for g in guests if not g.done), 0.05)
    await cl.workers[0].kill()
    outputs = await asyncio.gather(*readers)
    results = await asyncio.gather(*(g.wait() for g in guests))
    wall = time.perf_counter() - start
    right = sum(
        r.ok and out == counted(lines, spin) for r, out in zip(results, outputs, strict=True)
    )
    return right, sum(g.revivals for g in guests), wall


async def _net_pair(
    cl: Cluster, image: Path, server: str, client: str, where: tuple[int, int], tag: str
) -> float:
    """Seconds from the client's "start" (connected) to the end of the transfer: its
    "done" (ping) or the server's "got" line (send); server and client on the workers
    numbered ``where``."""

    def config(name: str, cmdline: str) -> GuestConfig:
        return GuestConfig(image=image, name=name, cmdline=cmdline, memory="4M", net=True)

    srv = await cl.launch(config(f"srv{tag}", server), worker=cl.workers[where[0]])
    srv_lines = aiter(srv.console)
    assert await anext(srv_lines) == "listening"
    cli = await cl.launch(
        config(f"cli{tag}", client.format(f"srv{tag}")), worker=cl.workers[where[1]]
    )
    cli_lines = aiter(cli.console)
    assert await anext(cli_lines) == "start"
    t0 = time.perf_counter()
    if client.startswith("ping"):
        assert await anext(cli_lines) == "done"
        t = time.perf_counter() - t0
    else:
        got = await anext(srv_lines)
        t = time.perf_counter() - t0
        assert got == f"got {client.split()[-1]}", got
    assert (await cli.wait()).ok and (await srv.wait()).ok
    return t


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _host_run(
    net: Cluster | Supervisor,
    launch: Callable[[GuestConfig], Awaitable[RemoteGuest | Guest]],
    image: Path,
    client: str,
) -> float:
    """Seconds from a netbench client's "start" (connected to ``host:7``) to its "done"
    (ping) or to the host's sink having read every byte (send)."""
    loop = asyncio.get_running_loop()
    drained: asyncio.Future[float] = loop.create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1 << 16):
            pass
        drained.set_result(time.perf_counter())
        writer.close()

    ping = client.startswith("ping")
    server = await net.net.start_server(_echo if ping else sink, 7)
    config = GuestConfig(image=image, name="hostcli", cmdline=client, memory="4M", net=True)
    guest = await launch(config)
    lines = aiter(guest.console)
    assert await anext(lines) == "start"
    t0 = time.perf_counter()
    if ping:
        assert await anext(lines) == "done"
        t = time.perf_counter() - t0
    else:
        t = await drained - t0
    assert (await guest.wait()).ok
    server.close()
    return t


async def host_network(
    cl: Cluster, image: Path, rtts: int, size: int, reps: int
) -> list[tuple[str, str, str, str]]:
    """Round trip and throughput between a guest on a worker and the driver's host, as
    a ratio to the same guest in a Supervisor of this process and its host."""
    rtt: dict[str, list[float]] = {"local": [], "driver": []}
    put: dict[str, list[float]] = {"local": [], "driver": []}

    async def on_worker(config: GuestConfig) -> RemoteGuest:
        return await cl.launch(config, worker=cl.workers[0])

    async with Supervisor() as sup:
        for _ in range(reps):
            for key, net, launch in (
                ("local", sup, sup.launch),
                ("driver", cl, on_worker),
            ):
                rtt[key].append(await _host_run(net, launch, image, f"ping host 7 {rtts}") / rtts)
                put[key].append(await _host_run(net, launch, image, f"send host 7 {size}"))
    local, driver = min(rtt["local"]) * 1e3, min(rtt["driver"]) * 1e3
    mb = size / 1e6
    local_mbs, driver_mbs = mb / min(put["local"]), mb / min(put["driver"])
    note = f"best of {reps}; the same guest in a Supervisor of the driver's process"
    return [
        (
            "1-byte round trip, guest on a worker to the driver",
            f"{driver:.2f} ms",
            "-",
            f"{driver / local:.1f}x the {local:.3f} ms in one process ({rtts} round trips); {note}",
        ),
        (
            f"guest on a worker to the driver, 64 KiB writes, {mb:.0f} MB",
            f"{driver_mbs:.1f} MB/s",
            "-",
            f"{driver_mbs / local_mbs:.2f}x the {local_mbs:.0f} MB/s in one process; {note}",
        ),
    ]


async def network(cl: Cluster, rtts: int, size: int, reps: int) -> list[tuple[str, str, str, str]]:
    """Round trip and throughput between two guests on two workers, as a ratio to the
    same two guests on one worker (best of ``reps`` each, interleaved)."""
    with tempfile.TemporaryDirectory(prefix="lguest-bench-cluster-") as tmp:
        image = Path(tmp) / "netbench.elf"
        await asyncio.to_thread(sdk.build, [NETBENCH], image, sdk.BuildOptions(optimize="2"))
        rtt: dict[str, list[float]] = {"one": [], "two": []}
        put: dict[str, list[float]] = {"one": [], "two": []}
        for rep in range(reps):
            for key, where in (("one", (0, 0)), ("two", (0, 1))):
                tag = f"{key}{rep}"
                ping = await _net_pair(cl, image, "echo 7", f"ping {{}} 7 {rtts}", where, tag + "p")
                rtt[key].append(ping / rtts)
                put[key].append(
                    await _net_pair(cl, image, "sink 7", f"send {{}} 7 {size}", where, tag + "s")
                )
        host_rows = await host_network(cl, image, rtts, size, reps)
    one, two = min(rtt["one"]) * 1e3, min(rtt["two"]) * 1e3
    mb = size / 1e6
    one_mbs, two_mbs = mb / min(put["one"]), mb / min(put["two"])
    note = f"best of {reps}; the same two guests on one worker in the same run"
    return [
        (
            "1-byte round trip, guests on 2 workers",
            f"{two:.2f} ms",
            "-",
            f"{two / one:.1f}x the {one:.3f} ms on one worker ({rtts} round trips); {note}",
        ),
        (
            f"guest to guest across workers, 64 KiB writes, {mb:.0f} MB",
            f"{two_mbs:.1f} MB/s",
            "-",
            f"{two_mbs / one_mbs:.2f}x the {one_mbs:.0f} MB/s on one worker; {note}",
        ),
        *host_rows,
    ]


async def measure(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    try:
        return await _measure(args)
    finally:
        ray.shutdown()


async def _measure(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    rows = []
    if args.net_only:
        async with Cluster(workers=args.workers) as cl:
            return await network(cl, args.rtts, args.net_mb << 20, args.net_reps)
    local, cores = await swarm_local(args.guests, args.notifies // 2)
    async with Cluster(workers=args.workers) as cl:
        remote, remote_cores = await swarm_cluster(cl, args.guests, args.notifies // 2)
        rows.append(
            (
                f"notify-bound swarm of {args.guests}: {args.workers} workers / 1 process",
                f"{remote / local:.2f}x",
                ">= 1.8x",
                f"{remote:,.0f} vs {local:,.0f} notifies/s;"
                f" cores busy {remote_cores:.2f} vs {cores:.2f}",
            )
        )
        rows.append(
            (
                "  the same per CPU second (workers / process)",
                f"{(remote / remote_cores) / (local / cores):.2f}x",
                "-",
                f"{remote / remote_cores:,.0f} vs {local / cores:,.0f} notifies per CPU second",
            )
        )
        times, exact, moved = await migrations(cl, args.moves)
        if times:
            med, worst = statistics.median(times) * 1e3, max(times) * 1e3
            rows.append(
                (
                    "migrate a running 16 MiB guest",
                    f"{med:.1f} ms",
                    "<= 100 ms",
                    f"median of {len(times)}, max {worst:.1f} ms",
                )
            )
        rows.append(
            (
                f"counting guest migrated {moved} times",
                "exact" if exact else "WRONG",
                "exact",
                "count, console and exit status",
            )
        )
    async with Cluster(workers=args.workers, checkpoint_every=1) as cl:
        right, revived, wall = await worker_loss(cl, args.loss_guests)
        rows.append(
            (
                f"lose 1 of {args.workers} workers, checkpoint_every=1",
                f"{right}/{args.loss_guests} right",
                "all",
                f"{revived} revived, {wall:.1f} s",
            )
        )
    async with Cluster(workers=args.workers) as cl:
        rows += await network(cl, args.rtts, args.net_mb << 20, args.net_reps)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cluster")
    parser.add_argument("--guests", type=int, default=20, help="guests in the swarm")
    parser.add_argument("--notifies", type=int, default=20_000, help="per guest")
    parser.add_argument("--moves", type=int, default=100, help="migrations of one guest")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loss-guests", type=int, default=10)
    parser.add_argument("--rtts", type=int, default=500, help="1-byte round trips")
    parser.add_argument("--net-mb", type=int, default=40, help="MiB of the throughput runs")
    parser.add_argument("--net-reps", type=int, default=3, help="runs of each network figure")
    parser.add_argument("--net-only", action="store_true", help="only the network figures")
    args = parser.parse_args(argv)
    rows = asyncio.run(measure(args))
    width = max(len(r[0]) for r in rows)
    print("supervisor.cluster on a local Ray")
    for name, value, goal, note in rows:
        print(f"  {name:<{width}}  {value:>14}  goal {goal:<9}  {note}")


if __name__ == "__main__":
    main()
