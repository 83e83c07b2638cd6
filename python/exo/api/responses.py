"""How the API answers besides plain JSON: server-sent events, error bodies, and the HTTP error each exception
raised while a request runs maps to."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from exo import errors
from exo.api.chat_request import ApiError

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying `payload` (JSON-encoded unless already a string, as `[DONE]`)."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def error_response(error: ApiError) -> web.Response:
    """`error` as an OpenAI-style JSON error body with its HTTP status."""
    return web.json_response(error.to_dict(), status=error.status)


def error_from_exception(e: BaseException) -> ApiError:
    """The HTTP error for an exception raised while a request ran."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, errors.ContextOverflowError):
        return ApiError(400, str(e), "context_length_exceeded")
    if isinstance(e, errors.InvalidModelError):
        return ApiError(400, str(e), "invalid_model")
    if isinstance(e, (errors.InvalidArgumentError, errors.InvalidShardError)):
        return ApiError(400, str(e), "invalid_request")
    if isinstance(e, errors.CacheEvictedError):
        return ApiError(503, f"The cluster dropped the request's cache; try again: {e}", "cache_evicted")
    if isinstance(e, errors.InsufficientMemoryError):
        return ApiError(503, f"The cluster has too little memory for the model: {e}", "insufficient_memory")
    if isinstance(e, errors.RequestStalledError):
        return ApiError(504, f"The cluster stopped answering the request: {e}", "request_stalled")
    if isinstance(e, errors.PeerError):
        return ApiError(503, f"A node of the cluster is unavailable; try again: {e}", "peer_unavailable")
    if isinstance(e, errors.ModelNotFoundError):
        return ApiError(404, f"The model's files were not found: {e}", "model_not_found")
    if isinstance(e, errors.DownloadError):
        return ApiError(503, f"The model's files could not be fetched; try again: {e}", "download_failed")
    if isinstance(e, errors.InferenceServerError):
        return ApiError(502, f"The inference server failed: {e}", "inference_server_error")
    if isinstance(e, errors.ExoError):
        return ApiError(500, f"The request failed in the cluster: {e}", "request_failed")
    return ApiError(500, f"Internal error: {type(e).__name__}: {e}", "internal_error")
