"""Learning tasks that work offline: a model factory, train and held-out tensors, a loss, a metric.

Built in: ``digits`` (scikit-learn ``load_digits``, MLP or logistic regression), ``breast_cancer``
(``load_breast_cancer``, logistic regression), ``credit`` (a synthetic, imbalanced
credit-scoring table generated from a seed, see :func:`credit_task`), ``mnist`` (from a local
cache, never downloaded: :func:`mnist_task`) and ``synthetic`` (the
federated Synthetic(alpha, beta) benchmark of Li et al., FedProx 2020: one device per peer,
so the data grows with the network, see :func:`synthetic_task`). A user plugs in their own
model and data with :meth:`Task.from_tensors`.

Features are standardized with the mean and standard deviation of the training split. In a real
deployment these would be public preprocessing constants the peers agree on; here they are fixed
once per task and shared by every peer, so they are not a per-round release.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from floor.errors import ConfigError

__all__ = [
    "CREDIT_FEATURES",
    "TASK_NAMES",
    "Evaluation",
    "Task",
    "accuracy",
    "breast_cancer_task",
    "credit_task",
    "digits_task",
    "make_task",
    "mlp",
    "mnist_task",
    "roc_auc",
    "softmax_regression",
    "synthetic_task",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(outputs, targets)`` reduced by the mean over the batch."""

MetricFn = Callable[[Tensor, Tensor], float]
"""``metric(outputs, targets)``: a score where higher is better."""


def accuracy(outputs: Tensor, targets: Tensor) -> float:
    """The fraction of rows whose arg-max class equals the target."""
    if outputs.shape[0] == 0:
        return math.nan
    return float((outputs.argmax(dim=1) == targets).float().mean())


