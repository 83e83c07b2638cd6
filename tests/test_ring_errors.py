"""A failure keeps its kind across the ring: a prompt longer than the context of one node's candle engine
(synthetic model, real nodes over loopback gRPC) answers 400 `context_length_exceeded` through the API on one
node and when another node of a two- or three-node ring raised it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from exo.errors import ContextOverflowError
from exo.inference.candle import CandleInferenceEngine
from support.cluster import running_cluster, wait_for_ring, whole_model
from test_app_cluster import cluster_api

# Far shorter than the prompt below, which the other engines' default context holds easily.
SMALL_CONTEXT = 32
LONG_PROMPT = "Tell me about rings of nodes. " * 40


def engines(small: list[bool]) -> Callable[[], CandleInferenceEngine]:
    """Makes one engine per node, in the order the nodes are made; `small[i]` gives the i-th a short context."""
    made = iter([CandleInferenceEngine(max_context=SMALL_CONTEXT) if s else CandleInferenceEngine() for s in small])
    return lambda: next(made)


async def overflow_reply(url: str, model: str) -> dict:
    """The error the API answers a too-long prompt with."""
    body = {"model": model, "messages": [{"role": "user", "content": LONG_PROMPT}], "max_tokens": 4}
    async with aiohttp.ClientSession() as session, session.post(url + "/v1/chat/completions", json=body) as response:
        assert response.status == 400, await response.text()
        return (await response.json())["error"]


async def test_a_context_overflow_on_one_node_is_a_400(model_dir: Path) -> None:
    model = str(model_dir)
    async with cluster_api(["solo"], model, engine=engines([True])) as (_, url):
        error = await overflow_reply(url, model)
    assert error["code"] == "context_length_exceeded"
    assert error["type"] == "invalid_request_error"
    assert f"context of {SMALL_CONTEXT} tokens" in error["message"]


@pytest.mark.parametrize(
    ("ids", "small", "path"),
    [
        # Ring order is c, b, a (equal memory, ids descending); the API runs on a.
        # b runs the prompt a hands it and answers a's call with the error (gRPC metadata).
        (["a", "b"], [False, True], "(on node b)"),
        # c hands b the hidden states; b answers c's call with the error, c tells a (status JSON).
        (["a", "b", "c"], [False, True, False], "(on node b) (on node c)"),
    ],
)
async def test_a_context_overflow_on_another_node_arrives_typed(
    model_dir: Path, ids: list[str], small: list[bool], path: str
) -> None:
    model = str(model_dir)
    async with cluster_api(ids, model, engine=engines(small)) as (nodes, url):
        await wait_for_ring(nodes[0], len(ids))
        error = await overflow_reply(url, model)
        assert error["code"] == "context_length_exceeded"
        assert f"context of {SMALL_CONTEXT} tokens" in error["message"]
        assert error["message"].endswith(path)
        # The node's own stream raises the exception of the kind, and the ring serves the next request.
        with pytest.raises(ContextOverflowError, match=re.escape(path)):
            async for _ in nodes[0].generate(whole_model(model_dir), LONG_PROMPT, max_tokens=4):
                pass
        assert [t async for t in nodes[0].generate(whole_model(model_dir), "Hi", max_tokens=4)]


async def test_a_ring_of_default_engines_holds_the_long_prompt(model_dir: Path) -> None:
    """The control: the same prompt and ring with no short context answer normally."""
    async with running_cluster(["a", "b"], CandleInferenceEngine) as nodes:
        tokens = [t async for t in nodes[0].generate(whole_model(model_dir), LONG_PROMPT, max_tokens=4)]
    assert tokens
