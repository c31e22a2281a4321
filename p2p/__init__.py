"""The real network: aiohttp transport, membership, admin endpoints, the daemon and its CLI.

Import from the modules: ``p2p.daemon.Daemon``, ``p2p.config.DaemonConfig``,
``p2p.membership.Membership``, ``p2p.transport.http.HttpTransport``, ``p2p.messages``. This file
imports nothing, so that ``murmur status`` answers without loading torch.
"""

__all__: list[str] = []
