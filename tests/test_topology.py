"""Device capabilities, topology and partitioning give exo classic's results."""

import asyncio
import random
import subprocess

import pytest

from exo.inference.shard import Shard
from exo.topology import device_capabilities as dc
from exo.topology.device_capabilities import (
    CHIP_FLOPS,
    UNKNOWN_DEVICE_CAPABILITIES,
    DeviceCapabilities,
    DeviceFlops,
    device_capabilities,
    mac_device_capabilities,
)
from exo.topology.partitioning_strategy import Partition, PartitioningStrategy, map_partitions_to_shards
from exo.topology.ring_memory_weighted_partitioning_strategy import RingMemoryWeightedPartitioningStrategy
from exo.topology.topology import PeerConnection, Topology

NO_FLOPS = DeviceFlops(fp32=0, fp16=0, int8=0)


def _topology(memories: dict[str, int]) -> Topology:
    topology = Topology()
    for node_id, memory in memories.items():
        topology.update_node(node_id, DeviceCapabilities(model="m", chip="c", memory=memory, flops=NO_FLOPS))
    return topology


def test_partition_weights_by_memory() -> None:
    topology = _topology({"node1": 3000, "node2": 1000, "node3": 6000})
    topology.add_edge("node1", "node2")
    partitions = RingMemoryWeightedPartitioningStrategy().partition(topology)
    assert partitions == [Partition("node3", 0.0, 0.6), Partition("node1", 0.6, 0.9), Partition("node2", 0.9, 1.0)]
    assert isinstance(RingMemoryWeightedPartitioningStrategy(), PartitioningStrategy)


def test_partition_rounds_to_five_decimals_and_breaks_ties_by_id() -> None:
    gib = 1024**3
    topology = _topology({"node1": 128 * gib, "node2": 192 * gib, "node3": 128 * gib})
    partitions = RingMemoryWeightedPartitioningStrategy().partition(topology)
    assert partitions == [
        Partition("node2", 0.0, 0.42857),
        Partition("node3", 0.42857, 0.71428),
        Partition("node1", 0.71428, 0.99999),
    ]


def _python_reference_partition(memories: dict[str, int]) -> list[tuple[str, float, float]]:
    """exo classic's arithmetic, written out in Python to compare against."""
    nodes = sorted(memories.items(), key=lambda item: (item[1], item[0]), reverse=True)
    total = sum(memory for _, memory in nodes)
    start: float = 0
    result = []
    for node_id, memory in nodes:
        end = round(start + memory / total, 5)
        result.append((node_id, start, end))
        start = end
    return result


def test_partition_arithmetic_matches_python_for_random_clusters() -> None:
    rng = random.Random(1234)
    for _ in range(500):
        memories = {f"n{i}": rng.randint(1, 10**6) for i in range(rng.randint(1, 8))}
        got = [
            (p.node_id, p.start, p.end) for p in RingMemoryWeightedPartitioningStrategy().partition(_topology(memories))
        ]
        assert got == _python_reference_partition(memories)


def test_map_partitions_to_shards_classic_cases() -> None:
    parts = [
        Partition("node1", 0.0, 0.42857),
        Partition("node2", 0.42857, 0.71428),
        Partition("node3", 0.71428, 0.99999),
    ]
    assert map_partitions_to_shards(parts, 32, "model") == [
        Shard("model", 0, 12, 32),
        Shard("model", 13, 21, 32),
        Shard("model", 22, 31, 32),
    ]
    parts = [Partition("node1", 0.0, 0.1), Partition("node2", 0.1, 0.2), Partition("node3", 0.2, 1.0)]
    assert map_partitions_to_shards(parts, 32, "model") == [
        Shard("model", 0, 2, 32),
        Shard("model", 3, 5, 32),
        Shard("model", 6, 31, 32),
    ]
    assert map_partitions_to_shards([Partition("node1", 0.0, 1.0)], 32, "model") == [Shard("model", 0, 31, 32)]
    assert map_partitions_to_shards([], 32, "model") == []


