"""Authenticated envelopes: how a message body travels between two peers, and every check on it.

Layout (integers little-endian)::

    prefix (12) | header (H) | door tag (16) | auth tag (T) | body (B)
    prefix = b"MRM" | version u8 | auth u8 | 0 u8 | H u16 | B u32
    header = msgpack [type, sender (32), recipient (32) | nil, timestamp, nonce (24), pad]

``timestamp`` is wall-clock seconds from the injected clock; ``nonce`` is 24 random bytes;
``pad`` aligns the body to 64 bytes when it carries tensors (so decoded tensors are aligned).

Authentication, by ``Auth``:

* ``SIGNED``: T = 64, an Ed25519 signature over ``"murmur-sig-v1" | prefix | header |
  BLAKE2b-256(body)``. Always a digest of the body (well under 1 us for a small body, and
  4 MB signs in ~3 ms instead of ~11 ms). For senders the recipient may not know yet.
* ``SEALED``: T = 16, NaCl ``SecretBox`` (XSalsa20-Poly1305) of the body under the link key,
  whose 24-byte nonce is ``BLAKE2b-192(prefix | header)``: any change to the prefix or header
  changes the nonce and the seal fails, so the header is authenticated as associated data.
  Authenticated encryption: for secrets (shares) and small messages. The SecretBox output
  (MAC, then ciphertext) is exactly ``auth tag | body``, so sealing and opening run in place
  through libsodium (PyNaCl's ``nacl._sodium``): no copies beyond the one into the envelope,
  and opened tensors alias the fresh plaintext buffer.
* ``MAC``: T = 16, Poly1305 over ``prefix | header | body`` with a one-time key
  ``BLAKE2b-256(key=link key, person="murmur-mac-v1", data=nonce)``. Integrity without secrecy
  at near memcpy speed, for large bodies (masked vectors). The random nonce makes every
  one-time key distinct.

The link key of two peers is ``BLAKE2b-256(key=pair_key, data=psk_mix, person="murmur-link-v1")``
where ``pair_key`` is the X25519 NaCl Box key of the two identities (``Identity.pair_key``)
and ``psk_mix`` is derived from the network key (empty without one). It is symmetric: both
directions use it, and the sender and recipient fields in the authenticated header stop a
message from being reflected back.

Network key (optional pre-shared key, like libp2p's PSK). The door tag is
``BLAKE2b-128(key=door_key, person="murmur-door-v1", data=prefix | header | auth tag)``
with ``door_key`` derived from the network key, or a fixed public constant on an open network.
It is checked right after the cheap framing checks, before any msgpack decoding, public-key
operation or pass over the body; a peer without the key (or with another key, or on an open
network talking to a private one) is refused with ``Unauthorized``. The door tag commits to
the body only through the auth tag, which the full check verifies later. The network key is
also mixed into the link keys, so seals and MACs fail without it even if the door were skipped.
On an open network the door key is public: the door then only filters noise, and the
signature, seal or MAC is the real check.

A message class with ``SECRET = True`` (e.g. revealed Shamir shares) may only travel sealed:
``encode`` refuses any other mode (``ConfigError``) and ``decode`` refuses it unsealed
(``MalformedMessage``).

Static identity keys give no forward secrecy: a stolen key file decrypts every recorded
message sealed to or by that peer. Ephemeral session keys are planned.

The receiver's checks, cheapest first: size cap; framing (magic, version, auth mode, lengths;
the version comes before the door because it decides how the rest is read); door (network
key); header decode; known type; the type's size cap (these need only the envelope's first
bytes: :meth:`EnvelopeCodec.check_head`); recipient; timestamp window (at most
``max_future_s`` ahead); replay (nonce not seen from this sender; see ``floor.replay``);
signature/seal/MAC; body (the type's msgpack cap, then the schema). Only ``ProtocolError``
subclasses escape ``decode``; the nonce is remembered only once authentication succeeded.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305
from nacl._sodium import ffi as _ffi  # in-place SecretBox: PyNaCl's public API copies twice
from nacl._sodium import lib as _lib

from floor.codec import TENSOR_ALIGN, decode_body_as, encode_body_parts, envelope_cap
from floor.errors import (
    BadSeal,
    ConfigError,
    MalformedMessage,
    MessageTooLarge,
    Unauthorized,
    UnknownMessageType,
    UnsupportedVersion,
    WrongRecipient,
)
from floor.identity import Identity, PeerId, verify_signature
from floor.messages import FLOOR_MESSAGES, Message, build_registry
from floor.replay import ReplayCache

__all__ = ["VERSION", "Auth", "EnvelopeCodec", "Received"]

#: The envelope version this code speaks.
VERSION: Final = 1
_MAGIC: Final = b"MRM"
_PREFIX = struct.Struct("<3sBBBHI")
_DOOR_BYTES: Final = 16
_NONCE_BYTES: Final = 24
_MAX_HEADER: Final = 512
_SIG_DOMAIN: Final = b"murmur-sig-v1\x00"
_OPEN_NETWORK: Final = b"murmur-open-network-v1"
_LINK_CACHE_SIZE: Final = 4096


class Auth(enum.IntEnum):
    """How an envelope is authenticated. The numbers are part of the wire format."""

    SIGNED = 1  # Ed25519 by the sender; the recipient need not know the sender yet
    SEALED = 2  # SecretBox under the link key: authenticated encryption
    MAC = 3  # Poly1305 under a one-time key from the link key: integrity only, for large bodies


_TAG_BYTES: Final = {Auth.SIGNED: 64, Auth.SEALED: 16, Auth.MAC: 16}


@dataclass(frozen=True, slots=True)
class Received:
    """A decoded, authenticated message and what the envelope said about it."""

    sender: PeerId
    message: Message
    auth: Auth
    timestamp: float
    size: int  # bytes on the wire


def _blake(data: bytes, *, size: int, key: bytes = b"", person: bytes = b"") -> bytes:
    return hashlib.blake2b(data, digest_size=size, key=key, person=person).digest()


def _seal_in_place(out: bytearray, start: int, length: int, nonce: bytes, key: bytes) -> None:
    """Encrypt ``out[start + 16 : start + 16 + length]`` in place; the MAC goes before it."""
    buf = _ffi.from_buffer("unsigned char[]", out)
    if _lib.crypto_secretbox_easy(buf + start, buf + start + 16, length, nonce, key) != 0:
        raise RuntimeError("crypto_secretbox_easy failed")


def _open(boxed: memoryview, nonce: bytes, key: bytes) -> bytearray:
    """Open ``MAC | ciphertext`` into a fresh writable buffer; ``BadSeal`` if it fails."""
    plain = bytearray(boxed.nbytes - 16)
    out = _ffi.from_buffer("unsigned char[]", plain)
    src = _ffi.from_buffer("unsigned char[]", boxed)
    if _lib.crypto_secretbox_open_easy(out, src, boxed.nbytes, nonce, key) != 0:
        raise BadSeal("seal does not verify")
    return plain


_FLOOR_TYPES = build_registry(FLOOR_MESSAGES)


def _required(recipient: PeerId | None) -> PeerId:
    if recipient is None:
        raise ConfigError("a sealed or MACed envelope needs a recipient")
    return recipient


class EnvelopeCodec:
    """Encodes messages into authenticated envelopes from one identity, and checks incoming ones.

    ``message_types`` is the world's closed union (``floor.messages.build_registry``): the
    daemon passes ``p2p.messages.MESSAGE_TYPES``, a training peer ``gossip.messages.MESSAGE_TYPES``;
    the default knows only the floor's own ``Refusal``.
    ``decode`` given a writable buffer (``bytearray``) returns tensors that alias it (no copy):
    hand the buffer over and do not reuse it. Given ``bytes``, tensors are copied once.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        network_key: bytes | None = None,
        max_message_size: int = 64 * 2**20,
        window_s: float = 120.0,
        clock: Callable[[], float] = time.time,
        replay_capacity: int = 1_000_000,
        replay_per_sender: int | None = None,
        max_future_s: float = 10.0,
        message_types: Mapping[str, type] | None = None,
    ) -> None:
        if network_key is not None and not (16 <= len(network_key) <= 64):
            raise ConfigError("network key must be 16 to 64 bytes (32 random bytes advised)")
        if max_message_size < 256 or max_message_size >= 2**32:
            raise ConfigError("max_message_size must be between 256 bytes and 4 GiB")
        self.identity = identity
        self.message_types = _FLOOR_TYPES if message_types is None else message_types
        self.max_message_size = max_message_size
        self.window_s = float(window_s)
        self._clock = clock
        self._replay = ReplayCache(
            self.window_s, replay_capacity, per_sender=replay_per_sender, max_future_s=max_future_s
        )
        secret = _OPEN_NETWORK if network_key is None else bytes(network_key)
        self._door_key = _blake(secret, size=32, person=b"murmur-psk-door")
        self._link_keys: dict[PeerId, bytes] = {}
        self._lock = threading.Lock()  # decode may run in executor threads
        self._psk_mix = (
            b"" if network_key is None else _blake(secret, size=32, person=b"murmur-psk-mix")
        )

    @property
    def peer_id(self) -> PeerId:
        """This codec's own peer id."""
        return self.identity.peer_id

    def _link_key(self, other: PeerId) -> bytes:
        key = self._link_keys.get(other)
        if key is None:
            pair = self.identity.pair_key(other)
            key = _blake(self._psk_mix, size=32, key=pair, person=b"murmur-link-v1")
            with self._lock:
                if len(self._link_keys) >= _LINK_CACHE_SIZE:
                    self._link_keys.pop(next(iter(self._link_keys)))
                self._link_keys[other] = key
        return key

    def _door(self, head: bytes | memoryview, auth_tag: bytes | memoryview) -> bytes:
        """The door tag over ``prefix | header`` (``head``) and the auth tag."""
        door = hashlib.blake2b(
            digest_size=_DOOR_BYTES, key=self._door_key, person=b"murmur-door-v1"
        )
        door.update(head)
        door.update(auth_tag)
        return door.digest()

    # ------------------------------------------------------------------ encode

    def encode(
        self, message: Message, *, recipient: PeerId | None, auth: Auth = Auth.SEALED
    ) -> bytes:
        """Encode, authenticate and frame ``message`` for ``recipient``.

        ``recipient`` may be None only with ``Auth.SIGNED``. Raises ``UnknownMessageType`` for a
        class outside the union, ``MalformedMessage`` for wrong field types, ``MessageTooLarge``
        above the size cap.
        """
        auth = Auth(auth)
        cls = type(message)
        tag_name = getattr(cls, "TYPE", None)
        if not isinstance(tag_name, str) or self.message_types.get(tag_name) is not cls:
            raise UnknownMessageType(f"{cls.__name__} is not in the message union")
        if recipient is None and auth != Auth.SIGNED:
            raise ConfigError("a sealed or MACed envelope needs a recipient")
        if getattr(cls, "SECRET", False) and auth != Auth.SEALED:
            raise ConfigError(f"{cls.__name__} carries secrets: it may only travel sealed")
        parts, body_len = encode_body_parts(message)
        tag_len = _TAG_BYTES[auth]
        nonce = os.urandom(_NONCE_BYTES)
        fields: list[Any] = [
            tag_name,
            self.identity.peer_id.raw,
            None if recipient is None else recipient.raw,
            float(self._clock()),
            nonce,
            b"",
        ]
        header: bytes = msgpack.packb(fields, use_bin_type=True)
        if len(parts) > 2:  # the body carries tensors: align it
            fields[5] = bytes(
                (-(_PREFIX.size + len(header) + tag_len + _DOOR_BYTES)) % TENSOR_ALIGN
            )
            header = msgpack.packb(fields, use_bin_type=True)
        total = _PREFIX.size + len(header) + tag_len + _DOOR_BYTES + body_len
        if total > self.max_message_size:
            raise MessageTooLarge(
                f"{tag_name} envelope is {total} bytes, cap {self.max_message_size}"
            )
        if len(header) > _MAX_HEADER:
            raise MalformedMessage("envelope header too long (type tag?)")
        prefix = _PREFIX.pack(_MAGIC, VERSION, auth, 0, len(header), body_len)
        if auth == Auth.SEALED:
            return self._encode_sealed(prefix + header, parts, total, _required(recipient))
        if auth == Auth.SIGNED:
            digest = hashlib.blake2b(digest_size=32)
            for part in parts:
                digest.update(part)
            auth_tag = self.identity.sign(_SIG_DOMAIN + prefix + header + digest.digest())
        else:
            mac = Poly1305(self._mac_key(_required(recipient), nonce))
            mac.update(prefix)
            mac.update(header)
            for part in parts:
                mac.update(part)
            auth_tag = mac.finalize()
        head = prefix + header
        return b"".join([head, self._door(head, auth_tag), auth_tag, *parts])

    def _encode_sealed(
        self, head: bytes, parts: list[bytes | memoryview], total: int, recipient: PeerId
    ) -> bytes:
        out = bytearray(total)
        out[: len(head)] = head
        tag_start = len(head) + _DOOR_BYTES
        pos = tag_start + 16
        for part in parts:
            size = memoryview(part).nbytes
            out[pos : pos + size] = part
            pos += size
        body_len = pos - tag_start - 16
        _seal_in_place(out, tag_start, body_len, _blake(head, size=24), self._link_key(recipient))
        out[len(head) : tag_start] = self._door(head, memoryview(out)[tag_start : tag_start + 16])
        return bytes(out)

    def _mac_key(self, other: PeerId, nonce: bytes) -> bytes:
        return _blake(nonce, size=32, key=self._link_key(other), person=b"murmur-mac-v1")

    # ------------------------------------------------------------------ decode

    def decode(self, data: bytes | bytearray | memoryview) -> Received:
        """Check and decode one envelope. Raises only ``ProtocolError`` subclasses."""
        try:
            view = memoryview(data).cast("B")
        except (TypeError, ValueError) as exc:
            raise MalformedMessage("envelope is not a contiguous byte buffer") from exc
        size = view.nbytes
        auth, head_end, tag_end, header = self._head(view, size)
        cls, sender, recipient, timestamp, nonce = header
        if getattr(cls, "SECRET", False) and auth != Auth.SEALED:
            raise MalformedMessage(f"{cls.__name__} carries secrets and must arrive sealed")
        if recipient is None:
            if auth != Auth.SIGNED:
                raise MalformedMessage("only a signed envelope may omit the recipient")
        elif recipient != self.identity.peer_id:
            raise WrongRecipient(f"addressed to {recipient.short()}")
        now = float(self._clock())
        self._replay.check(sender.raw, nonce, timestamp, now)
        body = self._authenticate(view, auth, sender, nonce, head_end, tag_end)
        self._replay.add(sender.raw, nonce, timestamp, now)
        message = decode_body_as(cls, body)
        return Received(sender, message, auth, timestamp, size)

    def head_size(self, first: bytes | bytearray | memoryview) -> int | None:
        """How many leading bytes :meth:`check_head` needs, from the first 12 (None: fewer)."""
        if len(first) < _PREFIX.size:
            return None
        magic, _, auth_byte, _, header_len, _ = _PREFIX.unpack_from(first, 0)
        tag = _TAG_BYTES.get(auth_byte, 0) if magic == _MAGIC else 0
        return int(_PREFIX.size + min(header_len, _MAX_HEADER) + _DOOR_BYTES + tag)

    def check_head(self, head: bytes | bytearray | memoryview, total: int) -> None:
        """Refuse an envelope of ``total`` bytes from its first bytes, before the rest arrives.

        ``head`` holds at least :meth:`head_size` bytes. Runs the framing, door, header, type
        and type-size checks (the cheap ones of :meth:`decode`); a sender declaring a 63 MiB
        body for a message type capped at 129 KiB is refused after its first packet.
        """
        self._head(memoryview(head).cast("B"), total)

    def route(self, data: bytes | bytearray | memoryview) -> tuple[Auth, PeerId | None]:
        """What a relay may learn of an envelope it forwards: its auth mode and recipient.

        Runs only the checks that need no key of the two ends (size cap, framing, network-key
        door, header, type and its size cap); the body is neither read nor opened.
        """
        try:
            view = memoryview(data).cast("B")
        except (TypeError, ValueError) as exc:
            raise MalformedMessage("envelope is not a contiguous byte buffer") from exc
        auth, _, _, header = self._head(view, view.nbytes)
        return auth, header[2]

    def _head(
        self, view: memoryview, total: int
    ) -> tuple[Auth, int, int, tuple[type, PeerId, PeerId | None, float, bytes]]:
        """The checks before the body: size cap, framing, door, header, the type's size cap."""
        if total > self.max_message_size:
            raise MessageTooLarge(f"envelope is {total} bytes, cap {self.max_message_size}")
        auth, header_len, _ = self._framing(view, total)
        head_end = _PREFIX.size + header_len
        door_end = head_end + _DOOR_BYTES
        tag_end = door_end + _TAG_BYTES[auth]
        if view.nbytes < tag_end:
            raise MalformedMessage("envelope is truncated")
        door = self._door(view[:head_end], view[door_end:tag_end])
        if not hmac.compare_digest(door, view[head_end:door_end]):
            raise Unauthorized("wrong or missing network key")
        header = self._header(view[_PREFIX.size : head_end])
        cls = header[0]
        type_cap = envelope_cap(cls)
        if type_cap is not None and total > type_cap:
            raise MessageTooLarge(f"{cls.__name__} envelope is {total} bytes, its cap {type_cap}")
        return auth, head_end, tag_end, header

    def _framing(self, view: memoryview, total: int) -> tuple[Auth, int, int]:
        if view.nbytes < _PREFIX.size:
            raise MalformedMessage("envelope is truncated")
        magic, version, auth_byte, flags, header_len, body_len = _PREFIX.unpack_from(view, 0)
        if magic != _MAGIC:
            raise MalformedMessage("not a Murmur envelope")
        if version != VERSION:
            raise UnsupportedVersion(f"envelope version {version}, this peer speaks {VERSION}")
        if auth_byte not in _TAG_BYTES or flags != 0:
            raise MalformedMessage("unknown authentication mode or flags")
        auth = Auth(auth_byte)
        if header_len > _MAX_HEADER:
            raise MalformedMessage("envelope header too long")
        expected = _PREFIX.size + header_len + _TAG_BYTES[auth] + _DOOR_BYTES + body_len
        if expected != total:
            what = "truncated" if expected > total else "followed by extra bytes"
            raise MalformedMessage(f"envelope is {what}")
        return auth, header_len, body_len

    def _header(self, raw: memoryview) -> tuple[type, PeerId, PeerId | None, float, bytes]:
        try:
            fields = msgpack.unpackb(raw, raw=False, use_list=True)
        except Exception as exc:  # msgpack raises many kinds for hostile input
            raise MalformedMessage("envelope header does not decode") from exc
        if type(fields) is not list or len(fields) != 6:
            raise MalformedMessage("envelope header has the wrong shape")
        tag, sender, recipient, timestamp, nonce, pad = fields
        if (
            type(tag) is not str
            or type(sender) is not bytes
            or len(sender) != 32
            or not (recipient is None or (type(recipient) is bytes and len(recipient) == 32))
            or type(timestamp) is not float
            or not math.isfinite(timestamp)
            or type(nonce) is not bytes
            or len(nonce) != _NONCE_BYTES
            or type(pad) is not bytes
        ):
            raise MalformedMessage("envelope header has wrong field types")
        cls = self.message_types.get(tag)
        if cls is None:
            raise UnknownMessageType(f"unknown message type {tag[:64]!r}")
        return (
            cls,
            PeerId(sender),
            None if recipient is None else PeerId(recipient),
            timestamp,
            nonce,
        )

    def _authenticate(
        self,
        view: memoryview,
        auth: Auth,
        sender: PeerId,
        nonce: bytes,
        head_end: int,
        tag_end: int,
    ) -> memoryview:
        """Verify the auth tag; return the (plaintext) body."""
        tag_start = tag_end - _TAG_BYTES[auth]
        auth_tag = bytes(view[tag_start:tag_end])
        body = view[tag_end:]
        if auth == Auth.SIGNED:
            signed = (
                _SIG_DOMAIN
                + bytes(view[:head_end])
                + hashlib.blake2b(body, digest_size=32).digest()
            )
            verify_signature(sender, signed, auth_tag)
            return body
        try:
            link = self._link_key(sender)
        except MalformedMessage as exc:
            raise BadSeal("sender id gives no usable key") from exc
        if auth == Auth.MAC:
            mac = Poly1305(_blake(nonce, size=32, key=link, person=b"murmur-mac-v1"))
            mac.update(view[:head_end])
            mac.update(body)
            try:
                mac.verify(auth_tag)
            except InvalidSignature as exc:
                raise BadSeal("MAC does not verify") from exc
            return body
        return memoryview(_open(view[tag_start:], _blake(bytes(view[:head_end]), size=24), link))
