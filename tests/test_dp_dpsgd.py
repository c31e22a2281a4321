"""Example-level DP-SGD: matches an independent per-sample computation, accounts its steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import dp
from floor.errors import AccountingError, TrainingError


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def reference_dpsgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    steps: int,
    q: float,
    clip: float,
    z: float,
    seed: int,
) -> list[torch.Tensor]:
    """The same algorithm written independently with torch.func per-sample gradients."""
    generator = dp.seeded_generator(seed)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    start = {k: v.clone() for k, v in params.items()}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    n = x.shape[0]
    for _ in range(steps):
        chosen = torch.nonzero(torch.rand(n, generator=generator) < q).squeeze(1)
        if chosen.numel():
            per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x[chosen], y[chosen])
            norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in per.values()))
            factor = (clip / (norms + 1e-12)).clamp(max=1.0)
            summed = {k: torch.einsum("b,b...->...", factor, g) for k, g in per.items()}
        else:
            summed = {k: torch.zeros_like(v) for k, v in params.items()}
        for k in params:
            noise = torch.empty(params[k].shape).normal_(0.0, z * clip, generator=generator)
            params[k] = params[k] - lr / (q * n) * (summed[k] + noise)
    return [params[k] - start[k] for k in params]


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_dpsgd_matches_independent_reference(mode: str) -> None:
    x, y = data()
    kwargs = {"lr": 0.3, "steps": 6, "q": 0.25, "clip": 0.5, "z": 0.8, "seed": 4}
    expected = reference_dpsgd(mlp(1), x, y, **kwargs)  # type: ignore[arg-type]
    model = mlp(1)
    result = dp.dp_sgd_train(
        model,
        x,
        y,
        loss_fn=nn.functional.cross_entropy,
        lr=0.3,
        steps=6,
        sample_rate=0.25,
        clip_norm=0.5,
        noise_multiplier=0.8,
        generator=dp.seeded_generator(4),
        grad_sample_mode=mode,  # type: ignore[arg-type]
    )
    for got, want in zip(result.update, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert result.events == (dp.PrivacyEvent(0.8, 0.25, 6),)
    assert result.steps == 6 and len(result.batch_sizes) == 6
    # The model itself was trained in place and is usable without Opacus afterwards.
    fresh = mlp(1)
    for p, p0, u in zip(model.parameters(), fresh.parameters(), result.update, strict=True):
        torch.testing.assert_close(p.detach(), p0.detach() + u)
        assert not hasattr(p, "grad_sample")
    model(x).sum().backward()


def test_dpsgd_clipping_bounds_each_example() -> None:
    # With tiny noise, one step moves parameters by at most lr * (batch * clip) / (q n).
    x, y = data(20)
    x = x * 100  # huge gradients: every example is clipped
    result = dp.dp_sgd_train(
        mlp(2),
        x,
        y,
        loss_fn=nn.functional.cross_entropy,
        lr=1.0,
        steps=1,
        sample_rate=0.5,
        clip_norm=0.1,
        noise_multiplier=1e-9,
        generator=dp.seeded_generator(0),
    )
    step_norm = dp.update_norm(result.update)
    bound = 1.0 * result.batch_sizes[0] * 0.1 / (0.5 * 20)
    assert 0 < step_norm <= bound * (1 + 1e-4)


def test_dpsgd_rejects_unsupported_models_and_bad_data() -> None:
    x, y = data()
    bn = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    common = {
        "loss_fn": nn.functional.cross_entropy,
        "lr": 0.1,
        "steps": 1,
        "sample_rate": 0.5,
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
        "generator": dp.seeded_generator(0),
    }
    with pytest.raises(TrainingError, match="per-sample"):
        dp.dp_sgd_train(bn, x, y, **common)  # type: ignore[arg-type]
    with pytest.raises(TrainingError, match="targets"):
        dp.dp_sgd_train(mlp(0), x, y[:-1], **common)  # type: ignore[arg-type]
    with pytest.raises(TrainingError, match="lr"):
        dp.dp_sgd_train(mlp(0), x, y, **{**common, "lr": -1.0})  # type: ignore[arg-type]
    with pytest.raises(AccountingError, match="sample_rate"):
        dp.dp_sgd_train(mlp(0), x, y, **{**common, "sample_rate": 0.0})  # type: ignore[arg-type]
    with pytest.raises(AccountingError, match="noise_multiplier"):
        dp.dp_sgd_train(mlp(0), x, y, **{**common, "noise_multiplier": 0.0})  # type: ignore[arg-type]
