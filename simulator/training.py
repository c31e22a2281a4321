"""Local training of the simulated peers: one ``Learner`` per peer, or all peers in one step.

``PerPeerTrainer`` runs the daemon's own ``gossip.learner.Learner`` for each peer (any model).
``StackedTrainer`` trains every active peer of a linear softmax model (``logreg``) at once, as
DESIGN.md's cost model asks ("all peers in one stacked bmm step"): the peers' weights are one
``[peers, classes, features]`` tensor, their padded data one ``[peers, rows, features]`` tensor,
and each local step is a few batched matrix products. It computes the same update as the
learner: record-level DP-SGD (Poisson sampling at ``q``, per-example clipping to ``C`` with the
closed-form per-example gradient norm of a linear softmax model ``|p - y| * sqrt(|x|^2 + 1)``,
Gaussian noise ``N(0, sigma^2 C^2)``, divided by the expected batch ``q n``), peer-level
clipping and noising of the round's update, or plain mini-batch SGD. Its random draws come from
one seeded generator, so it is deterministic but not draw-for-draw equal to the per-peer path.
"""

from __future__ import annotations

import random
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from floor.errors import BudgetExhausted, TrainingError
from gossip.learner import Learner
from gossip.model import Layout, flatten
from gossip.privacy import PrivacyPlan, PrivacyUnit, distributed_contribution
from simulator.budget import SharedAccountant

__all__ = ["PerPeerTrainer", "StackedTrainer", "Trainer", "stackable"]


class Trainer(Protocol):
    """What the engine needs from local training."""

    def contribute(self, active: list[int]) -> dict[int, tuple[Tensor, float]]:
        """Train every peer of ``active``; return each one's contribution and weight."""
        ...

    def apply(self, peer: int, theta: Tensor, counted: int | None = None) -> None:
        """Set ``peer``'s public model to ``theta`` (a group result over ``counted``)."""
        ...

    def thetas(self, peers: list[int]) -> Tensor:
        """The models of ``peers``, stacked ``[len(peers), d]``."""
        ...

    def epsilon(self, peers: list[int]) -> float:
        """The largest epsilon spent by any of ``peers``."""
        ...

    def epsilons(self, peers: list[int]) -> tuple[float, float]:
        """The central epsilon of what happened and the local one (own noise only), of the
        peer that contributed most often (both equal ``epsilon`` without distributed noise)."""
        ...


def stackable(model: nn.Module) -> bool:
    """Whether ``StackedTrainer`` can train this model (one linear layer with a bias)."""
    return isinstance(model, nn.Linear) and model.bias is not None


class PerPeerTrainer:
    """One ``gossip.learner.Learner`` per peer (the daemon's code path)."""

    def __init__(self, learners: list[Learner]) -> None:
        self.learners = learners

    def contribute(self, active: list[int]) -> dict[int, tuple[Tensor, float]]:
        """Each active learner's ``local_update()``; a spent budget contributes weight 0."""
        out: dict[int, tuple[Tensor, float]] = {}
        for p in active:
            learner = self.learners[p]
            try:
                c = learner.local_update()
            except BudgetExhausted:
                out[p] = (learner.theta, 0.0)
                continue
            out[p] = (c.vector, c.weight)
        return out

    def apply(self, peer: int, theta: Tensor, counted: int | None = None) -> None:
        """``Learner.apply_result``."""
        self.learners[peer].apply_result(theta, counted)

    def thetas(self, peers: list[int]) -> Tensor:
        """The learners' public models."""
        return torch.stack([self.learners[p].theta for p in peers])

    def epsilon(self, peers: list[int]) -> float:
        """Epsilon of the peer that contributed most often."""
        most = max(peers, key=lambda p: (self.learners[p].rounds_contributed, -p))
        return float(self.learners[most].epsilon_spent)

    def epsilons(self, peers: list[int]) -> tuple[float, float]:
        """The most-contributing peer's central and local epsilon."""
        most = max(peers, key=lambda p: (self.learners[p].rounds_contributed, -p))
        learner = self.learners[most]
        return float(learner.epsilon_central), float(learner.epsilon_local)


