"""Scenario files and flags: defaults, overrides, sweeps, and one clear error per bad field."""

from __future__ import annotations

from pathlib import Path

import pytest

from floor.errors import ConfigError
from simulator.cli import main
from simulator.config import Scenario, load_scenario, load_sweep, parse_value

SCENARIOS = Path(__file__).resolve().parent.parent / "examples" / "scenarios"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def test_tables_map_to_fields_and_overrides_win(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[run]\npeers = 40\n[network]\nlatency_ms = 5\n[privacy]\nprivacy = "none"\n'
    )
    s = load_scenario(path, {"peers": 12})
    assert s.peers == 12
    assert s.latency_ms == 5.0 and isinstance(s.latency_ms, float)
    assert s.privacy == "none"
    assert s.rounds == Scenario().rounds


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[run]\npeers = 1\n", "peers"),
        ("[run]\npeers = 'many'\n", "peers"),
        ("[network]\nloss = 1.5\n", "loss"),
        ("[network]\npeers = 3\n", "network.peers"),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("bogus = 3\n", "bogus"),
        ("[run]\nalgorithm = 'telepathy'\n", "algorithm"),
        ("[run\npeers = 3\n", "not valid TOML"),
        ("[sweep]\nfield = 'epsilon'\nvalues = ['a']\n", "epsilon"),
    ],
)
def test_bad_files_name_the_field(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=needle):
        load_scenario(path)
        load_sweep(path)


def test_bad_flags_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv in (
        ["--peers", "x"],
        ["--churn", "2"],
        ["--sweep", "nope=1,2"],
        [str(tmp_path / "missing.toml")],
    ):
        assert main([*argv, "--out", str(tmp_path / "o"), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("murmur-sim: error:"), err
        assert "Traceback" not in err[0]


def test_sweeps_from_flags_and_files(tmp_path: Path) -> None:
    sweep = load_sweep(None, "epsilon=1,4,8")
    assert sweep is not None and sweep.values == (1.0, 4.0, 8.0)
    runs = sweep.scenarios(Scenario())
    assert [r.epsilon for r in runs] == [1.0, 4.0, 8.0]
    assert len({r.name for r in runs}) == 3
    path = write(tmp_path, "[sweep]\nfield = 'algorithm'\nvalues = ['group', 'pairwise']\n")
    swept = load_sweep(path)
    assert swept is not None and swept.field == "algorithm"
    assert parse_value("rounds", "7") == 7
    with pytest.raises(ConfigError, match="rounds"):
        parse_value("rounds", "seven")


def test_example_scenarios_load() -> None:
    files = sorted(SCENARIOS.glob("*.toml"))
    assert len(files) >= 4
    for path in files:
        load_scenario(path)
        load_sweep(path)
