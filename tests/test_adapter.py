"""Inference with a LoRA adapter merged into the candle engine's weights as they load.

Checked against transformers with PEFT's `PeftModel` on the same synthetic checkpoint and adapter (f32), for an
adapter PEFT wrote itself (all seven projections, rsLoRA) and for one `exo train` wrote (read from its
checkpoint directory of `layers-*` directories): logits at the last 3 prompt positions within 1e-4 and 20 greedy
tokens, with the layers on 1, 2 and 3 shards. Also: a two-node ring, each node merging its own layers, scores data
as the training path does with the adapter as LoRA; bf16 and f16 checkpoints and `--quantize` stay near PEFT's
logits; `run --adapter` answers with PEFT's greedy text, unlike the base model; bad adapters fail with an error
naming what is wrong.

The adapters and golden values come from `scripts/record_adapter_golden.py`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from exo.errors import InvalidModelError
from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.inference.tokenizers import resolve_tokenizer
from exo.testing.synth import write_model
from exo.testing.synth_gguf import write_gguf
from exo.train.dataset import batches, load_texts, tokenize
from support.cluster import running_cluster, wait_for_ring, whole_model
from support.solo_cli import run_solo

GOLDEN = Path(__file__).parent / "golden" / "adapter"
DATA = Path(__file__).parent / "data" / "lora"
PRESETS = sorted(p.name for p in GOLDEN.iterdir() if (p / "golden.json").is_file())
TOLERANCE = 1e-4
HALF_TOLERANCE = 0.02


def _adapter(preset: str, which: str) -> Path:
    """The PEFT-written adapter directory, or the trained checkpoint (the directory holding `layers-*`)."""
    if which == "peft":
        return GOLDEN / preset / "peft"
    (checkpoint,) = sorted((GOLDEN / preset / "trained").iterdir())
    return checkpoint


def _splits(layers: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.array_split(np.arange(layers), parts)
    return [(int(b[0]), int(b[-1])) for b in bounds]


class Ring:
    """One engine per shard, each merging `adapter` into its own layers, run in order like the node's ring."""

    def __init__(self, model_dir: Path, parts: int, adapter: Path | None, quantize: str | None = None) -> None:
        layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        self.stages = [
            (CandleInferenceEngine(adapter=adapter, quantize=quantize), Shard(str(model_dir), start, end, layers))
            for start, end in _splits(layers, parts)
        ]

    async def step(self, tokens: list[int]) -> np.ndarray:
        x = np.array([tokens], dtype=np.int64)
        for engine, shard in self.stages:
            x, _ = await engine.infer_tensor("request", shard, x)
        return x.reshape(-1)

    async def last3_and_greedy(self, ids: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
        """Logits of the last 3 prompt positions (prefill, then two decode steps) and `steps` greedy tokens."""
        last3 = [await self.step(ids[:-2]), await self.step(ids[-2:-1]), await self.step(ids[-1:])]
        tokens = [int(np.argmax(last3[-1]))]
        while len(tokens) < steps:
            tokens.append(int(np.argmax(await self.step(tokens[-1:]))))
        return last3, tokens


@pytest.fixture(scope="module", params=PRESETS)
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Path]:
    preset = request.param
    golden = json.loads((GOLDEN / preset / "golden.json").read_text())
    return preset, golden, write_model(preset, tmp_path_factory.mktemp(preset) / "f32", dtype="f32", seed=0)


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("which", ["peft", "trained"])
async def test_merged_adapter_matches_peft(model: tuple[str, dict, Path], which: str, parts: int) -> None:
    preset, golden, model_dir = model
    expected = golden["adapters"][which]
    last3, tokens = await Ring(model_dir, parts, _adapter(preset, which)).last3_and_greedy(
        golden["prompt_ids"], len(expected["greedy"])
    )
    for got, want in zip(last3, expected["last3"], strict=True):
        np.testing.assert_allclose(got, np.array(want, dtype=np.float32), atol=TOLERANCE, rtol=0)
    assert tokens == expected["greedy"]


