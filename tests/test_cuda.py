"""The candle engine on an NVIDIA GPU (a wheel built by `scripts/build-cuda`, run by
`scripts/gpu-check`): f32 greedy tokens equal the CPU engine's on every synthetic preset, a ring
may mix CPU and GPU shards, bf16 stays close to the CPU, and the node reports the GPU. Each test
is skipped, with the reason, where the build has no CUDA or no GPU answers. The golden tests
(`test_golden.py`) run on the GPU too, under `EXO_DEVICE=cuda`.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from exo._core import device_capabilities
from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.testing.synth import write_model

PRESETS = ["tiny-llama", "tiny-llama-untied", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]
GREEDY_STEPS = 32
PROMPT = [1, 17, 42, 99, 7, 250, 3, 64]


def _cuda_engine() -> CandleInferenceEngine:
    try:
        return CandleInferenceEngine(device="cuda")
    except Exception as e:  # the build has no CUDA backend, or no GPU answers
        pytest.skip(f"no CUDA device: {e}")


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda() -> None:
    _cuda_engine()


async def _greedy(stages: list[tuple[CandleInferenceEngine, Shard]], request_id: str) -> tuple[list[int], np.ndarray]:
    """Greedy tokens after PROMPT through `stages` in order, and the prompt's last logits."""
    tokens, first_logits = list(PROMPT), None
    step = np.array([PROMPT], dtype=np.int64)
    for _ in range(GREEDY_STEPS):
        x = step
        for engine, shard in stages:
            x, _ = await engine.infer_tensor(request_id, shard, x)
        logits = x.reshape(-1)
        first_logits = logits if first_logits is None else first_logits
        tokens.append(int(np.argmax(logits)))
        step = np.array([[tokens[-1]]], dtype=np.int64)
    return tokens[len(PROMPT) :], first_logits


def _whole(model_dir: Path) -> Shard:
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    return Shard(str(model_dir), 0, layers - 1, layers)


def test_the_engine_names_the_gpu() -> None:
    assert _cuda_engine().device == "cuda:0"


@pytest.mark.parametrize("preset", PRESETS)
async def test_f32_greedy_tokens_equal_the_cpu_engines(preset: str, tmp_path: Path) -> None:
    model_dir = write_model(preset, tmp_path / preset, dtype="f32", seed=0)
    shard = _whole(model_dir)
    on_cpu, cpu_logits = await _greedy([(CandleInferenceEngine(device="cpu"), shard)], "r")
    on_gpu, gpu_logits = await _greedy([(_cuda_engine(), shard)], "r")
    assert on_gpu == on_cpu
    np.testing.assert_allclose(gpu_logits, cpu_logits, atol=1e-4, rtol=0)


async def test_a_ring_mixes_cpu_and_gpu_shards(tmp_path: Path) -> None:
    model_dir = write_model("tiny-llama", tmp_path / "m", dtype="f32", seed=0)
    whole = _whole(model_dir)
    first, second = Shard(whole.model_id, 0, 1, 4), Shard(whole.model_id, 2, 3, 4)
    alone, _ = await _greedy([(CandleInferenceEngine(device="cpu"), whole)], "r")
    mixed, _ = await _greedy([(CandleInferenceEngine(device="cpu"), first), (_cuda_engine(), second)], "r")
    assert mixed == alone


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
async def test_half_precision_checkpoints_stay_close_to_the_cpu(dtype: str, tmp_path: Path) -> None:
    model_dir = write_model("tiny-llama", tmp_path / dtype, dtype=dtype, seed=0)
    shard = _whole(model_dir)
    prompt = np.array([PROMPT], dtype=np.int64)
    cpu, _ = await CandleInferenceEngine(device="cpu").infer_tensor("r", shard, prompt)
    gpu, _ = await _cuda_engine().infer_tensor("r", shard, prompt)
    # The GPU rounds each product's output to the weights' dtype; the CPU keeps f32.
    assert np.abs(gpu - cpu).max() <= 0.02
    assert int(np.argmax(gpu)) == int(np.argmax(cpu))


async def test_the_node_reports_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXO_DEVICE", raising=False)
    caps = await device_capabilities()
    assert caps.chip.startswith("NVIDIA"), caps
    assert caps.model == f"Linux Box ({caps.chip})"
    assert caps.memory > 1024 and caps.flops.fp32 > 1 and caps.flops.fp16 >= caps.flops.fp32, caps
    monkeypatch.setenv("EXO_DEVICE", "cpu")
    assert not (await device_capabilities()).chip.startswith("NVIDIA")
