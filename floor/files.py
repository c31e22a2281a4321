"""Durable file replacement: the one discipline every state file of a peer is written with.

``replace_atomically(path, data)`` writes ``data`` to a fresh temporary file beside ``path``
(mode 0600), flushes and fsyncs it, renames it over ``path`` and fsyncs the directory, so that
after a crash at any instant ``path`` holds either its old content or the new one, never a mix
or nothing. The privacy budget (``dp.budget``), the training checkpoint (``gossip.checkpoint``)
and saved models use it. OSError is the caller's to translate into its own typed error.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["replace_atomically"]


def replace_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` by ``data``: temporary file, fsync, rename, fsync of the directory."""
    target = Path(path)
    directory = target.parent
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
