"""Runs `exo.main` with stand-ins for the node, gRPC server, peer handle and discovery (printing their lifecycle).

The stand-in node generates with the real engine exo.main builds, so the CLI, API and engine run for real; only
the cluster layer is faked. Usage: python cli_with_fake_cluster.py [exo.main arguments...]
"""

import sys
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exo.inference.tokenizers import resolve_tokenizer
from support.fake_node import EngineNode


def say(message: str) -> None:
    print(message, flush=True)


class FakeClusterNode(EngineNode):
    """exo classic's Node constructor over `EngineNode`; the tokenizer is resolved from the model on first use."""

    def __init__(self, _id: str, server: Any, inference_engine: Any, discovery: Any, shard_downloader: Any, **kw: Any):
        super().__init__(inference_engine, None, node_id=_id)
        self.server = server
        self.inference_engine = inference_engine
        self.discovery = discovery
        self.shard_downloader = shard_downloader
        self.topology_viz = kw.get("topology_viz")
        self.max_generate_tokens = kw.get("max_generate_tokens", 1024)

    async def start(self, wait_for_peers: int = 0) -> None:
        await self.discovery.start()
        await self.server.start()
        say(f"node {self.id} started (wait_for_peers={wait_for_peers})")

    async def stop(self) -> None:
        await self.discovery.stop()
        await self.server.stop()
        say(f"node {self.id} stopped")

    async def _tokens(self, request_id, shard, prompt, *rest):
        if self.tokenizer is None:
            self.tokenizer = await resolve_tokenizer(shard.model_id)
        async for token in super()._tokens(request_id, shard, prompt, *rest):
            yield token


class FakeServer:
    def __init__(self, node: Any, host: str, port: int, cluster_key: str | None = None) -> None:
        self.address = f"{host}:{port}"

    async def start(self) -> None:
        say(f"server started on {self.address}")

    async def stop(self) -> None:
        say("server stopped")


class FakeDiscovery:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.kind = type(self).__name__

    async def start(self) -> None:
        say(f"{self.kind} started")

    async def stop(self) -> None:
        say(f"{self.kind} stopped")


class UDPDiscovery(FakeDiscovery):
    pass


class ManualDiscovery(FakeDiscovery):
    pass


class TailscaleDiscovery(FakeDiscovery):
    pass


def install(name: str, **attributes: Any) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


install("exo.orchestration.node", Node=FakeClusterNode)
install("exo.networking.grpc.grpc_server", GRPCServer=FakeServer)
install("exo.networking.grpc.grpc_peer_handle", GRPCPeerHandle=object)
install("exo.networking.udp.udp_discovery", UDPDiscovery=UDPDiscovery)
install("exo.networking.manual.manual_discovery", ManualDiscovery=ManualDiscovery)
install("exo.networking.tailscale.tailscale_discovery", TailscaleDiscovery=TailscaleDiscovery)

from exo.main import run  # noqa: E402

sys.exit(run(sys.argv[1:]))
