"""DeepSeek-V2 and V2-Lite on the candle engine, beyond the golden logits (`test_golden.py`) and
the routes (`test_moe.py`): an MLX checkpoint whose every matrix is quantized, `kv_b_proj`
included (the engine decodes it to fold it into the queries and outputs), gives the logits of
its dequantized weights, whole and split over two shards."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.testing.synth import PRESETS

GOLDEN = Path(__file__).parent / "golden"


async def _prompt_logits(model_dir: Path, ids: list[int], cuts: tuple[int, ...] = ()) -> np.ndarray:
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    bounds = [0, *[c + 1 for c in cuts], layers]
    x = np.array([ids], dtype=np.int64)
    for start, end in itertools.pairwise(bounds):
        x, _ = await CandleInferenceEngine().infer_tensor("r", Shard(str(model_dir), start, end - 1, layers), x)
    return x.reshape(-1)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2-lite", "tiny-deepseek-v2"])
async def test_an_mlx_checkpoint_with_a_quantized_kv_b_proj_gives_its_dequantized_weights_logits(
    preset: str, tmp_path: Path
) -> None:
    from exo.testing.synth_mlx import write_mlx_model, write_mlx_reference

    # Groups of 32 split every matrix of the preset, kv_b_proj's 32 latent columns too.
    assert PRESETS[preset].config["kv_lora_rank"] == 32
    model = write_mlx_model(preset, tmp_path / "mlx", bits=8, group_size=32, dtype="bf16", num_shards=2)
    stored = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.self_attn.kv_b_proj.scales" in stored
    reference = write_mlx_reference(preset, tmp_path / "ref", bits=8, group_size=32, dtype="bf16")
    ids = json.loads((GOLDEN / f"{preset}.json").read_text())["prompt_ids"]
    ours, theirs = await _prompt_logits(model, ids), await _prompt_logits(reference, ids)
    # 8-bit activations of the quantized kernels keep the logits within a few percent of their range.
    assert np.abs(ours - theirs).max() <= 0.03 * np.abs(theirs).max()
    assert np.array_equal(await _prompt_logits(model, ids, cuts=(1,)), ours)
