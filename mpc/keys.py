"""Pair keys of secure aggregation: one static X25519 secret per pair, per-round keys from it.

Every member already has a long-term Ed25519 identity (its 32-byte id); its X25519 key is the
birationally equivalent one (``crypto_sign_ed25519_sk_to_curve25519``, as libsodium and the p2p
layer use). Two members compute one static Diffie-Hellman secret for their pair, once, and
derive everything per round from it with the keyed-BLAKE2b KDF (``mpc.kdf``), each output bound
to (round, group, both ids) so nothing repeats across rounds, groups or pairs:

* the pair's root ``pair_root`` = KDF(raw X25519 output, "pair-root", lower id, higher id);
* per round, ``mpc.kdf.pair_keys(root, round, group, a, b)``: the pair's mask seed and the key
  that seals Shamir shares between the two (``seal_with``; the sealed plaintext names sender and
  recipient, so a share cannot be reflected back to its sender).

Why no fresh X25519 keys per round (Bonawitz et al. 2017 advertise two per round): there, a
dropped member's *agreement private key* is reconstructed from shares so the others can remove
its pairwise masks, so that key must be per round. Here a dropped member's masks are removed by
its counted neighbours revealing the one-round *seeds* they share with it (``mpc.protocol``): a
seed is a KDF output, so revealing it says nothing about the static secret, other rounds or
other groups. That drops the key-advertisement stage, one X25519 per pair per round and two
Ed25519 operations per member per round. The cost: a member's identity key, if stolen, opens its
pair keys for past rounds too (no forward secrecy, as for the p2p layer's sealed envelopes; see
docs/THREAT_MODEL.md).

Speed: ``pair_root`` keeps each pair's root in a bounded process-wide cache keyed by the two ids
(the X25519 output is symmetric, so the other member of the pair, when it runs in the same
process, finds it). A caller can only ask for a pair it belongs to: it passes its own signing
key, whose verify key is one of the two ids. Converted peer keys are cached the same way (public
data). Sealed shares use ``crypto_secretbox`` (XSalsa20-Poly1305, random nonce) under the
pair's share key; the plaintext starts with the context (round, group, sender, recipient),
checked on opening, so a sealed share cannot be replayed into another round, group or pair.
"""

from __future__ import annotations

import contextlib
import hmac
import threading
from collections.abc import Iterable
from typing import TypeVar

import nacl.bindings
import nacl.exceptions
import nacl.signing
import nacl.utils

from floor.errors import BadSeal, ConfigError, MalformedMessage
from mpc.kdf import derive, u64

_V = TypeVar("_V")

__all__ = [
    "KEY_BYTES",
    "PAIR_ROOT_LABEL",
    "open_with",
    "pair_root",
    "seal_with",
    "warm_pair_roots",
]

KEY_BYTES = 32
"""Length of X25519 and Ed25519 public keys, private keys, seeds and derived keys."""

PAIR_ROOT_LABEL = b"murmur.secagg.pair-root.v2"
"""KDF label of a pair's root key (from the raw static X25519 output)."""

_SEAL_TAG = b"murmur.secagg.share.v2"
_NONCE_BYTES = nacl.bindings.crypto_secretbox_NONCEBYTES
_EIGHT = (8).to_bytes(4, "big")

CACHE_ENTRIES = 1 << 19
"""Bound of each process-wide cache (pair roots, converted peer keys); oldest go first.

A 1,000-peer simulation meets ~350,000 distinct pairs in 100 rounds; an entry is ~200 bytes."""

_ROOTS: dict[tuple[bytes, bytes], bytes] = {}  # (lower id, higher id) -> pair root
_CURVE_PUBLIC: dict[bytes, bytes] = {}  # Ed25519 id -> X25519 public key (public data)


_LOCK = threading.Lock()  # warm_pair_roots fills the caches from a second thread


def _remember(cache: dict[_V, bytes], key: _V, value: bytes) -> None:
    with _LOCK:
        if len(cache) >= CACHE_ENTRIES:
            cache.pop(next(iter(cache)), None)  # dicts keep insertion order: the oldest entry
        cache[key] = value


def _enc(part: bytes) -> bytes:
    return len(part).to_bytes(4, "big") + part


def _peer_id(peer: bytes) -> bytes:
    if not isinstance(peer, bytes | bytearray) or len(peer) != KEY_BYTES:
        raise ConfigError(f"a member id must be {KEY_BYTES} bytes")
    return bytes(peer)


def _curve_public(peer: bytes) -> bytes:
    """The X25519 public key of an Ed25519 id; ``MalformedMessage`` if it is not a valid point."""
    public = _CURVE_PUBLIC.get(peer)
    if public is None:
        try:
            public = bytes(nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(peer))
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise MalformedMessage("a member id is not a valid Ed25519 public key") from exc
        _remember(_CURVE_PUBLIC, peer, public)
    return public


