"""Evaluation on the ring (`SendExample`): the candle engine's loss over the test data equals
transformers' on the same batches, on one node, across two real nodes over gRPC, for a classic
client calling `SendExample`, and through `exo eval` on the command line.

Golden values come from `scripts/record_eval_golden.py` (transformers, f32).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from exo.inference.candle import CandleInferenceEngine
from exo.inference.tokenizers import resolve_tokenizer
from exo.testing.synth import write_model
from exo.train.dataset import Batch, batch_count, batches, load_texts, tokenize
from support.cluster import running_cluster, wait_for_ring, whole_model
from support.solo_cli import run_solo

DATA = Path(__file__).parent / "data" / "lora"
GOLDEN = Path(__file__).parent / "golden" / "eval"
PRESETS = sorted(p.stem for p in GOLDEN.glob("*.json"))
RELATIVE = 1e-4


def _golden(preset: str) -> dict:
    return json.loads((GOLDEN / f"{preset}.json").read_text())


@pytest.fixture(scope="module", params=PRESETS)
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    preset = request.param
    return preset, write_model(preset, tmp_path_factory.mktemp(preset) / "f32", dtype="f32", seed=0)


async def _sequences(model_dir: Path) -> list[list[int]]:
    tokenizer = await resolve_tokenizer(model_dir)
    return tokenize(load_texts(DATA, "test"), tokenizer.encode)


def _assert_close(got: float, expected: float) -> None:
    assert abs(got - expected) <= RELATIVE * abs(expected), f"{got} vs {expected}"


def test_batches_pad_to_the_longest_sequence_and_count_real_targets() -> None:
    sequences = [[5, 6, 7], [8, 9], [1, 2, 3, 4]]
    made = list(batches(sequences, 2))
    assert len(made) == batch_count(sequences, 2) == 2
    first = made[0]
    assert first.inputs.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert first.targets.tolist() == [[6, 7, 0], [9, 0, 0]]
    assert first.lengths.tolist() == [3, 2]
    assert first.positions == 3
    assert made[1].positions == 3
    assert isinstance(first, Batch) and first.inputs.dtype == np.int32
    shuffled = list(batches(sequences, 1, np.random.default_rng(0)))
    assert sorted(b.lengths[0] for b in shuffled) == [2, 3, 4]


def test_bad_lines_name_their_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "test.jsonl").write_text('{"text": "fine"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"test.jsonl:2: expected an object"):
        load_texts(tmp_path, "test")
    assert load_texts(tmp_path, "train") == []


async def test_tokens_match_transformers(model: tuple[str, Path]) -> None:
    preset, model_dir = model
    golden = _golden(preset)
    tokenizer = await resolve_tokenizer(model_dir)
    assert [list(tokenizer.encode(t)) for t in load_texts(DATA, "test")] == golden["token_ids"]


@pytest.mark.parametrize("nodes", [1, 2])
@pytest.mark.parametrize("batch_size", [1, 3])
async def test_eval_losses_match_transformers(model: tuple[str, Path], nodes: int, batch_size: int) -> None:
    preset, model_dir = model
    expected = _golden(preset)["batches"][str(batch_size)]
    sequences = await _sequences(model_dir)
    ids = ["a", "b"][:nodes]
    async with running_cluster(ids, CandleInferenceEngine) as ring:
        if nodes > 1:
            await wait_for_ring(ring[0], nodes)
            assert {p.node_id for p in ring[0].partitions()} == set(ids)
        base = whole_model(model_dir)
        for batch, want in zip(batches(sequences, batch_size), expected, strict=True):
            # Any node may start the batch: it goes to the node holding the first layer.
            for node in ring:
                loss = await node.enqueue_example(base, batch.inputs, batch.targets, batch.lengths)
                _assert_close(loss, want["loss"])
            assert batch.positions == want["positions"]


async def test_a_classic_client_gets_the_loss_from_send_example(model: tuple[str, Path], stubs) -> None:
    import grpc

    pb, pb_grpc = stubs
    preset, model_dir = model
    want = _golden(preset)["batches"]["3"][0]
    batch = next(batches(await _sequences(model_dir), 3))
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]

    def tensor(array: np.ndarray) -> object:
        return pb.Tensor(tensor_data=array.tobytes(), shape=list(array.shape), dtype=str(array.dtype))

    async with running_cluster(["a"], CandleInferenceEngine) as (node,):
        target = f"127.0.0.1:{node.server.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.NodeServiceStub(channel)
            shard = pb.Shard(model_id=str(model_dir), start_layer=0, end_layer=layers - 1, n_layers=layers)
            request = pb.ExampleRequest(
                shard=shard,
                example=tensor(batch.inputs),
                target=tensor(batch.targets),
                length=tensor(batch.lengths),
                train=False,
                request_id="classic",
            )
            reply = await stub.SendExample(request)
    _assert_close(reply.loss, want["loss"])
    assert not reply.HasField("grads")


def test_eval_command_prints_loss_and_perplexity(model: tuple[str, Path], tmp_path: Path) -> None:
    preset, model_dir = model
    expected = _golden(preset)["batches"]["3"]
    mean = sum(b["loss"] * b["positions"] for b in expected) / sum(b["positions"] for b in expected)
    done = run_solo(tmp_path, "eval", str(model_dir), "--data", str(DATA), "--batch-size", "3")
    assert done.returncode == 0, done.stderr
    found = re.search(r"loss (\S+) \| perplexity (\S+) \| (\d+) tokens", done.stdout)
    assert found, done.stdout
    _assert_close(float(found[1]), mean)
    _assert_close(float(found[2]), math.exp(mean))
    assert int(found[3]) == sum(b["positions"] for b in expected)


def test_eval_without_test_data_is_an_error(model: tuple[str, Path], tmp_path: Path) -> None:
    _, model_dir = model
    done = run_solo(tmp_path, "eval", str(model_dir), "--data", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert "no test examples" in done.stderr
