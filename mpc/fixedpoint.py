"""Fixed-point encoding of float tensors into the rings Z_2^32 and Z_2^64.

Ring elements are stored in torch's signed integer dtypes (int32 / int64). Torch integer
addition wraps modulo 2^bits (two's complement; proved in tests/test_mpc_fixedpoint.py), so ring
arithmetic is plain tensor addition, and the signed reading of a sum is the true sum as long as
it fits in [-2^(bits-1), 2^(bits-1)). ``check_capacity`` guarantees that up front.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from floor.errors import ConfigError, RingOverflow

__all__ = [
    "Bits",
    "check_capacity",
    "decode",
    "encode",
    "encode_",
    "max_scale",
    "ring_add",
    "ring_add_",
    "ring_dtype",
    "ring_sub",
    "ring_sub_",
]

Bits = Literal[32, 64]

_DTYPES: dict[int, torch.dtype] = {32: torch.int32, 64: torch.int64}


def ring_dtype(bits: Bits) -> torch.dtype:
    """The torch dtype that holds elements of Z_2^bits: ``torch.int32`` or ``torch.int64``."""
    try:
        return _DTYPES[bits]
    except KeyError:
        raise ConfigError(f"bits must be 32 or 64, got {bits!r}") from None


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"scale must be a positive finite number, got {scale!r}")


def _to_ring(r: Tensor, *, scale: float, bits: Bits) -> Tensor:
    """Rounded float64 values ``r`` as ring elements; refuse NaN and values outside the ring."""
    limit = float(2 ** (bits - 1))
    lo_t, hi_t = torch.aminmax(r)  # one pass; NaN propagates into both
    lo, hi = float(lo_t), float(hi_t)
    if math.isnan(lo) or math.isnan(hi):
        raise ConfigError("cannot encode NaN")
    if hi >= limit or lo < -limit:
        worst = hi if abs(hi) >= abs(lo) else lo
        raise RingOverflow(
            f"value {worst / scale:.6g} at scale {scale:.6g} encodes to {worst:.6g}, outside the "
            f"signed range of Z_2^{bits} [-2^{bits - 1}, 2^{bits - 1})"
        )
    return r.to(ring_dtype(bits))


def encode(
    x: Tensor, *, scale: float, bits: Bits, generator: torch.Generator | None = None
) -> Tensor:
    """Encode a float tensor as ``round(x * scale)`` in Z_2^bits (signed representation).

    Without ``generator`` rounding is to nearest (ties to even). With a ``generator``, rounding is
    stochastic and unbiased: ``floor(y) + 1`` with probability ``y - floor(y)``; inject a
    seeded generator in simulation and a cryptographically seeded one in production.

    Raises ``ConfigError`` for NaN, and ``RingOverflow`` when a single value does not fit in
    the signed ring (use ``check_capacity`` to make sure that sums fit too).
    """
    dtype = ring_dtype(bits)
    _check_scale(scale)
    if x.is_complex() or not x.is_floating_point():
        raise ConfigError(f"encode expects a real floating-point tensor, got {x.dtype}")
    y = x.detach().to(torch.float64) * scale
    if y.numel() == 0:
        return torch.zeros(y.shape, dtype=dtype)
    if generator is None:
        r = torch.round(y)
    else:
        low = torch.floor(y)
        u = torch.rand(y.shape, generator=generator, dtype=torch.float64, device=y.device)
        r = low + (u < (y - low)).to(torch.float64)
    return _to_ring(r, scale=scale, bits=bits)


def encode_(x: Tensor, *, scale: float, bits: Bits) -> Tensor:
    """``encode(x, scale=scale, bits=bits)`` (round to nearest), using ``x`` as scratch space.

    ``x`` must be a contiguous float64 tensor the caller no longer needs: it is scaled and
    rounded in place (two passes and no temporary instead of ``encode``'s four), then converted.
    Same checks and same result as ``encode``.
    """
    dtype = ring_dtype(bits)
    _check_scale(scale)
    if x.dtype != torch.float64:
        raise ConfigError(f"encode_ works in place on float64, got {x.dtype}")
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=dtype)
    x.mul_(scale).round_()
    return _to_ring(x, scale=scale, bits=bits)


def decode(v: Tensor, *, scale: float, bits: Bits) -> Tensor:
    """Decode ring elements to float64 ``v / scale``, reading each element as signed.

    Exact for integers up to 2^53 in magnitude (the float64 mantissa); a sum of encodings
    decodes to the sum of the rounded inputs.
    """
    dtype = ring_dtype(bits)
    _check_scale(scale)
    if v.dtype != dtype:
        raise ConfigError(f"decode(bits={bits}) expects {dtype}, got {v.dtype}")
    return v.to(torch.float64).div_(scale)


def check_capacity(*, bound: float, members: int, scale: float, bits: Bits) -> None:
    """Refuse with ``RingOverflow`` if ``members`` values with ``|x| <= bound`` could overflow.

    Each encoded value is at most ``ceil(bound * scale)`` in magnitude (either rounding mode);
    the sum of ``members`` of them must fit in the signed range ``|s| <= 2^(bits-1) - 1``.
    """
    ring_dtype(bits)
    _check_scale(scale)
    if not (math.isfinite(bound) and bound >= 0):
        raise ConfigError(f"bound must be a non-negative finite number, got {bound!r}")
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ConfigError(f"members must be a positive integer, got {members!r}")
    per_member = math.ceil(bound * scale)
    worst = members * per_member
    capacity = 2 ** (bits - 1) - 1
    if worst > capacity:
        hint = ", or bits=64" if bits == 32 else ""
        raise RingOverflow(
            f"{members} members with |x| <= {bound:.6g} at scale {scale:.6g} can sum to "
            f"{worst} (= {members} x {per_member}) in magnitude, but Z_2^{bits} holds signed "
            f"values up to {capacity}; use a scale <= "
            f"{max_scale(bound=bound, members=members, bits=bits):.6g} or a smaller bound{hint}"
        )


def max_scale(*, bound: float, members: int, bits: Bits) -> float:
    """The largest power-of-two scale for which ``check_capacity`` accepts these arguments."""
    ring_dtype(bits)
    if not (math.isfinite(bound) and bound > 0):
        raise ConfigError(f"bound must be a positive finite number, got {bound!r}")
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ConfigError(f"members must be a positive integer, got {members!r}")
    capacity = 2 ** (bits - 1) - 1
    if members > capacity:
        raise RingOverflow(f"{members} members cannot all contribute 1 to Z_2^{bits}")
    estimate = capacity / members / bound
    if not math.isfinite(estimate):
        exp = 1023
    elif estimate > 0:
        exp = min(1023, math.floor(math.log2(estimate)) + 1)
    else:
        exp = -1074
    while exp > -1074 and members * math.ceil(bound * 2.0**exp) > capacity:
        exp -= 1
    return 2.0**exp


def _check_ring_pair(a: Tensor, b: Tensor) -> None:
    if a.dtype not in (torch.int32, torch.int64) or a.dtype != b.dtype:
        raise ConfigError(
            f"ring operands must both be int32 or both int64, got {a.dtype}, {b.dtype}"
        )


def ring_add(a: Tensor, b: Tensor) -> Tensor:
    """``a + b`` in Z_2^bits (wraps modulo 2^bits)."""
    _check_ring_pair(a, b)
    return a + b


def ring_sub(a: Tensor, b: Tensor) -> Tensor:
    """``a - b`` in Z_2^bits (wraps modulo 2^bits)."""
    _check_ring_pair(a, b)
    return a - b


def _ring_views(acc: Tensor, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    _check_ring_pair(acc, x)
    if acc.shape != x.shape:
        raise ConfigError(f"ring operands must have one shape, got {acc.shape} and {x.shape}")
    if acc.device.type != "cpu" or x.device.type != "cpu" or not acc.is_contiguous():
        raise ConfigError("in-place ring operands must be CPU tensors, the target contiguous")
    return acc.numpy(), x.numpy()


def ring_add_(acc: Tensor, x: Tensor) -> Tensor:
    """``acc += x`` in Z_2^bits, in place; returns ``acc``.

    Runs through numpy views of the same memory: torch's int64 ``add_`` is ~4x slower than
    numpy's on this CPU (both wrap modulo 2^bits). Use it to accumulate chunk sums.
    """
    a, b = _ring_views(acc, x)
    np.add(a, b, out=a)
    return acc


def ring_sub_(acc: Tensor, x: Tensor) -> Tensor:
    """``acc -= x`` in Z_2^bits, in place; returns ``acc`` (see ``ring_add_``)."""
    a, b = _ring_views(acc, x)
    np.subtract(a, b, out=a)
    return acc
