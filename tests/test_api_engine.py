"""The API over a node stand-in that really runs the candle engine on a synthetic model (real token streams)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from exo.api.model_choice import local_model_layers
from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.inference.tokenizers import Tokenizer
from support.app_harness import Served, serve
from support.fake_node import EngineNode

MESSAGES = [{"role": "user", "content": "Tell me about the ring of nodes."}]


@pytest.fixture
async def engine_served(model_dir: Path, tokenizer: Tokenizer) -> AsyncIterator[Served]:
    node = EngineNode(CandleInferenceEngine(), tokenizer)
    async for s in serve(node, model_dir, tokenizer, response_timeout=120):
        yield s


async def greedy(served: Served, n: int) -> list[int]:
    """The first `n` greedy tokens straight from a fresh engine, for comparison."""
    node = EngineNode(CandleInferenceEngine(), served.tokenizer)
    model = served.api.default_model
    shard = Shard(model, 0, 0, local_model_layers(model))
    prompt = served.tokenizer.apply_chat_template(MESSAGES)
    return [t async for t in node.generate(shard, prompt, max_tokens=n)]


async def test_streamed_and_whole_answers_match_the_engine(engine_served: Served) -> None:
    s = engine_served
    client = s.client()
    expected = await greedy(s, 24)
    eos = set(s.tokenizer.eos_token_ids)
    content_tokens = [t for t in expected if t not in eos]
    expected_text = s.tokenizer.decode(content_tokens)
    whole = await client.chat.completions.create(model=s.api.default_model, messages=MESSAGES, max_tokens=24)
    assert whole.choices[0].message.content == expected_text
    assert whole.usage.completion_tokens == len(content_tokens)
    assert whole.choices[0].finish_reason == ("stop" if len(content_tokens) < len(expected) else "length")
    stream = await client.chat.completions.create(
        model=s.api.default_model, messages=MESSAGES, max_tokens=24, stream=True
    )
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert streamed == expected_text


async def test_concurrent_requests_on_the_engine_agree(engine_served: Served) -> None:
    client = engine_served.client()

    async def ask(stream: bool) -> str:
        kwargs = {"model": engine_served.api.default_model, "messages": MESSAGES, "max_tokens": 16}
        if not stream:
            reply = await client.chat.completions.create(**kwargs)
            return reply.choices[0].message.content
        chunks = await client.chat.completions.create(**kwargs, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    answers = await asyncio.gather(*(ask(i % 2 == 0) for i in range(6)))
    assert len(set(answers)) == 1
    assert answers[0]


async def test_seeded_sampling_through_the_api_is_reproducible(engine_served: Served) -> None:
    client = engine_served.client()
    kwargs = {
        "model": engine_served.api.default_model,
        "messages": MESSAGES,
        "max_tokens": 16,
        "temperature": 1.0,
        "seed": 7,
    }
    first = await client.chat.completions.create(**kwargs)
    second = await client.chat.completions.create(**kwargs)
    assert first.choices[0].message.content == second.choices[0].message.content


async def test_streamed_text_is_the_decoded_tokens_when_sampling(engine_served: Served) -> None:
    """At temperature 1 the synthetic model emits arbitrary byte tokens: streaming must still give decode()."""
    s = engine_served
    model = s.api.default_model
    kwargs = {"model": model, "messages": MESSAGES, "max_tokens": 40, "temperature": 1.0, "seed": 11}
    async with s.client() as client:
        whole = await client.chat.completions.create(**kwargs)
        chunks = [c async for c in await client.chat.completions.create(**kwargs, stream=True)]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    node = EngineNode(CandleInferenceEngine(), s.tokenizer)
    prompt = s.tokenizer.apply_chat_template(MESSAGES)
    shard = Shard(model, 0, 0, local_model_layers(model))
    tokens = [t async for t in node.generate(shard, prompt, max_tokens=40, temperature=1.0, seed=11)]
    expected = s.tokenizer.decode([t for t in tokens if t not in set(s.tokenizer.eos_token_ids)])
    assert whole.choices[0].message.content == expected
    assert streamed == expected
