"""Per-round keys of secure aggregation: X25519 pairs, signed advertisements, sealed shares.

Each member makes two fresh X25519 pairs per round (Bonawitz et al. 2017 keep them apart on
purpose): the *agreement* pair, whose shared secrets become pairwise mask seeds (through
``mpc.kdf.pair_seed``) and whose private key is Shamir-shared so that a dropped member's pairwise
masks can be removed, and the *box* pair, used only to seal shares to their recipients. If one
pair did both, revealing a dropped member's key would also open every share sent to it.

Advertisements are signed with the member's Ed25519 identity key over a domain-separated,
length-prefixed encoding of (round, group, member id, both public keys). Sealed shares use NaCl
``Box`` (X25519 + XSalsa20-Poly1305, random nonce); the plaintext starts with the context
(round, group, sender, recipient), checked on opening, so a sealed share cannot be replayed into
another round, group or pair.

Speed (the simulator runs thousands of members in one process): a member computes one Box key
per peer per round (``box_key``: ``crypto_box_beforenm`` once, then ``seal_with`` /
``open_with`` use ``crypto_box_afternm`` / ``crypto_box_open_afternm``; same wire format as
``Box``). ``agree_cached`` and ``box_key_cached`` keep each pair's result in a small
process-wide cache keyed by the two (sorted) public keys, so the other member of the pair, when
it runs in the same process, finds it instead of redoing the X25519 multiplication: both sides'
results are equal (X25519 is symmetric), callers pass their own key pair (which they generated),
and an entry is only ever written by a computation. Members drop their entries when their round
ends (``forget_pairs``), and the cache is bounded. Positive advertisement verifications are cached
the same way (keyed by id, signed bytes and signature: public data), so the 7 members of a group
that check one advertisement in one process verify it once. Nothing changes on the wire, and
every key stays per round: revealing a dropped member's agreement key says nothing about other
rounds.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing
import nacl.utils

from mpc.kdf import u64
from murmur.errors import BadSeal, BadSignature, ConfigError, MalformedMessage

_V = TypeVar("_V")

__all__ = [
    "KEY_BYTES",
    "RoundKeys",
    "advertisement_message",
    "agree",
    "agree_cached",
    "box_key",
    "box_key_cached",
    "forget_pairs",
    "new_round_keys",
    "open_from",
    "open_with",
    "seal_to",
    "seal_with",
    "sign_advertisement",
    "verify_advertisement",
]

KEY_BYTES = 32
"""Length of X25519 and Ed25519 public keys, private keys and seeds."""

_ADVERTISE_TAG = b"murmur.secagg.advertise.v1"
_SEAL_TAG = b"murmur.secagg.share.v1"
_NONCE_BYTES = nacl.bindings.crypto_box_NONCEBYTES

CACHE_ENTRIES = 1 << 15
"""Bound of each process-wide cache (pair secrets, verified advertisements); oldest go first."""

_Key = tuple[bytes, bytes, bytes]
_PAIRS: dict[_Key, bytes] = {}  # (kind, lower public key, higher public key) -> pair secret
_VERIFIED: dict[_Key, bool] = {}  # (member id, signed bytes, signature) -> True
_AGREE, _BOX = b"agree", b"box"


def _remember(cache: dict[_Key, _V], key: _Key, value: _V) -> None:
    if len(cache) >= CACHE_ENTRIES:
        del cache[next(iter(cache))]  # dicts keep insertion order: the oldest entry
    cache[key] = value


@dataclass(frozen=True, slots=True)
class RoundKeys:
    """A member's fresh X25519 key pairs for one round (private halves are not in the repr)."""

    agreement_private: bytes = field(repr=False)
    agreement_public: bytes
    box_private: bytes = field(repr=False)
    box_public: bytes


def new_round_keys() -> RoundKeys:
    """Two fresh X25519 key pairs from the OS CSPRNG (libsodium)."""
    agreement = nacl.public.PrivateKey.generate()
    box = nacl.public.PrivateKey.generate()
    return RoundKeys(
        agreement_private=bytes(agreement),
        agreement_public=bytes(agreement.public_key),
        box_private=bytes(box),
        box_public=bytes(box.public_key),
    )


