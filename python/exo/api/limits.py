"""What one client may ask of the API: the size of a request body, the time to send it, the number of messages,
and how many tokens a request may span. Each limit has a default and an environment variable, and the error that
enforces it names both the limit and the variable."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from exo.settings import env_count, env_seconds

MAX_BODY_BYTES_ENV = "EXO_MAX_BODY_BYTES"
MAX_MESSAGES_ENV = "EXO_MAX_MESSAGES"
MAX_CONTEXT_ENV = "EXO_MAX_CONTEXT"
REQUEST_READ_TIMEOUT_ENV = "EXO_REQUEST_READ_TIMEOUT"


@dataclass(frozen=True)
class ApiLimits:
    """The limits of one API server; `from_env` reads them from the environment."""

    # Bytes of a request body (larger: 413).
    max_body_bytes: int = 16 * 1024 * 1024
    # Messages of one chat request (more: 400).
    max_messages: int = 1024
    # Tokens one request may span, prompt and completion (more: 400), when set; otherwise each engine holds requests
    # to its model's context (what the candle engine derives from the model and its KV cache budget).
    max_context: int | None = None
    # Seconds a client has to send its request body (slower: 408, and the connection is closed).
    request_read_timeout: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ApiLimits:
        """The limits the environment sets, the defaults for the others; `ValueError` names a bad variable."""
        env = os.environ if environ is None else environ
        defaults = cls()
        body = env_count(MAX_BODY_BYTES_ENV, env)
        messages = env_count(MAX_MESSAGES_ENV, env)
        timeout = env_seconds(REQUEST_READ_TIMEOUT_ENV, env)
        return cls(
            max_body_bytes=defaults.max_body_bytes if body is None else body,
            max_messages=defaults.max_messages if messages is None else messages,
            max_context=env_count(MAX_CONTEXT_ENV, env),
            request_read_timeout=defaults.request_read_timeout if timeout is None else timeout,
        )
