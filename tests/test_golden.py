"""The candle engine matches Hugging Face transformers on the same synthetic weights.

Golden values come from `scripts/record_golden.py` (transformers, f32). Checked here: f32
logits within 1e-4 at the last three prompt positions (prefill, then two cached decode steps),
40 greedy tokens, the same numbers with the layers split over 2 and 3 shards, and a bf16
checkpoint's last logits within a looser bound (transformers runs bf16 end to end; the engine
keeps bf16 weights but computes in f32).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.testing.synth import write_model

GOLDEN = Path(__file__).parent / "golden"
PRESETS = sorted(p.stem for p in GOLDEN.glob("*.json"))
F32_TOLERANCE = 1e-4
BF16_TOLERANCE = 0.02


def _golden(preset: str) -> dict:
    return json.loads((GOLDEN / f"{preset}.json").read_text())


def _splits(layers: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.array_split(np.arange(layers), parts)
    return [(int(b[0]), int(b[-1])) for b in bounds]


class Ring:
    """One engine per shard, run in order like the node's ring."""

    def __init__(self, model_dir: Path, parts: int) -> None:
        layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        self.stages = [
            (CandleInferenceEngine(), Shard(str(model_dir), start, end, layers))
            for start, end in _splits(layers, parts)
        ]

    async def step(self, request_id: str, tokens: list[int]) -> np.ndarray:
        x = np.array([tokens], dtype=np.int64)
        for engine, shard in self.stages:
            x, _ = await engine.infer_tensor(request_id, shard, x)
        return x.reshape(-1)


@pytest.fixture(scope="module", params=PRESETS)
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    preset = request.param
    return preset, write_model(preset, tmp_path_factory.mktemp(preset) / "f32", dtype="f32", seed=0)


@pytest.mark.parametrize("parts", [1, 2, 3])
async def test_logits_and_greedy_tokens_match_transformers(model: tuple[str, Path], parts: int) -> None:
    preset, model_dir = model
    golden = _golden(preset)
    ids = golden["prompt_ids"]
    ring = Ring(model_dir, parts)
    logits = [await ring.step("r", ids[:-2]), await ring.step("r", [ids[-2]]), await ring.step("r", [ids[-1]])]
    for got, expected in zip(logits, golden["logits_last3"], strict=True):
        np.testing.assert_allclose(got, np.array(expected, dtype=np.float32), atol=F32_TOLERANCE, rtol=0)
    tokens = [int(np.argmax(logits[-1]))]
    for _ in range(len(golden["greedy_tokens"]) - 1):
        tokens.append(int(np.argmax(await ring.step("r", [tokens[-1]]))))
    assert tokens == golden["greedy_tokens"]


async def test_bf16_checkpoint_stays_close(model: tuple[str, Path], tmp_path: Path) -> None:
    preset, _ = model
    golden = _golden(preset)
    model_dir = write_model(preset, tmp_path / "bf16", dtype="bf16", seed=0)
    logits = await Ring(model_dir, 1).step("r", golden["prompt_ids"])
    expected = np.array(golden["bf16_last_logits"], dtype=np.float32)
    assert np.abs(logits - expected).max() <= BF16_TOLERANCE
    assert int(np.argmax(logits)) == int(np.argmax(golden["logits_last3"][-1]))
