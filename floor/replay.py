"""Replay protection with bounded memory: the nonces of accepted envelopes within the window.

An envelope is accepted only if its timestamp is within ``window_s`` of now, so a nonce needs
remembering only until its timestamp leaves the window; older entries are evicted by time.
When the cache is full, it never silently forgets an in-window nonce (that would let it be
replayed): it evicts the entry with the oldest timestamp and raises a *floor*; from then on any
envelope with a timestamp at or below the floor is refused as stale. Under a flood, the
accepted window thus shrinks from below instead of replays getting through. The floor also
covers a wall clock that steps backwards. Thread-safe (one lock), so decoding may run in an
executor.
"""

from __future__ import annotations

import heapq
import math
import threading

from floor.errors import ConfigError, ReplayedMessage, StaleMessage

__all__ = ["ReplayCache"]


class ReplayCache:
    """Remembers ``(timestamp, nonce)`` of accepted envelopes; at most ``capacity`` of them."""

    def __init__(self, window_s: float, capacity: int) -> None:
        if not (math.isfinite(window_s) and window_s > 0):
            raise ConfigError("window_s must be a positive number of seconds")
        if capacity < 1:
            raise ConfigError("replay_capacity must be at least 1")
        self.window_s = window_s
        self.capacity = capacity
        self.floor = -math.inf
        self._seen: set[bytes] = set()
        self._heap: list[tuple[float, bytes]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def _evict_one(self) -> None:
        timestamp, nonce = heapq.heappop(self._heap)
        self._seen.discard(nonce)
        self.floor = max(self.floor, timestamp)

    def _evict_old(self, now: float) -> None:
        horizon = now - self.window_s
        while self._heap and self._heap[0][0] < horizon:
            self._evict_one()

    def _check_locked(self, nonce: bytes, timestamp: float, now: float) -> None:
        self._evict_old(now)
        if timestamp <= self.floor:
            raise StaleMessage("timestamp is older than the replay cache remembers")
        if nonce in self._seen:
            raise ReplayedMessage("nonce already seen within the window")

    def check(self, nonce: bytes, timestamp: float, now: float) -> None:
        """Raise ``ReplayedMessage`` if seen, ``StaleMessage`` if below the floor. No change."""
        with self._lock:
            self._check_locked(nonce, timestamp, now)

    def add(self, nonce: bytes, timestamp: float, now: float) -> None:
        """Check again (another thread may have won) and remember the nonce."""
        with self._lock:
            self._check_locked(nonce, timestamp, now)
            while len(self._heap) >= self.capacity:
                if timestamp <= self._heap[0][0]:
                    raise StaleMessage("replay cache is full; timestamp is too old to remember")
                self._evict_one()
            heapq.heappush(self._heap, (timestamp, nonce))
            self._seen.add(nonce)