async def test_without_the_adapter_the_numbers_differ(model: tuple[str, dict, Path]) -> None:
    """The comparisons above tell merged from unmerged weights: the base model is far from both references."""
    _, golden, model_dir = model
    last3, greedy = await Ring(model_dir, 1, None).last3_and_greedy(golden["prompt_ids"], 20)
    assert greedy != golden["adapters"]["peft"]["greedy"]
    for which, expected in golden["adapters"].items():
        assert np.abs(last3[-1] - np.array(expected["last3"][-1])).max() > 100 * TOLERANCE, which


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
async def test_half_precision_checkpoints_store_the_merged_weights_in_their_dtype(
    model: tuple[str, dict, Path], tmp_path: Path, dtype: str
) -> None:
    """Merged in f32 and rounded to the checkpoint's dtype: near PEFT's f32 logits, the same greedy tokens."""
    preset, golden, _ = model
    model_dir = write_model(preset, tmp_path / dtype, dtype=dtype, seed=0)
    expected = golden["adapters"]["peft"]
    last3, tokens = await Ring(model_dir, 2, _adapter(preset, "peft")).last3_and_greedy(
        golden["prompt_ids"], len(expected["greedy"])
    )
    assert np.abs(last3[-1] - np.array(expected["last3"][-1])).max() <= HALF_TOLERANCE
    assert tokens == expected["greedy"]


async def test_quantized_loading_merges_before_quantizing(model: tuple[str, dict, Path]) -> None:
    """`--quantize` quantizes the merged weights: the logits stay near PEFT's, far nearer than the base's."""
    preset, golden, model_dir = model
    ids, expected = golden["prompt_ids"], np.array(golden["adapters"]["peft"]["last3"][-1], dtype=np.float32)
    adapted, _ = await Ring(model_dir, 1, _adapter(preset, "peft"), quantize="q8_0").last3_and_greedy(ids, 1)
    base, _ = await Ring(model_dir, 1, None, quantize="q8_0").last3_and_greedy(ids, 1)
    error, base_error = np.abs(adapted[-1] - expected).max(), np.abs(base[-1] - expected).max()
    assert error < 0.05 * np.abs(expected).max(), error
    assert error < base_error / 10, (error, base_error)


async def test_run_adapter_answers_with_peft_greedy_text(model: tuple[str, dict, Path], tmp_path: Path) -> None:
    preset, golden, model_dir = model
    tokenizer = await resolve_tokenizer(model_dir)
    (message,) = golden["messages"]
    templated = tokenizer.apply_chat_template(golden["messages"], add_generation_prompt=True)
    ids = await CandleInferenceEngine().encode(Shard(str(model_dir), 0, 3, 4), templated)
    assert ids.tolist() == golden["prompt_ids"]  # what the node runs is what PEFT ran
    eos = set(tokenizer.eos_token_ids)
    greedy = golden["adapters"]["peft"]["greedy"]
    answer = tokenizer.decode(greedy[: next((i for i, t in enumerate(greedy) if t in eos), len(greedy))])
    common = ("run", str(model_dir), "--prompt", message["content"], "--max-generate-tokens", str(len(greedy)))
    adapted = run_solo(tmp_path, *common, "--adapter", str(_adapter(preset, "peft")))
    base = run_solo(tmp_path, *common)
    assert adapted.returncode == 0 and base.returncode == 0, adapted.stderr + base.stderr
    assert answer.strip() and answer in adapted.stdout, adapted.stdout
    assert answer not in base.stdout, base.stdout


@pytest.mark.parametrize("nodes", [1, 2])
async def test_scoring_merged_equals_scoring_with_lora(model: tuple[str, dict, Path], nodes: int) -> None:
    """A ring whose every node merges the adapter into its own layers scores the test data as the training path
    does with the adapter applied as LoRA (held to PEFT by tests/test_lora.py); the training path on a node with
    the adapter merged starts its fresh adapters (B zero) from the merged weights, so its first loss is the same."""
    preset, _, model_dir = model
    adapter, shard = _adapter(preset, "peft"), whole_model(model_dir)
    tokenizer = await resolve_tokenizer(model_dir)
    batch = next(batches(tokenize(load_texts(DATA, "test"), tokenizer.encode), 3))
    example = (batch.inputs, batch.targets, batch.lengths)
    async with running_cluster(["a", "b"][:nodes], lambda: CandleInferenceEngine(adapter=adapter)) as ring:
        if nodes > 1:
            await wait_for_ring(ring[0], nodes)
            assert len(ring[0].partitions()) == 2
        merged = await ring[0].enqueue_example(shard, *example)
        ring[0].inference_engine.configure_training()
        ring[-1].inference_engine.configure_training()
        fresh_on_merged = await ring[0].enqueue_example(shard, *example, train=True)
    async with running_cluster(["a"], CandleInferenceEngine) as (node,):
        node.inference_engine.configure_training(adapter=str(adapter))
        as_lora = await node.enqueue_example(shard, *example)
    assert abs(merged - as_lora) <= 1e-4 * as_lora, (merged, as_lora)
    assert abs(fresh_on_merged - as_lora) <= 1e-4 * as_lora, (fresh_on_merged, as_lora)