def _enc(part: bytes) -> bytes:
    return len(part).to_bytes(4, "big") + part


def _public(name: str, key: bytes) -> bytes:
    """Check a public key that came from a peer: a refusal, not a config error."""
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        raise MalformedMessage(f"{name} must be {KEY_BYTES} bytes")
    return bytes(key)


def _private(name: str, key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        raise ConfigError(f"{name} must be {KEY_BYTES} bytes")
    return bytes(key)


def advertisement_message(
    *, round: int, group: bytes, member_id: bytes, agreement_public: bytes, box_public: bytes
) -> bytes:
    """The exact bytes an advertisement signature covers."""
    return _ADVERTISE_TAG + b"".join(
        _enc(p)
        for p in (
            u64(round),
            bytes(group),
            _public("member_id", member_id),
            _public("agreement_public", agreement_public),
            _public("box_public", box_public),
        )
    )


def sign_advertisement(
    signing_key: bytes | nacl.signing.SigningKey,
    *,
    round: int,
    group: bytes,
    agreement_public: bytes,
    box_public: bytes,
) -> bytes:
    """A 64-byte Ed25519 signature by the identity key over this round's public keys.

    ``signing_key`` is the raw 32-byte Ed25519 seed or a ``nacl.signing.SigningKey``; the member
    id signed is its verify key (the member's 32-byte id).
    """
    if not isinstance(signing_key, nacl.signing.SigningKey):
        signing_key = nacl.signing.SigningKey(_private("signing seed", signing_key))
    message = advertisement_message(
        round=round,
        group=group,
        member_id=bytes(signing_key.verify_key),
        agreement_public=agreement_public,
        box_public=box_public,
    )
    return bytes(signing_key.sign(message).signature)


def verify_advertisement(
    member_id: bytes,
    *,
    round: int,
    group: bytes,
    agreement_public: bytes,
    box_public: bytes,
    signature: bytes,
) -> None:
    """Check an advertisement signature by ``member_id``; raise ``BadSignature`` if it fails."""
    message = advertisement_message(
        round=round,
        group=group,
        member_id=member_id,
        agreement_public=agreement_public,
        box_public=box_public,
    )
    if not isinstance(signature, bytes | bytearray) or len(signature) != 64:
        raise BadSignature("an advertisement signature must be 64 bytes")
    key = (bytes(member_id), message, bytes(signature))
    if key in _VERIFIED:
        return
    try:
        nacl.bindings.crypto_sign_open(key[2] + message, key[0])
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError) as exc:
        raise BadSignature("advertisement signature does not verify") from exc
    _remember(_VERIFIED, key, True)


def agree(private: bytes, peer_public: bytes) -> bytes:
    """The raw 32-byte X25519 shared secret; feed it to ``mpc.kdf.pair_seed``, never use it as is.

    Raises ``MalformedMessage`` for a low-order peer key (the shared secret would be zero).
    """
    try:
        return bytes(
            nacl.bindings.crypto_scalarmult(
                _private("private key", private), _public("peer public key", peer_public)
            )
        )
    except nacl.exceptions.CryptoError as exc:
        raise MalformedMessage("peer public key is a low-order point") from exc


def box_key(private: bytes, peer_public: bytes) -> bytes:
    """The precomputed NaCl Box key of a pair (``crypto_box_beforenm``), for ``seal_with``.

    Raises ``MalformedMessage`` for a low-order peer key.
    """
    try:
        return bytes(
            nacl.bindings.crypto_box_beforenm(
                _public("peer box public key", peer_public), _private("box private key", private)
            )
        )
    except nacl.exceptions.CryptoError as exc:
        raise MalformedMessage("peer box public key is a low-order point") from exc


def _pair_key(kind: bytes, public: bytes, peer_public: bytes) -> _Key:
    lo, hi = (public, peer_public) if public <= peer_public else (peer_public, public)
    return (kind, lo, hi)


