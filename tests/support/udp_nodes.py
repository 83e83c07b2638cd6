"""Real `python -m exo.main` node processes that find each other by UDP discovery, as a user would run them: each
node with its own gRPC and API ports and a private `EXO_HOME`, every ring with a UDP port of its own (so rings of
different tests never meet). Nodes run on loopback unless a test places one on another `Host` (a network namespace,
see `support.netns`). Signals (SIGKILL, SIGSTOP, SIGCONT) go to one node; leaving the `udp_ring` block kills every
process it started, frozen ones included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from exo.helpers import find_available_port
from support.discovery_fakes import free_udp_port
from support.solo_cli import UNSET

#: How long a node may take to serve its API (Python start-up and the extension's import on a busy CPU).
START_LIMIT = 90.0


class Host:
    """Where a node runs: here, on loopback, in the test's own network namespace."""

    def __init__(self, address: str = "127.0.0.1", interface_type: str = "Loopback") -> None:
        #: The address its gRPC server binds, which its peers reach.
        self.address = address
        #: The interfaces its UDP discovery announces on and listens to.
        self.interface_type = interface_type

    def command(self, argv: list[str]) -> list[str]:
        """The command line that runs `argv` on this host."""
        return argv

    def reach(self, port: int) -> int:
        """The port on the test's loopback that reaches `port` on this host."""
        return port


LOOPBACK = Host()


class NodeProcess:
    """One node process; its output goes to `log` (a pipe would fill and stall it). `api_port` is where the test
    reaches its API, on the test's loopback."""

    def __init__(self, node_id: str, process: subprocess.Popen[bytes], api_port: int, grpc_port: int, log: Path):
        self.node_id = node_id
        self.process = process
        self.api_port = api_port
        self.grpc_port = grpc_port
        self.log = log

    @property
    def url(self) -> str:
        """The base URL of its HTTP API."""
        return f"http://127.0.0.1:{self.api_port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        """What the node logged so far."""
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the node vanishes without a word to its peers."""
        self.process.send_signal(signal.SIGCONT)
        self.process.kill()
        self.process.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: the node's sockets stay open and nothing answers."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `freeze`."""
        self.process.send_signal(signal.SIGCONT)

    def get_json(self, path: str, timeout: float = 3.0) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as response:
            return json.loads(response.read())

    def ring_size(self) -> int:
        """How many nodes its `/topology` holds, 0 when it does not answer."""
        try:
            return len(self.get_json("/topology")["nodes"])
        except (OSError, ValueError, KeyError):
            return 0

    def requests(self) -> list[dict[str, Any]]:
        """The requests running on it now (`GET /v1/requests`)."""
        return self.get_json("/v1/requests")["requests"]


class UdpRing:
    """Starts nodes that share one UDP discovery port; see the module docstring."""

    def __init__(self, directory: Path, model: Path) -> None:
        self.directory = directory
        self.model = model
        self.udp_port = free_udp_port()
        self.nodes: list[NodeProcess] = []

    def start(self, node_id: str, *args: str, grpc_port: int | None = None, host: Host = LOOPBACK) -> NodeProcess:
        """Starts node `node_id` on `host` (on `grpc_port`, else a free one) and waits until its API answers."""
        grpc_port = grpc_port or find_available_port("127.0.0.1")
        api_port = find_available_port("127.0.0.1")
        home = self.directory / f"home-{node_id}"
        home.mkdir(parents=True, exist_ok=True)
        log = self.directory / f"{node_id}-{len(self.nodes)}.log"
        command = [
            sys.executable, "-m", "exo.main", "--node-id", node_id, "--node-host", host.address,
            "--node-port", str(grpc_port), "--chatgpt-api-port", str(api_port),
            "--listen-port", str(self.udp_port), "--broadcast-port", str(self.udp_port),
            "--interface-type-filter", host.interface_type, "--discovery-timeout", "5",
            "--default-model", str(self.model), "--disable-tui", *args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in UNSET}
        env.update({"EXO_HOME": str(home), "EXO_ENGINE": "candle"})
        reached_at = host.reach(api_port)
        with log.open("wb") as out:
            process = subprocess.Popen(host.command(command), stdout=out, stderr=subprocess.STDOUT, env=env)
        node = NodeProcess(node_id, process, reached_at, grpc_port, log)
        self.nodes.append(node)
        self._wait(lambda: _answers(node), node, "its API", START_LIMIT)
        return node

    def wait_for_ring(self, nodes: list[NodeProcess], limit: float = 60.0) -> None:
        """Waits until each of `nodes` sees exactly those nodes in its `/topology`."""
        for node in nodes:
            self._wait(lambda n=node: n.ring_size() == len(nodes), node, f"a ring of {len(nodes)}", limit)

    def close(self) -> None:
        """Kills every node started here; none is left behind, frozen or not."""
        for node in self.nodes:
            if node.alive():
                node.kill()

    @staticmethod
    def _wait(condition: Any, node: NodeProcess, what: str, limit: float) -> None:
        deadline = time.monotonic() + limit
        while not condition():
            assert node.alive(), f"node {node.node_id} exited waiting for {what}:\n{node.output()}"
            assert time.monotonic() < deadline, f"node {node.node_id} never showed {what}:\n{node.output()}"
            time.sleep(0.2)


def _answers(node: NodeProcess) -> bool:
    try:
        with urllib.request.urlopen(f"{node.url}/healthcheck", timeout=1):
            return True
    except (OSError, urllib.error.URLError):
        return False


@contextmanager
def udp_ring(directory: Path, model: Path) -> Iterator[UdpRing]:
    """A `UdpRing` whose processes are all killed when the block ends."""
    ring = UdpRing(directory, model)
    try:
        yield ring
    finally:
        ring.close()
