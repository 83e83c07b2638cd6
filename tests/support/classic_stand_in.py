"""A stand-in for an exo classic node on Linux with the dummy engine, holding the first layers of a two-node ring:
a grpcio asyncio server built from the proto with classic's server options, that fails exactly where classic fails.

What it copies of classic (exo/orchestration/node.py, exo/networking/grpc at commit 5f18faec1):
- `SendPrompt` and `SendTensor` answer once the node's own step is done; the step's result goes on to the next node
  in a task of its own (`asyncio.create_task(forward_tensor(...))`), so a failure there reaches no caller.
- The state it received goes along with that result, and on a machine without MLX classic's `GRPCPeerHandle`
  cannot serialize a state with any entry (`isinstance(v, mx.array)` with `mx` being numpy, whose `array` is not a
  type): the task raises and the request is dropped without a word. An empty state passes.
- Its dummy engine passes the tokens of a non-last shard on unchanged, as a prompt the token `[[1]]`.
- When it sees a request start (`start_process_prompt`) it loads its shard; tinygrad's load holds its event loop,
  so nothing it serves answers meanwhile (`loading_seconds`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import grpc

# exo classic's server options (exo/networking/grpc/grpc_server.py).
CLASSIC_SERVER_OPTIONS = [
    ("grpc.max_metadata_size", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_time_between_pings_ms", 10000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.max_concurrent_streams", 100),
    ("grpc.tcp_nodelay", 1),
    ("grpc.keepalive_permit_without_calls", 1),
]


def state_entries(state: Any) -> list[str]:
    """The names of what an `InferenceState` message holds (classic's deserialized dict's keys)."""
    names = list(state.tensor_data) + list(state.tensor_list_data)
    if state.other_data_json:
        names += list(json.loads(state.other_data_json))
    return names


@dataclass
class ClassicStandIn:
    """The stand-in's server and what happened to it; the test flips `forwards` and `loading_seconds`."""

    pb: ModuleType
    pb_grpc: ModuleType
    node_id: str
    memory_mb: int
    next_address: str
    port: int = 0
    #: False: every step's result is lost after the call returned, as when classic's forwarding task raises.
    forwards: bool = True
    #: How long the next `start_process_prompt` blocks the event loop (a synchronous weight load); used once.
    loading_seconds: float = 0.0
    #: The states of every `SendPrompt` and `SendTensor`, as received.
    states: list[Any] = field(default_factory=list)
    #: Why each dropped request was dropped.
    dropped: list[str] = field(default_factory=list)
    statuses: list[dict[str, Any]] = field(default_factory=list)
    #: The forwarding tasks under way (classic keeps no reference; here they are kept so none is collected).
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def step_done(self, shard: Any, tokens: Any, request_id: str, state: Any) -> None:
        """What classic does after its step: forwards the result in a task nobody awaits."""
        task = asyncio.create_task(self.forward(shard, tokens, request_id, state))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def forward(self, shard: Any, tokens: Any, request_id: str, state: Any) -> None:
        """Classic's `forward_tensor` task: hands the step's result to the next node, or drops it as classic does."""
        entries = state_entries(state)
        if entries:
            self.dropped.append(f"{request_id}: isinstance() arg 2 must be a type (state holds {entries})")
            return
        if not self.forwards:
            self.dropped.append(f"{request_id}: forwarding failed")
            return
        next_shard = self.pb.Shard(
            model_id=shard.model_id,
            start_layer=shard.end_layer + 1,
            end_layer=shard.n_layers - 1,
            n_layers=shard.n_layers,
        )
        request = self.pb.TensorRequest(
            shard=next_shard, tensor=tokens, request_id=request_id, inference_state=self.pb.InferenceState()
        )
        async with grpc.aio.insecure_channel(self.next_address) as channel:
            await self.pb_grpc.NodeServiceStub(channel).SendTensor(request)

    def servicer(self) -> Any:
        stand_in, pb = self, self.pb

        class ClassicServicer(self.pb_grpc.NodeServiceServicer):  # type: ignore[name-defined]
            async def SendPrompt(self, request: Any, context: Any) -> Any:
                stand_in.states.append(request.inference_state)
                prompt_token = pb.Tensor(tensor_data=(1).to_bytes(8, "little"), shape=[1, 1], dtype="int64")
                stand_in.step_done(request.shard, prompt_token, request.request_id, request.inference_state)
                return pb.Tensor()

            async def SendTensor(self, request: Any, context: Any) -> Any:
                stand_in.states.append(request.inference_state)
                stand_in.step_done(request.shard, request.tensor, request.request_id, request.inference_state)
                return pb.Tensor()

            async def SendOpaqueStatus(self, request: Any, context: Any) -> Any:
                status = json.loads(request.status)
                stand_in.statuses.append(status)
                if status.get("status") == "start_process_prompt" and stand_in.loading_seconds > 0:
                    seconds, stand_in.loading_seconds = stand_in.loading_seconds, 0.0
                    time.sleep(seconds)  # noqa: ASYNC251 -- the event loop is held, as tinygrad's load holds classic's
                return pb.Empty()

            async def SendResult(self, request: Any, context: Any) -> Any:
                return pb.Empty()

            async def CollectTopology(self, request: Any, context: Any) -> Any:
                flops = pb.DeviceFlops(fp32=1.0, fp16=1.0, int8=1.0)
                capabilities = pb.DeviceCapabilities(
                    model="Classic Box", chip="CPU", memory=stand_in.memory_mb, flops=flops
                )
                return pb.Topology(nodes={stand_in.node_id: capabilities})

            async def HealthCheck(self, request: Any, context: Any) -> Any:
                return pb.HealthCheckResponse(is_healthy=True)

        return ClassicServicer()


@asynccontextmanager
async def serving(stand_in: ClassicStandIn) -> AsyncIterator[ClassicStandIn]:
    """Serves `stand_in` on a free loopback port (set on it) until the block ends."""
    server = grpc.aio.server(options=CLASSIC_SERVER_OPTIONS)
    stand_in.port = server.add_insecure_port("127.0.0.1:0")
    stand_in.pb_grpc.add_NodeServiceServicer_to_server(stand_in.servicer(), server)
    await server.start()
    try:
        yield stand_in
    finally:
        await server.stop(grace=None)
