"""A cap on the API's open connections: the listening socket's protocol factory hands each new connection to
aiohttp's server while fewer than the limit are open, and answers one more with a 503 and closes it."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from exo.api.chat_request import ApiError
from exo.api.limits import MAX_CONNECTIONS_ENV

# Seconds a refused connection stays open after its answer, so that a client still sending its request reads the
# answer before the socket closes (closing while it sends would reset the connection and lose the answer).
REFUSAL_LINGER_SECONDS = 2.0


class ConnectionCap:
    """The protocol factory for `loop.create_server`: at most `limit` connections of `server` are open at once."""

    def __init__(self, server: web.Server, limit: int) -> None:
        self._server = server
        self._limit = limit
        # Connections made since the loop last ran their `connection_made` (when aiohttp starts counting them): the
        # loop accepts a burst of sockets before it runs any of those callbacks.
        self._accepted_in_burst = 0

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._server.connections) + self._accepted_in_burst >= self._limit:
            return _Refusal(self._limit)
        if self._accepted_in_burst == 0:
            # Runs once this burst's `connection_made` callbacks have been queued, before the next accept.
            asyncio.get_running_loop().call_soon(self._burst_counted)
        self._accepted_in_burst += 1
        return self._server()

    def _burst_counted(self) -> None:
        self._accepted_in_burst = 0


class _Refusal(asyncio.Protocol):
    """A connection over the limit: answered 503 `server_overloaded` naming the limit, then closed."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._closer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        message = f"The node has {self._limit} connections open, its limit ({MAX_CONNECTIONS_ENV}); try again later."
        body = json.dumps(ApiError(503, message, "server_overloaded").to_dict()).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Retry-After: 1\r\n"
            "Connection: close\r\n\r\n"
        )
        transport.write(head.encode() + body)
        if transport.can_write_eof():
            transport.write_eof()
        self._closer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        """The refused request is read and dropped."""

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closer is not None:
            self._closer.cancel()
