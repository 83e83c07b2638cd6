"""What one client may ask of the API: the size of a request body, the time to send it, the number of messages,
and how many tokens a request may span. Each limit has a default and an environment variable, and the error that
enforces it names both the limit and the variable."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
        return cls(
            max_body_bytes=int(_positive(env, MAX_BODY_BYTES_ENV, defaults.max_body_bytes, int)),
            max_messages=int(_positive(env, MAX_MESSAGES_ENV, defaults.max_messages, int)),
            max_context=_optional_positive_int(env, MAX_CONTEXT_ENV),
            request_read_timeout=_positive(env, REQUEST_READ_TIMEOUT_ENV, defaults.request_read_timeout, float),
        )


def _positive(env: Mapping[str, str], name: str, default: float, kind: Callable[[str], float]) -> float:
    """The positive number the variable `name` holds (parsed by `kind`), else `default`."""
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if not value > 0:
        raise ValueError(f"{name} must be a positive number, got {text!r}")
    return value


def _optional_positive_int(env: Mapping[str, str], name: str) -> int | None:
    """The positive integer the variable `name` holds, or None when it is unset."""
    return int(_positive(env, name, 0, int)) if env.get(name, "").strip() else None
