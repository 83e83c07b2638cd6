"""What one client may ask of the API: the size of a request body, the time to send its head and its body and to
take each piece of a streamed answer, the number of messages, how many tokens a request may span, and how many
connections may be open at once. Each limit has a default and an environment variable, and the error that
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
REQUEST_HEAD_TIMEOUT_ENV = "EXO_REQUEST_HEAD_TIMEOUT"
RESPONSE_WRITE_TIMEOUT_ENV = "EXO_RESPONSE_WRITE_TIMEOUT"
MAX_CONNECTIONS_ENV = "EXO_MAX_CONNECTIONS"


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
    # Seconds a connection has to send a whole request head (request line and headers), counted from its opening or
    # from its previous response; a connection that sends none, or sends it slowly, is closed.
    request_head_timeout: float = 30.0
    # Seconds a piece of a streamed answer may wait for the client to take it; a client that stops reading has its
    # request cancelled and its connection closed.
    response_write_timeout: float = 30.0
    # Connections open at once; one more is answered 503 and closed.
    max_connections: int = 512

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ApiLimits:
        """The limits the environment sets, the defaults for the others; `ValueError` names a bad variable."""
        env = os.environ if environ is None else environ
        defaults = cls()
        body = env_count(MAX_BODY_BYTES_ENV, env)
        messages = env_count(MAX_MESSAGES_ENV, env)
        timeout = env_seconds(REQUEST_READ_TIMEOUT_ENV, env)
        head_timeout = env_seconds(REQUEST_HEAD_TIMEOUT_ENV, env)
        write_timeout = env_seconds(RESPONSE_WRITE_TIMEOUT_ENV, env)
        connections = env_count(MAX_CONNECTIONS_ENV, env)
        return cls(
            max_body_bytes=defaults.max_body_bytes if body is None else body,
            max_messages=defaults.max_messages if messages is None else messages,
            max_context=env_count(MAX_CONTEXT_ENV, env),
            request_read_timeout=defaults.request_read_timeout if timeout is None else timeout,
            request_head_timeout=defaults.request_head_timeout if head_timeout is None else head_timeout,
            response_write_timeout=defaults.response_write_timeout if write_timeout is None else write_timeout,
            max_connections=defaults.max_connections if connections is None else connections,
        )
