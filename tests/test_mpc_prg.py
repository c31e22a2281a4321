"""mpc.prg: known answers, seekability, mask accumulation, and uniformity of masks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from floor.errors import ConfigError
from mpc import kdf, prg

KAT = json.loads((Path(__file__).parent / "data" / "mpc_prg_kat.json").read_text())
ALPHA = 1e-6  # chi-square tests run on deterministic seeds; a bug gives p-values near 0


def _seed(i: int) -> bytes:
    return hashlib.sha256(b"test-seed" + i.to_bytes(4, "big")).digest()


@pytest.mark.parametrize("case", KAT["keystream"], ids=lambda c: f"{c['name']}@{c['offset_bytes']}")
def test_keystream_known_answers(case: dict[str, object]) -> None:
    expected = bytes.fromhex(str(case["keystream"]))
    seed = bytes.fromhex(str(case["seed"]))
    offset = int(str(case["offset_bytes"]))
    assert prg.keystream(seed, len(expected), offset_bytes=offset) == expected
    # the same bytes read as a slice of a longer stream from 0
    assert prg.keystream(seed, offset + len(expected))[offset:] == expected


@pytest.mark.parametrize(
    "case", KAT["mask"], ids=lambda c: f"{c['name']}-{c['bits']}@{c['offset']}"
)
def test_mask_known_answers(case: dict[str, object]) -> None:
    values = [int(v) for v in case["values"]]  # type: ignore[attr-defined]
    bits = int(str(case["bits"]))
    got = prg.mask(
        bytes.fromhex(str(case["seed"])), len(values), bits=bits, offset=int(str(case["offset"]))
    )  # type: ignore[arg-type]
    assert got.dtype == (torch.int32 if bits == 32 else torch.int64)
    assert got.tolist() == values


def test_every_seed_bit_changes_the_stream() -> None:
    base = _seed(1)
    ref = prg.keystream(base, 64)
    for bit in range(256):
        flipped = bytearray(base)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert prg.keystream(bytes(flipped), 64) != ref, bit


@settings(max_examples=150, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    offset=st.integers(0, 5000),
    length=st.integers(0, 700),
)
def test_keystream_is_seekable_at_any_byte(seed: bytes, offset: int, length: int) -> None:
    full = prg.keystream(seed, offset + length)
    assert prg.keystream(seed, length, offset_bytes=offset) == full[offset:]


@settings(max_examples=100, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    bits=st.sampled_from([32, 64]),
    offset=st.integers(0, 3000),
    length=st.integers(0, 500),
)
def test_mask_is_seekable_by_element(seed: bytes, bits: int, offset: int, length: int) -> None:
    full = prg.mask(seed, offset + length, bits=bits)  # type: ignore[arg-type]
    part = prg.mask(seed, length, bits=bits, offset=offset)  # type: ignore[arg-type]
    assert torch.equal(part, full[offset:])


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([32, 64]),
    offset=st.integers(0, 100),
    signs=st.lists(st.sampled_from([1, -1]), min_size=0, max_size=5),
    n=st.integers(0, 300),
)
def test_add_masks_equals_sum_of_masks(bits: int, offset: int, signs: list[int], n: int) -> None:
    dtype = torch.int32 if bits == 32 else torch.int64
    x = torch.arange(n, dtype=dtype) * 7919 - 1000
    expected = x.clone()
    seeds = [(_seed(i), s) for i, s in enumerate(signs)]
    for seed, sign in seeds:
        m = prg.mask(seed, n, bits=bits, offset=offset)  # type: ignore[arg-type]
        expected = expected + m if sign > 0 else expected - m
    acc = x.clone()
    out = prg.add_masks_(acc, seeds, offset=offset)
    assert out is acc
    assert torch.equal(acc, expected)


@pytest.mark.parametrize("bits", [32, 64])
def test_add_masks_across_chunk_boundaries(bits: int) -> None:
    dtype = torch.int32 if bits == 32 else torch.int64
    per_chunk = prg.CHUNK_BYTES // (bits // 8)
    n, offset = 2 * per_chunk + 123, 5
    seeds = [(_seed(1), 1), (_seed(2), -1), (_seed(3), 1)]
    acc = torch.zeros(n, dtype=dtype)
    prg.add_masks_(acc, seeds, offset=offset)
    expected = (
        prg.mask(_seed(1), n, bits=bits, offset=offset)  # type: ignore[arg-type]
        - prg.mask(_seed(2), n, bits=bits, offset=offset)  # type: ignore[arg-type]
        + prg.mask(_seed(3), n, bits=bits, offset=offset)  # type: ignore[arg-type]
    )
    assert torch.equal(acc, expected)
    # chunked removal (as a butterfly reducer does) cancels the masks exactly
    cut = per_chunk // 3
    prg.add_masks_(acc[:cut], [(s, -g) for s, g in seeds], offset=offset)
    prg.add_masks_(acc[cut:], [(s, -g) for s, g in seeds], offset=offset + cut)
    assert not acc.any()


def test_add_mask_plus_then_minus_is_identity_on_2d_tensor() -> None:
    x = torch.randint(-(2**31), 2**31 - 1, (17, 33), dtype=torch.int32)
    acc = x.clone()
    prg.add_mask_(acc, _seed(9), sign=1)
    assert not torch.equal(acc, x)
    prg.add_mask_(acc, _seed(9), sign=-1)
    assert torch.equal(acc, x)


def test_masked_leaves_input_alone() -> None:
    x = torch.zeros(10, dtype=torch.int64)
    y = prg.masked(x, [(_seed(1), 1)])
    assert not x.any()
    assert torch.equal(y, prg.mask(_seed(1), 10, bits=64))


def test_mask_tensor_is_writable_and_owns_its_memory() -> None:
    m = prg.mask(_seed(1), 8, bits=32)
    m.add_(1)  # a tensor over a non-writable buffer would have warned (warnings are errors)
    assert torch.equal(m - 1, prg.mask(_seed(1), 8, bits=32))


def test_new_seed_is_fresh() -> None:
    a, b = prg.new_seed(), prg.new_seed()
    assert len(a) == prg.SEED_BYTES == 32
    assert a != b


@pytest.mark.parametrize(
    "call",
    [
        lambda: prg.mask(b"short", 4, bits=32),
        lambda: prg.mask(_seed(0), -1, bits=32),
        lambda: prg.mask(_seed(0), 4, bits=32, offset=-1),
        lambda: prg.mask(_seed(0), 4, bits=16),  # type: ignore[arg-type]
        lambda: prg.keystream(_seed(0), 4, offset_bytes=-3),
        lambda: prg.add_mask_(torch.zeros(4), _seed(0)),
        lambda: prg.add_mask_(torch.zeros(4, 4, dtype=torch.int32).t(), _seed(0)),
        lambda: prg.add_mask_(torch.zeros(4, dtype=torch.int32), _seed(0), sign=2),
        lambda: prg.add_mask_(torch.zeros(4, dtype=torch.int32), _seed(0), sign=True),
        lambda: prg.add_mask_(torch.zeros(4, dtype=torch.int32), bytes(31)),
    ],
)
def test_bad_arguments_are_refused(call: object) -> None:
    with pytest.raises(ConfigError):
        call()  # type: ignore[operator]


def test_keystream_bytes_are_uniform_over_many_seeds() -> None:
    data = b"".join(prg.keystream(_seed(i), 1024, offset_bytes=i * 13) for i in range(256))
    counts = torch.bincount(torch.frombuffer(bytearray(data), dtype=torch.uint8), minlength=256)
    assert stats.chisquare(counts.numpy()).pvalue > ALPHA


@pytest.mark.parametrize("bits", [32, 64])
def test_masked_vector_is_indistinguishable_from_uniform(bits: int) -> None:
    """A constant, very non-uniform input plus one mask: every byte lane looks uniform."""
    dtype = torch.int32 if bits == 32 else torch.int64
    width = bits // 8
    x = torch.full((512,), 12345, dtype=dtype)
    rows = [prg.masked(x, [(_seed(i), 1)]) for i in range(200)]
    lanes = torch.stack(rows).view(torch.uint8).view(-1, width)
    for lane in range(width):
        counts = torch.bincount(lanes[:, lane].to(torch.int64), minlength=256)
        assert stats.chisquare(counts.numpy()).pvalue > ALPHA, lane
    # and the top 4 bits of the sum of two masked vectors (what a reducer sees) too
    summed = prg.masked(x, [(_seed(1000), 1)]) + prg.masked(x, [(_seed(1001), 1)])
    top = (summed >> (bits - 4)) & 0xF
    assert stats.chisquare(torch.bincount(top, minlength=16).numpy()).pvalue > ALPHA


def test_a_broken_mask_would_fail_the_uniformity_check() -> None:
    """The check has power: masks with a stuck bit are rejected."""
    rows = [prg.mask(_seed(i), 512, bits=32) & ~0x80 for i in range(200)]
    lanes = torch.stack(rows).view(torch.uint8).view(-1, 4)
    counts = torch.bincount(lanes[:, 0].to(torch.int64), minlength=256)
    assert stats.chisquare(counts.numpy()).pvalue < ALPHA


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 8),
    n=st.integers(1, 200),
    bits=st.sampled_from([32, 64]),
    data=st.data(),
)
def test_pairwise_masks_cancel_in_the_sum_and_chunk_by_chunk(
    k: int, n: int, bits: int, data: st.DataObject
) -> None:
    """Member u adds +PRG(s_uv) for v > u and -PRG(s_uv) for v < u: the group sum is exact."""
    dtype = torch.int32 if bits == 32 else torch.int64
    ids = [bytes([i]) * 32 for i in range(k)]
    secrets_ = {
        (u, v): hashlib.sha256(bytes([u, v])).digest() for u in range(k) for v in range(u + 1, k)
    }
    info = torch.iinfo(dtype)
    xs = [torch.randint(info.min, info.max, (n,), dtype=dtype) for _ in range(k)]
    self_seeds = [_seed(100 + u) for u in range(k)]
    masked_vectors = []
    for u in range(k):
        plan = [(self_seeds[u], 1)]
        for v in range(k):
            if v != u:
                lo, hi = min(u, v), max(u, v)
                seed = kdf.pair_seed(secrets_[lo, hi], round=1, group=b"g", a=ids[u], b=ids[v])
                plan.append((seed, 1 if v > u else -1))
        masked_vectors.append(prg.masked(xs[u], plan))
    total = torch.stack(masked_vectors).sum(0, dtype=dtype)
    expected = torch.stack(xs).sum(0, dtype=dtype)
    assert not torch.equal(total, expected)  # self masks are still in
    # remove the self masks chunk by chunk, as butterfly reducers do
    cut = data.draw(st.integers(0, n), label="cut")
    for lo, hi in ((0, cut), (cut, n)):
        prg.add_masks_(total[lo:hi], [(s, -1) for s in self_seeds], offset=lo)
    assert torch.equal(total, expected)
