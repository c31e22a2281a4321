"""The daemon's JSON endpoints on the envelope port: ``GET /v1/status`` and ``GET /v1/peers``.

They answer loopback clients only (403 otherwise): the peer list of a private network is not
for strangers, and any later administrative action will sit behind the same check.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from p2p.transport.http import is_loopback

__all__ = ["PEERS_PATH", "STATUS_PATH", "AdminSource", "admin_routes"]


class AdminSource(Protocol):
    """What the endpoints show: the daemon (``p2p.daemon.Daemon``) is one."""

    def status(self) -> dict[str, object]:
        """The status document."""
        ...

    def peers(self) -> list[dict[str, object]]:
        """The peers document."""
        ...


STATUS_PATH = "/v1/status"
PEERS_PATH = "/v1/peers"

_View = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _loopback_only(view: _View) -> _View:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if not is_loopback(request.remote):
            return web.json_response({"error": "admin endpoints answer loopback only"}, status=403)
        return await view(request)

    return guarded


def admin_routes(daemon: AdminSource) -> list[web.RouteDef]:
    """Routes serving ``daemon.status()`` and ``daemon.peers()`` as JSON."""

    async def status(request: web.Request) -> web.StreamResponse:
        return web.json_response(daemon.status())

    async def peers(request: web.Request) -> web.StreamResponse:
        return web.json_response(daemon.peers())

    return [
        web.get(STATUS_PATH, _loopback_only(status)),
        web.get(PEERS_PATH, _loopback_only(peers)),
    ]
