"""dp clipping, adaptive clipping and the peer-level privatize helper."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import dp
from floor.errors import AccountingError

shapes = st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=3)
floats = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)


@st.composite
def updates(draw: st.DrawFn) -> list[torch.Tensor]:
    tensors = []
    for shape in draw(st.lists(shapes, min_size=1, max_size=4)):
        values = draw(st.lists(floats, min_size=math.prod(shape), max_size=math.prod(shape)))
        tensors.append(torch.tensor(values, dtype=torch.float32).reshape(shape))
    return tensors


@settings(max_examples=100, deadline=None)
@given(update=updates(), max_norm=st.floats(min_value=1e-3, max_value=1e3))
def test_clip_bounds_the_global_norm_and_keeps_direction(
    update: list[torch.Tensor], max_norm: float
) -> None:
    originals = [t.clone() for t in update]
    clipped, norm = dp.clip_update(update, max_norm)
    expected_norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in update))
    assert norm == pytest.approx(expected_norm, rel=1e-9, abs=1e-12)
    assert dp.update_norm(clipped) <= max_norm * (1 + 1e-5)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    for before, after, original in zip(update, clipped, originals, strict=True):
        assert torch.equal(before, original)  # input untouched
        torch.testing.assert_close(after, before * scale)


def test_clip_is_global_not_per_tensor() -> None:
    update = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0, 4.0])}
    clipped, norm = dp.clip_update(update, 1.0)
    assert norm == pytest.approx(5.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([0.0, 0.8]))


def test_clip_validation() -> None:
    with pytest.raises(AccountingError, match="max_norm"):
        dp.clip_update([torch.ones(2)], 0.0)
    with pytest.raises(AccountingError, match="floating-point"):
        dp.clip_update([torch.ones(2, dtype=torch.int32)], 1.0)


def test_privatize_update_noise_and_event() -> None:
    d = 200_000
    update = [torch.full((d,), 10.0)]  # norm ~4472, clipped to 2
    result = dp.privatize_update(
        update, clip_norm=2.0, noise_multiplier=1.5, generator=dp.seeded_generator(0)
    )
    assert result.norm_before_clip == pytest.approx(10.0 * math.sqrt(d))
    assert result.event == dp.PrivacyEvent(1.5, 1.0, 1)
    noise = result.update[0] - 2.0 / math.sqrt(d)
    assert float(noise.std()) == pytest.approx(3.0, rel=0.01)
    assert abs(float(noise.mean())) < 4 * 3.0 / math.sqrt(d)
    mapped = dp.privatize_update(
        {"w": update[0]}, clip_norm=2.0, noise_multiplier=1.5, generator=dp.seeded_generator(0)
    )
    assert torch.equal(mapped.update["w"], result.update[0])
    with pytest.raises(AccountingError, match="noise_multiplier"):
        dp.privatize_update(
            update, clip_norm=1.0, noise_multiplier=0.0, generator=dp.seeded_generator(0)
        )


def test_split_noise_multiplier_composes_to_the_total() -> None:
    z, std = 1.0, 5.0
    z_update = dp.split_noise_multiplier(z, std)
    # Update (sensitivity 1, std z_u) and centred count (sensitivity 1/2, std sigma_b):
    assert z_update**-2 + (0.5 / std) ** 2 == pytest.approx(z**-2)
    assert z_update > z
    with pytest.raises(AccountingError, match="too small"):
        dp.split_noise_multiplier(1.0, 0.4)


@pytest.mark.parametrize("quantile", [0.2, 0.5, 0.9])
def test_adaptive_clip_tracks_the_target_quantile(quantile: float) -> None:
    # Log-normal norms: the q-quantile is exp(0.5 * Phi^-1(q)).
    norms = torch.exp(0.5 * torch.randn(4000, generator=dp.seeded_generator(1)))
    clipper = dp.AdaptiveClipper(
        0.1, target_quantile=quantile, learning_rate=0.05, count_noise_std=0.1
    )
    generator = dp.seeded_generator(2)
    history = [clipper.observe(float(n), generator=generator) for n in norms]
    settled = torch.tensor(history[2000:])
    expected = math.exp(0.5 * float(stats.norm.ppf(quantile)))
    assert float(settled.median()) == pytest.approx(expected, rel=0.15)


def test_adaptive_clip_update_and_validation() -> None:
    clipper = dp.AdaptiveClipper(1.0, target_quantile=0.5, learning_rate=0.2)
    assert clipper.indicator(0.5) == 1.0 and clipper.indicator(1.5) == 0.0
    assert clipper.update(1.0) == pytest.approx(math.exp(-0.1))  # all unclipped: shrink
    assert clipper.update(0.0) == pytest.approx(1.0)  # none unclipped: grow back
    with pytest.raises(AccountingError):
        dp.AdaptiveClipper(0.0)
    with pytest.raises(AccountingError):
        dp.AdaptiveClipper(1.0, target_quantile=1.5)
    with pytest.raises(AccountingError):
        clipper.update(math.nan)
