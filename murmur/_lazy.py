"""Lazy package exports (PEP 562), shared by the packages whose ``__init__`` must stay light.

``p2p.messages`` imports ``gossip.messages``, which runs ``gossip/__init__``; and ``dp``/``mpc``
import ``murmur.errors``, which runs ``murmur/__init__``. Those ``__init__`` files therefore
import their public names only on first access.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a public name
    to the module that defines it; a loaded name is cached in ``namespace`` (the package's
    ``globals()``), so later lookups skip ``__getattr__``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