def pair_root(signing_key: nacl.signing.SigningKey, peer: bytes, *, me: bytes = b"") -> bytes:
    """The 32-byte root key of the pair (this identity, ``peer``), computed once per process.

    Symmetric: the peer, with its own signing key, gets the same root. ``me`` may pass the
    signing key's own id (its verify key) to save recomputing it. Raises ``ConfigError`` for a
    pair of one member and ``MalformedMessage`` for an id that is not a usable public key (a
    low-order point would make the shared secret zero).
    """
    me = me or bytes(signing_key.verify_key)
    peer = _peer_id(peer)
    if peer == me:
        raise ConfigError("a pair needs two different members")
    lo, hi = (me, peer) if me < peer else (peer, me)
    root = _ROOTS.get((lo, hi))
    if root is None:
        root = _compute_root(signing_key, me, peer, lo, hi)
    return root


def _compute_root(
    signing_key: nacl.signing.SigningKey, me: bytes, peer: bytes, lo: bytes, hi: bytes
) -> bytes:
    private = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(
        bytes(signing_key) + me  # libsodium's 64-byte secret key: seed || public key
    )
    try:
        raw = nacl.bindings.crypto_scalarmult(private, _curve_public(peer))
    except nacl.exceptions.CryptoError as exc:
        raise MalformedMessage("a member id is a low-order point") from exc
    root = derive(raw, PAIR_ROOT_LABEL, lo, hi)
    _remember(_ROOTS, (lo, hi), root)
    return root


def warm_pair_roots(
    pairs: Iterable[tuple[nacl.signing.SigningKey, bytes, bytes]], *, threads: int = 2
) -> int:
    """Compute and cache the roots of ``(signing key, own id, peer id)`` pairs not cached yet.

    For a simulator that knows a round's groups before running them: the X25519 work is split
    between the caller and ``threads - 1`` helper threads (libsodium releases the GIL), and later
    ``pair_root`` calls find the results. Ids that are not usable keys are skipped here (the
    protocol refuses them when it needs them). Returns how many roots were computed.
    """
    todo: dict[tuple[bytes, bytes], tuple[nacl.signing.SigningKey, bytes, bytes]] = {}
    for key, me, peer in pairs:
        if me == peer:
            continue
        lo, hi = (me, peer) if me < peer else (peer, me)
        if (lo, hi) not in _ROOTS:
            todo.setdefault((lo, hi), (key, me, peer))
    jobs = [(key, me, peer, lo, hi) for (lo, hi), (key, me, peer) in todo.items()]

    def run(part: list[tuple[nacl.signing.SigningKey, bytes, bytes, bytes, bytes]]) -> None:
        for job in part:
            with contextlib.suppress(MalformedMessage):
                _compute_root(*job)

    workers = [
        threading.Thread(target=run, args=(jobs[i :: max(threads, 1)],), daemon=True)
        for i in range(1, max(threads, 1))
    ]
    for worker in workers:
        worker.start()
    run(jobs[:: max(threads, 1)])
    for worker in workers:
        worker.join()
    return len(jobs)


def _context(*, round: int, group: bytes, sender: bytes, recipient: bytes) -> bytes:
    """``_SEAL_TAG || enc(u64(round)) || enc(group) || enc(sender) || enc(recipient)``."""
    group, sender, recipient = bytes(group), bytes(sender), bytes(recipient)
    return b"".join(
        (
            _SEAL_TAG,
            _EIGHT,
            u64(round),
            len(group).to_bytes(4, "big"),
            group,
            len(sender).to_bytes(4, "big"),
            sender,
            len(recipient).to_bytes(4, "big"),
            recipient,
        )
    )


def seal_with(
    key: bytes, plaintext: bytes, *, round: int, group: bytes, sender: bytes, recipient: bytes
) -> bytes:
    """Encrypt and authenticate ``plaintext`` under ``key`` (a pair's share key), with its context.

    Returns ``nonce || ciphertext`` (XSalsa20-Poly1305; 40 bytes longer than context + plaintext).
    """
    context = _context(round=round, group=group, sender=sender, recipient=recipient)
    nonce = nacl.utils.random(_NONCE_BYTES)
    return nonce + nacl.bindings.crypto_secretbox(context + bytes(plaintext), nonce, key)


def open_with(
    key: bytes, sealed: bytes, *, round: int, group: bytes, sender: bytes, recipient: bytes
) -> bytes:
    """Open what ``seal_with`` sealed; ``BadSeal`` if it fails or its context differs."""
    context = _context(round=round, group=group, sender=sender, recipient=recipient)
    if not isinstance(sealed, bytes | bytearray) or len(sealed) < _NONCE_BYTES:
        raise BadSeal("sealed share is too short")
    sealed = bytes(sealed)
    try:
        opened = nacl.bindings.crypto_secretbox_open(
            sealed[_NONCE_BYTES:], sealed[:_NONCE_BYTES], key
        )
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise BadSeal("sealed share does not authenticate") from exc
    head = opened[: len(context)]
    if len(opened) < len(context) or not hmac.compare_digest(head, context):
        raise BadSeal("sealed share was made for another round, group, sender or recipient")
    return opened[len(context) :]
