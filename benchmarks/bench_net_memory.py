"""Host memory per connection: many members of one network, each holding a connection
to a host server (``sup.net.start_server``).

* ``network``: N members joined to a :class:`~supervisor.net.Network` (what a
  networked guest's file device holds), each with a stream socket connected to a
  host server whose callback reads a line, answers and keeps the connection
  (its task stays pending in ``reader.read()``): the RSS that the connections
  add, over N (the goal's figure), then in a second run the Python heap
  (``tracemalloc``) they add; beside each, what the joined members alone cost.
  No CPU is emulated, so N can be the goal's 10,000 on any machine.
* ``guests``: N C guests (guests/c/tcp_echo_client.elf) on one Supervisor's
  network, each connecting to the host server by name, sending a line and
  waiting in ``recv`` (hibernated) with its connection held.  RSS and heap per
  guest, and the heap allocated in ``supervisor/net.py`` and
  ``asyncio/streams.py`` (the connection's share) per connection.

The goal: at most 16 KiB of host memory per connection.

    python -m benchmarks.bench_net_memory [--members 10000] [--guests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tracemalloc
from pathlib import Path
from typing import Any

from supervisor import GuestConfig, Supervisor
from supervisor.net import HOST_ADDR, STREAM, Network, StreamSocket, WouldBlock

from .harness import now, poll, rss_bytes

KiB = 1024
GOAL = 16 * KiB  # bytes of host memory per connection
PORT = 7000
BATCH = 500
CLIENT = Path(__file__).resolve().parent.parent / "guests" / "c" / "tcp_echo_client.elf"
CONNECTION_FILES = ("supervisor/net.py", "asyncio/streams.py")


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


async def guest_connections(n: int) -> dict[str, Any]:
    held = Held()
    gc.collect()
    async with Supervisor(hibernate_after=0.0, keep_ended=False) as sup:
        server = await sup.net.start_server(held.serve, PORT, backlog=BATCH)
        tracemalloc.start()
        heap0, rss0 = heap(), rss_bytes()
        share0 = connection_share()
        t0 = now()
        guests = []
        for i in range(n):
            config = GuestConfig(
                image=CLIENT, name=f"client-{i}", cmdline=f"host {PORT} hello", net=True
            )
            guests.append(await sup.launch(config))
            if len(guests) % BATCH == 0:
                await poll(lambda: held.answered == len(guests), 0.05)
        await poll(lambda: held.answered == n, 0.05)
        elapsed = now() - t0
        await asyncio.sleep(1.0)  # every guest back in recv, hibernated
        heap1, rss1 = heap(), rss_bytes()
        share1 = connection_share()
        tracemalloc.stop()
        assert server.connections == n
    await poll(lambda: held.finished == n, 0)
    return {
        "guests": n,
        "rss_per_guest": (rss1 - rss0) / n,
        "heap_per_guest": (heap1 - heap0) / n,
        "connection_share": (share1 - share0) / n,
        "setup_s": elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=10_000, help="network-level connections")
    ap.add_argument("--guests", type=int, default=300, help="C guests, one connection each")
    args = ap.parse_args()

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
        g = asyncio.run(guest_connections(args.guests))
        print(
            f"guests: {g['guests']:,} C guests each holding a connection, set up in "
            f"{g['setup_s']:.1f} s: {g['rss_per_guest'] / KiB:.1f} KiB RSS and "
            f"{g['heap_per_guest'] / KiB:.1f} KiB heap per guest, of which "
            f"{g['connection_share'] / KiB:.2f} KiB allocated in the connection's code "
            f"({', '.join(CONNECTION_FILES)})"
        )


if __name__ == "__main__":
    main()
