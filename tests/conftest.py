"""Shared fixtures: a synthetic tiny model, its tokenizer and the ChatGPT API served over a fake node."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app_harness import Served, reply_tokens, serve
from exo.inference.tokenizers import Tokenizer, resolve_tokenizer
from exo.testing.synth import write_model
from fake_node import FakeNode


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
async def tokenizer(model_dir: Path) -> Tokenizer:
    return await resolve_tokenizer(model_dir)


@pytest.fixture
async def served(model_dir: Path, tokenizer: Tokenizer) -> AsyncIterator[Served]:
    async for s in serve(FakeNode(reply_tokens(tokenizer)), model_dir, tokenizer, response_timeout=10):
        yield s
