"""The floor of Murmur: what every other package stands on, and which imports none of them.

``floor.errors`` (the one exception tree), ``floor.identity`` (peer ids and keys),
``floor.keyfile``, ``floor.codec`` (strict msgpack for frozen dataclasses),
``floor.messages`` (the floor's own wire message and registries), ``floor.envelope``
(authenticated envelopes), ``floor.replay`` and ``floor.transport`` (the transport interface and
its in-memory implementation). Arrows only point down: nothing here imports ``dp``, ``mpc``,
``gossip``, ``p2p``, ``simulator`` or ``murmur``.

This file only names the version, so that ``import floor.errors`` stays light (no torch).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
