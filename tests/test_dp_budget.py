"""dp.Budget: exact stopping, persistence across restarts, corrupt or missing state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dp
from floor.errors import AccountingError, BudgetExhausted, BudgetStateError

DELTA = 1e-5


def eps_after(rounds: int, z: float = 2.0, q: float = 1.0) -> float:
    return dp.compute_epsilon(noise_multiplier=z, rounds=rounds, delta=DELTA, sample_rate=q)


@pytest.mark.parametrize(("z", "q"), [(2.0, 1.0), (3.0, 0.2)])
def test_contributions_stop_exactly_before_exceeding(z: float, q: float) -> None:
    allowed = 4
    eps_max = (eps_after(allowed, z, q) + eps_after(allowed + 1, z, q)) / 2
    budget = dp.Budget(eps_max, DELTA)
    event = dp.PrivacyEvent(z, q)
    for i in range(allowed):
        assert budget.spend(event) == pytest.approx(eps_after(i + 1, z, q), rel=1e-9)
    assert not budget.can_spend(event)
    with pytest.raises(BudgetExhausted, match="eps_max"):
        budget.check(event)
    with pytest.raises(BudgetExhausted):
        budget.spend(event)
    assert budget.spent_epsilon == pytest.approx(eps_after(allowed, z, q), rel=1e-9)
    assert budget.events == (dp.PrivacyEvent(z, q, allowed),)


def test_boundary_is_inclusive() -> None:
    budget = dp.Budget(eps_after(3), DELTA)
    for _ in range(3):
        budget.spend(noise_multiplier=2.0)
    assert budget.spent_epsilon == eps_after(3)
    with pytest.raises(BudgetExhausted):
        budget.spend(noise_multiplier=2.0)


def test_keyword_and_event_forms_agree() -> None:
    a = dp.Budget(50.0, DELTA)
    b = dp.Budget(50.0, DELTA)
    a.spend(noise_multiplier=3.0, sample_rate=0.1, count=7)
    b.spend([dp.PrivacyEvent(3.0, 0.1, 3), (3.0, 0.1, 4)])
    assert a.spent_epsilon == b.epsilon_spent
    with pytest.raises(AccountingError, match="not both"):
        a.check(dp.PrivacyEvent(1.0), noise_multiplier=1.0)
    with pytest.raises(AccountingError):
        a.check()


def test_restart_keeps_spent_epsilon(tmp_path: Path) -> None:
    path = tmp_path / "budget.json"
    first = dp.Budget(eps_after(4), DELTA, path)
    assert path.exists()  # created at once, so a later must_exist restart can find it
    first.spend(noise_multiplier=2.0, count=3)
    restarted = dp.Budget(eps_after(4), DELTA, path, must_exist=True)
    assert restarted.spent_epsilon == pytest.approx(eps_after(3), rel=1e-12)
    restarted.spend(noise_multiplier=2.0)
    with pytest.raises(BudgetExhausted):
        dp.Budget(eps_after(4), DELTA, path).spend(noise_multiplier=2.0)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries behind


def test_refused_spend_is_not_persisted(tmp_path: Path) -> None:
    path = tmp_path / "budget.json"
    budget = dp.Budget(eps_after(1), DELTA, path)
    budget.spend(noise_multiplier=2.0)
    before = path.read_bytes()
    with pytest.raises(BudgetExhausted):
        budget.spend(noise_multiplier=2.0)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # truncated
        lambda text: "",  # empty
        lambda text: "\x00\xff garbage",
        lambda text: "[1, 2, 3]",
        lambda text: text.replace('"events": []', '"events": [[2.0, 1.0, 1]]'),  # checksum
        lambda text: text.replace("murmur-dp-budget", "something-else"),
    ],
)
def test_corrupt_state_is_an_error_not_a_reset(tmp_path: Path, damage: object) -> None:
    path = tmp_path / "budget.json"
    dp.Budget(10.0, DELTA, path)
    damaged = damage(path.read_text())  # type: ignore[operator]
    path.write_text(damaged)
    with pytest.raises(BudgetStateError, match="corrupt"):
        dp.Budget(10.0, DELTA, path)
    assert path.read_text() == damaged  # nothing was overwritten


def test_tampered_event_with_valid_checksum_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "budget.json"
    dp.Budget(10.0, DELTA, path)
    document = json.loads(path.read_text())
    del document["sha256"]
    document["events"] = [[-1.0, 1.0, 1]]
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    import hashlib

    document["sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(document))
    with pytest.raises(BudgetStateError, match="bad event"):
        dp.Budget(10.0, DELTA, path)


def test_missing_state_where_expected(tmp_path: Path) -> None:
    with pytest.raises(BudgetStateError, match="missing"):
        dp.Budget(10.0, DELTA, tmp_path / "gone.json", must_exist=True)
    assert not (tmp_path / "gone.json").exists()


def test_state_for_other_parameters_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "budget.json"
    dp.Budget(10.0, DELTA, path)
    with pytest.raises(BudgetStateError, match="eps_max"):
        dp.Budget(20.0, DELTA, path)
    with pytest.raises(BudgetStateError, match="delta"):
        dp.Budget(10.0, 1e-6, path)


def test_unwritable_state_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(BudgetStateError, match="cannot write"):
        dp.Budget(10.0, DELTA, tmp_path / "no-such-dir" / "budget.json")


@pytest.mark.parametrize(("eps_max", "delta"), [(0.0, 1e-5), (-1.0, 1e-5), (1.0, 0.0), (1.0, 1)])
def test_budget_argument_validation(eps_max: float, delta: float) -> None:
    with pytest.raises(AccountingError):
        dp.Budget(eps_max, delta)


def test_a_persistent_budget_cannot_be_reset_by_deleting_its_file(tmp_path: Path) -> None:
    path = tmp_path / "budget.json"
    first = dp.Budget.persistent(8.0, 1e-5, path)
    first.spend(noise_multiplier=1.0)
    spent = first.spent_epsilon
    assert dp.Budget.persistent(8.0, 1e-5, path).spent_epsilon == pytest.approx(spent)
    path.unlink()  # the state goes, the marker stays: no silent fresh budget
    with pytest.raises(BudgetStateError, match="missing"):
        dp.Budget.persistent(8.0, 1e-5, path)
