"""The one strict msgpack codec that turns message dataclasses into body bytes and back.

A message is a ``@dataclass(frozen=True, slots=True)`` with a ``TYPE: ClassVar[str]`` tag.
Supported field types, exactly: ``int, float, bool, str, bytes, torch.Tensor, PeerId``,
``tuple[T, ...]`` and fixed ``tuple[A, B]``, ``dict[K, V]`` (K in int, str, bytes, PeerId),
``X | None``, and nested dataclasses following the same rules. Never pickle.

Body layout (all integers little-endian)::

    u32 M | u32 P | msgpack (M bytes) | P zero bytes | tensor region

The msgpack part is the array of field values in declaration order. A tensor field is
``[dtype code, shape, offset, nbytes]``; its raw bytes live in the tensor region at ``offset``
(relative to the region start), each non-empty tensor starting at the next multiple of 64, in
the order the fields are walked, with nothing else in the region. Keeping tensor bytes out of
msgpack means encoding copies each tensor once (into the final buffer) and decoding copies
nothing: ``torch.frombuffer`` aliases the received buffer when it is writable (``bytearray``, a
writable ``memoryview``). The decoded tensors then own that buffer: do not reuse it. From an
immutable ``bytes`` object each tensor is copied once, because aliasing memory Python
considers immutable would let an in-place op on one decoded tensor corrupt another holder's
bytes (and torch warns about it). Integers are little-endian: big-endian hosts are not
supported.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final, Union

import msgpack
import torch

from floor.errors import MalformedMessage, MessageTooLarge, UnknownMessageType
from floor.identity import PeerId

__all__ = [
    "DTYPE_CODES",
    "MAX_MSGPACK",
    "TENSOR_ALIGN",
    "BodyParts",
    "decode_body",
    "decode_body_as",
    "encode_body",
    "encode_body_parts",
    "envelope_cap",
    "msgpack_cap",
    "schema_check",
]

#: Wire codes of the tensor dtypes; part of the protocol, never renumber.
DTYPE_CODES: Final[dict[torch.dtype, int]] = {
    torch.float32: 1,
    torch.float64: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.uint8: 5,
    torch.bool: 6,
    torch.int8: 7,
    torch.int16: 8,
    torch.float16: 9,
    torch.bfloat16: 10,
}
_CODE_DTYPES: Final = {code: dtype for dtype, code in DTYPE_CODES.items()}
_ITEMSIZE: Final = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPE_CODES}
#: Alignment of each non-empty tensor inside the tensor region.
TENSOR_ALIGN: Final = 64
_PREFIX = struct.Struct("<II")
_MAX_DIMS: Final = 32

#: Default cap on the msgpack part of a body (fields and tensor metadata, never tensor bytes).
#: A class may set ``MAX_MSGPACK: ClassVar[int]``. Decoding builds at most ~64 bytes of Python
#: objects per msgpack byte (an empty array is one byte), so this bounds what any body of the
#: type can cost before its schema is checked: here 8 MiB of objects, a few milliseconds.
MAX_MSGPACK: Final = 128 * 2**10
_ENVELOPE_SLACK: Final = 1024  # envelope prefix, header, door and auth tags, body prefix, pad

Buffer = bytes | bytearray | memoryview
BodyParts = list[bytes | memoryview]


class _Pairs(list[tuple[Any, Any]]):
    """A msgpack map as decoded: its (key, value) pairs, so duplicates can be seen."""


class _Writer:
    """Collects tensor segments while the msgpack part is built."""

    def __init__(self) -> None:
        self.segments: list[memoryview] = []
        self.size = 0

    def add(self, data: memoryview) -> int:
        offset = _next_offset(self.size, data.nbytes)
        self.segments.append(data)
        self.size = offset + data.nbytes
        return offset


class _Reader:
    """Hands out tensors from the region in order, checking the exact layout."""

    def __init__(self, region: memoryview, writable: bool) -> None:
        self.region = region
        self.writable = writable
        self.end = 0

    def take(self, offset: int, nbytes: int) -> memoryview:
        if offset != _next_offset(self.end, nbytes) or offset + nbytes > self.region.nbytes:
            raise MalformedMessage("tensor bytes are not where the layout puts them")
        self.end = offset + nbytes
        return self.region[offset : offset + nbytes]


def _next_offset(end: int, nbytes: int) -> int:
    if nbytes == 0:
        return end
    return -(-end // TENSOR_ALIGN) * TENSOR_ALIGN


Encoder = Callable[[Any, _Writer], Any]
Decoder = Callable[[Any, _Reader], Any]


def _bad(what: str, value: object) -> MalformedMessage:
    return MalformedMessage(f"{what}: got {type(value).__name__}")


def _exact(kind: type, name: str) -> tuple[Encoder, Decoder]:
    def encode(value: Any, _: _Writer) -> Any:
        if type(value) is not kind:
            raise _bad(f"expected {name}", value)
        return value

    def decode(value: Any, _: _Reader) -> Any:
        if type(value) is not kind:
            raise _bad(f"expected {name}", value)
        return value

    return encode, decode


def _int_codec() -> tuple[Encoder, Decoder]:
    def encode(value: Any, _: _Writer) -> Any:
        if type(value) is int:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)  # IntEnum members such as RefusalCode travel as plain ints
        raise _bad("expected int", value)

    def decode(value: Any, _: _Reader) -> Any:
        if type(value) is not int:
            raise _bad("expected int", value)
        return value

    return encode, decode


def _float_codec() -> tuple[Encoder, Decoder]:
    def encode(value: Any, _: _Writer) -> Any:
        if type(value) is float:
            return value
        if type(value) is int:
            return float(value)
        raise _bad("expected float", value)

    def decode(value: Any, _: _Reader) -> Any:
        if type(value) is not float:
            raise _bad("expected float", value)
        return value

    return encode, decode


def _peer_codec() -> tuple[Encoder, Decoder]:
    def encode(value: Any, _: _Writer) -> Any:
        if not isinstance(value, PeerId):
            raise _bad("expected PeerId", value)
        return value.raw

    def decode(value: Any, _: _Reader) -> Any:
        if type(value) is not bytes:
            raise _bad("expected PeerId bytes", value)
        return PeerId(value)

    return encode, decode


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1).view(torch.uint8)
    array: Any = flat.numpy()  # numpy arrays export the buffer protocol
    return memoryview(array).cast("B")


def _tensor_codec() -> tuple[Encoder, Decoder]:
    def encode(value: Any, writer: _Writer) -> Any:
        if not isinstance(value, torch.Tensor):
            raise _bad("expected torch.Tensor", value)
        code = DTYPE_CODES.get(value.dtype)
        if code is None or value.layout != torch.strided or value.is_quantized:
            raise MalformedMessage(f"unsupported tensor: {value.dtype}, {value.layout}")
        tensor = value.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.resolve_conj().resolve_neg().contiguous()
        offset = writer.add(_tensor_bytes(tensor))
        return [code, list(tensor.shape), offset, tensor.numel() * tensor.element_size()]

    def decode(value: Any, reader: _Reader) -> Any:
        if type(value) is not list or len(value) != 4:
            raise _bad("expected a tensor [dtype, shape, offset, nbytes]", value)
        code, shape, offset, nbytes = value
        dtype = _CODE_DTYPES.get(code) if type(code) is int else None
        if dtype is None:
            raise MalformedMessage(f"unknown tensor dtype code {code!r}")
        if type(shape) is not list or len(shape) > _MAX_DIMS:
            raise MalformedMessage("tensor shape must be a list of at most 32 sizes")
        if any(type(d) is not int or d < 0 for d in shape):
            raise MalformedMessage("tensor sizes must be non-negative integers")
        if type(offset) is not int or type(nbytes) is not int or offset < 0 or nbytes < 0:
            raise MalformedMessage("tensor offset and size must be non-negative integers")
        itemsize = _ITEMSIZE[dtype]
        numel = math.prod(shape)
        if numel * itemsize != nbytes:
            raise MalformedMessage("tensor size does not match its shape and dtype")
        data = reader.take(offset, nbytes)
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        buffer: Buffer = data if reader.writable else bytearray(data)
        tensor = torch.frombuffer(buffer, dtype=dtype, count=numel).reshape(shape)
        if dtype == torch.bool and bool((tensor.view(torch.uint8) > 1).any()):
            raise MalformedMessage("bool tensor holds a byte other than 0 or 1")
        return tensor

    return encode, decode


def _tuple_codec(args: tuple[Any, ...]) -> tuple[Encoder, Decoder]:
    if len(args) == 2 and args[1] is Ellipsis:
        item_enc, item_dec = _compile(args[0])

        def encode(value: Any, writer: _Writer) -> Any:
            if type(value) is not tuple:
                raise _bad("expected tuple", value)
            return [item_enc(item, writer) for item in value]

        def decode(value: Any, reader: _Reader) -> Any:
            if type(value) is not list:
                raise _bad("expected array", value)
            return tuple(item_dec(item, reader) for item in value)

        return encode, decode

    codecs = [_compile(arg) for arg in args]

    def encode_fixed(value: Any, writer: _Writer) -> Any:
        if type(value) is not tuple or len(value) != len(codecs):
            raise _bad(f"expected a {len(codecs)}-tuple", value)
        return [enc(item, writer) for (enc, _), item in zip(codecs, value, strict=True)]

    def decode_fixed(value: Any, reader: _Reader) -> Any:
        if type(value) is not list or len(value) != len(codecs):
            raise _bad(f"expected an array of {len(codecs)}", value)
        return tuple(dec(item, reader) for (_, dec), item in zip(codecs, value, strict=True))

    return encode_fixed, decode_fixed


def _dict_codec(key_type: Any, value_type: Any) -> tuple[Encoder, Decoder]:
    if key_type not in (int, str, bytes, PeerId):
        raise TypeError(f"unsupported dict key type {key_type!r}")
    key_enc, key_dec = _compile(key_type)
    val_enc, val_dec = _compile(value_type)

    def encode(value: Any, writer: _Writer) -> Any:
        if type(value) is not dict:
            raise _bad("expected dict", value)
        return {key_enc(k, writer): val_enc(v, writer) for k, v in value.items()}

    def decode(value: Any, reader: _Reader) -> Any:
        if type(value) is not _Pairs:
            raise _bad("expected map", value)
        result = {key_dec(k, reader): val_dec(v, reader) for k, v in value}
        if len(result) != len(value):
            raise MalformedMessage("map has duplicate keys")
        return result

    return encode, decode


def _optional_codec(inner: Any) -> tuple[Encoder, Decoder]:
    enc, dec = _compile(inner)

    def encode(value: Any, writer: _Writer) -> Any:
        return None if value is None else enc(value, writer)

    def decode(value: Any, reader: _Reader) -> Any:
        return None if value is None else dec(value, reader)

    return encode, decode


def _dataclass_codec(cls: type) -> tuple[Encoder, Decoder]:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    codecs = [_compile(hints[name]) for name in names]
    pairs = list(zip(names, codecs, strict=True))

    def encode(value: Any, writer: _Writer) -> Any:
        if type(value) is not cls:
            raise _bad(f"expected {cls.__name__}", value)
        return [enc(getattr(value, name), writer) for name, (enc, _) in pairs]

    def decode(value: Any, reader: _Reader) -> Any:
        if type(value) is not list or len(value) != len(pairs):
            raise _bad(f"expected {cls.__name__} as an array of {len(pairs)}", value)
        kwargs = {
            name: dec(item, reader) for (name, (_, dec)), item in zip(pairs, value, strict=True)
        }
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:  # __post_init__ checks
            raise MalformedMessage(f"invalid {cls.__name__}: {exc}") from exc

    return encode, decode


_CACHE: dict[Any, tuple[Encoder, Decoder]] = {}


def _compile(tp: Any) -> tuple[Encoder, Decoder]:
    cached = _CACHE.get(tp)
    if cached is not None:
        return cached
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    result: tuple[Encoder, Decoder]
    if tp is bool:
        result = _exact(bool, "bool")
    elif tp is int:
        result = _int_codec()
    elif tp is float:
        result = _float_codec()
    elif tp is str:
        result = _exact(str, "str")
    elif tp is bytes:
        result = _exact(bytes, "bytes")
    elif tp is PeerId:
        result = _peer_codec()
    elif tp is torch.Tensor:
        result = _tensor_codec()
    elif origin is tuple:
        result = _tuple_codec(args)
    elif origin is dict:
        result = _dict_codec(*args)
    elif origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        result = _optional_codec(next(a for a in args if a is not type(None)))
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        result = _dataclass_codec(tp)
    else:
        raise TypeError(f"unsupported field type for the wire: {tp!r}")
    _CACHE[tp] = result
    return result


_CAPS: dict[type, tuple[int, int | None]] = {}


def _carries_tensor(tp: Any) -> bool:
    if tp is torch.Tensor:
        return True
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return any(_carries_tensor(hints[f.name]) for f in dataclasses.fields(tp) if f.init)
    return any(_carries_tensor(arg) for arg in typing.get_args(tp) if arg is not Ellipsis)


def _caps(cls: type) -> tuple[int, int | None]:
    caps = _CAPS.get(cls)
    if caps is None:
        packed = int(getattr(cls, "MAX_MSGPACK", MAX_MSGPACK))
        whole = None if _carries_tensor(cls) else packed + _ENVELOPE_SLACK
        caps = _CAPS[cls] = (packed, whole)
    return caps


def msgpack_cap(cls: type) -> int:
    """The largest msgpack part a body of ``cls`` may have (``MAX_MSGPACK`` unless it says)."""
    return _caps(cls)[0]


def envelope_cap(cls: type) -> int | None:
    """The largest envelope of ``cls``; None when it carries tensors (the transport cap rules).

    A message without tensors is all msgpack, so its whole envelope is refused above its
    msgpack cap plus the envelope's own fields, before any signature or MAC is checked.
    """
    return _caps(cls)[1]


def schema_check(cls: type) -> None:
    """Check at registration that every field of ``cls`` has a supported type (TypeError)."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass")
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} must be @dataclass(frozen=True, slots=True)")
    if not isinstance(getattr(cls, "TYPE", None), str):
        raise TypeError(f"{cls.__name__} has no TYPE tag")
    _compile(cls)
    _caps(cls)


