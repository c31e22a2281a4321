"""Exact sampler of the discrete Gaussian over the integers (Canonne, Kamath, Steinke 2020).

Draws X with P[X = x] proportional to exp(-x**2 / (2 sigma**2)) for integer x, exactly: the
algorithms of the paper (Bernoulli(exp(-gamma)) by Algorithm 1, discrete Laplace by rejection,
then discrete Gaussian by rejection) run on integers and rationals only, with uniform random
bits from an injected source. It serves noise added directly in the fixed-point ring of
secure aggregation (distributed DP), where floating-point noise would not fit.

Vectorized with numpy: each step of the algorithms runs on a whole batch of candidates at
once, in int64 where the integers provably fit, otherwise in Python integers (object arrays).
Uniform integers below m come from 64-bit words by modular rejection, which is exact.
"""

from __future__ import annotations

import math
import numbers
import secrets
from fractions import Fraction
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch

from dp._checks import check_int
from floor.errors import AccountingError

__all__ = [
    "RandomBits",
    "discrete_gaussian_tensor",
    "random_words",
    "sample_discrete_gaussian",
    "system_random",
]

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
AnyIntArray = npt.NDArray[np.int64] | npt.NDArray[np.object_]

_FAST = 2**62  # int64 arithmetic is used only while every operand stays below this bound
_MAX_SIGMA_SQUARED = 2**60  # keeps samples (tens of sigma) far inside int64


class RandomBits(Protocol):
    """A source of uniform random bits, like ``random.Random`` or ``secrets.SystemRandom``."""

    def getrandbits(self, k: int, /) -> int:
        """Return a uniform integer in [0, 2**k)."""
        ...


def system_random() -> RandomBits:
    """The production source: the operating system's CSPRNG."""
    return secrets.SystemRandom()


def random_words(rng: RandomBits, n: int) -> npt.NDArray[np.uint64]:
    """``n`` uniform 64-bit words from ``rng``."""
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    randbytes = getattr(rng, "randbytes", None)
    # random.Random.randbytes(n) is getrandbits(8 n) in little-endian bytes (the same stream),
    # SystemRandom's is os.urandom: both skip the round trip through one huge integer.
    if callable(randbytes):
        raw = randbytes(8 * n)
    else:
        raw = rng.getrandbits(64 * n).to_bytes(8 * n, "little")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


def _uniform_below(m: AnyIntArray, rng: RandomBits) -> AnyIntArray:
    """Uniform integers in [0, m_i) for each positive m_i, by exact modular rejection."""
    n = len(m)
    if m.dtype != object:
        mu = m.astype(np.uint64)
        out = np.empty(n, dtype=np.int64)
        todo = np.arange(n)
        while todo.size:
            mm = mu[todo]
            u = random_words(rng, todo.size)
            r = (~mm + np.uint64(1)) % mm  # 2**64 mod m
            ok = u <= ~r  # u < 2**64 - r: the largest multiple of m below 2**64
            out[todo[ok]] = (u[ok] % mm[ok]).astype(np.int64)
            todo = todo[~ok]
        return out
    out_obj: npt.NDArray[np.object_] = np.empty(n, dtype=object)
    todo = np.arange(n)
    while todo.size:
        mo = m[todo]
        nwords = max(int(x).bit_length() for x in mo) // 64 + 2
        modulus = 1 << (64 * nwords)
        uo: npt.NDArray[np.object_] = np.zeros(todo.size, dtype=object)
        for i in range(nwords):
            uo = uo | (random_words(rng, todo.size).astype(object) << (64 * i))
        ok = np.asarray(uo < modulus - modulus % mo, dtype=bool)
        out_obj[todo[ok]] = uo[ok] % mo[ok]
        todo = todo[~ok]
    return out_obj


