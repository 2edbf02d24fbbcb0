"""Measurements that need a fresh interpreter (RSS of many instances); prints one JSON line."""

from __future__ import annotations

import asyncio
import json
import sys

from . import cases


def main(argv: list[str]) -> None:
    what = argv[0]
    if what == "raw-halted":
        result = cases._raw_halted(int(argv[1]), int(argv[2]))
    elif what == "sup-halted":
        factory = asyncio.new_event_loop
        if argv[3] == "uvloop":
            import uvloop

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            result = runner.run(cases._sup_halted(int(argv[1]), int(argv[2])))
    else:
        raise SystemExit(f"unknown measurement {what}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
