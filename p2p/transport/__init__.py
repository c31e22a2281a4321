"""The real network's transports: HTTP POST plus one WebSocket stream per peer pair.

``p2p.transport.http.HttpTransport`` implements ``floor.transport.Transport`` over aiohttp;
``p2p.transport.stream`` is its WebSocket binding. Import them from their modules.
"""

__all__: list[str] = []
