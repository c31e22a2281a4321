"""Murmur's exception tree, as users import it: ``murmur.errors.MurmurError`` and its leaves.

The tree is defined in ``floor.errors`` (the floor every layer imports); this module is its
public name in the Python API, with the same classes (not copies): ``except
murmur.errors.ConfigError`` catches what any layer raises.
"""

from floor.errors import *  # noqa: F403 - the public alias of the one tree
from floor.errors import __all__ as __all__
