"""Measurements that need a fresh interpreter (RSS of many instances); prints one JSON line."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any

from . import bench_hibernate, cases


def _run(coro: Coroutine[Any, Any, dict[str, Any]], loop: str) -> dict[str, Any]:
    factory = asyncio.new_event_loop
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def main(argv: list[str]) -> None:
    what = argv[0]
    if what == "raw-halted":
        result = cases._raw_halted(int(argv[1]), int(argv[2]))
    elif what == "sup-halted":
        result = _run(cases._sup_halted(int(argv[1]), int(argv[2])), argv[3])
    elif what == "sup-hibernated":
        result = _run(bench_hibernate.sup_hibernated(int(argv[1]), int(argv[2])), argv[3])
    else:
        raise SystemExit(f"unknown measurement {what}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
