"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

The Mersenne prime 2^521 - 1 is larger than any 256-bit secret, so a secret is a field element
as is. ``split`` draws the t - 1 random coefficients with ``secrets.randbelow`` (CSPRNG) and
evaluates the polynomial at x = 1..n; ``combine`` interpolates at 0 with Lagrange coefficients
that are cached per set of x-coordinates (the survivors of a round reuse one set many times).
Any t - 1 shares are uniform in the field and independent of the secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from floor.errors import AggregationAborted, ConfigError, InconsistentMessage

__all__ = ["MAX_SHARES", "PRIME", "SECRET_BYTES", "SHARE_BYTES", "Share", "combine", "split"]

PRIME = (1 << 521) - 1
"""The field modulus: the Mersenne prime 2^521 - 1."""

SECRET_BYTES = 32
"""Length of a secret in bytes."""

SHARE_BYTES = (PRIME.bit_length() + 7) // 8
"""Length of a share value ``y`` in bytes (66, big-endian)."""

MAX_SHARES = 1 << 16
"""Upper bound on ``n`` (x-coordinates are 1..n)."""


@dataclass(frozen=True, slots=True)
class Share:
    """One share: the point ``(x, y)`` with ``y`` as ``SHARE_BYTES`` big-endian bytes (secret)."""

    x: int
    y: bytes = field(repr=False)


def split(secret: bytes, *, threshold: int, n: int) -> list[Share]:
    """Split a 32-byte ``secret`` into ``n`` shares, any ``threshold`` of which recover it."""
    if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_BYTES:
        raise ConfigError(f"a secret must be {SECRET_BYTES} bytes")
    for name, value in (("threshold", threshold), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not 1 <= threshold <= n <= MAX_SHARES:
        raise ConfigError(f"need 1 <= threshold <= n <= {MAX_SHARES}, got {threshold}, {n}")
    coefficients = [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    constant = int.from_bytes(secret, "big")
    shares = []
    for x in range(1, n + 1):
        acc = 0
        for c in reversed(coefficients):
            acc = (acc + c) * x % PRIME
        shares.append(Share(x, ((acc + constant) % PRIME).to_bytes(SHARE_BYTES, "big")))
    return shares


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients l_i with f(0) = sum l_i f(x_i) for distinct non-zero ``xs``."""
    coefficients = []
    for i, xi in enumerate(xs):
        num = 1
        den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        coefficients.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(coefficients)


def combine(shares: Sequence[Share], *, threshold: int) -> bytes:
    """Recover the secret from at least ``threshold`` shares (the ``threshold`` lowest x are used).

    Raises ``AggregationAborted`` with fewer than ``threshold`` shares and ``InconsistentMessage``
    for a duplicate x, a malformed share, or shares that do not interpolate to a 32-byte secret.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise ConfigError(f"threshold must be a positive integer, got {threshold!r}")
    points: dict[int, int] = {}
    for share in shares:
        x, y = share.x, share.y
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x < PRIME:
            raise InconsistentMessage(f"share x-coordinate out of range: {x!r}")
        if not isinstance(y, bytes | bytearray) or len(y) != SHARE_BYTES:
            raise InconsistentMessage(f"share value must be {SHARE_BYTES} bytes")
        value = int.from_bytes(y, "big")
        if value >= PRIME:
            raise InconsistentMessage("share value is not a field element")
        if x in points:
            raise InconsistentMessage(f"two shares with x = {x}")
        points[x] = value
    if len(points) < threshold:
        raise AggregationAborted(f"{len(points)} shares, {threshold} needed to recover a secret")
    xs = tuple(sorted(points)[:threshold])
    total = 0
    for x, coefficient in zip(xs, _lagrange_at_zero(xs), strict=True):
        total += points[x] * coefficient
    secret = total % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise InconsistentMessage("shares do not interpolate to a 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
