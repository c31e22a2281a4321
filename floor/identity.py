"""Peer identity: an Ed25519 signing key, its X25519 counterpart, and the printable peer id.

A peer is its Ed25519 public key (``PeerId``). The same key pair, converted to Curve25519,
gives X25519 key agreement: two identities share a pairwise NaCl ``Box`` key without any
message exchange. These keys are static, so they give **no forward secrecy**: whoever later
steals a peer's key file can decrypt every message sealed to or by that peer that they
recorded. Ephemeral per-session or per-round keys are the planned fix.

The key file format and its checks live in ``floor.keyfile``.
"""

from __future__ import annotations

import base64
import hmac
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Final

import nacl.bindings
import nacl.exceptions
import nacl.signing

from floor import keyfile
from floor.errors import BadSignature, ConfigError, MalformedMessage

__all__ = ["PEER_ID_TEXT_LENGTH", "Identity", "PeerId", "verify_signature"]

#: Length of the printable form of a peer id (unpadded lowercase base32 of 32 bytes).
PEER_ID_TEXT_LENGTH: Final = 52
_KEY_BYTES: Final = 32
_SIGNATURE_BYTES: Final = 64
# Pair keys cost one X25519 scalar multiplication (~50 us); keep the most recent ones.
_PAIR_CACHE_SIZE: Final = 4096


class PeerId:
    """A peer's identity: its 32-byte Ed25519 public key. Immutable, compared in constant time."""

    __slots__ = ("_hash", "raw")
    raw: bytes
    _hash: int

    def __init__(self, raw: bytes) -> None:
        if type(raw) is not bytes or len(raw) != _KEY_BYTES:
            raise MalformedMessage(f"a peer id is exactly {_KEY_BYTES} bytes")
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "_hash", hash(raw))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PeerId is immutable")

    def __str__(self) -> str:
        return base64.b32encode(self.raw).decode("ascii").rstrip("=").lower()

    def __repr__(self) -> str:
        return f"PeerId({self!s})"

    @classmethod
    def parse(cls, text: str) -> PeerId:
        """Parse the printable form; the exact inverse of ``str()``. Raises ``ConfigError``."""
        if (
            not isinstance(text, str)
            or len(text) != PEER_ID_TEXT_LENGTH
            or not text.isascii()
            or text != text.lower()
        ):
            raise ConfigError(
                f"not a peer id: expected {PEER_ID_TEXT_LENGTH} lowercase base32 characters"
            )
        try:
            raw = base64.b32decode(text.upper() + "====")
        except ValueError as exc:
            raise ConfigError("not a peer id: invalid base32") from exc
        peer = cls(raw)
        # Base32 has 4 spare bits at the end; only the canonical spelling is accepted.
        if str(peer) != text:
            raise ConfigError("not a peer id: non-canonical base32")
        return peer

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PeerId):
            return NotImplemented
        return hmac.compare_digest(self.raw, other.raw)

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[PeerId], tuple[bytes]]:
        return (PeerId, (self.raw,))

    def short(self) -> str:
        """The first 8 characters of the printable form, for logs."""
        return str(self)[:8]

    def x25519_public(self) -> bytes:
        """The Curve25519 public key for key agreement. ``MalformedMessage`` if not a valid key."""
        try:
            result: bytes = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(self.raw)
        except (nacl.exceptions.CryptoError, RuntimeError, ValueError, TypeError) as exc:
            raise MalformedMessage(f"peer id {self.short()} is not a valid public key") from exc
        return result


def verify_signature(peer: PeerId, data: bytes, signature: bytes) -> None:
    """Check an Ed25519 ``signature`` by ``peer`` over ``data``; raises ``BadSignature``."""
    if type(signature) is not bytes or len(signature) != _SIGNATURE_BYTES:
        raise BadSignature("signature has the wrong length")
    try:
        nacl.signing.VerifyKey(peer.raw).verify(data, signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError, RuntimeError) as exc:
        raise BadSignature(f"signature by {peer.short()} does not verify") from exc


class Identity:
    """A peer's secret key pair. Its ``repr`` never shows key bytes; nothing here logs them."""

    __slots__ = ("_curve_secret", "_lock", "_pair_keys", "_signing_key", "peer_id")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._signing_key = signing_key
        self.peer_id = PeerId(bytes(signing_key.verify_key))
        self._curve_secret: bytes = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(
            bytes(signing_key) + self.peer_id.raw
        )
        self._pair_keys: OrderedDict[PeerId, bytes] = OrderedDict()
        self._lock = threading.Lock()  # decoding may run in executor threads

    def __repr__(self) -> str:
        return f"Identity({self.peer_id.short()})"

    @classmethod
    def generate(cls) -> Identity:
        """A fresh identity from the operating system's CSPRNG."""
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity with this 32-byte seed (deterministic; for tests and the simulator)."""
        if type(seed) is not bytes or len(seed) != _KEY_BYTES:
            raise ConfigError(f"an identity seed is exactly {_KEY_BYTES} bytes")
        return cls(nacl.signing.SigningKey(seed))

    @classmethod
    def load(cls, data_dir: Path) -> Identity:
        """Load ``<data_dir>/identity.key``; ``KeyFileError`` if missing, unsafe or corrupt."""
        return cls.from_seed(keyfile.read_seed(Path(data_dir)))

    @classmethod
    def load_or_create(cls, data_dir: Path) -> tuple[Identity, bool]:
        """Load the key in ``data_dir``, creating it if absent. Returns ``(identity, created)``.

        An existing key file is never replaced: if it is unsafe or corrupt, ``KeyFileError``.
        """
        identity = cls.generate()
        created = keyfile.create_seed(Path(data_dir), bytes(identity._signing_key))
        if created:
            return identity, True
        return cls.load(data_dir), False

    def seed(self) -> bytes:
        """The 32-byte secret seed. Secret: for writing the key file only; never log it."""
        return bytes(self._signing_key)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._signing_key.sign(data).signature

    def x25519_private(self) -> bytes:
        """The Curve25519 secret key (secret; p2p pair keys are derived from it)."""
        return self._curve_secret

    def pair_key(self, other: PeerId) -> bytes:
        """The 32-byte precomputed NaCl Box key shared with ``other`` (cached; symmetric).

        ``MalformedMessage`` if ``other`` is not a usable public key (invalid or low-order point).
        """
        with self._lock:
            key = self._pair_keys.get(other)
            if key is not None:
                self._pair_keys.move_to_end(other)
                return key
        try:
            key = nacl.bindings.crypto_box_beforenm(other.x25519_public(), self._curve_secret)
        except (nacl.exceptions.CryptoError, RuntimeError, ValueError) as exc:
            raise MalformedMessage(f"peer id {other.short()} gives no usable pair key") from exc
        with self._lock:
            self._pair_keys[other] = key
            if len(self._pair_keys) > _PAIR_CACHE_SIZE:
                self._pair_keys.popitem(last=False)
        return key
