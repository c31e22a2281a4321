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
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from mpc.kdf import u64
from murmur.errors import BadSeal, BadSignature, ConfigError, MalformedMessage

__all__ = [
    "KEY_BYTES",
    "RoundKeys",
    "advertisement_message",
    "agree",
    "new_round_keys",
    "open_from",
    "seal_to",
    "sign_advertisement",
    "verify_advertisement",
]

KEY_BYTES = 32
"""Length of X25519 and Ed25519 public keys, private keys and seeds."""

_ADVERTISE_TAG = b"murmur.secagg.advertise.v1"
_SEAL_TAG = b"murmur.secagg.share.v1"


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
    try:
        nacl.signing.VerifyKey(bytes(member_id)).verify(message, bytes(signature))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError) as exc:
        raise BadSignature("advertisement signature does not verify") from exc


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


def _context(*, round: int, group: bytes, sender: bytes, recipient: bytes) -> bytes:
    return _SEAL_TAG + b"".join(
        _enc(p) for p in (u64(round), bytes(group), bytes(sender), bytes(recipient))
    )


def _box(private: bytes, peer_public: bytes) -> nacl.public.Box:
    try:
        return nacl.public.Box(
            nacl.public.PrivateKey(_private("box private key", private)),
            nacl.public.PublicKey(_public("peer box public key", peer_public)),
        )
    except nacl.exceptions.CryptoError as exc:
        raise MalformedMessage("peer box public key is a low-order point") from exc


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
    context = _context(round=round, group=group, sender=sender, recipient=recipient)
    return bytes(_box(box_private, recipient_box_public).encrypt(context + bytes(plaintext)))


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
    context = _context(round=round, group=group, sender=sender, recipient=recipient)
    box = _box(box_private, sender_box_public)
    try:
        opened = bytes(box.decrypt(bytes(sealed)))
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise BadSeal("sealed share does not authenticate") from exc
    head = opened[: len(context)]
    if len(opened) < len(context) or not hmac.compare_digest(head, context):
        raise BadSeal("sealed share was made for another round, group, sender or recipient")
    return opened[len(context) :]
