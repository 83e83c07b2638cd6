"""Smoke test of the live Rich TUI in a real terminal (tmux)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "live_topology_viz.py"


@pytest.fixture
def tmux_session():
    """A tmux command on a server of this test's own (`-L`), and a session name: a shared server
    exits with its last session, and a test starting one meanwhile fails to reach it."""
    path = shutil.which("tmux")
    assert path, "tmux is required (scripts/check installs it)"
    name = f"exo-tui-{uuid.uuid4().hex[:8]}"
    tmux = [path, "-L", name]
    yield tmux, name
    subprocess.run([*tmux, "kill-server"], capture_output=True, check=False)


def capture(tmux: list[str], name: str) -> str:
    return subprocess.run([*tmux, "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout


def test_live_tui_draws_in_a_terminal(tmux_session) -> None:
    tmux, name = tmux_session
    command = f"{sys.executable} {SCRIPT}"
    subprocess.run([*tmux, "new-session", "-d", "-s", name, "-x", "130", "-y", "60", command], check=True)
    screen = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        screen = capture(tmux, name)
        if "to the end" in screen:
            break
        time.sleep(0.2)
    assert "Exo Cluster (2 nodes)" in screen, screen
    assert "MacBook Pro 16GB" in screen
    assert "GPU poor" in screen
    assert "Tell me about rings" in screen
    assert "follows them to the end" in screen, screen


def test_chat_tui_in_a_terminal(tmux_session, model_dir) -> None:
    """The framed header, `models`, an answer with its statistics, and a bare `exit`."""
    tmux, name = tmux_session
    script = Path(__file__).parent / "scripts" / "chat_tui_fake.py"
    command = f"{sys.executable} {script} {model_dir}"
    subprocess.run([*tmux, "new-session", "-d", "-s", name, "-x", "160", "-y", "50", command], check=True)
    screen = wait_for_screen(tmux, name, "you>")
    assert screen.lstrip().startswith("╭") and "exo terminal chat" in screen, screen
    assert "model NAME" in screen and "╰" in screen, screen
    subprocess.run([*tmux, "send-keys", "-t", name, "models", "Enter"], check=True)
    screen = wait_for_screen(tmux, name, "`model NAME` switches")
    assert "Models this node can run" in screen, screen
    assert "llama-3.2-1b" in screen, screen
    subprocess.run([*tmux, "send-keys", "-t", name, "Hello there", "Enter"], check=True)
    screen = wait_for_screen(tmux, name, "TFLOPS")
    assert "exo> Hello there, cluster!" in screen, screen
    assert "tokens/s | time to first token" in screen and "cluster ~2.00 TFLOPS" in screen, screen
    subprocess.run([*tmux, "send-keys", "-t", name, "exit", "Enter"], check=True)
    _wait_gone(tmux, name, "the chat did not exit on a bare exit")


def wait_for_screen(tmux: list[str], name: str, text: str, limit: float = 30) -> str:
    """The pane's contents once `text` shows (or when `limit` seconds have passed)."""
    screen = ""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        screen = capture(tmux, name)
        if text in screen:
            break
        time.sleep(0.1)
    return screen


def _wait_gone(tmux: list[str], name: str, what: str) -> None:
    deadline = time.monotonic() + 30
    while subprocess.run([*tmux, "has-session", "-t", name], capture_output=True, check=False).returncode == 0:
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_exo_main_tui_on_a_real_node_and_ctrl_c(tmux_session, model_dir) -> None:
    """`exo.main` with its topology TUI on a real node in a terminal; a request shows; Ctrl-C shuts it down."""
    from exo.helpers import find_available_port

    tmux, name = tmux_session
    script = Path(__file__).parent / "scripts" / "cli_with_fixed_peers.py"
    port = find_available_port("127.0.0.1")
    command = (
        f"EXO_ENGINE=candle {sys.executable} {script} --chatgpt-api-port {port} --default-model {model_dir} "
        "--node-host 127.0.0.1"
    )
    subprocess.run([*tmux, "new-session", "-d", "-s", name, "-x", "140", "-y", "60", command], check=True)
    screen = wait_for_screen(tmux, name, "Exo Cluster (1 node)")
    assert "Exo Cluster (1 node)" in screen, screen
    assert "GPU rich" in screen and f":{port}/v1/chat/completions" in screen, screen
    assert "[0.00-1.00]" in screen, screen
    body = json.dumps({"messages": [{"role": "user", "content": "Hello from tmux"}], "max_tokens": 8}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read())["usage"]["completion_tokens"] >= 1
    screen = wait_for_screen(tmux, name, "Hello from tmux")
    assert "Prompt and Output" in screen, screen
    assert "[0.00-1.00] layers 0-" in screen, screen
    subprocess.run([*tmux, "send-keys", "-t", name, "C-c"], check=True)
    _wait_gone(tmux, name, "exo.main did not exit on Ctrl-C")


def test_exo_main_chat_tui(tmux_session, model_dir) -> None:
    """`exo.main --chat-tui` in a terminal: the header names the model, `model NAME` switches, a question streams
    an answer and its statistics; a bare `quit` ends the process."""
    from exo.helpers import find_available_port

    tmux, name = tmux_session
    script = Path(__file__).parent / "scripts" / "cli_with_fake_cluster.py"
    port = find_available_port("127.0.0.1")
    command = (
        f"EXO_ENGINE=candle {sys.executable} {script} --chat-tui --chatgpt-api-port {port} "
        f"--default-model {model_dir} --max-generate-tokens 8"
    )
    subprocess.run([*tmux, "new-session", "-d", "-s", name, "-x", "200", "-y", "50", command], check=True)
    screen = wait_for_screen(tmux, name, "you>")
    assert f"Model: {model_dir}" in screen, screen
    subprocess.run([*tmux, "send-keys", "-t", name, "model no-such-model", "Enter"], check=True)
    subprocess.run([*tmux, "send-keys", "-t", name, "Hello there", "Enter"], check=True)
    screen = wait_for_screen(tmux, name, "error:")
    assert "no-such-model" in screen, screen
    subprocess.run([*tmux, "send-keys", "-t", name, f"model {model_dir}", "Enter"], check=True)
    subprocess.run([*tmux, "send-keys", "-t", name, "Hello again", "Enter"], check=True)
    screen = wait_for_screen(tmux, name, "tokens/s")
    assert "8 tokens" in screen and "(token limit)" in screen and "TFLOPS" in screen, screen
    subprocess.run([*tmux, "send-keys", "-t", name, "quit", "Enter"], check=True)
    _wait_gone(tmux, name, "the chat did not exit on a bare quit")
