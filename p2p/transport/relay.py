"""Relaying for peers that cannot be dialled, and the dial-back check that tells them so.

A peer behind NAT or a firewall can open connections but not accept them. It asks one or two
reachable peers to relay for it (``RelayRequest`` on a stream it opened to them; the answer is
``RelayGrant``), keeps those streams open, and names them in its signed record as *relay
addresses*, ``relay:HOST:PORT`` (the relay's own address). A sender that finds only relay
addresses for a peer seals every envelope to it (never MAC or SIGNED: the relay must not read
the body) and hands it to the relay: stream frame kind 5 (``RELAY``, answered like kind 1) or 6
(``RELAY_POST``, one-way like kind 4), or ``POST /v1/relay`` for envelopes too large for a
frame. The relay reads only the envelope's head (framing, network-key door, type, recipient),
checks that it is SEALED and addressed to a peer it relays for, and writes it unchanged down
that peer's stream (server-to-client kind 1); the peer's answer (kind 2 or 3) goes back to the
sender. The relay never holds the link key of the two ends, so it can neither open nor alter
what it forwards (a changed byte fails the seal at the recipient), only drop or delay it.

Each relayed peer has a byte and a message budget (token buckets: ``relay_bytes_per_s``,
``relay_messages_per_s``, bursts of 4 s of each) and at most ``relay_max_pending`` forwarded
requests awaiting its answer; beyond them the relay refuses with ``BUSY``. A relay serves at
most ``relay_for`` peers (0: it relays for nobody; a peer that is itself unreachable never
relays).

Reachability: a peer that listens asks a peer it joined to dial it back (``DialBack`` with its
address and a fresh nonce); that peer opens a *new* connection to the address and sends a
SIGNED ``DialProbe`` with the nonce, then answers ``DialBackReply``. The asking peer counts
itself reachable only if the probe with its nonce arrived (``p2p.reach``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "RELAY_MESSAGES",
    "RELAY_PATH",
    "RELAY_PREFIX",
    "DialBack",
    "DialBackReply",
    "DialProbe",
    "RelayGrant",
    "RelayRequest",
    "TokenBucket",
    "is_relay_address",
    "relay_address",
    "relay_target",
]

RELAY_PATH = "/v1/relay"
RELAY_PREFIX = "relay:"


def is_relay_address(address: str) -> bool:
    """Whether ``address`` names a relay (``relay:HOST:PORT``) rather than the peer itself."""
    return address.startswith(RELAY_PREFIX)


def relay_address(address: str) -> str:
    """The relay address for a relay listening at ``address`` (HOST:PORT)."""
    return RELAY_PREFIX + address


def relay_target(address: str) -> str:
    """The HOST:PORT of the relay named by a relay address."""
    return address[len(RELAY_PREFIX) :]


@dataclass(frozen=True, slots=True)
class RelayRequest:
    """Asks the recipient to relay for the sender, over the stream this arrives on."""

    TYPE: ClassVar[str] = "relay_request"
    want_s: float
    """How long the sender intends to keep the stream (informational; the stream's life is
    what counts)."""


@dataclass(frozen=True, slots=True)
class RelayGrant:
    """The answer to ``RelayRequest``: granted or not, why, and the limits that apply."""

    TYPE: ClassVar[str] = "relay_grant"
    granted: bool
    reason: str
    bytes_per_s: int
    messages_per_s: int


@dataclass(frozen=True, slots=True)
class DialBack:
    """Asks the recipient to dial ``address`` on a new connection and send ``DialProbe``."""

    TYPE: ClassVar[str] = "dial_back"
    address: str
    nonce: bytes


@dataclass(frozen=True, slots=True)
class DialBackReply:
    """Whether the dial-back reached an endpoint that took the probe."""

    TYPE: ClassVar[str] = "dial_back_reply"
    reached: bool


@dataclass(frozen=True, slots=True)
class DialProbe:
    """Sent SIGNED on a fresh connection to the address a ``DialBack`` named."""

    TYPE: ClassVar[str] = "dial_probe"
    nonce: bytes


RELAY_MESSAGES: tuple[type, ...] = (RelayRequest, RelayGrant, DialBack, DialBackReply, DialProbe)
"""The relay and reachability messages (part of the daemon's union, ``p2p.messages``)."""


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take(n, now)`` spends or refuses."""

    __slots__ = ("_last", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._last = now

    def take(self, n: float, now: float) -> bool:
        """Spend ``n`` tokens if there are that many (after refilling); else spend none."""
        if now > self._last:
            self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
            self._last = now
        if self.tokens < n and not math.isclose(self.tokens, n):
            return False
        self.tokens -= n
        return True
