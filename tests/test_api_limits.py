"""The API's limits on one request: body size (413), read timeout (408, connection closed), number of messages,
max_tokens, top_k and the context (400); each error names its limit and the variable that sets it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from exo.api.limits import ApiLimits
from exo.inference.tokenizers import Tokenizer
from support.app_harness import Served, reply_tokens, serve
from support.fake_node import FakeNode

LIMITS = ApiLimits(max_body_bytes=4096, max_messages=3, max_context=64, request_read_timeout=0.5)


@pytest.fixture
async def limited(model_dir: Path, tokenizer: Tokenizer):
    async for s in serve(FakeNode(reply_tokens(tokenizer)), model_dir, tokenizer, limits=LIMITS):
        yield s


def chat(**fields: object) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], **fields})


async def test_a_body_over_the_limit_is_413(limited: Served) -> None:
    status, reply = await limited.post("/v1/chat/completions", chat(padding="x" * 5000))
    assert status == 413
    assert reply["error"]["code"] == "request_too_large"
    assert "4096 bytes (EXO_MAX_BODY_BYTES)" in reply["error"]["message"]
    assert limited.node.calls == []


@pytest.mark.parametrize(
    ("body", "code", "named"),
    [
        (json.dumps({"messages": [{"role": "user", "content": "x"}] * 4}), "too_many_messages", "EXO_MAX_MESSAGES"),
        (chat(max_tokens=65), "invalid_value", "EXO_MAX_CONTEXT"),
        (chat(top_k=2**70), "invalid_value", "top_k"),
        (chat(temperature=2.5), "invalid_value", "temperature"),
        (chat(max_tokens=64), "context_length_exceeded", "EXO_MAX_CONTEXT"),
    ],
)
async def test_requests_past_a_limit_are_400_naming_it(limited: Served, body: str, code: str, named: str) -> None:
    status, reply = await limited.post("/v1/chat/completions", body)
    assert status == 400, reply
    assert reply["error"]["code"] == code
    assert named in reply["error"]["message"]
    assert limited.node.calls == []


async def test_requests_within_the_limits_are_served(limited: Served) -> None:
    messages = [{"role": "user", "content": "Hi"}] * 3
    status, reply = await limited.post("/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 8}))
    assert status == 200, reply


async def test_a_body_that_does_not_arrive_in_time_is_408_and_the_connection_closed(limited: Served) -> None:
    host, port = limited.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    writer.write(f'{head}Content-Length: 1000\r\n\r\n{{"messages": '.encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    fields = dict(line.lower().split(b": ", 1) for line in head.strip().split(b"\r\n")[1:])
    length = int(fields[b"content-length"])
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408"), head[:80]
    assert fields.get(b"connection") == b"close", head
    assert b"EXO_REQUEST_READ_TIMEOUT" in body
    assert limited.node.calls == []


def test_limits_come_from_the_environment_and_bad_values_are_named() -> None:
    env = {"EXO_MAX_BODY_BYTES": "1024", "EXO_MAX_MESSAGES": "5", "EXO_REQUEST_READ_TIMEOUT": "2.5"}
    limits = ApiLimits.from_env(env)
    assert (limits.max_body_bytes, limits.max_messages, limits.request_read_timeout) == (1024, 5, 2.5)
    assert limits.max_context is None, "without EXO_MAX_CONTEXT the engine holds requests to the model's context"
    assert ApiLimits.from_env({"EXO_MAX_CONTEXT": "2048"}).max_context == 2048
    for name, value in [("EXO_MAX_MESSAGES", "0"), ("EXO_MAX_CONTEXT", "many"), ("EXO_MAX_BODY_BYTES", "-3")]:
        with pytest.raises(ValueError, match=name):
            ApiLimits.from_env({name: value})
