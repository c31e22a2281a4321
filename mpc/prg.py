"""Mask PRG: a seekable AES-128-CTR keystream keyed by a 256-bit seed, read as ring elements.

Stream definition (the known-answer vectors in tests/data/mpc_prg_kat.json pin it down):
the 32-byte seed is split into an AES-128 key ``seed[:16]`` and a secret initial counter block
``c0 = int.from_bytes(seed[16:], "big")``; keystream block ``i`` is ``AES_key((c0 + i) mod 2^128)``
(16 bytes), and mask element ``i`` of a ``bits``-wide ring is keystream bytes
``[i*w, (i+1)*w)`` with ``w = bits // 8``, read little-endian as a two's-complement integer.
Every bit of the seed changes the stream. Seeking to any byte is a counter offset plus a
discard of ``offset % 16`` bytes, so a member that reduces one chunk never builds the whole mask.

Why AES-128-CTR: measured on this machine (one core, ``cryptography`` 50, OpenSSL with AES-NI)
AES-128-CTR gives ~12 GB/s, AES-256-CTR ~9 GB/s, ChaCha20 ~7.6 GB/s and libsodium's
``randombytes_buf_deterministic`` ~0.7 GB/s (bench/results/mpc_primitives.md). Masks need a
PRG, and 128-bit AES is the standard choice for SecAgg's PRG (Bonawitz et al. 2017).

Speed: ``add_masks_`` adds many masks into one accumulator, walking the accumulator in
L2-sized chunks so each chunk stays in cache while every seed's keystream is added to it; the
keystream is written by ``update_into`` into one reusable ``bytearray`` and added through numpy
views of the same memory (no copies, no allocation per mask; torch's int64 ``add_`` is ~4x slower
than numpy's on this CPU). ``mask`` returns a tensor made by ``torch.frombuffer`` over a fresh
``bytearray`` (writable, so no warning and no copy).
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

try:  # the same OpenSSL context without the public wrapper's per-call checks (~2x faster to make)
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    _new_context: Any = _rust_openssl.ciphers.create_encryption_ctx
except (ImportError, AttributeError):  # pragma: no cover - a cryptography without it
    _new_context = None
from torch import Tensor

from floor.errors import ConfigError
from mpc.fixedpoint import Bits, ring_dtype

__all__ = [
    "CHUNK_BYTES",
    "SEED_BYTES",
    "add_mask_",
    "add_masks_",
    "keystream",
    "keystream_into",
    "mask",
    "masked",
    "new_seed",
]

SEED_BYTES = 32
"""Length of a mask seed in bytes (256 bits)."""

CHUNK_BYTES = 256 * 1024
"""Keystream chunk size of ``add_masks_``: fits L2 next to the accumulator chunk (measured)."""

_BLOCK = 16
_ZEROS = bytes(CHUNK_BYTES)
_ZEROS_VIEW = memoryview(_ZEROS)

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("mpc.prg reads keystream bytes as little-endian integers in place")


def new_seed() -> bytes:
    """A fresh 256-bit mask seed from the OS CSPRNG."""
    return secrets.token_bytes(SEED_BYTES)


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise ConfigError(f"a mask seed must be {SEED_BYTES} bytes")


def _encryptor(seed: bytes, offset_bytes: int) -> CipherContext:
    """An AES-128-CTR encryptor positioned at byte ``offset_bytes`` of the stream of ``seed``."""
    _check_seed(seed)
    if isinstance(offset_bytes, bool) or not isinstance(offset_bytes, int) or offset_bytes < 0:
        raise ConfigError(f"offset must be a non-negative integer, got {offset_bytes!r}")
    block, skip = divmod(offset_bytes, _BLOCK)
    counter = (int.from_bytes(seed[16:], "big") + block) % (1 << 128)
    algorithm, mode = algorithms.AES(bytes(seed[:16])), modes.CTR(counter.to_bytes(16, "big"))
    ctx: CipherContext = (
        Cipher(algorithm, mode).encryptor()
        if _new_context is None
        else _new_context(algorithm, mode)
    )
    if skip:
        ctx.update(_ZEROS_VIEW[:skip])  # discard the head of a partial block
    return ctx


def keystream_into(seed: bytes, out: bytearray | memoryview, *, offset_bytes: int = 0) -> None:
    """Write keystream bytes ``[offset_bytes, offset_bytes + len(out))`` to ``out``."""
    ctx = _encryptor(seed, offset_bytes)
    view = memoryview(out).cast("B")
    for start in range(0, len(view), CHUNK_BYTES):
        part = view[start : start + CHUNK_BYTES]
        ctx.update_into(_ZEROS_VIEW[: len(part)], part)


def keystream(seed: bytes, nbytes: int, *, offset_bytes: int = 0) -> bytes:
    """Keystream bytes ``[offset_bytes, offset_bytes + nbytes)`` of ``seed`` (tests, benchmarks)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ConfigError(f"nbytes must be a non-negative integer, got {nbytes!r}")
    buf = bytearray(nbytes)
    keystream_into(seed, buf, offset_bytes=offset_bytes)
    return bytes(buf)


