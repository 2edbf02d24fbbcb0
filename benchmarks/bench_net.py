"""The guests' network: 1-byte round trips and 64 KiB-write throughput.

A C guest (benchmarks/c/netbench.c, built with ``supervisor build``) plays each
part; the host times from the client's "start" line (connected) to its "done"
line, or to the sink's count of what arrived.  Raw: the host's own asyncio over
loopback TCP in the same run: a 1-byte ping-pong between ``asyncio.open_connection``
and an ``asyncio.start_server`` echo, and 64 KiB writes (with ``drain``) into a
server that reads to the end.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from supervisor import Guest, GuestConfig, Supervisor, sdk

from .harness import Profile, Result, now

SOURCE = Path(__file__).resolve().parent / "c" / "netbench.c"
CHUNK = 1 << 16
RTT_GOAL = 3.0  # at most 3x the host's asyncio ping-pong
THROUGHPUT_GOAL = 200.0  # MB/s


async def _launch(sup: Supervisor, image: Path, name: str, cmdline: str) -> Guest:
    config = GuestConfig(image=image, name=name, cmdline=cmdline, memory="4M", net=True)
    return await sup.launch(config)


async def _guest_pair(sup: Supervisor, image: Path, server: str, client: str) -> float:
    """Seconds from the client's "start" to the end: its "done" (ping) or the
    server's "got" line (send)."""
    srv = await _launch(sup, image, "srv", server)
    srv_lines = aiter(srv.console)
    assert await anext(srv_lines) == "listening"
    cli = await _launch(sup, image, "cli", client)
    cli_lines = aiter(cli.console)
    assert await anext(cli_lines) == "start"
    t0 = now()
    if client.startswith("ping"):
        assert await anext(cli_lines) == "done"
        t = now() - t0
        assert await anext(srv_lines) == f"got {client.split()[-1]}"
    else:
        got = await anext(srv_lines)
        t = now() - t0
        assert got == f"got {client.split()[-1]}", got
        assert await anext(cli_lines) == "done"
    assert (await cli.wait()).ok and (await srv.wait()).ok
    return t


async def _guest_to_host(sup: Supervisor, image: Path, size: int) -> float:
    received = 0
    finished = asyncio.Event()
    end = 0.0

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received, end
        while data := await reader.read(CHUNK):
            received += len(data)
        end = now()
        writer.close()
        finished.set()

    server = await sup.net.start_server(sink, 9000)
    try:
        cli = await _launch(sup, image, "cli", f"send host 9000 {size}")
        lines = aiter(cli.console)
        assert await anext(lines) == "start"
        t0 = now()
        await finished.wait()
        assert received == size, (received, size)
        assert (await cli.wait()).ok
        return end - t0
    finally:
        server.close()


async def _host_pingpong(n: int) -> float:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = now()
    for _ in range(n):
        writer.write(b"x")
        await writer.drain()
        await reader.readexactly(1)
    t = now() - t0
    writer.close()
    server.close()
    await server.wait_closed()
    return t


async def _host_stream(size: int) -> float:
    done = asyncio.Event()
    received = 0
    end = 0.0

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received, end
        while data := await reader.read(CHUNK):
            received += len(data)
        end = now()
        writer.close()
        done.set()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    block = bytes(CHUNK)
    t0 = now()
    for _ in range(size // CHUNK):
        writer.write(block)
        await writer.drain()
    writer.close()
    await done.wait()
    server.close()
    await server.wait_closed()
    assert received == size
    return end - t0


async def network(p: Profile) -> list[Result]:
    rtts = 2_000 if p.name == "full" else 500
    size = (200 if p.name == "full" else 40) << 20
    reps = max(1, p.reps // 2)
    g_rtt, h_rtt, g_g, g_h, h_s = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="lguest-bench-net-") as tmp:
        image = Path(tmp) / "netbench.elf"
        await asyncio.to_thread(sdk.build, [SOURCE], image, sdk.BuildOptions(optimize="2"))
        for _ in range(reps):
            async with Supervisor() as sup:
                g_rtt.append(await _guest_pair(sup, image, "echo 7", f"ping srv 7 {rtts}") / rtts)
            h_rtt.append(await _host_pingpong(rtts) / rtts)
            async with Supervisor() as sup:
                g_g.append(await _guest_pair(sup, image, "sink 7", f"send srv 7 {size}"))
            async with Supervisor() as sup:
                g_h.append(await _guest_to_host(sup, image, size))
            h_s.append(await _host_stream(size))
    mb = size / 1e6
    rtt, raw_rtt = min(g_rtt) * 1e3, min(h_rtt) * 1e3
    host_mbs = mb / min(h_s)
    note = f"best of {reps}; raw: the host's asyncio over loopback TCP in the same run"
    results = [
        Result(
            "net_rtt",
            "1-byte round trip between two guests",
            "ms",
            rtt,
            raw_rtt,
            rtt / raw_rtt,
            RTT_GOAL,
            "ratio",
            "lower",
            f"{rtts} round trips; " + note,
            {"guest": g_rtt, "host": h_rtt},
        )
    ]
    for name, title, times in (
        ("net_guest_guest", "guest to guest, 64 KiB writes", g_g),
        ("net_guest_host", "guest to host (asyncio streams), 64 KiB writes", g_h),
    ):
        value = mb / min(times)
        results.append(
            Result(name, f"{title}, {mb:.0f} MB", "MB/s", value, host_mbs, value / host_mbs,
                   THROUGHPUT_GOAL, "value", "higher", note, {"times": times, "host": h_s})
        )  # fmt: skip
    return results


if __name__ == "__main__":  # python -m benchmarks.bench_net
    import sys

    from .harness import FULL, QUICK

    for r in asyncio.run(network(FULL if "--full" in sys.argv else QUICK)):
        print(f"{r.name}: {r.value:,.3f} {r.unit} (raw {r.raw:,.3f}, ratio {r.ratio:.2f}, "
              f"goal {r.goal}, met {r.met})")  # fmt: skip
