"""Mixture-of-experts models (Qwen3-MoE, Mixtral, DeepSeek-V2 and V2-Lite) on the candle engine.

The logits and greedy tokens of the tiny presets are checked against transformers by
`test_golden.py`; here: the experts the router chooses at every prompt position and layer are
transformers' (recorded beside the logits by `scripts/record_golden.py`), concurrent requests
batched through the experts give their solo tokens, load-time quantization keeps the model's
tokens close, and the sparse layers' weights are where the checkpoint says.
"""

import asyncio
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from exo._core import expert_routes
from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.testing.synth import PRESETS, tensor_plan, write_model

GOLDEN = Path(__file__).parent / "golden"
MOE_PRESETS = ["tiny-qwen3-moe", "tiny-mixtral", "tiny-deepseek-v2-lite", "tiny-deepseek-v2"]


@pytest.fixture(scope="module", params=MOE_PRESETS)
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    preset = request.param
    return preset, write_model(preset, tmp_path_factory.mktemp(preset) / "f32", dtype="f32", seed=0)


def test_the_router_chooses_transformers_experts(model: tuple[str, Path]) -> None:
    preset, model_dir = model
    golden = json.loads((GOLDEN / f"{preset}.json").read_text())
    expected = golden["expert_routes"]
    routes = expert_routes(str(model_dir), golden["prompt_ids"])
    config = PRESETS[preset].config
    assert len(routes) == config["num_hidden_layers"]
    sparse = {str(layer): chosen for layer, chosen in enumerate(routes) if chosen is not None}
    assert sorted(sparse) == sorted(expected), "the sparse layers differ"
    top_k = config["num_experts_per_tok"]
    for layer, chosen in sparse.items():
        assert len(chosen) == len(golden["prompt_ids"])
        assert all(len(experts) == top_k for experts in chosen)
        assert chosen == expected[layer], f"layer {layer} routes differently"
    # The prompt spreads over the experts: more than top-k of them are used in each layer.
    for chosen in sparse.values():
        assert len({e for experts in chosen for e in experts}) > top_k


def test_a_dense_layer_is_dense() -> None:
    config = PRESETS["tiny-qwen3-moe"].config
    assert config["mlp_only_layers"] == [2]
    golden = json.loads((GOLDEN / "tiny-qwen3-moe.json").read_text())
    assert "2" not in golden["expert_routes"]
    for preset in ("tiny-deepseek-v2-lite", "tiny-deepseek-v2"):
        assert PRESETS[preset].config["first_k_dense_replace"] == 1
        assert sorted(json.loads((GOLDEN / f"{preset}.json").read_text())["expert_routes"]) == ["1", "2", "3"]


