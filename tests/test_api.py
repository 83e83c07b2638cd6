"""The ChatGPT-compatible API over a fake node: the openai client, raw malformed requests, streams, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import aiohttp
import openai
import pytest

from exo import errors
from exo.api import model_choice, model_routes
from exo.inference.shard import Shard
from exo.inference.tokenizers import Tokenizer
from support.app_harness import REPLY, Served, reply_tokens, serve, wait_until
from support.fake_node import FakeNode, FakeRepoProgress


async def test_openai_client_non_streaming(served: Served) -> None:
    reply = await served.client().chat.completions.create(
        model=str(served.api.default_model), messages=[{"role": "user", "content": "Hi!"}]
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == REPLY
    assert reply.choices[0].finish_reason == "stop"
    prompt = served.node.calls[0]["prompt"]
    assert prompt == served.tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}])
    expected_prompt_tokens = len(served.tokenizer.encode(prompt, add_special_tokens=False))
    completion = len(reply_tokens(served.tokenizer)) - 1
    assert reply.usage.prompt_tokens == expected_prompt_tokens
    assert reply.usage.completion_tokens == completion
    assert reply.usage.total_tokens == expected_prompt_tokens + completion
    assert served.node.cancelled == []


async def test_openai_client_streaming_with_usage(served: Served) -> None:
    stream = await served.client().chat.completions.create(
        model="gpt-4o",  # gpt-* names go to the default model, as in exo classic
        messages=[{"role": "user", "content": "Hi!"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(reply_tokens(served.tokenizer)) - 1


async def test_sse_wire_format_ends_with_done(served: Served) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(served.url + "/chat/completions", json=body) as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = (await response.read()).decode()
    events = [line[len("data: ") :] for line in raw.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in first


async def test_max_tokens_gives_length(served: Served) -> None:
    client = served.client()
    reply = await client.chat.completions.create(
        model=served.api.default_model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
    )
    tokens = reply_tokens(served.tokenizer)[:3]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3
    assert reply.choices[0].message.content == served.tokenizer.decode(tokens)
    reply = await client.chat.completions.create(
        model=served.api.default_model,
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=2,
        temperature=0.7,
        top_p=0.9,
        seed=42,
    )
    assert reply.usage.completion_tokens == 2
    call = served.node.calls[-1]
    assert (call["max_tokens"], call["temperature"], call["top_p"], call["seed"]) == (2, 0.7, 0.9, 42)


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequence_cuts_text_and_cancels(served: Served, stream: bool) -> None:
    client = served.client()
    kwargs = {"model": served.api.default_model, "messages": [{"role": "user", "content": "Hi"}]}
    if stream:
        chunks = [c async for c in await client.chat.completions.create(**kwargs, stop=["cluster"], stream=True)]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        reply = await client.chat.completions.create(**kwargs, stop="cluster")
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text == "Hello there, "
    assert finish == "stop"
    request_id = served.node.calls[-1]["request_id"]
    assert request_id in served.node.closed
    assert request_id in served.node.cancelled


async def test_system_prompt_is_prepended_unless_given(model_dir: Path, tokenizer: Tokenizer) -> None:
    node = FakeNode(reply_tokens(tokenizer))
    async for s in serve(node, model_dir, tokenizer, system_prompt="You are exo."):
        client = s.client()
        await client.chat.completions.create(model=s.api.default_model, messages=[{"role": "user", "content": "A"}])
        await client.chat.completions.create(
            model=s.api.default_model,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "B"}],
        )
    assert "You are exo." in node.calls[0]["prompt"]
    assert "You are exo." not in node.calls[1]["prompt"]
    assert "Be brief." in node.calls[1]["prompt"]


async def test_content_parts_are_joined(served: Served) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]}]
    status, body = await served.post("/v1/chat/completions", json.dumps({"messages": messages}))
    assert status == 200, body
    assert "Hello world" in served.node.calls[-1]["prompt"]


MALFORMED = [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_json"),
    ("", "invalid_json"),
    ("{}", "missing_field"),
    ('{"messages": []}', "empty_messages"),
    ('{"messages": "hi"}', "invalid_type"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}', "invalid_role"),
    ('{"messages": [{"content": "x"}]}', "invalid_role"),
    ('{"messages": [{"role": "user"}]}', "missing_field"),
    ('{"messages": [{"role": "user", "content": 5}]}', "invalid_type"),
    ('{"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}', "unsupported_content"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "invalid_image"),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "invalid_type"),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": 7}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5}', "invalid_type"),
    ('{"messages": [{"role": "user", "content": "x"}], "stop": 5}', "invalid_type"),
    ('{"messages": [{"role": "user", "content": "x"}], "stop": [""]}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "invalid_type"),
    ('{"messages": [{"role": "user", "content": "x"}], "stream_options": 3}', "invalid_type"),
    ('{"messages": [{"role": "user", "content": "x"}], "seed": -1}', "invalid_value"),
    ('{"messages": [{"role": "user", "content": "x"}], "model": 12}', "invalid_type"),
    ('{"messages": [{"role": "user", "content": "x"}], "n": 2}', "invalid_value"),
]


@pytest.mark.parametrize(("body", "code"), MALFORMED)
async def test_malformed_requests_get_400(served: Served, body: str, code: str) -> None:
    status, reply = await served.post("/v1/chat/completions", body)
    assert status == 400
    assert reply["error"]["code"] == code
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["message"]
    assert served.node.calls == []


async def test_unknown_model_is_404(served: Served) -> None:
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
    status, reply = await served.post("/v1/chat/completions", json.dumps(body))
    assert status == 404
    assert reply["error"]["code"] == "model_not_found"
    assert "no-such-model" in reply["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        await served.client().chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )


async def test_timeout_before_any_token_is_408_and_cancels(served: Served) -> None:
    served.api.response_timeout = 0.3
    served.node.hang_after = 0
    for stream in (False, True):
        body = {"messages": [{"role": "user", "content": "x"}], "stream": stream}
        status, reply = await served.post("/v1/chat/completions", json.dumps(body))
        assert status == 408
        assert reply["error"]["code"] == "timeout"
        assert served.node.calls[-1]["request_id"] in served.node.cancelled


async def test_timeout_mid_stream_sends_error_event(served: Served) -> None:
    served.api.response_timeout = 0.3
    served.node.hang_after = 3
    stream = await served.client().chat.completions.create(
        model=served.api.default_model, messages=[{"role": "user", "content": "x"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError, match="No token within"):
        async for chunk in stream:
            received.append(chunk)
    assert received
    assert served.node.calls[-1]["request_id"] in served.node.cancelled


async def test_requests_lists_a_running_request_until_its_client_hangs_up(served: Served) -> None:
    served.node.hang_after = 2
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True}

    async def running() -> list[dict[str, object]]:
        async with aiohttp.ClientSession() as session, session.get(f"{served.url}/v1/requests") as response:
            assert response.status == 200
            reply = await response.json()
        assert reply["node_id"] == "fake-node"
        return reply["requests"]

    assert await running() == []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{served.url}/v1/chat/completions", data=json.dumps(body)) as response:
            await response.content.readline()
            listed = await running()
            assert [(r["request_id"], r["origin"]) for r in listed] == [
                (served.node.calls[-1]["request_id"], "fake-node")
            ]
    await wait_until(lambda: served.node.calls[-1]["request_id"] in served.node.cancelled)
    assert await running() == []


async def test_topology_shows_each_nodes_layers_and_their_memory(served: Served) -> None:
    asked: list[Shard] = []

    async def layer_plan(shard: Shard) -> list[dict[str, object]]:
        asked.append(shard)
        return [{"node_id": "fake-node", "start_layer": 0, "end_layer": shard.n_layers - 1, "memory_bytes": 1234}]

    served.node.layer_plan = layer_plan
    async with aiohttp.ClientSession() as session:
        async with session.get(served.url + "/topology") as r:
            topology = await r.json()
        assert topology["nodes"]["fake-node"]["model"] == "Fake Device"
        assert topology["layers"]["model"] == served.api.default_model
        assert topology["layers"]["nodes"] == [
            {"node_id": "fake-node", "start_layer": 0, "end_layer": asked[0].n_layers - 1, "memory_bytes": 1234}
        ]

        async def too_big(shard: Shard) -> list[dict[str, object]]:
            raise errors.InsufficientMemoryError(f"{shard.model_id} does not fit: 1.00 GiB missing")

        served.node.layer_plan = too_big
        async with session.get(served.url + "/v1/topology", params={"model": served.api.default_model}) as r:
            topology = await r.json()
        assert topology["layers"]["error"].endswith("1.00 GiB missing")
        async with session.get(served.url + "/topology", params={"model": "no-such-model"}) as r:
            assert "layers" not in await r.json()


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (errors.RequestFailedError, 500, "request_failed"),
        (errors.PeerError, 503, "peer_unavailable"),
        (errors.RequestStalledError, 504, "request_stalled"),
        (errors.CacheEvictedError, 503, "cache_evicted"),
        (errors.InsufficientMemoryError, 503, "insufficient_memory"),
    ],
)
async def test_failure_in_the_cluster(served: Served, failure: type[Exception], status: int, code: str) -> None:
    served.node.fail_after = 2
    served.node.failure = failure
    answered, reply = await served.post(
        "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}]})
    )
    assert answered == status
    assert reply["error"]["code"] == code
    assert "went away" in reply["error"]["message"]
    stream = await served.client().chat.completions.create(
        model=served.api.default_model, messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError, match="went away"):
        async for _ in stream:
            pass


async def test_bad_arguments_from_the_node_are_400(served: Served) -> None:
    from exo.errors import ContextOverflowError

    served.node.fail_on_start = ContextOverflowError("prompt of 9000 tokens exceeds the context of 8192")
    status, reply = await served.post(
        "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}]})
    )
    assert status == 400
    assert reply["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_cancels_request(served: Served, stream: bool) -> None:
    served.node.delay = 0.05
    body = {"messages": [{"role": "user", "content": "x"}], "stream": stream}
    async with aiohttp.ClientSession() as session:
        if stream:
            async with session.post(served.url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200
                await response.content.readline()
        else:
            task = asyncio.create_task(session.post(served.url + "/v1/chat/completions", json=body))
            await wait_until(lambda: served.node.produced)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    await wait_until(lambda: served.node.cancelled)
    request_id = served.node.calls[0]["request_id"]
    assert served.node.cancelled == [request_id]
    assert served.node.produced[request_id] < len(served.node.reply)


async def test_many_concurrent_streams(served: Served) -> None:
    served.node.delay = 0.002
    client = served.client()

    async def one(i: int) -> str:
        stream = await client.chat.completions.create(
            model=served.api.default_model, messages=[{"role": "user", "content": f"q{i}"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one(i) for i in range(24)))
    assert texts == [REPLY] * 24
    assert len({c["request_id"] for c in served.node.calls}) == 24


async def test_info_routes(served: Served) -> None:
    node = served.node
    progress = FakeRepoProgress(Shard("m", 0, 3, 4), "org/m", 50, 100)
    node.node_download_progress = {
        "fake-node": progress,
        "done-node": FakeRepoProgress(progress.shard, "o/m", 1, 1, "complete"),
    }
    node.shard_downloader.statuses = [progress]
    async with aiohttp.ClientSession() as session:
        async with session.get(served.url + "/healthcheck") as r:
            assert await r.json() == {"status": "ok"}
        async with session.get(served.url + "/v1/models") as r:
            models = await r.json()
        assert models["object"] == "list"
        assert models["data"][0]["id"] == served.api.default_model
        assert models["data"][0]["object"] == "model"
        for path in ("/topology", "/v1/topology"):
            async with session.get(served.url + path) as r:
                topology = await r.json()
            assert topology["nodes"]["fake-node"]["model"] == "Fake Device"
        async with session.get(served.url + "/v1/download/progress") as r:
            assert await r.json() == {"fake-node": progress.to_dict()}
        async with session.get(served.url + "/initial_models") as r:
            initial = await r.json()
        assert initial[served.api.default_model]["loading"] is True
        async with session.get(served.url + "/modelpool") as r:
            events = [e for e in (await r.text()).split("\n\n") if e]
        assert json.loads(events[0][len("data: ") :]) == {
            "m": {"downloaded": False, "download_percentage": 50.0, "total_size": 100, "total_downloaded": 50}
        }
        assert events[-1] == "data: [DONE]"
        async with session.get(served.url + "/no/such/route") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "not_found"
    listed = await served.client().models.list()
    assert listed.data[0].id == served.api.default_model


async def test_models_say_which_take_images(served: Served, llava_dir: Path) -> None:
    async with aiohttp.ClientSession() as session, session.get(served.url + "/v1/models") as r:
        listed = {m["id"]: m["vision"] for m in (await r.json())["data"]}
    assert listed[served.api.default_model] is False
    assert (listed["llava-1.5-7b-hf"], listed["llama-3.2-1b"]) == (True, False)
    # A local model directory says so in its config.json.
    assert model_choice.takes_images(str(llava_dir))


async def test_cors(served: Served) -> None:
    async with aiohttp.ClientSession() as session:
        headers = {"Origin": "http://elsewhere", "Access-Control-Request-Method": "POST"}
        async with session.options(served.url + "/v1/chat/completions", headers=headers) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
        body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
        async with session.post(served.url + "/v1/chat/completions", json=body, headers={"Origin": "http://x"}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            await r.read()


async def test_token_encode(served: Served) -> None:
    messages = [{"role": "user", "content": "Encode me"}]
    status, reply = await served.post("/v1/chat/token/encode", json.dumps({"messages": messages}))
    assert status == 200
    prompt = served.tokenizer.apply_chat_template(messages)
    assert reply["encoded_prompt"] == prompt
    assert reply["encoded_tokens"] == served.tokenizer.encode(prompt)
    assert reply["num_tokens"] == len(reply["encoded_tokens"])
    status, reply = await served.post("/chat/token/encode", "{}")
    assert status == 400


async def test_download_route(served: Served) -> None:
    status, reply = await served.post("/download", "{}")
    assert status == 400 and reply["error"]["code"] == "missing_field"
    status, reply = await served.post("/download", json.dumps({"model": "no-such-model"}))
    assert status == 404
    status, reply = await served.post("/download", json.dumps({"model": served.api.default_model}))
    assert status == 200 and reply["status"] == "success"
    await wait_until(lambda: served.node.shard_downloader.ensured)
    shard, engine = served.node.shard_downloader.ensured[0]
    assert (shard.start_layer, shard.end_layer + 1) == (0, shard.n_layers)
    assert engine == "CandleInferenceEngine"


async def test_quit_calls_the_shutdown_hook(served: Served) -> None:
    quit_called = asyncio.Event()

    async def on_quit() -> None:
        quit_called.set()

    served.api.on_quit = on_quit
    status, reply = await served.post("/quit", "")
    assert status == 200 and reply == {"detail": "Quit signal received"}
    await asyncio.wait_for(quit_called.wait(), 10)


async def test_web_chat_is_served(served: Served) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(served.url + "/") as r:
            assert r.status == 200
            html = await r.text()
        assert "<html" in html.lower()
        for asset in ("/chat.css", "/chat.js"):
            assert asset.lstrip("/") in html
            async with session.get(served.url + asset) as r:
                assert r.status == 200
                assert len(await r.read()) > 100


async def test_delete_model(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    deleted: list[tuple[str, str]] = []

    async def delete_model(model_id: str, engine: str) -> bool:
        deleted.append((model_id, engine))
        return model_id == "llama-3.2-1b"

    monkeypatch.setattr(model_routes, "delete_model", delete_model)
    async with aiohttp.ClientSession() as session:
        async with session.delete(served.url + "/models/llama-3.2-1b") as r:
            assert r.status == 200
            assert (await r.json())["status"] == "success"
        async with session.delete(served.url + "/models/never-downloaded") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "model_not_found"
    assert deleted == [("llama-3.2-1b", "CandleInferenceEngine"), ("never-downloaded", "CandleInferenceEngine")]


async def test_stop_ends_running_streams_and_cancels_them(served: Served) -> None:
    served.node.hang_after = 2
    async with aiohttp.ClientSession() as session:
        body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
        async with session.post(served.url + "/v1/chat/completions", json=body) as response:
            await response.content.readline()
            await served.api.stop()
            with contextlib.suppress(aiohttp.ClientError):
                await response.read()
    assert served.node.cancelled == [served.node.calls[0]["request_id"]]
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session, session.get(served.url + "/healthcheck"):
            pass


async def test_requests_past_the_limit_queue_in_order_and_past_the_queue_get_503(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    node = FakeNode(reply_tokens(tokenizer), delay=0.01)
    node.hang_after = 1  # every generation holds its slot until its client leaves
    async for served in serve(node, model_dir, tokenizer, max_concurrent_requests=2, max_queued_requests=1):
        await _fill_the_queue_and_drain_it(served)


async def _fill_the_queue_and_drain_it(served: Served) -> None:
    admission, url = served.api.admission, served.url + "/chat/completions"
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        running = [asyncio.create_task(session.post(url, json=body)) for _ in range(2)]
        await wait_until(lambda: admission.active == 2)
        waiting = asyncio.create_task(session.post(url, json=body))
        await wait_until(lambda: admission.waiting == 1)
        assert len(served.node.calls) == 2, "the third request waits before reaching the node"
        async with session.post(url, json=body) as refused:
            assert refused.status == 503
            error = (await refused.json())["error"]
            assert error["code"] == "server_overloaded" and "2 requests running" in error["message"]
        # A running request ends (its client goes away): the waiting one takes its slot.
        (await running[0]).close()
        await wait_until(lambda: len(served.node.calls) == 3)
        assert admission.waiting == 0
        # A waiting request whose client leaves is dropped from the queue.
        queued = asyncio.create_task(session.post(url, json=body))
        await wait_until(lambda: admission.waiting == 1)
        queued.cancel()
        await wait_until(lambda: admission.waiting == 0)
        assert len(served.node.calls) == 3
        for response in [await running[1], await waiting]:
            response.close()
    await wait_until(lambda: admission.active == 0)


async def test_an_api_key_guards_every_route_but_the_web_chat_and_health(model_dir: Path, tokenizer: Tokenizer) -> None:
    node = FakeNode(reply_tokens(tokenizer))
    async for s in serve(node, model_dir, tokenizer, api_key="sk-cluster"):
        messages = [{"role": "user", "content": "Hi"}]
        keyed = openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="sk-cluster", max_retries=0)
        reply = await keyed.chat.completions.create(model=s.api.default_model, messages=messages)
        assert reply.choices[0].message.content == REPLY
        with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
            await s.client().chat.completions.create(model=s.api.default_model, messages=messages)
        async with aiohttp.ClientSession() as session:
            for method, path in [("GET", "/v1/models"), ("GET", "/topology"), ("POST", "/quit"), ("POST", "/download")]:
                async with session.request(method, s.url + path) as r:
                    assert r.status == 401, path
                    assert r.headers["WWW-Authenticate"] == "Bearer"
                    error = (await r.json())["error"]
                    assert error["code"] == "invalid_api_key" and "--api-key" in error["message"], path
            for path in ("/", "/chat.js", "/healthcheck"):
                async with session.get(s.url + path) as r:
                    assert r.status == 200, path
            # A browser's preflight carries no key; it must pass for the real request to be sent.
            async with session.options(s.url + "/v1/chat/completions") as r:
                assert r.status == 204
    assert len(node.calls) == 1


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [(errors.HubConnectionError, 503, "download_failed"), (errors.ModelNotFoundError, 404, "model_not_found")],
)
async def test_a_tokenizer_that_cannot_be_fetched_fails_that_request_alone(
    served: Served, monkeypatch: pytest.MonkeyPatch, failure: type[Exception], status: int, code: str
) -> None:
    tokenizer_for = served.api.tokenizer_for

    async def unreachable(model: object) -> object:
        raise failure("https://hf.example: does not answer")

    monkeypatch.setattr(served.api, "tokenizer_for", unreachable)
    body = json.dumps({"messages": [{"role": "user", "content": "x"}]})
    answered, reply = await served.post("/v1/chat/completions", body)
    assert answered == status
    assert reply["error"]["code"] == code and "hf.example" in reply["error"]["message"]
    monkeypatch.setattr(served.api, "tokenizer_for", tokenizer_for)
    answered, reply = await served.post("/v1/chat/completions", body)
    assert answered == 200 and reply["choices"][0]["message"]["content"] == REPLY