def encode_body_parts(message: object) -> tuple[BodyParts, int]:
    """The body of ``message`` as pieces to join (tensors not yet copied) and its length.

    Raises ``MalformedMessage`` if a field has the wrong type.
    """
    writer = _Writer()
    enc, _ = _compile(type(message))
    try:
        packed = msgpack.packb(enc(message, writer), use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:
        if isinstance(exc, MalformedMessage):
            raise
        raise MalformedMessage(f"cannot encode {type(message).__name__}: {exc}") from exc
    pad = (-(_PREFIX.size + len(packed))) % TENSOR_ALIGN if writer.segments else 0
    parts: BodyParts = [_PREFIX.pack(len(packed), pad), packed]
    if pad:
        parts.append(bytes(pad))
    end = 0
    for segment in writer.segments:
        gap = _next_offset(end, segment.nbytes) - end
        if gap:
            parts.append(bytes(gap))
        parts.append(segment)
        end += gap + segment.nbytes
    return parts, _PREFIX.size + len(packed) + pad + end


def encode_body(message: object) -> bytes:
    """Encode a message dataclass to body bytes. ``MalformedMessage`` on wrong field types."""
    parts, _ = encode_body_parts(message)
    return b"".join(parts)


def decode_body_as(cls: type, data: Buffer) -> Any:
    """Decode body bytes as an instance of ``cls``.

    Raises ``MessageTooLarge`` above the type's msgpack cap, else only ``MalformedMessage``.
    """
    try:
        view = memoryview(data).cast("B")
    except (TypeError, ValueError) as exc:
        raise MalformedMessage("body is not a contiguous byte buffer") from exc
    if view.nbytes < _PREFIX.size:
        raise MalformedMessage("body is truncated")
    size, pad = _PREFIX.unpack_from(view, 0)
    start = _PREFIX.size + size
    if pad >= TENSOR_ALIGN or start + pad > view.nbytes:
        raise MalformedMessage("body length fields do not match its size")
    cap = msgpack_cap(cls)
    if size > cap:
        raise MessageTooLarge(f"{cls.__name__} body has {size} msgpack bytes, its cap {cap}")
    try:
        obj = msgpack.unpackb(
            view[_PREFIX.size : start],
            raw=False,
            use_list=True,
            strict_map_key=False,
            object_pairs_hook=_Pairs,
        )
    except Exception as exc:  # msgpack raises many kinds for hostile input
        raise MalformedMessage(f"body does not decode: {type(exc).__name__}") from exc
    reader = _Reader(view[start + pad :], not view.readonly)
    _, dec = _compile(cls)
    try:
        message = dec(obj, reader)
    except MalformedMessage:
        raise
    except (ValueError, TypeError, OverflowError, RuntimeError) as exc:
        raise MalformedMessage(f"bad {cls.__name__} body: {exc}") from exc
    if reader.end != reader.region.nbytes:
        raise MalformedMessage("body has trailing bytes")
    return message


def decode_body(type_tag: str, data: Buffer, registry: Mapping[str, type]) -> Any:
    """Decode body bytes of the message type ``type_tag`` of ``registry`` (tag -> class).

    Raises ``UnknownMessageType`` for a tag outside the registry, ``MalformedMessage`` otherwise.
    """
    cls = registry.get(type_tag)
    if cls is None:
        raise UnknownMessageType(f"unknown message type {type_tag!r}")
    return decode_body_as(cls, data)
