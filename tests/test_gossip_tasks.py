"""Tasks (offline datasets, user tasks) and partitioning across peers."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from floor.errors import ConfigError
from gossip.data import partition, peer_shards
from gossip.ideal import train_centralized
from gossip.tasks import (
    TASK_NAMES,
    Task,
    accuracy,
    credit_task,
    make_task,
    roc_auc,
    synthetic_task,
)


@pytest.mark.parametrize("name", [n for n in TASK_NAMES if n != "mnist"])  # mnist: below
def test_builtin_tasks_are_deterministic_standardized_and_split(name: str) -> None:
    a, b = make_task(name), make_task(name)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    n_total = a.n_train + a.x_test.shape[0]
    rounding = 2 if a.owners is None else int(a.owners.max()) + 1  # synthetic: per device
    assert a.x_test.shape[0] == pytest.approx(0.2 * n_total, abs=rounding)
    assert a.x_train.mean(dim=0).abs().max() < 1e-4
    assert a.y_train.dtype == torch.int64
    assert set(a.y_test.unique().tolist()) <= set(range(a.num_classes))
    out = a.build_model()(a.x_test)
    assert out.shape == (a.x_test.shape[0], a.num_classes)


def test_other_seed_gives_other_split() -> None:
    a, b = make_task("digits", seed=0), make_task("digits", seed=1)
    assert not torch.equal(a.y_train, b.y_train)


def test_digits_logreg_option_is_linear() -> None:
    model = make_task("digits", model="logreg").build_model()
    assert isinstance(model, nn.Linear) and model.weight.shape == (10, 64)
    with pytest.raises(ConfigError, match="mlp"):
        make_task("digits", model="cnn")


def test_credit_is_imbalanced_reproducible_and_learnable() -> None:
    task = credit_task(seed=3)
    rate = float(torch.cat([task.y_train, task.y_test]).float().mean())
    assert 0.05 < rate < 0.11
    assert torch.equal(credit_task(seed=3).x_train, task.x_train)
    assert not torch.equal(credit_task(seed=4).x_train, task.x_train)
    assert task.metric_name == "roc_auc"
    trained = train_centralized(task, steps=300, lr=0.1, batch_size=64)
    assert trained.metric > 0.75  # features carry signal; chance is 0.5


def test_build_model_is_seeded_and_leaves_global_rng_alone() -> None:
    task = make_task("breast_cancer")
    state = torch.random.get_rng_state()
    m1, m2 = task.build_model(5), task.build_model(5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(next(task.build_model(6).parameters()), next(m1.parameters()))


def test_user_task_from_tensors() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen)
    y = (x[:, 0] > 0).long()
    task = Task.from_tensors("mine", lambda: nn.Linear(5, 2), x, y, test_fraction=0.25)
    assert task.n_train == 150 and task.num_classes == 2
    assert train_centralized(task, steps=200, lr=0.5).metric > 0.9
    explicit = Task.from_tensors(
        "mine2", lambda: nn.Linear(5, 2), x, y, x_test=x[:10], y_test=y[:10]
    )
    assert explicit.n_train == 200
    with pytest.raises(ConfigError, match="rows"):
        Task.from_tensors("bad", lambda: nn.Linear(5, 2), x, y[:-1])
    with pytest.raises(ConfigError, match="both"):
        Task.from_tensors("bad", lambda: nn.Linear(5, 2), x, y, x_test=x)


def test_make_task_refuses_unknown_names_and_options() -> None:
    with pytest.raises(ConfigError, match="unknown task"):
        make_task("imagenet")
    with pytest.raises(ConfigError, match="digits"):
        make_task("digits", colour=True)


def test_metrics() -> None:
    out = torch.tensor([[2.0, 1.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    y = torch.tensor([0, 1, 0, 1])
    assert accuracy(out, y) == 0.5
    # scores for class 1: -1, 1, 3, -1 -> positives {1, -1}, negatives {-1, 3}: pairs won 1.5 of 4
    assert roc_auc(out, y) == pytest.approx(1.5 / 4)


# -- partitioning -----------------------------------------------------------------------------


def _labels(n: int, c: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, c, n)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(20, 400),
    c=st.integers(2, 10),
    k=st.integers(1, 20),
    scheme=st.sampled_from(["iid", "dirichlet", "label"]),
    alpha=st.floats(0.05, 5.0),
    min_samples=st.integers(0, 5),
    seed=st.integers(0, 2**31),
)
def test_partition_is_a_deterministic_disjoint_cover_with_minimum(
    n: int, c: int, k: int, scheme: str, alpha: float, min_samples: int, seed: int
) -> None:
    y = _labels(n, c, seed)
    if n < k * max(min_samples, 1):
        with pytest.raises(ConfigError):
            partition(y, k, scheme=scheme, min_samples=min_samples)  # type: ignore[arg-type]
        return
    kw = {"scheme": scheme, "alpha": alpha, "min_samples": min_samples, "seed": seed}
    labels_per_peer = min(2, len(np.unique(y)))
    parts = partition(y, k, labels_per_peer=labels_per_peer, **kw)  # type: ignore[arg-type]
    again = partition(y, k, labels_per_peer=labels_per_peer, **kw)  # type: ignore[arg-type]
    assert len(parts) == k
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))
    allrows = np.concatenate(parts)
    assert np.array_equal(np.sort(allrows), np.arange(n))
    assert all(p.shape[0] >= min_samples for p in parts)


def test_iid_parts_are_balanced() -> None:
    parts = partition(_labels(1000, 10, 0), 7, scheme="iid")
    sizes = [p.shape[0] for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = _labels(4000, 10, 1)

    def skew(alpha: float) -> float:
        parts = partition(y, 16, scheme="dirichlet", alpha=alpha, seed=2)
        # mean total-variation distance between a peer's label mix and the global mix
        glob = np.bincount(y, minlength=10) / y.shape[0]
        tv = [
            0.5 * np.abs(np.bincount(y[p], minlength=10) / p.shape[0] - glob).sum() for p in parts
        ]
        return float(np.mean(tv))

    assert skew(0.1) > skew(1.0) > skew(100.0)
    assert skew(100.0) < 0.1 < 0.5 < skew(0.1)


def test_label_scheme_gives_each_peer_its_few_labels() -> None:
    y = _labels(2000, 10, 3)
    parts = partition(y, 10, scheme="label", labels_per_peer=2, seed=0)
    for i, p in enumerate(parts):
        assert set(np.unique(y[p]).tolist()) == {(2 * i) % 10, (2 * i + 1) % 10}
    with pytest.raises(ConfigError, match="labels_per_peer"):
        partition(y, 10, scheme="label", labels_per_peer=11)


def test_partition_refuses_bad_arguments() -> None:
    y = _labels(50, 3, 0)
    with pytest.raises(ConfigError, match="scheme"):
        partition(y, 2, scheme="round-robin")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="alpha"):
        partition(y, 2, scheme="dirichlet", alpha=0.0)
    with pytest.raises(ConfigError, match="peers"):
        partition(y, 30, min_samples=2)


def test_peer_shards_follow_indices() -> None:
    x = torch.arange(10.0).unsqueeze(1)
    y = torch.arange(10)
    parts = partition(y, 3, seed=4)
    shards = peer_shards(x, y, parts)
    for (xs, ys), p in zip(shards, parts, strict=True):
        assert ys.tolist() == p.tolist() and xs[:, 0].long().tolist() == p.tolist()


# ---------------------------------------------------------------- synthetic (FedProx)


def test_synthetic_grows_with_the_devices_and_records_owners() -> None:
    small, large = synthetic_task(devices=10), synthetic_task(devices=200)
    assert torch.equal(synthetic_task(devices=10).x_train, small.x_train)  # seeded
    assert large.n_train > 15 * small.n_train  # about 80 rows a device, 80% of them trained
    assert small.owners is not None and large.owners is not None
    counts = torch.bincount(large.owners, minlength=200)
    assert counts.min() >= 40 and counts.max() <= 800
    assert small.x_train.shape[1] == 60 and small.num_classes == 10
    assert small.name == "synthetic-iid-logreg"
    assert synthetic_task(devices=10, iid=False, alpha=1, beta=1).name == "synthetic(1,1)-logreg"
    with pytest.raises(ConfigError):
        synthetic_task(devices=0)
    with pytest.raises(ConfigError):
        synthetic_task(alpha=-1.0)
    with pytest.raises(ConfigError, match="logreg"):
        synthetic_task(model="cnn")  # type: ignore[arg-type]


def test_synthetic_iid_is_one_learnable_model_and_niid_is_not() -> None:
    """Synthetic-IID: one model labels every device, so a pooled linear model fits it well;
    Synthetic(0, 0): every device has its own model, and a pooled one fits far worse."""
    iid = synthetic_task(devices=300, seed=1)
    niid = synthetic_task(devices=300, iid=False, seed=1)
    fit_iid = train_centralized(iid, steps=400, lr=0.5, batch_size=256)
    fit_niid = train_centralized(niid, steps=400, lr=0.5, batch_size=256)
    assert fit_iid.metric > 0.8
    assert fit_niid.metric < fit_iid.metric - 0.15
    # beta moves each device's inputs: device means differ far more than under iid.
    shifted = synthetic_task(devices=20, iid=False, beta=4.0, seed=1)
    assert shifted.owners is not None and iid.owners is not None

    def spread(task: Task) -> float:
        assert task.owners is not None
        means = torch.stack(
            [task.x_train[task.owners == k].mean(0) for k in range(int(task.owners.max()) + 1)]
        )
        return float(means.std(0).mean())

    assert spread(shifted) > 2 * spread(iid)


def test_the_daemon_names_the_same_tasks() -> None:
    from p2p.config import TASKS  # named there so that config errors answer without torch

    assert TASKS == TASK_NAMES


# ---------------------------------------------------------------- mnist from a local cache


def _idx(path: Path, array: np.ndarray, gz: bool) -> None:
    head = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = head + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def _fake_mnist(root: Path, n_train: int = 300, n_test: int = 100) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y_tr, y_te = rng.integers(0, 10, n_train), rng.integers(0, 10, n_test)
    # Images whose brightest row is the label: learnable, like a real dataset.
    x_tr = rng.integers(0, 60, (n_train, 28, 28))
    x_tr[np.arange(n_train), y_tr * 2 + 3, :] = 255
    x_te = rng.integers(0, 60, (n_test, 28, 28))
    x_te[np.arange(n_test), y_te * 2 + 3, :] = 255
    _idx(raw / "train-images-idx3-ubyte", x_tr, gz=True)
    _idx(raw / "train-labels-idx1-ubyte", y_tr, gz=False)
    _idx(raw / "t10k-images-idx3-ubyte", x_te, gz=False)
    _idx(raw / "t10k-labels-idx1-ubyte", y_te, gz=True)


def test_mnist_reads_a_local_cache_and_never_downloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MURMUR_DATASETS", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"nowhere/MNIST/raw/train-images-idx3-ubyte\[\.gz\]"):
        make_task("mnist")
    with pytest.raises(ConfigError, match=r"murmur\[vision\]"):
        make_task("mnist")
    _fake_mnist(tmp_path / "cache")
    monkeypatch.setenv("MURMUR_DATASETS", str(tmp_path / "cache"))
    task = make_task("mnist", model="logreg")
    assert task.x_train.shape == (300, 784) and task.x_test.shape == (100, 784)
    assert task.x_train.mean(dim=0).abs().max() < 1e-4
    assert task.name == "mnist-logreg" and task.num_classes == 10
    assert train_centralized(task, steps=200, lr=0.1, batch_size=64).metric > 0.9
    truncated = tmp_path / "cache" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(ConfigError, match="truncated"):
        make_task("mnist")
