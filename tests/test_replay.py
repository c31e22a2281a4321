"""The replay cache under floods: what one sender (or many) can and cannot do to the others."""

from __future__ import annotations

import random

import pytest

from floor.errors import ConfigError, Overloaded, ReplayedMessage, StaleMessage
from floor.replay import ReplayCache

HONEST = b"h" * 32
FLOODER = b"f" * 32


def _nonce(rng: random.Random) -> bytes:
    return rng.randbytes(24)


def test_timestamps_ahead_of_the_clock_are_refused_beyond_the_skew() -> None:
    cache = ReplayCache(window_s=120.0, capacity=100, max_future_s=10.0)
    with pytest.raises(StaleMessage, match="ahead"):
        cache.check(FLOODER, b"n" * 24, 1000.0 + 10.5, now=1000.0)
    cache.add(FLOODER, b"n" * 24, 1000.0 + 9.5, now=1000.0)
    with pytest.raises(StaleMessage):
        cache.check(HONEST, b"m" * 24, 1000.0 - 120.5, now=1000.0)
    with pytest.raises(ConfigError):
        ReplayCache(window_s=10.0, capacity=10, max_future_s=11.0)
    with pytest.raises(ConfigError):
        ReplayCache(window_s=10.0, capacity=10, per_sender=11)


def test_one_flooding_sender_only_moves_its_own_floor() -> None:
    """The issue's attack: one identity fills the cache with stamps ahead of the clock."""
    rng = random.Random(1)
    cache = ReplayCache(window_s=120.0, capacity=1000, per_sender=100, max_future_s=10.0)
    now = 5000.0
    for i in range(5000):  # far more than the whole cache
        cache.add(FLOODER, _nonce(rng), now + 9.0 + i * 1e-4, now)
    assert len(cache) <= 100  # its share, not the cache
    assert cache.floor_of(FLOODER) > now  # its own floor went to the future...
    assert cache.floor_of(HONEST) == float("-inf")  # ...nobody else's did
    for step in range(50):  # the honest sender, stamped "now", is never refused
        cache.add(HONEST, _nonce(rng), now + step * 0.01, now + step * 0.01)
    with pytest.raises(StaleMessage):  # the flooder's own older stamps are refused
        cache.add(FLOODER, _nonce(rng), now + 1.0, now)


def test_many_flooding_senders_share_the_cache_and_honest_envelopes_still_pass() -> None:
    rng = random.Random(2)
    cache = ReplayCache(window_s=120.0, capacity=500, per_sender=500)
    now = 100.0
    honest: list[tuple[bytes, float]] = []
    for i in range(5000):  # 50 identities: ten times the capacity, interleaved with honesty
        stamp = now + i * 1e-3
        cache.add(bytes([i % 50]) * 32, _nonce(rng), stamp + 5.0, stamp)
        if i % 100 == 0:
            nonce = _nonce(rng)
            cache.add(HONEST, nonce, stamp, stamp)  # never refused: the assertion is no raise
            honest.append((nonce, stamp))
        assert len(cache) <= 500
    # Room came from the largest holders: every sender ends near its fair share.
    counts = [len(cache._senders[bytes([j]) * 32].seen) for j in range(50)]
    assert max(counts) - min(counts) <= 1
    for nonce, stamp in honest:  # and no honest envelope can be replayed
        with pytest.raises((ReplayedMessage, StaleMessage)):
            cache.check(HONEST, nonce, stamp, now + 6.0)


def test_evicted_nonces_are_never_accepted_again() -> None:
    """Whatever made room, a nonce seen within the window is refused (replay or stale)."""
    rng = random.Random(3)
    cache = ReplayCache(window_s=50.0, capacity=64, per_sender=16)
    seen: list[tuple[bytes, bytes, float]] = []
    now = 0.0
    for i in range(3000):
        now += rng.random() * 0.05
        sender = bytes([rng.randrange(8)]) * 32
        nonce, stamp = _nonce(rng), now + rng.uniform(-1.0, 1.0)
        try:
            cache.add(sender, nonce, stamp, now)
        except StaleMessage:
            continue
        seen.append((sender, nonce, stamp))
        if i % 7 == 0:  # replay something accepted earlier, still inside the window
            old = [s for s in seen if s[2] >= now - 50.0]
            sender, nonce, stamp = rng.choice(old)
            with pytest.raises((ReplayedMessage, StaleMessage)):
                cache.add(sender, nonce, stamp, now)
    assert len(cache) <= 64


def test_memory_is_bounded_by_capacity_and_time() -> None:
    rng = random.Random(4)
    cache = ReplayCache(window_s=10.0, capacity=200, per_sender=20)
    for i in range(20_000):
        now = i * 0.01
        cache.add(bytes([i % 97]) * 32, _nonce(rng), now, now)
    assert len(cache) <= 200
    assert cache.senders <= 200
    assert len(cache._expiry) <= 2 * len(cache) + 1024  # lazily cleaned heaps stay bounded
    assert len(cache._largest) <= 2 * cache.senders + 1024
    cache.check(HONEST, _nonce(rng), 1000.0, 1000.0)  # everything expires with time
    assert len(cache) == 0 and cache.senders == 0


def test_a_full_table_of_senders_refuses_newcomers_as_busy() -> None:
    """Only when ``capacity`` distinct senders hold records is a new sender refused (BUSY,
    retryable); the senders already known go on, and the table empties with time."""
    cache = ReplayCache(window_s=100.0, capacity=3, per_sender=1)
    for i in range(3):
        cache.add(bytes([i]) * 32, b"n" * 24, 1.0, 1.0)
    with pytest.raises(Overloaded):
        cache.add(bytes([9]) * 32, b"m" * 24, 2.0, 2.0)
    cache.add(bytes([0]) * 32, b"k" * 24, 2.0, 2.0)  # a known sender is still served
    cache.add(bytes([9]) * 32, b"m" * 24, 102.0, 102.0)  # after the window: room again