class StackedTrainer:
    """All peers of a linear softmax model trained in one batched step per local step."""

    def __init__(
        self,
        model: nn.Linear,
        shards: list[tuple[Tensor, Tensor]],
        n_peers: int,
        *,
        plan: PrivacyPlan,
        accountant: SharedAccountant | None,
        local_steps: int,
        lr: float,
        sample_rate: float,
        weighting_by_samples: bool,
        seed: int,
    ) -> None:
        self.layout = Layout.of(model)
        self.out_f, self.in_f = model.weight.shape
        rows = max(int(x.shape[0]) for x, _ in shards)
        k = len(shards)
        self.x = torch.zeros(k, rows, self.in_f)
        self.y = torch.zeros(k, rows, dtype=torch.int64)
        self.valid = torch.zeros(k, rows, dtype=torch.bool)
        for i, (x, y) in enumerate(shards):
            m = int(x.shape[0])
            self.x[i, :m], self.y[i, :m], self.valid[i, :m] = x, y, True
        self.n = self.valid.sum(dim=1).double()
        self.xnorm = (self.x.pow(2).sum(dim=2) + 1.0).sqrt()  # |[x, 1]| per row
        self.k = k
        self._thetas = flatten(model, self.layout).repeat(n_peers, 1)
        self.counts = [0] * n_peers
        self.plan, self.accountant = plan, accountant
        self.steps, self.lr, self.q = local_steps, lr, sample_rate
        self.by_samples = weighting_by_samples
        self.gen = torch.Generator().manual_seed(seed * 65_537 + 11)
        self.noise_rng = random.Random(seed * 65_537 + 13)  # distributed noise (seeded)
        self.shares: list[list[int]] = [[] for _ in range(n_peers)]

    def contribute(self, active: list[int]) -> dict[int, tuple[Tensor, float]]:
        """One batched local round for every active peer whose budget allows it."""
        acc = self.accountant
        able = [p for p in active if acc is None or acc.allows(self.counts[p] + 1)]
        can = set(able)
        out: dict[int, tuple[Tensor, float]] = {
            p: (self._thetas[p].clone(), 0.0) for p in active if p not in can
        }
        if not able:
            return out
        idx = torch.tensor(able)
        data = idx % self.k
        theta = self._thetas[idx]
        new = self._train(theta, data)
        delta = new - theta
        plan = self.plan
        dist = plan.distributed
        if dist is not None:
            for j, p in enumerate(able):
                ring = distributed_contribution(theta[j], delta[j], dist, plan.clip, self.noise_rng)
                self.counts[p] += 1
                self.shares[p].append(dist.shares)
                out[p] = (ring, 1.0)
            return out
        if plan.unit is PrivacyUnit.PEER:
            norm = delta.norm(dim=1, keepdim=True)
            delta = delta * (plan.clip / norm.clamp_min(1e-12)).clamp(max=1.0)
            noise = torch.randn(delta.shape, generator=self.gen, dtype=delta.dtype)
            delta = delta + noise * (plan.noise_multiplier * plan.clip)
        vectors = theta + delta
        n = self.n[data]
        for j, p in enumerate(able):
            self.counts[p] += 1
            out[p] = (vectors[j], float(n[j]) if self.by_samples else 1.0)
        return out

    def _train(self, theta: Tensor, data: Tensor) -> Tensor:
        a, o, f = theta.shape[0], self.out_f, self.in_f
        w = theta[:, : o * f].reshape(a, o, f).clone()
        b = theta[:, o * f :].clone()
        x, y, valid, n = self.x[data], self.y[data], self.valid[data], self.n[data]
        onehot = F.one_hot(y, o).to(theta.dtype)
        plan, q, gen = self.plan, self.q, self.gen
        record = plan.unit is PrivacyUnit.RECORD
        batch = (n * q).ceil().clamp(min=1.0)
        for _ in range(self.steps):
            u = torch.rand(valid.shape, generator=gen)
            if record:
                mask = (u < plan.sample_rate) & valid
            else:
                u = u.masked_fill(~valid, 2.0)
                rank = u.argsort(dim=1).argsort(dim=1)
                mask = (rank < batch.unsqueeze(1)) & valid
            logits = torch.bmm(x, w.transpose(1, 2)) + b.unsqueeze(1)
            err = torch.softmax(logits, dim=2) - onehot  # d loss / d logits per example
            if record:
                norms = err.norm(dim=2) * self.xnorm[data]
                scale = (plan.clip / norms.clamp_min(1e-12)).clamp(max=1.0) * mask
                e = err * scale.unsqueeze(2)
                std = plan.noise_multiplier * plan.clip
                gw = torch.bmm(e.transpose(1, 2), x)
                gb = e.sum(dim=1)
                gw = gw + torch.randn(gw.shape, generator=gen) * std
                gb = gb + torch.randn(gb.shape, generator=gen) * std
                denom = (plan.sample_rate * n).to(w.dtype)
            else:
                e = err * mask.unsqueeze(2)
                gw = torch.bmm(e.transpose(1, 2), x)
                gb = e.sum(dim=1)
                denom = batch.to(w.dtype)
            w = w - self.lr * gw / denom.view(a, 1, 1)
            b = b - self.lr * gb / denom.view(a, 1)
        new = torch.cat([w.reshape(a, o * f), b], dim=1)
        if not torch.isfinite(new).all():
            raise TrainingError("stacked training diverged (NaN or inf); lower the learning rate")
        return new

    def apply(self, peer: int, theta: Tensor, counted: int | None = None) -> None:
        """Set the peer's row (``counted`` refines its last contribution's central epsilon)."""
        self._thetas[peer] = theta.to(self._thetas.dtype)
        dist = self.plan.distributed
        if dist is not None and counted is not None and self.shares[peer]:
            self.shares[peer][-1] = dist.unknown_shares(counted)

    def thetas(self, peers: list[int]) -> Tensor:
        """Rows of the stacked models."""
        return self._thetas[torch.tensor(peers)]

    def epsilon(self, peers: list[int]) -> float:
        """Epsilon after the most contributions any of ``peers`` made."""
        if self.accountant is None:
            return 0.0
        return self.accountant.epsilon(max(self.counts[p] for p in peers))

    def epsilons(self, peers: list[int]) -> tuple[float, float]:
        """The most-contributing peer's central and local epsilon."""
        dist = self.plan.distributed
        if dist is None:
            eps = self.epsilon(peers)
            return eps, eps
        most = max(peers, key=lambda p: (self.counts[p], -p))
        shares = self.shares[most]
        delta = self.accountant.delta if self.accountant is not None else 1e-5
        return dist.central_epsilon(shares, delta), dist.local_epsilon(len(shares), delta)
