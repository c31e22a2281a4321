"""The in-memory network of N simulated peers, on the virtual clock, with tick-grouped delivery.

Following DESIGN.md's simulator cost model, no message gets its own timer, task or future:
a message's arrival time (now + uplink queueing + size / bandwidth + latency) is rounded up
to the next delivery tick (``tick_ms``), and all arrivals of one tick share one loop timer.
When it fires they are handled in a deterministic order (arrival time, then send order) by
calling the recipient's handler directly (sans-IO: ``handler(sender_index, message)``), which
is both the fastest shape and the one ``mpc.Member`` is written for. Scheduled callbacks
(``call_at``: a peer finishing local training, leaving, ...) go through the same buckets.

The per-message path is kept short (at 1,000 peers a run sends ~36,000 messages per round):
``post_many`` sends a member's whole output in one loop, and a message nobody waits on is a
flat bucket entry that the tick's flush delivers inline; ``post`` with ``on_result`` or
``deliver_to`` (the gossip engine's sends and requests) takes the general path.

Two fidelity levels, same protocol logic:

* ``wire``: the sender's ``floor.envelope.EnvelopeCodec`` encodes and authenticates the envelope
  (MAC for public data, sealed for secrets, as the daemon does) and the recipient's codec runs
  every check on it (door, recipient, timestamp window on the virtual clock, replay, MAC or
  seal, schema) before the handler sees the decoded message;
* ``object``: the message object itself is handed over, no encoding or envelope crypto.

Both count the same bytes: the exact envelope size from ``simulator.messages.wire_size``
(``wire`` uses the length of the real encoding, which the tests check is identical).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any, cast

from floor.envelope import Auth, EnvelopeCodec
from floor.errors import ConfigError, ProtocolError, RefusalCode, UnknownMessageType
from floor.identity import Identity, PeerId
from simulator.config import Scenario
from simulator.messages import auth_for, registry, wire_size
from simulator.netmodel import LinkStream, NetModel

__all__ = ["EPOCH", "Handler", "SimNetwork", "peer_seed"]

Handler = Callable[[int, Any], Any]
"""Handles one delivered message: ``handler(sender_index, message)`` -> reply, None, or an
awaitable of the reply (run as a task; the sender hears about it when it completes)."""

OnResult = Callable[[bool, Any], None]
"""``on_result(accepted, reply_or_error)``: the fate of one sent message."""

_Entry = tuple[Any, ...]
"""A tick bucket's entry: ``(when, seq, fn, args)`` for a callback, ``(when, seq, None,
sender, recipient, message, size)`` for a plain delivery (see ``SimNetwork._flush``)."""

EPOCH = 1_767_225_600.0
"""Wall-clock seconds that virtual time 0 stands for in envelope timestamps (2026-01-01)."""


def peer_seed(seed: int, peer: int) -> bytes:
    """The deterministic 32-byte identity seed of simulated peer ``peer``."""
    return hashlib.blake2b(
        b"murmur.sim.peer" + seed.to_bytes(8, "big") + peer.to_bytes(8, "big"), digest_size=32
    ).digest()


class SimNetwork:
    """Moves messages between ``n`` peers (by index) with the scenario's network model."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        scenario: Scenario,
        n: int,
        online: list[bool],
    ) -> None:
        if scenario.fidelity not in ("object", "wire"):
            raise ConfigError(f"fidelity must be object or wire, got {scenario.fidelity!r}")
        self.loop = loop
        self.wire = scenario.fidelity == "wire"
        self.n = n
        self.model = NetModel(scenario, n, scenario.seed)
        self.online = online
        self.seeds = [peer_seed(scenario.seed, i) for i in range(n)]
        self.identities = [Identity.from_seed(s) for s in self.seeds]
        self.ids: list[PeerId] = [ident.peer_id for ident in self.identities]
        self.raw_ids: list[bytes] = [p.raw for p in self.ids]
        self.index: dict[bytes, int] = {raw: i for i, raw in enumerate(self.raw_ids)}
        self.handlers: list[dict[type, Handler]] = [{} for _ in range(n)]
        self._tick = scenario.tick_ms / 1000.0
        self._buckets: dict[int, list[_Entry]] = {}
        self._seq = 0
        self._uplink_free = [0.0] * n
        self._streams: list[LinkStream] = [self.model.stream] * n
        self._codecs: list[EnvelopeCodec | None] = [None] * n
        self._registry = registry() if self.wire else None
        self._last: tuple[object, Auth, int] | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_delivered = 0
        self.messages_lost = 0
        self.refused = 0
        self.timers = 0
        self.retransmissions = 0

    # ------------------------------------------------------------------ wiring

    def register(self, peer: int, message_type: type, handler: Handler) -> None:
        """Call ``handler(sender, message)`` for messages of ``message_type`` sent to ``peer``."""
        self.handlers[peer][message_type] = handler

    def use_stream(self, peers: Iterable[int], stream: LinkStream) -> None:
        """Draw the loss and latency of messages sent by ``peers`` from ``stream`` (a group's
        own; see ``NetModel.group_stream``) until told otherwise."""
        for p in peers:
            self._streams[p] = stream

    def idle_uplinks(self, peers: Iterable[int]) -> None:
        """Forget what ``peers``' uplinks still had to send: a group round starts each member
        with an idle uplink, so that a round does not depend on what its members did in other
        groups before (a transmission from before still arrives when it was due)."""
        free = self._uplink_free
        for p in peers:
            free[p] = 0.0

    def codec(self, peer: int) -> EnvelopeCodec:
        """The envelope codec of ``peer`` (wire fidelity), on the virtual clock."""
        codec = self._codecs[peer]
        if codec is None:
            loop = self.loop
            codec = EnvelopeCodec(
                self.identities[peer],
                clock=lambda: EPOCH + loop.time(),
                message_types=self._registry,
                replay_capacity=100_000,
            )
            self._codecs[peer] = codec
        return codec

    # ------------------------------------------------------------------ scheduling

    def tick_of(self, when: float) -> int:
        """The index of the delivery tick that virtual time ``when`` belongs to."""
        return math.ceil(when / self._tick - 1e-9)

    def _bucket(self, when: float) -> list[_Entry]:
        """The bucket of the tick ``when`` falls in; a new bucket gets the tick's one timer."""
        index = math.ceil(when / self._tick - 1e-9)
        bucket = self._buckets.get(index)
        if bucket is None:
            bucket = self._buckets[index] = []
            self.loop.call_at(index * self._tick, self._flush, index)
            self.timers += 1
        return bucket

    def call_at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` at virtual time ``when`` (grouped with that tick's deliveries)."""
        now = self.loop.time()
        if when < now:
            when = now
        bucket = self._bucket(when)
        self._seq += 1
        bucket.append((when, self._seq, fn, args))

    def _flush(self, index: int) -> None:
        """Run one tick's entries in (time, send order): callbacks, and plain deliveries inline
        (``_post_objects``' entries: ``(when, seq, None, sender, recipient, message, size)``)."""
        entries = self._buckets.pop(index, None)
        if not entries:
            return
        entries.sort()  # (when, seq) is unique: the comparison never reaches the payload
        online, handlers = self.online, self.handlers
        received = delivered = lost = refused = 0
        try:
            for entry in entries:
                fn = entry[2]
                if fn is not None:
                    fn(*entry[3])
                    continue
                _, _, _, sender, recipient, message, size = entry
                if not online[recipient]:
                    lost += 1
                    continue
                received += size
                handler = handlers[recipient].get(type(message))
                if handler is None:  # as UnknownMessageType: refused
                    refused += 1
                    continue
                try:
                    reply = handler(sender, message)
                except ProtocolError:
                    refused += 1
                    continue
                delivered += 1
                if reply is not None:
                    self._background(reply)
        finally:
            self.bytes_received += received
            self.messages_delivered += delivered
            self.messages_lost += lost
            self.refused += refused

    # ------------------------------------------------------------------ sending

    def size_of(self, message: object, auth: Auth) -> int:
        """The envelope size of ``message`` (cached for a message broadcast to many peers)."""
        last = self._last
        if last is not None and last[0] is message and last[1] == auth:
            return last[2]
        size = wire_size(message, auth)
        self._last = (message, auth, size)
        return size

    def post_many(self, sender: int, out: Iterable[tuple[bytes, object]]) -> None:
        """Send each ``(recipient_raw_id, message)`` of ``out``, in order, with no callback.

        The same as ``post(sender, index[recipient], message)`` for each, in one loop (the
        shape of what ``mpc.Member`` returns).
        """
        if self.wire:
            index = self.index
            for raw, message in out:
                self.post(sender, index[raw], message)
            return
        self._post_objects(sender, out, self.index)

    def post(
        self,
        sender: int,
        recipient: int,
        message: object,
        on_result: OnResult | None = None,
        deliver_to: Callable[[int, Any], None] | None = None,
    ) -> None:
        """Send ``message``; ``on_result(accepted, reply)`` is called when it is handled or lost.

        ``deliver_to(sender, message)`` replaces the recipient's handler (replies to requests).

        A message from an offline sender is not sent at all; one that is lost, crosses an
        active partition, or reaches an offline recipient counts as sent but not received.
        """
        if on_result is None and deliver_to is None and not self.wire:
            self._post_objects(sender, ((recipient, message),), None)
            return
        if not self.online[sender]:
            if on_result is not None:
                on_result(False, None)
            return
        auth = auth_for(message)
        payload: object = message
        if self.wire:
            payload = self.codec(sender).encode(
                cast(Any, message), recipient=self.ids[recipient], auth=auth
            )
            size = len(payload)
        else:
            size = self.size_of(message, auth)
        now = self.loop.time()
        self.bytes_sent += size
        self.messages_sent += 1
        model = self.model
        stream = self._streams[sender]
        start = max(now, self._uplink_free[sender])
        done = start + size * model.seconds_per_byte[sender]
        self._uplink_free[sender] = done
        delay = 0.0
        lost = model.partitioned(sender, recipient, now)
        if not lost and model.loss > 0.0 and stream.rng.random() < model.loss:
            lost = True
            if model.retransmit_s > 0.0:
                copies, lost = stream.resends(model.loss)
                self.retransmissions += copies
                self.bytes_sent += size * copies
                delay = copies * model.retransmit_s
        if lost:
            self.messages_lost += 1
            if on_result is not None:
                self.call_at(done + delay, on_result, False, None)
            return
        arrival = done + delay + stream.latency(sender, recipient)
        self.call_at(
            arrival, self._deliver, sender, recipient, payload, size, on_result, deliver_to
        )

    def _post_objects(
        self,
        sender: int,
        out: Iterable[tuple[Any, object]],
        index: dict[bytes, int] | None,
    ) -> None:
        """``post`` without callbacks at object fidelity, for many messages from one sender:
        the same model draws in the same order, bucketed as ``(when, seq, None, sender,
        recipient, message, size)`` for ``_flush`` to deliver inline. Recipients are raw ids
        looked up in ``index``, or peer indices when it is None."""
        if not self.online[sender]:
            return
        model, loop, buckets, tick = self.model, self.loop, self._buckets, self._tick
        now = loop.time()
        spb = model.seconds_per_byte[sender]
        free = self._uplink_free[sender]
        stream = self._streams[sender]
        loss, rng, latency = model.loss, stream.rng, stream.latency
        retry = model.retransmit_s
        resent = 0
        p_start, p_end = model.partition
        cut = p_start <= now < p_end
        side = model.side_list
        last = self._last
        last_message, last_auth, last_size = last if last is not None else (None, Auth.MAC, 0)
        seq = self._seq
        sent = count = dropped = 0
        # The last bucket used and its tick's time span: most messages of one output land in
        # the same tick, and then need no bucket lookup.
        bucket: list[_Entry] = []
        low = high = -1.0
        try:
            for target, message in out:
                recipient = target if index is None else index[target]
                if message is last_message:
                    size = last_size
                else:
                    last_auth = auth_for(message)
                    size = wire_size(message, last_auth)
                    last_message, last_size = message, size
                sent += size
                count += 1
                start = now if now > free else free
                free = start + size * spb
                if cut and side[sender] != side[recipient]:
                    dropped += 1
                    continue
                arrival = free
                if loss > 0.0 and rng.random() < loss:
                    if retry <= 0.0:
                        dropped += 1
                        continue
                    copies, gone = stream.resends(loss)
                    resent += copies
                    sent += size * copies
                    if gone:
                        dropped += 1
                        continue
                    arrival += copies * retry
                arrival += latency(sender, recipient)
                if not low < arrival <= high:
                    tick_index = math.ceil(arrival / tick - 1e-9)
                    found = buckets.get(tick_index)
                    if found is None:
                        found = buckets[tick_index] = []
                        loop.call_at(tick_index * tick, self._flush, tick_index)
                        self.timers += 1
                    bucket = found
                    # Strictly inside the tick's span, the index is the same (with margin
                    # for the rounding of the ceil above).
                    low, high = (tick_index - 1) * tick + 1e-9, tick_index * tick - 1e-9
                seq += 1
                bucket.append((arrival, seq, None, sender, recipient, message, size))
        finally:
            self._seq = seq
            self._uplink_free[sender] = free
            self.bytes_sent += sent
            self.messages_sent += count
            self.retransmissions += resent
            self.messages_lost += dropped
            if last_message is not None:
                self._last = (last_message, last_auth, last_size)

    def _deliver(
        self,
        sender: int,
        recipient: int,
        payload: object,
        size: int,
        on_result: OnResult | None,
        deliver_to: Callable[[int, Any], None] | None,
    ) -> None:
        ok = False
        message: Any
        reply: Any = None
        if self.online[recipient]:
            self.bytes_received += size
            try:
                if self.wire:
                    received = self.codec(recipient).decode(payload)  # type: ignore[arg-type]
                    if received.sender != self.ids[sender]:
                        raise ProtocolError("sender mismatch")
                    message = received.message
                else:
                    message = payload
                if deliver_to is not None:
                    deliver_to(sender, message)
                    self.messages_delivered += 1
                    ok = True
                else:
                    handler = self.handlers[recipient].get(type(message))
                    if handler is None:
                        raise UnknownMessageType(f"no handler for {type(message).__name__}")
                    reply = handler(sender, message)
                    self.messages_delivered += 1
                    if reply is not None:
                        if inspect.iscoroutine(reply):
                            reply, pending = _run_eagerly(reply)
                            if pending is not None:
                                reply = pending
                        if inspect.isawaitable(reply):
                            task = asyncio.ensure_future(reply)
                            if on_result is not None:
                                task.add_done_callback(functools.partial(self._finished, on_result))
                            else:
                                task.add_done_callback(self._finished_quiet)
                            return
                    ok = True
            except ProtocolError as exc:
                self.refused += 1
                reply = exc
        else:
            self.messages_lost += 1
        if on_result is not None:
            on_result(ok, reply)

    def _background(self, reply: Any) -> None:
        """A handler's non-None return on the inline path, which no one waits for: run a
        coroutine eagerly, then anything still pending as a task."""
        try:
            if inspect.iscoroutine(reply):
                reply, pending = _run_eagerly(reply)
                if pending is not None:
                    reply = pending
            if inspect.isawaitable(reply):
                asyncio.ensure_future(reply).add_done_callback(self._finished_quiet)
        except ProtocolError:
            self.refused += 1

    def _finished(self, on_result: OnResult, task: asyncio.Future[Any]) -> None:
        if task.cancelled():
            on_result(False, None)
            return
        exc = task.exception()
        if exc is None:
            on_result(True, task.result())
            return
        self.refused += 1
        if not isinstance(exc, ProtocolError):
            exc = ProtocolError(f"the handler failed: {exc!r}", code=RefusalCode.INTERNAL)
        on_result(False, exc)

    def _finished_quiet(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.refused += 1


def _run_eagerly(coro: Any) -> tuple[Any, Any]:
    """Run an async handler up to its first suspension, as an eager task would.

    Most handlers (put a message on a queue, answer from memory) never suspend: they finish
    here with no task at all. Returns ``(reply, None)`` then, or ``(None, awaitable)`` to run
    as a task when the handler does suspend. A failure other than a refusal becomes one.
    """
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value, None
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"the handler failed: {exc!r}", code=RefusalCode.INTERNAL) from exc
    return None, _resume(coro, yielded)


async def _resume(coro: Any, yielded: Any) -> Any:
    """Drive a coroutine that suspended on ``yielded`` to its end (inside a task)."""
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                await asyncio.wait([yielded])
                yielded._asyncio_future_blocking = False
        except asyncio.CancelledError:
            coro.close()
            raise
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value
