"""The strict msgpack body codec: round trips for every message type and for tensors."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from floor import codec
from floor.codec import decode_body, decode_body_as, encode_body
from floor.errors import MalformedMessage, RefusalCode, UnknownMessageType
from floor.identity import Identity, PeerId
from floor.messages import Refusal, build_registry
from p2p.messages import (
    MESSAGE_TYPES,
    Exchange,
    ExchangeReply,
    Join,
    JoinReply,
    PeerRecord,
    Ping,
    Pong,
)

SETTINGS = settings(max_examples=60, deadline=None)
peer_ids = st.binary(min_size=32, max_size=32).map(PeerId)
finite = st.floats(allow_nan=False)
int64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
DTYPES = [torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8, torch.bool]
shapes = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=4)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(shapes)
    n = math.prod(shape)
    if dtype.is_floating_point:
        width = 32 if dtype == torch.float32 else 64
        values: list[Any] = draw(st.lists(st.floats(width=width), min_size=n, max_size=n))
    elif dtype == torch.bool:
        values = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    else:
        info = torch.iinfo(dtype)
        ints = st.integers(min_value=info.min, max_value=info.max)
        values = draw(st.lists(ints, min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype).reshape(shape)


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """Values of any wire field type, derived from the type hint (so new messages are covered)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    simple: dict[Any, st.SearchStrategy[Any]] = {
        bool: st.booleans(),
        int: int64,
        float: finite,
        str: st.text(max_size=20),
        bytes: st.binary(max_size=40),
        PeerId: peer_ids,
        torch.Tensor: tensors(),
    }
    if tp in simple:
        return simple[tp]
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return st.lists(strategy_for(args[0]), max_size=3).map(tuple)
    if origin is tuple:
        return st.tuples(*(strategy_for(a) for a in args))
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=3)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, tp
        return st.none() | strategy_for(inner[0])
    assert dataclasses.is_dataclass(tp), tp
    return message_strategy(tp)


def message_strategy(cls: type) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(cls) if f.init}
    return st.fixed_dictionaries(fields).map(lambda kw: cls(**kw))


