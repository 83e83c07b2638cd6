"""Helpers for tests that run real nodes over loopback gRPC in one process."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from exo.inference.shard import Shard
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.orchestration.node import Node
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES


class FixedDiscovery:
    """A Python stand-in for a discovery: returns whatever peers the test sets."""

    def __init__(self) -> None:
        self.peers: list[Any] = []

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def discover_peers(self, wait_for_peers: int = 0) -> list[Any]:
        return list(self.peers)


class OpaquePeer:
    """A Python stand-in forwarding every call to a real peer handle: the node holding it cannot
    tell that the peer runs xotorch-core, as with a classic peer."""

    PLAIN = frozenset({"id", "addr", "description", "device_capabilities"})

    def __init__(self, peer: Any) -> None:
        self._peer = peer

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._peer, name)
        if name in self.PLAIN or not callable(attribute):
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            # Called on the event loop, where the real handle's coroutines must start.
            return await attribute(*args, **kwargs)

        return call


def whole_model(model_dir: Path) -> Shard:
    """The base shard of a local model directory: all its layers."""
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    return Shard(str(model_dir), 0, layers - 1, layers)


@contextlib.asynccontextmanager
async def running_cluster(
    ids: list[str], make_engine: Callable[[], Any], opaque_peers_of: tuple[str, ...] = (), **node_options: Any
) -> AsyncIterator[list[Node]]:
    """Starts one node per id on 127.0.0.1, each knowing all the others; stops them after.
    Nodes named in `opaque_peers_of` reach their peers through `OpaquePeer` stand-ins."""
    nodes, discoveries = [], []
    for node_id in ids:
        discovery = FixedDiscovery()
        node = Node(node_id, None, make_engine(), discovery, None, **node_options)
        node.server = GRPCServer(node, "127.0.0.1", 0)
        nodes.append(node)
        discoveries.append(discovery)
    try:
        # Servers bind first, so every node's peers can be given the ports the system chose.
        for node in nodes:
            await node.server.start()
        for node, discovery in zip(nodes, discoveries, strict=True):
            discovery.peers = [
                GRPCPeerHandle(other.id, f"127.0.0.1:{other.server.port}", "test", UNKNOWN_DEVICE_CAPABILITIES)
                for other in nodes
                if other is not node
            ]
            if node.id in opaque_peers_of:
                discovery.peers = [OpaquePeer(peer) for peer in discovery.peers]
        for node in nodes:
            await node.start()
        # Nodes started before their peers saw them without capabilities; look again so
        # that every node computes the same partition.
        for node in nodes:
            await node.update_peers()
            await node.collect_topology(set())
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


async def wait_for_ring(node: Node, count: int, timeout: float = 20.0) -> None:
    """Waits until `node` and each of its peers see the same `count` nodes, all with their devices
    known, so every node computes the same partition."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def complete(topology: Any) -> bool:
        nodes = topology.all_nodes()
        return len(nodes) == count and all(caps.memory > 0 for _, caps in nodes)

    while True:
        await node.update_peers()
        await node.collect_topology(set())
        views = [node.topology]
        for peer in node.peers:
            with contextlib.suppress(Exception):
                views.append(await peer.collect_topology(set(), 0))
        if len(views) == count and all(complete(view) for view in views):
            return
        assert loop.time() < deadline, f"the ring did not settle on {count} nodes: {[str(v) for v in views]}"
        await asyncio.sleep(0.3)
