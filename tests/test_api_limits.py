"""The API's limits on one request: body size (413), read timeout (408, connection closed), number of messages,
max_tokens, top_k and the context (400); each error names its limit and the variable that sets it. And on
connections: a request head that does not arrive in time closes its connection, and connections past the cap are
answered 503; a streaming client that stops reading has its request cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path

import pytest

from exo.api.limits import ApiLimits
from exo.inference.tokenizers import Tokenizer
from support.app_harness import Served, reply_tokens, serve, wait_until
from support.fake_node import FakeNode

LIMITS = ApiLimits(
    max_body_bytes=4096,
    max_messages=3,
    max_context=64,
    request_read_timeout=0.5,
    request_head_timeout=1.0,
    max_connections=3,
)


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


async def connect(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = served.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def test_a_request_head_sent_too_slowly_closes_the_connection(limited: Served) -> None:
    reader, writer = await connect(limited)

    async def trickle() -> None:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(ConnectionError):
            while True:  # a header byte every 0.2 s: the connection is never idle, its head never complete
                await asyncio.sleep(0.2)
                writer.write(b"X")
                await writer.drain()

    sender = asyncio.create_task(trickle())
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b"", "closed, with nothing answered"
    finally:
        sender.cancel()
        writer.close()


async def test_an_idle_connection_is_closed_after_the_head_timeout(limited: Served) -> None:
    reader, writer = await connect(limited)
    assert await asyncio.wait_for(reader.read(), 5) == b"", "the server closes a connection that sends nothing"
    writer.close()


async def test_connections_past_the_cap_are_503_and_freed_slots_are_served_again(limited: Served) -> None:
    held = [await connect(limited) for _ in range(3)]
    await asyncio.sleep(0.1)
    reader, writer = await connect(limited)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), head[:80]
    error = json.loads(body)["error"]
    assert error["code"] == "server_overloaded"
    assert "3 connections" in error["message"] and "EXO_MAX_CONNECTIONS" in error["message"]
    for _, held_writer in held:
        held_writer.close()
    await asyncio.sleep(0.2)
    reader, writer = await connect(limited)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]


@pytest.fixture
async def long_answer(model_dir: Path, tokenizer: Tokenizer):
    """An API whose node answers with megabytes of events (more than sockets buffer), with a short write timeout."""
    reply = reply_tokens(tokenizer)
    node = FakeNode(reply[:-1] * 4000 + reply[-1:])
    async for s in serve(node, model_dir, tokenizer, limits=ApiLimits(response_write_timeout=0.5)):
        yield s


async def test_a_streaming_client_that_stops_reading_has_its_request_cancelled(long_answer: Served) -> None:
    host, port = long_answer.url.removeprefix("http://").split(":")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    client.setblocking(False)
    await asyncio.get_running_loop().sock_connect(client, (host, int(port)))
    # The reader's small buffer stops it reading from the socket once full: the client stops taking data.
    _reader, writer = await asyncio.open_connection(sock=client, limit=1024)
    body = chat(stream=True, max_tokens=len(long_answer.node.reply))
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    await writer.drain()
    node = long_answer.node
    await wait_until(lambda: node.calls, 10)
    request_id = node.calls[0]["request_id"]
    await wait_until(lambda: request_id in node.cancelled, 30)
    assert request_id in node.closed, "the generation was released before its end"
    assert node.produced[request_id] < len(node.reply)
    await wait_until(lambda: long_answer.api.admission.active == 0, 10)
    writer.close()


def test_limits_come_from_the_environment_and_bad_values_are_named() -> None:
    env = {
        "EXO_MAX_BODY_BYTES": "1024",
        "EXO_MAX_MESSAGES": "5",
        "EXO_REQUEST_READ_TIMEOUT": "2.5",
        "EXO_REQUEST_HEAD_TIMEOUT": "4",
        "EXO_MAX_CONNECTIONS": "7",
    }
    limits = ApiLimits.from_env(env)
    assert (limits.max_body_bytes, limits.max_messages, limits.request_read_timeout) == (1024, 5, 2.5)
    assert (limits.request_head_timeout, limits.max_connections) == (4.0, 7)
    assert limits.max_context is None, "without EXO_MAX_CONTEXT the engine holds requests to the model's context"
    assert ApiLimits.from_env({"EXO_MAX_CONTEXT": "2048"}).max_context == 2048
    bad = [("EXO_MAX_MESSAGES", "0"), ("EXO_MAX_CONTEXT", "many"), ("EXO_MAX_BODY_BYTES", "-3")]
    bad += [("EXO_REQUEST_HEAD_TIMEOUT", "0"), ("EXO_MAX_CONNECTIONS", "none")]
    for name, value in bad:
        with pytest.raises(ValueError, match=name):
            ApiLimits.from_env({name: value})
