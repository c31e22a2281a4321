"""Replay protection with bounded memory, accounted per sender so no sender can hurt another.

An envelope is accepted only if its timestamp lies in ``[now - window_s, now + max_future_s]``,
so a nonce needs remembering only until its timestamp leaves the window; older entries are
evicted by time. The cache never silently forgets an in-window nonce (that would let it be
replayed). When it must make room it evicts a sender's oldest entry and raises *that sender's*
floor: from then on an envelope of that sender stamped at or below its floor is refused as
stale. Room is made in two ways:

* a sender holding ``per_sender`` entries makes room from its own entries, and
* when the whole cache holds ``capacity`` entries, the sender holding the most gives one up.

So a flood only ever shrinks the flooder's own window (honest senders stamp their envelopes in
increasing order, so their own floor stays behind their next envelope), and timestamps far in
the future are refused outright: a sender cannot park entries that outlive the window, nor
move a floor that others depend on. A sender whose entries were all evicted keeps a small
floor record until its floor leaves the window; when ``capacity`` sender records exist, a new
sender is refused ``Overloaded`` (retry later) rather than anyone's entry being forgotten.
Thread-safe (one lock), so decoding may run in an executor.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading

from floor.errors import ConfigError, Overloaded, ReplayedMessage, StaleMessage

__all__ = ["ReplayCache"]


class _Sender:
    """One sender's remembered nonces (a heap by timestamp and a set) and its floor."""

    __slots__ = ("floor", "heap", "seen")

    def __init__(self) -> None:
        self.heap: list[tuple[float, bytes]] = []
        self.seen: set[bytes] = set()
        self.floor = -math.inf

    def oldest(self) -> float:
        """The timestamp of the oldest remembered entry (inf if none)."""
        heap = self.heap
        while heap and heap[0][1] not in self.seen:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def evict_oldest(self) -> None:
        while self.heap:
            timestamp, nonce = heapq.heappop(self.heap)
            if nonce in self.seen:  # else it already left by time
                self.seen.discard(nonce)
                self.floor = max(self.floor, timestamp)
                return


