"""Helpers for the subprocess daemon tests: start `murmur start` on free ports, always stop it.

No tests here; ``test_daemon.py`` and ``test_cli_daemon.py`` import the fixtures.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The console script, as a module so that the venv's interpreter runs it.
CLI = shlex.split(os.environ.get("MURMUR_TEST_CLI", "")) or [sys.executable, "-m", "p2p.cli"]

FAST_CONFIG = """
log_level = "debug"
[membership]
exchange_interval_s = 0.3
ping_interval_s = 0.25
ping_timeout_s = 0.6
suspect_after_s = 1.0
dead_after_s = 2.0
join_timeout_s = 1.0
join_attempts = 2
join_retry_delay_s = 0.2
[transport]
shutdown_timeout_s = 0.5
request_timeout_s = 2.0
"""
DEAD_AFTER_S = 2.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_cli(*args: str, timeout: float = 30.0, env: dict[str, str] | None = None) -> Any:
    """Run a short ``murmur`` command to completion; returns the CompletedProcess."""
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def get_json(port: int, path: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return json.loads(resp.read())


class DaemonProc:
    """One ``murmur start`` subprocess with its own data dir and log file."""

    def __init__(self, workdir: Path, name: str, config_file: Path, *extra: str) -> None:
        self.data_dir = workdir / name
        self.log_path = workdir / f"{name}.log"
        self.config_file = config_file
        self.extra = extra
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, *more: str) -> DaemonProc:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns the handle
        try:
            self.proc = subprocess.Popen(
                [
                    *CLI,
                    "start",
                    "--listen",
                    self.address,
                    "--data-dir",
                    str(self.data_dir),
                    "--config",
                    str(self.config_file),
                    *self.extra,
                    *more,
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=ROOT,
            )
        finally:
            log.close()
        return self

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: {self.log()}")
            try:
                status: dict[str, Any] = get_json(self.port, "/v1/status", timeout=1.0)
                if status.get("uptime_s", 0) > 0:
                    return status
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready: {self.log()}")

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = get_json(self.port, "/v1/status")
        return result

    def peers(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = get_json(self.port, "/v1/peers")
        return result

    def peer_ids(self, state: str | None = None) -> set[str]:
        return {p["peer_id"] for p in self.peers() if state is None or p["state"] == state}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return "(no log)"

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running after {timeout} s: {self.log()}") from None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 5 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.1)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    """Factory of daemon subprocesses (not started); every one is stopped at teardown."""
    config = tmp_path / "fast.toml"
    config.write_text(FAST_CONFIG)
    made: list[DaemonProc] = []

    def factory(name: str, *extra: str) -> DaemonProc:
        proc = DaemonProc(tmp_path, name, config, *extra)
        made.append(proc)
        return proc

    yield factory
    for proc in made:  # signal all first, then wait: stops run in parallel
        proc.signal(signal.SIGTERM)
    for proc in made:
        proc.stop()
