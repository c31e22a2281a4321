"""Virtual time for asyncio: an event loop whose clock jumps to the next timer when idle.

Protocol code reads time only from the loop (``loop.time()``, ``asyncio.sleep``, ``wait_for``),
so running it on this loop makes a simulated hour pass in however long the computation takes.
The idea is trio's ``MockClock(autojump_threshold=0)``: whenever nothing is runnable, the loop
would block in ``select(timeout)`` until the next timer; here the selector instead advances the
virtual clock by ``timeout`` and returns at once.

Real file descriptors still work: the selector always polls them first, and when no timer is
pending at all (``timeout is None``) it blocks for real, which is what a loop waiting on an
executor thread (``run_in_executor``) needs. Virtual time does not advance while such a thread
computes: compute time is modelled explicitly by the simulator, not measured.

Runs are deterministic: the clock starts at a fixed value, and asyncio orders ready callbacks
FIFO and timers by due time then scheduling order.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Mapping
from typing import Any

__all__ = ["VirtualClockLoop", "new_virtual_loop"]


class _AutojumpSelector(selectors.BaseSelector):
    """Wraps a real selector; turns every would-block wait with a timeout into a clock jump."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        self._inner = selectors.DefaultSelector()
        self._loop = loop

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if ready:
            return ready
        if timeout is None:
            # Nothing scheduled: only a real event (another thread, a real socket) can wake us.
            return self._inner.select(None)
        if timeout > 0:
            self._loop.jump(timeout)
        return []

    def close(self) -> None:
        self._inner.close()

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._inner.get_map()


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop on a virtual clock that jumps to the next timer when idle."""

    def __init__(self, start: float = 0.0) -> None:
        self._virtual_now = float(start)
        super().__init__(selector=_AutojumpSelector(self))
        # Timers due within this much of "now" fire together; keep it tiny so the order of
        # events is decided by their due times, not by rounding.
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._virtual_now

    def jump(self, timeout: float) -> None:
        """Move the clock to the next timer's due time exactly (``timeout`` is how far away the
        loop computed it to be; it may be capped, then only that far).

        Setting the clock to the due time, rather than adding ``timeout``, makes virtual times
        independent of the path taken to them: two loops that ran different timers before
        reach a timer due at t with the clock at exactly t (the simulator's group workers rely
        on this to give the same results however the groups are split among them).
        """
        now = self._virtual_now
        scheduled: list[asyncio.TimerHandle] = getattr(self, "_scheduled", [])
        if scheduled:
            when = scheduled[0].when()
            if now < when <= now + timeout + 1e-9:
                self._virtual_now = when
                return
        self.advance(timeout)

    def advance(self, seconds: float) -> None:
        """Move the virtual clock forward (never backward)."""
        if seconds < 0:
            raise ValueError(f"cannot move the clock backward by {seconds} s")
        self._virtual_now += seconds


def new_virtual_loop(start: float = 0.0) -> VirtualClockLoop:
    """A loop factory for ``asyncio.Runner(loop_factory=...)``."""
    return VirtualClockLoop(start)