class ReplayCache:
    """Remembers ``(sender, timestamp, nonce)`` of accepted envelopes; at most ``capacity``."""

    def __init__(
        self,
        window_s: float,
        capacity: int,
        *,
        per_sender: int | None = None,
        max_future_s: float = 10.0,
    ) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ConfigError("window_s must be a positive number of seconds")
        if not (math.isfinite(max_future_s) and 0 <= max_future_s <= window_s):
            raise ConfigError("max_future_s must be between 0 and window_s")
        if capacity < 1:
            raise ConfigError("replay_capacity must be at least 1")
        share = max(1, capacity // 16) if per_sender is None else per_sender
        if not 1 <= share <= capacity:
            raise ConfigError("replay per_sender must be between 1 and the capacity")
        self.window_s = window_s
        self.max_future_s = max_future_s
        self.capacity = capacity
        self.per_sender = share
        self._senders: dict[bytes, _Sender] = {}
        self._size = 0
        # Lazy heaps: (timestamp, sender, nonce) for expiry by time (nonce b"": the
        # sender's floor-only record), and (-count, tiebreak, sender) to find the largest.
        self._expiry: list[tuple[float, bytes, bytes]] = []
        self._largest: list[tuple[int, int, bytes]] = []
        self._tiebreak = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._size

    @property
    def senders(self) -> int:
        """How many senders have entries or a floor record."""
        return len(self._senders)

    def floor_of(self, sender: bytes) -> float:
        """The timestamp at or below which ``sender``'s envelopes are refused (-inf: none)."""
        record = self._senders.get(sender)
        return -math.inf if record is None else record.floor

    # -- time ---------------------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        expiry = self._expiry
        while expiry and expiry[0][0] < horizon:
            _, sender, nonce = heapq.heappop(expiry)
            record = self._senders.get(sender)
            if record is None:
                continue
            if nonce and nonce in record.seen:
                record.seen.discard(nonce)
                self._size -= 1
                heap = record.heap
                while heap and heap[0][1] not in record.seen:
                    heapq.heappop(heap)
            if not record.seen and record.floor < horizon:
                del self._senders[sender]
        if len(expiry) > 2 * self._size + 1024:  # stale items of evicted entries: rebuild
            self._expiry = [
                (timestamp, sender, nonce)
                for sender, record in self._senders.items()
                for timestamp, nonce in record.heap
                if nonce in record.seen
            ]
            self._expiry += [
                (record.floor, sender, b"")
                for sender, record in self._senders.items()
                if not record.seen
            ]
            heapq.heapify(self._expiry)

    # -- making room -----------------------------------------------------------------------------
    def _evict_from(self, sender: bytes, record: _Sender) -> None:
        record.evict_oldest()
        self._size -= 1
        if not record.seen:
            heapq.heappush(self._expiry, (record.floor, sender, b""))

    def _evict_largest(self) -> None:
        largest = self._largest
        while largest:
            negative, _, sender = heapq.heappop(largest)
            record = self._senders.get(sender)
            if record is not None and len(record.seen) == -negative and record.seen:
                self._evict_from(sender, record)
                self._push_count(sender, record)
                return
        self._rebuild_largest()  # every item was stale: rebuild and try once more
        if largest := self._largest:
            _, _, sender = heapq.heappop(largest)
            record = self._senders[sender]
            self._evict_from(sender, record)
            self._push_count(sender, record)

    def _push_count(self, sender: bytes, record: _Sender) -> None:
        if record.seen:
            heapq.heappush(self._largest, (-len(record.seen), next(self._tiebreak), sender))
        if len(self._largest) > 2 * len(self._senders) + 1024:
            self._rebuild_largest()

    def _rebuild_largest(self) -> None:
        self._largest = [
            (-len(r.seen), next(self._tiebreak), s) for s, r in self._senders.items() if r.seen
        ]
        heapq.heapify(self._largest)

    # -- the checks ------------------------------------------------------------------------------
    def _check_locked(self, sender: bytes, nonce: bytes, timestamp: float, now: float) -> None:
        if timestamp > now + self.max_future_s:
            raise StaleMessage(f"timestamp {timestamp - now:+.1f} s ahead of this peer's clock")
        if timestamp < now - self.window_s:
            raise StaleMessage(f"timestamp {timestamp - now:+.1f} s from now")
        self._expire(now)
        record = self._senders.get(sender)
        if record is None:
            return
        if timestamp <= record.floor:
            raise StaleMessage("timestamp is older than the replay cache remembers for its sender")
        if nonce in record.seen:
            raise ReplayedMessage("nonce already seen within the window")

    def check(self, sender: bytes, nonce: bytes, timestamp: float, now: float) -> None:
        """Raise ``StaleMessage`` or ``ReplayedMessage`` if the envelope must be refused."""
        with self._lock:
            self._check_locked(sender, nonce, timestamp, now)

    def add(self, sender: bytes, nonce: bytes, timestamp: float, now: float) -> None:
        """Check again (another thread may have won) and remember the nonce.

        ``Overloaded`` when ``capacity`` senders already hold records and this one is new.
        """
        with self._lock:
            self._check_locked(sender, nonce, timestamp, now)
            record = self._senders.get(sender)
            if record is None:
                if len(self._senders) >= self.capacity:
                    raise Overloaded("replay cache holds as many senders as it takes")
                record = self._senders[sender] = _Sender()
            if len(record.seen) >= self.per_sender and timestamp <= record.oldest():
                raise StaleMessage("sender's share of the replay cache is full of newer entries")
            while len(record.seen) >= self.per_sender:
                self._evict_from(sender, record)
            while self._size >= self.capacity:
                self._evict_largest()
            if timestamp <= record.floor:  # older than an entry this sender just gave up
                raise StaleMessage("replay cache is full; timestamp is too old to remember")
            heapq.heappush(record.heap, (timestamp, nonce))
            record.seen.add(nonce)
            self._size += 1
            heapq.heappush(self._expiry, (timestamp, sender, nonce))
            self._push_count(sender, record)