def same(a: Any, b: Any) -> bool:
    """Deep equality with bit-exact tensors (dataclass == would compare tensors elementwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and same_tensor(a, b)
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, tuple):
        return type(b) is tuple and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.contiguous().reshape(-1).view(torch.uint8).numpy()
    )


ALL_TYPES = sorted(MESSAGE_TYPES.values(), key=lambda cls: cls.TYPE)


def test_union_holds_the_membership_messages() -> None:
    for cls in (PeerRecord, Join, JoinReply, Exchange, ExchangeReply, Ping, Pong, Refusal):
        assert MESSAGE_TYPES[cls.TYPE] is cls


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda cls: cls.TYPE)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_message_type_round_trips(cls: type, data: st.DataObject) -> None:
    message = data.draw(message_strategy(cls))
    body = encode_body(message)
    for buffer in (body, bytearray(body)):
        out = decode_body(cls.TYPE, buffer, MESSAGE_TYPES)  # type: ignore[attr-defined]
        assert same(out, message)
    if not any(isinstance(v, torch.Tensor) for v in _leaves(message)):
        assert out == message


def _leaves(value: Any) -> list[Any]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [x for f in dataclasses.fields(value) for x in _leaves(getattr(value, f.name))]
    if isinstance(value, tuple):
        return [x for v in value for x in _leaves(v)]
    if isinstance(value, dict):
        return [x for kv in value.items() for v in kv for x in _leaves(v)]
    return [value]


def test_unknown_type_tag() -> None:
    with pytest.raises(UnknownMessageType):
        decode_body("no_such_type", encode_body(Ping(1)), MESSAGE_TYPES)


def test_peer_record_signature() -> None:
    ident = Identity.from_seed(b"r" * 32)
    record = PeerRecord.create(ident, ("127.0.0.1:7070", "[::1]:7070"), 1234.5)
    record.verify()
    decoded = decode_body(PeerRecord.TYPE, encode_body(record), MESSAGE_TYPES)
    decoded.verify()
    from floor.errors import BadSignature

    for changed in (
        dataclasses.replace(record, addresses=("10.0.0.1:7070",)),
        dataclasses.replace(record, timestamp=1234.6),
        dataclasses.replace(record, peer_id=Identity.generate().peer_id),
        dataclasses.replace(record, signature=bytes(64)),
        dataclasses.replace(record, timestamp=math.nan),
    ):
        with pytest.raises(BadSignature):
            changed.verify()


# ------------------------------------------------------------------ tensors and generic fields


@dataclass(frozen=True, slots=True)
class Inner:
    TYPE: ClassVar[str] = "test_inner"
    t: torch.Tensor
    label: str


@dataclass(frozen=True, slots=True)
class Everything:
    TYPE: ClassVar[str] = "test_everything"
    i: int
    f: float
    b: bool
    s: str
    raw: bytes
    peer: PeerId
    tensors: tuple[torch.Tensor, ...]
    fixed: tuple[int, str]
    table: dict[PeerId, torch.Tensor]
    counts: dict[int, float]
    maybe: torch.Tensor | None
    inner: Inner | None


TEST_TYPES = build_registry([Inner, Everything])


@SETTINGS
@given(tensors(), st.booleans())
def test_tensor_round_trip_exact(tensor: torch.Tensor, writable: bool) -> None:
    message = Inner(tensor, "x")
    data = encode_body(message)
    out = decode_body_as(Inner, bytearray(data) if writable else data)
    assert same_tensor(out.t, tensor)


@SETTINGS
@given(
    st.builds(
        Everything,
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        finite,
        st.booleans(),
        st.text(max_size=20),
        st.binary(max_size=40),
        peer_ids,
        st.lists(tensors(), max_size=3).map(tuple),
        st.tuples(st.integers(min_value=0, max_value=9), st.text(max_size=3)),
        st.dictionaries(peer_ids, tensors(), max_size=3),
        st.dictionaries(st.integers(min_value=-5, max_value=5), finite, max_size=3),
        st.none() | tensors(),
        st.none() | st.builds(Inner, t=tensors(), label=st.text(max_size=5)),
    )
)
def test_everything_round_trips(message: Everything) -> None:
    data = encode_body(message)
    out = decode_body_as(Everything, bytearray(data))
    for name in ("i", "f", "b", "s", "raw", "peer", "fixed", "counts"):
        assert getattr(out, name) == getattr(message, name)
    assert len(out.tensors) == len(message.tensors)
    assert all(same_tensor(x, y) for x, y in zip(out.tensors, message.tensors, strict=True))
    assert out.table.keys() == message.table.keys()
    assert all(same_tensor(out.table[k], v) for k, v in message.table.items())
    assert (out.maybe is None) == (message.maybe is None)
    if message.maybe is not None:
        assert same_tensor(out.maybe, message.maybe)
    assert (out.inner is None) == (message.inner is None)
    if message.inner is not None:
        assert out.inner.label == message.inner.label
        assert same_tensor(out.inner.t, message.inner.t)


def test_noncontiguous_and_grad_tensors_encode() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for tensor in (base.t(), base[:, ::2], base.clone().requires_grad_(), torch.tensor(3.0)):
        out = decode_body_as(Inner, encode_body(Inner(tensor, "")))
        assert torch.equal(out.t, tensor.detach())


def test_large_tensor_aliases_writable_buffer() -> None:
    tensor = torch.arange(10_000, dtype=torch.float64)
    buffer = bytearray(encode_body(Inner(tensor, "big")))
    out = decode_body_as(Inner, buffer)
    assert torch.equal(out.t, tensor)
    # No copy: the tensor's memory lies inside the buffer we handed over.
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    assert start <= out.t.data_ptr() < start + len(buffer)
    # From immutable bytes the tensor is a private copy, writable without harm.
    data = bytes(buffer)
    copied = decode_body_as(Inner, data)
    copied.t.add_(1)
    assert torch.equal(decode_body_as(Inner, data).t, tensor)


def test_int_enum_encodes_as_int() -> None:
    from floor.errors import RefusalCode

    out = decode_body(Refusal.TYPE, encode_body(Refusal(RefusalCode.STALE, "old")), MESSAGE_TYPES)
    assert out == Refusal(6, "old") and type(out.code) is int


def test_wrong_field_types_refused_on_encode() -> None:
    with pytest.raises(MalformedMessage):
        encode_body(Ping("1"))  # type: ignore[arg-type]
    with pytest.raises(MalformedMessage):
        encode_body(Ping(True))
    with pytest.raises(MalformedMessage):
        encode_body(Ping(2**70))
    with pytest.raises(MalformedMessage):
        encode_body(JoinReply([]))  # type: ignore[arg-type]
    with pytest.raises(MalformedMessage):
        encode_body(Inner(torch.zeros(2, dtype=torch.complex64), ""))
    with pytest.raises(MalformedMessage):
        encode_body(Refusal(1, "\ud800"))


def test_unsupported_field_type_rejected_at_registration() -> None:
    @dataclass(frozen=True, slots=True)
    class Bad:
        TYPE: ClassVar[str] = "test_bad"
        x: list[int]

    with pytest.raises(TypeError):
        codec.schema_check(Bad)

    @dataclass(frozen=True)
    class NoSlots:
        TYPE: ClassVar[str] = "test_noslots"
        x: int

    with pytest.raises(TypeError):
        codec.schema_check(NoSlots)
    with pytest.raises(TypeError):
        build_registry([Ping, Ping])


def craft(obj: Any, region: bytes = b"", pad: int | None = None) -> bytes:
    """A body with an arbitrary msgpack part (and tensor region), bypassing the encoder."""
    import struct

    import msgpack

    packed = msgpack.packb(obj, use_bin_type=True)
    if pad is None:
        pad = (-(8 + len(packed))) % 64 if region else 0
    return struct.pack("<II", len(packed), pad) + packed + bytes(pad) + region


@dataclass(frozen=True, slots=True)
class Typed:
    TYPE: ClassVar[str] = "test_typed"
    i: int
    f: float
    s: str
    peers: tuple[PeerId, ...]
    table: dict[str, int]
    opt: bytes | None


GOOD = [1, 1.5, "s", [b"p" * 32], {"a": 1}, None]
TENSOR_REGION = bytes(range(16))


@pytest.mark.parametrize(
    "obj",
    [
        ["1", *GOOD[1:]],  # str for int
        [True, *GOOD[1:]],  # bool for int
        [1, 2, *GOOD[2:]],  # int for float
        [1, 1.5, b"s", *GOOD[3:]],  # bytes for str
        [1, 1.5, "s", [b"p" * 31], *GOOD[4:]],  # short peer id
        [1, 1.5, "s", b"p" * 32, *GOOD[4:]],  # bytes for a tuple
        [1, 1.5, "s", [b"p" * 32], [["a", 1]], None],  # array for a map
        [1, 1.5, "s", [b"p" * 32], {"a": "1"}, None],  # wrong map value
        [1, 1.5, "s", [b"p" * 32], {1: 1}, None],  # wrong map key
        [*GOOD[:5], 7],  # int for bytes | None
        GOOD[:5],  # too few fields
        [*GOOD, None],  # too many fields
        {"i": 1},  # a map for the message
        None,
    ],
)
def test_wrong_field_types_refused_on_decode(obj: Any) -> None:
    assert decode_body_as(Typed, craft(GOOD)) == Typed(
        1, 1.5, "s", (PeerId(b"p" * 32),), {"a": 1}, None
    )
    with pytest.raises(MalformedMessage) as info:
        decode_body_as(Typed, craft(obj))
    assert info.value.code == RefusalCode.MALFORMED


def test_duplicate_map_keys_refused() -> None:
    import msgpack

    packed = msgpack.packb([1, 1.5, "s", [], {}, None], use_bin_type=True)
    # A map with the key "a" twice, spliced in place of the empty map (0x80).
    dup = packed.replace(b"\x80", b"\x82\xa1a\x01\xa1a\x02", 1)
    body = struct_body(dup)
    with pytest.raises(MalformedMessage, match="duplicate"):
        decode_body_as(Typed, body)


def struct_body(packed: bytes) -> bytes:
    import struct

    return struct.pack("<II", len(packed), 0) + packed


@pytest.mark.parametrize(
    ("tensor", "region", "pad"),
    [
        ([1, [4], 0, 16], TENSOR_REGION, None),  # valid: float32 x 4
        ([99, [4], 0, 16], TENSOR_REGION, None),  # unknown dtype code
        ([1, [-4], 0, 16], TENSOR_REGION, None),  # negative size
        ([1, [5], 0, 16], TENSOR_REGION, None),  # shape and nbytes disagree
        ([1, [4], 8, 16], TENSOR_REGION, None),  # not where the layout puts it
        ([1, [2], 0, 8], TENSOR_REGION, None),  # trailing bytes in the region
        ([1, [8], 0, 32], TENSOR_REGION, None),  # runs past the end
        ([6, [16], 0, 16], TENSOR_REGION, None),  # bool tensor with bytes > 1
        ([1, [4], 0, 16], TENSOR_REGION, 64),  # padding too long
        ([1, [4], 0], TENSOR_REGION, None),  # wrong arity
        ([1, [1] * 40, 0, 4], TENSOR_REGION[:4], None),  # too many dimensions
        ("tensor", TENSOR_REGION, None),
    ],
)
def test_bad_tensor_fields_refused(tensor: Any, region: bytes, pad: int | None) -> None:
    body = craft([tensor, "x"], region, pad)
    if tensor == [1, [4], 0, 16] and pad is None:
        assert decode_body_as(Inner, body).t.shape == (4,)
        return
    with pytest.raises(MalformedMessage):
        decode_body_as(Inner, body)


@pytest.mark.parametrize("cut", [0, 3, 7, 8, 12])
def test_truncated_body_refused(cut: int) -> None:
    body = encode_body(Inner(torch.ones(3), "label"))
    with pytest.raises(MalformedMessage):
        decode_body_as(Inner, body[:cut])
    with pytest.raises(MalformedMessage):
        decode_body_as(Inner, body[:-1])
