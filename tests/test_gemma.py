"""Gemma 2 and Gemma 3 (text) through the paths a user takes besides the golden values of
tests/test_golden.py (f32 logits, greedy tokens and 2- and 3-shard splits against transformers):
load-time quantization, MLX-quantized checkpoints (against their own dequantized weights and
against mlx-lm), concurrent requests batched past the sliding window, and `exo.main run`.

Both presets' windows (12 positions) are shorter than the prompts and generations below, so
local layers see only part of each request's cache.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exo.inference.candle import CandleInferenceEngine
from exo.orchestration.node import Node
from exo.testing.synth import PRESETS, cached_model
from exo.train.dataset import batches
from support.cluster import running_cluster, wait_for_ring, whole_model
from support.engine_runs import (
    PROMPT,
    assert_follows_reference,
    assert_logits_agree,
    forced_logits,
    greedy,
    prompt_logits,
)

GEMMA = ["tiny-gemma2", "tiny-gemma3"]
WINDOW = 12
CLI = Path(__file__).parent / "scripts" / "cli_with_fake_cluster.py"


def _layers(preset: str) -> int:
    return PRESETS[preset].config["num_hidden_layers"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gemma")


def test_the_presets_windows_are_shorter_than_the_prompts() -> None:
    for preset in GEMMA:
        assert PRESETS[preset].config["sliding_window"] == WINDOW < len(PROMPT) + 8


@pytest.mark.parametrize("preset", GEMMA)
async def test_load_time_quantization_keeps_the_f32_logits(root: Path, preset: str) -> None:
    model = str(cached_model(preset, root))
    plain = await prompt_logits(model, _layers(preset))
    quantized = await prompt_logits(model, _layers(preset), quantize="q8_0")
    assert not np.array_equal(plain, quantized), "the weights were not quantized"
    # Q8_0 weights and 8-bit activations: within a few percent of the logits' range (Gemma 2's cap squeezes
    # that range, hence 5%).
    assert np.abs(quantized - plain).max() <= 0.05 * np.abs(plain).max()
    assert int(quantized.argmax()) == int(plain.argmax())


@pytest.mark.parametrize(("preset", "bits", "dtype"), [("tiny-gemma2", 4, "bf16"), ("tiny-gemma3", 8, "f32")])
async def test_an_mlx_checkpoint_gives_its_dequantized_weights_logits(
    root: Path, preset: str, bits: int, dtype: str
) -> None:
    pytest.importorskip("mlx.core")
    from exo.testing.synth_mlx import cached_mlx_model

    model = str(cached_mlx_model(preset, root, bits=bits, group_size=64, dtype=dtype))
    reference = str(cached_mlx_model(preset, root, bits=bits, group_size=64, dtype=dtype, reference=True))
    layers = _layers(preset)
    ours, theirs = await prompt_logits(model, layers), await prompt_logits(reference, layers)
    # The reference holds the same weights in f32, so only the 8-bit activations differ: as for
    # Q8_0 above, they move Gemma's capped logits by up to 5% of their range (2.3-3.3% here). The
    # weights themselves decode right: a 40-token prompt, which on a CPU with AMX rounds the
    # activations to bf16 instead, lands within 0.9-1.9%.
    assert np.abs(ours - theirs).max() <= 0.05 * np.abs(theirs).max()
    await assert_follows_reference(model, reference, layers, 0.05, 24)
    alone = await greedy(model, layers, 24)
    assert await greedy(model, layers, 24, cuts=(0, layers // 2)) == alone


# mlx-lm's gemma2 attends over every position on every layer, so it is followed only while the
# sequence fits in the window; its gemma3_text has the window, and is followed past it.
@pytest.mark.parametrize(("preset", "steps"), [("tiny-gemma2", WINDOW - len(PROMPT)), ("tiny-gemma3", 24)])
async def test_logits_follow_mlx_lm_running_the_same_checkpoint(root: Path, preset: str, steps: int) -> None:
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    from exo.testing.synth_mlx import cached_mlx_model

    model = cached_mlx_model(preset, root, bits=8, group_size=64, dtype="f32")
    loaded, _ = mlx_lm.load(str(model))
    cache = mlx_lm.models.cache.make_prompt_cache(loaded)
    theirs, path, x = [], [], mx.array([PROMPT])
    for _ in range(steps):
        logits = np.array(loaded(x, cache=cache)[0, -1])
        theirs.append(logits)
        path.append(int(logits.argmax()))
        x = mx.array([[path[-1]]])
    # mlx-lm multiplies f32 activations: 8-bit ones differ by what the test above allows.
    assert_logits_agree(await forced_logits(str(model), _layers(preset), path[:-1]), theirs, 0.05)


def _requests(count: int) -> list[dict[str, Any]]:
    """Prompts of 5 to 40 words (most longer than the window), greedy and sampled."""
    rng = random.Random(11)
    words = ["ring", "node", "layer", "token", "cache", "peer", "shard", "model", "batch", "stream"]
    return [
        {
            "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(5, 40))),
            "max_tokens": rng.randint(8, 20),
            "temperature": [0.0, 0.8][i % 2],
            "seed": 500 + i,
        }
        for i in range(count)
    ]


async def _tokens(node: Node, base: Any, request: dict[str, Any], request_id: str) -> list[int]:
    return [t async for t in node.generate(base, request_id=request_id, **request)]


def _eos_ids(model_dir: Path) -> set[int]:
    """The end-of-sequence ids of `config.json` and `generation_config.json`."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids


