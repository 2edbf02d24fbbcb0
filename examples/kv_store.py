"""A replicated key-value store of guests, partitioned and healed.

Two guests run the C store (guests/c/kv_server.elf): ``kv-b`` alone, ``kv-a``
replicating every SET to ``kv-b`` and answering only once ``kv-b`` has it.
This program is their client (``sup.net.open_connection``), and a guest client
(guests/c/tcp_echo_client.elf sends one request line) reads by name.

1. A write reaches both stores.
2. A short cut between the stores: a write to ``kv-a`` waits (its bytes to
   ``kv-b`` are held), while ``kv-b`` still answers reads with the old value.
   After the heal the held bytes arrive, the write completes, both agree.
3. A cut longer than the network's ``stream_timeout``: ``kv-a`` gives up on
   its replica (``ETIMEDOUT``) and goes on alone; the write survives on ``kv-a``
   only, and after the heal ``kv-b`` never learns it.

    python examples/kv_store.py
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from supervisor import GuestConfig, Supervisor
from supervisor.net import Network

GUESTS = Path(__file__).resolve().parent.parent / "guests" / "c"
PORT = 6379
STREAM_TIMEOUT = 4.0  # seconds a cut may hold sent bytes before the sender gives up


class Client:
    """One connection to a store: a request line in, an answer line out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def to(cls, sup: Supervisor, name: str) -> Client:
        return cls(*await sup.net.open_connection(name, PORT))

    async def ask(self, request: str) -> str:
        self.writer.write(request.encode() + b"\n")
        await self.writer.drain()
        return (await self.reader.readline()).decode().strip()

    def close(self) -> None:
        self.writer.close()


async def guest_get(sup: Supervisor, store: str, request: str) -> str:
    """Ask ``store`` from a guest client, by the store's name."""
    image, cmdline = GUESTS / "tcp_echo_client.elf", f"{store} {PORT} {request}"
    client = await sup.launch(GuestConfig(image=image, name="reader", cmdline=cmdline, net=True))
    lines = [line async for line in client.console]
    await client.wait()
    return " ".join(lines)


async def main() -> None:
    async with Supervisor(network=Network(stream_timeout=STREAM_TIMEOUT)) as sup:
        kv_b = await sup.launch(
            GuestConfig(image=GUESTS / "kv_server.elf", name="kv-b", cmdline=str(PORT), net=True)
        )
        await kv_b.expect(f"listening on {PORT}", timeout=30)
        kv_a = await sup.launch(
            GuestConfig(
                image=GUESTS / "kv_server.elf", name="kv-a", cmdline=f"{PORT} kv-b {PORT}", net=True
            )
        )
        await kv_a.expect(f"listening on {PORT}", timeout=30)
        a, b = await Client.to(sup, "kv-a"), await Client.to(sup, "kv-b")

        print(f"[1] SET color blue at kv-a: {await a.ask('SET color blue')}")
        print(f"[1] GET color at kv-b: {await b.ask('GET color')}")

        sup.net.partition(["kv-a"], ["kv-b"])
        write = asyncio.create_task(a.ask("SET color green"))
        await asyncio.sleep(0.5)
        print(f"[2] cut: the write to kv-a still waits: {not write.done()}")
        print(f"[2] cut: GET color at kv-b: {await b.ask('GET color')}")
        sup.net.heal()
        print(f"[2] healed: the write completes: {await write}")
        print(f"[2] healed: GET color at kv-b: {await b.ask('GET color')}")
        print(f"[2] healed: a guest reads kv-a: {await guest_get(sup, 'kv-a', 'GET color')}")

        sup.net.partition(["kv-a"], ["kv-b"])
        print(f"[3] long cut: SET size 3 at kv-a: {await a.ask('SET size 3')}")
        said = await kv_a.expect(r"replica lost: [^\n]*", timeout=30)
        print(f"[3] kv-a said: {said.group(0)}")
        sup.net.heal()
        print(f"[3] healed: GET size at kv-a: {await a.ask('GET size')}")
        print(f"[3] healed: GET size at kv-b: {await b.ask('GET size')}")
        print(f"[3] what survives: kv-a has {await a.ask('DUMP')}, kv-b has {await b.ask('DUMP')}")
        a.close()
        b.close()


if __name__ == "__main__":
    asyncio.run(main())
