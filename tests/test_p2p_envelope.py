"""Envelopes: round trips in each auth mode, and one test per refusal with its code."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_p2p_codec import ALL_TYPES, message_strategy, same

from floor.envelope import Auth, EnvelopeCodec
from floor.errors import (
    BadSeal,
    BadSignature,
    ConfigError,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    RefusalCode,
    ReplayedMessage,
    StaleMessage,
    Unauthorized,
    UnknownMessageType,
    UnsupportedVersion,
    WrongRecipient,
)
from floor.identity import Identity
from floor.messages import Refusal, build_registry
from p2p.messages import MESSAGE_TYPES, Join, PeerRecord, Ping

NOW = 1_700_000_000.0
PREFIX = struct.Struct("<3sBBBHI")
TAGS = {Auth.SIGNED: 64, Auth.SEALED: 16, Auth.MAC: 16}
ALICE = Identity.from_seed(b"A" * 32)
BOB = Identity.from_seed(b"B" * 32)
CAROL = Identity.from_seed(b"C" * 32)


@dataclass(frozen=True, slots=True)
class Blob:
    TYPE: ClassVar[str] = "test_blob"
    data: torch.Tensor
    note: str


EXTENDED = build_registry([*MESSAGE_TYPES.values(), Blob])


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(identity: Identity, clock: Clock | None = None, **kw: Any) -> EnvelopeCodec:
    kw.setdefault("message_types", EXTENDED)
    kw.setdefault("message_types", MESSAGE_TYPES)
    return EnvelopeCodec(identity, clock=clock or Clock(), **kw)


def refused(
    error: type[ProtocolError], code: RefusalCode, fn: Callable[[], object]
) -> ProtocolError:
    with pytest.raises(error) as info:
        fn()
    assert info.value.code == code
    return info.value


def split(data: bytes) -> tuple[int, int, int]:
    """(auth, header end, auth tag end) of an envelope: the door tag follows the header, then
    the auth tag, then the body."""
    _, _, auth, _, header_len, _ = PREFIX.unpack_from(data, 0)
    head_end = PREFIX.size + header_len
    return auth, head_end, head_end + 16 + TAGS[Auth(auth)]


def redoor(codec: EnvelopeCodec, data: bytes | bytearray) -> bytes:
    """Recompute the door tag, as an insider with the network key could."""
    _, head_end, tag_end = split(bytes(data))
    out = bytearray(data)
    out[head_end : head_end + 16] = codec._door(
        bytes(out[:head_end]), bytes(out[head_end + 16 : tag_end])
    )
    return bytes(out)


def patch_header(codec: EnvelopeCodec, data: bytes, index: int, value: Any) -> bytes:
    """Replace one header field and fix the prefix and the door tag."""
    _, head_end, _ = split(data)
    fields = msgpack.unpackb(data[PREFIX.size : head_end])
    fields[index] = value
    header = msgpack.packb(fields, use_bin_type=True)
    magic, version, auth, flags, _, body_len = PREFIX.unpack_from(data, 0)
    prefix = PREFIX.pack(magic, version, auth, flags, len(header), body_len)
    return redoor(codec, prefix + header + data[head_end:])


SAMPLE = Ping(7)
# Shared by the hypothesis test: every encode draws a fresh nonce, so no replays.
ENC, DEC = make(ALICE), make(BOB)


@pytest.mark.parametrize("auth", list(Auth))
def test_round_trip_each_auth(auth: Auth) -> None:
    a, b = make(ALICE), make(BOB)
    data = a.encode(SAMPLE, recipient=BOB.peer_id, auth=auth)
    got = b.decode(data)
    assert got.message == SAMPLE
    assert got.sender == ALICE.peer_id
    assert got.auth == auth
    assert got.timestamp == NOW
    assert got.size == len(data)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda cls: cls.TYPE)
@settings(max_examples=10, deadline=None)
@given(data=st.data(), auth=st.sampled_from(list(Auth)), writable=st.booleans())
def test_every_message_type_round_trips_in_envelopes(
    cls: type, data: st.DataObject, auth: Auth, writable: bool
) -> None:
    message = data.draw(message_strategy(cls))
    if getattr(cls, "SECRET", False):
        auth = Auth.SEALED
    encoded = ENC.encode(message, recipient=BOB.peer_id, auth=auth)
    got = DEC.decode(bytearray(encoded) if writable else encoded)
    assert same(got.message, message)
    assert got.sender == ALICE.peer_id and got.auth == auth


def test_sealed_hides_content_signed_does_not() -> None:
    a = make(ALICE)
    secret = Refusal(1, "the-secret-reason")
    assert b"the-secret-reason" not in a.encode(secret, recipient=BOB.peer_id, auth=Auth.SEALED)
    assert b"the-secret-reason" in a.encode(secret, recipient=BOB.peer_id, auth=Auth.SIGNED)


def test_signed_without_recipient() -> None:
    record = PeerRecord.create(ALICE, ("127.0.0.1:1",), NOW)
    data = make(ALICE).encode(Join(record), recipient=None, auth=Auth.SIGNED)
    got = make(CAROL).decode(data)
    assert got.message == Join(record)
    with pytest.raises(ConfigError):
        make(ALICE).encode(SAMPLE, recipient=None, auth=Auth.SEALED)


@pytest.mark.parametrize("auth", list(Auth))
def test_tensor_envelope_round_trip(auth: Auth) -> None:
    tensor = torch.randn(1000, dtype=torch.float64)
    a, b = make(ALICE), make(BOB)
    data = a.encode(Blob(tensor, "n"), recipient=BOB.peer_id, auth=auth)
    out = b.decode(bytearray(data)).message
    assert isinstance(out, Blob) and torch.equal(out.data, tensor)
    assert out.data.data_ptr() % 16 == 0  # aligned, also inside the opened plaintext


def test_mac_from_bytearray_is_zero_copy() -> None:
    tensor = torch.arange(4096, dtype=torch.float32)
    data = bytearray(make(ALICE).encode(Blob(tensor, ""), recipient=BOB.peer_id, auth=Auth.MAC))
    out = make(BOB).decode(data).message
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert isinstance(out, Blob) and start <= out.data.data_ptr() < start + len(data)


def test_network_key_round_trip() -> None:
    key = os.urandom(32)
    a, b = make(ALICE, network_key=key), make(BOB, network_key=key)
    for auth in Auth:
        assert b.decode(a.encode(SAMPLE, recipient=BOB.peer_id, auth=auth)).message == SAMPLE
    with pytest.raises(ConfigError):
        make(ALICE, network_key=b"short")


# ---------------------------------------------------------------- one test per refusal


def test_refuse_truncated() -> None:
    data = make(ALICE).encode(SAMPLE, recipient=BOB.peer_id)
    b = make(BOB)
    for cut in (0, 1, 5, 11, 12, 30, len(data) - 1):
        refused(MalformedMessage, RefusalCode.MALFORMED, lambda cut=cut: b.decode(data[:cut]))
    refused(MalformedMessage, RefusalCode.MALFORMED, lambda: b.decode(data + b"\0"))


def test_refuse_random_bytes() -> None:
    b = make(BOB)
    for n in (0, 3, 12, 100, 1000):
        junk = os.urandom(n)
        refused(MalformedMessage, RefusalCode.MALFORMED, lambda junk=junk: b.decode(junk))


def test_refuse_unknown_type() -> None:
    a = make(ALICE)  # knows test_blob
    b = EnvelopeCodec(BOB, clock=Clock(), message_types=MESSAGE_TYPES)  # the closed union only
    data = a.encode(Blob(torch.zeros(1), ""), recipient=BOB.peer_id, auth=Auth.MAC)
    refused(UnknownMessageType, RefusalCode.UNKNOWN_TYPE, lambda: b.decode(data))
    patched = patch_header(a, a.encode(SAMPLE, recipient=BOB.peer_id), 0, "pinG")
    refused(UnknownMessageType, RefusalCode.UNKNOWN_TYPE, lambda: b.decode(patched))
    with pytest.raises(UnknownMessageType):
        EnvelopeCodec(ALICE, message_types=MESSAGE_TYPES).encode(
            Blob(torch.zeros(1), ""), recipient=BOB.peer_id
        )


def test_refuse_wrong_version() -> None:
    data = bytearray(make(ALICE).encode(SAMPLE, recipient=BOB.peer_id))
    for version in (0, 2, 255):
        data[3] = version
        refused(UnsupportedVersion, RefusalCode.UNSUPPORTED_VERSION, lambda: make(BOB).decode(data))


def test_refuse_wrong_recipient() -> None:
    for auth in Auth:
        data = make(ALICE).encode(SAMPLE, recipient=CAROL.peer_id, auth=auth)
        refused(
            WrongRecipient, RefusalCode.WRONG_RECIPIENT, lambda data=data: make(BOB).decode(data)
        )


@pytest.mark.parametrize("offset", [-121.0, -1e6, 10.5, 121.0, 1e9])
def test_refuse_stale_and_future(offset: float) -> None:
    data = make(ALICE, Clock(NOW + offset)).encode(SAMPLE, recipient=BOB.peer_id)
    refused(StaleMessage, RefusalCode.STALE, lambda: make(BOB).decode(data))
    # Just inside the window (120 s behind, 10 s ahead of the receiver's clock) is fine.
    inside = make(ALICE, Clock(NOW + (9.5 if offset > 0 else -119.0)))
    assert make(BOB).decode(inside.encode(SAMPLE, recipient=BOB.peer_id)).message == SAMPLE


def test_refuse_nan_timestamp() -> None:
    a = make(ALICE)
    data = patch_header(a, a.encode(SAMPLE, recipient=BOB.peer_id), 3, float("nan"))
    refused(MalformedMessage, RefusalCode.MALFORMED, lambda: make(BOB).decode(data))


@pytest.mark.parametrize("auth", list(Auth))
def test_refuse_replayed_nonce(auth: Auth) -> None:
    b = make(BOB)
    data = make(ALICE).encode(SAMPLE, recipient=BOB.peer_id, auth=auth)
    b.decode(data)
    refused(ReplayedMessage, RefusalCode.REPLAYED, lambda: b.decode(data))
    refused(ReplayedMessage, RefusalCode.REPLAYED, lambda: b.decode(bytearray(data)))


def test_failed_auth_does_not_burn_the_nonce() -> None:
    b = make(BOB)
    data = make(ALICE).encode(SAMPLE, recipient=BOB.peer_id, auth=Auth.MAC)
    forged = bytearray(data)
    forged[-1] ^= 1
    refused(BadSeal, RefusalCode.BAD_SEAL, lambda: b.decode(forged))
    assert b.decode(data).message == SAMPLE


BODY_ERRORS = {
    Auth.SIGNED: (BadSignature, RefusalCode.BAD_SIGNATURE),
    Auth.SEALED: (BadSeal, RefusalCode.BAD_SEAL),
    Auth.MAC: (BadSeal, RefusalCode.BAD_SEAL),
}


@pytest.mark.parametrize("auth", list(Auth))
def test_refuse_flipped_bit_in_body(auth: Auth) -> None:
    data = make(ALICE).encode(Refusal(3, "some reason"), recipient=BOB.peer_id, auth=auth)
    _, _, tag_end = split(data)
    error, code = BODY_ERRORS[auth]
    for i in range(tag_end, len(data), 3):
        for bit in (0, 7):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            refused(error, code, lambda flipped=flipped: make(BOB).decode(flipped))


@pytest.mark.parametrize("auth", list(Auth))
def test_refuse_flipped_bit_in_signature_or_seal(auth: Auth) -> None:
    a = make(ALICE)
    data = a.encode(SAMPLE, recipient=BOB.peer_id, auth=auth)
    _, head_end, tag_end = split(data)
    error, code = BODY_ERRORS[auth]
    for i in range(head_end + 16, tag_end):
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        # A stranger's change fails at the door; an insider's reaches the signature/seal check.
        refused(Unauthorized, RefusalCode.UNAUTHORIZED, lambda f=flipped: make(BOB).decode(f))
        insider = redoor(a, flipped)
        refused(error, code, lambda f=insider: make(BOB).decode(f))


@pytest.mark.parametrize("auth", list(Auth))
def test_refuse_flipped_bit_in_header(auth: Auth) -> None:
    a = make(ALICE)
    data = a.encode(SAMPLE, recipient=BOB.peer_id, auth=auth)
    patched = patch_header(a, data, 4, bytes(24))  # another nonce
    error, code = BODY_ERRORS[auth]
    refused(error, code, lambda: make(BOB).decode(patched))
    patched = patch_header(a, data, 3, NOW + 1.0)  # another timestamp
    refused(error, code, lambda: make(BOB).decode(patched))


@pytest.mark.parametrize("auth", list(Auth))
def test_refuse_valid_auth_by_another_key(auth: Auth) -> None:
    carol = make(CAROL)
    data = carol.encode(SAMPLE, recipient=BOB.peer_id, auth=auth)
    # Carol's genuine signature/seal, presented as coming from Alice.
    forged = patch_header(carol, data, 1, ALICE.peer_id.raw)
    error, code = BODY_ERRORS[auth]
    refused(error, code, lambda: make(BOB).decode(forged))


def test_refuse_oversized() -> None:
    a, b = make(ALICE), make(BOB, max_message_size=1024)
    data = a.encode(Refusal(1, "x" * 2000), recipient=BOB.peer_id)
    refused(MessageTooLarge, RefusalCode.TOO_LARGE, lambda: b.decode(data))
    refused(MessageTooLarge, RefusalCode.TOO_LARGE, lambda: b.decode(bytes(10**6)))
    small = make(ALICE, max_message_size=1024)
    with pytest.raises(MessageTooLarge):
        small.encode(Refusal(1, "x" * 2000), recipient=BOB.peer_id)


@dataclass(frozen=True, slots=True)
class FakePing:
    TYPE: ClassVar[str] = "ping"
    seq: str


@pytest.mark.parametrize("auth", list(Auth))
def test_refuse_wrong_field_types(auth: Auth) -> None:
    liar = make(ALICE, message_types=build_registry([FakePing]))
    data = liar.encode(FakePing("seven"), recipient=BOB.peer_id, auth=auth)
    refused(MalformedMessage, RefusalCode.MALFORMED, lambda: make(BOB).decode(data))
    patched = patch_header(liar, data, 2, 12345)  # recipient of the wrong type
    refused(MalformedMessage, RefusalCode.MALFORMED, lambda: make(BOB).decode(patched))


@pytest.mark.parametrize("auth", list(Auth))
def test_refuse_without_network_key(auth: Auth) -> None:
    key = os.urandom(32)
    member = make(BOB, network_key=key)
    for stranger in (make(ALICE), make(ALICE, network_key=os.urandom(32))):
        data = stranger.encode(SAMPLE, recipient=BOB.peer_id, auth=auth)
        refused(Unauthorized, RefusalCode.UNAUTHORIZED, lambda data=data: member.decode(data))
    data = make(ALICE, network_key=key).encode(SAMPLE, recipient=BOB.peer_id, auth=auth)
    refused(Unauthorized, RefusalCode.UNAUTHORIZED, lambda: make(BOB).decode(data))


def test_network_key_mixed_into_link_keys() -> None:
    # Even with the door tag forged (fixed), a sealed message without the key fails its seal.
    key = os.urandom(32)
    member = make(BOB, network_key=key)
    data = make(ALICE).encode(SAMPLE, recipient=BOB.peer_id, auth=Auth.SEALED)
    refused(BadSeal, RefusalCode.BAD_SEAL, lambda: member.decode(redoor(member, data)))


def test_refuse_signed_without_recipient_claiming_sealed() -> None:
    a = make(ALICE)
    data = a.encode(SAMPLE, recipient=BOB.peer_id, auth=Auth.SEALED)
    patched = patch_header(a, data, 2, None)
    refused(MalformedMessage, RefusalCode.MALFORMED, lambda: make(BOB).decode(patched))


def test_refuse_non_byte_buffer() -> None:
    import array

    good = make(ALICE).encode(SAMPLE, recipient=BOB.peer_id)
    arr = array.array("I", bytes(good[: len(good) // 4 * 4]))
    with pytest.raises(ProtocolError):
        make(BOB).decode(memoryview(arr))
    with pytest.raises(MalformedMessage):
        make(BOB).decode(memoryview(good)[::2])


# ---------------------------------------------------------------- replay cache with bounded memory

S = b"s" * 32  # one sender


def test_replay_cache_evicts_by_time() -> None:
    from floor.replay import ReplayCache

    cache = ReplayCache(window_s=10.0, capacity=100)
    cache.add(S, b"n1", 0.0, now=0.0)
    cache.add(S, b"n2", 5.0, now=5.0)
    with pytest.raises(ReplayedMessage):
        cache.check(S, b"n1", 0.0, now=9.0)
    cache.check(S, b"n3", 9.0, now=11.0)  # evicts n1 (older than now - window)
    assert len(cache) == 1
    with pytest.raises(StaleMessage):  # below the floor: cannot be a fresh message any more
        cache.check(S, b"n1", 0.0, now=11.0)


def test_replay_cache_full_raises_floor_instead_of_forgetting() -> None:
    from floor.replay import ReplayCache

    cache = ReplayCache(window_s=100.0, capacity=3, per_sender=3)
    for i in range(3):
        cache.add(S, bytes([i]), float(i), now=3.0)
    cache.add(S, b"new", 3.0, now=3.0)  # full: the oldest (ts 0) goes, the floor rises to 0
    assert len(cache) == 3
    with pytest.raises(StaleMessage):
        cache.check(S, bytes([0]), 0.0, now=3.0)  # the forgotten nonce still cannot be replayed
    with pytest.raises(StaleMessage):
        cache.add(S, b"older", 0.5, now=3.0)  # older than everything remembered, cache full
    for i in (1, 2):
        with pytest.raises(ReplayedMessage):
            cache.check(S, bytes([i]), float(i), now=3.0)
    with pytest.raises(ConfigError):
        ReplayCache(window_s=0.0, capacity=3)
    with pytest.raises(ConfigError):
        ReplayCache(window_s=1.0, capacity=0)


def test_envelope_replay_never_accepted_with_tiny_cache() -> None:
    clock = Clock()
    a, b = make(ALICE, clock), make(BOB, clock, replay_capacity=2)
    sent = []
    for i in range(6):
        clock.now += 1.0
        sent.append(a.encode(Ping(i), recipient=BOB.peer_id))
        assert b.decode(sent[-1]).message == Ping(i)
    for data in sent:
        with pytest.raises((ReplayedMessage, StaleMessage)):
            b.decode(data)


@dataclass(frozen=True, slots=True)
class Secret:
    TYPE: ClassVar[str] = "test_secret"
    SECRET: ClassVar[bool] = True
    share: bytes


@pytest.mark.parametrize("auth", [Auth.SIGNED, Auth.MAC])
def test_secret_messages_travel_sealed_only(auth: Auth) -> None:
    types = build_registry([*EXTENDED.values(), Secret])
    a, b = make(ALICE, message_types=types), make(BOB, message_types=types)
    assert b.decode(a.encode(Secret(b"s"), recipient=BOB.peer_id)).message == Secret(b"s")
    with pytest.raises(ConfigError):
        a.encode(Secret(b"s"), recipient=BOB.peer_id, auth=auth)
    # A careless peer whose registry lacks the flag sends it in the clear: refused on arrival.
    careless = make(ALICE, message_types=build_registry([SecretLookalike]))
    data = careless.encode(SecretLookalike(b"s"), recipient=BOB.peer_id, auth=auth)
    refused(MalformedMessage, RefusalCode.MALFORMED, lambda: b.decode(data))


@dataclass(frozen=True, slots=True)
class SecretLookalike:
    TYPE: ClassVar[str] = "test_secret"
    share: bytes


@pytest.mark.parametrize("auth", list(Auth))
def test_door_refuses_before_any_expensive_work(
    auth: Auth, monkeypatch: pytest.MonkeyPatch
) -> None:
    import floor.envelope as envelope

    member = make(BOB, network_key=b"k" * 32)
    data = make(ALICE).encode(Blob(torch.zeros(10_000), "big"), recipient=BOB.peer_id, auth=auth)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("expensive work before the door check")

    for name in ("verify_signature", "decode_body_as", "Poly1305"):
        monkeypatch.setattr(envelope, name, forbidden)
    monkeypatch.setattr(envelope.msgpack, "unpackb", forbidden)
    monkeypatch.setattr(envelope, "_open", forbidden)
    monkeypatch.setattr(Identity, "pair_key", forbidden)
    refused(Unauthorized, RefusalCode.UNAUTHORIZED, lambda: member.decode(data))
