"""The ``murmur-sim`` console script (argument parsing and wiring only)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    print("murmur-sim: the simulator has not landed yet (issue 7)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
