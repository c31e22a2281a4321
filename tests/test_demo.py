"""``murmur demo``: N daemons train to completion and none is left behind, also on Ctrl-C."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = shlex.split(os.environ.get("MURMUR_TEST_CLI", "")) or [sys.executable, "-m", "p2p.cli"]
pytestmark = pytest.mark.slow


def _pids(out: str) -> list[int]:
    return [int(p) for p in re.findall(r"^started peer \d+ \(pid (\d+)\)$", out, re.M)]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(240)
def test_demo_with_four_peers_runs_to_completion_and_leaves_nothing(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*CLI, "demo", "--peers", "4", "--rounds", "2", "--no-live", "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    pids = _pids(out)
    assert len(pids) == 4, out
    final = out[out.rindex("PEER  ADDRESS") :]
    rows = re.findall(r"^\s+(\d)\s+127\.0\.0\.1:(\d+)\s+(\S+)\s+(\d+)/2\s", final, re.M)
    assert [r[0] for r in rows] == ["0", "1", "2", "3"], final
    assert all(r[2] in ("done", "budget_spent") and r[3] == "2" for r in rows), final
    eps = [float(e) for e in re.findall(r"epsilon spent <= ([\d.]+)", out)]
    assert eps and 0 < eps[0] <= 8.0 + 1e-6
    assert "stopped 4 daemon(s); exit codes [0, 0, 0, 0]" in out
    assert all(_gone(pid) for pid in pids)
    assert not any(_listening(int(r[1])) for r in rows)
    for i in range(4):  # each daemon trained in its own data dir and saved its model
        assert (tmp_path / f"peer{i}" / "model.pt").exists()


@pytest.mark.timeout(120)
def test_ctrl_c_stops_every_daemon(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*CLI, "demo", "--peers", "3", "--rounds", "50", "--no-live", "--workdir", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("started peer 2 "):
                break
        assert lines and lines[-1].startswith("started peer 2 "), "".join(lines)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "interrupted: stopping the daemons" in out
    assert re.search(r"stopped 3 daemon\(s\)", out), out
    pids = _pids(out)
    assert len(pids) == 3 and all(_gone(pid) for pid in pids), out


def test_demo_refuses_too_few_peers_in_one_line() -> None:
    proc = subprocess.run(
        [*CLI, "demo", "--peers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "murmur: error: --peers must be at least 3 (the smallest secure group)"
    ]
