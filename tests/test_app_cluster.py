"""The API over real nodes (Rust `Node`, gRPC over loopback, candle engine on a synthetic model): one node and a
two-node ring answer alike, streams are cancelled on every node, many streams run at once."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import openai

from exo.api import ChatGPTAPI
from exo.helpers import find_available_port
from exo.inference.candle import CandleInferenceEngine
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from support.app_harness import wait_until
from support.cluster import running_cluster

MESSAGES = [{"role": "user", "content": "Tell me about rings of nodes."}]


@asynccontextmanager
async def cluster_api(ids: list[str], model: str, engine=CandleInferenceEngine, classname="CandleInferenceEngine"):
    """A cluster of `ids` with the API served by the first node; yields (nodes, base url)."""
    async with running_cluster(ids, engine) as nodes:
        api = ChatGPTAPI(nodes[0], classname, response_timeout=120, default_model=model)
        port = find_available_port("127.0.0.1")
        await api.run(host="127.0.0.1", port=port)
        try:
            yield nodes, f"http://127.0.0.1:{port}"
        finally:
            await api.stop()


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


async def answer(url: str, model: str, stream: bool, **kwargs) -> tuple[str, str]:
    """(text, finish_reason) of one completion."""
    async with client(url) as c:
        if not stream:
            reply = await c.chat.completions.create(model=model, messages=MESSAGES, **kwargs)
            return reply.choices[0].message.content, reply.choices[0].finish_reason
        created = await c.chat.completions.create(model=model, messages=MESSAGES, stream=True, **kwargs)
        chunks = [ch async for ch in created]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]


async def all_idle(nodes) -> None:
    await wait_until(lambda: all(not n.outstanding_requests for n in nodes), limit=30)


async def test_one_node_and_a_two_node_ring_answer_alike(model_dir: Path) -> None:
    model = str(model_dir)
    async with cluster_api(["solo"], model) as (_, url):
        solo = await answer(url, model, stream=False, max_tokens=20)
    async with cluster_api(["a", "b"], model) as (nodes, url):
        assert len(nodes[0].topology.nodes) == 2
        whole = await answer(url, model, stream=False, max_tokens=20)
        streamed = await answer(url, model, stream=True, max_tokens=20)
        await all_idle(nodes)
    assert whole == solo
    assert streamed == solo
    assert solo[0]


async def test_disconnect_cancels_on_every_node(model_dir: Path) -> None:
    model = str(model_dir)
    async with cluster_api(["a", "b"], model) as (nodes, url):
        body = {"model": model, "messages": MESSAGES, "stream": True, "max_tokens": 5000}
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                assert response.status == 200
                for _ in range(3):
                    await response.content.readline()
                assert any(n.outstanding_requests for n in nodes)
        await all_idle(nodes)


async def test_stop_sequence_cancels_the_ring(model_dir: Path) -> None:
    model = str(model_dir)
    async with cluster_api(["a", "b"], model) as (nodes, url):
        full, _ = await answer(url, model, stream=False, max_tokens=30)
        stop = full[len(full) // 2 :][:2]
        assert stop, repr(full)
        text, finish = await answer(url, model, stream=True, max_tokens=3000, stop=[stop])
        assert finish == "stop"
        assert text == full[: full.index(stop)]
        await all_idle(nodes)


async def test_many_concurrent_streams_on_the_ring(model_dir: Path) -> None:
    model = str(model_dir)
    async with cluster_api(["a", "b"], model) as (nodes, url):
        expected = await answer(url, model, stream=False, max_tokens=12)
        results = await asyncio.gather(*(answer(url, model, stream=i % 2 == 0, max_tokens=12) for i in range(8)))
        assert results == [expected] * 8
        await all_idle(nodes)


async def test_dummy_engine_serves_the_dummy_model() -> None:
    async with cluster_api(["d"], "dummy", DummyInferenceEngine, "DummyInferenceEngine") as (nodes, url):
        text, finish = await answer(url, "dummy", stream=True, max_tokens=5)
        assert text and set(text.replace("dummy", "")) == set()
        assert finish in ("stop", "length")
        await all_idle(nodes)


async def test_topology_route_shows_the_ring(model_dir: Path) -> None:
    async with cluster_api(["a", "b"], str(model_dir)) as (_, url):
        async with aiohttp.ClientSession() as session, session.get(url + "/topology") as r:
            topology = await r.json()
    assert set(topology["nodes"]) == {"a", "b"}
