"""Host memory per connection: many members of one network, each holding a connection
to a host server (``sup.net.start_server``).

* ``network``: N members joined to a :class:`~supervisor.net.Network` (what a
  networked guest's file device holds), each with a stream socket connected to a
  host server whose callback reads a line, answers and keeps the connection
  (its task stays pending in ``reader.read()``): the RSS that the connections
  add, over N (the goal's figure), then in a second run the Python heap
  (``tracemalloc``) they add; beside each, what the joined members alone cost.
  No CPU is emulated, so N can be the goal's 10,000 on any machine.
* ``guests``: N C guests (guests/c/tcp_hold_client.elf) on one Supervisor's
  network, each connecting to the host server by name, sending a line, reading
  the answer and waiting in ``recv`` with its connection held, all N at once
  (none has ended when memory is measured; the host then closes every
  connection and each guest must exit 0).  Guests are launched in batches and
  each batch's set-up time per guest is reported: with a set-up cost linear in
  N, the last batch costs what the first did.  Reported apart: what the
  network's code holds (the heap allocated in ``supervisor/net.py``,
  ``supervisor/launcher/sockets.py`` and ``asyncio/streams.py``: members,
  sockets, streams, the server's task) per connection, and the RSS and heap of
  everything else per guest (emulator, guest RAM, the Launcher's objects).
  ``--engines pool`` (the default here) lets an idle guest hold no emulator.

The goal: at most 16 KiB of host memory per connection.

    python -m benchmarks.bench_net_memory [--members 10000] [--guests 1000]
        [--memory 1M] [--engines pool] [--no-trace]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tracemalloc
from functools import partial
from pathlib import Path
from typing import Any

from supervisor import Guest, GuestConfig, Supervisor
from supervisor.engines import ENV as ENGINES_ENV
from supervisor.engines import MODES
from supervisor.net import HOST_ADDR, STREAM, Network, StreamSocket, WouldBlock

from .harness import cpu_seconds, median, now, poll, rss_bytes

KiB = 1024
GOAL = 16 * KiB  # bytes of host memory per connection
PORT = 7000
BATCH = 500
GUEST_BATCH = 250  # guests launched before waiting for their answers
CLIENT = Path(__file__).resolve().parent.parent / "guests" / "c" / "tcp_hold_client.elf"
CONNECTION_FILES = ("supervisor/net.py", "supervisor/launcher/sockets.py", "asyncio/streams.py")


class Held:
    """The host server: answers each connection's first line and keeps the connection."""

    def __init__(self) -> None:
        self.answered = 0
        self.finished = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readline()
            writer.write(b"ok\n")
            await writer.drain()
            self.writers.append(writer)
            self.answered += 1
            await reader.read()  # held until the other end closes
        except ConnectionError:
            pass  # a guest killed with data unread: a reset
        finally:
            writer.close()
            self.finished += 1


def heap() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def connection_share() -> int:
    """Heap bytes allocated (innermost frame) in the connection's code."""
    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    return sum(
        stat.size
        for stat in snapshot.statistics("filename")
        if stat.traceback[0].filename.replace("\\", "/").endswith(CONNECTION_FILES)
    )


async def network_connections(n: int, trace: bool) -> dict[str, Any]:
    """``n`` members each holding a connection to a host server: heap figures if
    ``trace`` (tracemalloc on), else RSS figures (tracemalloc's own records would
    count in RSS)."""
    net = Network()
    held = Held()
    server = await net.start_server(held.serve, PORT, backlog=BATCH)
    measure = heap if trace else rss_bytes
    if trace:
        tracemalloc.start()
    gc.collect()
    before = measure()
    members = [net.join(f"member-{i}") for i in range(n)]
    gc.collect()
    joined = measure()
    ends: list[StreamSocket] = []
    t0 = now()
    for start in range(0, n, BATCH):
        for member in members[start : start + BATCH]:
            sock = member.socket(STREAM)
            assert isinstance(sock, StreamSocket)
            sock.connect(HOST_ADDR, PORT)
            sock.send(b"hello\n")
            ends.append(sock)
        await poll(lambda: held.answered == len(ends), 0)
    for sock in ends:  # the answer, read as a client would
        try:
            assert sock.recv(64) == b"ok\n"
        except WouldBlock:
            raise AssertionError("an answer did not arrive") from None
    elapsed = now() - t0
    gc.collect()
    connected = measure()
    tracemalloc.stop()
    assert server.connections == n
    for sock in ends:
        sock.close()
    await poll(lambda: held.finished == n, 0)
    server.close()
    return {
        "connections": n,
        "per_connection": (connected - joined) / n,
        "per_member": (joined - before) / n,
        "setup_s": elapsed,
    }


def answered_or_failed(held: Held, guests: list[Guest], start: int) -> bool:
    """Every guest launched has its answer, or one of those from ``start`` on ended."""
    return held.answered == len(guests) or any(g.done for g in guests[start:])


