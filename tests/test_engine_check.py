"""`python -m exo.inference.test_inference_engine`, exo classic's engine check: it passes on the candle engine, and an
engine whose split into shards changes its outputs fails it (exit status 1)."""

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from exo.inference import test_inference_engine as engine_check
from exo.inference.candle import CandleInferenceEngine
from exo.inference.inference_engine import InferenceEngine
from exo.inference.shard import Shard
from exo.testing.synth import write_model


class SeamEngine(InferenceEngine):
    """The candle engine, but the outputs of a shard that does not start at the first layer are off by 1e-3."""

    def __init__(self) -> None:
        self.inner = CandleInferenceEngine()

    async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
        return await self.inner.encode(shard, prompt)

    async def sample(self, x: np.ndarray, temp: float = 0.0, top_p: float = 1.0) -> np.ndarray:
        return await self.inner.sample(x, temp, top_p)

    async def decode(self, shard: Shard, tokens: np.ndarray) -> str:
        return await self.inner.decode(shard, tokens)

    async def infer_tensor(
        self, request_id: str, shard: Shard, input_data: np.ndarray, inference_state: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any] | None]:
        out, state = await self.inner.infer_tensor(request_id, shard, input_data, inference_state)
        return (out + np.float32(1e-3) if shard.start_layer > 0 else out), state

    async def ensure_shard(self, shard: Shard) -> None:
        await self.inner.ensure_shard(shard)


def test_the_command_passes_on_the_candle_engine() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "exo.inference.test_inference_engine"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    for preset in engine_check.CHECKED_PRESETS:
        assert f"{preset}: a split into two shards on two engines matches the whole model" in run.stderr
    assert "all engine checks passed" in run.stderr


async def test_a_split_that_changes_the_outputs_fails_the_check(tmp_path: Path) -> None:
    model = str(write_model("tiny-llama", tmp_path / "tiny-llama"))
    with pytest.raises(AssertionError, match=r"the prompt's logits differ .*\(by up to 0\.001"):
        await engine_check.check_split_matches_whole(SeamEngine(), SeamEngine(), model, 4)


def test_a_failed_check_exits_1(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(engine_check, "CandleInferenceEngine", SeamEngine)
    assert engine_check.main() == 1
    assert "engine check failed: the prompt's logits differ" in caplog.text


def test_without_the_test_extra_the_command_says_what_it_needs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    assert engine_check.main() == 1
    assert "engine check needs the test extra (pip install 'xotorch-core[test]')" in caplog.text
