"""A GRPCServer serves any object with classic's node methods, as classic's discovery tests
pass it a mock `Node`; a peer handle to a stopped server reads as not connected; a Python node
that holds its own server is garbage collected."""

import gc
import weakref
from unittest import mock

import numpy as np
import pytest

from exo.errors import InvalidArgumentError
from exo.inference.shard import Shard
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.orchestration.node import Node
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES, DeviceCapabilities, DeviceFlops
from exo.topology.topology import Topology


class Callbacks:
    """Classic's callback system, as far as the server uses it: `trigger_all` records its arguments."""

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def trigger_all(self, *args: object) -> None:
        self.calls.append((self.name, *args))


class RecordingNode:
    """A Python node: records what the server hands it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.on_token = Callbacks("on_token", self.calls)
        self.on_opaque_status = Callbacks("on_opaque_status", self.calls)
        self.current_topology = Topology()
        self.current_topology.update_node("python-node", DeviceCapabilities("m", "c", 7, DeviceFlops(1, 2, 3)))

    async def process_prompt(self, shard, prompt, request_id=None, inference_state=None) -> None:
        self.calls.append(("process_prompt", shard, prompt, request_id))

    async def process_tensor(self, shard, tensor, request_id=None, inference_state=None) -> None:
        self.calls.append(("process_tensor", shard, np.asarray(tensor).tolist(), request_id))


def _peer(port: int) -> GRPCPeerHandle:
    return GRPCPeerHandle("python-node", f"127.0.0.1:{port}", "test", UNKNOWN_DEVICE_CAPABILITIES)


async def test_every_call_reaches_a_python_node() -> None:
    node = RecordingNode()
    server = GRPCServer(node, "127.0.0.1", 0)
    await server.start()
    peer = _peer(server.port)
    try:
        assert await peer.health_check()
        shard = Shard("m", 0, 1, 2)
        await peer.send_prompt(shard, "hi", request_id="r1")
        await peer.send_tensor(shard, np.array([[1, 2]], dtype=np.int64), request_id="r2")
        await peer.send_result("r1", [5, 6], True)
        await peer.send_opaque_status("r1", '{"type": "node_status"}')
        topology = await peer.collect_topology(set(), 2)
    finally:
        await server.stop()
    assert node.calls == [
        ("process_prompt", shard, "hi", "r1"),
        ("process_tensor", shard, [[1, 2]], "r2"),
        ("on_token", "r1", [5, 6], True),
        ("on_opaque_status", "r1", '{"type": "node_status"}'),
    ]
    assert topology.nodes["python-node"].memory == 7


async def test_a_mock_node_serves_health_checks_and_a_stopped_server_is_not_connected() -> None:
    server = GRPCServer(mock.AsyncMock(spec=Node), "localhost", 0)
    await server.start()
    peer = _peer(server.port)
    assert not await peer.is_connected()
    await peer.connect()
    assert await peer.is_connected() and await peer.health_check()
    await server.stop()
    assert not await peer.is_connected()
    assert not await peer.health_check()


def test_an_object_without_node_methods_is_a_clear_error() -> None:
    with pytest.raises(InvalidArgumentError, match=r"a node needs a process_prompt\(\) method"):
        GRPCServer(object(), "127.0.0.1", 0)


async def test_a_python_node_holding_its_server_is_collected() -> None:
    node = RecordingNode()
    node.server = GRPCServer(node, "127.0.0.1", 0)
    await node.server.start()
    assert await _peer(node.server.port).health_check()
    await node.server.stop()
    collected = weakref.ref(node)
    del node
    gc.collect()
    assert collected() is None
