"""What every Murmur command line shares: one-line errors instead of a page of usage."""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["BriefParser"]


class BriefParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line naming the flag, and where to look.

    argparse prints the whole usage block before the error (a dozen lines for ``murmur
    start``); the user needs the flag, the bad value and the way to the help.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
