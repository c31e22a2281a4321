"""Every example runs as written, at a small size, and does what it says."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 90.0) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    return out


def test_every_example_is_tested_here() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == {
        "credit_local.py",
        "compare_in_simulator.py",
        "join_network.py",
        "quickstart.py",
    }


def test_the_readme_python_block_is_the_quickstart_and_it_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    quick = (EXAMPLES / "quickstart.py").read_text(encoding="utf-8")
    assert quick in blocks, "README's Python block is not examples/quickstart.py"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        cwd=tmp_path,  # it writes murmur-plots/ where it runs
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^(\d+) ([\d.]+) epsilon=([\d.]+)$", proc.stdout, re.M)
    assert [int(r[0]) for r in rows] == [0, 5, 10, 15, 20, 25], proc.stdout
    assert float(rows[-1][1]) > 0.6  # it learns (about 0.80)
    assert 7.0 < float(rows[-1][2]) <= 8.0 + 1e-6
    assert (tmp_path / "murmur-plots" / "sweep.png").stat().st_size > 10_000


def test_credit_local_trains_a_custom_model_across_local_daemons() -> None:
    out = _finish(
        _start(
            "credit_local.py",
            "--peers",
            "3",
            "--rounds",
            "2",
            "--samples",
            "900",
            "--group-size",
            "3",
        )
    )
    rows = re.findall(r"^(\d)\s+(\d)\s+(\w+)\s+(\d)\s+([\d.-]+)\s+([\d.]+)$", out, re.M)
    assert len(rows) == 6, out  # 3 peers x 2 rounds
    assert {r[0] for r in rows} == {"0", "1", "2"}
    assert all(0.0 < float(r[5]) <= 8.0 + 1e-6 for r in rows)
    assert "done:" in out and "of 6 peer-rounds" in out


def test_compare_in_simulator_writes_one_plot(tmp_path: Path) -> None:
    out = _finish(
        _start("compare_in_simulator.py", "--peers", "6", "--rounds", "2", "--out", str(tmp_path))
    )
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    for label in ("secure k=4, eps=8", "secure k=4, eps=2", "push-sum, no DP"):
        assert label in out


def test_join_network_runs_exactly_as_its_docstring_says(tmp_path: Path) -> None:
    """The three commands of the docstring, with only the port changed to a free one."""
    doc = (EXAMPLES / "join_network.py").read_text(encoding="utf-8")
    commands = re.findall(r"^    python examples/join_network.py (.*)$", doc, re.M)
    assert len(commands) == 3, commands
    port = str(_free_port())
    procs = []
    try:
        for i, command in enumerate(commands):  # the joiners retry until the first answers
            args = command.replace("7070", port).split()
            if i == 0:
                args += ["--data-dir", str(tmp_path / "first")]
            procs.append(_start("join_network.py", *args))
        outs = [_finish(p, timeout=240.0) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert "started a new network" in outs[0]
    assert all(f"joined through 127.0.0.1:{port}" in o for o in outs[1:])
    for out in outs:
        assert len(re.findall(r"^round \d+: ok group=3 ", out, re.M)) == 10, out
        assert "done: 10 of 10 rounds averaged in a group" in out
    # the first peer kept its identity and privacy spend in the data dir it was given
    assert (tmp_path / "first" / "identity.key").exists()
    assert (tmp_path / "first" / "privacy_budget.json").exists()
