"""The Python API: the description's checks, data handling, and the simulator path."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import murmur
from floor.errors import ConfigError, PrivacyError, TrainingError


def _data(n: int = 120, d: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def _training(**changes: object) -> murmur.Training:
    base = murmur.Training(
        model=lambda: nn.Linear(6, 2),
        data=_data(),
        lr=0.5,
        rounds=2,
        local_steps=2,
        averaging=murmur.SecureGroups(size=3),
        privacy=murmur.Privacy(epsilon=8.0, delta=1e-5),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# -- data ------------------------------------------------------------------------------------


def test_loader_dataset_and_tensors_give_the_same_rows() -> None:
    x, y = _data(50)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    for source in ((x, y), loader, TensorDataset(x, y), [(x[:20], y[:20]), (x[20:], y[20:])]):
        gx, gy = murmur.as_tensors(source)
        assert torch.equal(gx, x) and torch.equal(gy, y)


def test_a_loader_that_yields_nothing_says_why() -> None:
    x, y = _data(5)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, drop_last=True)
    with pytest.raises(TrainingError, match=r"yielded nothing.*drop_last"):
        _training(data=loader).check()


def test_data_that_is_not_pairs_is_refused() -> None:
    with pytest.raises(ConfigError, match="not an \\(x, y\\) pair"):
        murmur.as_tensors([torch.zeros(3)])
    with pytest.raises(ConfigError, match="DataLoader"):
        murmur.as_tensors(42)
    with pytest.raises(ConfigError, match="3 rows but y has 2"):
        murmur.as_tensors((torch.zeros(3, 2), torch.zeros(2)))


# -- the model -------------------------------------------------------------------------------


class _Grows(nn.Module):
    """A model whose parameter changes shape at its first forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        if self.w.shape[0] != x.shape[1]:
            self.w = nn.Parameter(torch.zeros(x.shape[1], 2))
        return x @ self.w


def test_parameters_that_change_shape_are_refused() -> None:
    with pytest.raises(TrainingError, match="changed shape during a forward pass"):
        _training(model=_Grows).check()


def test_lazy_modules_are_refused_with_what_to_do() -> None:
    lazy = nn.LazyLinear(2)
    with pytest.raises(TrainingError, match=r"nn\.Linear instead of nn\.LazyLinear"):
        _training(model=lazy).check()


def test_a_factory_that_builds_different_shapes_is_refused() -> None:
    sizes = iter([4, 5, 6, 7])
    with pytest.raises(TrainingError, match="different shapes on two calls"):
        _training(
            model=lambda: nn.Sequential(nn.Linear(6, (s := next(sizes))), nn.Linear(s, 2))
        ).check()


def test_model_and_data_that_do_not_fit_are_refused() -> None:
    with pytest.raises(TrainingError, match="input width"):
        _training(model=lambda: nn.Linear(5, 2)).check()
    with pytest.raises(TrainingError, match="one number"):
        _training(loss=lambda out, y: F.cross_entropy(out, y, reduction="none")).check()


def test_a_module_is_copied_and_a_factory_is_seeded() -> None:
    module = nn.Linear(6, 2)
    built = _training(model=module).build_model()
    assert built is not module and torch.equal(built.weight, module.weight)
    a = _training(seed=3).build_model()
    b = _training(seed=3).build_model()
    c = _training(seed=4).build_model()
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)


# -- settings --------------------------------------------------------------------------------


def test_group_size_below_the_minimum_says_what_to_use() -> None:
    with pytest.raises(ConfigError, match=r"below the minimum of 3; use SecureGroups\(size=3\)"):
        murmur.SecureGroups(size=2)
    with pytest.raises(ConfigError, match="sum reveals the other member"):
        murmur.SecureGroups(size=4, min_size=2)
    with pytest.raises(ConfigError, match="not a baseline"):
        murmur.Baseline("secure")
    with pytest.raises(ConfigError, match="averaging must be one of"):
        murmur.Baseline("gossip-magic")


