"""Shared fixtures: a synthetic tiny model, its tokenizer, a tiny LLaVA model, the ChatGPT API served over a fake node
and Python modules generated from the proto by grpcio-tools."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest

from exo.inference.tokenizers import Tokenizer, resolve_tokenizer
from exo.testing.synth import write_model
from exo.testing.synth_llava import write_llava_model
from support.app_harness import Served, reply_tokens, serve
from support.fake_node import FakeNode


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
async def tokenizer(model_dir: Path) -> Tokenizer:
    return await resolve_tokenizer(model_dir)


@pytest.fixture(scope="session")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llava_model("tiny-llava", tmp_path_factory.mktemp("tiny-llava") / "f32")


@pytest.fixture
async def served(model_dir: Path, tokenizer: Tokenizer) -> AsyncIterator[Served]:
    async for s in serve(FakeNode(reply_tokens(tokenizer)), model_dir, tokenizer, response_timeout=10):
        yield s


PROTO = Path(__file__).parent.parent / "proto" / "node_service.proto"


@pytest.fixture(scope="session")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModuleType, ModuleType]:
    """`node_service_pb2` and `node_service_pb2_grpc`, generated as exo classic generates them."""
    out = tmp_path_factory.mktemp("stubs")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO.parent}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO),
        ],
        check=True,
    )
    sys.path.insert(0, str(out))
    try:
        return importlib.import_module("node_service_pb2"), importlib.import_module("node_service_pb2_grpc")
    finally:
        sys.path.remove(str(out))