def _times(den: AnyIntArray, k: IntArray) -> AnyIntArray:
    """``den * k``, in int64 when it provably fits, otherwise in Python integers."""
    if den.dtype != object and den.size and int(den.max()) * int(k.max()) < _FAST:
        return np.asarray(den * k, dtype=np.int64)
    return np.asarray(den.astype(object) * k.astype(object), dtype=object)


_MARGIN = 2.0**-40  # far above the float error of the fast comparison (see _bernoulli)


def _bernoulli(num: AnyIntArray, den: AnyIntArray, rng: RandomBits) -> BoolArray:
    """Bernoulli(num_i / den_i), exactly (0 <= num_i <= den_i).

    Compares a uniform U in [0, 1) with p = num / den, revealing U's bits lazily: the first 64
    give ``U in [w, w + 1) / 2^64``, and in float64 (``a = w / 2^64`` within 2^-53 of it, ``p``
    within 2^-51) the comparison is decided whenever ``|a - p| > 2^-40``, that is except with
    probability about 2^-39. The undecided ones are settled exactly in integers: with ``V``
    the rest of U, ``U < p`` iff ``V < r / den`` for ``r = num 2^64 - w den``, a fresh
    Bernoulli(r / den) (or certain when r <= 0 or r >= den).
    """
    n = len(num)
    if n == 0:
        return np.zeros(0, dtype=bool)
    w = random_words(rng, n)
    a = w.astype(np.float64) * 2.0**-64
    p = num.astype(np.float64) / den.astype(np.float64)
    out = a + _MARGIN < p
    unsure = np.nonzero(~out & (a - _MARGIN < p))[0]
    if unsure.size:
        r = num[unsure].astype(object) * (1 << 64) - w[unsure].astype(object) * den[unsure]
        d = den[unsure].astype(object)
        certain = np.asarray(r >= d, dtype=bool)
        maybe = np.nonzero(np.asarray(r > 0, dtype=bool) & ~certain)[0]
        decided = certain.copy()
        if maybe.size:
            draw = _uniform_below(np.asarray(d[maybe], dtype=object), rng)
            decided[maybe] = np.asarray(draw < r[maybe], dtype=bool)
        out[unsure] = decided
    return out


def _bernoulli_exp_small(num: AnyIntArray, den: AnyIntArray, rng: RandomBits) -> BoolArray:
    """Bernoulli(exp(-num_i / den_i)) for num_i / den_i in [0, 1] (CKS20 Algorithm 1)."""
    n = len(num)
    result = np.zeros(n, dtype=bool)
    k = np.ones(n, dtype=np.int64)
    active = np.arange(n)
    while active.size:
        a = _bernoulli(num[active], _times(den[active], k[active]), rng)
        done = active[~a]
        result[done] = k[done] % 2 == 1
        active = active[a]
        k[active] += 1
    return result


def _bernoulli_exp(num: AnyIntArray, den: AnyIntArray, rng: RandomBits) -> BoolArray:
    """Bernoulli(exp(-num_i / den_i)) for any num_i / den_i >= 0 (CKS20 Algorithm 1, gamma > 1).

    exp(-gamma) = exp(-1) ** floor(gamma) * exp(-frac(gamma)): independent trials, all of which
    must succeed.
    """
    whole = num // den
    alive = _bernoulli_exp_small(num - whole * den, den, rng)
    ones = np.ones(len(num), dtype=np.int64)
    j = 0
    while True:
        idx = np.nonzero(alive & np.asarray(whole > j, dtype=bool))[0]
        if idx.size == 0:
            return alive
        alive[idx] = _bernoulli_exp_small(ones[idx], ones[idx], rng)
        j += 1


def _geometric_exp1(n: int, rng: RandomBits) -> IntArray:
    """Number of successes of Bernoulli(exp(-1)) before the first failure, ``n`` times."""
    v = np.zeros(n, dtype=np.int64)
    ones = np.ones(n, dtype=np.int64)
    active = np.arange(n)
    while active.size:
        b = _bernoulli_exp_small(ones[: active.size], ones[: active.size], rng)
        active = active[b]
        v[active] += 1
    return v


