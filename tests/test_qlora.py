"""LoRA fine-tuning on quantized base weights, which stay quantized: a GGUF file (Q8_0, and
tiny-llama-k's real Q4_K and Q3_K blocks), an MLX 4-bit checkpoint and an f32 checkpoint loaded with
`--quantize q8_0`. On one node and across two, the loss and the adapters' gradients equal the float
path's on an f32 checkpoint of the same weights dequantized (the path tests/test_lora.py holds to
torch with PEFT) within 1e-4; AdamW steps then lower the loss; and `exo train` takes a GGUF file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from exo._core import dequantize, quantize
from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.inference.tokenizers import resolve_tokenizer
from exo.testing.synth import cached_model
from exo.testing.synth_adapter import write_adapter
from exo.testing.synth_gguf import cached_gguf
from exo.train.dataset import Batch, batches, load_texts, tokenize
from support.cluster import running_cluster, wait_for_ring
from support.gguf_reference import dequantized_checkpoint, with_config
from support.solo_cli import run_solo

DATA = Path(__file__).parent / "data" / "lora"
RELATIVE = 1e-4
EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True)
class Quantized:
    """A quantized checkpoint (a model directory or a GGUF file), the engine option it loads
    with, and the f32 checkpoint of its weights dequantized."""

    model: str
    reference: Path
    quantize: str | None = None

    def engine(self) -> CandleInferenceEngine:
        return CandleInferenceEngine(quantize=self.quantize) if self.quantize else CandleInferenceEngine()


def _gguf(root: Path, preset: str, ggml_type: str) -> Quantized:
    (file,) = cached_gguf(preset, root / "gguf", ggml_type)
    return Quantized(str(file), dequantized_checkpoint(file, preset, root, root / f"{preset}-{ggml_type}-f32"))


def _mlx(root: Path, preset: str) -> Quantized:
    from exo.testing.synth_mlx import cached_mlx_model

    model = cached_mlx_model(preset, root / "mlx", bits=4, group_size=64)
    return Quantized(str(model), cached_mlx_model(preset, root / "mlx", bits=4, group_size=64, reference=True))


def _quantized_at_load(root: Path, preset: str) -> Quantized:
    """The f32 checkpoint loaded with `--quantize q8_0`, and its twin: every matrix rounded
    through Q8_0 as candle quantizes it at load, but the embedding, whose lookups stay f32 while
    the head tied to it is quantized (so the twin's head is a weight of its own)."""
    model = cached_model(preset, root / "safetensors", "f32")

    def rounded(values: np.ndarray) -> np.ndarray:
        rows, cols = values.shape
        blocks = quantize(np.ascontiguousarray(values, dtype="<f4").tobytes(), rows, cols, "Q8_0")
        return np.frombuffer(dequantize(blocks, rows, cols, "Q8_0"), dtype="<f4").reshape(rows, cols)

    tensors = load_file(model / "model.safetensors")
    twin = {name: rounded(v) if v.ndim == 2 and name != EMBEDDING else v for name, v in tensors.items()}
    twin["lm_head.weight"] = rounded(tensors[EMBEDDING])
    reference = with_config(model, {"tie_word_embeddings": False}, root / f"{preset}-q8_0-at-load-f32")
    save_file(twin, reference / "model.safetensors")
    return Quantized(str(model), reference, quantize="q8_0")


FORMATS: dict[str, Callable[[Path], Quantized]] = {
    "gguf-q8_0": lambda root: _gguf(root, "tiny-llama", "q8_0"),
    "gguf-q4_k": lambda root: _gguf(root, "tiny-llama-k", "q4_k"),
    # Blocks the host kernels do not multiply: candle's quantized tensors, dequantized by candle.
    "gguf-q3_k": lambda root: _gguf(root, "tiny-llama-k", "q3_k"),
    "mlx-4bit": lambda root: _mlx(root, "tiny-llama"),
    "quantize-q8_0": lambda root: _quantized_at_load(root, "tiny-llama"),
}


@pytest.fixture(scope="module", params=list(FORMATS))
def quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Quantized:
    if request.param.startswith("mlx"):
        pytest.importorskip("mlx.core")
    return FORMATS[request.param](tmp_path_factory.mktemp(request.param))


def _shard(model: str | Path, reference: Path) -> Shard:
    layers = json.loads((reference / "config.json").read_text())["num_hidden_layers"]
    return Shard(str(model), 0, layers - 1, layers)


async def _first_batch(model_dir: Path) -> Batch:
    tokenizer = await resolve_tokenizer(model_dir)
    return next(batches(tokenize(load_texts(DATA, "test"), tokenizer.encode), 3))


async def _train(
    shard: Shard,
    make_engine: Callable[[], CandleInferenceEngine],
    nodes: int,
    adapter: Path,
    batch: Batch,
    steps: int = 1,
) -> tuple[list[float], dict[str, np.ndarray]]:
    """The losses of `steps` AdamW steps on `batch` (lr 1e-2) across `nodes` nodes, and the
    adapters' gradients of the first."""
    async with running_cluster(["a", "b"][:nodes], make_engine) as ring:
        if nodes > 1:
            await wait_for_ring(ring[0], nodes)
        for node in ring:
            node.inference_engine.configure_training(adapter=str(adapter), learning_rate=1e-2)
        losses, gradients = [], {}
        for _ in range(steps):
            losses.append(await ring[0].enqueue_example(shard, batch.inputs, batch.targets, batch.lengths, train=True))
            if not gradients:
                gradients = {n: g for node in ring for n, g in node.inference_engine.adapter_gradients().items()}
    return losses, gradients


def _assert_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Within 1e-4 of the tensor's largest magnitude, element by element."""
    assert got.shape == expected.shape, f"{what}: shape {got.shape} vs {expected.shape}"
    scale = float(np.abs(expected).max())
    worst = float(np.abs(got - expected).max())
    assert worst <= RELATIVE * scale, f"{what}: off by {worst:.3g} at scale {scale:.3g}"


async def test_gradients_equal_the_float_path_on_the_dequantized_weights(quantized: Quantized, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "adapter", quantized.reference)
    batch = await _first_batch(quantized.reference)
    (expected_loss,), expected = await _train(
        _shard(quantized.reference, quantized.reference), CandleInferenceEngine, 1, adapter, batch
    )
    shard = _shard(quantized.model, quantized.reference)
    ring_losses: list[float] = []
    for nodes in (1, 2):
        losses, gradients = await _train(shard, quantized.engine, nodes, adapter, batch, steps=5 if nodes == 2 else 1)
        assert abs(losses[0] - expected_loss) <= RELATIVE * expected_loss, (nodes, losses[0], expected_loss)
        assert sorted(gradients) == sorted(expected)
        for name, grad in expected.items():
            _assert_close(gradients[name], grad, f"{name} on {nodes} nodes")
        ring_losses = losses
    # Four more AdamW steps on the two nodes lower the loss.
    assert ring_losses[-1] < ring_losses[0] - 0.1, ring_losses


def test_train_takes_a_gguf_file_and_saves_adapters(tmp_path: Path) -> None:
    (file,) = cached_gguf("tiny-llama", tmp_path / "gguf", "q8_0")
    checkpoints = tmp_path / "checkpoints"
    done = run_solo(
        tmp_path, "train", str(file), "--data", str(DATA), "--batch-size", "2", "--learning-rate", "1e-2",
        "--iters", "3", "--save-checkpoint-dir", str(checkpoints),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = re.search(r"valid loss before: (\S+).*valid loss after: (\S+)", done.stdout, re.DOTALL)
    assert found, done.stdout
    assert float(found[2]) < float(found[1]), done.stdout
    tensors = load_file(str(checkpoints / "000003" / "layers-0-3" / "adapter_model.safetensors"))
    assert len(tensors) == 4 * 2 * 2