def test_the_ring_option_maps_to_the_all_reduce_and_bad_values_say_so() -> None:
    from gossip.allreduce import AllReduceConfig

    auto = murmur.SecureGroups(size=8, ring="auto", value_bound=4.0)  # 4 guard bits: 2^22
    assert auto.ring_bits is None
    assert AllReduceConfig(bound=auto.value_bound, bits=auto.ring_bits).ring_bits(8) == 32
    wide = murmur.SecureGroups(size=8, ring="auto")  # the default bound 1e6 needs 64 bits
    assert AllReduceConfig(bound=wide.value_bound, bits=wide.ring_bits).ring_bits(8) == 64
    assert murmur.SecureGroups().ring_bits == 64 and murmur.SecureGroups(ring="32").ring_bits == 32
    with pytest.raises(ConfigError, match="ring must be"):
        murmur.SecureGroups(ring="16")
    with pytest.raises(ConfigError, match="value_bound must be"):
        murmur.SecureGroups(value_bound=0.0)


def test_impossible_budgets_are_refused_up_front() -> None:
    with pytest.raises(PrivacyError, match="Raise epsilon, or lower rounds"):
        _training(privacy=murmur.Privacy(epsilon=0.01), rounds=200, local_steps=10).check()
    with pytest.raises(PrivacyError, match=r"one round .* already spends more"):
        _training(privacy=murmur.Privacy(epsilon=0.5, noise_multiplier=0.3)).check()
    with pytest.raises(ConfigError, match="privacy unit"):
        murmur.Privacy(unit="household")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="delta"):
        _training(privacy=murmur.Privacy(delta=2.0)).check()


def test_learning_rate_comes_from_lr_or_an_sgd_optimizer() -> None:
    model = nn.Linear(6, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    cfg = _training(lr=None, optimizer=sgd).train_config()
    assert (cfg.lr, cfg.momentum) == (0.05, 0.5)
    with pytest.raises(ConfigError, match="plain SGD steps"):
        _training(optimizer=torch.optim.Adam(model.parameters())).train_config()
    with pytest.raises(ConfigError, match="give a learning rate"):
        _training(lr=None).train_config()


# -- the simulator path ----------------------------------------------------------------------


def test_simulate_runs_the_description_and_records_every_round(tmp_path: Path) -> None:
    seen: list[int] = []
    result = murmur.simulate(
        _training(rounds=3), peers=6, on_round=lambda r: seen.append(r.round), latency_ms=5.0
    )
    assert seen == [0, 1, 2, 3]
    assert result.scenario.algorithm == "secure" and result.scenario.group_size == 3
    eps = [r.epsilon for r in result.records]
    assert eps[0] == 0.0 and all(a < b for a, b in itertools.pairwise(eps))
    assert eps[-1] <= 8.0 + 1e-6
    assert result.records[-1].bytes_sent > 0
    png = murmur.plot({"secure": result}, tmp_path)
    assert png.exists() and png.stat().st_size > 1000
    # One result, or its records, plot as they are (no dict needed).
    for one in (result, result.records):
        png.unlink()
        assert murmur.plot(one, tmp_path) == png and png.stat().st_size > 1000


def test_compare_runs_variants_of_one_description() -> None:
    runs = murmur.compare(
        _training(rounds=2),
        {"secure": {}, "no-dp": {"privacy": murmur.Privacy.off()}},
        peers=6,
    )
    assert list(runs) == ["secure", "no-dp"]
    assert runs["no-dp"].records[-1].epsilon == 0.0
    assert runs["secure"].records[-1].epsilon > 0.0
    with pytest.raises(ConfigError, match="not a Training field"):
        murmur.compare(_training(), {"x": {"peers": 3}})


def test_simulator_settings_cannot_redefine_the_training() -> None:
    with pytest.raises(ConfigError, match="part of the Training"):
        murmur.scenario_for(_training(), peers=4, rounds=9)
    with pytest.raises(ConfigError, match="unknown simulator setting"):
        murmur.scenario_for(_training(), peers=4, latency=3)
    momentum = torch.optim.SGD(nn.Linear(6, 2).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ConfigError, match="plain SGD"):
        murmur.scenario_for(_training(lr=None, optimizer=momentum), peers=4)
    cap_only = murmur.Privacy(epsilon=None, noise_multiplier=1.0)
    assert math.isfinite(murmur.scenario_for(_training(privacy=cap_only), peers=4).epsilon)


async def test_simulate_inside_an_event_loop_says_how_to_call_it() -> None:
    with pytest.raises(ConfigError, match=r"asyncio\.to_thread"):
        murmur.simulate(_training())


def test_the_metric_is_named_after_its_function_unless_named() -> None:
    from gossip.tasks import roc_auc

    assert _training().metric_label == "accuracy"
    assert _training(metric=roc_auc).metric_label == "roc_auc"
    assert _training(metric=roc_auc, metric_name="AUC").task().metric_name == "AUC"
