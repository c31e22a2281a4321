"""The simulated peers' wire registry, and message sizes.

Simulated peers run the daemon's machines and so send the daemon's own messages (``mpc``'s and
``gossip.messages``'); ``wire`` fidelity encodes them for real with this registry.

``wire_size`` is the exact size in bytes of a message's authenticated envelope, computed without
copying a tensor or running any cryptography: the body length from ``floor.codec``'s own
``encode_body_parts`` (msgpack of the small fields; tensors are only measured) plus the
envelope framing, header and tags as ``floor.envelope`` lays them out. Both fidelity levels count
bytes with it (``wire`` also checks it against the real encoding in the tests).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgpack
from torch import Tensor

from floor.codec import TENSOR_ALIGN, encode_body_parts
from floor.envelope import Auth
from floor.identity import PeerId
from floor.messages import build_registry
from gossip.messages import MESSAGE_TYPES as GOSSIP_MESSAGE_TYPES

__all__ = [
    "auth_for",
    "registry",
    "wire_size",
]


def registry() -> Mapping[str, type]:
    """Tag -> class for every message a simulated peer may receive (the training world's)."""
    return build_registry(GOSSIP_MESSAGE_TYPES.values())


_AUTH: dict[type, Auth] = {}


def auth_for(message: object) -> Auth:
    """How the daemon authenticates ``message`` (as ``gossip.network.auth_for``): sealed unless
    its class says ``SECRET = False``, then a MAC."""
    cls = type(message)
    auth = _AUTH.get(cls)
    if auth is None:
        auth = _AUTH[cls] = Auth.SEALED if getattr(cls, "SECRET", True) else Auth.MAC
    return auth


_PREFIX_BYTES = 12
_DOOR_BYTES = 16
_TAG_BYTES = {Auth.SIGNED: 64, Auth.SEALED: 16, Auth.MAC: 16}
_HEADERS: dict[tuple[str, bool], int] = {}


def _header_bytes(tag: str, recipient: bool) -> int:
    key = (tag, recipient)
    size = _HEADERS.get(key)
    if size is None:
        fields: list[Any] = [tag, bytes(32), bytes(32) if recipient else None, 0.0, bytes(24), b""]
        size = _HEADERS[key] = len(msgpack.packb(fields, use_bin_type=True))
    return size


class _NoKey(Exception):
    pass


_GETTERS: dict[type, Callable[[Any], tuple[Any, ...]]] = {}
_SIZES: dict[tuple[Any, ...], int] = {}
_MAX_CACHED = 100_000


def _getter(cls: type) -> Callable[[Any], tuple[Any, ...]]:
    """A C-level getter of all of ``cls``'s field values, as a tuple."""
    names = tuple(f.name for f in dataclasses.fields(cls))
    if not names:
        return lambda _: ()
    if len(names) == 1:
        name = names[0]
        return lambda message: (getattr(message, name),)
    return operator.attrgetter(*names)


def _bins(values: Iterable[Any]) -> int:
    """The msgpack length of ``values`` if all are ``bytes`` (bin 8/16/32), else -1."""
    total = 0
    for v in values:
        if type(v) is not bytes:
            return -1
        n = len(v)
        total += n + (2 if n < 256 else 3 if n < 65536 else 5)
    return total


def _shape(value: Any) -> Any:
    """What of ``value`` decides its encoded length (msgpack sizes depend on ints' values)."""
    t = type(value)
    if t is int or t is bool:
        return (t, value)
    if t is bytes:
        return len(value)
    if t is float:
        return "f"
    if value is None:
        return "n"
    if isinstance(value, Tensor):
        return (value.dtype, tuple(value.shape))
    if t is PeerId:
        return "p"
    if t is str:
        return ("s", len(value.encode()))
    if t is tuple:
        packed = _bins(value)  # a tuple of bytes: the count and the items' total decide
        if packed >= 0:
            return ("tb", len(value), packed)
        return ("t", *(_shape(v) for v in value))
    if t is dict:
        keys, values = _bins(value.keys()), _bins(value.values())
        if keys >= 0 and values >= 0:  # bytes -> bytes: the count and the items' total decide
            return ("db", len(value), keys + values)
        return ("d", *sorted((repr(_shape(k)), repr(_shape(v))) for k, v in value.items()))
    raise _NoKey


def wire_size(message: object, auth: Auth = Auth.MAC, *, recipient: bool = True) -> int:
    """The exact length of ``message``'s envelope as ``floor.envelope.EnvelopeCodec`` encodes it.

    Cached on what decides the length (field types, byte and tuple lengths, tensor shapes,
    integer values), so most calls cost a few attribute reads instead of a msgpack encoding.
    """
    cls = type(message)
    getter = _GETTERS.get(cls)
    if getter is None:
        getter = _GETTERS[cls] = _getter(cls)
    values = getter(message)
    # The field types come first, so each field's parts below are unambiguous: bytes and
    # ints one part, a tensor two (dtype, shape), float and None none, anything else one.
    parts: list[Any] = [cls, auth, recipient, *map(type, values)]
    key: tuple[Any, ...] | None
    try:
        for v in values:
            t = type(v)
            if t is bytes:
                parts.append(len(v))
            elif t is int or t is bool:
                parts.append(v)
            elif t is Tensor:
                parts.append(v.dtype)
                parts.append(v.shape)
            elif t is not float and v is not None:
                parts.append(_shape(v))
        key = tuple(parts)
    except _NoKey:
        key = None
    if key is not None:
        size = _SIZES.get(key)
        if size is not None:
            return size
    size = _wire_size(message, auth, recipient)
    if key is not None and len(_SIZES) < _MAX_CACHED:
        _SIZES[key] = size
    return size


def _wire_size(message: object, auth: Auth, recipient: bool) -> int:
    parts, body = encode_body_parts(message)
    tag_len = _TAG_BYTES[Auth(auth)]
    header = _header_bytes(type(message).TYPE, recipient)  # type: ignore[attr-defined]
    if len(parts) > 2:  # tensors: the codec pads the header so the body is aligned
        header += (-(_PREFIX_BYTES + header + tag_len + _DOOR_BYTES)) % TENSOR_ALIGN
    return _PREFIX_BYTES + header + tag_len + _DOOR_BYTES + body
