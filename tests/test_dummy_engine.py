"""The dummy engine keeps exo classic's semantics (its own tests, ported)."""

import numpy as np
import pytest

from exo.errors import InvalidArgumentError
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.inference_engine import InferenceEngine, get_inference_engine
from exo.inference.shard import Shard


async def test_prompt_and_tensor_shapes() -> None:
    engine = DummyInferenceEngine()
    shard = Shard(model_id="test_model", start_layer=0, end_layer=1, n_layers=1)
    output, state = await engine.infer_prompt("test_id", shard, "Test prompt")
    # Classic's shard here ends past the model's last layer, so it is not "last": no +1.
    assert isinstance(output, np.ndarray) and output.ndim == 2 and output.tolist() == [[1]]
    assert state is None
    assert engine.shard == shard
    last = Shard("test_model", 0, 0, 1)
    output, _ = await engine.infer_tensor("test_id", last, np.array([[1, 2, 3]]))
    assert output.tolist() == [[2, 3, 4]]


async def test_sampling_and_decoding() -> None:
    engine = DummyInferenceEngine()
    assert (await engine.sample(np.array([3]))).tolist() == [3]
    assert (await engine.sample(np.array([11]), temp=0.5)).tolist() == [69]
    assert await engine.decode(Shard("m", 0, 0, 1), np.array([1, 2])) == "dummydummy"
    assert (await engine.encode(Shard("m", 0, 0, 1), "anything")).tolist() == [1]


async def test_non_last_shard_passes_through_and_state_round_trips() -> None:
    engine = DummyInferenceEngine()
    state = {"tokens": np.arange(3), "cache": [np.zeros(2), np.ones(2)], "meta": {"step": 4}}
    output, back = await engine.infer_tensor("r", Shard("m", 0, 0, 2), np.array([[7]]), state)
    assert output.tolist() == [[7]]
    assert back is not None and back["meta"] == {"step": 4}
    assert back["tokens"].tolist() == [0, 1, 2] and [a.tolist() for a in back["cache"]] == [[0, 0], [1, 1]]


def test_engine_selection() -> None:
    assert isinstance(get_inference_engine("dummy", None), DummyInferenceEngine)
    assert isinstance(get_inference_engine("candle", None), InferenceEngine)
    with pytest.raises(InvalidArgumentError, match="Unsupported inference engine: 'onnx'"):
        get_inference_engine("onnx", None)
