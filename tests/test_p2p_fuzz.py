"""Fuzzing the decoder: mutated envelopes and bodies give a typed refusal or a valid message."""

from __future__ import annotations

import contextlib
import random
import struct
import tracemalloc
from dataclasses import dataclass
from typing import ClassVar

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from floor.codec import decode_body_as, encode_body, envelope_cap, msgpack_cap
from floor.envelope import Auth, EnvelopeCodec, Received
from floor.errors import MalformedMessage, MessageTooLarge, ProtocolError, RefusalCode
from floor.identity import Identity
from floor.messages import Refusal, build_registry
from p2p.messages import MESSAGE_TYPES, Exchange, Join, PeerRecord, Ping

PREFIX = struct.Struct("<3sBBBHI")
TAGS = {1: 64, 2: 16, 3: 16}
NOW = 1_700_000_000.0
SENDER = Identity.from_seed(b"S" * 32)
RECEIVER = Identity.from_seed(b"R" * 32)


@dataclass(frozen=True, slots=True)
class Blob:
    TYPE: ClassVar[str] = "test_fuzz_blob"
    parts: tuple[torch.Tensor, ...]
    table: dict[int, str]


TYPES = build_registry([*MESSAGE_TYPES.values(), Blob])


def _codec(identity: Identity) -> EnvelopeCodec:
    return EnvelopeCodec(identity, clock=lambda: NOW, message_types=TYPES, max_message_size=1 << 16)


def _samples() -> list[object]:
    record = PeerRecord.create(SENDER, ("127.0.0.1:7070", "10.1.2.3:1"), NOW)
    blob = Blob((torch.arange(6, dtype=torch.int32), torch.ones(2, 3), torch.zeros(0)), {1: "a"})
    return [Ping(3), Refusal(2, "why"), Join(record), Exchange((record, record)), blob]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        if kind == 0 and out:  # flip a bit
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:  # set a byte
            out[rng.randrange(len(out))] = rng.choice((0, 0xFF, 0x7F, 0x80, 0xC0, 0xDC, 0xDE))
        elif kind == 2:  # truncate
            del out[rng.randrange(len(out) + 1) :]
        elif kind == 3:  # append junk
            out += rng.randbytes(rng.randint(1, 40))
        elif kind == 4 and out:  # delete a span
            i = rng.randrange(len(out))
            del out[i : i + rng.randint(1, 8)]
        else:  # duplicate a span
            i = rng.randrange(len(out) + 1)
            out[i:i] = out[i : i + rng.randint(1, 8)]
    return bytes(out)


def _redoor(codec: EnvelopeCodec, data: bytes) -> bytes:
    """Fix framing lengths and the door tag so mutations reach the deeper checks."""
    if len(data) < PREFIX.size:
        return data
    magic, version, auth, flags, header_len, _ = PREFIX.unpack_from(data, 0)
    head_end = PREFIX.size + header_len
    tag_end = head_end + 16 + TAGS.get(auth, 16)
    if tag_end > len(data):
        return data
    body_len = len(data) - tag_end
    head = (
        PREFIX.pack(magic, version, auth, flags, header_len, body_len)
        + data[PREFIX.size : head_end]
    )
    tag = data[head_end + 16 : tag_end]
    return head + codec._door(head, tag) + tag + data[tag_end:]


def test_fuzz_mutated_envelopes() -> None:
    rng = random.Random(20261125)
    sender, receiver = _codec(SENDER), _codec(RECEIVER)
    envelopes = [
        sender.encode(message, recipient=RECEIVER.peer_id, auth=auth)
        for message in _samples()
        for auth in Auth
    ]
    codes: dict[RefusalCode, int] = {}
    accepted = 0
    total = 12_000
    for n in range(total):
        data = _mutate(rng, rng.choice(envelopes))
        if n % 2:  # half as an insider who can fix the door tag
            data = _redoor(receiver, data)
        buffer = bytearray(data) if n % 3 == 0 else data
        try:
            got = receiver.decode(buffer)
        except ProtocolError as exc:
            assert isinstance(exc.code, RefusalCode)
            codes[exc.code] = codes.get(exc.code, 0) + 1
        else:
            assert isinstance(got, Received) and type(got.message) in TYPES.values()
            accepted += 1
    assert sum(codes.values()) + accepted == total
    # The insider half reaches well past the door.
    for code in (RefusalCode.MALFORMED, RefusalCode.UNAUTHORIZED, RefusalCode.BAD_SEAL):
        assert codes.get(code, 0) > 50, codes
    assert codes.get(RefusalCode.BAD_SIGNATURE, 0) > 20, codes