def roc_auc(outputs: Tensor, targets: Tensor) -> float:
    """Area under the ROC curve of class 1 (binary tasks), by the rank-sum formula, ties halved."""
    score = outputs[:, 1] - outputs[:, 0] if outputs.dim() == 2 else outputs
    pos = targets == 1
    n_pos = int(pos.sum())
    n_neg = int(targets.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    s = score.detach().double()
    less = (s[pos].unsqueeze(1) > s[~pos].unsqueeze(0)).double().sum()
    ties = (s[pos].unsqueeze(1) == s[~pos].unsqueeze(0)).double().sum()
    return float((less + 0.5 * ties) / (n_pos * n_neg))


def softmax_regression(n_features: int, n_classes: int) -> Callable[[], nn.Module]:
    """A factory for (multinomial) logistic regression: one linear layer over the classes."""
    return lambda: nn.Linear(n_features, n_classes)


def mlp(n_features: int, n_classes: int, hidden: int = 64) -> Callable[[], nn.Module]:
    """A factory for a one-hidden-layer MLP with ReLU."""
    return lambda: nn.Sequential(
        nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
    )


@dataclass(frozen=True)
class Evaluation:
    """Loss and metric of a model on a split."""

    loss: float
    metric: float
    metric_name: str


@dataclass(frozen=True, eq=False)
class Task:
    """A model factory, training tensors, a held-out test split, a loss and a metric.

    ``model_factory`` must build the same architecture every call; :meth:`build_model` seeds it
    so that every peer starts from the same public initial model.
    """

    name: str
    model_factory: Callable[[], nn.Module]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    loss_fn: LossFn = F.cross_entropy
    metric: MetricFn = accuracy
    metric_name: str = "accuracy"
    owners: Tensor | None = None
    """For data that comes in devices (``synthetic``): the device of each training row; the
    simulator's ``natural`` partition gives device k's rows to peer k."""

    def __post_init__(self) -> None:
        if self.owners is not None and tuple(self.owners.shape) != (self.n_train,):
            raise ConfigError(f"task {self.name!r}: owners must give one device per train row")
        for split, x, y in (
            ("train", self.x_train, self.y_train),
            ("test", self.x_test, self.y_test),
        ):
            if x.dim() < 1 or y.dim() != 1 or x.shape[0] != y.shape[0]:
                raise ConfigError(
                    f"task {self.name!r}: {split} inputs and labels must have the same number of "
                    f"rows (x {tuple(x.shape)}, y {tuple(y.shape)})"
                )
        if self.x_train.shape[0] == 0:
            raise ConfigError(f"task {self.name!r}: the training split is empty")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ConfigError(f"task {self.name!r}: train and test inputs differ in shape")
        if self.num_classes < 2:
            raise ConfigError(f"task {self.name!r}: num_classes must be at least 2")

    @property
    def n_train(self) -> int:
        """Number of training rows."""
        return int(self.x_train.shape[0])

    def build_model(self, seed: int = 0) -> nn.Module:
        """Build the model with torch's default initialization, seeded (global RNG untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.model_factory()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, split: Literal["test", "train"] = "test") -> Evaluation:
        """Loss and metric of ``model`` on the test (default) or training split."""
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_train, self.y_train)
        was_training = model.training
        model.eval()
        try:
            out = model(x)
        finally:
            model.train(was_training)
        return Evaluation(float(self.loss_fn(out, y)), self.metric(out, y), self.metric_name)

    @classmethod
    def from_tensors(
        cls,
        name: str,
        model_factory: Callable[[], nn.Module],
        x: Tensor,
        y: Tensor,
        *,
        x_test: Tensor | None = None,
        y_test: Tensor | None = None,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_classes: int | None = None,
        loss_fn: LossFn = F.cross_entropy,
        metric: MetricFn = accuracy,
        metric_name: str = "accuracy",
    ) -> Task:
        """A task from a user's model factory and tensors.

        Give ``x_test``/``y_test``, or a ``test_fraction`` of ``(x, y)`` is held out (stratified
        by label, seeded). Labels must be class indices (int64) for the default loss.
        """
        if (x_test is None) != (y_test is None):
            raise ConfigError("give both x_test and y_test, or neither")
        if x_test is None or y_test is None:
            x, y, x_test, y_test = _split(x, y, test_fraction, seed)
        if num_classes is None:
            num_classes = max(2, int(torch.cat([y, y_test]).max()) + 1)
        return cls(
            name, model_factory, x, y, x_test, y_test, num_classes, loss_fn, metric, metric_name
        )


def _split(x: Tensor, y: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, ...]:
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    idx = np.arange(int(x.shape[0]))
    labels = y.numpy()
    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 else None
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
    tr_t, te_t = torch.as_tensor(np.sort(tr)), torch.as_tensor(np.sort(te))
    return x[tr_t], y[tr_t], x[te_t], y[te_t]


def _standardized(
    name: str,
    x: np.ndarray[Any, Any],
    y: np.ndarray[Any, Any],
    factory: Callable[[], nn.Module],
    n_classes: int,
    test_fraction: float,
    seed: int,
    metric: MetricFn = accuracy,
    metric_name: str = "accuracy",
) -> Task:
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    x_tr, y_tr, x_te, y_te = _split(xt, yt, test_fraction, seed)
    mean = x_tr.mean(dim=0)
    std = x_tr.std(dim=0)
    # Constant features (corner pixels of digits) keep their scale rather than blow up.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return Task(
        name,
        factory,
        (x_tr - mean) / std,
        y_tr,
        (x_te - mean) / std,
        y_te,
        n_classes,
        metric=metric,
        metric_name=metric_name,
    )


def digits_task(
    *,
    model: Literal["mlp", "logreg"] = "mlp",
    hidden: int = 64,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Task:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes, 64 features), standardized."""
    from sklearn.datasets import load_digits

    data = load_digits()
    if model == "mlp":
        factory = mlp(64, 10, hidden)
    elif model == "logreg":
        factory = softmax_regression(64, 10)
    else:
        raise ConfigError(f"digits model must be 'mlp' or 'logreg', got {model!r}")
    return _standardized(
        f"digits-{model}", data.data, data.target, factory, 10, test_fraction, seed
    )


def breast_cancer_task(*, test_fraction: float = 0.2, seed: int = 0) -> Task:
    """scikit-learn's Wisconsin breast cancer (569 rows, 30 features, 2 classes), logistic
    regression, standardized."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    return _standardized(
        "breast_cancer",
        data.data,
        data.target,
        softmax_regression(30, 2),
        2,
        test_fraction,
        seed,
    )


CREDIT_FEATURES = (
    "age",
    "log_income",
    "debt_to_income",
    "credit_lines",
    "late_payments_2y",
    "years_employed",
    "utilization",
    "home_owner",
    "region_0",
    "region_1",
    "region_2",
    "region_3",
)


def _credit_table(n: int, default_rate: float, seed: int) -> tuple[np.ndarray[Any, Any], ...]:
    """Generate the synthetic credit table; see :func:`credit_task` for the model."""
    rng = np.random.default_rng(seed)
    age = rng.uniform(21.0, 70.0, n)
    log_income = rng.normal(10.6, 0.5, n) + 0.006 * (age - 45.0)
    dti = rng.beta(2.0, 5.0, n)
    lines = rng.poisson(4.0, n).astype(np.float64)
    utilization = rng.beta(2.0, 3.0, n)
    late = rng.poisson(0.3 + 1.2 * utilization, n).astype(np.float64)
    employed = np.minimum(age - 18.0, rng.exponential(6.0, n))
    home = (rng.random(n) < 1.0 / (1.0 + np.exp(-(age - 40.0) / 8.0))).astype(np.float64)
    region = rng.integers(0, 4, n)
    onehot = np.eye(4)[region]
    risk = (
        2.2 * dti
        + 0.55 * late
        + 1.6 * utilization**2
        - 0.9 * (log_income - 10.6)
        - 0.03 * employed
        - 0.35 * home
        + 0.04 * np.maximum(0.0, 30.0 - age)
        + np.array([0.0, 0.25, -0.2, 0.4])[region]
    )
    # 1.6: strong enough that a linear model reaches ROC AUC ~0.84, far from perfect.
    logit = 1.6 * risk + 0.3 * rng.standard_normal(n)  # noise: what the features do not explain
    # Pick the intercept so that the expected default rate hits default_rate.
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        rate = float(np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))))
        lo, hi = (mid, hi) if rate < default_rate else (lo, mid)
    p = 1.0 / (1.0 + np.exp(-(logit + lo)))
    y = (rng.random(n) < p).astype(np.int64)
    x = np.column_stack([age, log_income, dti, lines, late, employed, utilization, home, onehot])
    return x, y


def credit_task(
    *,
    n_samples: int = 6000,
    default_rate: float = 0.08,
    model: Literal["logreg", "mlp"] = "logreg",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Task:
    """A synthetic credit-scoring table: predict default (class 1, rare) from 12 features.

    The generator (numpy ``default_rng(seed)``, so the table is a pure function of the
    arguments): age ~ U(21, 70); log income ~ N(10.6, 0.5) rising slightly with age;
    debt-to-income ~ Beta(2, 5); credit lines ~ Poisson(4); card utilization ~ Beta(2, 3);
    late payments ~ Poisson(0.3 + 1.2 utilization); years employed ~ min(age - 18, Exp(6));
    home owner more likely with age; one of four regions (one-hot). The default log-odds are 1.6
    times a fixed, partly non-linear risk score of these (debt, late payments, utilization
    squared, income, employment, home, youth, region) plus N(0, 0.3^2) noise; the intercept is
    solved so that the expected default rate is ``default_rate`` (8% by default: imbalanced).
    The metric is ROC AUC (~0.8-0.9 for logistic regression), since accuracy is ~92% for a
    model that never predicts a default.
    """
    if n_samples < 50:
        raise ConfigError(f"credit n_samples must be at least 50, got {n_samples}")
    if not 0.0 < default_rate < 0.5:
        raise ConfigError(f"credit default_rate must be in (0, 0.5), got {default_rate}")
    x, y = _credit_table(n_samples, default_rate, seed)
    d = len(CREDIT_FEATURES)
    if model == "logreg":
        factory = softmax_regression(d, 2)
    elif model == "mlp":
        factory = mlp(d, 2, 32)
    else:
        raise ConfigError(f"credit model must be 'logreg' or 'mlp', got {model!r}")
    return _standardized(
        f"credit-{model}", x, y, factory, 2, test_fraction, seed, roc_auc, "roc_auc"
    )


def synthetic_task(
    *,
    devices: int = 100,
    iid: bool = True,
    alpha: float = 0.0,
    beta: float = 0.0,
    model: Literal["logreg", "mlp"] = "logreg",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Task:
    """The synthetic federated data of Li et al. (FedProx, 2020): 60 features, 10 classes.

    ``iid=False`` is Synthetic(alpha, beta): as in the paper, device k draws u_k ~ N(0, alpha)
    and B_k ~ N(0, beta) (variances), its own softmax model W_k ~ N(u_k, 1) (10 x 60) and
    b_k ~ N(u_k, 1), a feature mean v_k[j] ~ N(B_k, 1), rows x ~ N(v_k, diag(j^-1.2)) and
    labels y = argmax(W_k x + b_k): alpha says how much the devices' models differ, beta how
    much their inputs do (both 0 is still non-IID: every device has its own W_k, so with many
    devices no single model fits them all; centralized logistic regression reaches about 0.82
    with 100 devices and 0.26 with 1,000). ``iid=True`` (the default) is the paper's
    Synthetic-IID: one model W, b ~ N(0, 1) shared by every device and x ~ N(0, diag(j^-1.2)),
    learnable at any number of devices. The paper draws heavy-tailed device sizes;
    here a device has 50 + floor(LogNormal(3, 1)) rows (about 80 on average, at most 1,000),
    so 1,000 peers hold about 80,000 rows. ``test_fraction`` of each device's rows form the
    shared held-out split; ``owners`` says which device each training row came from. Features
    are standardized with the training split's mean and deviation, as for the other tasks
    (the paper does not; without it the j^-1.2 scales make SGD converge several times slower).
    """
    if devices < 1:
        raise ConfigError(f"synthetic devices must be at least 1, got {devices}")
    if alpha < 0 or beta < 0:
        raise ConfigError("synthetic alpha and beta must be >= 0")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d, classes = 60, 10
    if model == "logreg":
        factory = softmax_regression(d, classes)
    elif model == "mlp":
        factory = mlp(d, classes, 64)
    else:
        raise ConfigError(f"synthetic model must be 'logreg' or 'mlp', got {model!r}")
    rng = np.random.default_rng([seed, 0x5E7])
    sizes = np.minimum(50 + rng.lognormal(3.0, 1.0, devices).astype(np.int64), 1000)
    scale = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # the sd: variance j^-1.2
    train_x, train_y, test_x, test_y, owners = [], [], [], [], []
    shared_w, shared_b = rng.normal(0.0, 1.0, (classes, d)), rng.normal(0.0, 1.0, classes)
    for k in range(devices):
        if iid:
            w, b, v = shared_w, shared_b, np.zeros(d)
        else:
            u, b_mean = rng.normal(0.0, math.sqrt(alpha)), rng.normal(0.0, math.sqrt(beta))
            w = rng.normal(u, 1.0, (classes, d))
            b = rng.normal(u, 1.0, classes)
            v = rng.normal(b_mean, 1.0, d)
        x = rng.normal(v, scale, (int(sizes[k]), d))
        y = np.argmax(x @ w.T + b, axis=1)
        cut = max(1, round(len(x) * (1.0 - test_fraction)))
        train_x.append(x[:cut])
        train_y.append(y[:cut])
        test_x.append(x[cut:])
        test_y.append(y[cut:])
        owners.append(np.full(cut, k))
    x_tr = torch.as_tensor(np.concatenate(train_x), dtype=torch.float32)
    x_te = torch.as_tensor(np.concatenate(test_x), dtype=torch.float32)
    mean, std = x_tr.mean(dim=0), x_tr.std(dim=0).clamp_min(1e-6)  # as for the other tasks
    return Task(
        f"synthetic-iid-{model}" if iid else f"synthetic({alpha:g},{beta:g})-{model}",
        factory,
        (x_tr - mean) / std,
        torch.as_tensor(np.concatenate(train_y), dtype=torch.int64),
        (x_te - mean) / std,
        torch.as_tensor(np.concatenate(test_y), dtype=torch.int64),
        classes,
        owners=torch.as_tensor(np.concatenate(owners), dtype=torch.int64),
    )


DATASETS_ENV = "MURMUR_DATASETS"
"""Environment variable naming the local dataset cache (default ``~/.cache/murmur/datasets``)."""
_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def _read_idx(path: Path) -> np.ndarray[Any, Any]:
    """An IDX file (MNIST's format: magic, dims, big-endian sizes, uint8 data), .gz or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(bytearray(data), dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != math.prod(shape):
        raise ConfigError(f"{path} is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def mnist_task(
    *,
    root: str | Path | None = None,
    model: Literal["logreg", "mlp"] = "mlp",
    seed: int = 0,
) -> Task:
    """MNIST (60,000 + 10,000 images of 28 x 28, 10 classes) from a local cache; no download.

    Reads torchvision's layout, ``<root>/MNIST/raw/train-images-idx3-ubyte[.gz]`` and the
    three sibling files, where ``root`` is the argument, else ``$MURMUR_DATASETS``, else
    ``~/.cache/murmur/datasets``. Nothing is fetched at run time: a missing file is a
    ``ConfigError`` naming it and the way to fill the cache once (``pip install
    'murmur[vision]'`` and torchvision's ``MNIST(root, download=True)``). Pixels are scaled to
    [0, 1] and standardized with the training split's mean and deviation.
    """
    base = Path(root or os.environ.get(DATASETS_ENV) or Path.home() / ".cache/murmur/datasets")
    raw = base.expanduser() / "MNIST" / "raw"
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for key, name in _MNIST_FILES.items():
        found = next((raw / f for f in (name, name + ".gz") if (raw / f).exists()), None)
        if found is None:
            raise ConfigError(
                f"task mnist: {raw / name}[.gz] not found (the dataset is read from a local "
                f"cache, never downloaded at run time; set {DATASETS_ENV} or fill it once with "
                f"pip install 'murmur[vision]' and python -c \"import torchvision; "
                f"torchvision.datasets.MNIST('{base}', download=True)\")"
            )
        arrays[key] = _read_idx(found)
    if model == "logreg":
        factory = softmax_regression(784, 10)
    elif model == "mlp":
        factory = mlp(784, 10, 128)
    else:
        raise ConfigError(f"mnist model must be 'logreg' or 'mlp', got {model!r}")
    x_tr = torch.as_tensor(arrays["train_x"].reshape(-1, 784), dtype=torch.float32) / 255.0
    x_te = torch.as_tensor(arrays["test_x"].reshape(-1, 784), dtype=torch.float32) / 255.0
    y_tr = torch.as_tensor(arrays["train_y"].astype(np.int64))
    y_te = torch.as_tensor(arrays["test_y"].astype(np.int64))
    if x_tr.shape[0] != y_tr.shape[0] or x_te.shape[0] != y_te.shape[0]:
        raise ConfigError(f"task mnist: images and labels in {raw} differ in count")
    mean, std = x_tr.mean(dim=0), x_tr.std(dim=0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # the always-black border
    del seed  # the split is MNIST's own; the seed only seeds the model (build_model)
    return Task(f"mnist-{model}", factory, (x_tr - mean) / std, y_tr, (x_te - mean) / std, y_te, 10)


_TASKS: dict[str, Callable[..., Task]] = {
    "digits": digits_task,
    "breast_cancer": breast_cancer_task,
    "credit": credit_task,
    "mnist": mnist_task,
    "synthetic": synthetic_task,
}
TASK_NAMES = tuple(sorted(_TASKS))
"""Names accepted by :func:`make_task`."""


def make_task(name: str, **options: Any) -> Task:
    """Build a built-in task by name (see :data:`TASK_NAMES`)."""
    try:
        factory = _TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}") from None
    try:
        return factory(**options)
    except TypeError as exc:
        raise ConfigError(f"task {name!r}: {exc}") from exc
