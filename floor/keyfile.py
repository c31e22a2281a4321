"""The identity key file ``<data_dir>/identity.key``: safe creation and strict loading.

Format (72 bytes): the magic ``b"MURMURK1"``, the 32-byte Ed25519 seed, then the 32-byte public
key, which doubles as a checksum (a flipped bit in the seed no longer matches it). The file is
created with mode 0600 by writing a temporary file and hard-linking it into place, so a
half-written key is never visible and an existing key is never replaced. Loading refuses a
file that is missing, not a regular file, accessible by group or others, truncated or corrupt,
with a ``KeyFileError`` whose message is one clear line and never contains key material.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import Final

import nacl.signing

from floor.errors import KeyFileError

__all__ = ["KEY_FILE_NAME", "create_seed", "key_path", "read_seed"]

KEY_FILE_NAME: Final = "identity.key"
_MAGIC: Final = b"MURMURK1"
_SEED_BYTES: Final = 32
_FILE_BYTES: Final = len(_MAGIC) + 2 * _SEED_BYTES


def key_path(data_dir: Path) -> Path:
    """Where the key file of ``data_dir`` lives."""
    return Path(data_dir) / KEY_FILE_NAME


def _public_key(seed: bytes) -> bytes:
    return bytes(nacl.signing.SigningKey(seed).verify_key)


def _ensure_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise KeyFileError(f"data dir {data_dir} exists and is not a directory") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot create data dir {data_dir}: {exc.strerror}") from exc
    if not data_dir.is_dir():
        raise KeyFileError(f"data dir {data_dir} is not a directory")


def _write_new(path: Path, content: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``content``; FileExistsError if it exists."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may have removed owner bits
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)


def create_seed(data_dir: Path, seed: bytes) -> bool:
    """Write ``seed`` as the key of ``data_dir`` unless a key file exists. True if written."""
    data_dir = Path(data_dir)
    _ensure_dir(data_dir)
    path = key_path(data_dir)
    if os.path.lexists(path):
        return False
    content = _MAGIC + seed + _public_key(seed)
    tmp = data_dir / f".{KEY_FILE_NAME}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    try:
        _write_new(tmp, content)
        try:
            os.link(tmp, path)  # atomic, and never replaces an existing file
        except FileExistsError:
            return False
        except OSError:
            # File systems without hard links: exclusive create directly.
            try:
                _write_new(path, content)
            except FileExistsError:
                return False
    except OSError as exc:
        raise KeyFileError(f"cannot write key file {path}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    with contextlib.suppress(OSError):
        dir_fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return True


def read_seed(data_dir: Path) -> bytes:
    """Read and check the key file of ``data_dir``; returns the 32-byte seed."""
    path = key_path(Path(data_dir))
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"no key file at {path}; create one with: murmur keygen --data-dir {data_dir}"
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"key file {path} is accessible by group or others (mode {mode:04o}); "
                f"fix with: chmod 600 {path}"
            )
        content = os.read(fd, _FILE_BYTES + 1)
    except OSError as exc:
        if isinstance(exc, KeyFileError):
            raise
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(content) < _FILE_BYTES:
        raise KeyFileError(f"key file {path} is truncated ({len(content)} of {_FILE_BYTES} bytes)")
    if len(content) > _FILE_BYTES or not content.startswith(_MAGIC):
        raise KeyFileError(f"key file {path} is corrupt (not a Murmur identity key)")
    seed = content[len(_MAGIC) : len(_MAGIC) + _SEED_BYTES]
    if _public_key(seed) != content[len(_MAGIC) + _SEED_BYTES :]:
        raise KeyFileError(f"key file {path} is corrupt (checksum mismatch)")
    return seed
