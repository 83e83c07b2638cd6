"""Manual discovery: classic's config format, validation errors naming the file, and live config edits."""

import asyncio
import json
from pathlib import Path

import pytest

from exo.errors import ConfigNotFoundError, InvalidConfigError
from exo.networking.manual.manual_discovery import ManualDiscovery
from exo.networking.manual.network_topology_config import NetworkTopology, PeerConfig
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES
from support.discovery_fakes import WAIT, FakePeerFactory, eventually, node_config, peer_ids, write_config

CLASSIC_CONFIG = {"node1": node_config(50051, "localhost"), "node2": node_config(50052, "localhost")}


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return tmp_path / "topology.json"


def test_from_path_reads_a_valid_config(config_path: Path) -> None:
    write_config(config_path, CLASSIC_CONFIG)
    config = NetworkTopology.from_path(str(config_path))
    assert list(config.peers) == ["node1", "node2"]
    node2 = config.peers["node2"]
    assert isinstance(node2, PeerConfig)
    assert (node2.address, node2.port) == ("localhost", 50052)
    assert node2.device_capabilities == UNKNOWN_DEVICE_CAPABILITIES
    assert node2.device_capabilities.flops.fp16 == 0


def test_from_path_missing_file_is_file_not_found() -> None:
    with pytest.raises(FileNotFoundError) as raised:
        NetworkTopology.from_path("invalid_path")
    assert isinstance(raised.value, ConfigNotFoundError)
    assert str(raised.value) == "Config file not found at invalid_path"  # classic's words


def test_from_path_invalid_json_names_the_file(config_path: Path) -> None:
    config_path.write_text("")
    with pytest.raises(ValueError) as raised:
        NetworkTopology.from_path(config_path)
    assert isinstance(raised.value, InvalidConfigError)
    # Classic's message around pydantic's report, which its own tests look for.
    assert str(raised.value) == (
        f"Error validating network topology config from {config_path}: 1 validation error for NetworkTopology\n"
        "  Invalid JSON: EOF while parsing a value at line 1 column 0"
    )


def test_from_path_invalid_config_names_the_missing_field(config_path: Path) -> None:
    entry = node_config(1)
    del entry["port"]
    write_config(config_path, {"node1": entry})
    with pytest.raises(InvalidConfigError) as raised:
        NetworkTopology.from_path(config_path)
    assert f"Error validating network topology config from {config_path}" in str(raised.value)
    assert "\npeers.node1.port\n  Field required" in str(raised.value)


def test_peer_config_and_topology_can_be_built_in_python() -> None:
    peer = PeerConfig("10.0.0.2", 50051, UNKNOWN_DEVICE_CAPABILITIES)
    topology = NetworkTopology({"a": peer})
    assert topology.peers["a"] == peer
    assert "10.0.0.2" in repr(peer)


async def test_single_node_config_finds_no_peers(config_path: Path) -> None:
    write_config(config_path, {"node1": node_config(50051)})
    factory = FakePeerFactory()
    discovery = ManualDiscovery(str(config_path), "node1", create_peer_handle=factory)
    await discovery.start()
    try:
        await asyncio.sleep(1.5)
        assert await discovery.discover_peers(wait_for_peers=0) == []
        assert factory.made == []
    finally:
        await discovery.stop()


async def test_two_nodes_find_each_other_without_connecting(config_path: Path) -> None:
    write_config(config_path, CLASSIC_CONFIG)
    factory1, factory2 = FakePeerFactory(), FakePeerFactory()
    discovery1 = ManualDiscovery(str(config_path), "node1", create_peer_handle=factory1)
    discovery2 = ManualDiscovery(str(config_path), "node2", create_peer_handle=factory2)
    await discovery1.start()
    await discovery2.start()
    try:
        peers1 = await asyncio.wait_for(discovery1.discover_peers(wait_for_peers=1), WAIT)
        peers2 = await asyncio.wait_for(discovery2.discover_peers(wait_for_peers=1), WAIT)
        assert (peer_ids(peers1), peer_ids(peers2)) == (["node2"], ["node1"])
        assert peers1[0].addr() == "localhost:50052"
        assert peers1[0].description() == "MAN"
        assert [p.connects for p in factory1.made + factory2.made] == [0, 0], "connecting is the node's job"
    finally:
        await discovery1.stop()
        await discovery2.stop()


async def test_start_with_a_bad_config_raises_naming_the_file(config_path: Path) -> None:
    factory = FakePeerFactory()
    with pytest.raises(ConfigNotFoundError, match=str(config_path)):
        await ManualDiscovery(str(config_path), "node1", factory).start()
    write_config(config_path, "{ not json")
    with pytest.raises(InvalidConfigError, match=str(config_path)):
        await ManualDiscovery(str(config_path), "node1", factory).start()
    write_config(config_path, {"node2": node_config(2)})
    with pytest.raises(InvalidConfigError, match="node1"):
        await ManualDiscovery(str(config_path), "node1", factory).start()


async def test_unhealthy_peers_are_left_out(config_path: Path) -> None:
    write_config(config_path, CLASSIC_CONFIG)
    factory = FakePeerFactory(healthy=False)
    discovery = ManualDiscovery(str(config_path), "node1", factory)
    await discovery.start()
    try:

        async def checked() -> bool:
            return bool(factory.made)

        await eventually(checked, "node2 was health-checked")
        await asyncio.sleep(0.5)
        assert await discovery.discover_peers() == []
    finally:
        await discovery.stop()


async def test_config_edits_add_and_remove_peers(config_path: Path) -> None:
    write_config(config_path, CLASSIC_CONFIG)
    factory = FakePeerFactory()
    discovery = ManualDiscovery(str(config_path), "node1", factory)
    await discovery.start()
    try:
        assert peer_ids(await asyncio.wait_for(discovery.discover_peers(1), WAIT)) == ["node2"]

        write_config(config_path, {**CLASSIC_CONFIG, "node3": node_config(50053)})
        assert peer_ids(await asyncio.wait_for(discovery.discover_peers(2), WAIT)) == ["node2", "node3"]

        # An edit that does not validate keeps the last good peers.
        write_config(config_path, json.dumps({"peers": {"node1": {"address": "x"}}}))
        await asyncio.sleep(2.5)
        assert peer_ids(await discovery.discover_peers()) == ["node2", "node3"]

        write_config(config_path, CLASSIC_CONFIG)

        async def node3_gone() -> bool:
            return peer_ids(await discovery.discover_peers()) == ["node2"]

        await eventually(node3_gone, "node3 dropped after the edit removed it")
    finally:
        await discovery.stop()
