"""mpc.fixedpoint: encoding, decoding, capacity checks, and torch's integer wraparound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from floor.errors import ConfigError, RingOverflow
from mpc import fixedpoint as fp

BITS = st.sampled_from([32, 64])
SCALES = st.sampled_from([1.0, 2.0**8, 2.0**16, 1000.0, 2.0**20])


# --- torch integer arithmetic wraps modulo 2^bits (the ring relies on it) -------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_torch_integer_addition_wraps_twos_complement(dtype: torch.dtype) -> None:
    info = torch.iinfo(dtype)
    top = torch.tensor([info.max, info.max, info.min, -1], dtype=dtype)
    one = torch.tensor([1, info.max, -1, info.min], dtype=dtype)
    expected = [info.min, -2, info.max, info.max]  # exact results modulo 2^bits, read signed
    assert (top + one).tolist() == expected
    acc = top.clone()
    acc.add_(one)
    assert acc.tolist() == expected
    assert (acc - one).tolist() == top.tolist()
    acc.sub_(one)
    assert acc.tolist() == top.tolist()
    # a reduction over many elements wraps too
    many = torch.full((1000,), info.max, dtype=dtype)
    bits = 32 if dtype == torch.int32 else 64
    want = (1000 * info.max) % 2**bits
    want -= 2**bits if want >= 2 ** (bits - 1) else 0
    assert int(many.sum(dtype=dtype)) == want


@settings(max_examples=200, deadline=None)
@given(
    bits=BITS,
    a=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=20),
    b=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=20),
)
def test_ring_add_and_sub_agree_with_python_modular_arithmetic(
    bits: int, a: list[int], b: list[int]
) -> None:
    n = min(len(a), len(b))
    mod = 2**bits

    def signed(v: int) -> int:
        v %= mod
        return v - mod if v >= mod // 2 else v

    dtype = fp.ring_dtype(bits)  # type: ignore[arg-type]
    ta = torch.tensor([signed(v) for v in a[:n]], dtype=dtype)
    tb = torch.tensor([signed(v) for v in b[:n]], dtype=dtype)
    assert fp.ring_add(ta, tb).tolist() == [signed(x + y) for x, y in zip(a, b, strict=False)]
    assert fp.ring_sub(ta, tb).tolist() == [signed(x - y) for x, y in zip(a, b, strict=False)]
    acc = ta.clone()
    assert fp.ring_add_(acc, tb) is acc
    assert acc.tolist() == [signed(x + y) for x, y in zip(a, b, strict=False)]
    fp.ring_sub_(acc, tb)
    fp.ring_sub_(acc, tb)
    assert acc.tolist() == [signed(x - y) for x, y in zip(a, b, strict=False)]


def test_in_place_ring_ops_accept_strided_sources_and_refuse_bad_targets() -> None:
    acc = torch.zeros(3, dtype=torch.int64)
    src = torch.arange(6, dtype=torch.int64)[::2]
    fp.ring_add_(acc, src)
    assert acc.tolist() == [0, 2, 4]
    with pytest.raises(ConfigError):
        fp.ring_add_(torch.zeros(4, dtype=torch.int64)[::2], src)
    with pytest.raises(ConfigError):
        fp.ring_add_(torch.zeros(2, dtype=torch.int64), src)
    with pytest.raises(ConfigError):
        fp.ring_sub_(acc, src.to(torch.int32))


def test_ring_ops_refuse_mixed_or_float_dtypes() -> None:
    with pytest.raises(ConfigError):
        fp.ring_add(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ConfigError):
        fp.ring_sub(torch.zeros(2), torch.zeros(2))


# --- encode / decode -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    bits=BITS,
    scale=SCALES,
    xs=st.lists(st.floats(-1000, 1000, allow_nan=False), min_size=1, max_size=30),
)
def test_decode_of_encode_is_within_half_a_step(bits: int, scale: float, xs: list[float]) -> None:
    x = torch.tensor(xs, dtype=torch.float64)
    if bits == 32 and scale * 1000 >= 2**31:
        return  # does not fit; covered by the overflow tests
    v = fp.encode(x, scale=scale, bits=bits)  # type: ignore[arg-type]
    assert v.dtype == fp.ring_dtype(bits)  # type: ignore[arg-type]
    y = fp.decode(v, scale=scale, bits=bits)  # type: ignore[arg-type]
    assert y.dtype == torch.float64
    assert float((y - x).abs().max()) <= 0.5 / scale + 1e-12


@settings(max_examples=150, deadline=None)
@given(
    bits=BITS,
    k=st.integers(1, 16),
    seed=st.integers(0, 2**32),
    n=st.integers(1, 40),
    stochastic=st.booleans(),
)
def test_sum_of_encodings_decodes_to_the_sum(
    bits: int, k: int, seed: int, n: int, stochastic: bool
) -> None:
    bound, scale = 100.0, 2.0**16
    fp.check_capacity(bound=bound, members=k, scale=scale, bits=bits)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    xs = [(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * bound for _ in range(k)]
    gen = torch.Generator().manual_seed(seed + 1) if stochastic else None
    encoded = [fp.encode(x, scale=scale, bits=bits, generator=gen) for x in xs]  # type: ignore[arg-type]
    total = encoded[0].clone()
    for e in encoded[1:]:
        total = fp.ring_add(total, e)
    got = fp.decode(total, scale=scale, bits=bits)  # type: ignore[arg-type]
    step = (1.0 if stochastic else 0.5) / scale
    assert float((got - sum(xs)).abs().max()) <= k * step + 1e-9
    # exactly the sum of the individually decoded values (power-of-two scale, small integers)
    assert torch.equal(got, sum(fp.decode(e, scale=scale, bits=bits) for e in encoded))  # type: ignore[arg-type]


def test_negative_values_use_twos_complement_and_wrap_back() -> None:
    v = fp.encode(torch.tensor([-1.5, -0.25, 3.0]), scale=4.0, bits=32)
    assert v.tolist() == [-6, -1, 12]
    # an intermediate sum may leave the signed range; the final sum still decodes right
    big = torch.tensor([2**31 - 10], dtype=torch.int32)
    wrapped = fp.ring_add(fp.ring_add(big, big), -big)
    assert wrapped.tolist() == big.tolist()


def test_deterministic_rounding_is_to_nearest() -> None:
    v = fp.encode(torch.tensor([0.49, 0.51, -0.51, 2.5]), scale=1.0, bits=64)
    assert v.tolist() == [0, 1, -1, 2]  # ties to even


def test_stochastic_rounding_is_unbiased_and_reproducible() -> None:
    x = torch.full((20000,), 0.3, dtype=torch.float64)
    a = fp.encode(x, scale=1.0, bits=32, generator=torch.Generator().manual_seed(7))
    b = fp.encode(x, scale=1.0, bits=32, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {0, 1}
    # mean 0.3, std of the mean sqrt(0.21 / 20000) ~ 0.0032: 5 sigma is 0.016
    assert abs(float(a.double().mean()) - 0.3) < 0.016
    c = fp.encode(x, scale=1.0, bits=32, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a, c)


def test_exact_values_are_not_perturbed_by_stochastic_rounding() -> None:
    x = torch.tensor([1.0, -2.0, 0.0, 0.5])
    v = fp.encode(x, scale=2.0, bits=32, generator=torch.Generator().manual_seed(1))
    assert v.tolist() == [2, -4, 0, 1]


def test_encode_keeps_shape_and_accepts_float32() -> None:
    x = torch.linspace(-1, 1, 12, dtype=torch.float32).reshape(3, 4)
    v = fp.encode(x, scale=2.0**10, bits=32)
    assert v.shape == (3, 4)
    assert torch.allclose(fp.decode(v, scale=2.0**10, bits=32), x.double(), atol=2**-11)
    assert fp.encode(torch.zeros(0), scale=1.0, bits=64).shape == (0,)


@pytest.mark.parametrize("bits", [32, 64])
def test_a_value_outside_the_ring_is_refused(bits: int) -> None:
    limit = 2.0 ** (bits - 1)
    fp.encode(torch.tensor([-limit], dtype=torch.float64), scale=1.0, bits=bits)  # type: ignore[arg-type]
    with pytest.raises(RingOverflow, match=f"Z_2\\^{bits}"):
        fp.encode(torch.tensor([limit], dtype=torch.float64), scale=1.0, bits=bits)  # type: ignore[arg-type]
    with pytest.raises(RingOverflow):
        fp.encode(torch.tensor([1.0, float("-inf")]), scale=1.0, bits=bits)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "call",
    [
        lambda: fp.encode(torch.tensor([float("nan")]), scale=1.0, bits=32),
        lambda: fp.encode(
            torch.tensor([1.0, float("nan")]), scale=1.0, bits=64, generator=torch.Generator()
        ),
        lambda: fp.encode(torch.tensor([1]), scale=1.0, bits=32),
        lambda: fp.encode(torch.tensor([1.0]), scale=0.0, bits=32),
        lambda: fp.encode(torch.tensor([1.0]), scale=float("inf"), bits=32),
        lambda: fp.encode(torch.tensor([1.0]), scale=1.0, bits=16),
        lambda: fp.decode(torch.tensor([1], dtype=torch.int64), scale=1.0, bits=32),
        lambda: fp.check_capacity(bound=-1.0, members=2, scale=1.0, bits=32),
        lambda: fp.check_capacity(bound=1.0, members=0, scale=1.0, bits=32),
        lambda: fp.check_capacity(bound=1.0, members=True, scale=1.0, bits=32),
        lambda: fp.ring_dtype(8),
    ],
)
def test_bad_arguments_are_refused(call: object) -> None:
    with pytest.raises(ConfigError):
        call()  # type: ignore[operator]


# --- capacity ------------------------------------------------------------------------------


def test_check_capacity_message_names_the_numbers() -> None:
    with pytest.raises(RingOverflow) as info:
        fp.check_capacity(bound=1000.0, members=16, scale=2.0**20, bits=32)
    text = str(info.value)
    for needle in ("16 members", "1000", "Z_2^32", str(2**31 - 1), str(16 * 1000 * 2**20)):
        assert needle in text, needle
    assert isinstance(info.value, OverflowError)


@pytest.mark.parametrize("bits", [32, 64])
def test_check_capacity_boundary(bits: int) -> None:
    per = 2.0 ** (bits - 5)  # exact in float64: 16 members reach 2^(bits-1), one past the top
    fp.check_capacity(bound=per, members=15, scale=1.0, bits=bits)  # type: ignore[arg-type]
    with pytest.raises(RingOverflow):
        fp.check_capacity(bound=per, members=16, scale=1.0, bits=bits)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    bits=BITS,
    members=st.integers(1, 1000),
    bound=st.floats(1e-3, 1e6),
    scale_exp=st.integers(-4, 60),
    stochastic=st.booleans(),
)
def test_accepted_capacity_never_overflows(
    bits: int, members: int, bound: float, scale_exp: int, stochastic: bool
) -> None:
    """Whenever check_capacity accepts, ``members`` worst-case values sum without wrapping."""
    scale = 2.0**scale_exp
    try:
        fp.check_capacity(bound=bound, members=members, scale=scale, bits=bits)  # type: ignore[arg-type]
    except RingOverflow:
        assert members * math.ceil(bound * scale) > 2 ** (bits - 1) - 1
        return
    gen = torch.Generator().manual_seed(members) if stochastic else None
    for sign in (1.0, -1.0):
        v = fp.encode(
            torch.tensor([sign * bound], dtype=torch.float64),
            scale=scale,
            bits=bits,  # type: ignore[arg-type]
            generator=gen,
        )
        python_sum = members * int(v.item())
        assert abs(python_sum) <= 2 ** (bits - 1) - 1
        ring_sum = int(v.repeat(members).sum(dtype=v.dtype))
        assert ring_sum == python_sum


@settings(max_examples=100, deadline=None)
@given(bits=BITS, members=st.integers(1, 10**4), bound=st.floats(1e-3, 1e6))
def test_max_scale_is_accepted_and_tight(bits: int, members: int, bound: float) -> None:
    scale = fp.max_scale(bound=bound, members=members, bits=bits)  # type: ignore[arg-type]
    fp.check_capacity(bound=bound, members=members, scale=scale, bits=bits)  # type: ignore[arg-type]
    with pytest.raises(RingOverflow):
        fp.check_capacity(bound=bound, members=members, scale=2 * scale, bits=bits)  # type: ignore[arg-type]


def test_encode_in_place_matches_encode() -> None:
    gen = torch.Generator().manual_seed(3)
    for bits in (32, 64):
        x = torch.randn(1001, generator=gen, dtype=torch.float64) * 100
        x[::7] += 0.5  # ties: both round half to even
        scale = 2.0**12
        expected = fp.encode(x, scale=scale, bits=bits)
        got = fp.encode_(x.clone(), scale=scale, bits=bits)
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    with pytest.raises(ConfigError):
        fp.encode_(torch.zeros(3, dtype=torch.float32), scale=2.0, bits=32)
    with pytest.raises(ConfigError):
        fp.encode_(torch.tensor([1.0, float("nan")], dtype=torch.float64), scale=2.0, bits=32)
    with pytest.raises(RingOverflow):
        fp.encode_(torch.tensor([1e9], dtype=torch.float64), scale=4.0, bits=32)
    assert fp.encode_(torch.zeros(0, dtype=torch.float64), scale=2.0, bits=64).numel() == 0
