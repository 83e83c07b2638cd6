"""exo.main end to end with the cluster layer stood in (tests/scripts/cli_with_fake_cluster.py): start-up,
`run MODEL --prompt`, serving the API, and a clean shutdown on SIGTERM and POST /quit."""

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

SCRIPT = Path(__file__).parent / "scripts" / "cli_with_fake_cluster.py"


def exo_main(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "EXO_ENGINE": "candle"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def wait_healthy(port: int, process: subprocess.Popen[str], limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=1) as r:
                if json.loads(r.read()) == {"status": "ok"}:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the API never became healthy")


def test_run_model_prompt_prints_the_answer(model_dir: Path) -> None:
    done = exo_main("run", str(model_dir), "--prompt", "Hello!", "--max-generate-tokens", "12")
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 0, out
    assert "Processing prompt: Hello!" in out
    assert "Generated 12 tokens" in out, out
    assert "tokens/s" in out
    assert "node" in out and "stopped" in out


def test_run_unknown_model_fails_clearly(model_dir: Path) -> None:
    done = exo_main("--run-model", "no-such-model", "--disable-tui")
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 2
    assert "The model 'no-such-model' does not exist" in out


def test_serves_the_api_and_stops_on_sigterm(model_dir: Path) -> None:
    port = find_available_port("127.0.0.1")
    process = exo_main(
        "--disable-tui", "--chatgpt-api-port", str(port), "--default-model", str(model_dir), "--node-id", "cli-node"
    )
    try:
        wait_healthy(port, process)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model=str(model_dir), messages=[{"role": "user", "content": "Hi"}], max_tokens=5
        )
        assert reply.usage.completion_tokens >= 1
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out
    for line in ("UDPDiscovery started", "node cli-node started", "UDPDiscovery stopped", "server stopped"):
        assert line in out, out
    assert out.index("node cli-node started") < out.index("node cli-node stopped")


def test_quit_route_shuts_down(model_dir: Path) -> None:
    port = find_available_port("127.0.0.1")
    process = exo_main("--disable-tui", "--chatgpt-api-port", str(port), "--default-model", str(model_dir))
    try:
        wait_healthy(port, process)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/quit", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=10) as r:
            assert json.loads(r.read()) == {"detail": "Quit signal received"}
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out
    assert "server stopped" in out


def test_manual_discovery_needs_a_config(model_dir: Path) -> None:
    done = exo_main("--discovery-module", "manual", "--disable-tui")
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 2
    assert "--discovery-config-path is required" in out
