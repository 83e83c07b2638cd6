"""Phi-3 / Phi-3.5 / Phi-4 (`phi3`) through every path a user takes besides the golden run
(tests/test_golden.py checks tiny-phi3 and tiny-phi3-partial against transformers): MLX-quantized
checkpoints with the fused `qkv_proj` and `gate_up_proj` packed as mlx-community stores them,
load-time quantization of the fused weights, layer splits, concurrent requests batched through a
node, and `exo.main run`.

The runs below go 40 positions past an 8-token prompt: past tiny-phi3's original context of 20
(LongRoPE's long factors) and its sliding window of 24.
"""

import asyncio
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from exo._core import dequantize, quantize
from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.testing.synth import cached_model
from support.cluster import running_cluster, whole_model
from support.engine_runs import assert_follows_reference, greedy, prompt_logits
from support.solo_cli import run_solo

LAYERS = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("phi3")


GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("parts", [1, 2])
async def test_longrope_switches_as_transformers_does(root: Path, parts: int) -> None:
    """tiny-phi3-partial's original context ends during the greedy run: from there each pass
    takes the long factors while the keys cached before keep the short ones, within 1e-4 of
    transformers (recomputing the cache with the long factors would be 5e-3 away)."""
    golden = json.loads((GOLDEN / "phi3" / "tiny-phi3-partial-switch.json").read_text())
    model = str(cached_model("tiny-phi3-partial", root / "safetensors", "f32"))
    cut = [LAYERS - 1] if parts == 1 else [1, LAYERS - 1]
    shards = [Shard(model, start, end, LAYERS) for start, end in zip([0, *[c + 1 for c in cut[:-1]]], cut, strict=True)]
    engines = [CandleInferenceEngine() for _ in shards]

    async def step(tokens: list[int]) -> np.ndarray:
        x = np.array([tokens])
        for engine, shard in zip(engines, shards, strict=True):
            x, _ = await engine.infer_tensor("r", shard, x)
        return np.asarray(x).reshape(-1)

    await step(golden["prompt_ids"])
    expected = golden["logits_at_position"]
    checked = 0
    for position, token in enumerate(golden["fed_tokens"], start=len(golden["prompt_ids"])):
        logits = await step([token])
        if str(position) in expected:
            np.testing.assert_allclose(logits, np.array(expected[str(position)], np.float32), atol=1e-4, rtol=0)
            checked += 1
    assert checked == len(expected) == 11


@pytest.mark.parametrize("parts", [1, 2])
async def test_a_prompt_run_in_chunks_takes_the_factors_of_its_whole_pass(root: Path, parts: int) -> None:
    """tiny-phi3's prompt passes its original context (20): run in chunks of 8, every chunk takes
    the long factors that transformers' one pass over the prompt takes."""
    golden = json.loads((GOLDEN / "tiny-phi3.json").read_text())
    model = str(cached_model("tiny-phi3", root / "safetensors", "f32"))
    bounds = [(0, LAYERS - 1)] if parts == 1 else [(0, 1), (2, LAYERS - 1)]
    stages = [(CandleInferenceEngine(prefill_chunk=8), Shard(model, a, b, LAYERS)) for a, b in bounds]
    ids = golden["prompt_ids"]
    for tokens, expected in zip([ids[:-2], [ids[-2]], [ids[-1]]], golden["logits_last3"], strict=True):
        x = np.array([tokens])
        for engine, shard in stages:
            x, _ = await engine.infer_tensor("r", shard, x)
        np.testing.assert_allclose(np.asarray(x).reshape(-1), np.array(expected, np.float32), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("preset", "bits", "dtype"), [("tiny-phi3", 4, "bf16"), ("tiny-phi3-partial", 8, "f32")])
