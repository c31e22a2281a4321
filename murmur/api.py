"""The Python API's description of a training run: model, data, loss, averaging and privacy.

One :class:`Training` describes what to learn and how to protect it. The same object runs on a
real network (:class:`murmur.Peer`, ``murmur.api_peer``) and in the simulator
(:func:`murmur.simulate`, ``murmur.api_sim``)::

    training = murmur.Training(
        model=lambda: nn.Linear(12, 2),        # a factory (seeded: every peer starts equal)
        data=loader,                           # DataLoader, (x, y) tensors or a dataset
        loss=F.cross_entropy,
        lr=0.1,                                # or optimizer=torch.optim.SGD(...)
        eval_data=(x_test, y_test),
        averaging=murmur.SecureGroups(size=4),
        privacy=murmur.Privacy(epsilon=8.0, delta=1e-5, clip=1.0, unit="record"),
        rounds=20,
    )

Mistakes a user can make are found up front by :meth:`Training.check` (called by both runners)
and raised as ``floor.errors`` types whose message says what to change.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dp.accounting import PrivacyEvent, compose_epsilon
from floor.errors import ConfigError, PrivacyError, TrainingError
from gossip.learner import TrainConfig
from gossip.model import Layout
from gossip.privacy import PrivacyConfig, PrivacyUnit, plan_privacy
from gossip.spec import ALGORITHMS, PRIVACY_UNITS, SPEC, RunSpec, algorithm_name
from gossip.tasks import Task, accuracy

__all__ = [
    "MIN_GROUP_SIZE",
    "Averaging",
    "Baseline",
    "Privacy",
    "SecureGroups",
    "Training",
    "as_tensors",
]

MIN_GROUP_SIZE = SPEC.min_group_size
"""The smallest secure group: in a group of two, the sum reveals the other member's update."""

MAX_NOISE_MULTIPLIER = 50.0
"""A budget that needs more noise than this per step is refused: nothing would be learned."""

Data = Any
"""A ``DataLoader``, any iterable of ``(x, y)`` batches, a dataset of ``(x, y)`` rows, or an
``(x, y)`` pair of tensors."""


@dataclass(frozen=True)
class Privacy:
    """Differential privacy of each peer's contribution (``gossip.spec.RunSpec``'s defaults).

    ``unit``: ``"record"`` protects each row (DP-SGD during local training), ``"peer"`` all of a
    peer's data (its round update is clipped to ``clip`` and noised), ``"none"`` disables DP.
    Give a total ``epsilon`` (the noise is calibrated so that ``rounds`` contributions fit), or a
    ``noise_multiplier`` (then ``epsilon`` is only a cap, or None for none).
    ``dp_noise`` says where the ``peer`` unit's noise goes: ``auto`` (distributed integer
    shares inside secure groups, local float noise otherwise), ``local`` or ``distributed``;
    ``colluders`` is how many members of a group are assumed to collude (distributed noise).
    """

    epsilon: float | None = SPEC.epsilon
    delta: float = SPEC.delta
    clip: float = SPEC.clip
    unit: Literal["record", "peer", "none"] = "record"
    noise_multiplier: float | None = None
    dp_noise: Literal["auto", "local", "distributed"] = "auto"
    colluders: int = SPEC.colluders

    def __post_init__(self) -> None:
        if self.unit not in PRIVACY_UNITS:
            raise ConfigError(f"privacy unit must be 'record', 'peer' or 'none', got {self.unit!r}")
        if self.unit != "none" and self.epsilon is None and not self.noise_multiplier:
            raise ConfigError(f"privacy unit {self.unit}: give epsilon or noise_multiplier")

    @classmethod
    def off(cls) -> Privacy:
        """No differential privacy (baselines; the masks still hide individual updates)."""
        return cls(epsilon=None, unit="none")

    def config(self, rounds: int) -> PrivacyConfig:
        """The gossip-layer settings for ``rounds`` planned contributions (checked)."""
        if self.unit == "none":
            return PrivacyConfig.none()
        return PrivacyConfig(
            unit=PrivacyUnit(self.unit),
            epsilon=self.epsilon,
            delta=self.delta,
            clip=self.clip,
            noise_multiplier=self.noise_multiplier,
            rounds=rounds,
        )

    def spec_fields(self) -> dict[str, Any]:
        """These settings as ``RunSpec`` fields (no cap: an infinite epsilon)."""
        return {
            "privacy": self.unit,
            "epsilon": math.inf if self.epsilon is None else float(self.epsilon),
            "delta": self.delta,
            "clip": self.clip,
            "noise_multiplier": float(self.noise_multiplier or 0.0),
            "dp_noise": self.dp_noise,
            "colluders": self.colluders,
        }


