"""`--cluster-key` with real node processes (`python -m exo.main`, candle on a synthetic model, UDP discovery on
loopback, all on one UDP port): two nodes with the key form a ring and answer; a node with another key and a keyless
pair hear their announcements but never join, and their direct gRPC calls are refused; the keyless pair still forms
its own ring as before. The key is never printed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import grpc
import openai
import pytest

from exo.errors import PeerError
from exo.helpers import find_available_port
from exo.main import build_parser
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES
from support.discovery_fakes import free_udp_port
from support.solo_cli import UNSET, run_solo

KEY = "the key of the ring under test"
OTHER_KEY = "a key of some other cluster"
#: Announcements go out every 2.5 s (classic's interval); a stranger would be in within a few.
ANNOUNCEMENT_ROUNDS = 4 * 2.5


@dataclass
class NodeProcess:
    node_id: str
    grpc_port: int
    api_port: int
    process: subprocess.Popen[str]
    output: str = ""

    def topology(self) -> set[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/topology", timeout=2) as reply:
            return set(json.loads(reply.read())["nodes"])

    def answer(self, model: Path) -> str:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.api_port}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Hello, ring!"}]
        reply = client.chat.completions.create(model=str(model), messages=messages, max_tokens=8, timeout=120)
        return reply.choices[0].message.content or ""


@contextmanager
def node(
    tmp_path: Path, node_id: str, udp_port: int, model: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[NodeProcess]:
    """One node process with UDP discovery on loopback; stopped with SIGTERM after, its output kept."""
    grpc_port, api_port = find_available_port("127.0.0.1"), find_available_port("127.0.0.1")
    command = [
        sys.executable, "-m", "exo.main", "--node-id", node_id, "--node-host", "127.0.0.1",
        "--node-port", str(grpc_port), "--chatgpt-api-port", str(api_port), "--listen-port", str(udp_port),
        "--broadcast-port", str(udp_port), "--interface-type-filter", "Loopback", "--default-model", str(model),
        "--inference-engine", "candle", "--disable-tui", *args,
    ]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k not in (*UNSET, "EXO_CLUSTER_KEY")}
    environ.update(EXO_HOME=str(tmp_path / node_id), **(env or {}))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ)
    handle = NodeProcess(node_id, grpc_port, api_port, process)
    try:
        yield handle
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            handle.output = process.communicate(timeout=60)[0]
        finally:
            if process.poll() is None:
                process.kill()


def wait_for(what: str, condition: Callable[[], bool], nodes: list[NodeProcess], limit: float = 90) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for n in nodes:
            assert n.process.poll() is None, f"{n.node_id} exited while waiting for {what}"
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"never saw {what}")


async def collect_topology(grpc_port: int, cluster_key: str | None) -> set[str]:
    peer = GRPCPeerHandle("a", f"127.0.0.1:{grpc_port}", "test", UNKNOWN_DEVICE_CAPABILITIES, cluster_key=cluster_key)
    return set((await peer.collect_topology(set(), 2)).nodes)


def refused_by_grpcio(stubs: tuple[ModuleType, ModuleType], grpc_port: int) -> list[grpc.StatusCode]:
    """The status codes of a classic (grpcio) client's keyless HealthCheck and CollectTopology."""
    pb, pb_grpc = stubs
    codes = []
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.NodeServiceStub(channel)
        calls = ((stub.HealthCheck, pb.HealthCheckRequest()), (stub.CollectTopology, pb.CollectTopologyRequest()))
        for call, request in calls:
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=5)
            codes.append(refused.value.code())
    return codes


def test_only_nodes_with_the_key_join_its_ring(
    tmp_path: Path, model_dir: Path, stubs: tuple[ModuleType, ModuleType]
) -> None:
    udp_port = free_udp_port()
    with ExitStack() as stack:

        def start(node_id: str, *args: str, env: dict[str, str] | None = None) -> NodeProcess:
            return stack.enter_context(node(tmp_path, node_id, udp_port, model_dir, *args, env=env))

        a = start("a", env={"EXO_CLUSTER_KEY": KEY})
        b = start("b", "--cluster-key", KEY)
        c = start("c", "--cluster-key", OTHER_KEY)
        d, e = start("d"), start("e")
        everyone = [a, b, c, d, e]
        wait_for("the keyed ring", lambda: a.topology() == b.topology() == {"a", "b"}, everyone)
        wait_for("the keyless ring", lambda: d.topology() == e.topology() == {"d", "e"}, everyone)
        assert a.answer(model_dir)
        assert d.answer(model_dir)

        time.sleep(ANNOUNCEMENT_ROUNDS)
        assert [n.topology() for n in everyone] == [{"a", "b"}, {"a", "b"}, {"c"}, {"d", "e"}, {"d", "e"}]
        assert refused_by_grpcio(stubs, a.grpc_port) == [grpc.StatusCode.UNAUTHENTICATED] * 2
        with pytest.raises(PeerError, match="Unauthenticated"):
            asyncio.run(collect_topology(a.grpc_port, OTHER_KEY))
        assert asyncio.run(collect_topology(a.grpc_port, KEY)) == {"a", "b"}
        assert asyncio.run(collect_topology(d.grpc_port, None)) == {"d", "e"}

    for n in everyone:
        assert KEY not in n.output and OTHER_KEY not in n.output, n.output
    for stranger in "cde":
        assert a.output.count(f"ignoring announcements of node {stranger} at 127.0.0.1") == 1, a.output
    assert a.output.count("refusing gRPC calls from 127.0.0.1") == 1, a.output
    # A keyless node meets keyed ones as peers that fail their health check; the keyed side logs it.
    assert "ignoring peer" not in d.output, d.output


def test_the_key_comes_from_the_flag_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXO_CLUSTER_KEY", raising=False)
    assert build_parser().parse_args([]).cluster_key is None
    monkeypatch.setenv("EXO_CLUSTER_KEY", KEY)
    assert build_parser().parse_args([]).cluster_key == KEY
    assert build_parser().parse_args(["--cluster-key", OTHER_KEY]).cluster_key == OTHER_KEY
    monkeypatch.setenv("EXO_CLUSTER_KEY", "")
    assert build_parser().parse_args([]).cluster_key is None


def test_a_short_cluster_key_stops_the_node_without_showing_it(tmp_path: Path) -> None:
    result = run_solo(tmp_path, "--inference-engine", "dummy", env={"EXO_CLUSTER_KEY": "tooshort123"})
    assert result.returncode == 2
    assert "exo: invalid argument: the cluster key must be at least 16 characters" in result.stderr, result.stderr
    assert "tooshort123" not in result.stdout + result.stderr
