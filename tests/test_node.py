"""Real nodes over loopback gRPC in one process: the ring gives a single engine's greedy
tokens, classic's callbacks see every token, and Python stand-ins drive a Rust node."""

import asyncio
import gc
import json
import re
import weakref
from pathlib import Path

import numpy as np
import pytest

from exo.errors import InsufficientMemoryError, InvalidArgumentError, PeerError
from exo.inference.candle import CandleInferenceEngine
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.shard import Shard
from exo.inference.tokenizers import resolve_tokenizer
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.orchestration.node import Node
from exo.testing.synth import write_model
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES, DeviceCapabilities, DeviceFlops
from exo.topology.topology import Topology
from support.cluster import running_cluster, whole_model

GOLDEN = Path(__file__).parent / "golden" / "tiny-llama.json"
DUMMY_TOKENS = [2, 3, 4, 5, 6, 7, 8, 9, 10, 69]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama"), dtype="f32", seed=0)


async def _prompt(model: Path) -> str:
    golden = json.loads(GOLDEN.read_text())
    tokenizer = await resolve_tokenizer(str(model))
    return tokenizer.apply_chat_template(golden["messages"], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("ids", [["a"], ["a", "b"], ["a", "b", "c"]])
async def test_cluster_gives_transformers_greedy_tokens(model: Path, ids: list[str]) -> None:
    golden = json.loads(GOLDEN.read_text())
    prompt = await _prompt(model)
    assert (await CandleInferenceEngine().encode(whole_model(model), prompt)).tolist() == golden["prompt_ids"]
    expected = golden["greedy_tokens"]
    eos = (await resolve_tokenizer(str(model))).eos_token_ids
    async with running_cluster(ids, CandleInferenceEngine) as nodes:
        assert len(nodes[0].partitions()) == len(ids)
        for node in nodes:  # every node can start a request, wherever the first layer is
            stream = node.generate(whole_model(model), prompt, max_tokens=len(expected))
            tokens = [token async for token in stream]
            assert tokens == expected[: len(tokens)]
            assert len(tokens) == len(expected) or tokens[-1] in eos


def _layers(node: Node) -> tuple[int, int]:
    shard = node.inference_engine.shard
    return shard.start_layer, shard.end_layer


async def test_a_ring_of_xotorch_nodes_balances_layers_against_the_lm_head(model: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    prompt, expected = await _prompt(model), golden["greedy_tokens"][:8]
    base = whole_model(model)
    # tiny-llama: 4 layers; its LM head reads 0.89 of a layer's weights per token.
    async with running_cluster(["a", "b", "c"], CandleInferenceEngine) as nodes:
        # Classic's partition of three equal nodes (ring c, b, a): 0..=0, 1..=1, 2..=3 and the head.
        classic = [nodes[0].get_current_shard(base, i) for i in range(3)]
        assert [(s.start_layer, s.end_layer) for s in classic] == [(0, 0), (1, 1), (2, 3)]
        for node in nodes:
            assert [t async for t in node.generate(base, prompt, max_tokens=len(expected))] == expected
        # Balanced: no node reads more than two layers' worth per token (classic's last: 2.89).
        assert {n.id: _layers(n) for n in nodes} == {"c": (0, 0), "b": (1, 2), "a": (3, 3)}


async def test_a_peer_not_known_to_run_xotorch_keeps_classic_layers(model: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    prompt, expected = await _prompt(model), golden["greedy_tokens"][:8]
    async with running_cluster(["a", "b", "c"], CandleInferenceEngine, opaque_peers_of=("a",)) as nodes:
        stream = nodes[0].generate(whole_model(model), prompt, max_tokens=len(expected))
        assert [t async for t in stream] == expected
        # Node a cannot tell its peers follow layer plans, so every node runs classic's layers.
        assert {n.id: _layers(n) for n in nodes} == {"c": (0, 0), "b": (1, 1), "a": (2, 3)}


def _reference_memory(model: Path, start: int, end: int) -> int:
    """What layers `start..=end` of a bf16 model directory need on a CPU node, counted from its safetensors header:
    matrices as stored, norms as f32, each layer's f32 KV cache for the engine's 2048 positions (tiny-llama's
    context), the embedding on the first node and the tied head (its table and norm) on the last unless it is the
    first too."""
    raw = (model / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    config = json.loads((model / "config.json").read_text())

    def stored(name: str) -> int:
        tensor = header[name]
        elements = int(np.prod(tensor["shape"]))
        return elements * (4 if len(tensor["shape"]) == 1 else 2)

    layers = config["num_hidden_layers"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    kv = 2 * config["num_key_value_heads"] * head_dim * 4 * 2048
    total = sum(
        stored(name) for name in header if any(name.startswith(f"model.layers.{i}.") for i in range(start, end + 1))
    )
    total += (end - start + 1) * kv
    if start == 0:
        total += stored("model.embed_tokens.weight")
    if end == layers - 1 and start != 0:
        total += stored("model.embed_tokens.weight") + stored("model.norm.weight")
    return total


async def test_layer_plan_gives_the_memory_each_node_needs_and_refuses_a_model_too_big(tmp_path: Path) -> None:
    model = write_model("tiny-llama", tmp_path / "bf16", dtype="bf16", seed=0)
    base = whole_model(model)
    async with running_cluster(["a", "b"], CandleInferenceEngine) as nodes:
        plan = await nodes[0].layer_plan(base)
        assert [p["start_layer"] for p in plan] == [0, plan[1]["start_layer"]]
        assert plan[-1]["end_layer"] == 3
        for held in plan:
            assert held["memory_bytes"] == _reference_memory(model, held["start_layer"], held["end_layer"])
        # Nodes of 1 MB each: tiny-llama's caches alone take 2 MiB at its context.
        for node in nodes:
            node.device_capabilities = DeviceCapabilities("m", "c", 1, DeviceFlops(1.0, 1.0, 1.0))
        for node in nodes:
            await node.collect_topology(set())
        with pytest.raises(InsufficientMemoryError, match=r"does not fit the memory of the cluster.*GiB missing"):
            await nodes[0].layer_plan(base)
        with pytest.raises(InsufficientMemoryError, match=re.escape(str(model))):
            _ = [t async for t in nodes[1].generate(base, "hi", max_tokens=2)]


async def test_classic_callbacks_and_process_prompt() -> None:
    async with running_cluster(["a", "b"], DummyInferenceEngine) as (_, second):
        seen: dict[str, list[int]] = {}
        done = asyncio.Event()

        def on_token(request_id: str, tokens: list[int], is_finished: bool) -> None:
            seen.setdefault(request_id, []).extend(tokens)
            if is_finished:
                done.set()

        second.on_token.register("test").on_next(on_token)
        statuses: list[dict] = []
        second.on_opaque_status.register("test").on_next(lambda _r, s: statuses.append(json.loads(s)))
        request_id = await second.process_prompt(Shard("dummy", 0, 7, 8), "hello", request_id="req-1")
        assert request_id == "req-1"
        await asyncio.wait_for(done.wait(), 10)
        assert seen["req-1"] == DUMMY_TOKENS
        kinds = {(s["type"], s.get("status")) for s in statuses}
        assert ("node_status", "start_process_prompt") in kinds
        assert second.outstanding_requests == {}


async def test_limits_reach_peers_and_broadcasts_work_off_the_runtime(model: Path) -> None:
    """A node announces its limits to its peers; a broadcast from a thread of neither the node nor its runtime (the
    test's own and a fresh one, before any message went to the peer) reaches the peer instead of panicking."""

    def engine() -> CandleInferenceEngine:
        return CandleInferenceEngine(max_context=128, max_kv_cache_gb=0.5)

    async with running_cluster(["a", "b"], engine) as (first, second):
        await asyncio.to_thread(lambda: asyncio.run(first.broadcast_result("r", [1], False)))
        await first.broadcast_limits()
        expected = {"max_context": 128, "max_kv_cache_gb": 0.5}
        for _ in range(100):
            if "a" in second.limits_by_node():
                break
            await asyncio.sleep(0.05)
        assert second.limits_by_node() == {"a": expected, "b": expected}
        assert first.limits_by_node() == {"a": expected}


async def test_max_tokens_temperature_and_seed_are_per_request(model: Path) -> None:
    prompt = await _prompt(model)
    async with running_cluster(["a", "b"], CandleInferenceEngine) as (node, _):
        short = [t async for t in node.generate(whole_model(model), prompt, max_tokens=3)]
        assert len(short) == 3
        base = whole_model(model)
        first = [t async for t in node.generate(base, prompt, max_tokens=8, temperature=1.0, seed=7)]
        again = [t async for t in node.generate(base, prompt, max_tokens=8, temperature=1.0, seed=7)]
        greedy = [t async for t in node.generate(base, prompt, max_tokens=8)]
        assert first == again and len(first) == 8
        assert first != greedy


async def test_generation_ends_at_the_context_like_a_token_limit(model: Path) -> None:
    """A request asking for more tokens than the context holds ends when its next token would
    not fit (as at `max_tokens`), on one node and across a ring, instead of failing."""
    prompt = await _prompt(model)
    context = 64
    engine = CandleInferenceEngine(max_context=context)
    prompt_tokens = len(await engine.encode(whole_model(model), prompt))
    for ids in (["solo"], ["a", "b"]):
        async with running_cluster(ids, lambda: CandleInferenceEngine(max_context=context)) as nodes:
            tokens = [t async for t in nodes[0].generate(whole_model(model), prompt, max_tokens=100)]
            # The last token is never fed back: the prompt and all tokens but the last fill the context.
            assert len(tokens) == context - prompt_tokens + 1, ids


async def test_aclose_cancels_the_request_everywhere() -> None:
    async with running_cluster(["a", "b"], DummyInferenceEngine) as nodes:
        stream = nodes[0].generate(Shard("dummy", 0, 7, 8), "hi")
        assert await stream.__anext__() == 2
        await stream.aclose()
        await asyncio.sleep(0.5)
        assert all(node.outstanding_requests == {} for node in nodes)


class SlowPythonEngine:
    """A Python stand-in engine: the dummy engine's semantics, slowed, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.tokenizer = type("T", (), {"eos_token_id": 69})()

    async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
        return np.array([1])

    async def decode(self, shard: Shard, tokens: np.ndarray) -> str:
        return "x" * len(tokens)

    async def sample(self, x: np.ndarray, temp: float = 0.0, top_p: float = 1.0) -> np.ndarray:
        value = int(np.asarray(x).reshape(-1)[0])
        return np.array([69 if value > 10 else value])

    async def infer_prompt(self, request_id, shard, prompt, inference_state=None):
        return await self.infer_tensor(request_id, shard, await self.encode(shard, prompt), inference_state)

    async def infer_tensor(self, request_id, shard, input_data, inference_state=None):
        self.calls += 1
        await asyncio.sleep(0.2)
        data = np.asarray(input_data).reshape(1, -1)
        return (data + 1 if shard.is_last_layer() else data), inference_state

    async def ensure_shard(self, shard: Shard) -> None:
        return None


async def test_python_engine_stand_in_and_a_dead_peer_fails_fast() -> None:
    async with running_cluster(["a", "b"], SlowPythonEngine) as (origin, other):
        tokens = [t async for t in origin.generate(Shard("dummy", 0, 7, 8), "hi")]
        assert tokens == DUMMY_TOKENS
        assert origin.inference_engine.calls > 0 and other.inference_engine.calls > 0
        stream = origin.generate(Shard("dummy", 0, 7, 8), "hi")
        assert await stream.__anext__() == 2
        await other.stop()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PeerError):
            async for _ in stream:
                pass
        assert loop.time() - started < 8
        await asyncio.sleep(1.5)
        assert len(origin.partitions()) == 1
        assert [t async for t in origin.generate(Shard("dummy", 0, 7, 8), "hi")] == DUMMY_TOKENS


async def test_hop_round_trip_is_timed_and_a_dead_peer_is_an_error() -> None:
    async with running_cluster(["a", "b"], DummyInferenceEngine) as (origin, other):
        peer = GRPCPeerHandle("b", f"127.0.0.1:{other.server.port}", "probe", UNKNOWN_DEVICE_CAPABILITIES)
        seconds = await peer.measure_round_trip(2048, calls=20)
        assert 0 < seconds < 1
        with pytest.raises(InvalidArgumentError, match="positive"):
            peer.measure_round_trip(2048, calls=0)
        with pytest.raises(InvalidArgumentError, match="hidden size"):
            await peer.measure_round_trip(1 << 40, calls=1)
        # The node keeps serving after the probe's rejected messages.
        assert [t async for t in origin.generate(Shard("dummy", 0, 7, 8), "hi")] == DUMMY_TOKENS
        await other.stop()
        with pytest.raises(PeerError, match="SendTensor"):
            await peer.measure_round_trip(2048, calls=5)


async def test_a_classic_style_engine_error_fails_only_that_request() -> None:
    async with running_cluster(["a"], DummyInferenceEngine) as (node,):
        with pytest.raises(Exception, match=r"layers 3\.\.=9"):
            node.generate(Shard("dummy", 3, 9, 8), "hi")
        assert [t async for t in node.generate(Shard("dummy", 0, 7, 8), "hi")] == DUMMY_TOKENS


def test_node_keeps_classic_constructor_and_attributes() -> None:
    node = Node("n1", None, DummyInferenceEngine(), _NoPeers(), None, max_generate_tokens=5)
    assert node.id == "n1" and node.max_generate_tokens == 5 and node.peers == []
    assert node.get_partition_index() == 0
    assert node.get_current_shard(Shard("m", 0, 9, 10)) == Shard("m", 0, 9, 10)
    assert node.topology.to_json()["nodes"].keys() == {"n1"}


class _NoPeers:
    def __init__(self, peers: list | None = None) -> None:
        self.peers = peers or []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def discover_peers(self, wait_for_peers: int = 0) -> list:
        return self.peers


class RecordingPeer:
    """A Python stand-in for a peer handle that holds no layers (0 MB) and records what it gets."""

    def __init__(self) -> None:
        self.results: list[tuple[str, list[int], bool]] = []
        self.statuses: list[str] = []

    def id(self) -> str:
        return "watcher"

    def addr(self) -> str:
        return "nowhere:0"

    def description(self) -> str:
        return "stand-in"

    def device_capabilities(self) -> DeviceCapabilities:
        return DeviceCapabilities("fake", "none", 0, DeviceFlops(0.0, 0.0, 0.0))

    async def connect(self) -> None:
        return None

    async def is_connected(self) -> bool:
        return True

    async def disconnect(self) -> None:
        return None

    async def health_check(self) -> bool:
        return True

    async def send_prompt(self, shard, prompt, request_id=None, inference_state=None) -> None:
        raise AssertionError("a peer without layers is never sent a prompt")

    async def send_tensor(self, shard, tensor, request_id=None, inference_state=None) -> None:
        raise AssertionError("a peer without layers is never sent a tensor")

    async def send_result(self, request_id: str, result: list[int], is_finished: bool) -> None:
        self.results.append((request_id, list(result), is_finished))

    async def send_opaque_status(self, request_id: str, status: str) -> None:
        self.statuses.append(status)

    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
        topology = Topology()
        topology.update_node("watcher", self.device_capabilities())
        return topology


async def test_python_peer_stand_in_sees_statuses_and_batched_tokens() -> None:
    peer = RecordingPeer()
    node = Node("a", None, DummyInferenceEngine(), _NoPeers([peer]), None)
    await node.start()
    try:
        assert [p.node_id for p in node.partitions() if p.end > p.start] == ["a"]
        tokens = [t async for t in node.generate(Shard("dummy", 0, 7, 8), "hi", request_id="r")]
        assert tokens == DUMMY_TOKENS
        await asyncio.sleep(0.3)
        delivered = [t for request_id, batch, _ in peer.results if request_id == "r" for t in batch]
        assert delivered == DUMMY_TOKENS and peer.results[-1][2] is True
        assert len(peer.results) < len(DUMMY_TOKENS)  # bystanders get batches, not every token
        assert any(json.loads(s).get("status") == "start_process_prompt" for s in peer.statuses)
    finally:
        await node.stop()


class _NodeServer:
    """A stand-in server that refers back to its node, as a test's fake might."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


async def test_a_node_whose_stand_ins_refer_back_to_it_is_collected() -> None:
    discovery = _NoPeers()
    node = Node("a", None, DummyInferenceEngine(), discovery, None)
    node.server = _NodeServer(node)
    discovery.node = node
    await node.start()
    assert [t async for t in node.generate(Shard("dummy", 0, 7, 8), "hi")] == DUMMY_TOKENS
    await node.stop()
    collected = weakref.ref(node)
    del node, discovery
    for _ in range(40):  # the core lets go of a stopped node's event pump a moment later
        gc.collect()
        if collected() is None:
            break
        await asyncio.sleep(0.05)
    assert collected() is None