@pytest.mark.parametrize("preset", GEMMA)
async def test_concurrent_requests_past_the_window_equal_their_solo_runs(root: Path, preset: str) -> None:
    base = whole_model(cached_model(preset, root))
    eos = _eos_ids(cached_model(preset, root))
    requests = _requests(8)

    def engine() -> CandleInferenceEngine:
        return CandleInferenceEngine(prefill_chunk=8, max_batch=64)

    async with running_cluster(["a", "b"], engine) as nodes:
        await wait_for_ring(nodes[0], 2)
        alone = [await _tokens(nodes[0], base, r, f"alone-{i}") for i, r in enumerate(requests)]
        together = await asyncio.gather(*(_tokens(nodes[0], base, r, f"together-{i}") for i, r in enumerate(requests)))
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert a == b, f"request {i} changed when batched"
        # Each ran to its limit, or (sampled) drew an end-of-sequence token before it.
        assert len(a) == requests[i]["max_tokens"] or (len(a) < requests[i]["max_tokens"] and a[-1] in eos), a


@pytest.mark.parametrize("preset", GEMMA)
async def test_evaluation_scores_with_the_logits_generation_computes(root: Path, preset: str) -> None:
    # Longer than the window, so the local layers (with Gemma 3's own rope) see part of the sequence.
    sequence = [*PROMPT, *range(100, 100 + 2 * WINDOW)]
    base = whole_model(cached_model(preset, root))
    engine = CandleInferenceEngine()
    # Generation's logits, one token at a time (checked against transformers in tests/test_golden.py).
    losses = []
    for token, target in itertools.pairwise(sequence):
        logits, _ = await engine.infer_tensor("fed", base, np.array([[token]]))
        row = np.asarray(logits, dtype=np.float64).reshape(-1)
        log_total = np.log(np.exp(row - row.max()).sum()) + row.max()
        losses.append(log_total - row[target])
    [batch] = batches([sequence], 1)
    async with running_cluster(["a"], CandleInferenceEngine) as nodes:
        loss = await nodes[0].enqueue_example(base, batch.inputs, batch.targets, batch.lengths)
    assert abs(loss - np.mean(losses)) <= 1e-4 * abs(np.mean(losses)), (loss, np.mean(losses))


@pytest.mark.parametrize("preset", GEMMA)
def test_exo_main_runs_the_preset(root: Path, preset: str) -> None:
    model = cached_model(preset, root)
    done = subprocess.run(
        [sys.executable, str(CLI), "run", str(model), "--prompt", "Hello!", "--max-generate-tokens", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "EXO_ENGINE": "candle"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Generated 20 tokens" in done.stdout, done.stdout
