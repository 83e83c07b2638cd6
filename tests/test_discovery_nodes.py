"""Real nodes (dummy engine, gRPC on 127.0.0.1) that find each other by UDP and manual discovery."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from exo.helpers import find_available_port
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.shard import Shard
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.manual.manual_discovery import ManualDiscovery
from exo.networking.udp.udp_discovery import UDPDiscovery
from exo.orchestration.node import Node
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
from support.discovery_fakes import WAIT, eventually, free_udp_port, node_config, peer_ids, write_config

DUMMY_TOKENS = [2, 3, 4, 5, 6, 7, 8, 9, 10, 69]
BASE = Shard("dummy", 0, 7, 8)
CAPS = DeviceCapabilities("Test Box", "Test Chip", 1024, DeviceFlops(1.0, 1.0, 1.0))


def grpc_peer(peer_id: str, address: str, description: str, device_capabilities: DeviceCapabilities) -> Any:
    return GRPCPeerHandle(peer_id, address, description, device_capabilities)


@contextlib.asynccontextmanager
async def running_nodes(
    ids: list[str], ports: list[int], make_discovery: Callable[[str, int], Any], wait_for_peers: int
) -> AsyncIterator[list[Node]]:
    """Starts one real node per id, each on its gRPC port with its own discovery; stops them after."""
    nodes = []
    for node_id, port in zip(ids, ports, strict=True):
        node = Node(node_id, None, DummyInferenceEngine(), make_discovery(node_id, port), None)
        node.server = GRPCServer(node, "127.0.0.1", port)
        nodes.append(node)
    try:
        await asyncio.gather(*(asyncio.wait_for(node.start(wait_for_peers), WAIT) for node in nodes))
        # Peers found before the others' servers answered carry no capabilities yet; look again so
        # that every node computes the same partition.
        for node in nodes:
            await node.update_peers()
            await node.collect_topology(set())
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


async def generate(node: Node) -> list[int]:
    return [token async for token in node.generate(BASE, "hi")]


async def test_nodes_found_by_udp_discovery_form_a_ring() -> None:
    port = free_udp_port()

    def udp(node_id: str, grpc_port: int) -> UDPDiscovery:
        return UDPDiscovery(
            node_id,
            grpc_port,
            port,
            port,
            grpc_peer,
            broadcast_interval=0.2,
            device_capabilities=CAPS,
            allowed_interface_types=["Loopback"],
        )

    ports = [find_available_port("127.0.0.1") for _ in range(2)]
    async with running_nodes(["udp-a", "udp-b"], ports, udp, wait_for_peers=1) as (a, b):
        assert [peer.id() for peer in a.peers] == ["udp-b"]
        assert [peer.addr() for peer in b.peers] == [f"127.0.0.1:{ports[0]}"]
        assert [await peer.is_connected() for peer in a.peers + b.peers] == [True, True], "the nodes connect them"
        assert len(a.partitions()) == 2
        assert await generate(a) == DUMMY_TOKENS
        assert await generate(b) == DUMMY_TOKENS


async def test_nodes_found_by_manual_discovery_follow_config_edits(tmp_path: Path) -> None:
    config = tmp_path / "topology.json"
    ports = [find_available_port("127.0.0.1") for _ in range(3)]
    entries = {f"man-{name}": node_config(port) for name, port in zip("abc", ports, strict=True)}
    write_config(config, {key: entries[key] for key in ("man-a", "man-b")})

    def manual(node_id: str, grpc_port: int) -> ManualDiscovery:
        return ManualDiscovery(str(config), node_id, grpc_peer)

    async with running_nodes(["man-a", "man-b"], ports[:2], manual, wait_for_peers=1) as (a, _):
        assert [(peer.id(), peer.description()) for peer in a.peers] == [("man-b", "MAN")]
        assert await a.peers[0].is_connected(), "the node connects the peers discovery found"
        assert await generate(a) == DUMMY_TOKENS

        # A third node joins: it is started, then added to the config.
        c = Node("man-c", None, DummyInferenceEngine(), manual("man-c", ports[2]), None)
        c.server = GRPCServer(c, "127.0.0.1", ports[2])
        write_config(config, entries)
        try:
            await asyncio.wait_for(c.start(2), WAIT)
            peers = await asyncio.wait_for(a.discovery.discover_peers(2), WAIT)
            assert peer_ids(peers) == ["man-b", "man-c"]

            async def a_sees_three() -> bool:
                await a.update_peers()
                await a.collect_topology(set())
                return len(a.partitions()) == 3

            await eventually(a_sees_three, "node a partitions over three nodes")
        finally:
            await c.stop()

        # c leaves the config (and stops): a drops it and keeps generating with b.
        write_config(config, {key: entries[key] for key in ("man-a", "man-b")})

        async def c_dropped() -> bool:
            return peer_ids(await a.discovery.discover_peers()) == ["man-b"]

        await eventually(c_dropped, "node c dropped from a's peers")
        await a.update_peers()
        # The ring comes from the topology, which the next walk rebuilds without c.
        await a.collect_topology(set())
        assert await generate(a) == DUMMY_TOKENS
