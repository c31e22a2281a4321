"""In-memory transport: the same encoded, authenticated envelopes as the real network, no sockets.

A ``MemoryNetwork`` maps addresses (``mem:<name>``) to ``MemoryTransport`` objects in one event
loop. Delivery calls the receiver's checks and handler directly, so a wire bug shows up here
too. Tests use it; the simulator's network can build on it (delays, loss) by overriding
``MemoryNetwork.deliver``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from floor.envelope import EnvelopeCodec
from floor.errors import (
    ConfigError,
    PeerUnreachable,
    ProtocolError,
    RemoteRefused,
    Timeout,
)
from floor.identity import PeerId
from floor.transport.base import DEFAULT_TIMEOUT_S, Transport

__all__ = ["MemoryNetwork", "MemoryTransport"]

_PREFIX = "mem:"


class MemoryNetwork:
    """A registry of in-memory transports, keyed by address."""

    def __init__(self) -> None:
        self._nodes: dict[str, MemoryTransport] = {}
        self._names = itertools.count(1)

    def attach(self, transport: MemoryTransport, name: str | None = None) -> str:
        """Give ``transport`` an address on this network and return it."""
        address = _PREFIX + (name if name is not None else str(next(self._names)))
        if address in self._nodes:
            raise ConfigError(f"address already in use: {address}")
        self._nodes[address] = transport
        return address

    def detach(self, address: str) -> None:
        """Remove ``address``; later deliveries to it fail with ``PeerUnreachable``."""
        self._nodes.pop(address, None)

    async def deliver(self, address: str, data: bytes) -> bytes:
        """Hand ``data`` to the transport at ``address``; return its reply bytes.

        Raises ``PeerUnreachable`` for an unknown or closed address and ``RemoteRefused`` when
        the receiver refuses the envelope. Override to model latency or loss.
        """
        node = self._nodes.get(address)
        if node is None or node.closed:
            raise PeerUnreachable(f"nobody listens at {address}")
        try:
            return await node._serve_envelope(data)
        except ProtocolError as exc:
            raise RemoteRefused(f"{address} refused: {exc}", code=exc.code) from None


class MemoryTransport(Transport):
    """A ``Transport`` on a ``MemoryNetwork``. Construct, use, then ``aclose()``."""

    def __init__(
        self,
        codec: EnvelopeCodec,
        network: MemoryNetwork,
        *,
        name: str | None = None,
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
        admit: Callable[[PeerId], bool] | None = None,
    ) -> None:
        super().__init__(codec, default_timeout_s=default_timeout_s, admit=admit)
        self._network = network
        self._address = network.attach(self, name)

    @property
    def addresses(self) -> tuple[str, ...]:
        """This transport's one address, ``mem:<name>``."""
        return () if self.closed else (self._address,)

    def is_valid_address(self, address: str) -> bool:
        """Whether ``address`` looks like ``mem:<name>``."""
        return address.startswith(_PREFIX) and 0 < len(address) - len(_PREFIX) <= 64

    async def _post(self, address: str, data: bytes, timeout: float) -> bytes | bytearray:
        try:
            async with asyncio.timeout(timeout):
                return await self._network.deliver(address, data)
        except TimeoutError:
            raise Timeout(f"no answer from {address} within {timeout:g} s") from None

    async def _close_io(self) -> None:
        self._network.detach(self._address)
