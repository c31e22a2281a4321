"""Learning quality with ideal averaging (the best any gossip can do), seeded.

Digits, 16 peers, Dirichlet(0.5), 30 rounds, logistic regression. The acceptance thresholds for
secure group averaging are 90% without DP and 75% with record-level privacy at epsilon 8,
delta 1e-5; ideal averaging must clear them with margin. The bigger sweep (peer privacy, the
MLP, centralized training) is in bench/bench_learning.py.
"""

from __future__ import annotations

import pytest
import torch

from floor.errors import BudgetExhausted
from gossip.ideal import build_learners, run_ideal, train_centralized
from gossip.learner import TrainConfig
from gossip.privacy import PrivacyConfig, PrivacyUnit
from gossip.tasks import Task, digits_task, make_task

TRAIN = TrainConfig(local_steps=5, lr=0.3, sample_rate=0.2)
ROUNDS = 30


@pytest.fixture(scope="module")
def task() -> Task:
    return digits_task(model="logreg")


def _run(
    task: Task, privacy: PrivacyConfig, rounds: int = ROUNDS, stacked: bool = False
) -> tuple[float, float]:
    learners = build_learners(
        task, 16, scheme="dirichlet", alpha=0.5, train=TRAIN, privacy=privacy, seed=0
    )
    result = run_ideal(task, learners, rounds, eval_every=rounds, stacked=stacked)
    assert result.final.contributors == 16
    return result.final.metric, result.final.epsilon_spent


def test_no_dp_reaches_90_percent(task: Task) -> None:
    acc, eps = _run(task, PrivacyConfig.none())
    assert acc >= 0.92  # acceptance: 0.90; seeded run gives ~0.95
    assert eps == 0.0
    stacked, _ = _run(task, PrivacyConfig.none(), stacked=True)
    assert stacked == pytest.approx(acc, abs=0.006)  # same run up to float rounding


def test_record_privacy_at_epsilon_8_reaches_75_percent(task: Task) -> None:
    privacy = PrivacyConfig(unit=PrivacyUnit.RECORD, epsilon=8.0, delta=1e-5, rounds=ROUNDS)
    acc, eps = _run(task, privacy)
    assert acc >= 0.82  # acceptance: 0.75; seeded run gives ~0.93
    assert 7.0 < eps <= 8.0


def test_peers_stop_contributing_when_the_budget_is_spent() -> None:
    task = make_task("breast_cancer")
    privacy = PrivacyConfig(unit=PrivacyUnit.PEER, epsilon=4.0, delta=1e-5, rounds=3)
    learners = build_learners(task, 4, train=TRAIN, privacy=privacy, seed=1)
    result = run_ideal(task, learners, 5)
    assert [r.contributors for r in result.rounds] == [4, 4, 4, 0, 0]
    assert all(learner.budget_spent for learner in learners)
    assert result.final.epsilon_spent <= 4.0
    assert torch.equal(result.theta, learners[0].theta)
    with pytest.raises(BudgetExhausted):
        learners[0].local_update()


def test_centralized_reference_is_at_least_as_good(task: Task) -> None:
    central = train_centralized(task, steps=600, lr=0.3, batch_size=64)
    acc, _ = _run(task, PrivacyConfig.none(), rounds=10)
    assert central.metric >= 0.95
    assert central.metric >= acc - 0.01


class _UserNet(torch.nn.Module):
    """A user's own module, with a layer norm and a non-trainable buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 3)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x) * self.scale)


@pytest.mark.parametrize("unit", [PrivacyUnit.NONE, PrivacyUnit.RECORD])
def test_a_users_model_and_tensors_learn_through_the_whole_loop(unit: PrivacyUnit) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 6, generator=gen)
    y = (x[:, :3] * torch.tensor([1.0, 2.0, 3.0])).argmax(dim=1)
    task = Task.from_tensors("user", _UserNet, x, y)
    privacy = PrivacyConfig.none() if unit is PrivacyUnit.NONE else PrivacyConfig(epsilon=8.0)
    learners = build_learners(task, 4, scheme="label", train=TRAIN, privacy=privacy, seed=2)
    before = task.evaluate(task.build_model(2)).metric
    result = run_ideal(task, learners, 8, eval_every=8)
    assert result.final.metric > max(0.8, before + 0.3)
    assert torch.equal(learners[3].theta_view, result.theta)
