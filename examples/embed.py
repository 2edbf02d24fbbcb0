"""Embedding the supervisor in an asyncio program.

Runs the hello guest and the echo guest side by side: reads hello's console,
talks to echo through its console, and prints how each ended.

    python examples/embed.py
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from supervisor import GuestConfig, Supervisor

GUESTS = Path(__file__).resolve().parent.parent / "guests"


async def main() -> None:
    async with Supervisor() as sup:
        hello = await sup.launch(GuestConfig(image=GUESTS / "hello.img"))
        echo = await sup.launch(GuestConfig(image=GUESTS / "echo.img", memory="1M"))

        async for line in hello.console:
            print(f"[hello] {line}")
        print(f"[hello] ended: {await hello.wait()}")

        for text in ("ping\n", "pong\n", "quit\n"):
            echo.send(text)
        async for line in echo.console:
            print(f"[echo] {line}")
        result = await echo.wait()
        print(f"[echo] ended: status {result.exit_status}, {echo.stats.hypercalls} hypercalls")


if __name__ == "__main__":
    asyncio.run(main())
