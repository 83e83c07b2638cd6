"""The candle engine from Python: concurrent requests stay isolated, limits fail clearly."""

import asyncio
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from exo.errors import (
    CacheEvictedError,
    ContextOverflowError,
    InvalidArgumentError,
    InvalidModelError,
    InvalidShardError,
)
from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.testing.synth import write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model("tiny-qwen2", tmp_path_factory.mktemp("qwen2"), dtype="bf16")


def _shard(model: Path) -> Shard:
    return Shard(str(model), 0, 3, 4)


async def _generate(
    engine: CandleInferenceEngine, shard: Shard, request_id: str, prompt: list[int], n: int
) -> list[int]:
    logits, _ = await engine.infer_tensor(request_id, shard, np.array([prompt]))
    tokens = []
    for _ in range(n):
        token = await engine.sample(logits)
        tokens.append(int(token[0]))
        logits, _ = await engine.infer_tensor(request_id, shard, token.reshape(1, 1))
    await engine.finish_request(request_id)
    return tokens


async def test_concurrent_requests_match_requests_alone(model: Path) -> None:
    engine, shard = CandleInferenceEngine(), _shard(model)
    prompts = [[5, 6, 7], [100, 3], [42] * 6, [9, 8, 7, 6]]
    alone = [await _generate(engine, shard, f"alone-{i}", p, 12) for i, p in enumerate(prompts)]
    together = await asyncio.gather(*(_generate(engine, shard, f"together-{i}", p, 12) for i, p in enumerate(prompts)))
    assert list(together) == alone


async def test_seeded_sampling_is_reproducible(model: Path) -> None:
    engine, shard = CandleInferenceEngine(), _shard(model)
    logits, _ = await engine.infer_tensor("r", shard, np.array([[1, 2, 3]]))
    draws = [int((await engine.sample(logits, temp=1.0, top_p=0.9, seed=s))[0]) for s in range(20)]
    again = [int((await engine.sample(logits, temp=1.0, top_p=0.9, seed=s))[0]) for s in range(20)]
    assert draws == again and len(set(draws)) > 1


async def test_limits_and_bad_shards_fail_clearly(model: Path) -> None:
    engine = CandleInferenceEngine(max_context=8, max_kv_cache_gb=1 / 1024)
    shard = _shard(model)
    overflow = r"context of 8 tokens \(raise it with --max-context or EXO_MAX_CONTEXT\)"
    with pytest.raises(ContextOverflowError, match=overflow):
        await engine.infer_tensor("long", shard, np.ones((1, 9), dtype=np.int64))
    with pytest.raises(InvalidShardError):
        await engine.infer_tensor("r", Shard(str(model), 2, 9, 4), np.ones((1, 1), dtype=np.int64))
    with pytest.raises(InvalidModelError, match="not a local model"):
        await engine.ensure_shard(Shard("no/such-model", 0, 0, 1))
    # The engine still serves after every failure.
    out, _ = await engine.infer_tensor("ok", shard, np.ones((1, 2), dtype=np.int64))
    assert out.shape == (1, 1, 512)


