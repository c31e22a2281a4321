"""The key commands: ``murmur keygen`` creates a peer's identity key, ``murmur id`` prints its id.

Both print only the peer id (public) on stdout; no key material is ever printed or logged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from floor.identity import Identity
from floor.keyfile import key_path

__all__ = ["cmd_id", "cmd_keygen", "register"]

# The same default as ``murmur start`` (p2p.config.DaemonConfig.data_dir).
DEFAULT_DATA_DIR = Path("murmur-data")


def register(subparsers: Any) -> None:
    """Add the ``keygen`` and ``id`` commands."""
    for name, func, text in (
        ("keygen", cmd_keygen, "create the identity key if absent (never replaces it)"),
        ("id", cmd_id, "print the peer id of the identity key"),
    ):
        parser = subparsers.add_parser(name, help=text, description=text)
        parser.add_argument(
            "--data-dir",
            metavar="DIR",
            type=Path,
            default=DEFAULT_DATA_DIR,
            help=f"holds identity.key (default: {DEFAULT_DATA_DIR})",
        )
        parser.set_defaults(func=func)


def cmd_keygen(args: argparse.Namespace) -> int:
    """Create ``DIR/identity.key`` (mode 0600) unless it exists; print the peer id."""
    identity, created = Identity.load_or_create(args.data_dir)
    if not created:
        print(f"murmur: key exists at {key_path(args.data_dir)}; not replaced", file=sys.stderr)
    print(identity.peer_id)
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    """Print the peer id of ``DIR/identity.key``."""
    print(Identity.load(args.data_dir).peer_id)
    return 0
