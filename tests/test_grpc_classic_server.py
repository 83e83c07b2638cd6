"""The Rust `GRPCPeerHandle` calls every RPC of a server built as exo classic's is (grpcio's
asyncio server from the proto, with classic's options): what it sends arrives intact, and a
server that fails a call or goes away fails that call alone, with a `PeerError`."""

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest

from exo.errors import PeerError
from exo.inference.shard import Shard
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES
from support.classic_stand_in import CLASSIC_SERVER_OPTIONS


@dataclass
class ClassicServer:
    """A classic-style server on loopback and the requests it received, by RPC name."""

    server: grpc.aio.Server
    port: int
    received: dict[str, list[Any]] = field(default_factory=dict)


def _tensor_array(pb_tensor: Any) -> np.ndarray:
    """A wire tensor read with numpy, as classic's server reads it (not with the core's codec, which
    would check the Rust side against itself)."""
    return np.frombuffer(pb_tensor.tensor_data, dtype=np.dtype(pb_tensor.dtype)).reshape(list(pb_tensor.shape))


def _servicer(pb: ModuleType, pb_grpc: ModuleType, classic: ClassicServer) -> Any:
    class ClassicStyleServicer(pb_grpc.NodeServiceServicer):
        """Records each request and answers as classic's server does."""

        def _record(self, name: str, request: Any) -> None:
            classic.received.setdefault(name, []).append(request)

        async def SendPrompt(self, request, context):
            self._record("SendPrompt", request)
            return pb.Tensor()

        async def SendTensor(self, request, context):
            self._record("SendTensor", request)
            if request.request_id == "fail":
                raise RuntimeError("the classic node's engine raised")
            return request.tensor

        async def CollectTopology(self, request, context):
            self._record("CollectTopology", request)
            flops = pb.DeviceFlops(fp32=1.5, fp16=3.0, int8=6.0)
            capabilities = pb.DeviceCapabilities(model="Classic Box", chip="CPU", memory=8192, flops=flops)
            connections = pb.PeerConnections(connections=[pb.PeerConnection(to_id="rust", description="MAN")])
            return pb.Topology(nodes={"classic": capabilities}, peer_graph={"classic": connections})

        async def SendResult(self, request, context):
            self._record("SendResult", request)
            return pb.Empty()

        async def SendOpaqueStatus(self, request, context):
            self._record("SendOpaqueStatus", request)
            return pb.Empty()

        async def HealthCheck(self, request, context):
            self._record("HealthCheck", request)
            return pb.HealthCheckResponse(is_healthy=True)

    return ClassicStyleServicer()


@pytest.fixture
async def classic_server(stubs: tuple[ModuleType, ModuleType]) -> AsyncIterator[ClassicServer]:
    pb, pb_grpc = stubs
    server = grpc.aio.server(options=CLASSIC_SERVER_OPTIONS)
    port = server.add_insecure_port("127.0.0.1:0")
    classic = ClassicServer(server, port)
    pb_grpc.add_NodeServiceServicer_to_server(_servicer(pb, pb_grpc, classic), server)
    await server.start()
    try:
        yield classic
    finally:
        await server.stop(grace=None)


def _handle(port: int) -> GRPCPeerHandle:
    return GRPCPeerHandle("classic", f"127.0.0.1:{port}", "MAN", UNKNOWN_DEVICE_CAPABILITIES)


async def test_every_call_reaches_a_classic_server_intact(classic_server: ClassicServer) -> None:
    peer = _handle(classic_server.port)
    assert await peer.health_check()
    assert not await peer.is_connected(), "a health check does not connect the peer"
    await peer.connect()
    assert await peer.is_connected()

    shard = Shard("llama-3.2-1b", 8, 15, 16)
    await peer.send_prompt(shard, "Hello", "r1", {"xot_request": {"origin": "rust"}, "tag": [1, 2]})
    (prompt,) = classic_server.received["SendPrompt"]
    assert (prompt.shard.model_id, prompt.shard.start_layer, prompt.shard.end_layer, prompt.shard.n_layers) == (
        "llama-3.2-1b",
        8,
        15,
        16,
    )
    assert (prompt.prompt, prompt.request_id) == ("Hello", "r1")
    assert json.loads(prompt.inference_state.other_data_json) == {"xot_request": {"origin": "rust"}, "tag": [1, 2]}

    hidden = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 7
    mask = np.array([[1, 0, 1]], dtype=np.int64)
    cache = [np.ones((1, 2), dtype=np.float16), np.zeros((3,), dtype=np.float32)]
    await peer.send_tensor(shard, hidden, "r2", {"mask": mask, "cache": cache, "step": 3})
    (request,) = classic_server.received["SendTensor"]
    assert request.request_id == "r2"
    assert request.tensor.dtype == "float32" and list(request.tensor.shape) == [2, 3, 4]
    np.testing.assert_array_equal(_tensor_array(request.tensor), hidden)
    state = request.inference_state
    np.testing.assert_array_equal(_tensor_array(state.tensor_data["mask"]), mask)
    sent_cache = [_tensor_array(t) for t in state.tensor_list_data["cache"].tensors]
    assert [a.dtype for a in sent_cache] == [np.float16, np.float32]
    for sent, original in zip(sent_cache, cache, strict=True):
        np.testing.assert_array_equal(sent, original)
    assert json.loads(state.other_data_json) == {"step": 3}

    await peer.send_result("r3", [5, 6, 7], True)
    (result,) = classic_server.received["SendResult"]
    assert (result.request_id, list(result.result), result.is_finished) == ("r3", [5, 6, 7], True)

    await peer.send_opaque_status("r4", '{"type": "node_status"}')
    (status,) = classic_server.received["SendOpaqueStatus"]
    assert (status.request_id, status.status) == ("r4", '{"type": "node_status"}')

    topology = await peer.collect_topology({"rust"}, 3)
    (collect,) = classic_server.received["CollectTopology"]
    assert (list(collect.visited), collect.max_depth) == (["rust"], 3)
    capabilities = topology.nodes["classic"]
    assert (capabilities.model, capabilities.chip, capabilities.memory) == ("Classic Box", "CPU", 8192)
    assert (capabilities.flops.fp32, capabilities.flops.fp16, capabilities.flops.int8) == (1.5, 3.0, 6.0)
    assert [(c.to_id, c.description) for c in topology.peer_graph["classic"]] == [("rust", "MAN")]


async def test_a_failing_or_vanished_classic_server_fails_the_call_alone(
    classic_server: ClassicServer,
) -> None:
    peer = _handle(classic_server.port)
    shard = Shard("dummy", 0, 7, 8)
    with pytest.raises(PeerError, match=r"SendTensor to classic@127\.0\.0\.1:.*engine raised"):
        await peer.send_tensor(shard, np.zeros((1, 1, 4), dtype=np.float32), "fail")
    # The same connection still serves the next call.
    await peer.send_tensor(shard, np.zeros((1, 1, 4), dtype=np.float32), "ok")
    assert [r.request_id for r in classic_server.received["SendTensor"]] == ["fail", "ok"]

    await classic_server.server.stop(grace=None)
    assert not await asyncio.wait_for(peer.health_check(), 5)
    assert not await peer.is_connected()
    with pytest.raises(PeerError, match="SendResult to classic"):
        await asyncio.wait_for(peer.send_result("r", [1], False), 20)
