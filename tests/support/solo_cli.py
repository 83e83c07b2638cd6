"""`python -m exo.main` as one real node in a subprocess: manual discovery with a config listing only itself (so no
UDP and no peers), its gRPC server (on a port it picks) and API on loopback, and a private `EXO_HOME`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from exo.helpers import find_available_port

NODE_ID = "solo"
#: Variables a test sets itself; the environment the tests run in does not pass them on.
UNSET = ("EXO_ENGINE", "DEBUG", "DEBUG_DISCOVERY", "VERBOSE", "TEMPERATURE", "EXO_MAX_CONTEXT", "EXO_MAX_KV_CACHE_GB")


def manual_config(path: Path, node_port: int, others: Mapping[str, int] | None = None) -> Path:
    """A manual discovery config holding this node and `others` (peer id → port), all on 127.0.0.1."""
    flops = {"fp32": 0, "fp16": 0, "int8": 0}
    caps = {"model": "Unknown Model", "chip": "Unknown Chip", "memory": 0, "flops": flops}
    ports = {NODE_ID: node_port, **(others or {})}
    peers = {peer: {"address": "127.0.0.1", "port": port, "device_capabilities": caps} for peer, port in ports.items()}
    path.write_text(json.dumps({"peers": peers}))
    return path


def solo_command(
    tmp_path: Path, args: tuple[str, ...], env: Mapping[str, str] | None, others: Mapping[str, int] | None
) -> tuple[list[str], dict[str, str], int]:
    """The command line, environment and API port of a lone node."""
    # Manual discovery leaves this node's own entry out, whatever its port.
    config = manual_config(tmp_path / "solo-network.json", find_available_port("127.0.0.1"), others)
    api_port = find_available_port("127.0.0.1")
    command = [
        sys.executable, "-m", "exo.main", "--node-id", NODE_ID, "--node-host", "127.0.0.1",
        "--chatgpt-api-port", str(api_port), "--discovery-module", "manual",
        "--discovery-config-path", str(config), "--disable-tui", *args,
    ]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in UNSET}
    base.setdefault("EXO_HOME", str(tmp_path / "exo-home"))
    return command, {**base, **(env or {})}, api_port


def run_solo(
    tmp_path: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    others: Mapping[str, int] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Runs `python -m exo.main ARGS` as a lone node and waits for it to exit. `env` is added to a copy of this
    process's environment, which passes on none of `UNSET`."""
    command, environ, _ = solo_command(tmp_path, args, env, others)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environ)


def wait_until_healthy(url: str, process: subprocess.Popen[str], output: Callable[[], str], limit: float) -> None:
    """Waits for the API at `url` to answer its health check; fails with the node's `output` if `process` exits."""
    deadline = time.monotonic() + limit
    while True:
        assert process.poll() is None, output()
        assert time.monotonic() < deadline, "the API never became healthy"
        try:
            with urllib.request.urlopen(f"{url}/healthcheck", timeout=1):
                return
        except OSError:
            time.sleep(0.2)


@contextmanager
def serving_solo(
    tmp_path: Path, *args: str, env: Mapping[str, str] | None = None, limit: float = 90
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A lone node serving its API: yields the API's base URL and the process, which is stopped (SIGTERM) after."""
    command, environ, api_port = solo_command(tmp_path, args, env, None)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ)
    url = f"http://127.0.0.1:{api_port}"
    try:
        wait_until_healthy(url, process, lambda: process.communicate()[0], limit)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.communicate(timeout=60)
            finally:
                if process.poll() is None:
                    process.kill()
