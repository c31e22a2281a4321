"""Murmur's base package: the version and the exception tree, importable by every layer."""

from murmur.errors import MurmurError

__version__ = "0.1.0"

__all__ = ["MurmurError", "__version__"]
