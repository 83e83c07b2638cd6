"""A cluster mixing engines, as real `python -m exo.main` processes on loopback: a candle node and an rkllm node (its
RKLLAMA server a fake one). Each model runs on a node that can hold it, whichever node's API is asked: the RKLLM build
goes whole to the rkllm node, the candle model to the candle node, and neither node is handed layers it cannot run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import aiohttp
import pytest

from exo.helpers import find_available_port
from exo.testing.synth import write_model
from support.fake_rkllama import FakeRkllama
from support.solo_cli import UNSET, wait_until_healthy

MESSAGES = [{"role": "user", "content": "Say hello."}]
NPU_MODEL = "my-npu-model"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The candle model (a local directory), and the tokenizer directory of the RKLLM build, named as on the server."""
    root = tmp_path_factory.mktemp("mixed")
    return write_model("tiny-llama", root / "tiny-llama", dtype="f32", seed=0), write_model("tiny-qwen2", root / "Npu")


@pytest.fixture(scope="module")
def fake(models: tuple[Path, Path]) -> Iterator[FakeRkllama]:
    server = FakeRkllama(models=[models[1].name]).start()
    yield server
    server.stop()


@contextmanager
def serving(tmp: Path, node_id: str, ports: dict[str, int], api_port: int, env: dict[str, str]) -> Iterator[str]:
    """One node of the cluster, its model table given the RKLLM build as a user adds one; yields its API's URL."""
    caps = {"model": "Unknown Model", "chip": "Unknown Chip", "memory": 0, "flops": {"fp32": 0, "fp16": 0, "int8": 0}}
    peers = {peer: {"address": "127.0.0.1", "port": port, "device_capabilities": caps} for peer, port in ports.items()}
    config = tmp / f"{node_id}-network.json"
    config.write_text(json.dumps({"peers": peers}))
    launcher = tmp / f"{node_id}-launch.py"
    launcher.write_text(
        "import runpy, sys\n"
        "from exo.models import model_cards\n"
        f"model_cards[{NPU_MODEL!r}] = {{'layers': 2, 'repo': {{'RKLLMInferenceEngine': sys.argv.pop(1)}}}}\n"
        "runpy.run_module('exo.main', run_name='__main__', alter_sys=True)\n"
    )
    command = [
        sys.executable, str(launcher), env.pop("TOKENIZER"), "--node-id", node_id, "--node-host", "127.0.0.1",
        "--node-port", str(ports[node_id]), "--chatgpt-api-port", str(api_port), "--discovery-module", "manual",
        "--discovery-config-path", str(config), "--disable-tui",
    ]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k not in UNSET} | {"EXO_HOME": str(tmp / node_id)} | env
    log = (tmp / f"{node_id}.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=environ)
    url = f"http://127.0.0.1:{api_port}"
    try:
        wait_until_healthy(url, process, (tmp / f"{node_id}.log").read_text, 90)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
            log.close()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeRkllama, models: tuple[Path, Path]
) -> Iterator[dict[str, str]]:
    """The API URLs of the candle node (`cpu`) and the rkllm node (`npu`), once each knows the other's engine."""
    tmp = tmp_path_factory.mktemp("nodes")
    ports = {name: find_available_port("127.0.0.1") for name in ("cpu", "npu")}
    engines = {"cpu": {"EXO_ENGINE": "candle"}, "npu": fake.env(EXO_ENGINE="rkllm", RKLLM_TIMEOUT="5")}
    with ExitStack() as nodes:
        urls = {
            name: nodes.enter_context(
                serving(tmp, name, ports, find_available_port("127.0.0.1"), engine | {"TOKENIZER": str(models[1])})
            )
            for name, engine in engines.items()
        }
        # The candle node lists the RKLLM build once the rkllm node's health check has named its engine.
        deadline = time.monotonic() + 60
        while NPU_MODEL not in listed_models(urls["cpu"]):
            assert time.monotonic() < deadline, "the candle node never learned the rkllm node's engine"
            time.sleep(0.5)
        yield urls


def listed_models(url: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as response:
        return [model["id"] for model in json.load(response)["data"]]


async def chat(url: str, model: str, max_tokens: int = 100) -> tuple[int, dict]:
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
        session.post(f"{url}/v1/chat/completions", json=body) as response,
    ):
        return response.status, await response.json()


async def test_the_rkllm_build_runs_whole_on_the_rkllm_node_whichever_node_is_asked(
    cluster: dict[str, str], fake: FakeRkllama
) -> None:
    for asked in ("cpu", "npu"):
        before = len(fake.generations)
        status, body = await chat(cluster[asked], NPU_MODEL)
        assert status == 200, (asked, body)
        assert body["choices"][0]["message"]["content"] == fake.answer, asked
        assert len(fake.generations) == before + 1, asked


async def test_a_candle_model_runs_on_the_candle_node_whichever_node_is_asked(
    cluster: dict[str, str], fake: FakeRkllama, models: tuple[Path, Path]
) -> None:
    before = len(fake.generations)
    answers = {}
    for asked in ("cpu", "npu"):
        status, body = await chat(cluster[asked], str(models[0]), max_tokens=8)
        assert status == 200, (asked, body)
        answers[asked] = body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] > 0, body
    # The same greedy answer, computed by candle both times; the RKLLAMA server was never asked.
    assert answers["cpu"] == answers["npu"]
    assert len(fake.generations) == before