def test_every_layer_assigned_once_over_random_partitions() -> None:
    rng = random.Random(99)
    for _ in range(2000):
        memories = {f"n{i}": rng.randint(0, 10**5) for i in range(rng.randint(1, 10))}
        if sum(memories.values()) == 0:
            continue
        num_layers = rng.randint(1, 160)
        partitions = RingMemoryWeightedPartitioningStrategy().partition(_topology(memories))
        layers = [
            layer
            for shard in map_partitions_to_shards(partitions, num_layers, "m")
            for layer in range(shard.start_layer, shard.end_layer + 1)
        ]
        assert layers == list(range(num_layers)), (memories, num_layers)


def test_topology_graph_and_json() -> None:
    topology = _topology({"a": 1024})
    topology.add_edge("a", "b", "eth0")
    topology.add_edge("a", "b", "wifi")
    assert topology.get_node("a") == DeviceCapabilities(model="m", chip="c", memory=1024, flops=NO_FLOPS)
    assert topology.get_node("missing") is None
    assert [node_id for node_id, _ in topology.all_nodes()] == ["a"]
    assert topology.peer_graph == {"a": {PeerConnection("a", "b")}}
    assert next(iter(topology.peer_graph["a"])).description == "eth0"
    topology.active_node_id = "a"
    assert topology.to_json() == {
        "nodes": {"a": {"model": "m", "chip": "c", "memory": 1024, "flops": {"fp32": 0.0, "fp16": 0.0, "int8": 0.0}}},
        "peer_graph": {"a": [{"from_id": "a", "to_id": "b", "description": "eth0"}]},
        "active_node_id": "a",
    }


def test_merge_takes_only_the_peers_own_facts() -> None:
    mine = _topology({"me": 1})
    theirs = _topology({"peer": 2, "third": 3})
    theirs.add_edge("peer", "third")
    theirs.add_edge("third", "peer")
    mine.merge("peer", theirs)
    assert list(mine.nodes) == ["me", "peer"]
    assert list(mine.peer_graph) == ["peer"]


def test_device_capabilities_values() -> None:
    caps = DeviceCapabilities(model="MacBook Pro", chip="Apple M3 Max", memory=131072, flops=CHIP_FLOPS["Apple M3 Max"])
    assert str(caps) == (
        "Model: MacBook Pro. Chip: Apple M3 Max. Memory: 131072MB. "
        "Flops: fp32: 14.20 TFLOPS, fp16: 28.40 TFLOPS, int8: 56.80 TFLOPS"
    )
    assert caps.to_dict()["flops"] == {"fp32": 14.2, "fp16": 28.4, "int8": 56.8}
    from_dict = DeviceCapabilities(**{**caps.to_dict(), "flops": {"fp32": 14.2, "fp16": 28.4, "int8": 56.8}})
    assert from_dict == caps
    assert UNKNOWN_DEVICE_CAPABILITIES.memory == 0 and UNKNOWN_DEVICE_CAPABILITIES.model == "Unknown Model"
    assert CHIP_FLOPS["NVIDIA GEFORCE RTX 4090 Laptop GPU"] == CHIP_FLOPS["NVIDIA GEFORCE RTX 4090"]


def test_detects_this_machine() -> None:
    caps = asyncio.run(device_capabilities())
    assert caps.memory > 0 and caps.chip
    assert caps.flops.fp32 > 0


def test_mac_system_profiler_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    output = b"Hardware Overview:\n  Model Name: MacBook Air\n  Chip: Apple M2\n  Memory: 8 GB\n"
    monkeypatch.setattr(subprocess, "check_output", lambda *args, **kwargs: output)
    caps = asyncio.run(mac_device_capabilities())
    assert (caps.model, caps.chip, caps.memory) == ("MacBook Air", "Apple M2", 8192)
    assert caps.flops == CHIP_FLOPS["Apple M2"]
    assert dc._parse_system_profiler("Memory: 512 MB") == ("Unknown Model", "Unknown Chip", 512)
