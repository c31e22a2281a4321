"""Adaptive stage deadlines: per-stage timeouts from the arrival delays a peer observed.

A group all-reduce waits at each stage for its members' messages until everything arrived or
the stage's deadline passed (``gossip.allreduce``). A fixed deadline is either too long (every
member that left costs the whole timeout, and a straggler is waited for) or too short (a slow
network aborts every round). :class:`StageDeadlines` learns one timeout per stage from what the
peer saw in its own group rounds:

* a **sample** is the delay of one awaited message: how long after this member entered the
  stage the message arrived (0 if it was there before; a late message, after the stage
  closed, is a sample too, so a network that slows down is seen even while its messages miss
  their deadlines). Each stage keeps its last ``WINDOW`` samples; stages that move the model
  (a secure group's inputs and chunk sums, a plain group's chunks and sums) so carry the
  model's size and the links' bandwidth in their own samples;
* the **timeout** of a stage is ``MARGIN`` times the ``QUANTILE`` of its samples, within
  ``[floor, ceiling]`` (the configured ``min_stage_timeout_s`` and ``stage_timeout_s``), rounded
  up to a millisecond. Until a stage has ``WARMUP`` samples it is the ceiling. A straggler
  whose delay is past the bound is therefore dropped from the round (not counted, as a member
  that left), not waited for; the quantile keeps a minority of stragglers out of the bound;
  No other signal moves a timeout: a round that failed after a timeout says nothing of the
  deadline (the member may have been the late one, or others left), while late messages do.

The members of one group must close their stages at about the same time: a member whose
deadline is much shorter than the others' cuts a member they would have waited for (the
protocol stays exact: a cut member is not counted, but the members may then disagree on who
is). Groups formed by invitation therefore run on the inviter's timeouts, carried in
``gossip.group_formed`` (each member clamps them to its own floor and ceiling). Hash groups
exchange no formation message: each member proposes its timeouts in its first-stage messages
(``secagg.input``, ``gossip.plain_chunk``), its first stage waits as long as the largest
proposal heard, and the later stages take the largest proposal of each (``gossip.allreduce``).
And an adaptive deadline is soft: at it a stage closes only if enough members were heard and
closing would not abort the round (``mpc.Member.can_advance``); else it waits on up to the
ceiling.

The state is a plain value (:meth:`StageDeadlines.state`, :meth:`StageDeadlines.restore`), so a
simulator that runs a peer's rounds in different processes carries it along.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Iterable, Sequence

from floor.errors import ConfigError

__all__ = ["MARGIN", "QUANTILE", "WARMUP", "WINDOW", "StageDeadlines"]

WINDOW = 64
"""Samples kept per stage (about nine rounds of a group of 8)."""
WARMUP = 14
"""Samples a stage needs before its timeout adapts (two rounds of a group of 8)."""
QUANTILE = 0.75
"""The sample quantile the timeout is a multiple of (stragglers above it do not move it)."""
MARGIN = 3.0
"""Timeout = MARGIN x the quantile."""

DeadlineState = bytes
"""Per stage: the sample count (one byte) and the samples (microseconds, native int32)."""


def _quantile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class StageDeadlines:
    """One peer's timeouts for the ``stages`` stages of one all-reduce (see the module doc)."""

    def __init__(self, stages: int, *, ceiling: float, floor: float, adaptive: bool = True):
        if stages < 1:
            raise ConfigError(f"an all-reduce has at least one stage, got {stages!r}")
        if not (math.isfinite(ceiling) and ceiling > 0):
            raise ConfigError(f"stage_timeout_s must be > 0, got {ceiling!r}")
        if not (math.isfinite(floor) and floor > 0):
            raise ConfigError(f"min_stage_timeout_s must be > 0, got {floor!r}")
        self.stages = stages
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.adaptive = adaptive
        self._samples: list[deque[int]] = [deque(maxlen=WINDOW) for _ in range(stages)]
        self._cached: tuple[float, ...] | None = None

    def timeouts(self) -> tuple[float, ...]:
        """This peer's current timeout of every stage, seconds."""
        cached = self._cached
        if cached is None:
            cached = self._cached = tuple(self._timeout(i) for i in range(self.stages))
        return cached

    def _timeout(self, stage: int) -> float:
        samples = self._samples[stage]
        if not self.adaptive or len(samples) < WARMUP:
            return self.ceiling
        bound = MARGIN * _quantile(samples, QUANTILE) * 1e-6
        return math.ceil(self.clamp(bound) * 1000) / 1000

    def clamp(self, seconds: float) -> float:
        """``seconds`` within this peer's floor and ceiling (what it accepts from an inviter)."""
        return min(self.ceiling, max(self.floor, seconds))

    def accept(self, proposed: Sequence[float]) -> tuple[float, ...]:
        """An inviter's timeouts, clamped to this peer's bounds; this peer's own when the
        proposal does not fit (wrong length, not finite) or adaptation is off."""
        if not self.adaptive or len(proposed) != self.stages:
            return self.timeouts()
        if not all(math.isfinite(s) for s in proposed):
            return self.timeouts()
        return tuple(self.clamp(s) for s in proposed)

    def observe(self, delays: Iterable[tuple[int, float]]) -> None:
        """``(stage, delay)`` samples of a group round (during it, or late after it)."""
        samples = self._samples
        for stage, delay in delays:
            if 0 <= stage < self.stages and delay >= 0 and math.isfinite(delay):
                samples[stage].append(min(round(delay * 1e6), 2**31 - 1))
        self._cached = None

    def state(self) -> DeadlineState:
        """Everything this estimator learned, as compact bytes (for another process)."""
        out = bytearray()
        for samples in self._samples:
            out.append(len(samples))
            out += array("i", samples).tobytes()
        return bytes(out)

    def restore(self, state: DeadlineState) -> None:
        """Continue from ``state()`` of an estimator with the same stages (empty bytes: start
        afresh)."""
        if not state:
            self._samples = [deque(maxlen=WINDOW) for _ in range(self.stages)]
            self._cached = None
            return
        found: list[deque[int]] = []
        pos = 0
        while pos < len(state):
            count = state[pos]
            chunk = state[pos + 1 : pos + 1 + 4 * count]
            if len(chunk) != 4 * count:
                raise ConfigError("a malformed deadline state: truncated samples")
            values = array("i")
            values.frombytes(chunk)
            found.append(deque(values, maxlen=WINDOW))
            pos += 1 + 4 * count
        if len(found) != self.stages:
            raise ConfigError("a deadline state for another number of stages")
        self._samples = found
        self._cached = None