async def test_limits_come_from_arguments_then_the_environment(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXO_MAX_CONTEXT", "64")
    monkeypatch.setenv("EXO_MAX_KV_CACHE_GB", "0.25")
    assert CandleInferenceEngine(max_context=100, max_kv_cache_gb=0.5).limits == {
        "max_context": 100,
        "max_kv_cache_gb": 0.5,
    }
    from_env = CandleInferenceEngine()
    assert from_env.limits == {"max_context": 64, "max_kv_cache_gb": 0.25}
    with pytest.raises(ContextOverflowError, match="context of 64 tokens"):
        await from_env.infer_tensor("long", _shard(model), np.ones((1, 65), dtype=np.int64))
    monkeypatch.setenv("EXO_MAX_CONTEXT", "lots")
    with pytest.raises(InvalidArgumentError, match='EXO_MAX_CONTEXT="lots"'):
        CandleInferenceEngine()
    with pytest.raises(InvalidArgumentError, match="--max-kv-cache-gb"):
        CandleInferenceEngine(max_context=8, max_kv_cache_gb=0)


async def test_the_default_context_is_what_the_cache_budget_holds(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXO_MAX_CONTEXT", raising=False)
    monkeypatch.delenv("EXO_MAX_KV_CACHE_GB", raising=False)
    config = json.loads((model / "config.json").read_text())
    per_position = (
        4
        * config["num_hidden_layers"]
        * 2
        * config["num_key_value_heads"]
        * (config["hidden_size"] // config["num_attention_heads"])
    )
    # A budget of 100 positions: caches grow by doubling, so a request gets 64.
    engine = CandleInferenceEngine(max_kv_cache_gb=100 * per_position / 2**30)
    assert engine.limits["max_context"] is None  # derived from the model once it loads
    await engine.infer_tensor("r", _shard(model), np.array([[1, 2]]))
    assert engine.limits["max_context"] == min(64, config["max_position_embeddings"])
    assert CandleInferenceEngine().limits["max_kv_cache_gb"] > 0


async def test_least_recently_used_cache_is_evicted(model: Path) -> None:
    # Each tiny request holds 4 layers x 2 x (1 x 2 x 64 x 16) f32 = 64 KiB of cache: 16 fit in 1 MiB.
    engine, shard = CandleInferenceEngine(max_kv_cache_gb=1 / 1024), _shard(model)
    for i in range(20):
        await engine.infer_tensor(f"r{i}", shard, np.array([[1, 2]]))
    with pytest.raises(CacheEvictedError, match="r0"):
        await engine.infer_tensor("r0", shard, np.array([[3]]))
    await engine.infer_tensor("r19", shard, np.array([[3]]))


async def test_a_shard_needs_only_its_own_weight_files(tmp_path: Path) -> None:
    model = write_model("tiny-llama-untied", tmp_path, dtype="f16", num_shards=4)
    whole = CandleInferenceEngine()
    expected, _ = await whole.infer_tensor("r", Shard(str(model), 0, 3, 4), np.array([[1, 2, 3]]))
    first, _ = await CandleInferenceEngine().infer_tensor("r", Shard(str(model), 0, 1, 4), np.array([[1, 2, 3]]))
    # Files holding layers 0-1 (and the embedding) are not needed by the last two layers: remove them.
    for file in ("model-00001-of-00004.safetensors", "model-00002-of-00004.safetensors"):
        (model / file).unlink()
    logits, _ = await CandleInferenceEngine().infer_tensor("r", Shard(str(model), 2, 3, 4), first)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    with pytest.raises(InvalidModelError, match="model-00001-of-00004"):
        await CandleInferenceEngine().ensure_shard(Shard(str(model), 0, 1, 4))


def _safetensors_header(path: Path) -> dict[str, dict[str, object]]:
    """The tensor entries of a safetensors file's JSON header (name -> dtype, shape, offsets)."""
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header


async def test_save_checkpoint_writes_the_shard_as_stored_and_loads_back(model: Path, tmp_path: Path) -> None:
    engine, shard = CandleInferenceEngine(), Shard(str(model), 2, 3, 4)
    saved = tmp_path / "saved"
    saved.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (model / name).exists():
            shutil.copy(model / name, saved / name)
    await engine.save_checkpoint(shard, str(saved / "model.safetensors"))

    original = _safetensors_header(model / "model.safetensors")
    written = _safetensors_header(saved / "model.safetensors")
    wanted = {
        name
        for name in original
        if name.startswith(("model.layers.2.", "model.layers.3.")) or name in ("model.norm.weight", "lm_head.weight")
    }
    if "lm_head.weight" not in original:  # a tied head is the embedding
        wanted.add("model.embed_tokens.weight")
    assert set(written) == wanted
    for name in wanted:
        assert (written[name]["dtype"], written[name]["shape"]) == (original[name]["dtype"], original[name]["shape"])
        assert written[name]["dtype"] == "BF16"

    hidden = np.random.default_rng(3).standard_normal((1, 4, 64)).astype(np.float32)
    expected, _ = await engine.infer_tensor("r", shard, hidden)
    reloaded = CandleInferenceEngine()
    saved_shard = Shard(str(saved), 2, 3, 4)
    await reloaded.load_checkpoint(saved_shard, str(saved))
    logits, _ = await reloaded.infer_tensor("r", saved_shard, hidden)
    np.testing.assert_array_equal(logits, expected)


def test_the_device_is_chosen_at_run_time_and_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXO_DEVICE", raising=False)
    assert CandleInferenceEngine().device == "cpu"
    monkeypatch.setenv("EXO_DEVICE", "cpu")
    assert CandleInferenceEngine().device == "cpu"
    monkeypatch.setenv("EXO_DEVICE", "cuda")
    with pytest.raises(InvalidArgumentError, match="EXO_DEVICE=cuda: this build of exo has no CUDA backend"):
        CandleInferenceEngine()
    # An explicit device overrides the environment.
    assert CandleInferenceEngine(device="cpu").device == "cpu"
    with pytest.raises(InvalidArgumentError, match="EXO_DEVICE=gpu9 is not a device"):
        CandleInferenceEngine(device="gpu9")
