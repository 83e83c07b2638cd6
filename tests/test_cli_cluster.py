"""`python -m exo.main` as two real node processes (real Node and gRPC; discovery a fixed peer list, see
tests/scripts/cli_with_fixed_peers.py): the cluster forms, answers through either node's API like one node,
and both processes shut down cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai

from exo.helpers import find_available_port

SCRIPT = Path(__file__).parent / "scripts" / "cli_with_fixed_peers.py"
MESSAGES = [{"role": "user", "content": "Hello, cluster!"}]


def start(node_id: str, node_port: int, api_port: int, peers: str, model: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "EXO_TEST_PEERS": peers, "EXO_ENGINE": "candle"}
    args = [
        sys.executable, str(SCRIPT), "--node-id", node_id, "--node-host", "127.0.0.1",
        "--node-port", str(node_port), "--chatgpt-api-port", str(api_port),
        "--default-model", str(model), "--disable-tui", *extra,
    ]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.loads(r.read())


def wait_for(condition, process: subprocess.Popen, what: str, limit: float = 90):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited while waiting for {what}: {process.communicate()[0]}"
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"never saw {what}")


def ask(api_port: int, model: Path, **kwargs) -> str:
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="unused", max_retries=0)
    return (
        c.chat.completions.create(model=str(model), messages=MESSAGES, max_tokens=16, **kwargs)
        .choices[0]
        .message.content
    )


def stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out
    return out


def test_two_node_processes_form_a_cluster(model_dir: Path) -> None:
    solo_port, solo_api = find_available_port("127.0.0.1"), find_available_port("127.0.0.1")
    solo = start("solo", solo_port, solo_api, "", model_dir)
    try:
        wait_for(lambda: get_json(f"http://127.0.0.1:{solo_api}/healthcheck"), solo, "the solo API")
        expected = ask(solo_api, model_dir)
    finally:
        stop(solo)

    pa, pb = find_available_port("127.0.0.1"), find_available_port("127.0.0.1")
    api_a, api_b = find_available_port("127.0.0.1"), find_available_port("127.0.0.1")
    a = start("a", pa, api_a, f"b@127.0.0.1:{pb}", model_dir)
    b = start("b", pb, api_b, f"a@127.0.0.1:{pa}", model_dir)
    outputs = {}
    try:
        for process, port in ((a, api_a), (b, api_b)):
            wait_for(lambda p=port: len(get_json(f"http://127.0.0.1:{p}/topology")["nodes"]) == 2, process, "2 nodes")
        # Each node announces its limits to the other, and `/topology` shows them under the peer.
        for process, port, peer in ((a, api_a, "b"), (b, api_b, "a")):
            wait_for(
                lambda p=port, n=peer: (
                    get_json(f"http://127.0.0.1:{p}/topology")["nodes"][n].get("limits", {}).get("max_kv_cache_gb", 0)
                    > 0
                ),
                process,
                f"{peer}'s limits",
            )
        assert ask(api_a, model_dir) == expected
        assert ask(api_b, model_dir, stream=False) == expected
    finally:
        outputs = {"a": stop(a), "b": stop(b)}
    for out in outputs.values():
        assert "discovery started" in out and "discovery stopped" in out
