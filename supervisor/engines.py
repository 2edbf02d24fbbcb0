"""Engines: configured, warmed Unicorn instances that a device's CPUs take in turn.

A Unicorn instance is cheap to create (tens of microseconds) but dear to warm: its
first memory mapping and its first ``emu_start`` make QEMU build the emulated
machine, about a millisecond and a mebibyte.  An :class:`EnginePool` keeps instances
that have run and hands them to the CPUs that need one: a CPU that gives back its
emulator (:meth:`LgCpu.hibernate <supervisor.cpu.LgCpu.hibernate>`) puts it here
instead of freeing it, and a CPU that needs one again
(:meth:`LgCpu.thaw <supervisor.cpu.LgCpu.thaw>`) takes one from here.

Affinity: a CPU that takes an engine back which nobody took meanwhile gets it as it
left it: its memory mapping, hooks and translations intact (only its registers are
loaded again).  Any other engine is *switched* to the CPU: every hook and mapping of
its previous CPU is taken off (:func:`supervisor._unicorn.strip`, which drops the
translations too), the CPU's memory is mapped at its host address, its hooks and
slice meter installed, its registers (FPU/SSE, descriptor tables, paging included)
loaded, and its TLB flushed.

An engine whose ``emu_start`` raised (``UcError``) or whose switch failed is never
handed on: :meth:`EnginePool.give` closes it (the CPU marks it
``Engine.tainted``).  The pool keeps at most ``keep`` idle engines (the least recently
given back are closed first); :attr:`EnginePool.live` counts every instance it made
and has not closed, held by a CPU or idle.

The pool is opt-in: :data:`ENV` (``LGUEST_ENGINE_SWITCH``) set to ``pool`` gives each
device one; ``always`` also makes every CPU give back its engine before each slice and
take a different one (every slice runs on a switched engine), the mode the exactness
tests run under to judge the switch.  Event loop only.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from . import _unicorn

ENV = "LGUEST_ENGINE_SWITCH"  # unset / "off": no pool; "pool"; "always": switch every slice
MODES = ("off", "pool", "always")
# Idle engines a pool keeps by default beyond one per worker and one for the event
# loop's inline slices.
RESERVE = 2


def mode_from_env() -> str:
    """The engine mode :data:`ENV` asks for (``ValueError`` for an unknown one)."""
    mode = os.environ.get(ENV, "off").strip().lower() or "off"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


class EnginePool:
    """Idle engines of one device, each remembered with the CPU that last held it.

    ``keep``: the most idle engines kept (at least 2 when ``always`` switches, so a
    CPU can always be given an engine other than the one it just gave back).
    """

    __slots__ = (
        "_idle",
        "_tcg_buffer",
        "always",
        "closed",
        "keep",
        "live",
        "made",
        "reused",
        "switched",
    )

    def __init__(self, tcg_buffer: int, keep: int, *, always: bool = False) -> None:
        if keep < 1:
            raise ValueError(f"an engine pool keeps at least 1 idle engine, not {keep}")
        self.keep = max(keep, 2) if always else keep
        self.always = always
        # id(instance) -> (instance, the owner token of the CPU that gave it back), oldest
        # first: a CPU's own engine is found in O(1), the oldest one closed first.
        self._idle: OrderedDict[int, tuple[Any, object]] = OrderedDict()
        self.live = 0  # instances made and not closed (held or idle)
        self.made = 0  # instances made, ever
        self.closed = 0  # instances closed (over `keep`, tainted, or the pool closing)
        self.reused = 0  # takes that found the CPU's own engine untouched
        self.switched = 0  # takes that switched an engine from another CPU
        self._tcg_buffer = tcg_buffer

    @classmethod
    def for_workers(cls, tcg_buffer: int, workers: int, mode: str) -> EnginePool | None:
        """The pool a device with ``workers`` threads gets in ``mode`` (None: "off")."""
        if mode == "off":
            return None
        return cls(tcg_buffer, workers + 1 + RESERVE, always=mode == "always")

    @property
    def idle(self) -> int:
        """How many engines wait in the pool."""
        return len(self._idle)

    def take(self, owner: object, last: Any) -> tuple[Any, bool]:
        """An engine for ``owner`` (the CPU's token) and whether it is ``last`` (the one
        it gave back) untouched since: then only its registers need loading.  Otherwise
        the engine comes stripped (:func:`_unicorn.strip`) or new, and the caller maps
        and configures it for the CPU (and gives it back tainted if that fails)."""
        if last is not None and not self.always:
            entry = self._idle.get(id(last))
            if entry is not None and entry[0] is last and entry[1] is owner:
                del self._idle[id(last)]
                self.reused += 1
                return last, True
        for key, (uc, _previous) in self._idle.items():
            if self.always and uc is last:
                continue  # the forced mode: never the engine this CPU just gave back
            del self._idle[key]
            try:
                _unicorn.strip(uc)
            except Exception:
                self._close(uc)
                break  # (a new one below)
            self.switched += 1
            return uc, False
        return self._new(), False

    def give(self, owner: object, uc: Any, tainted: bool = False) -> None:
        """``owner`` gives ``uc`` back (no slice runs on it).  A tainted engine is closed;
        past ``keep`` idle engines the least recently given back is."""
        if tainted:
            self._close(uc)
            return
        self._idle[id(uc)] = (uc, owner)
        while len(self._idle) > self.keep:
            _, (oldest, _owner) = self._idle.popitem(last=False)
            self._close(oldest)

    def close(self) -> None:
        """Close every idle engine (the device is closing; held ones come back closed)."""
        while self._idle:
            _, (uc, _owner) = self._idle.popitem()
            self._close(uc)

    def _new(self) -> Any:
        uc = _unicorn.new_instance(self._tcg_buffer)
        self.live += 1
        self.made += 1
        return uc

    def _close(self, uc: Any) -> None:
        _unicorn.close(uc)
        self.live -= 1
        self.closed += 1