def _broken_copy(source: Path, out: Path, config: dict | None = None, drop: str | None = None) -> Path:
    """A copy of the adapter `source` with `config`'s fields set and the tensor `drop` left out."""
    shutil.copytree(source, out)
    if config is not None:
        path = out / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if drop is not None:
        tensors = load_file(str(out / "adapter_model.safetensors"))
        del tensors[drop]
        save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"use_dora": True}, "use_dora is true"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out is true"),
        ({"modules_to_save": ["lm_head"]}, re.escape('modules_to_save is ["lm_head"]')),
        ({"target_modules": ["q_proj", "lm_head"]}, "unknown LoRA target lm_head"),
        ({"r": 0}, "a LoRA rank must be at least 1"),
    ],
)
def test_unsupported_configs_are_refused_when_the_engine_starts(
    model: tuple[str, dict, Path], tmp_path: Path, config: dict, message: str
) -> None:
    preset, _, _ = model
    broken = _broken_copy(_adapter(preset, "peft"), tmp_path / "adapter", config=config)
    with pytest.raises(InvalidModelError, match=message):
        CandleInferenceEngine(adapter=broken)


async def _load_error(model_dir: Path, adapter: Path, start: int = 0, end: int = 3) -> str:
    engine = CandleInferenceEngine(adapter=adapter)
    with pytest.raises(InvalidModelError) as failure:
        await engine.ensure_shard(Shard(str(model_dir), start, end, 4))
    return str(failure.value)


async def test_broken_adapters_name_what_is_wrong(model: tuple[str, dict, Path], tmp_path: Path) -> None:
    preset, _, model_dir = model
    source = _adapter(preset, "peft")
    no_file = tmp_path / "no-file"
    shutil.copytree(source, no_file)
    (no_file / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors" in await _load_error(model_dir, no_file)

    rank = _broken_copy(source, tmp_path / "rank", config={"r": 8})
    assert "of rank 4; adapter_config.json says r = 8" in await _load_error(model_dir, rank)

    missing = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    gap = _broken_copy(source, tmp_path / "gap", drop=missing)
    assert f"has no {missing}" in await _load_error(model_dir, gap)
    await CandleInferenceEngine(adapter=gap).ensure_shard(Shard(str(model_dir), 0, 2, 4))
    only_others = _broken_copy(source, tmp_path / "layers", config={"layers_to_transform": [0, 1, 2]}, drop=missing)
    await CandleInferenceEngine(adapter=only_others).ensure_shard(Shard(str(model_dir), 0, 3, 4))

    with pytest.raises(InvalidModelError, match=re.escape("neither adapter_config.json nor layers-START-END")):
        CandleInferenceEngine(adapter=tmp_path)
    with pytest.raises(InvalidModelError, match="No such file"):
        CandleInferenceEngine(adapter=tmp_path / "nowhere")
    gguf = write_gguf(preset, tmp_path / "model.gguf", "f32")[0]
    assert "is a GGUF file" in await _load_error(gguf, source)


async def test_mlx_quantized_checkpoints_are_refused(model: tuple[str, dict, Path], tmp_path: Path) -> None:
    pytest.importorskip("mlx.core")
    from exo.testing.synth_mlx import write_mlx_model

    preset, _, _ = model
    quantized = write_mlx_model(preset, tmp_path / "mlx", bits=4, group_size=32)
    assert "is MLX-quantized" in await _load_error(quantized, _adapter(preset, "peft"))


def test_a_missing_adapter_or_another_engine_fails_clearly(model: tuple[str, dict, Path], tmp_path: Path) -> None:
    _, _, model_dir = model
    done = run_solo(tmp_path, "run", str(model_dir), "--adapter", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert "--adapter:" in done.stderr and "nowhere" in done.stderr, done.stderr
    dummy = run_solo(tmp_path, "run", str(model_dir), "--inference-engine", "dummy", "--adapter", str(tmp_path))
    assert dummy.returncode == 2
    assert "--adapter: LoRA adapters merge into the candle engine's weights, not dummy's" in dummy.stderr
