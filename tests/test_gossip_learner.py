"""The learner: local update, privatization by unit, budget checked before contributing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dp.accounting import PrivacyEvent, calibrate_noise
from floor.errors import BudgetExhausted, ConfigError, TrainingError
from gossip.ideal import weighted_mean
from gossip.learner import Contribution, Learner, TrainConfig
from gossip.privacy import PrivacyConfig, PrivacyPlan, PrivacyUnit, plan_privacy, privatize_delta

NO_DP = PrivacyConfig.none()


def _data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _learner(privacy: PrivacyConfig = NO_DP, seed: int = 0, **train: float) -> Learner:
    torch.manual_seed(0)
    x, y = _data()
    cfg = TrainConfig(**train)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    return Learner(nn.Linear(4, 2), x, y, train=cfg, privacy=privacy, generator=gen)


def test_local_update_contributes_theta_plus_delta_and_waits_for_the_result() -> None:
    learner = _learner()
    theta0 = learner.theta
    c = learner.local_update()
    assert c.round == 1 and c.weight == 40.0 and c.epsilon_spent == 0.0
    assert not torch.equal(c.vector, theta0)
    assert torch.equal(learner.theta, theta0)  # only released group results feed theta
    learner.apply_result(c.vector)
    assert torch.equal(learner.theta, c.vector)
    assert learner.status()["results_applied"] == 1


def test_seeded_learners_are_reproducible() -> None:
    priv = PrivacyConfig(unit="record", noise_multiplier=1.0, epsilon=None)  # type: ignore[arg-type]
    a = _learner(priv, seed=3).local_update().vector
    b = _learner(priv, seed=3).local_update().vector
    other = _learner(priv, seed=4).local_update().vector
    assert torch.equal(a, b) and not torch.equal(a, other)


def test_uniform_weighting() -> None:
    learner = _learner(weighting="uniform")  # type: ignore[arg-type]
    assert learner.local_update().weight == 1.0


@pytest.mark.parametrize("unit", ["record", "peer"])
def test_with_dp_the_row_count_is_never_a_weight(unit: str) -> None:
    # The group result reveals the total weight exactly; one record more or less would change
    # it, and no accountant covers that release. So with DP the default weight is 1 ...
    priv = PrivacyConfig(unit=unit, noise_multiplier=1.0, epsilon=None)  # type: ignore[arg-type]
    assert _learner(priv).weight == 1.0
    assert _learner(priv).local_update().weight == 1.0
    # ... and asking for the row count is refused with what to do instead.
    with pytest.raises(ConfigError, match="uniform"):
        _learner(priv, weighting="samples")  # type: ignore[arg-type]
    # Without DP the default still weights by rows (an exact weighted mean).
    assert _learner().weight == 40.0


def test_training_lowers_the_local_loss_without_dp() -> None:
    learner = _learner(local_steps=20, lr=0.5)
    before = F.cross_entropy(learner.current_model()(learner.x), learner.y)
    learner.apply_result(learner.local_update().vector)
    after = F.cross_entropy(learner.current_model()(learner.x), learner.y)
    assert after < before - 0.1


class _StubBudget:
    """Records what the learner spends (the BudgetLike protocol), never refuses."""

    def __init__(self) -> None:
        self.events: list[PrivacyEvent] = []

    @property
    def spent_epsilon(self) -> float:
        return float(len(self.events))

    def check(self, next_events: PrivacyEvent) -> float:
        return self.spent_epsilon + 1

    def spend(self, events: PrivacyEvent) -> float:
        self.events.append(events)
        return self.spent_epsilon


def test_record_unit_takes_dp_sgd_steps_of_clipped_per_example_gradients() -> None:
    torch.manual_seed(1)
    model = nn.Linear(4, 2)
    x, y = _data(12)
    clip, lr = 0.3, 0.5
    budget = _StubBudget()
    privacy = PrivacyConfig(unit=PrivacyUnit.RECORD, noise_multiplier=1e-9, clip=clip)
    train = TrainConfig(local_steps=1, lr=lr, sample_rate=1.0)  # q = 1: every row, ~no noise
    learner = Learner(
        model, x, y, train=train, privacy=privacy, budget=budget, generator=torch.Generator()
    )
    theta = learner.theta
    got = learner.local_update().vector - theta
    want = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(12):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}  # type: ignore[union-attr]
        norm = torch.cat([g.reshape(-1) for g in grads.values()]).norm()
        for k, g in grads.items():
            want[k] += g * min(1.0, clip / float(norm))
    expected = -lr * torch.cat([want["weight"].reshape(-1), want["bias"]]) / 12
    assert torch.allclose(got, expected, atol=1e-6)
    assert budget.events == [PrivacyEvent(1e-9, 1.0, 1)]


def test_peer_unit_clips_delta_then_adds_gaussian_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    quiet = PrivacyPlan(PrivacyUnit.PEER, 1e-12, 1.0, 1, 0.5)
    big = torch.full((100,), 3.0)
    assert float(privatize_delta(big, quiet, gen).norm()) == pytest.approx(0.5, rel=1e-6)
    small = torch.full((100,), 0.001)
    assert torch.allclose(privatize_delta(small, quiet, gen), small)
    noisy = PrivacyPlan(PrivacyUnit.PEER, 3.0, 1.0, 1, 0.5)
    out = privatize_delta(torch.zeros(200_000), noisy, gen)
    assert float(out.std()) == pytest.approx(1.5, rel=0.02)
    record = PrivacyPlan(PrivacyUnit.RECORD, 3.0, 0.5, 5, 0.5)
    assert torch.equal(privatize_delta(big, record, gen), big)  # DP-SGD already noised it


def test_peer_unit_learner_releases_a_clipped_noised_delta() -> None:
    priv = PrivacyConfig(unit=PrivacyUnit.PEER, epsilon=None, noise_multiplier=1e-9, clip=0.01)
    learner = _learner(priv, local_steps=10, lr=1.0)
    c = learner.local_update()
    assert float((c.vector - learner.theta).norm()) == pytest.approx(0.01, rel=1e-4)


def test_calibration_covers_rounds_times_local_steps_for_record() -> None:
    cfg = PrivacyConfig(unit=PrivacyUnit.RECORD, epsilon=4.0, delta=1e-5, rounds=6)
    plan = plan_privacy(cfg, local_steps=3, sample_rate=0.25)
    z = calibrate_noise(epsilon=4.0, delta=1e-5, rounds=18, sample_rate=0.25)
    assert (plan.count, plan.sample_rate) == (3, 0.25)
    assert plan.noise_multiplier == pytest.approx(z)
    peer = plan_privacy(
        PrivacyConfig(unit=PrivacyUnit.PEER, epsilon=4.0, rounds=6), local_steps=3, sample_rate=0.25
    )
    assert (peer.count, peer.sample_rate) == (1, 1.0)
    assert peer.noise_multiplier == pytest.approx(
        calibrate_noise(epsilon=4.0, delta=1e-5, rounds=6, sample_rate=1.0)
    )


@pytest.mark.parametrize("unit", [PrivacyUnit.RECORD, PrivacyUnit.PEER])
def test_planned_rounds_fit_the_budget_and_the_next_one_is_refused_before_training(
    unit: PrivacyUnit,
) -> None:
    priv = PrivacyConfig(unit=unit, epsilon=3.0, delta=1e-5, rounds=3)
    learner = _learner(priv, local_steps=2, sample_rate=0.5)
    for r in range(1, 4):
        c = learner.local_update()
        assert c.round == r
        learner.apply_result(c.vector)
    spent = learner.epsilon_spent
    assert 2.5 < spent <= 3.0
    state = learner.generator.get_state()
    with pytest.raises(BudgetExhausted):
        learner.local_update()
    assert torch.equal(learner.generator.get_state(), state)  # refused before any training
    assert learner.budget_spent and learner.status()["budget_spent"] is True
    assert learner.rounds_contributed == 3 and learner.epsilon_spent == spent
    with pytest.raises(BudgetExhausted):
        learner.local_update()


def test_status_states_the_privacy_unit() -> None:
    priv = PrivacyConfig(unit=PrivacyUnit.PEER, noise_multiplier=2.0, epsilon=None)
    status = _learner(priv).status()
    assert status["privacy_unit"] == "peer" and status["noise_multiplier"] == 2.0
    assert _learner().status()["privacy_unit"] == "none"


def test_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="privacy unit"):
        PrivacyConfig(unit="user")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="epsilon or noise_multiplier"):
        PrivacyConfig(unit=PrivacyUnit.RECORD, epsilon=None)
    with pytest.raises(ConfigError, match="delta"):
        PrivacyConfig(epsilon=1.0, delta=1.0)
    with pytest.raises(ConfigError, match="sample_rate"):
        TrainConfig(sample_rate=0.0)
    with pytest.raises(ConfigError, match="local_steps"):
        TrainConfig(local_steps=0)
    x, y = _data()
    with pytest.raises(ConfigError, match="include_buffers"):
        Learner(
            nn.Linear(4, 2), x, y, privacy=PrivacyConfig(noise_multiplier=1.0), include_buffers=True
        )


def test_foreign_vectors_and_divergence_are_training_errors() -> None:
    learner = _learner()
    with pytest.raises(TrainingError, match="10 values"):
        learner.apply_result(torch.zeros(11))
    with pytest.raises(TrainingError, match="NaN"):
        learner.apply_result(torch.full((10,), math.inf))
    wild = _learner(lr=1e38, local_steps=5)
    wild.apply_result(torch.full((10,), 3e38))
    with pytest.raises(TrainingError, match="learning rate"):
        wild.local_update()


def test_batch_norm_models_cannot_do_record_level_dp() -> None:
    x, y = _data()
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    learner = Learner(
        model, x, y, privacy=PrivacyConfig(noise_multiplier=1.0), generator=torch.Generator()
    )
    with pytest.raises(TrainingError, match="per-sample gradients"):
        learner.local_update()


def test_batch_norm_buffers_are_averaged_only_when_asked() -> None:
    x, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    learner = Learner(model, x, y, privacy=NO_DP, include_buffers=True, generator=torch.Generator())
    assert learner.layout.size == learner.layout.num_params + 6
    c = learner.local_update()
    running_mean = c.vector[learner.layout.num_params :]
    assert running_mean.numel() == 6 and not torch.equal(running_mean[:3], torch.zeros(3))


def test_weighted_mean_is_exact() -> None:
    cs = [
        Contribution(torch.tensor([1.0, 0.0]), 1.0, 1, 0.0),
        Contribution(torch.tensor([4.0, 3.0]), 2.0, 1, 0.0),
    ]
    assert torch.equal(weighted_mean(cs), torch.tensor([3.0, 2.0]))
    with pytest.raises(ConfigError):
        weighted_mean([])


async def test_local_update_async_runs_off_the_event_loop() -> None:
    import threading

    seen: list[str] = []
    learner = _learner(local_steps=3)
    original = learner._train

    def spy() -> torch.Tensor:
        seen.append(threading.current_thread().name)
        return original()

    learner._train = spy  # type: ignore[method-assign]
    c = await learner.local_update_async()
    assert seen and seen[0] != threading.main_thread().name
    assert torch.equal(c.vector, _learner(local_steps=3).local_update().vector)


# -- many learners at once ---------------------------------------------------------------------


def _peers(privacy: PrivacyConfig, **train: float) -> list[Learner]:
    from gossip.ideal import build_learners
    from gossip.tasks import make_task

    task = make_task("digits", model="mlp")
    cfg = TrainConfig(**train)  # type: ignore[arg-type]
    return build_learners(
        task, 6, scheme="dirichlet", alpha=0.3, train=cfg, privacy=privacy, seed=4
    )


@pytest.mark.parametrize(
    ("privacy", "train"),
    [
        (NO_DP, {"momentum": 0.5, "local_steps": 3}),
        (PrivacyConfig(unit=PrivacyUnit.PEER, noise_multiplier=0.5, epsilon=None), {}),
        (PrivacyConfig(unit=PrivacyUnit.RECORD, noise_multiplier=0.8, epsilon=None), {}),
    ],
    ids=["none", "peer", "record"],
)
def test_local_update_many_equals_one_by_one(
    privacy: PrivacyConfig, train: dict[str, float]
) -> None:
    from gossip.batched import local_update_many

    one_by_one, stacked = _peers(privacy, **train), _peers(privacy, **train)
    assert len({p.num_samples for p in one_by_one}) > 1  # ragged local data
    for _ in range(2):
        want = [p.local_update() for p in one_by_one]
        got = local_update_many(stacked)
        for w, g, p, q in zip(want, got, one_by_one, stacked, strict=True):
            assert g is not None
            assert torch.allclose(w.vector, g.vector, atol=1e-5)
            assert (w.weight, w.round) == (g.weight, g.round)
            p.apply_result(w.vector)
            q.apply_result(g.vector)


def test_local_update_many_falls_back_for_buffers_and_skips_spent_budgets() -> None:
    from gossip.batched import local_update_many

    x, y = _data()
    bn = Learner(
        nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)),
        x,
        y,
        privacy=NO_DP,
        generator=torch.Generator().manual_seed(0),
    )
    twin = Learner(
        nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)),
        x,
        y,
        privacy=NO_DP,
        generator=torch.Generator().manual_seed(0),
        theta=bn.theta,
    )
    spent = _learner(PrivacyConfig(unit=PrivacyUnit.PEER, epsilon=1.0, rounds=1))
    spent.local_update()
    plain = _learner(seed=7)
    out = local_update_many([bn, spent, plain])
    assert out[1] is None and spent.budget_spent
    assert out[0] is not None and out[2] is not None
    assert torch.equal(out[0].vector, twin.local_update().vector)
