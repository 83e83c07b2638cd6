"""Contracts that exo classic's own unit tests hold the package to, where it once differed from them.

A peer handle that a discovery hands out is connected only once asked to be (classic's test_udp_discovery and
test_manual_discovery with gRPC peer handles): discovery health-checks the peers it finds, but connecting is the
node's job; a connected peer whose server stops reads as not connected.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from exo.helpers import find_available_port
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.networking.manual.manual_discovery import ManualDiscovery
from exo.networking.udp.udp_discovery import UDPDiscovery
from exo.orchestration.node import Node
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES, DeviceCapabilities
from support.discovery_fakes import WAIT, free_udp_port, node_config, write_config


def grpc_peer(peer_id: str, address: str, description: str, device_capabilities: DeviceCapabilities) -> Any:
    return GRPCPeerHandle(peer_id, address, description, device_capabilities)


def udp_discoveries(ports: list[int], _: Path) -> list[Any]:
    udp_port = free_udp_port()
    return [
        UDPDiscovery(
            f"node{i}",
            port,
            udp_port,
            udp_port,
            grpc_peer,
            broadcast_interval=0.2,
            allowed_interface_types=["Loopback"],
        )
        for i, port in enumerate(ports, start=1)
    ]


def manual_discoveries(ports: list[int], tmp_path: Path) -> list[Any]:
    config = tmp_path / "topology.json"
    write_config(config, {f"node{i}": node_config(port) for i, port in enumerate(ports, start=1)})
    return [ManualDiscovery(str(config), f"node{i}", grpc_peer) for i in range(1, len(ports) + 1)]


@contextlib.asynccontextmanager
async def two_servers_found_by(
    make_discoveries: Callable[[list[int], Path], list[Any]], tmp_path: Path
) -> AsyncIterator[tuple[list[GRPCServer], list[Any]]]:
    """Two gRPC servers over mock nodes, and each one's discovery after it found the other (peer of 1, peer of 2)."""
    ports = [find_available_port("127.0.0.1") for _ in range(2)]
    servers = [GRPCServer(mock.AsyncMock(spec=Node), "127.0.0.1", port) for port in ports]
    discoveries = make_discoveries(ports, tmp_path)
    for part in (*servers, *discoveries):
        await part.start()
    try:
        found = [await asyncio.wait_for(d.discover_peers(wait_for_peers=1), WAIT) for d in discoveries]
        assert [[peer.id() for peer in peers] for peers in found] == [["node2"], ["node1"]]
        yield servers, [peers[0] for peers in found]
    finally:
        for part in (*discoveries, *servers):
            await part.stop()


@pytest.mark.parametrize("make_discoveries", [udp_discoveries, manual_discoveries], ids=["udp", "manual"])
async def test_a_discovered_peer_is_connected_only_after_connect(
    make_discoveries: Callable[[list[int], Path], list[Any]], tmp_path: Path
) -> None:
    async with two_servers_found_by(make_discoveries, tmp_path) as (servers, (peer_of_1, peer_of_2)):
        assert await peer_of_1.health_check() and await peer_of_2.health_check()
        assert not await peer_of_1.is_connected() and not await peer_of_2.is_connected()

        await peer_of_1.connect()
        await peer_of_2.connect()
        assert await peer_of_1.is_connected() and await peer_of_2.is_connected()

        # Node 1's server stops: the peer pointing at it (node 2's) is no longer connected.
        await servers[0].stop()
        assert await peer_of_1.is_connected()
        assert not await peer_of_2.is_connected()


async def test_health_checks_never_connect_and_disconnect_undoes_connect() -> None:
    server = GRPCServer(mock.AsyncMock(spec=Node), "127.0.0.1", 0)
    await server.start()
    try:
        peer = GRPCPeerHandle("node", f"127.0.0.1:{server.port}", "MAN", UNKNOWN_DEVICE_CAPABILITIES)
        for _ in range(3):
            assert await peer.health_check()
        assert not await peer.is_connected()
        await peer.connect()
        assert await peer.is_connected()
        await peer.disconnect()
        assert not await peer.is_connected()
        assert await peer.health_check() and not await peer.is_connected()
    finally:
        await server.stop()


async def test_a_call_connects_the_peer_as_classic_calls_do() -> None:
    node = mock.AsyncMock(spec=Node)
    server = GRPCServer(node, "127.0.0.1", 0)
    await server.start()
    try:
        peer = GRPCPeerHandle("node", f"127.0.0.1:{server.port}", "MAN", UNKNOWN_DEVICE_CAPABILITIES)
        await peer.send_opaque_status("r1", '{"type": "node_status"}')
        assert await peer.is_connected()
    finally:
        await server.stop()