def agree_cached(private: bytes, public: bytes, peer_public: bytes) -> bytes:
    """``agree(private, peer_public)``, shared through the process-wide pair cache.

    ``public`` must be the caller's own public key of ``private`` (from ``new_round_keys``): the
    cache is keyed by the two public keys, and the other member of the pair finds the same value.
    """
    key = _pair_key(_AGREE, bytes(public), _public("peer public key", peer_public))
    secret = _PAIRS.get(key)
    if secret is None:
        secret = agree(private, peer_public)
        _remember(_PAIRS, key, secret)
    return secret


def box_key_cached(private: bytes, public: bytes, peer_public: bytes) -> bytes:
    """``box_key(private, peer_public)``, shared through the process-wide pair cache.

    ``public`` must be the caller's own box public key of ``private`` (see ``agree_cached``).
    """
    key = _pair_key(_BOX, bytes(public), _public("peer box public key", peer_public))
    secret = _PAIRS.get(key)
    if secret is None:
        secret = box_key(private, peer_public)
        _remember(_PAIRS, key, secret)
    return secret


def forget_pairs(keys: RoundKeys, peers: Iterable[tuple[bytes, bytes]]) -> None:
    """Drop the cached pair secrets of ``keys`` with each ``(agreement, box)`` public key pair."""
    for agreement_public, box_public in peers:
        _PAIRS.pop(_pair_key(_AGREE, keys.agreement_public, bytes(agreement_public)), None)
        _PAIRS.pop(_pair_key(_BOX, keys.box_public, bytes(box_public)), None)


def _context(*, round: int, group: bytes, sender: bytes, recipient: bytes) -> bytes:
    return _SEAL_TAG + b"".join(
        _enc(p) for p in (u64(round), bytes(group), bytes(sender), bytes(recipient))
    )


def seal_with(
    key: bytes, plaintext: bytes, *, round: int, group: bytes, sender: bytes, recipient: bytes
) -> bytes:
    """``seal_to`` with a precomputed pair key from ``box_key`` (the same bytes on the wire)."""
    context = _context(round=round, group=group, sender=sender, recipient=recipient)
    nonce = nacl.utils.random(_NONCE_BYTES)
    return nonce + nacl.bindings.crypto_box_afternm(context + bytes(plaintext), nonce, key)


def open_with(
    key: bytes, sealed: bytes, *, round: int, group: bytes, sender: bytes, recipient: bytes
) -> bytes:
    """``open_from`` with a precomputed pair key from ``box_key``; ``BadSeal`` if it fails."""
    context = _context(round=round, group=group, sender=sender, recipient=recipient)
    if not isinstance(sealed, bytes | bytearray) or len(sealed) < _NONCE_BYTES:
        raise BadSeal("sealed share is too short")
    sealed = bytes(sealed)
    try:
        opened = nacl.bindings.crypto_box_open_afternm(
            sealed[_NONCE_BYTES:], sealed[:_NONCE_BYTES], key
        )
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise BadSeal("sealed share does not authenticate") from exc
    head = opened[: len(context)]
    if len(opened) < len(context) or not hmac.compare_digest(head, context):
        raise BadSeal("sealed share was made for another round, group, sender or recipient")
    return opened[len(context) :]


def seal_to(
    box_private: bytes,
    recipient_box_public: bytes,
    plaintext: bytes,
    *,
    round: int,
    group: bytes,
    sender: bytes,
    recipient: bytes,
) -> bytes:
    """Encrypt and authenticate ``plaintext`` from ``sender`` to ``recipient`` for one round.

    Returns ``nonce || ciphertext`` (NaCl Box; 40 bytes longer than plaintext plus context).
    """
    return seal_with(
        box_key(box_private, recipient_box_public),
        plaintext,
        round=round,
        group=group,
        sender=sender,
        recipient=recipient,
    )


def open_from(
    box_private: bytes,
    sender_box_public: bytes,
    sealed: bytes,
    *,
    round: int,
    group: bytes,
    sender: bytes,
    recipient: bytes,
) -> bytes:
    """Open a sealed share; raise ``BadSeal`` if it fails to authenticate or the context differs."""
    return open_with(
        box_key(box_private, sender_box_public),
        sealed,
        round=round,
        group=group,
        sender=sender,
        recipient=recipient,
    )
