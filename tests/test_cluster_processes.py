"""Nodes in separate processes: a 3-node ring gives a single node's greedy tokens, a node
killed mid-generation fails the request within seconds, and a restarted node rejoins."""

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from exo.errors import PeerError
from exo.helpers import find_available_port
from exo.inference.candle import CandleInferenceEngine
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.orchestration.node import Node
from exo.testing.synth import write_model
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES
from support.cluster import FixedDiscovery, wait_for_ring, whole_model

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model("tiny-llama", tmp_path_factory.mktemp("tiny-llama"), dtype="f32", seed=0)


def _spawn(node_id: str, port: int, peers: dict[str, int]) -> subprocess.Popen:
    args = [sys.executable, str(HERE / "support" / "node_process.py"), node_id, str(port), "candle"]
    args += [f"{peer}={peer_port}" for peer, peer_port in peers.items()]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, env=env, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


async def test_three_processes_then_one_killed_then_restarted(model: Path) -> None:
    ports = {name: find_available_port("127.0.0.1") for name in ("a", "b", "c")}
    processes = {
        name: _spawn(name, ports[name], {p: port for p, port in ports.items() if p != name}) for name in ("b", "c")
    }
    discovery = FixedDiscovery()
    discovery.peers = [GRPCPeerHandle(n, f"127.0.0.1:{ports[n]}", "test", UNKNOWN_DEVICE_CAPABILITIES) for n in "bc"]
    node = Node("a", None, CandleInferenceEngine(), discovery, None, max_generate_tokens=100_000)
    node.server = GRPCServer(node, "127.0.0.1", ports["a"])
    try:
        await node.start()
        base = whole_model(model)
        alone = CandleInferenceEngine()
        single = []
        prompt = "Who are you?"
        logits, _ = await alone.infer_prompt("single", base, prompt)
        for _ in range(12):
            token = int((await alone.sample(logits))[0])
            single.append(token)
            logits, _ = await alone.infer_tensor("single", base, [[token]])
        await wait_for_ring(node, 3)
        assert [t async for t in node.generate(base, prompt, max_tokens=12)] == single

        stream = node.generate(base, prompt, max_tokens=100_000)
        for _ in range(3):
            await stream.__anext__()
        processes["b"].send_signal(signal.SIGKILL)
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        with pytest.raises(PeerError):
            async for _ in stream:
                pass
        assert loop.time() - killed_at < 8
        await wait_for_ring(node, 2)
        assert [t async for t in node.generate(base, prompt, max_tokens=12)] == single

        processes["b"].wait()
        processes["b"] = _spawn("b", ports["b"], {p: port for p, port in ports.items() if p != "b"})
        await wait_for_ring(node, 3)
        assert [t async for t in node.generate(base, prompt, max_tokens=12)] == single
    finally:
        await node.stop()
        for process in processes.values():
            process.kill()
            process.wait()
