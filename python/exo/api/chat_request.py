"""Parsing and validation of OpenAI-style chat completion requests.

Every problem becomes an `ApiError` whose message names the offending field, so a malformed request fails with a
400 that says what was wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from exo.api.limits import MAX_CONTEXT_ENV, MAX_MESSAGES_ENV, ApiLimits

ROLES = ("system", "user", "assistant", "developer")
# Content parts that carry an image: OpenAI's, and exo classic's own.
IMAGE_PARTS = ("image_url", "image")
MAX_STOP_SEQUENCES = 16
# Most likely tokens `top_k` may keep: above every vocabulary, below what the core's integers hold.
MAX_TOP_K = 1 << 20
# The most `max_tokens` a request may ask for when no context is set (past any model's context).
MAX_TOKENS = 1 << 24


class ApiError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, code: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.error_type = error_type or _default_type(status)

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "code": self.code, "param": None}}


def _default_type(status: int) -> str:
    if status == 404:
        return "not_found_error"
    if status in (408, 504):
        return "timeout_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code)


@dataclass
class ChatRequest:
    """A validated chat completion request."""

    model: str | None
    messages: list[dict[str, str]]
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    #: The URLs of each message's images (one list per message, most of them empty).
    images: list[list[str]] = field(default_factory=list)

    @property
    def has_images(self) -> bool:
        return any(self.images)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; `ApiError` 400 when it is not one."""
    if not body.strip():
        raise bad_request("The request body is empty; expected a JSON object.", "invalid_json")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}", "invalid_json") from e
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, got {type(data).__name__}.", "invalid_json")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float))) and not isinstance(value, bool)


def _optional_number(data: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise bad_request(f"'{name}' must be a number, got {json.dumps(value)}.", "invalid_type")
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}, got {value}.", "invalid_value")
    return float(value)


def _optional_int(data: dict[str, Any], name: str, low: int, high: int, limit: str = "") -> int | None:
    """The integer field `name` in [low, high], or None; `limit` names what sets `high` in the error."""
    value = data.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise bad_request(f"'{name}' must be an integer, got {json.dumps(value)}.", "invalid_type")
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}{limit}, got {value}.", "invalid_value")
    return value


def _optional_bool(data: dict[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, got {json.dumps(value)}.", "invalid_type")
    return value


def _image_url(part: dict[str, Any], where: str) -> str:
    """The URL of an image part: `{"type": "image_url", "image_url": {"url": ...}}` (or the URL as a string there),
    or exo classic's `{"type": "image", "image": ...}`."""
    value = part.get("image_url") if part.get("type") == "image_url" else part.get("image")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        field = "image_url.url" if part.get("type") == "image_url" else "image"
        raise bad_request(f"{where}.{field} must be the image's data URL.", "invalid_image")
    return url


def _content_parts(content: Any, where: str) -> tuple[str, list[str]]:
    """The text of a message's content (a string, or a list of text and image parts) and its images' URLs."""
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts.", "invalid_type")
    texts: list[str] = []
    images: list[str] = []
    for i, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise bad_request(f"{where}.content[{i}] must be an object.", "invalid_type")
        kind = part.get("type")
        if kind in IMAGE_PARTS:
            images.append(_image_url(part, f"{where}.content[{i}]"))
            continue
        if kind != "text":
            raise bad_request(
                f"{where}.content[{i}] has type {json.dumps(kind)}; only text and image parts are supported.",
                "unsupported_content",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{where}.content[{i}].text must be a string.", "invalid_type")
        texts.append(text)
    return "".join(texts), images


def parse_messages(value: Any, max_messages: int = ApiLimits.max_messages) -> list[dict[str, str]]:
    """The `messages` list as `{"role", "content"}` dicts with text content, at most `max_messages` of them (image
    parts left out; `parse_chat_request` keeps them)."""
    return [message for message, _ in _parse_messages(value, max_messages)]


def _parse_messages(value: Any, max_messages: int) -> list[tuple[dict[str, str], list[str]]]:
    """Each message as a `{"role", "content"}` dict with text content, with its images' URLs."""
    if value is None:
        raise bad_request("'messages' is required.", "missing_field")
    if not isinstance(value, list):
        raise bad_request("'messages' must be a list of messages.", "invalid_type")
    if not value:
        raise bad_request("'messages' must contain at least one message.", "empty_messages")
    if len(value) > max_messages:
        raise bad_request(
            f"'messages' holds {len(value)} messages, over the limit of {max_messages} ({MAX_MESSAGES_ENV}).",
            "too_many_messages",
        )
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'.", "invalid_type")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            allowed = ", ".join(ROLES)
            raise bad_request(f"{where}.role is {json.dumps(role)}; expected one of {allowed}.", "invalid_role")
        if "content" not in message:
            raise bad_request(f"{where}.content is required.", "missing_field")
        text, images = _content_parts(message["content"], where)
        messages.append(({"role": "system" if role == "developer" else role, "content": text}, images))
    return messages


def _parse_stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request("'stop' must be a string or a list of strings.", "invalid_type")
    if len(value) > MAX_STOP_SEQUENCES:
        raise bad_request(f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences.", "invalid_value")
    if any(not s for s in value):
        raise bad_request("'stop' sequences must not be empty.", "invalid_value")
    return list(value)


def _parse_seed(value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not 0 <= value < 2**64:
        raise bad_request(f"'seed' must be an integer from 0 to 2**64-1, got {json.dumps(value)}.", "invalid_value")
    return value


def parse_chat_request(data: dict[str, Any], limits: ApiLimits | None = None) -> ChatRequest:
    """A validated `ChatRequest` from a decoded JSON body within `limits` (the defaults when None); `ApiError` 400
    names the first bad field."""
    limits = limits or ApiLimits()
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise bad_request("'model' must be a non-empty string.", "invalid_type")
    parsed = _parse_messages(data.get("messages"), limits.max_messages)
    n = data.get("n")
    if n is not None and n != 1:
        raise bad_request("Only 'n' = 1 is supported.", "invalid_value")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", "invalid_type")
    include_usage = _optional_bool(options or {}, "include_usage")
    most = limits.max_context or MAX_TOKENS
    context = f" (the context, {MAX_CONTEXT_ENV})" if limits.max_context else ""
    max_tokens = _optional_int(data, "max_completion_tokens", 1, most, context)
    if max_tokens is None:
        max_tokens = _optional_int(data, "max_tokens", 1, most, context)
    tools = data.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad_request("'tools' must be a list.", "invalid_type")
    return ChatRequest(
        model=model,
        messages=[message for message, _ in parsed],
        images=[images for _, images in parsed],
        stream=_optional_bool(data, "stream"),
        include_usage=include_usage,
        temperature=_optional_number(data, "temperature", 0.0, 2.0),
        top_p=_optional_number(data, "top_p", 0.0, 1.0),
        top_k=_optional_int(data, "top_k", 0, MAX_TOP_K),
        max_tokens=max_tokens,
        seed=_parse_seed(data.get("seed")),
        stop=_parse_stop(data.get("stop")),
        tools=tools,
    )
