"""Helpers for the app's tests: the API served over a fake node on a loopback port, and polling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai

from exo.api import ChatGPTAPI
from exo.helpers import find_available_port
from exo.inference.tokenizers import Tokenizer
from support.fake_node import FakeNode

REPLY = "Hello there, cluster! Größe 日本語 🙂 and more words to stream."


def reply_tokens(tokenizer: Tokenizer) -> list[int]:
    """`REPLY` as token ids, ending with EOS."""
    return [*tokenizer.encode(REPLY, add_special_tokens=False), tokenizer.eos_token_id]


class Served:
    """A running API over a fake node."""

    def __init__(self, api: ChatGPTAPI, node: FakeNode, url: str, tokenizer: Tokenizer) -> None:
        self.api, self.node, self.url, self.tokenizer = api, node, url, tokenizer

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    async def post(self, path: str, body: bytes | str) -> tuple[int, dict]:
        data = body.encode() if isinstance(body, str) else body
        async with aiohttp.ClientSession() as session, session.post(self.url + path, data=data) as response:
            return response.status, await response.json()


async def serve(node: FakeNode, model_dir: Path, tokenizer: Tokenizer, **kwargs) -> AsyncIterator[Served]:
    """Serves `node` on a free loopback port for the duration of the iteration."""
    api = ChatGPTAPI(node, "CandleInferenceEngine", default_model=str(model_dir), **kwargs)
    port = find_available_port("127.0.0.1")
    await api.run(host="127.0.0.1", port=port)
    try:
        yield Served(api, node, f"http://127.0.0.1:{port}", tokenizer)
    finally:
        await api.stop()


async def wait_until(condition, limit: float = 10.0) -> None:
    """Polls `condition` until it holds; fails the test if it does not within `limit` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not condition():
        assert loop.time() < end, "condition never became true"
        await asyncio.sleep(0.02)
