"""The registry as users meet it: an id of exo classic's registry picks the weights classic picks
(for candle, the mlx-community repository of classic's MLX engine), an id the engine cannot load is
an error that names the id and the engine (models API, chat API, command line), and `run ID`
downloads the id's repository from a (fake) hub and answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exo import models
from exo.testing.synth_mlx import write_mlx_model
from support.app_harness import Served
from support.fake_hub import FakeHub, FakeHubServer

SCRIPT = Path(__file__).parent / "scripts" / "cli_with_fake_cluster.py"
CANDLE = "CandleInferenceEngine"
# Candle runs these registry ids' architectures; classic's MLX engine loads the same repositories.
SAME_AS_CLASSIC = {
    "llama-3.2-1b": "mlx-community/Llama-3.2-1B-Instruct-4bit",
    "llama-3.2-1b-8bit": "mlx-community/Llama-3.2-1B-Instruct-8bit",
    "llama-3.2-3b-bf16": "mlx-community/Llama-3.2-3B-Instruct",
    "deepseek-r1-distill-qwen-1.5b-6bit": "mlx-community/DeepSeek-R1-Distill-Qwen-1.5B-6bit",
    "deepseek-r1-distill-llama-8b-3bit": "mlx-community/DeepSeek-R1-Distill-Llama-8B-3bit",
    "nemotron-70b": "mlx-community/nvidia_Llama-3.1-Nemotron-70B-Instruct-HF_4bit",
    "qwen-3-8b": "mlx-community/Qwen3-8B-4bit",
    "phi-3.5-mini": "mlx-community/Phi-3.5-mini-instruct-4bit",
    "phi-4": "mlx-community/phi-4-4bit",
    "gemma2-9b": "mlx-community/gemma-2-9b-it-4bit",
    "gemma2-27b": "mlx-community/gemma-2-27b-it-4bit",
    "deepseek-coder-v2-lite": "mlx-community/DeepSeek-Coder-V2-Lite-Instruct-4bit-mlx",
    "deepseek-coder-v2.5": "mlx-community/DeepSeek-V2.5-MLX-AQ4_1_64",
    "llava-1.5-7b-hf": "llava-hf/llava-1.5-7b-hf",
}
# Registry ids of architectures candle does not run, with the architecture the error names.
OTHER_ARCHITECTURES = {"deepseek-v3": "deepseek_v3", "deepseek-r1": "deepseek_v3"}


def test_an_id_picks_the_weights_classic_picks() -> None:
    for model_id, repo in SAME_AS_CLASSIC.items():
        assert models.get_repo(model_id, CANDLE) == repo
        assert models.model_cards[model_id]["repo"]["MLXDynamicShardInferenceEngine"] == repo
        assert models.unavailable_reason(model_id, "candle") is None
    assert models.model_cards["llama-3.2-1b-8bit"]["repo"]["TinygradDynamicShardInferenceEngine"] == (
        "unsloth/Llama-3.2-1B-Instruct"
    )
    supported = models.get_supported_models([["candle"]])
    assert set(SAME_AS_CLASSIC) <= set(supported)
    assert not set(OTHER_ARCHITECTURES) & set(supported)
    assert {m for m in supported if models.get_repo(m, CANDLE) is None} == set()


@pytest.mark.parametrize("model_id", sorted(OTHER_ARCHITECTURES))
def test_other_architectures_have_no_candle_repository(model_id: str) -> None:
    assert models.get_repo(model_id, CANDLE) is None and models.build_base_shard(model_id, CANDLE) is None
    reason = models.unavailable_reason(model_id, CANDLE)
    assert reason == (
        f"The model '{model_id}' is a {OTHER_ARCHITECTURES[model_id]} model, and the candle engine "
        "(CandleInferenceEngine) runs only llama, mistral, qwen2, qwen3, phi3, qwen3_moe, mixtral, gemma2, "
        "gemma3_text, deepseek_v2, llava models."
    )


async def test_the_api_lists_only_loadable_ids_and_refuses_the_others(served: Served) -> None:
    listed = [m.id for m in (await served.client().models.list()).data]
    assert "llama-3.2-1b-8bit" in listed and "deepseek-v3" not in listed
    body = {"model": "deepseek-v3", "messages": [{"role": "user", "content": "x"}]}
    status, reply = await served.post("/v1/chat/completions", json.dumps(body))
    assert status == 404 and served.node.calls == []
    error = reply["error"]
    assert (error["code"], error["type"]) == ("model_not_found", "not_found_error")
    assert error["message"].startswith("The model 'deepseek-v3' is a deepseek_v3 model, and the candle engine")
    assert "Supported models: " in error["message"] and "llama-3.2-1b-8bit" in error["message"]


def exo_main(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`exo.main` with the cluster layer stood in (tests/scripts/cli_with_fake_cluster.py), run to its end in
    `env` (default: this process's environment)."""
    environment = {**(os.environ if env is None else env), "EXO_ENGINE": "candle"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=environment, timeout=180
    )


@pytest.mark.parametrize(
    "args",
    [["run", "deepseek-v3"], ["--run-model", "deepseek-v3"], ["--default-model", "deepseek-v3", "--disable-tui"]],
    ids=["run", "run-model", "default-model"],
)
def test_the_command_line_refuses_an_id_candle_cannot_load(args: list[str]) -> None:
    done = exo_main(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    flag = "run" if "run" in args[0] else "--default-model"
    assert (
        f"exo: {flag}: The model 'deepseek-v3' is a deepseek_v3 model, and the candle engine (CandleInferenceEngine)"
        in done.stderr
    )
    assert "started" not in done.stdout  # refused before the node starts


def test_help_says_how_to_choose_weights() -> None:
    done = subprocess.run([sys.executable, "-m", "exo.main", "--help"], capture_output=True, text=True, timeout=60)
    text = " ".join(done.stdout.split())
    for words in ("the id picks the weights", "llama-3.2-1b-8bit the 8-bit one", "(org/name/file.gguf)", ".gguf"):
        assert words in text, words


@pytest.fixture
def hub_env(tmp_path: Path) -> Iterator[tuple[FakeHub, dict[str, str]]]:
    """A fake hub with nothing on it, and the environment of a node that downloads from it into `tmp_path`."""
    with FakeHubServer() as hub:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE")}
        env |= {
            "HF_ENDPOINT": hub.url,
            "EXO_HOME": str(tmp_path / "exo"),
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        }
        yield hub, env


def test_run_an_id_downloads_its_repository_and_answers(hub_env: tuple[FakeHub, dict[str, str]], tmp_path: Path):
    hub, env = hub_env
    # A 16-layer llama, as many layers as the registry gives Llama 3.2 1B, quantized to 8 bits as
    # mlx_lm.convert writes it, served under the repository `llama-3.2-1b-8bit` names.
    repo = "mlx-community/Llama-3.2-1B-Instruct-8bit"
    model = write_mlx_model("tiny-llama-16", tmp_path / "model", bits=8, group_size=64, dtype="bf16", num_shards=2)
    hub.add_repo(repo, model)
    done = exo_main("run", "llama-3.2-1b-8bit", "--prompt", "Hello!", "--max-generate-tokens", "6", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Generated 6 tokens" in done.stdout, done.stdout
    fetched = {r.path.split("?")[0] for r in hub.requests if r.method == "GET"}
    assert f"/api/models/{repo}/revision/main" in fetched, fetched
    assert hub.fetched_weights() == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    downloaded = Path(env["EXO_HOME"]) / "downloads" / "mlx-community--Llama-3.2-1B-Instruct-8bit"
    assert (downloaded / "config.json").is_file()
