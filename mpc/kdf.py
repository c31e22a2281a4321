"""Key derivation for secure aggregation: keyed BLAKE2b over a length-prefixed context.

``derive(key, label, *parts)`` is BLAKE2b-256 keyed with ``key`` (16..64 bytes) over
``b"murmur.kdf.v1" || enc(label) || enc(part_1) || ... || enc(part_n)`` where
``enc(b) = len(b).to_bytes(4, "big") || b``. The length prefixes make the encoding injective, so
different (label, parts) tuples never collide; keyed BLAKE2b is a PRF, which is what a KDF from
an already uniform secret (an X25519 shared secret) needs. Known-answer vectors live in
tests/data/mpc_kdf_kat.json.
"""

from __future__ import annotations

import hashlib

from floor.errors import ConfigError

__all__ = ["PAIR_KEYS_LABEL", "PAIR_SEED_LABEL", "derive", "pair_keys", "pair_seed", "u64"]

_DOMAIN = b"murmur.kdf.v1"
PAIR_SEED_LABEL = b"murmur.secagg.pair-seed.v1"
"""KDF label of pairwise mask seeds (``pair_seed``)."""
PAIR_KEYS_LABEL = b"murmur.secagg.pair-round.v2"
"""KDF label of a pair's per-round keys (``pair_keys``)."""


def u64(value: int) -> bytes:
    """Encode a non-negative integer below 2^64 as 8 big-endian bytes (for KDF parts)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise ConfigError(f"expected an integer in [0, 2^64), got {value!r}")
    return value.to_bytes(8, "big")


def _enc(part: bytes) -> bytes:
    if not isinstance(part, bytes | bytearray):
        raise ConfigError(f"KDF parts must be bytes, got {type(part).__name__}")
    return len(part).to_bytes(4, "big") + bytes(part)


def derive(key: bytes, label: bytes, *parts: bytes, size: int = 32) -> bytes:
    """A ``size``-byte key (default 32, at most 64) derived from secret ``key`` for the context
    ``(label, *parts)``."""
    if not isinstance(key, bytes | bytearray) or not 16 <= len(key) <= 64:
        raise ConfigError("a KDF key must be 16 to 64 bytes")
    if not 16 <= size <= 64:
        raise ConfigError("a KDF output must be 16 to 64 bytes")
    h = hashlib.blake2b(key=bytes(key), digest_size=size)
    h.update(_DOMAIN)
    h.update(_enc(label))
    for part in parts:
        h.update(_enc(part))
    return h.digest()


def pair_seed(shared_secret: bytes, *, round: int, group: bytes, a: bytes, b: bytes) -> bytes:
    """The 32-byte pairwise mask seed of members ``a`` and ``b`` in ``(round, group)``.

    Symmetric in ``(a, b)`` (the ids are sorted) and bound to the round number, the group id and
    both member ids, so a seed never repeats across rounds or groups even if keys are reused.
    """
    if a == b:
        raise ConfigError("a pairwise seed needs two different members")
    lo, hi = sorted((bytes(a), bytes(b)))
    return derive(shared_secret, PAIR_SEED_LABEL, u64(round), bytes(group), lo, hi)


def pair_keys(root: bytes, *, round: int, group: bytes, a: bytes, b: bytes) -> tuple[bytes, bytes]:
    """One pair's keys for ``(round, group)``: ``(mask seed, share key)``, 32 bytes each.

    One 64-byte KDF output from the pair's root key (``mpc.keys.pair_root``), split in two; the
    mask seed feeds the PRG, the share key seals Shamir shares between the two (both directions:
    the sealed plaintext names sender and recipient). Symmetric in ``(a, b)`` and bound to the
    round and the group, so nothing repeats across rounds or groups.
    """
    if a == b:
        raise ConfigError("pair keys need two different members")
    lo, hi = sorted((bytes(a), bytes(b)))
    out = derive(root, PAIR_KEYS_LABEL, u64(round), bytes(group), lo, hi, size=64)
    return out[:32], out[32:]
