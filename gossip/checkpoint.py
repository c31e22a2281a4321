"""A peer's durable training state: one checkpoint file, rewritten atomically after every round.

What a checkpoint holds (``TrainingSession.checkpoint_state``): the public model ``theta``, the
learner's counters (contributions, results applied, distributed-noise shares per contribution,
the sampling generator's state), the session's round counter, outcome counts and last metrics,
and a contribution that was privatized and paid for but never left the peer (its group never
formed), so that a restart offers it again instead of paying twice. Local training keeps no
optimizer state across rounds (each round's SGD starts from ``theta`` with fresh momentum), so
there is none to save.

How it agrees with the privacy budget. The budget is written (and fsynced) *before* a
contribution leaves, the checkpoint after the round ends, and each records how many
contributions the budget had paid for when it was written (``budget_times``). After a crash at
any point, the budget's count is the truth: contributions it paid for after the last checkpoint
count as made (their masked vectors may have left: they are never offered again, and their
noise counts as the worst case), and the model is the one of the last completed round. A
checkpoint that claims more than the budget paid for means the budget file was replaced by an
older one: that is refused. A stored unsent contribution is removed from the checkpoint (a
write) *before* it is offered again, so no crash can make it leave twice.

File layout: ``MAGIC`` (8 bytes) | sha256 of the rest (32 bytes) | a ``torch.save`` of plain
containers and tensors, read back with ``weights_only=True`` (no pickled code ever runs). A
missing file is a fresh start; anything else that cannot be used (unreadable, a checksum that
fails, a truncated file, another format or model) is a ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from floor.errors import CheckpointError
from floor.files import replace_atomically

__all__ = ["CHECKPOINT_FILE", "FORMAT", "MAGIC", "read_checkpoint", "write_checkpoint"]

CHECKPOINT_FILE = "checkpoint.pt"
"""The checkpoint's name in a daemon's data dir."""
MAGIC = b"MMCKPT01"
FORMAT = "murmur-training-checkpoint"
_DIGEST = 32


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plain containers, numbers, strings and tensors) to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    body = buffer.getvalue()
    try:
        replace_atomically(path, MAGIC + hashlib.sha256(body).digest() + body)
    except OSError as exc:
        raise CheckpointError(f"cannot write training checkpoint {path}: {exc}") from exc


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The state written by :func:`write_checkpoint`, or None if ``path`` does not exist."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"cannot read training checkpoint {path}: {exc}") from exc

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(
            f"training checkpoint {path} is corrupt ({why}); refusing to start afresh over it. "
            "Move it away to start this peer's model from scratch (its privacy budget stays)."
        )

    head = len(MAGIC) + _DIGEST
    if len(raw) < head or raw[: len(MAGIC)] != MAGIC:
        raise corrupt("not a Murmur checkpoint, or another version of one")
    body = raw[head:]
    if hashlib.sha256(body).digest() != raw[len(MAGIC) : head]:
        raise corrupt("checksum mismatch: truncated or altered")
    try:
        state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds on a bad archive
        raise corrupt(f"unreadable: {type(exc).__name__}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise corrupt("unknown format")
    return state
