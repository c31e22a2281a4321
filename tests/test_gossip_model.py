"""Flattening any nn.Module to one vector and back; what happens to buffers; shape changes."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from floor.errors import TrainingError
from gossip.model import Layout, flatten, restore


def _bn_net(hidden: int = 6) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, hidden)
    )


def test_roundtrip_reproduces_the_model() -> None:
    torch.manual_seed(0)
    src, dst = _bn_net(), _bn_net()
    layout = Layout.of(src)
    restore(dst, flatten(src, layout), layout)
    src.eval()
    dst.eval()
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(src(x), dst(x))
    assert layout.size == sum(p.numel() for p in src.parameters()) == layout.num_params


def test_buffers_stay_local_by_default() -> None:
    torch.manual_seed(0)
    src, dst = _bn_net(), _bn_net()
    src.train()
    src(torch.randn(8, 1, 6, 6))  # moves src's running stats away from (0, 1)
    layout = Layout.of(src)
    assert all(not e.is_buffer for e in layout.entries)
    restore(dst, flatten(src, layout), layout)
    bn_src, bn_dst = src[1], dst[1]
    assert isinstance(bn_src, nn.BatchNorm2d) and isinstance(bn_dst, nn.BatchNorm2d)
    assert not torch.equal(bn_src.running_mean, bn_dst.running_mean)
    assert torch.equal(bn_dst.running_mean, torch.zeros(3))


def test_float_buffers_are_shared_on_request_but_counters_are_not() -> None:
    torch.manual_seed(0)
    src, dst = _bn_net(), _bn_net()
    src.train()
    src(torch.randn(8, 1, 6, 6))
    layout = Layout.of(src, include_buffers=True)
    names = {e.name for e in layout.entries if e.is_buffer}
    assert names == {"1.running_mean", "1.running_var"}
    assert layout.size == layout.num_params + 6
    restore(dst, flatten(src, layout), layout)
    assert torch.equal(src[1].running_var, dst[1].running_var)  # type: ignore[index]
    assert int(dst[1].num_batches_tracked) == 0  # type: ignore[index]


def test_changed_shapes_raise_a_training_error_that_says_what_to_do() -> None:
    layout = Layout.of(_bn_net(6))
    with pytest.raises(TrainingError, match=r"4\.weight.*changed shape.*\[6, 48\].*\[7, 48\]"):
        flatten(_bn_net(7), layout)
    with pytest.raises(TrainingError, match="same architecture"):
        restore(nn.Linear(3, 2), torch.zeros(layout.size), layout)


def test_restore_refuses_wrong_vectors() -> None:
    model = nn.Linear(3, 2)
    layout = Layout.of(model)
    with pytest.raises(TrainingError, match="8 shared values"):
        restore(model, torch.zeros(9), layout)
    with pytest.raises(TrainingError, match="NaN"):
        restore(model, torch.full((8,), float("nan")), layout)


def test_integer_parameters_and_empty_models_are_refused() -> None:
    model = nn.Linear(2, 2)
    model.register_parameter("steps", nn.Parameter(torch.zeros(2, dtype=torch.int64), False))
    with pytest.raises(TrainingError, match="floating"):
        Layout.of(model)
    with pytest.raises(TrainingError, match="no parameters"):
        Layout.of(nn.ReLU())


def test_vector_dtype_is_promoted_and_restored_per_tensor() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1).double())
    layout = Layout.of(model)
    assert layout.dtype == torch.float64
    v = flatten(model, layout)
    restore(model, v + 1, layout)
    assert model[0].weight.dtype == torch.float32  # type: ignore[index]
    assert torch.allclose(flatten(model, layout), v + 1)


@settings(max_examples=60, deadline=None)
@given(
    widths=st.lists(st.integers(1, 7), min_size=2, max_size=4),
    seed=st.integers(0, 2**31),
)
def test_flatten_restore_is_identity_on_vectors(widths: list[int], seed: int) -> None:
    layers: list[nn.Module] = [nn.Linear(a, b) for a, b in itertools.pairwise(widths)]
    model = nn.Sequential(*layers)
    layout = Layout.of(model)
    v = torch.randn(layout.size, generator=torch.Generator().manual_seed(seed))
    restore(model, v, layout)
    assert torch.equal(flatten(model, layout), v)
