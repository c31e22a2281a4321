"""The ``murmur`` console script: argument parsing and wiring only; the work lives in modules.

Each command lives in its own module that exposes ``register(subparsers)``; a command function
returns the process exit code. Expected failures (``MurmurError``) print one line and exit
non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from floor import __version__
from floor.cli import BriefParser
from floor.errors import MurmurError

# Modules that each register one or more subcommands.
_COMMAND_MODULES = ("p2p.cmd_keys", "p2p.cmd_daemon", "p2p.cmd_demo")


def build_parser() -> argparse.ArgumentParser:
    parser = BriefParser(prog="murmur", description="Murmur peer daemon and key tools.")
    parser.add_argument("--version", action="version", version=f"murmur {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=BriefParser
    )
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except MurmurError as exc:
        print(f"murmur: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
