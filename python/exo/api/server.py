"""The aiohttp server under the API: CORS, errors answered as JSON, request handlers cancelled on stop, slow or
surplus connections refused, and background tasks (downloads, quitting) that outlive the request which started
them."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from exo.api.chat_request import ApiError
from exo.api.connections import ConnectionCap
from exo.api.limits import MAX_BODY_BYTES_ENV, REQUEST_READ_TIMEOUT_ENV, ApiLimits
from exo.api.responses import error_response

logger = logging.getLogger(__name__)

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "*",
    "Access-Control-Expose-Headers": "*",
}


# Routes anyone may fetch when the API has a key: the web chat's files (a browser cannot send a header to load a
# page) and the health check.
PUBLIC_ROUTES = frozenset({"web_chat", "web_chat_file", "healthcheck"})


class ApiServer:
    """An aiohttp application (`self.app`) with CORS and JSON errors. `await run(host, port)` starts serving;
    `await stop()` cancels running requests and ends it. Subclasses add the routes, naming the public ones.

    With an `api_key`, every other route answers 401 unless the request carries `Authorization: Bearer KEY`.
    `limits` (else the environment's) bound what one request may ask; see `exo.api.limits`."""

    def __init__(self, api_key: str | None = None, limits: ApiLimits | None = None) -> None:
        self.api_key = api_key or None
        self.limits = limits or ApiLimits.from_env()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self.app = web.Application(client_max_size=self.limits.max_body_bytes, middlewares=[self._cors_middleware])
        self.app.on_response_prepare.append(self._add_cors_headers)

    @web.middleware
    async def _cors_middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return web.Response(status=204)
        if self.api_key is not None and request.match_info.route.name not in PUBLIC_ROUTES:
            refused = _refuse_without_key(request, self.api_key)
            if refused is not None:
                return refused
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            limit = self.limits.max_body_bytes
            message = f"The request body exceeds the limit of {limit} bytes ({MAX_BODY_BYTES_ENV})."
            return error_response(ApiError(413, message, "request_too_large"))
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = "not_found" if e.status == 404 else "http_error"
            message = f"{request.method} {request.path}: {e.reason}"
            return error_response(ApiError(e.status, message, code))
        except ApiError as e:
            response = error_response(e)
            if e.status == 408:
                # The client may still be sending: the connection is not kept for another request.
                response.force_close()
            return response
        finally:
            if task is not None:
                self._handlers.discard(task)

    @staticmethod
    async def _add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(CORS_HEADERS)

    async def run(self, host: str = "0.0.0.0", port: int = 52415) -> None:
        """Start serving on `host:port`; returns once the socket listens.

        A connection must send each request's head within the head timeout of opening or of its previous response
        (aiohttp's keep-alive timeout, which also closes a connection that has sent nothing), and at most
        `max_connections` are open at once."""
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            shutdown_timeout=5.0,
            access_log=None,
            keepalive_timeout=self.limits.request_head_timeout,
        )
        await runner.setup()
        self._runner = runner
        assert runner.server is not None
        cap = ConnectionCap(runner.server, self.limits.max_connections)
        self._listener = await asyncio.get_running_loop().create_server(cap, host, port)
        logger.info("ChatGPT API listening on http://%s:%d", host, port)

    async def stop(self) -> None:
        """Cancel running requests (on every node), close connections and stop listening."""
        handlers = [t for t in self._handlers if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def read_body(self, request: web.Request) -> bytes:
        """The request's body; 408 (and the connection closed) when it does not arrive within the read timeout,
        so that a slow client cannot hold a handler."""
        timeout = self.limits.request_read_timeout
        try:
            return await asyncio.wait_for(request.read(), timeout)
        except asyncio.TimeoutError as e:
            message = f"The request body did not arrive within {timeout:g} s ({REQUEST_READ_TIMEOUT_ENV})."
            raise ApiError(408, message, "request_timeout") from e

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        """Run `coroutine` in the background until it ends or the server stops."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _refuse_without_key(request: web.Request, key: str) -> web.Response | None:
    """OpenAI's 401 when `request` lacks the API key or carries another; `None` when it carries the key."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode()):
        return None
    if not given:
        message = "Missing API key: this node was started with --api-key; send `Authorization: Bearer KEY`."
    else:
        message = "Incorrect API key provided."
    response = error_response(ApiError(401, message, "invalid_api_key"))
    response.headers["WWW-Authenticate"] = "Bearer"
    return response