def mask(seed: bytes, length: int, *, bits: Bits, offset: int = 0) -> Tensor:
    """Elements ``[offset, offset + length)`` of the mask stream of ``seed`` in Z_2^bits.

    ``mask(seed, n, bits=b, offset=a)`` equals ``mask(seed, a + n, bits=b)[a:]`` exactly. The
    result is a 1-D int32/int64 tensor over a fresh ``bytearray`` (no copy).
    """
    dtype = ring_dtype(bits)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ConfigError(f"length must be a non-negative integer, got {length!r}")
    width = bits // 8
    start = _offset_bytes(offset, width)
    _check_seed(seed)
    if length == 0:
        return torch.zeros(0, dtype=dtype)
    buf = bytearray(length * width)
    keystream_into(seed, buf, offset_bytes=start)
    return torch.frombuffer(buf, dtype=dtype)


def _offset_bytes(offset: int, width: int) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ConfigError(f"offset must be a non-negative integer, got {offset!r}")
    return offset * width


def _check_acc(acc: Tensor) -> Tensor:
    if acc.dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"a mask accumulator must be int32 or int64, got {acc.dtype}")
    if acc.device.type != "cpu" or not acc.is_contiguous():
        raise ConfigError("a mask accumulator must be a contiguous CPU tensor")
    return acc.view(-1)


def add_masks_(acc: Tensor, masks: Iterable[tuple[bytes, int]], *, offset: int = 0) -> Tensor:
    """Add ``sign * mask(seed, acc.numel(), offset=offset)`` into ``acc`` for each ``(seed, sign)``.

    ``acc`` is a contiguous int32 (Z_2^32) or int64 (Z_2^64) CPU tensor, updated in place and
    returned; ``sign`` is +1 or -1. This is the fast path for building a masked input (self mask
    plus pairwise masks) and for removing a chunk's masks (``offset`` = the chunk's start).
    """
    flat = _check_acc(acc)
    _apply(flat.numpy(), None, _plan(masks, _offset_bytes(offset, flat.element_size())))
    return acc


def _plan(masks: Iterable[tuple[bytes, int]], start_bytes: int) -> list[tuple[CipherContext, bool]]:
    plan: list[tuple[CipherContext, bool]] = []
    for seed, sign in masks:
        if isinstance(sign, bool) or sign not in (1, -1):
            raise ConfigError(f"mask sign must be +1 or -1, got {sign!r}")
        plan.append((_encryptor(seed, start_bytes), sign > 0))
    return plan


def _apply(
    target_all: np.ndarray, base: np.ndarray | None, plan: list[tuple[CipherContext, bool]]
) -> None:
    """``target = (base if given else target) + sum(sign * keystream)``, one L2 chunk at a time.

    With ``base``, the first mask of each chunk is added to ``base`` straight into ``target``, so
    building a masked copy costs no separate copy pass over the input.
    """
    n = target_all.size
    if n == 0:
        return
    if not plan:
        if base is not None:
            np.copyto(target_all, base)
        return
    width = target_all.itemsize
    per_chunk = min(n, CHUNK_BYTES // width)
    buf = bytearray(per_chunk * width)
    view = memoryview(buf)
    # numpy views of the same memory: torch's int64 add_ is ~4x slower than numpy's here
    # (measured: 28 us vs 7 us per 256 KiB), int32 about the same; both wrap mod 2^bits.
    full = np.frombuffer(buf, dtype=target_all.dtype)
    for lo in range(0, n, per_chunk):
        m = min(n - lo, per_chunk)
        target = target_all[lo : lo + m]
        src, out = (full, view) if m == per_chunk else (full[:m], view[: m * width])
        zeros = _ZEROS_VIEW[: m * width]
        first = target if base is None else base[lo : lo + m]
        for ctx, plus in plan:
            ctx.update_into(zeros, out)
            if plus:
                np.add(first, src, out=target)
            else:
                np.subtract(first, src, out=target)
            first = target


def add_mask_(acc: Tensor, seed: bytes, *, sign: int = 1, offset: int = 0) -> Tensor:
    """Add ``sign * mask(seed, acc.numel(), offset=offset)`` into ``acc`` (see ``add_masks_``)."""
    return add_masks_(acc, ((seed, sign),), offset=offset)


def masked(x: Tensor, masks: Sequence[tuple[bytes, int]], *, offset: int = 0) -> Tensor:
    """A masked copy of the ring tensor ``x``: ``x + sum(sign * mask(seed))`` (``x`` unchanged)."""
    src = _check_acc(x.detach().contiguous())
    out = torch.empty_like(src)
    plan = _plan(masks, _offset_bytes(offset, src.element_size()))
    _apply(out.numpy(), src.numpy(), plan)
    return out.view(x.shape)
