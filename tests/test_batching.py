"""Continuous batching through real nodes: many concurrent requests (different prompts, lengths, temperatures and
seeds; prompts longer than a prefill chunk) each give exactly their solo tokens, on one node and across a ring;
cancelling one request leaves the others alone; no KV cache outlives its request."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from exo.inference.candle import CandleInferenceEngine
from exo.orchestration.node import Node
from exo.testing.synth import write_model
from support.cluster import running_cluster, wait_for_ring, whole_model

# Small enough that most prompts below run in several chunks between the other requests' steps.
CHUNK = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama"), dtype="f32", seed=3)


def _engine() -> CandleInferenceEngine:
    return CandleInferenceEngine(prefill_chunk=CHUNK, max_batch=64)


def _requests(count: int) -> list[dict[str, Any]]:
    """Prompts of 1 to 40 words, greedy and sampled, each with its own seed and token limit."""
    rng = random.Random(7)
    words = ["ring", "node", "layer", "token", "cache", "peer", "shard", "model", "batch", "stream"]
    return [
        {
            "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(1, 40))),
            "max_tokens": rng.randint(4, 16),
            "temperature": [0.0, 0.7, 1.0][i % 3],
            "seed": 1000 + i,
        }
        for i in range(count)
    ]


async def _tokens(node: Node, base: Any, request: dict[str, Any], request_id: str) -> list[int]:
    return [t async for t in node.generate(base, request_id=request_id, **request)]


async def _solo_and_together(node: Node, base: Any, requests: list[dict[str, Any]]) -> None:
    alone = [await _tokens(node, base, r, f"alone-{i}") for i, r in enumerate(requests)]
    together = await asyncio.gather(*(_tokens(node, base, r, f"together-{i}") for i, r in enumerate(requests)))
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a == b, f"request {i} ({requests[i]}) changed when batched"
        assert len(a) == requests[i]["max_tokens"]


async def test_32_concurrent_requests_each_equal_their_solo_run(model: Path) -> None:
    async with running_cluster(["solo"], _engine) as (node,):
        await _solo_and_together(node, whole_model(model), _requests(32))
        usage = node.inference_engine.cache_usage()
        assert usage == (0, 0), f"caches left behind: {usage}"


async def test_a_ring_batches_what_reaches_each_node(model: Path) -> None:
    async with running_cluster(["a", "b"], _engine) as nodes:
        await wait_for_ring(nodes[0], 2)
        await _solo_and_together(nodes[0], whole_model(model), _requests(8))


async def test_cancelling_one_request_leaves_the_batch_alone(model: Path) -> None:
    requests = [{**r, "max_tokens": 24} for r in _requests(4)]
    async with running_cluster(["solo"], _engine) as (node,):
        base = whole_model(model)
        alone = [await _tokens(node, base, r, f"alone-{i}") for i, r in enumerate(requests)]

        async def cancelled_after_three() -> None:
            stream = node.generate(base, request_id="doomed", **requests[0])
            for _ in range(3):
                await stream.__anext__()
            await stream.aclose()
            await node.cancel_request("doomed")

        together = await asyncio.gather(
            cancelled_after_three(), *(_tokens(node, base, r, f"together-{i}") for i, r in enumerate(requests[1:]))
        )
        assert list(together[1:]) == alone[1:]
        await asyncio.sleep(0.5)  # the cancelled request's last step ends
        assert node.inference_engine.cache_usage() == (0, 0)


async def test_no_cache_outlives_a_thousand_requests(model: Path) -> None:
    async with running_cluster(["solo"], _engine) as (node,):
        base = whole_model(model)
        request = {"prompt": "ring node", "max_tokens": 2, "temperature": 0.0}
        for wave in range(0, 1000, 50):
            await asyncio.gather(*(_tokens(node, base, request, f"r{wave + i}") for i in range(50)))
        assert node.inference_engine.cache_usage() == (0, 0)
