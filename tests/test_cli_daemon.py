"""`murmur start/status/peers`: one clear error line on bad input, output for people and programs,
and configuration precedence (file < environment < flags)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from test_daemon_support import CLI, ROOT, DaemonProc, free_port, run_cli, spawn

from floor.errors import ConfigError
from p2p import cmd_daemon
from p2p.admin import PEERS_PATH, STATUS_PATH
from p2p.cli import build_parser
from p2p.config import DaemonConfig, load_config, parse_address

__all__ = ["spawn"]


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("ts=")]
    assert len(lines) == 1, stderr  # one line beside the log: no usage block
    assert "error" in lines[0].lower(), stderr
    return lines[0]


def test_start_failures_print_one_line_and_exit_nonzero(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    junk_key = tmp_path / "junk.key"
    junk_key.write_text("not a key")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("listen = [unclosed")
    quick = tmp_path / "quick.toml"
    quick.write_text("[membership]\njoin_attempts = 1\njoin_timeout_s = 0.5\n")
    data = str(tmp_path / "data")
    cases = {
        "port in use": ["--listen", f"127.0.0.1:{busy_port}"],
        "unreachable bootstrap": [
            "--bootstrap",
            f"127.0.0.1:{free_port()}",
            "--config",
            str(quick),
        ],
        "bad key": ["--network-key-file", str(junk_key)],
        "bad listen": ["--listen", "not-an-address"],
        "bad allow": ["--allow", "not-a-peer-id"],
        "bad toml": ["--config", str(bad_toml)],
        "bad flag": ["--no-such-flag"],
        "bad number": ["--epsilon", "abc"],
        "training flags without a task": ["--rounds", "3", "--group-size", "5"],
        "group of two": ["--task", "digits", "--group-size", "2"],
        "group of one": ["--task", "digits", "--group-size", "1"],
    }
    expect = {
        "port in use": "cannot listen",
        "unreachable bootstrap": "no bootstrap peer answered",
        "bad key": "64 hex characters",
        "bad listen": "HOST:PORT",
        "bad allow": "",
        "bad toml": "not valid TOML",
        "bad flag": "unrecognized arguments",
        "bad number": "argument --epsilon: invalid float value: 'abc' (see murmur start --help)",
        "training flags without a task": "--rounds, --group-size set what to train, but no task",
        "group of two": "group_size must be at least 3",
        "group of one": "group_size must be at least 3",
    }
    procs = {}
    try:
        for name, args in cases.items():
            procs[name] = subprocess.Popen(
                [*CLI, "start", "--data-dir", data, "--listen", f"127.0.0.1:{free_port()}", *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        for name, proc in procs.items():
            _, stderr = proc.communicate(timeout=30)
            assert proc.returncode != 0, name
            line = _one_error_line(stderr)
            assert expect[name] in line, (name, line)
    finally:
        busy.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_status_and_peers_for_people_and_programs(spawn: Callable[..., DaemonProc]) -> None:
    first = spawn("a").start()
    first.wait_ready()
    second = spawn("b", "--bootstrap", first.address).start()
    second_id = second.wait_ready()["peer_id"]

    result = run_cli("status", "--peer", first.address, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert {"peer_id", "version", "listen", "peers", "uptime_s"} <= set(status)
    assert status["listen"] == first.address

    result = run_cli("status", "--peer", first.address)
    assert result.returncode == 0
    assert status["peer_id"] in result.stdout and "uptime_s" in result.stdout

    result = run_cli("peers", "--peer", first.address, "--json")
    peers = json.loads(result.stdout)
    assert [p["peer_id"] for p in peers] == [second_id]
    assert peers[0]["addresses"] == [second.address]
    assert isinstance(peers[0]["last_seen"], float)

    result = run_cli("peers", "--peer", first.address)
    assert second_id in result.stdout and "1 peer(s)" in result.stdout

    result = run_cli("status", "--peer", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert result.returncode != 0
    assert "cannot reach daemon" in _one_error_line(result.stderr)


def test_cli_paths_match_the_admin_routes() -> None:
    assert (cmd_daemon.STATUS_PATH, cmd_daemon.PEERS_PATH) == (STATUS_PATH, PEERS_PATH)


def test_config_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        'listen = "127.0.0.1:1000"\nbootstrap = ["127.0.0.1:1"]\nlog_format = "json"\n'
        "[membership]\nping_interval_s = 1.5\ndead_after_s = 30.0\n"
        "[transport]\nrequest_timeout_s = 4.0\n"
    )
    env = {
        "MURMUR_LISTEN": "127.0.0.1:2000",
        "MURMUR_MEMBERSHIP_PING_INTERVAL_S": "0.5",
        "MURMUR_BOOTSTRAP": "127.0.0.1:2,127.0.0.1:3",
        "MURMUR_UNRELATED": "ignored",
    }
    config = load_config(path, env, {"listen": "127.0.0.1:3000", "data_dir": None})
    assert config.listen == "127.0.0.1:3000"  # flag beats env beats file
    assert config.bootstrap == ("127.0.0.1:2", "127.0.0.1:3")  # env beats file
    assert config.log_format == "json"  # file beats default
    assert config.membership.ping_interval_s == 0.5
    assert config.membership.dead_after_s == 30.0
    assert config.transport.request_timeout_s == 4.0
    assert config.data_dir == DaemonConfig().data_dir
    assert load_config() == DaemonConfig()


def test_the_ring_and_value_bound_come_from_file_env_or_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[training]\ntask = "digits"\nring = "32"\nvalue_bound = 100.0\n')
    config = load_config(path, {})
    assert config.training.ring == "32" and config.training.spec().ring_bits == 32
    assert config.training.value_bound == 100.0
    config = load_config(
        path, {"MURMUR_TRAINING_RING": "auto"}, {"training": {"value_bound": 50.0}}
    )
    assert config.training.spec().ring_bits is None and config.training.value_bound == 50.0
    assert (
        load_config().training.spec().ring_bits == 64 and load_config().training.value_bound == 1e6
    )
    args = build_parser().parse_args(["start", "--ring", "auto", "--value-bound", "64"])
    assert cmd_daemon._training_flags(args) == {"ring": "auto", "value_bound": 64.0}


@pytest.mark.parametrize(
    ("text", "env"),
    [
        ('[training]\nring = "16"\n', {}),
        ("", {"MURMUR_TRAINING_VALUE_BOUND": "0"}),
        ("nonsense = 1\n", {}),
        ("[membership]\nnope = 1\n", {}),
        ('[membership]\nping_interval_s = "fast"\n', {}),
        ("[membership]\nmax_view = 1.5\n", {}),
        ("membership = 3\n", {}),
        ("", {"MURMUR_TUNE_MALLOC": "maybe"}),
        ("", {"MURMUR_TRANSPORT_REQUEST_TIMEOUT_S": "-1"}),
        ("[transport]\nreachability_recheck_s = -5.0\n", {}),
        ('[transport]\nreachability_recheck_s = "nan"\n', {}),
        ('log_format = "xml"\n', {}),
        ('bootstrap = ["no port"]\n', {}),
    ],
)
def test_bad_config_is_a_config_error(tmp_path: Path, text: str, env: dict[str, str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path, env)


def test_addresses_parse() -> None:
    assert parse_address("127.0.0.1:7070") == ("127.0.0.1", 7070)
    assert parse_address("[::1]:80") == ("::1", 80)
    assert parse_address("host-name.example:1") == ("host-name.example", 1)
    for bad in ["", "7070", "host:", ":80", "a b:1", "[zz]:1", "h:99999", "h:-1"]:
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_environment_reaches_the_daemon(tmp_path: Path) -> None:
    result = run_cli(
        "start",
        "--data-dir",
        str(tmp_path),
        env={**os.environ, "MURMUR_LISTEN": "bad address"},
    )
    assert result.returncode != 0
    assert "HOST:PORT" in _one_error_line(result.stderr)