async def guest_connections(n: int, memory: str, trace: bool) -> dict[str, Any]:
    """``n`` C guests each holding a connection to a host server, all at once."""
    held = Held()
    gc.collect()
    async with Supervisor(hibernate_after=0.0, keep_ended=False) as sup:
        server = await sup.net.start_server(held.serve, PORT, backlog=BATCH)
        if trace:
            tracemalloc.start()
        rss0 = rss_bytes()
        heap0, share0 = (heap(), connection_share()) if trace else (0, 0)
        t0 = now()
        guests: list[Guest] = []
        batches: list[float] = []  # seconds per guest, one figure a batch
        cpu: list[float] = []  # the process's CPU seconds per guest, one figure a batch
        size = min(GUEST_BATCH, n)
        for start in range(0, n, size):
            tb, cb = now(), cpu_seconds()
            for i in range(start, min(n, start + size)):
                config = GuestConfig(
                    image=CLIENT,
                    name=f"client-{i}",
                    cmdline=f"host {PORT} hello",
                    net=True,
                    memory=memory,
                )
                guests.append(await sup.launch(config))
            await poll(partial(answered_or_failed, held, guests, start), 0.05)
            if held.answered != len(guests):
                failed = next(g for g in guests[start:] if g.done)
                raise AssertionError(f"{failed.name} ended: {await failed.wait()}")
            count = len(guests) - start
            batches.append((now() - tb) / count)
            cpu.append((cpu_seconds() - cb) / count)
            print(
                f"  {len(guests):,} guests: {batches[-1] * 1000:.0f} ms, {cpu[-1] * 1000:.0f} ms "
                f"of CPU a guest for the last {count}; {rss_bytes() >> 20} MiB RSS",
                file=sys.stderr,
                flush=True,
            )
        elapsed = now() - t0
        await asyncio.sleep(1.0)  # every guest back in recv, waiting
        ended = sum(g.done for g in guests)
        if ended or held.finished:
            raise AssertionError(f"{ended} guests ended, {held.finished} connections closed")
        rss1 = rss_bytes()
        heap1, share1 = (heap(), connection_share()) if trace else (0, 0)
        tracemalloc.stop()
        assert server.connections == n and held.answered == n
        for writer in held.writers:  # the host hangs up: every guest must end well
            writer.close()
        exits = [await g.wait() for g in guests]
        bad = [(g.name, e) for g, e in zip(guests, exits, strict=True) if not e.ok]
        if bad:
            raise AssertionError(f"{len(bad)} guests failed, the first {bad[0]}")
    await poll(lambda: held.finished == n, 0)
    share = (share1 - share0) / n
    return {
        "guests": n,
        "rss_per_guest": (rss1 - rss0) / n,
        "heap_per_guest": (heap1 - heap0 - share1 + share0) / n,
        "connection_share": share,
        "setup_s": elapsed,
        "batches": batches,
        "cpu": cpu,
        "batch": size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=10_000, help="network-level connections")
    ap.add_argument("--guests", type=int, default=1000, help="C guests, one connection each")
    ap.add_argument("--memory", default="1M", help="each guest's RAM")
    ap.add_argument("--engines", default="pool", choices=MODES, help="the device's engine mode")
    ap.add_argument("--no-trace", action="store_true", help="guests: RSS only (no tracemalloc)")
    args = ap.parse_args()
    os.environ[ENGINES_ENV] = args.engines  # read when the Supervisor makes its device

    if args.members:
        rss = asyncio.run(network_connections(args.members, trace=False))
        traced = asyncio.run(network_connections(args.members, trace=True))
        met = "met" if rss["per_connection"] <= GOAL else "NOT met"
        print(
            f"network: {args.members:,} connections held to a host server (set up in "
            f"{rss['setup_s']:.1f} s): {rss['per_connection'] / KiB:.2f} KiB RSS per "
            f"connection, goal <= {GOAL // KiB} KiB: {met}; "
            f"{traced['per_connection'] / KiB:.2f} KiB of it Python heap; a member alone "
            f"{rss['per_member'] / KiB:.2f} KiB RSS, {traced['per_member'] / KiB:.2f} KiB heap"
        )
    if args.guests:
        g = asyncio.run(guest_connections(args.guests, args.memory, not args.no_trace))
        b, c = g["batches"], g["cpu"]
        print(
            f"guests: {g['guests']:,} C guests ({args.memory}, engines {args.engines}) each "
            f"holding a connection, all served, set up in {g['setup_s']:.1f} s; set-up "
            f"per guest by batch of {g['batch']} (first, median, last): "
            f"{b[0] * 1000:.0f}, {median(b) * 1000:.0f}, {b[-1] * 1000:.0f} ms wall; "
            f"{c[0] * 1000:.0f}, {median(c) * 1000:.0f}, {c[-1] * 1000:.0f} ms of CPU"
        )
        if args.no_trace:
            print(f"  {g['rss_per_guest'] / KiB:.1f} KiB RSS per guest (connection included)")
        else:
            print(
                f"  the network's code (member and connection): {g['connection_share'] / KiB:.2f}"
                f" KiB heap per connection; everything else: {g['heap_per_guest'] / KiB:.1f} "
                f"KiB heap per guest; {g['rss_per_guest'] / KiB:.1f} KiB RSS per guest in all "
                "(tracemalloc on)"
            )


if __name__ == "__main__":
    main()
