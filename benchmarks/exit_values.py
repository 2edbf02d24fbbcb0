"""Exit values as plain singletons against ``enum.Enum``: the cost of a slice's classify path.

``python -m benchmarks.exit_values``: ``classify`` for the longest chain (a ``hlt``)
plus the ``match`` and ``is`` tests the run loop makes on its answer, with
:class:`~supervisor.execute.SliceExit` and with an ``enum.Enum`` copy of it; then one
member lookup of each.  The run loop makes about 16 such lookups per NOTIFY round trip.
"""

from __future__ import annotations

import enum
import timeit
from collections.abc import Callable

from supervisor import _slicing
from supervisor.abi import LGUEST_TRAP_ENTRY
from supervisor.execute import SliceExit, classify


class EnumExit(enum.Enum):
    HYPERCALL = "hypercall"
    TRAP = "trap"
    BAD_ACCESS = "bad access"
    INVALID_OPCODE = "invalid opcode"
    EMULATION_ERROR = "emulation error"
    HALT = "halt"
    DEBUG_STOP = "debug stop"
    BUDGET = "budget"
    KICK = "kick"
    DEATH = "death"


def classify_enum(vector: int | None, debug: object, reason: int, error: int | None) -> EnumExit:
    """``classify``'s decisions, answered with the Enum."""
    if error is not None:
        return EnumExit.EMULATION_ERROR
    if vector == LGUEST_TRAP_ENTRY:
        return EnumExit.HYPERCALL
    if vector is not None:
        return EnumExit.TRAP
    if debug is not None:
        return EnumExit.DEBUG_STOP
    if reason == _slicing.REASON_STOP:
        return EnumExit.KICK
    if reason == _slicing.REASON_BUDGET:
        return EnumExit.BUDGET
    return EnumExit.HALT


def path_singletons() -> bool:
    ended = classify(None, None, _slicing.REASON_NONE, None)
    match ended:
        case SliceExit.DEBUG_STOP:
            pass
        case SliceExit.HALT:
            pass
    return ended is SliceExit.BUDGET


def path_enum() -> bool:
    ended = classify_enum(None, None, _slicing.REASON_NONE, None)
    match ended:
        case EnumExit.DEBUG_STOP:
            pass
        case EnumExit.HALT:
            pass
    return ended is EnumExit.BUDGET


def best_ns(*stmts: Callable[[], object], number: int = 200_000, rounds: int = 15) -> list[float]:
    """Each statement's best time in ns, the statements interleaved round by round (the
    machine is shared: a slow phase then slows every statement alike)."""
    best = [float("inf")] * len(stmts)
    for _ in range(rounds):
        for i, stmt in enumerate(stmts):
            best[i] = min(best[i], timeit.timeit(stmt, number=number) / number * 1e9)
    return best


def main() -> None:
    plain, enumerated = best_ns(path_singletons, path_enum)
    print(f"classify path: singletons {plain:4.0f} ns, enum.Enum {enumerated:4.0f} ns")
    plain, enumerated = best_ns(lambda: SliceExit.HALT, lambda: EnumExit.HALT)
    print(f"one lookup (with a call): singletons {plain:4.0f} ns, enum.Enum {enumerated:4.0f} ns")


if __name__ == "__main__":
    main()