def test_fuzz_mutated_bodies() -> None:
    rng = random.Random(7)
    bodies = [(type(m), encode_body(m)) for m in _samples()]
    refused = 0
    for n in range(10_000):
        cls, body = rng.choice(bodies)
        data = _mutate(rng, body)
        try:
            message = decode_body_as(cls, bytearray(data) if n % 2 else data)
        except ProtocolError as exc:
            assert exc.code == RefusalCode.MALFORMED
            refused += 1
        else:
            assert type(message) is cls
    assert refused > 5_000


# ---------------------------------------------------------------- hypothesis: a fixed budget in CI

ENVELOPES = [
    (message, auth, _codec(SENDER).encode(message, recipient=RECEIVER.peer_id, auth=auth))
    for message in _samples()
    for auth in Auth
]
FUZZ = settings(
    max_examples=1500,
    derandomize=True,  # the same inputs on every run: CI is reproducible
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[int, bytes]:
    index = draw(st.integers(0, len(ENVELOPES) - 1))
    data = bytearray(ENVELOPES[index][2])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "junk", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "junk":
            data[at:at] = draw(st.binary(min_size=1, max_size=40))
        elif kind == "splice":
            other = ENVELOPES[draw(st.integers(0, len(ENVELOPES) - 1))][2]
            data[at:] = other[at:]
    out = bytes(data)
    return index, _redoor(_codec(RECEIVER), out) if draw(st.booleans()) else out


@FUZZ
@given(_mutated())
def test_hypothesis_no_mutated_envelope_is_accepted_as_a_forgery(case: tuple[int, bytes]) -> None:
    """A mutated envelope is refused with a typed error, or it is the original message, from
    the original sender: 0 crashes, 0 accepted forgeries (each example has a fresh receiver,
    so a replay of the original is not what is being tested here)."""
    _, data = case
    try:
        got = _codec(RECEIVER).decode(data)
    except ProtocolError as exc:
        assert isinstance(exc.code, RefusalCode)
        return
    assert got.sender == SENDER.peer_id
    # Splicing can rebuild another whole genuine envelope: that is no forgery either.
    bodies = {encode_body(m) for m, _, _ in ENVELOPES}
    assert encode_body(got.message) in bodies, "a forgery passed"


_MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=30,
)


@FUZZ
@given(st.sampled_from(sorted(TYPES)), _MSGPACK_VALUES, st.binary(max_size=200))
def test_hypothesis_bodies_decode_or_refuse_typed(tag: str, value: object, tail: bytes) -> None:
    """Any msgpack value (and trailing tensor-region bytes) as any type's body."""
    cls = TYPES[tag]
    packed = msgpack.packb(value, use_bin_type=True)
    body = struct.pack("<II", len(packed), 0) + packed + tail
    try:
        message = decode_body_as(cls, bytearray(body))
    except (MalformedMessage, MessageTooLarge):
        return
    assert type(message) is cls


@FUZZ
@given(st.sampled_from(sorted(TYPES)), st.binary(max_size=300))
def test_hypothesis_raw_bytes_as_bodies(tag: str, data: bytes) -> None:
    with contextlib.suppress(MalformedMessage, MessageTooLarge):
        decode_body_as(TYPES[tag], data)


# ---------------------------------------------------------------- what a decode can cost


@pytest.mark.parametrize("tag", sorted(TYPES))
def test_no_body_costs_much_more_than_its_size(tag: str) -> None:
    """The worst msgpack for memory (empty arrays: 1 byte, ~64 bytes of objects each) at the
    type's cap is decoded in bounded memory and refused; above the cap nothing is unpacked."""
    cls = TYPES[tag]
    cap = msgpack_cap(cls)
    n = cap - 6
    worst = b"\xdd" + struct.pack(">I", n) + b"\x90" * n
    body = struct.pack("<II", len(worst), 0) + worst
    over = b"\xdd" + struct.pack(">I", cap) + b"\x90" * cap
    over_body = struct.pack("<II", len(over), 0) + over
    tracemalloc.start()
    try:
        with pytest.raises(MalformedMessage):
            decode_body_as(cls, body)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with pytest.raises(MessageTooLarge):
            decode_body_as(cls, over_body)
        _, over_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 80 * cap, f"{tag}: {peak} bytes to refuse a {cap}-byte body"
    assert over_peak < 32 * 1024, f"{tag}: {over_peak} bytes to refuse an oversized body"
    whole = envelope_cap(cls)
    if whole is not None:  # no tensors: the whole envelope is refused from its header
        assert whole < 2 * cap
