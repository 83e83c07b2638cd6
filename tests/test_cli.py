"""The command line: classic's flags and defaults, engine choice, unsupported commands, progress throttling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exo import main as cli
from exo.app.engines import EngineChoice
from exo.errors import InvalidArgumentError
from exo.inference.inference_engine import get_inference_engine
from support.solo_cli import run_solo


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
    assert args.default_temp is None and cli.default_temperature(args) == 0.0
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
    assert cli.choose_engine(None, {}).name == ("mlx" if cli.mlx_available() else "candle")
    assert cli.choose_engine(None, {"EXO_ENGINE": "dummy"}) == EngineChoice("dummy")
    assert cli.choose_engine("candle", {"EXO_ENGINE": "dummy"}) == EngineChoice("candle")
    assert cli.choose_engine("CandleInferenceEngine", {}) == EngineChoice("candle")
    assert cli.choose_engine("DummyInferenceEngine", {}) == EngineChoice("dummy")
    assert cli.choose_engine("candle", {}).notice() is None
    assert cli.choose_engine(None, {"EXO_ENGINE": "rkllm"}) == EngineChoice("rkllm")
    assert cli.choose_engine("RKLLMInferenceEngine", {}) == EngineChoice("rkllm")
    with pytest.raises(
        cli.CliError, match="unknown inference engine 'jax'; choose one of: candle, mlx, rkllm, dummy, cpu"
    ):
        cli.choose_engine("jax", {})


CLASSIC_NAMES = [
    ("tinygrad", "exo classic's tinygrad engine"),
    ("torch", "xotorch's PyTorch engine"),
    ("PyTorch", "xotorch's PyTorch engine"),
    ("cpu", "a CPU engine"),
    ("TinygradDynamicShardInferenceEngine", "exo classic's tinygrad engine"),
    ("TorchDynamicShardInferenceEngine", "xotorch's PyTorch engine"),
    ("MLXDynamicShardInferenceEngine", "exo classic's MLX engine"),
    ("mlx", "exo classic's MLX engine"),
]


@pytest.mark.parametrize(("name", "what"), CLASSIC_NAMES)
def test_classic_and_xotorch_engine_names_run_candle(name: str, what: str) -> None:
    """From the flag or EXO_ENGINE alike; the notice names the engine asked for and the one used."""
    if "mlx" in name.lower() and cli.mlx_available():
        assert cli.choose_engine(name, {}) == EngineChoice("mlx")
        return
    for choice in (cli.choose_engine(name, {}), cli.choose_engine(None, {"EXO_ENGINE": name})):
        assert choice.name == "candle" and choice.stands_in_for == name
        assert choice.device == ("cpu" if name == "cpu" else None)
        assert choice.notice() == (
            f"Inference engine '{name}' ({what}) is not part of this build; "
            "using candle (CandleInferenceEngine) instead"
        )


def test_get_inference_engine_takes_classic_names() -> None:
    for name in ("tinygrad", "TorchDynamicShardInferenceEngine", "candle", "CandleInferenceEngine"):
        assert type(get_inference_engine(name, None)).__name__ == "CandleInferenceEngine"
    with pytest.raises(InvalidArgumentError, match="Unsupported inference engine: 'jax'"):
        get_inference_engine("jax", None)


@pytest.mark.parametrize(
    ("args", "env", "asked"),
    [
        (["--inference-engine", "torch"], {}, "torch"),
        (["--inference-engine", "tinygrad"], {}, "tinygrad"),
        (["--inference-engine", "cpu"], {}, "cpu"),
        ([], {"EXO_ENGINE": "pytorch"}, "pytorch"),
        ([], {"EXO_ENGINE": "TinygradDynamicShardInferenceEngine"}, "TinygradDynamicShardInferenceEngine"),
    ],
)
def test_classic_engine_names_run_a_model(
    tmp_path: Path, model_dir: Path, args: list[str], env: dict[str, str], asked: str
) -> None:
    """`python -m exo.main` as a real node: the notice, then the candle engine answers the prompt."""
    if asked == "cpu":
        env = {**env, "EXO_DEVICE": ""}  # the name picks the CPU unless --device or EXO_DEVICE names a device
    run = ["run", str(model_dir), "--prompt", "Hello!", "--max-generate-tokens", "4"]
    done = run_solo(tmp_path, *args, *run, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    notice = lines.index(next(line for line in lines if line.startswith(f"Inference engine '{asked}' (")))
    assert lines[notice].endswith("is not part of this build; using candle (CandleInferenceEngine) instead")
    assert lines[notice + 1].startswith("Using inference engine: CandleInferenceEngine (candle) on ")
    if asked == "cpu":
        assert lines[notice + 1].endswith(" on cpu")
    assert "Generated 4 tokens" in done.stdout


def test_help_names_the_classic_engines() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "exo.main", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    text = " ".join(done.stdout.split())
    assert "exo classic's and xotorch's engine names (tinygrad, torch, pytorch, cpu" in text
    assert "TEMPERATURE" in text


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
