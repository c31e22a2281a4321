"""``murmur keygen`` and ``murmur id``: exit codes, output, and refusals without tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from floor.identity import Identity, PeerId
from floor.keyfile import key_path
from p2p.cli import main


def test_keygen_creates_once_and_id_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "peer"
    assert main(["keygen", "--data-dir", str(data_dir)]) == 0
    out, err = capsys.readouterr()
    peer = PeerId.parse(out.strip())
    assert err == ""
    assert (os.stat(key_path(data_dir)).st_mode & 0o777) == 0o600
    before = key_path(data_dir).read_bytes()

    assert main(["keygen", "--data-dir", str(data_dir)]) == 0
    out, err = capsys.readouterr()
    assert PeerId.parse(out.strip()) == peer
    assert "not replaced" in err
    assert key_path(data_dir).read_bytes() == before

    assert main(["id", "--data-dir", str(data_dir)]) == 0
    out, _ = capsys.readouterr()
    assert PeerId.parse(out.strip()) == peer == Identity.load(data_dir).peer_id


def test_id_without_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["id", "--data-dir", str(tmp_path)]) != 0
    _, err = capsys.readouterr()
    assert "no key file" in err
    assert len(err.strip().splitlines()) == 1


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2p.cli", *args], capture_output=True, text=True, timeout=60
    )


def _spoil(path: Path, problem: str) -> None:
    if problem == "mode":
        os.chmod(path, 0o644)
    elif problem == "truncated":
        path.write_bytes(path.read_bytes()[:20])
    elif problem == "corrupt":
        data = bytearray(path.read_bytes())
        data[20] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()


@pytest.mark.parametrize("problem", ["mode", "truncated", "corrupt", "missing"])
def test_bad_key_file_one_line_error(
    tmp_path: Path, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ident, _ = Identity.load_or_create(tmp_path)
    path = key_path(tmp_path)
    _spoil(path, problem)
    before = path.read_bytes() if path.exists() else None
    for command in ("id", "keygen"):
        assert main([command, "--data-dir", str(tmp_path)]) != 0
        out, err = capsys.readouterr()
        assert out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("murmur: error:"), err
        assert ident.seed().hex() not in err
        if problem == "missing":
            break  # keygen then creates a key, as it should
    if before is not None:
        assert path.read_bytes() == before  # never replaced


def test_bad_key_file_subprocess_no_traceback(tmp_path: Path) -> None:
    ident, _ = Identity.load_or_create(tmp_path)
    _spoil(key_path(tmp_path), "corrupt")
    result = _run("id", "--data-dir", str(tmp_path))
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "corrupt" in lines[0], result.stderr
    assert ident.seed().hex() not in result.stderr


def test_keygen_subprocess_prints_only_the_id(tmp_path: Path) -> None:
    result = _run("keygen", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    peer = PeerId.parse(result.stdout.strip())
    seed = Identity.load(tmp_path / "d").seed()
    assert seed.hex() not in result.stdout + result.stderr
    assert peer == Identity.load(tmp_path / "d").peer_id