@dataclass(frozen=True)
class Averaging:
    """How peers average each round. Use :class:`SecureGroups` or :class:`Baseline`.

    The fields are ``gossip.spec.RunSpec``'s, with its names and defaults.
    """

    algorithm: str = SPEC.algorithm
    """``secure``, ``plain`` (groups without masks), ``pairwise``, ``push-sum`` or ``dpsgd``."""
    group_size: int = SPEC.group_size
    min_group_size: int = SPEC.min_group_size
    stage_timeout_s: float = SPEC.stage_timeout_s
    """Deadline of each group stage (a member that misses it is dropped)."""
    ring: str = SPEC.ring
    """Ring of group averaging: ``"64"``, ``"32"`` or ``"auto"`` (32 bits when
    ``value_bound`` and the group size leave a fixed-point step of at most 2^-20)."""
    value_bound: float = SPEC.value_bound
    """Public bound on every |w x| and w a peer contributes (w: its row count, or 1 under DP);
    a larger value fails that peer's round with ``RingOverflow``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "algorithm", algorithm_name(self.algorithm))
        RunSpec(**self.spec_fields())  # every check, with the field's name

    def spec_fields(self) -> dict[str, Any]:
        """These settings as ``RunSpec`` fields."""
        return {
            "algorithm": self.algorithm,
            "group_size": self.group_size,
            "min_group_size": self.min_group_size,
            "stage_timeout_s": self.stage_timeout_s,
            "ring": self.ring,
            "value_bound": self.value_bound,
        }

    @property
    def ring_bits(self) -> Literal[32, 64] | None:
        """``ring`` as ``gossip.allreduce.AllReduceConfig.bits`` (None: auto)."""
        return None if self.ring == "auto" else (32 if self.ring == "32" else 64)


def SecureGroups(
    size: int = SPEC.group_size,
    *,
    min_size: int = SPEC.min_group_size,
    stage_timeout_s: float = SPEC.stage_timeout_s,
    ring: str = SPEC.ring,
    value_bound: float = SPEC.value_bound,
) -> Averaging:
    """Secure aggregation in groups of ``size`` peers (at least ``min_size``, at least 3): each
    peer's update is hidden by pairwise masks; only the group's weighted mean is revealed.

    ``ring="auto"`` with a small ``value_bound`` (e.g. 100 when DP sets every weight to 1)
    uses Z_2^32: half the bytes and mask work of the default Z_2^64."""
    if isinstance(size, int) and size < SPEC.min_group_size:
        raise ConfigError(
            f"group size {size} is below the minimum of {SPEC.min_group_size}; use "
            f"SecureGroups(size={SPEC.min_group_size}) or larger (in a group of two, the sum "
            f"reveals the other member's update)"
        )
    return Averaging("secure", size, min_size, stage_timeout_s, ring, value_bound)


def Baseline(name: str, *, group_size: int = SPEC.group_size) -> Averaging:
    """A plaintext averaging baseline: ``plain`` groups, ``pairwise`` gossip, ``push-sum`` or
    ``dpsgd`` (simulator only). Updates travel unmasked: for research comparisons."""
    try:
        canonical = algorithm_name(name)
    except ConfigError:
        raise ConfigError(
            f"averaging must be one of {', '.join(a for a in ALGORITHMS if a != 'secure')} "
            f"(a baseline), or SecureGroups(size); got {name!r}"
        ) from None
    if canonical == "secure":
        raise ConfigError("'secure' is not a baseline; use SecureGroups(size)")
    return Averaging(name, group_size, MIN_GROUP_SIZE)


def as_tensors(data: Data, what: str = "data") -> tuple[Tensor, Tensor]:
    """All rows of ``data`` as one ``(x, y)`` pair (a loader's batches concatenated).

    The loader's batching is not used: privacy accounting needs the learner to sample rows
    itself (Poisson sampling at ``sample_rate``).
    """
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
    else:
        if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, list):
            items: Iterable[Any] = (data[i] for i in range(len(data)))  # a map-style dataset
        elif isinstance(data, Iterable):
            items = data
        else:
            raise ConfigError(
                f"{what} must be a DataLoader, a dataset, an iterable of (x, y) batches or an "
                f"(x, y) pair of tensors; got {type(data).__name__}"
            )
        xs, ys = [], []
        for i, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ConfigError(f"{what}: item {i} is not an (x, y) pair")
            bx, by = (torch.as_tensor(t) for t in item)
            single = by.dim() == 0  # a dataset's row rather than a loader's batch
            xs.append(bx.unsqueeze(0) if single else bx)
            ys.append(by.unsqueeze(0) if single else by)
        if not xs:
            raise TrainingError(
                f"{what} yielded nothing: check that the dataset is not empty and that the "
                "loader does not drop its only (incomplete) batch (drop_last=True)"
            )
        x, y = torch.cat(xs), torch.cat(ys)
    if x.shape[0] == 0:
        raise TrainingError(f"{what} has no rows")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"{what}: x has {x.shape[0]} rows but y has {y.shape[0]}")
    return x, y


@dataclass(frozen=True, eq=False)
class Training:
    """A decentralized private training run, independent of where it runs.

    ``model`` is a factory returning a fresh ``nn.Module`` (built with ``seed``, so every peer
    starts from the same public model) or a module (copied; then every peer must build it with
    the same parameters). ``data`` is this peer's data (on a network) or everyone's data (in the
    simulator, split among the simulated peers). Give ``lr`` or an SGD ``optimizer`` (its lr
    and momentum are used; DP-SGD takes plain SGD steps). ``metric(outputs, targets)`` scores
    ``eval_data`` (higher is better); round reports carry it as ``accuracy``.
    """

    model: Callable[[], nn.Module] | nn.Module
    data: Data
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    lr: float | None = None
    optimizer: torch.optim.Optimizer | None = None
    eval_data: Data | None = None
    metric: Callable[[Tensor, Tensor], float] = accuracy
    metric_name: str | None = None
    """How plots and summaries name ``metric`` (default: the function's name)."""
    averaging: Averaging = field(default_factory=SecureGroups)
    privacy: Privacy = field(default_factory=Privacy)
    rounds: int = SPEC.rounds
    local_steps: int = SPEC.local_steps
    sample_rate: float = SPEC.sample_rate
    seed: int = SPEC.seed
    name: str = "custom"

    def spec(self) -> RunSpec:
        """This run as the one run description (``ConfigError`` naming a bad field)."""
        train = self.train_config()
        return RunSpec(
            rounds=self.rounds,
            local_steps=self.local_steps,
            lr=train.lr,
            sample_rate=self.sample_rate,
            seed=self.seed,
            **self.privacy.spec_fields(),
            **self.averaging.spec_fields(),
        )

    @property
    def metric_label(self) -> str:
        """``metric_name``, or the metric function's name (``accuracy``, ``roc_auc``...)."""
        return self.metric_name or str(getattr(self.metric, "__name__", "metric"))

    def model_factory(self) -> Callable[[], nn.Module]:
        """A factory building the initial model (a copy of ``model`` if a module was given)."""
        model = self.model
        if isinstance(model, nn.Module):
            return lambda: copy.deepcopy(model)
        if not callable(model):
            raise ConfigError(f"model must be an nn.Module or a factory, got {type(model)}")
        return model

    def build_model(self) -> nn.Module:
        """The initial model, built with ``seed`` (torch's global generator is left alone)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            built = self.model_factory()()
        if not isinstance(built, nn.Module):
            raise ConfigError(f"the model factory returned {type(built).__name__}, not a Module")
        return built

    def train_config(self) -> TrainConfig:
        """Local-training settings (learning rate and momentum from ``lr`` or ``optimizer``)."""
        lr, momentum = self.lr, 0.0
        if self.optimizer is not None:
            if type(self.optimizer) is not torch.optim.SGD:
                raise ConfigError(
                    f"optimizer {type(self.optimizer).__name__} is not supported: local training "
                    "takes plain SGD steps (what DP-SGD accounts for); pass lr=... or an SGD"
                )
            group = self.optimizer.param_groups[0]
            lr = float(group["lr"]) if lr is None else lr
            momentum = float(group.get("momentum", 0.0))
        if lr is None:
            raise ConfigError("give a learning rate: lr=0.1, or optimizer=torch.optim.SGD(...)")
        return TrainConfig(
            local_steps=self.local_steps, lr=lr, sample_rate=self.sample_rate, momentum=momentum
        )

    def task(self) -> Task:
        """This description as a ``gossip.tasks.Task`` (data as tensors, a held-out split)."""
        x, y = as_tensors(self.data)
        x_test = y_test = None
        if self.eval_data is not None:
            x_test, y_test = as_tensors(self.eval_data, "eval_data")
        return Task.from_tensors(
            self.name,
            self.model_factory(),
            x,
            y,
            seed=self.seed,
            loss_fn=self.loss,
            metric=self.metric,
            metric_name=self.metric_label,
            x_test=x_test,
            y_test=y_test,
        )

    def check(self) -> tuple[Tensor, Tensor]:
        """Find the mistakes a user can make before any peer starts; returns the data tensors.

        Raises ``ConfigError`` (a setting), ``TrainingError`` (model, data or loss) or
        ``PrivacyError`` (a budget nothing fits in); each message says what to change.
        """
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}")
        train = self.train_config()
        x, y = as_tensors(self.data)
        model = self.build_model()
        _check_model(model, self.build_model(), x, y, self.loss)
        self.check_budget(train)
        return x, y

    def check_budget(self, train: TrainConfig | None = None) -> None:
        """Refuse a budget that admits no round, or that needs so much noise nothing is learned."""
        if self.privacy.unit == "none":
            return
        train = train or self.train_config()
        config = self.privacy.config(self.rounds)
        if config.noise_multiplier is None:
            # Calibration could search for a very long time; test the limit first.
            fixed = PrivacyConfig(
                unit=config.unit,
                epsilon=None,
                delta=config.delta,
                clip=config.clip,
                noise_multiplier=MAX_NOISE_MULTIPLIER,
                rounds=config.rounds,
            )
            if _epsilon(fixed, train, self.rounds) > (config.epsilon or math.inf):
                raise PrivacyError(
                    f"epsilon={config.epsilon} over {self.rounds} rounds of {train.local_steps} "
                    f"steps would need a noise multiplier above {MAX_NOISE_MULTIPLIER:g}: nothing "
                    "would be learned. Raise epsilon, or lower rounds, local_steps or sample_rate"
                )
        elif config.epsilon is not None and _epsilon(config, train, 1) > config.epsilon:
            raise PrivacyError(
                f"one round with noise_multiplier={config.noise_multiplier} already spends more "
                f"than epsilon={config.epsilon}: raise epsilon or the noise multiplier"
            )


def _epsilon(config: PrivacyConfig, train: TrainConfig, rounds: int) -> float:
    plan = plan_privacy(config, local_steps=train.local_steps, sample_rate=train.sample_rate)
    event = plan.event
    if event is None:
        return 0.0
    if not isinstance(event, PrivacyEvent):
        raise ConfigError("the API's budget check plans local noise only")
    scaled = type(event)(event.noise_multiplier, event.sample_rate, event.count * rounds)
    return float(compose_epsilon([scaled], delta=config.delta))


def _check_model(
    model: nn.Module,
    again: nn.Module,
    x: Tensor,
    y: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor],
) -> None:
    lazy = [
        n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)
    ]
    if lazy:
        raise TrainingError(
            f"parameter {lazy[0]!r} is not initialized yet (a lazy module): its shape would "
            "change at the first forward pass. Give the layer its input size (nn.Linear "
            "instead of nn.LazyLinear), or run one forward pass inside the model factory"
        )
    before = Layout.of(model)
    if before.size == 0:
        raise TrainingError("the model has no trainable parameters: there is nothing to train")
    if Layout.of(again) != before:
        raise TrainingError(
            "the model factory built parameters of different shapes on two calls: every peer "
            "must build the same architecture (no random choice of layers)"
        )
    batch = slice(0, min(8, int(x.shape[0])))
    try:
        value = loss(model(x[batch]), y[batch])
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise TrainingError(
            f"the model and loss fail on the first rows of the data: {exc}. Check the input "
            "width, the label type (class indices as int64 for cross_entropy) and the loss"
        ) from exc
    if Layout.of(model) != before:
        raise TrainingError(
            "the model's parameters changed shape during a forward pass; peers can only average "
            "parameters of a fixed shape. Build every layer with its final size"
        )
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise TrainingError(
            "the loss must return one number (reduced by the mean over the batch), got "
            f"{getattr(value, 'shape', type(value))}"
        )
    if not math.isfinite(float(value.detach())):
        raise TrainingError("the loss is NaN or infinite on the first rows: check the data")
