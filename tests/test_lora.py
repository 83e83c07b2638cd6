"""LoRA fine-tuning on the ring: the candle engine's loss, adapter gradients and input-hidden-state
gradients equal torch autograd with PEFT's LoRA on the same weights, adapter and batch, and 20
AdamW steps give torch's loss curve, on one node and across two and three real nodes over gRPC (every
preset here has 4 layers, so each of three nodes holds at least one).

Golden values come from `scripts/record_lora_golden.py` (torch + transformers + peft, f32).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exo.errors import InvalidModelError
from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.inference.tokenizers import resolve_tokenizer
from exo.testing.synth import write_model
from exo.testing.synth_adapter import write_adapter
from exo.train.dataset import Batch, batches, load_texts, tokenize
from support.cluster import running_cluster, wait_for_ring, whole_model

DATA = Path(__file__).parent / "data" / "lora"
GOLDEN = Path(__file__).parent / "golden" / "lora"
PRESETS = sorted(p.stem for p in GOLDEN.glob("*.json"))
RELATIVE = 1e-4
NODE_IDS = ["a", "b", "c"]


@pytest.fixture(scope="module", params=PRESETS)
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    preset = request.param
    root = tmp_path_factory.mktemp(preset)
    model_dir = write_model(preset, root / "f32", dtype="f32", seed=0)
    golden = json.loads((GOLDEN / f"{preset}.json").read_text())
    return golden, model_dir, write_adapter(root / "adapter", model_dir)


async def _first_batch(model_dir: Path) -> Batch:
    tokenizer = await resolve_tokenizer(model_dir)
    return next(batches(tokenize(load_texts(DATA, "test"), tokenizer.encode), 3))


def _assert_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Within 1e-4 of the tensor's largest magnitude, element by element."""
    assert got.shape == expected.shape, f"{what}: shape {got.shape} vs {expected.shape}"
    scale = float(np.abs(expected).max())
    worst = float(np.abs(got - expected).max())
    assert worst <= RELATIVE * scale, f"{what}: off by {worst:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("nodes", [1, 2, 3])
async def test_adapter_gradients_match_peft(model: tuple[dict, Path, Path], nodes: int) -> None:
    golden, model_dir, adapter = model
    batch = await _first_batch(model_dir)
    async with running_cluster(NODE_IDS[:nodes], CandleInferenceEngine) as ring:
        if nodes > 1:
            await wait_for_ring(ring[0], nodes)
            assert len(ring[0].partitions()) == nodes
        for node in ring:
            node.inference_engine.configure_training(adapter=str(adapter))
        loss = await ring[-1].enqueue_example(
            whole_model(model_dir), batch.inputs, batch.targets, batch.lengths, train=True
        )
        per_node = [node.inference_engine.adapter_gradients() for node in ring]
    # Every node trained a shard of its own: the layers were split `nodes` ways.
    assert all(per_node), [sorted(g) for g in per_node]
    gradients = {name: grad for grads in per_node for name, grad in grads.items()}
    assert abs(loss - golden["loss"]) <= RELATIVE * golden["loss"]
    assert sorted(gradients) == sorted(golden["gradients"])
    for name, expected in golden["gradients"].items():
        _assert_close(gradients[name], np.array(expected, dtype=np.float32), name)


async def test_a_shard_returns_the_gradient_for_its_input_hidden_states(model: tuple[dict, Path, Path]) -> None:
    golden, model_dir, adapter = model
    batch = await _first_batch(model_dir)
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    second = Shard(str(model_dir), golden["split_layer"], layers - 1, layers)
    hidden = np.array(golden["hidden"], dtype=np.float32)
    async with running_cluster(["a"], CandleInferenceEngine) as (node,):
        node.inference_engine.configure_training(adapter=str(adapter))
        loss, grads = await node.process_example(second, hidden, batch.targets, batch.lengths, train=True)
    assert abs(loss - golden["loss"]) <= RELATIVE * golden["loss"]
    _assert_close(grads, np.array(golden["hidden_grad"], dtype=np.float32), "input gradient")


@pytest.mark.parametrize("nodes", [1, 2, 3])
async def test_adamw_steps_follow_torch(model: tuple[dict, Path, Path], nodes: int) -> None:
    golden, model_dir, adapter = model
    expected = golden["adamw"]["losses"]
    batch = await _first_batch(model_dir)
    async with running_cluster(NODE_IDS[:nodes], CandleInferenceEngine) as ring:
        if nodes > 1:
            await wait_for_ring(ring[0], nodes)
        for node in ring:
            node.inference_engine.configure_training(
                adapter=str(adapter), learning_rate=golden["adamw"]["learning_rate"], weight_decay=0.0
            )
        losses = [
            await ring[0].enqueue_example(
                whole_model(model_dir), batch.inputs, batch.targets, batch.lengths, train=True
            )
            for _ in expected
        ]
    np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-3)
    assert losses[-1] < losses[0] - 0.1


async def test_training_steps_lower_the_loss(model: tuple[dict, Path, Path]) -> None:
    _, model_dir, _ = model
    batch = await _first_batch(model_dir)
    async with running_cluster(["a"], CandleInferenceEngine) as (node,):
        node.inference_engine.configure_training(learning_rate=1e-2)
        base = whole_model(model_dir)
        before = await node.enqueue_example(base, batch.inputs, batch.targets, batch.lengths)
        for _ in range(10):
            await node.enqueue_example(base, batch.inputs, batch.targets, batch.lengths, train=True)
        after = await node.enqueue_example(base, batch.inputs, batch.targets, batch.lengths)
    assert after < before - 0.1, f"{before} -> {after}"


async def test_a_family_without_a_training_path_evaluates_but_refuses_to_train(tmp_path: Path) -> None:
    model_dir = write_model("tiny-gemma2", tmp_path, dtype="f32", seed=0)
    batch = await _first_batch(model_dir)
    async with running_cluster(["a"], CandleInferenceEngine) as (node,):
        base = whole_model(model_dir)
        loss = await node.enqueue_example(base, batch.inputs, batch.targets, batch.lengths)
        assert np.isfinite(loss) and loss > 0
        with pytest.raises(InvalidModelError, match=r"fine-tuning runs llama, mistral, qwen2, qwen3 models; .* gemma2"):
            await node.enqueue_example(base, batch.inputs, batch.targets, batch.lengths, train=True)
        # The node keeps serving: the same example evaluates again to the same loss.
        assert await node.enqueue_example(base, batch.inputs, batch.targets, batch.lengths) == pytest.approx(loss)
