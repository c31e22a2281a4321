"""mpc.shamir: any t shares recover the secret; t - 1 shares say nothing about it."""

from __future__ import annotations

import itertools
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from floor.errors import AggregationAborted, ConfigError, InconsistentMessage
from mpc import shamir
from mpc.shamir import PRIME, SHARE_BYTES, Share

ALPHA = 1e-6


@settings(max_examples=100, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    n=st.integers(1, 20),
    data=st.data(),
)
def test_any_threshold_shares_recover_the_secret(
    secret: bytes, n: int, data: st.DataObject
) -> None:
    t = data.draw(st.integers(1, n), label="threshold")
    shares = shamir.split(secret, threshold=t, n=n)
    assert [s.x for s in shares] == list(range(1, n + 1))
    assert all(len(s.y) == SHARE_BYTES for s in shares)
    subset = data.draw(st.permutations(shares), label="order")[: data.draw(st.integers(t, n))]
    assert shamir.combine(subset, threshold=t) == secret


def test_every_subset_of_size_t_recovers() -> None:
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, threshold=3, n=6)
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine(list(subset), threshold=3) == secret


def test_fewer_than_threshold_aborts() -> None:
    shares = shamir.split(bytes(32), threshold=4, n=6)
    with pytest.raises(AggregationAborted, match="3 shares, 4 needed"):
        shamir.combine(shares[:3], threshold=4)
    with pytest.raises(AggregationAborted):
        shamir.combine([], threshold=1)


def test_t_minus_one_shares_with_the_wrong_threshold_do_not_give_the_secret() -> None:
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, threshold=4, n=6)
    try:
        got = shamir.combine(shares[:3], threshold=3)
    except InconsistentMessage:
        return  # interpolated to a field element above 2^256: detected
    assert got != secret


def test_duplicate_x_is_inconsistent() -> None:
    shares = shamir.split(bytes(range(32)), threshold=2, n=3)
    with pytest.raises(InconsistentMessage, match="x = 1"):
        shamir.combine([shares[0], shares[1], shares[0]], threshold=2)
    forged = Share(1, shares[2].y)
    with pytest.raises(InconsistentMessage):
        shamir.combine([shares[0], forged], threshold=2)


def test_mixed_or_garbled_shares_are_detected_as_inconsistent() -> None:
    """Shares from two sharings, or a random value, interpolate to no 32-byte secret.

    (A deliberate small change to y shifts the secret by a small multiple and is not caught
    here: shares are authenticated by the Box that carries them, not by this check.)
    """
    one = shamir.split(secrets.token_bytes(32), threshold=3, n=5)
    two = shamir.split(secrets.token_bytes(32), threshold=3, n=5)
    with pytest.raises(InconsistentMessage, match="32-byte"):
        shamir.combine([one[0], two[1], one[2]], threshold=3)
    garbled = Share(2, secrets.randbelow(PRIME).to_bytes(SHARE_BYTES, "big"))
    with pytest.raises(InconsistentMessage, match="32-byte"):
        shamir.combine([one[0], garbled, one[2]], threshold=3)


@pytest.mark.parametrize(
    "share",
    [
        Share(0, bytes(SHARE_BYTES)),
        Share(-1, bytes(SHARE_BYTES)),
        Share(True, bytes(SHARE_BYTES)),  # type: ignore[arg-type]
        Share(1, bytes(SHARE_BYTES - 1)),
        Share(1, PRIME.to_bytes(SHARE_BYTES, "big")),
        Share(1, "not bytes"),  # type: ignore[arg-type]
    ],
)
def test_malformed_shares_are_inconsistent(share: Share) -> None:
    with pytest.raises(InconsistentMessage):
        shamir.combine([share], threshold=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"secret": bytes(31), "threshold": 1, "n": 1},
        {"secret": bytes(32), "threshold": 0, "n": 3},
        {"secret": bytes(32), "threshold": 4, "n": 3},
        {"secret": bytes(32), "threshold": 1, "n": shamir.MAX_SHARES + 1},
        {"secret": bytes(32), "threshold": 2.0, "n": 3},
    ],
)
def test_bad_split_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        shamir.split(**kwargs)  # type: ignore[arg-type]


def test_share_repr_hides_the_value() -> None:
    share = shamir.split(b"\xaa" * 32, threshold=1, n=1)[0]
    assert share.y.hex() not in repr(share)
    assert "aa" * 8 not in repr(share)


def test_threshold_one_shares_are_the_secret_itself() -> None:
    """Sanity check of the field encoding: a degree-0 polynomial is the constant."""
    secret = secrets.token_bytes(32)
    for share in shamir.split(secret, threshold=1, n=3):
        assert int.from_bytes(share.y, "big") == int.from_bytes(secret, "big")


def _low_bits_histogram(secret: bytes, xs: tuple[int, ...], splits: int) -> list[int]:
    """Counts of the low 4 bits of each of the t-1 share values (one histogram per x)."""
    counts = [0] * (16 * len(xs))
    for _ in range(splits):
        shares = shamir.split(secret, threshold=len(xs) + 1, n=5)
        for k, x in enumerate(xs):
            counts[16 * k + (int.from_bytes(shares[x - 1].y, "big") & 0xF)] += 1
    return counts


def test_t_minus_one_shares_are_uniform_and_independent_of_the_secret() -> None:
    """For fixed x = (2, 4) and t = 3, the share values look the same for two secrets.

    Goodness of fit to uniform for each secret, and a two-sample chi-square test (contingency
    table secret x bin) that the distributions are the same. The test has power: the secret
    shows through when the field is tiny or coefficients are not random (see below).
    """
    xs = (2, 4)
    a = _low_bits_histogram(bytes(32), xs, 3000)
    b = _low_bits_histogram(b"\xff" * 32, xs, 3000)
    for hist in (a, b):
        for k in range(len(xs)):
            assert stats.chisquare(hist[16 * k : 16 * k + 16]).pvalue > ALPHA
    assert stats.chi2_contingency([a, b]).pvalue > ALPHA
    # the pair (y_2, y_4) jointly: low 2 bits of each, 16 joint bins
    joint: list[list[int]] = [[0] * 16, [0] * 16]
    for row, secret in enumerate((bytes(32), b"\xff" * 32)):
        for _ in range(2000):
            s = shamir.split(secret, threshold=3, n=4)
            y2, y4 = (int.from_bytes(s[x - 1].y, "big") & 3 for x in xs)
            joint[row][4 * y2 + y4] += 1
    assert stats.chi2_contingency(joint).pvalue > ALPHA


def test_the_independence_check_has_power() -> None:
    """With t shares (one too many) the low bits depend on the secret and the test sees it."""
    rows = []
    for secret in (bytes(32), b"\x00" * 31 + b"\x01"):
        counts = [0] * 16
        for _ in range(500):
            s = shamir.split(secret, threshold=1, n=1)  # t shares of a t = 1 sharing
            counts[int.from_bytes(s[0].y, "big") & 0xF] += 1
        rows.append(counts)
    assert stats.chi2_contingency([[c + 1 for c in r] for r in rows]).pvalue < ALPHA


def test_large_group_split_and_combine() -> None:
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, threshold=86, n=128)
    assert shamir.combine(shares[-86:], threshold=86) == secret
    assert shamir.combine(shares[::-1], threshold=86) == secret
