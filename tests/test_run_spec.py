"""One run description: the daemon, the simulator and the Python API share RunSpec's names and
defaults, and each turns itself into the same RunSpec."""

from __future__ import annotations

import dataclasses
import math

import pytest

import murmur
from floor.errors import ConfigError
from gossip.spec import ALGORITHMS, ALIASES, SPEC, SPEC_FIELDS, RunSpec, algorithm_name
from p2p.config import TrainingConfig
from simulator.config import Scenario, load_scenario


def _defaults(cls: type) -> dict[str, object]:
    return {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }


@pytest.mark.parametrize("front", [Scenario, TrainingConfig])
def test_every_front_end_declares_every_shared_field_with_its_default(front: type) -> None:
    declared = _defaults(front)
    missing = [name for name in SPEC_FIELDS if name not in declared]
    assert not missing, f"{front.__name__} lacks {missing}"
    differ = {n: declared[n] for n in SPEC_FIELDS if declared[n] != getattr(SPEC, n)}
    assert not differ, f"{front.__name__} defaults differ from RunSpec: {differ}"


def test_front_ends_turn_into_the_same_spec() -> None:
    changes = {"rounds": 7, "lr": 0.1, "group_size": 5, "privacy": "peer", "epsilon": 4.0}
    want = RunSpec(**changes)  # type: ignore[arg-type]
    assert Scenario(**changes).spec() == want  # type: ignore[arg-type]
    assert TrainingConfig(**changes).spec() == want  # type: ignore[arg-type]
    assert load_scenario(None, changes).spec() == want


def test_the_python_api_defaults_are_the_spec_defaults() -> None:
    privacy, averaging = murmur.Privacy(), murmur.SecureGroups()
    assert privacy.epsilon == SPEC.epsilon and privacy.delta == SPEC.delta
    assert privacy.clip == SPEC.clip and privacy.unit == SPEC.privacy
    assert averaging.algorithm == SPEC.algorithm and averaging.group_size == SPEC.group_size
    assert averaging.stage_timeout_s == SPEC.stage_timeout_s
    fields = {**privacy.spec_fields(), **averaging.spec_fields()}
    assert RunSpec(**fields) == RunSpec()


@pytest.mark.parametrize(("alias", "name"), sorted(ALIASES.items()))
def test_older_algorithm_names_are_read_and_canonicalised(alias: str, name: str) -> None:
    assert algorithm_name(alias) == name
    assert Scenario(algorithm=alias).algorithm == name
    assert RunSpec(algorithm=alias).algorithm == name


@pytest.mark.parametrize(
    ("field", "value"),
    [("group_size", 2), ("min_group_size", 2), ("lr", 0.0), ("ring", "16"), ("period_s", 0.0)],
)
def test_a_bad_shared_value_is_refused_by_every_front_end_naming_the_field(
    field: str, value: object
) -> None:
    for build in (RunSpec, Scenario, TrainingConfig):
        with pytest.raises(ConfigError, match=field):
            TrainingConfig(**{field: value}).spec() if build is TrainingConfig else build(
                **{field: value}
            )


def test_no_cap_needs_a_noise_multiplier_unless_privacy_is_off() -> None:
    with pytest.raises(ConfigError, match="epsilon"):
        RunSpec(epsilon=math.inf)
    assert RunSpec(epsilon=math.inf, noise_multiplier=1.0).epsilon == math.inf
    assert RunSpec(epsilon=math.inf, privacy="none").private is False


def test_every_algorithm_is_known_to_the_simulator() -> None:
    for name in ALGORITHMS:
        assert Scenario(algorithm=name, peers=8).spec().algorithm == name
