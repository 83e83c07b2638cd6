"""The rkllm engine through a real node (`python -m exo.main`, `EXO_ENGINE=rkllm`) against a fake RKLLAMA server on
loopback: the OpenAI-compatible API answers token by token, streaming and not; requests take turns on the server;
each way the server fails is one request's clear error, and the node keeps serving."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from exo.inference.tokenizers import resolve_tokenizer
from exo.testing.synth import write_model
from support.fake_rkllama import FakeRkllama
from support.solo_cli import serving_solo

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory whose name is the model's on the server (the tokenizer comes from it)."""
    return write_model("tiny-qwen2", tmp_path_factory.mktemp("rkllm") / "Qwen2.5-Tiny")


@pytest.fixture(scope="module")
def fake(model: Path) -> Iterator[FakeRkllama]:
    server = FakeRkllama(models=["Other-Model", model.name]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, fake: FakeRkllama, model: Path) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("node")
    env = fake.env(EXO_ENGINE="rkllm", RKLLM_TIMEOUT="2")
    with serving_solo(tmp, "--default-model", str(model), env=env) as (url, _process):
        yield url


@pytest.fixture(autouse=True)
def healthy(fake: FakeRkllama) -> None:
    fake.mode = "ok"


async def chat(url: str, stream: bool = False, timeout: float = 60) -> tuple[int, dict | str]:
    body = {"messages": MESSAGES, "stream": stream}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.post(f"{url}/v1/chat/completions", json=body) as response,
    ):
        if not stream:
            return response.status, await response.json()
        return response.status, await response.text()


def streamed_text(sse: str) -> str:
    import json

    text = ""
    for line in sse.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[len("data: ") :])
            for choice in event.get("choices", []):
                text += choice.get("delta", {}).get("content") or ""
    return text


async def test_answers_whole_and_streamed_token_by_token(node: str, fake: FakeRkllama, model: Path) -> None:
    status, body = await chat(node)
    assert status == 200, body
    assert isinstance(body, dict)
    assert body["choices"][0]["message"]["content"] == fake.answer
    assert body["choices"][0]["finish_reason"] == "stop"
    tokenizer = await resolve_tokenizer(model)
    assert body["usage"]["completion_tokens"] == len(tokenizer.encode(fake.answer, add_special_tokens=False))
    # The chat template the API rendered reaches the server as the conversation, not templated twice.
    assert fake.generations[-1] == MESSAGES
    assert fake.loaded == model.name
    status, sse = await chat(node, stream=True)
    assert status == 200
    assert isinstance(sse, str)
    assert streamed_text(sse) == fake.answer
    fake.mode = "whole"
    status, body = await chat(node)
    assert status == 200 and body["choices"][0]["message"]["content"] == fake.answer


async def test_concurrent_requests_take_turns_on_the_server(node: str, fake: FakeRkllama) -> None:
    fake.most_running = 0
    answers = await asyncio.gather(*(chat(node, stream=i % 2 == 1) for i in range(4)))
    for i, (status, body) in enumerate(answers):
        assert status == 200
        text = streamed_text(body) if i % 2 else body["choices"][0]["message"]["content"]
        assert text == fake.answer
    assert fake.most_running == 1


async def test_a_client_that_leaves_stops_the_generation_on_the_server(node: str, fake: FakeRkllama) -> None:
    fake.mode = "slow"
    fake.delay = 0.05
    left = fake.disconnected
    body = {"messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as session, session.post(f"{node}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        seen = ""
        async for line in response.content:
            if line.startswith(b"data: "):
                seen += streamed_text(line.decode())
            if seen.count("tick") >= 3:
                break
    # The node cancels the request, drops its answer and so closes the server's stream, which frees the server.
    for _ in range(100):
        if fake.disconnected > left and fake.running == 0:
            break
        await asyncio.sleep(0.1)
    assert fake.disconnected > left and fake.running == 0, (fake.disconnected, fake.running)
    fake.mode = "ok"
    status, answer = await chat(node)
    assert status == 200 and answer["choices"][0]["message"]["content"] == fake.answer


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("malformed", "malformed answer stream"),
        ("truncated", "truncated answer stream"),
        ("silent", "timed out"),
    ],
)
async def test_a_bad_answer_fails_that_request_only(node: str, fake: FakeRkllama, mode: str, says: str) -> None:
    fake.mode = mode
    status, body = await chat(node)
    assert status == 502, body
    message = body["detail"] if "detail" in body else str(body)
    assert says in message and f"127.0.0.1:{fake.port}" in message, message
    fake.mode = "ok"
    status, body = await chat(node)
    assert status == 200 and body["choices"][0]["message"]["content"] == fake.answer


def test_a_server_that_is_down_is_named_at_start_and_per_request(tmp_path: Path, model: Path) -> None:
    from exo.helpers import find_available_port

    dead = find_available_port("127.0.0.1")
    env = {"EXO_ENGINE": "rkllm", "RKLLM_SERVER_HOST": "127.0.0.1", "RKLLM_SERVER_PORT": str(dead)}
    with serving_solo(tmp_path, "--default-model", str(model), env=env) as (url, process):
        status, body = asyncio.run(chat(url))
        assert status == 502, body
        message = str(body)
        assert f"127.0.0.1:{dead}" in message and "does not answer" in message, message
        status, body = asyncio.run(chat(url))
        assert status == 502
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert f"RKLLAMA server at http://127.0.0.1:{dead}" in output and "Requests fail until it answers" in output


def test_a_failed_load_and_a_missing_model_fail_the_request(tmp_path: Path, model: Path) -> None:
    fake = FakeRkllama(models=["Other-Model"]).start()
    try:
        with serving_solo(tmp_path, "--default-model", str(model), env=fake.env(EXO_ENGINE="rkllm")) as (url, _):
            status, body = asyncio.run(chat(url))
            assert status == 502, body
            assert f"has no model {model.name}" in str(body) and "Other-Model" in str(body), body
            fake.models.append(model.name)
            fake.mode = "load_fails"
            status, body = asyncio.run(chat(url))
            assert status == 502 and "the NPU driver is too old" in str(body), body
            fake.mode = "ok"
            status, body = asyncio.run(chat(url))
            assert status == 200 and body["choices"][0]["message"]["content"] == fake.answer
    finally:
        fake.stop()
