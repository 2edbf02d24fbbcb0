"""A guest service called from Python through the guests' network.

Starts the C echo server (guests/c/tcp_echo_server.elf) as the guest
``echo``, calls it from this program with asyncio streams
(``sup.net.open_connection``), then has a second guest call it by name.

    python examples/net_service.py
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from supervisor import GuestConfig, Supervisor

GUESTS = Path(__file__).resolve().parent.parent / "guests" / "c"


async def main() -> None:
    async with Supervisor() as sup:
        server = await sup.launch(
            GuestConfig(image=GUESTS / "tcp_echo_server.elf", name="echo", cmdline="7 2", net=True)
        )
        await server.expect("listening on 7", timeout=30)

        reader, writer = await sup.net.open_connection("echo", 7)
        for word in ("ping", "pong"):
            writer.write(word.encode() + b"\n")
            await writer.drain()
            print(f"[host] sent {word}, got {(await reader.readline()).decode().strip()}")
        writer.close()

        client = await sup.launch(
            GuestConfig(
                image=GUESTS / "tcp_echo_client.elf",
                name="client",
                cmdline="echo 7 hello from a guest",
                net=True,
            )
        )
        async for line in client.console:
            print(f"[client] {line}")
        print(f"[client] ended: status {(await client.wait()).exit_status}")
        print(f"[echo] ended: status {(await server.wait()).exit_status}")


if __name__ == "__main__":
    asyncio.run(main())