async def test_an_mlx_checkpoint_gives_its_dequantized_weights_logits_and_tokens(
    root: Path, preset: str, bits: int, dtype: str
) -> None:
    pytest.importorskip("mlx.core")
    from exo.testing.synth_mlx import cached_mlx_model

    model = cached_mlx_model(preset, root, bits=bits, group_size=64, dtype=dtype)
    data = (model / "model.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    assert header["model.layers.0.self_attn.qkv_proj.weight"]["dtype"] == "U32"
    assert "model.layers.0.mlp.gate_up_proj.scales" in header
    reference = cached_mlx_model(preset, root, bits=bits, group_size=64, dtype=dtype, reference=True)
    ours, theirs = await prompt_logits(str(model), LAYERS), await prompt_logits(str(reference), LAYERS)
    assert np.abs(ours - theirs).max() <= 0.03 * np.abs(theirs).max()
    await assert_follows_reference(str(model), str(reference), LAYERS, 0.03, 40)
    alone = await greedy(str(model), LAYERS, 40)
    assert await greedy(str(model), LAYERS, 40, cuts=(1,)) == alone
    assert await greedy(str(model), LAYERS, 40, cuts=(0, 2)) == alone


async def test_load_time_quantization_of_the_fused_weights(root: Path, tmp_path: Path) -> None:
    directory = cached_model("tiny-phi3", root / "safetensors", "f32")
    for block_type in ["q8_0", "q4_0"]:
        # The reference: every matrix the engine quantizes (all but the embedding), quantized and
        # decoded back by the same quantizer, run in f32.
        reference_dir = tmp_path / block_type
        shutil.copytree(directory, reference_dir)
        tensors = load_file(directory / "model.safetensors")
        for name, values in tensors.items():
            if values.ndim == 2 and name != "model.embed_tokens.weight":
                rows, cols = values.shape
                blocks = quantize(values.astype(np.float32).tobytes(), rows, cols, block_type)
                decoded = dequantize(blocks, rows, cols, block_type)
                tensors[name] = np.frombuffer(decoded, np.float32).reshape(rows, cols)
        save_file(tensors, reference_dir / "model.safetensors")
        ours = await prompt_logits(str(directory), LAYERS, quantize=block_type)
        reference = await prompt_logits(str(reference_dir), LAYERS)
        assert np.abs(ours - reference).max() <= 0.03 * np.abs(reference).max(), block_type


@pytest.mark.parametrize("preset", ["tiny-phi3", "tiny-phi3-partial"])
async def test_splits_give_one_shards_tokens(root: Path, preset: str) -> None:
    model = str(cached_model(preset, root / "safetensors", "f32"))
    alone = await greedy(model, LAYERS, 40)
    assert await greedy(model, LAYERS, 40, cuts=(1,)) == alone
    assert await greedy(model, LAYERS, 40, cuts=(0, 2)) == alone


async def test_concurrent_requests_equal_their_solo_runs(root: Path) -> None:
    model = cached_model("tiny-phi3", root / "safetensors", "f32")
    words = ["ring", "node", "layer", "token", "cache", "peer", "shard", "model"]
    requests = [
        {"prompt": " ".join(words[(i + j) % len(words)] for j in range(3 + 5 * i)), "max_tokens": 24, "seed": i}
        for i in range(6)
    ]

    async def tokens(node: Any, request: dict[str, Any], request_id: str) -> list[int]:
        return [t async for t in node.generate(whole_model(model), request_id=request_id, temperature=0.0, **request)]

    async with running_cluster(["solo"], lambda: CandleInferenceEngine(prefill_chunk=8, max_batch=16)) as (node,):
        alone = [await tokens(node, r, f"alone-{i}") for i, r in enumerate(requests)]
        together = await asyncio.gather(*(tokens(node, r, f"together-{i}") for i, r in enumerate(requests)))
    assert together == alone
    # Greedy runs end at the end-of-turn token or after 24 tokens; those that run on pass the
    # original context (20) and the window (24) with their chat-templated prompts.
    assert all(alone) and sum(len(t) == 24 for t in alone) >= 3, [len(t) for t in alone]


def test_exo_main_runs_the_preset(root: Path, tmp_path: Path) -> None:
    model = cached_model("tiny-phi3", root / "safetensors", "f32")
    done = run_solo(tmp_path, "run", str(model), "--prompt", "Hello!", "--max-generate-tokens", "8")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Generated 8 tokens" in done.stdout
