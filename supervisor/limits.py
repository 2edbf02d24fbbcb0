"""Resource limits: what one guest, and one device, may consume.

Per-guest limits are enforced by the run loop at slice boundaries: a guest that
runs out dies with a reason saying which limit it hit.  Device limits are
checked at ``LHREQ_INITIALIZE``, which fails with ``ENOMEM`` when a new guest
would exceed them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-guest limits; ``None`` means unlimited.

    ``max_blocks`` counts translated blocks started (the exact unit the slice
    meter uses: about 3-10 instructions each); ``max_run_time`` counts seconds
    spent emulating the guest, not wall-clock time.
    """

    max_blocks: int | None = None
    max_run_time: float | None = None

    def __post_init__(self) -> None:
        if self.max_blocks is not None and self.max_blocks <= 0:
            raise ValueError("max_blocks must be positive")
        if self.max_run_time is not None and self.max_run_time <= 0:
            raise ValueError("max_run_time must be positive")

    def blocks_left(self, used: int) -> int | None:
        """How many more blocks the guest may start, or None if unlimited."""
        return None if self.max_blocks is None else max(0, self.max_blocks - used)

    def exceeded(self, blocks: int, run_time: float) -> str | None:
        """The death reason if a limit is used up, else None."""
        if self.max_blocks is not None and blocks >= self.max_blocks:
            return f"instruction budget exhausted ({self.max_blocks} blocks)"
        if self.max_run_time is not None and run_time >= self.max_run_time:
            return f"run time limit exceeded ({self.max_run_time:g} s)"
        return None


UNLIMITED = Limits()