def _discrete_laplace(n: int, t: int, rng: RandomBits) -> IntArray:
    """``n`` samples with P[x] proportional to exp(-|x| / t) (CKS20 Algorithm 2)."""
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        m = n - filled
        tt = np.full(m, t, dtype=np.int64)
        u = np.asarray(_uniform_below(tt, rng), dtype=np.int64)
        u = u[_bernoulli_exp_small(u, tt, rng)]
        x = u + t * _geometric_exp1(u.size, rng)
        negative = _uniform_below(np.full(x.size, 2, dtype=np.int64), rng) == 1
        keep = ~(negative & (x == 0))
        z = np.where(negative, -x, x)[keep]
        out[filled : filled + z.size] = z
        filled += z.size
    return out


def _as_fraction(sigma_squared: object) -> Fraction:
    if isinstance(sigma_squared, bool) or not isinstance(sigma_squared, numbers.Rational | float):
        raise AccountingError(
            f"sigma_squared must be an int, Fraction or float, got {type(sigma_squared).__name__}"
        )
    if isinstance(sigma_squared, float):
        if not math.isfinite(sigma_squared):
            raise AccountingError(f"sigma_squared must be finite, got {sigma_squared}")
        # The shortest decimal form: 0.1 means 1/10, not the binary neighbour of 0.1.
        value = Fraction(repr(sigma_squared))
    else:
        value = Fraction(sigma_squared)
    if not 0 < value <= _MAX_SIGMA_SQUARED:
        raise AccountingError(f"sigma_squared must be in (0, 2**60], got {sigma_squared}")
    return value


def sample_discrete_gaussian(
    sigma_squared: int | float | Fraction, size: int, *, rng: RandomBits
) -> IntArray:
    """``size`` exact samples of the discrete Gaussian N_Z(0, sigma_squared) as int64.

    ``sigma_squared`` is taken as an exact rational (a float by its shortest decimal form).
    ``rng`` supplies the random bits: ``dp.system_random()`` in production, a seeded
    ``random.Random`` in simulation and tests.
    """
    s2 = _as_fraction(sigma_squared)
    size = check_int("size", size, minimum=0)
    if not callable(getattr(rng, "getrandbits", None)):
        raise AccountingError("rng must provide getrandbits(k), like secrets.SystemRandom()")
    a, b = s2.numerator, s2.denominator
    t = math.isqrt(a // b) + 1  # floor(sigma) + 1
    two_abtt = 2 * a * b * t * t
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        m = size - filled
        y = _discrete_laplace(m + m // 4 + 8, t, rng)
        abs_y = np.abs(y)
        # gamma = (|y| - sigma^2 / t)^2 / (2 sigma^2) = (|y| b t - a)^2 / (2 a b t^2)
        bound = int(abs_y.max()) * b * t + a
        num: AnyIntArray
        den: AnyIntArray
        if bound * bound < _FAST and two_abtt < _FAST:
            num = (abs_y * (b * t) - a) ** 2
            den = np.full(y.size, two_abtt, dtype=np.int64)
        else:
            num = (abs_y.astype(object) * (b * t) - a) ** 2
            den = np.full(y.size, two_abtt, dtype=object)
        accepted = y[_bernoulli_exp(num, den, rng)][:m]
        out[filled : filled + accepted.size] = accepted
        filled += accepted.size
    return out


def discrete_gaussian_tensor(
    shape: tuple[int, ...] | torch.Size, sigma_squared: int | float | Fraction, *, rng: RandomBits
) -> torch.Tensor:
    """An int64 tensor of exact discrete Gaussian N_Z(0, sigma_squared) samples."""
    count = math.prod(shape)
    samples = sample_discrete_gaussian(sigma_squared, count, rng=rng)
    return torch.from_numpy(samples).reshape(tuple(shape))
