"""Runs one node in its own process for fault tests: `python tests/support/node_process.py ID PORT
ENGINE [PEER_ID=PORT ...]`. Prints `ready` once serving and runs until killed."""

import asyncio
import sys

from exo.inference.candle import CandleInferenceEngine
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.orchestration.node import Node
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES
from support.cluster import FixedDiscovery


async def main(node_id: str, port: int, engine_name: str, peers: list[str]) -> None:
    discovery = FixedDiscovery()
    for peer in peers:
        peer_id, peer_port = peer.split("=")
        discovery.peers.append(GRPCPeerHandle(peer_id, f"127.0.0.1:{peer_port}", "test", UNKNOWN_DEVICE_CAPABILITIES))
    engine = CandleInferenceEngine() if engine_name == "candle" else DummyInferenceEngine()
    node = Node(node_id, None, engine, discovery, None, max_generate_tokens=100_000)
    node.server = GRPCServer(node, "127.0.0.1", port)
    await node.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]))
