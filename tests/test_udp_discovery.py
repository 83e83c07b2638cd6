"""UDP discovery between discoveries on loopback: classic's JSON presence messages, filters, health checks."""

import asyncio
import json
import socket

import pytest

from exo.errors import DiscoveryError
from exo.networking.udp.udp_discovery import UDPDiscovery
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
from support.discovery_fakes import WAIT, FakePeerFactory, eventually, free_udp_port, peer_ids

CAPS = DeviceCapabilities("Test Box", "Test Chip", 2048, DeviceFlops(1.0, 2.0, 4.0))


def loopback_discovery(node_id: str, node_port: int, listen: int, broadcast: int, factory, **kwargs) -> UDPDiscovery:
    """A discovery that announces and accepts only on loopback, quickly, with fixed capabilities."""
    return UDPDiscovery(
        node_id,
        node_port,
        listen,
        broadcast,
        factory,
        broadcast_interval=0.1,
        device_capabilities=CAPS,
        allowed_interface_types=["Loopback"],
        **kwargs,
    )


async def test_two_discoveries_with_crossed_ports_find_each_other() -> None:
    port1, port2 = free_udp_port(), free_udp_port()
    factory1, factory2 = FakePeerFactory(), FakePeerFactory()
    discovery1 = loopback_discovery("discovery1", 50051, port1, port2, factory1)
    discovery2 = loopback_discovery("discovery2", 50052, port2, port1, factory2)
    await discovery1.start()
    await discovery2.start()
    try:
        peers1 = await asyncio.wait_for(discovery1.discover_peers(wait_for_peers=1), WAIT)
        peers2 = await asyncio.wait_for(discovery2.discover_peers(wait_for_peers=1), WAIT)
        assert [(p.id(), p.addr()) for p in peers1] == [("discovery2", "127.0.0.1:50052")]
        assert [(p.id(), p.addr()) for p in peers2] == [("discovery1", "127.0.0.1:50051")]
        assert peers1[0].description() == "Loopback (lo)"
        assert peers1[0].device_capabilities() == CAPS
        assert all(peer.connects == 0 for peer in factory1.made + factory2.made), "connecting is the node's job"
    finally:
        await discovery1.stop()
        await discovery2.stop()


async def test_discoveries_share_one_port_and_filter_node_ids() -> None:
    port = free_udp_port()
    factories = [FakePeerFactory() for _ in range(3)]
    picky = loopback_discovery("a", 50061, port, port, factories[0], allowed_node_ids=["b"])
    b = loopback_discovery("b", 50062, port, port, factories[1])
    c = loopback_discovery("c", 50063, port, port, factories[2])
    for discovery in (picky, b, c):
        await discovery.start()
    try:
        # b hears both others on the shared port, so c's announcements reach a as well.
        assert peer_ids(await asyncio.wait_for(b.discover_peers(2), WAIT)) == ["a", "c"]
        assert peer_ids(await asyncio.wait_for(picky.discover_peers(1), WAIT)) == ["b"]
        assert {peer.id() for peer in factories[0].made} == {"b"}
        assert picky.allowed_node_ids == ["b"]
    finally:
        for discovery in (picky, b, c):
            await discovery.stop()


async def test_interface_type_filter_ignores_other_types() -> None:
    port1, port2 = free_udp_port(), free_udp_port()
    factory = FakePeerFactory()
    wifi_only = UDPDiscovery("w", 1, port1, port2, factory, device_capabilities=CAPS, allowed_interface_types=["WiFi"])
    await wifi_only.start()
    try:
        message = {
            "type": "discovery",
            "node_id": "peer",
            "grpc_port": 5,
            "device_capabilities": CAPS.to_dict(),
            "priority": 6,
            "interface_name": "lo",
            "interface_type": "Loopback",
        }
        wifi = {**message, "node_id": "wifi-peer", "priority": 3, "interface_name": "wlan0", "interface_type": "WiFi"}
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(3):
                sender.sendto(json.dumps(message).encode(), ("127.0.0.1", port1))
            sender.sendto(json.dumps(wifi).encode(), ("127.0.0.1", port1))
        peers = await asyncio.wait_for(wifi_only.discover_peers(1), WAIT)
        assert [(p.id(), p.description()) for p in peers] == [("wifi-peer", "WiFi (wlan0)")]
        assert [p.id() for p in factory.made] == ["wifi-peer"]
    finally:
        await wifi_only.stop()


async def test_garbage_datagrams_are_ignored() -> None:
    port1, port2 = free_udp_port(), free_udp_port()
    factory1, factory2 = FakePeerFactory(), FakePeerFactory()
    discovery1 = loopback_discovery("one", 50071, port1, port2, factory1)
    await discovery1.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for garbage in (b"", b"hello", b"\xff\xfe", b"{", b'{"type": "discovery"}', b"[1, 2]", b'{"type": 5}'):
            sender.sendto(garbage, ("127.0.0.1", port1))
    discovery2 = loopback_discovery("two", 50072, port2, port1, factory2)
    await discovery2.start()
    try:
        assert peer_ids(await asyncio.wait_for(discovery1.discover_peers(1), WAIT)) == ["two"]
    finally:
        await discovery1.stop()
        await discovery2.stop()


async def test_unhealthy_peers_are_not_added_and_dropped_when_they_fail() -> None:
    port1, port2 = free_udp_port(), free_udp_port()
    healthy, sick = FakePeerFactory(), FakePeerFactory(healthy=False)
    discovery1 = loopback_discovery("one", 50081, port1, port2, healthy)
    discovery2 = loopback_discovery("two", 50082, port2, port1, sick)
    await discovery1.start()
    await discovery2.start()
    try:
        peers1 = await asyncio.wait_for(discovery1.discover_peers(1), WAIT)

        async def two_checked_one() -> bool:
            return bool(sick.made)

        await eventually(two_checked_one, "discovery2 health-checked discovery1")
        assert await discovery2.discover_peers() == []

        # The periodic health check drops a peer that stops answering (and it is not re-added).
        healthy.healthy = False
        for peer in healthy.made:
            peer.healthy = False
        assert peer_ids(peers1) == ["two"]

        async def dropped() -> bool:
            return await discovery1.discover_peers() == []

        await eventually(dropped, "discovery1 dropped the unhealthy peer")
    finally:
        await discovery1.stop()
        await discovery2.stop()


async def test_constructor_keeps_classic_arguments_and_rejects_bad_ones() -> None:
    discovery = UDPDiscovery("n", 50051, 5678, 5679, FakePeerFactory())
    assert (discovery.node_id, discovery.node_port, discovery.listen_port, discovery.broadcast_port) == (
        "n",
        50051,
        5678,
        5679,
    )
    assert (discovery.broadcast_interval, discovery.discovery_timeout) == (2.5, 30.0)
    assert discovery.allowed_interface_types is None
    with pytest.raises(ValueError, match="broadcast_interval"):
        UDPDiscovery("n", 1, 2, 3, FakePeerFactory(), broadcast_interval=0)
    with pytest.raises(ValueError, match="listen_port"):
        UDPDiscovery("n", 1, 70000, 3, FakePeerFactory())


async def test_a_port_in_exclusive_use_is_a_clear_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        discovery = UDPDiscovery("n", 1, port, port, FakePeerFactory(), device_capabilities=CAPS)
        with pytest.raises(DiscoveryError, match=str(port)):
            await discovery.start()