def test_group_limited_routing_keeps_each_token_within_its_best_groups() -> None:
    config = PRESETS["tiny-deepseek-v2"].config
    size = config["n_routed_experts"] // config["n_group"]
    routes = json.loads((GOLDEN / "tiny-deepseek-v2.json").read_text())["expert_routes"]
    groups = [{e // size for e in experts} for chosen in routes.values() for experts in chosen]
    assert config["num_experts_per_tok"] > config["topk_group"] and size > 1
    assert all(len(g) <= config["topk_group"] for g in groups)
    # Some token takes two experts of one group: the limit is what kept it from a third group.
    assert any(len(g) < config["num_experts_per_tok"] for g in groups)


async def _greedy(
    engine: CandleInferenceEngine, shard: Shard, request_id: str, ids: list[int], steps: int
) -> list[int]:
    x = np.array([ids], dtype=np.int64)
    tokens = []
    for _ in range(steps):
        logits, _ = await engine.infer_tensor(request_id, shard, x)
        tokens.append(int(np.argmax(logits.reshape(-1))))
        x = np.array([[tokens[-1]]], dtype=np.int64)
    return tokens


async def test_concurrent_requests_through_the_experts_equal_their_solo_runs(model: tuple[str, Path]) -> None:
    preset, model_dir = model
    layers = PRESETS[preset].config["num_hidden_layers"]
    shard = Shard(str(model_dir), 0, layers - 1, layers)
    prompts = [[(7 * i + j * 13) % 400 + 1 for j in range(3 + 5 * i)] for i in range(6)]
    engine = CandleInferenceEngine(prefill_chunk=4, max_batch=16)
    alone = [await _greedy(engine, shard, f"alone-{i}", p, 10) for i, p in enumerate(prompts)]
    together = await asyncio.gather(*(_greedy(engine, shard, f"together-{i}", p, 10) for i, p in enumerate(prompts)))
    assert list(together) == alone


async def test_load_time_quantization_keeps_the_greedy_tokens_close(model: tuple[str, Path]) -> None:
    preset, model_dir = model
    golden = json.loads((GOLDEN / f"{preset}.json").read_text())
    layers = PRESETS[preset].config["num_hidden_layers"]
    shard = Shard(str(model_dir), 0, layers - 1, layers)
    ids = golden["prompt_ids"]
    plain = (await CandleInferenceEngine().infer_tensor("r", shard, np.array([ids], dtype=np.int64)))[0].reshape(-1)
    quantized = CandleInferenceEngine(quantize="q8_0")
    logits = (await quantized.infer_tensor("r", shard, np.array([ids], dtype=np.int64)))[0].reshape(-1)
    assert np.abs(logits - plain).max() <= 0.03 * np.abs(plain).max()
    assert int(np.argmax(logits)) == int(np.argmax(plain))


async def _prompt_logits(model_dir: Path, ids: list[int], cuts: tuple[int, ...] = ()) -> np.ndarray:
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    bounds = [0, *[c + 1 for c in cuts], layers]
    x = np.array([ids], dtype=np.int64)
    for start, end in itertools.pairwise(bounds):
        x, _ = await CandleInferenceEngine().infer_tensor("r", Shard(str(model_dir), start, end - 1, layers), x)
    return x.reshape(-1)


@pytest.mark.parametrize("preset", MOE_PRESETS)
async def test_an_mlx_checkpoint_with_stacked_experts_gives_its_dequantized_weights_logits(
    preset: str, tmp_path: Path
) -> None:
    from exo.testing.synth_mlx import write_mlx_model, write_mlx_reference

    # mlx-lm's layout: each layer's experts stacked as `switch_mlp.{gate,up,down}_proj`, split over two files.
    model = write_mlx_model(preset, tmp_path / "mlx", bits=8, group_size=64, dtype="bf16", num_shards=2)
    stored = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".switch_mlp.gate_proj.weight" in name for name in stored)
    assert not any(".experts." in name for name in stored)
    reference = write_mlx_reference(preset, tmp_path / "ref", bits=8, group_size=64, dtype="bf16")
    ids = json.loads((GOLDEN / f"{preset}.json").read_text())["prompt_ids"]
    ours, theirs = await _prompt_logits(model, ids), await _prompt_logits(reference, ids)
    # 8-bit activations of the quantized kernels keep the logits within a few percent of their range.
    assert np.abs(ours - theirs).max() <= 0.03 * np.abs(theirs).max()
    assert np.array_equal(await _prompt_logits(model, ids, cuts=(1,)), ours)


def test_the_benchmark_preset_has_qwen3_30b_a3b_shapes() -> None:
    plan = dict(tensor_plan(PRESETS["qwen3-moe-small"]))
    assert plan["model.layers.1.mlp.gate.weight"] == (128, 2048)
    assert plan["model.layers.1.mlp.experts.127.down_proj.weight"] == (2048, 768)
    assert "model.layers.0.mlp.experts.128.up_proj.weight" not in plan
    expert_values = sum(np.prod(shape) for name, shape in plan.items() if ".experts." in name)
    # A token reads 8 of the 128 experts: one sixteenth of the expert weights.
    assert expert_values == 2 * 128 * 3 * 2048 * 768
