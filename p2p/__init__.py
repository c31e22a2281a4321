"""The real network: identity, wire format, aiohttp transport, membership, the daemon."""
