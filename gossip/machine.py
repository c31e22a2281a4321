"""The shape of every averaging protocol: a sans-IO machine, and the one alarm its drivers keep.

A machine is one peer's side of an averaging protocol (secure or plaintext groups with their
matchmaking, pairwise gossip, push-sum, D-PSGD), written like ``mpc.Member`` and h11's
``Connection``: it never awaits, reads no clock and owns no socket. Its driver gives it the time
and the messages, and sends what it returns:

* ``begin(now, job)`` starts this peer's averaging for one round (its contribution, weight and
  the membership view it may pick partners from);
* ``receive(now, sender, message)`` hands it one message from another peer (raw 32-byte id);
  it raises a ``floor.errors.ProtocolError`` to refuse the message (nothing changes then);
* ``wake(now)`` is called once ``now`` reaches ``wake_at`` (the machine's next deadline);
* each returns ``Out``: the messages to send, ``[(recipient raw id, message), ...]``, in order;
* ``done`` turns true when this peer's round is over; ``outcome()`` then gives the
  ``AverageResult`` or raises the ``AggregationError`` that ended it, and readies the machine
  for its next ``begin``. ``cancel()`` ends a running round at once (its secrets forgotten).

Machines live as long as the peer (a matchmaker must answer invitations between rounds; a
push-sum inbox fills between rounds). Two drivers run them: ``gossip.driver.Driver`` on an
asyncio loop (the daemon, the Python API, the simulator's ``gossip`` engine) and
``simulator.ticks.TickDriver`` from the simulated network's tick callbacks (the ``direct``
engine). Both keep the machine's deadline with :class:`Alarm` and call it back synchronously,
so one seed gives the same run under either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from floor.errors import ConfigError

__all__ = [
    "Alarm",
    "AverageResult",
    "Machine",
    "Out",
    "RoundJob",
    "check_contribution",
    "wake_if_due",
]

Out = list[tuple[bytes, Any]]
"""Messages to send: ``(recipient raw id, message)`` pairs, in order."""


@dataclass(frozen=True)
class RoundJob:
    """What a peer brings to one round of averaging."""

    round: int
    """The round key: peers only average with peers of the same key (0: any round)."""
    vector: Tensor
    """This peer's contribution (1-D floating point)."""
    weight: float
    """Its weight (> 0)."""
    view: Sequence[bytes]
    """The peers it may average with (raw ids), as its membership sees them. It may hold the
    peer itself (a shared snapshot: the simulator hands every peer the same one), which the
    machine never picks as a partner."""


@dataclass(frozen=True)
class AverageResult:
    """The outcome of one averaging step for one peer.

    ``vector`` is the new value (the group's weighted mean, for group averaging); ``weight`` is
    the peer's new weight (the group's mean weight ``sum(w) / size``, which conserves the
    weighted total). ``group_size`` counts the inputs in the mean.
    """

    vector: Tensor
    weight: float
    group_size: int
    round: int
    group: bytes | None = None
    contributors: tuple[bytes, ...] = ()
    """Whose inputs are in the mean (raw ids; group averaging, empty for the baselines)."""
    total: Tensor | None = None
    """Group averaging: the exact group totals ``[sum w x, sum w]`` (decoded, float64)."""
    scale: float | None = None
    """Group averaging: the fixed-point scale the group encoded with."""
    recovered: bool = False
    """Secure groups: the round finished although members dropped after their input."""


class Machine(Protocol):
    """One peer's sans-IO averaging protocol (see the module docstring)."""

    name: str
    message_types: tuple[type, ...]

    @property
    def wake_at(self) -> float | None:
        """When the machine wants ``wake`` (None: it waits only for messages)."""
        ...

    @property
    def done(self) -> bool:
        """True once the current round is over for this peer (``outcome()`` is ready)."""
        ...

    def begin(self, now: float, job: RoundJob) -> Out:
        """Start averaging ``job``; ``ConfigError`` if a round is already running."""
        ...

    def receive(self, now: float, sender: bytes, message: Any) -> Out:
        """Handle one message; raise a ``ProtocolError`` to refuse it."""
        ...

    def wake(self, now: float) -> Out:
        """The deadline ``wake_at`` passed."""
        ...

    def outcome(self) -> AverageResult:
        """The finished round's result, or raise the ``AggregationError`` that ended it."""
        ...

    def cancel(self, now: float) -> Out:
        """End the running round now (the driver stopped): its secrets are forgotten; returns
        what to send (a matchmaker releases the peers it gathered)."""
        ...


def check_contribution(vector: Tensor, weight: float) -> None:
    """Refuse what no averaging can take: a vector that is not 1-D float, a weight not > 0."""
    if vector.dim() != 1 or not vector.is_floating_point():
        raise ConfigError("vector must be a 1-D floating-point tensor")
    if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(f"weight must be positive and finite, got {weight!r}")


Schedule = Callable[..., Any]
"""``call_at(when, fn, *args)``: run ``fn(*args)`` at ``when`` on the driver's clock."""


class Alarm:
    """One pending wake-up for one machine on a ``call_at`` scheduler.

    ``set(when)`` makes sure a callback runs at ``when`` at the latest: a pending earlier one is
    kept (when it fires, the driver sees the deadline moved and sets the alarm again), a later
    one is superseded (it is ignored when it fires). ``fire(when)`` gets the time it was set
    for (a loop may run a timer a clock tick early). So a machine whose deadline moves later
    with every stage costs one scheduled callback per stage it actually waits in, and both
    drivers schedule exactly the same callbacks for the same calls.
    """

    __slots__ = ("_call_at", "_fire", "_pending", "_token")

    def __init__(self, call_at: Schedule, fire: Callable[[float], None]) -> None:
        self._call_at, self._fire = call_at, fire
        self._pending: float | None = None
        self._token = 0

    def set(self, when: float | None) -> None:
        """Ask for a callback at ``when`` (None: nothing new is needed)."""
        if when is None:
            return
        pending = self._pending
        if pending is not None and pending <= when:
            return
        self._pending = when
        self._token += 1
        self._call_at(when, self._fired, self._token)

    def clear(self) -> None:
        """Forget the pending callback (it will be ignored)."""
        self._pending = None
        self._token += 1

    def _fired(self, token: int) -> None:
        if token != self._token:
            return
        when, self._pending = self._pending, None
        assert when is not None
        self._fire(when)


def wake_if_due(machine: Machine, alarm: Alarm, now: float) -> Out | None:
    """The driver's alarm fired at ``now``: wake ``machine`` if its deadline passed (what to
    send), else set the alarm again for the moved deadline (None: nothing happened)."""
    due = machine.wake_at
    if due is None:
        return None
    if due > now:
        alarm.set(due)
        return None
    return machine.wake(now)
