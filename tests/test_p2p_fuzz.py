"""Fuzzing the decoder: mutated envelopes and bodies give a typed refusal or a valid message."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass
from typing import ClassVar

import torch

from floor.codec import decode_body_as, encode_body
from floor.envelope import Auth, EnvelopeCodec, Received
from floor.errors import ProtocolError, RefusalCode
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
