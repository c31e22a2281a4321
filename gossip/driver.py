"""The asyncio driver: one peer's averaging machine on a ``gossip.network.Network``.

``Driver(net, machine)`` is what the daemon, the Python API and the simulator's ``gossip``
engine average with (``await driver.average(vector, weight, round)``). It registers the
machine's message types on the network with a synchronous handler (the machine's ``receive``;
a ``ProtocolError`` it raises goes back to the sender as a refusal), sends what the machine
returns with the network's ``post`` (one-way, no task per message) or, on a network without it,
``send`` in a task, and keeps one :class:`gossip.machine.Alarm` on the network's ``call_at``
(the loop's ``call_at`` if the network has none) for the machine's deadline.

Nothing waits inside: ``start()`` calls the machine's ``begin`` at once and returns a future of
the round's result, so a caller on a virtual clock (the simulator) starts a peer at exactly the
instant it is ready, as ``simulator.ticks.TickDriver`` does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from floor.errors import AggregationError, ConfigError, MurmurError, ProtocolError
from floor.identity import PeerId
from gossip.machine import Alarm, AverageResult, Machine, Out, RoundJob, wake_if_due
from gossip.network import Network

__all__ = ["Averager", "Driver"]

log = logging.getLogger("murmur.gossip.driver")

_IDS = 1 << 12


class Averager:
    """What a training session averages with: ``await average(vector, weight, round)``.

    ``average`` raises an ``AggregationError`` (``AggregationAborted``, ``GroupFormationFailed``)
    when the step failed for this peer: it keeps its model. :class:`Driver` is the one
    implementation (tests may pass their own object of this shape).
    """

    name: str

    async def average(self, vector: Tensor, weight: float, round: int) -> AverageResult:
        """Average ``vector`` (weight ``weight``) with other peers for ``round``."""
        raise NotImplementedError


class Driver(Averager):
    """Runs ``machine`` over ``net`` (see the module docstring). ``close()`` to unregister."""

    def __init__(self, net: Network, machine: Machine, *, send_timeout_s: float = 10.0) -> None:
        self.name = machine.name
        self.machine = machine
        self._net = net
        self._send_timeout = send_timeout_s
        self._post = getattr(net, "post", None)
        self._schedule = getattr(net, "call_at", None)
        self._alarm = Alarm(self._call_at, self._fire)
        self._waiter: asyncio.Future[AverageResult] | None = None
        self._ids: dict[bytes, PeerId] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.refused = 0
        """Inbound messages the machine refused."""
        self.send_failures = 0
        """Outbound messages the network reported undelivered."""
        for cls in machine.message_types:
            net.register(cls, self._on_message)

    # ------------------------------------------------------------------ averaging

    def start(
        self, vector: Tensor, weight: float, round: int, view: Sequence[bytes] | None = None
    ) -> asyncio.Future[AverageResult]:
        """Begin the round now; a future of its result (or of the ``AggregationError``).

        ``view`` (raw ids) replaces the network's view (the simulator's shared snapshot). A
        contribution the machine refuses (``ConfigError``, ``RingOverflow``) raises here.
        """
        if self._closed:
            raise ConfigError("the averager is closed")
        if self._waiter is not None:
            raise ConfigError("a round is already running on this peer")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[AverageResult] = loop.create_future()
        if view is None:
            view = tuple(p.raw for p in self._net.view())
        out = self.machine.begin(self._net.time(), RoundJob(round, vector, weight, view))
        self._waiter = fut
        self._after(out)
        return fut

    async def average(self, vector: Tensor, weight: float, round: int) -> AverageResult:
        """The round's result; cancelling the call cancels the machine's round."""
        fut = self.start(vector, weight, round)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            self.cancel()
            raise

    def cancel(self) -> None:
        """End the running round now (it fails for this peer; its secrets are forgotten)."""
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.cancel()
        out = self.machine.cancel(self._net.time())
        self._alarm.clear()
        self._send(out)

    def close(self) -> None:
        """Stop the running round and unregister the machine's message types."""
        if self._closed:
            return
        self.cancel()
        self._closed = True
        for cls in self.machine.message_types:
            self._net.unregister(cls)
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ events

    def _on_message(self, sender: PeerId, message: Any) -> None:
        try:
            out = self.machine.receive(self._net.time(), sender.raw, message)
        except ProtocolError:
            self.refused += 1
            raise
        self._after(out)

    def _fire(self, when: float) -> None:
        machine = self.machine
        out = wake_if_due(machine, self._alarm, max(self._net.time(), when))
        if out is not None:
            self._after(out)

    def _after(self, out: Out) -> None:
        self._send(out)
        machine = self.machine
        waiter = self._waiter
        if machine.done:
            try:
                result = machine.outcome()
            except AggregationError as exc:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(exc)
            else:
                if waiter is not None and not waiter.done():
                    waiter.set_result(result)
            self._waiter = None
            return
        self._alarm.set(machine.wake_at)

    def _call_at(self, when: float, fn: Any, *args: Any) -> None:
        if self._schedule is not None:
            self._schedule(when, fn, *args)
        else:
            asyncio.get_running_loop().call_at(when, fn, *args)

    # ------------------------------------------------------------------ sending

    def _peer(self, raw: bytes) -> PeerId:
        peer = self._ids.get(raw)
        if peer is None:
            if len(self._ids) >= _IDS:
                self._ids.clear()
            peer = self._ids[raw] = PeerId(raw)
        return peer

    def _send(self, out: Out) -> None:
        if not out:
            return
        post = self._post
        if post is not None:
            timeout = self._send_timeout
            for raw, message in out:
                post(self._peer(raw), message, timeout=timeout, on_failure=self._failed)
            return
        for raw, message in out:
            task = asyncio.ensure_future(self._send_one(self._peer(raw), message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _failed(self, message: Any, exc: MurmurError) -> None:
        self.send_failures += 1
        log.debug("event=send_failed type=%s error=%s", message.TYPE, exc)

    async def _send_one(self, peer: PeerId, message: Any) -> None:
        try:
            await self._net.send(peer, message, timeout=self._send_timeout)
        except MurmurError as exc:
            self._failed(message, exc)
