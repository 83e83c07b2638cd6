"""The command line: classic's flags and defaults, engine choice, unsupported commands, progress throttling."""

from __future__ import annotations

import subprocess
import sys

import pytest

from exo import main as cli


def test_classic_defaults() -> None:
    args = cli.build_parser().parse_args([])
    assert args.command is None and args.model_name is None
    assert (args.node_host, args.node_port) == ("0.0.0.0", None)
    assert (args.listen_port, args.broadcast_port) == (5678, 5678)
    assert args.discovery_module == "udp"
    assert args.discovery_timeout == 30
    assert args.wait_for_peers == 0
    assert args.chatgpt_api_port == 52415
    assert args.chatgpt_api_response_timeout == 900
    assert args.max_generate_tokens == 10000
    assert args.max_parallel_downloads == 8
    assert args.inference_engine is None
    assert args.prompt == "Who are you?"
    assert args.default_temp == 0.0
    assert not args.chat_tui and not args.disable_tui and not args.download_quick_check


def test_run_command_and_flags_parse() -> None:
    args = cli.build_parser().parse_args(
        ["run", "llama-3.2-1b", "--prompt", "Hi", "--disable-tui", "--node-id-filter", "a,b", "--chat-tui"]
    )
    assert (args.command, args.model_name, args.prompt) == ("run", "llama-3.2-1b", "Hi")
    assert args.disable_tui and args.chat_tui and args.node_id_filter == "a,b"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--discovery-module", "carrier-pigeon"])


def test_engine_choice() -> None:
    assert cli.choose_engine(None, {}) == ("mlx" if cli.mlx_available() else "candle")
    assert cli.choose_engine(None, {"EXO_ENGINE": "dummy"}) == "dummy"
    assert cli.choose_engine("candle", {"EXO_ENGINE": "dummy"}) == "candle"
    with pytest.raises(cli.CliError, match="unknown inference engine 'tinygrad'"):
        cli.choose_engine("tinygrad", {})
    if not cli.mlx_available():
        with pytest.raises(cli.CliError, match="macOS build"):
            cli.choose_engine("mlx", {})


@pytest.mark.parametrize("command", ["train", "eval"])
def test_train_and_eval_say_they_are_unsupported(command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "exo.main", command, "llama-3.2-1b"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert f"'{command}' is not supported" in done.stderr


def test_mlx_off_mac_is_a_clear_error() -> None:
    if cli.mlx_available():
        assert cli.choose_engine("mlx", {}) == "mlx"
        return
    done = subprocess.run(
        [sys.executable, "-m", "exo.main", "--inference-engine", "mlx", "--disable-tui"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "mlx engine needs a macOS build" in done.stderr


def test_an_unknown_device_is_a_clear_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "exo.main", "--device", "tpu", "--disable-tui"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "EXO_DEVICE=tpu is not a device" in done.stderr


def test_help_lists_the_flags() -> None:
    done = subprocess.run([sys.executable, "-m", "exo.main", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for flag in (
        "--chatgpt-api-port",
        "--discovery-module",
        "--run-model",
        "--chat-tui",
        "--system-prompt",
        "--device",
    ):
        assert flag in done.stdout


def test_progress_broadcast_throttle() -> None:
    now = [0.0]
    throttle = cli.ProgressBroadcastThrottle(interval=0.2, clock=lambda: now[0])
    assert not throttle.should_send("m", "not_started")
    assert throttle.should_send("m", "in_progress")
    now[0] = 0.1
    assert not throttle.should_send("m", "in_progress")
    assert throttle.should_send("other", "in_progress")
    assert throttle.should_send("m", "complete")
    now[0] = 5.0
    assert not throttle.should_send("m", "complete")
    assert throttle.should_send("m", "in_progress")
    sent = 0
    for step in range(100):  # 10 s of events every 0.1 s: at most one every 0.2 s
        now[0] = 10.0 + step * 0.1
        sent += throttle.should_send("m", "in_progress")
    assert sent <= 50


def test_open_files_limit_is_raised() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        cli.raise_open_files_limit()
        raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert raised > min(256, hard) or hard <= 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
