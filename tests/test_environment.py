"""The environment variables exo's documentation names, through the real command line where they act on a node:
`DEBUG` (0-9), `DEBUG_DISCOVERY`, `VERBOSE`, `TEMPERATURE`, `EXO_HOME`, `HF_ENDPOINT` and `HF_HUB_OFFLINE`."""

from __future__ import annotations

import argparse
import json
import logging
import urllib.request
from pathlib import Path

import pytest

from exo import main as cli
from exo.download.new_shard_download import downloads_dir, exo_home
from exo.helpers import find_available_port
from exo.inference import tokenizers
from exo.settings import debug_level, env_temperature, logging_levels
from support.fake_hub import FakeHubServer
from support.solo_cli import run_solo, serving_solo

RUN = ("--max-generate-tokens", "4", "--prompt", "Hello!")


def test_debug_levels_map_to_logging_levels() -> None:
    assert [debug_level(n) for n in range(1, 10)] == [logging.INFO, logging.DEBUG, 9, 8, 7, 6, 5, 4, 3]
    quiet = logging_levels(0)
    assert quiet == {
        "": logging.WARNING,
        "exo": logging.WARNING,
        "xotorch_core": logging.WARNING,
        "exo.networking": logging.WARNING,
        "xotorch_core.net.discovery": logging.WARNING,
        "exo.tokenizer": logging.WARNING,
    }
    assert logging_levels(1)["xotorch_core"] == logging.INFO
    assert logging_levels(2)["exo"] == logging.DEBUG and logging_levels(2)[""] == logging.WARNING
    assert logging_levels(5)["exo"] == debug_level(5)
    assert logging_levels(9)[""] == logging.DEBUG and logging_levels(42)["exo"] == debug_level(9)
    discovery = logging_levels(0, debug_discovery=2)
    assert discovery["exo"] == logging.WARNING and discovery["xotorch_core.net.discovery"] == logging.DEBUG
    # DEBUG_DISCOVERY only ever adds: DEBUG=4 keeps discovery at 4 when DEBUG_DISCOVERY is lower.
    assert logging_levels(4, debug_discovery=1)["exo.networking"] == debug_level(4)
    verbose = logging_levels(0, verbose=True)
    assert verbose["exo.tokenizer"] == logging.DEBUG and verbose["exo"] == logging.WARNING
    assert logging_levels(5, verbose=True)["exo.tokenizer"] == debug_level(5)


# What `run` logs at each DEBUG level, as classic prints it: the port and home at 1, the prompt at 3, the tokenizer's
# resolution at 4.
LEVELED = {
    1: ("Using available port: ", "exo home directory: "),
    3: ("Prompt of ",),
    4: ("Resolving the tokenizer of",),
}


@pytest.mark.parametrize("level", [0, 1, 3, 4])
def test_debug_levels_on_the_command_line(tmp_path: Path, model_dir: Path, level: int) -> None:
    home = tmp_path / "home-of-exo"
    done = run_solo(tmp_path, "run", str(model_dir), *RUN, env={"DEBUG": str(level), "EXO_HOME": str(home)})
    assert done.returncode == 0, done.stdout + done.stderr
    for at, lines in LEVELED.items():
        for line in lines:
            assert (line in done.stderr) == (at <= level), f"DEBUG={level}, {line!r}:\n{done.stderr}"
    if level >= 1:
        assert f"exo home directory: {home}\n" in done.stderr
    assert home.is_dir()  # EXO_HOME is exo's home, created at start-up


def test_debug_discovery_logs_discovery_alone(tmp_path: Path, model_dir: Path) -> None:
    """A configured peer that does not answer is left out, and DEBUG_DISCOVERY says so; DEBUG's other lines stay
    off."""
    ghost = find_available_port("127.0.0.1")
    expected = f"configured peer ghost at 127.0.0.1:{ghost} failed its health check"
    loud = run_solo(tmp_path, "run", str(model_dir), *RUN, env={"DEBUG_DISCOVERY": "2"}, others={"ghost": ghost})
    assert loud.returncode == 0, loud.stdout + loud.stderr
    assert expected in loud.stderr, loud.stderr
    assert "Using available port" not in loud.stderr
    quiet = run_solo(tmp_path, "run", str(model_dir), *RUN, others={"ghost": ghost})
    assert quiet.returncode == 0 and expected not in quiet.stderr, quiet.stderr


def test_verbose_shows_the_tokenizer_and_each_token(tmp_path: Path, model_dir: Path) -> None:
    done = run_solo(tmp_path, "run", str(model_dir), *RUN, env={"VERBOSE": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"tokenizer of {model_dir} from {model_dir}: " in done.stderr, done.stderr
    assert "BOS '<|begin_of_text|>'" in done.stderr and "a chat template" in done.stderr
    assert done.stderr.count("exo.tokenizer: token ") == 4, done.stderr
    plain = run_solo(tmp_path, "run", str(model_dir), *RUN)
    assert "exo.tokenizer" not in plain.stderr, plain.stderr


def _parsed(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def test_temperature_is_the_default_temperature(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_temperature({}) is None and env_temperature({"TEMPERATURE": " "}) is None
    assert env_temperature({"TEMPERATURE": "0.7"}) == 0.7
    for bad in ("warm", "-1", "nan"):
        with pytest.raises(ValueError, match=f"TEMPERATURE must be a number at or above 0, not '{bad}'"):
            env_temperature({"TEMPERATURE": bad})
    monkeypatch.setenv("TEMPERATURE", "0.85")
    assert cli.default_temperature(_parsed()) == 0.85
    assert cli.default_temperature(_parsed("--default-temp", "0")) == 0.0  # the flag wins
    monkeypatch.setenv("TEMPERATURE", "warm")
    with pytest.raises(cli.CliError, match="TEMPERATURE must be a number at or above 0, not 'warm'"):
        cli.default_temperature(_parsed())


def test_a_bad_temperature_stops_the_command_line(tmp_path: Path, model_dir: Path) -> None:
    done = run_solo(tmp_path, "run", str(model_dir), *RUN, env={"TEMPERATURE": "-0.5"})
    assert done.returncode == 2
    assert "exo: TEMPERATURE must be a number at or above 0, not '-0.5'" in done.stderr


def _answer(url: str, model: Path, **sampling: object) -> str:
    body = {"model": str(model), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12, **sampling}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def test_temperature_samples_requests_that_set_none(tmp_path: Path, model_dir: Path) -> None:
    """With TEMPERATURE=2 a request without a temperature samples (two seeds, two answers); one that asks for 0 is
    greedy. Without TEMPERATURE every seed gives the greedy answer."""
    with serving_solo(tmp_path, env={"TEMPERATURE": "2"}) as (url, _):
        assert _answer(url, model_dir, seed=1) != _answer(url, model_dir, seed=2)
        assert _answer(url, model_dir, seed=1) == _answer(url, model_dir, seed=1)
        greedy = _answer(url, model_dir, temperature=0.0, seed=1)
        assert greedy == _answer(url, model_dir, temperature=0.0, seed=2)
    with serving_solo(tmp_path) as (url, _):
        assert _answer(url, model_dir, seed=1) == _answer(url, model_dir, seed=2) == greedy


def test_exo_home_holds_the_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As in classic: EXO_HOME is exo's home (default ~/.cache/exo) and models go to its `downloads` directory."""
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "mine"))
    assert exo_home() == tmp_path / "mine"
    assert downloads_dir() == tokenizers.downloads_dir() == tmp_path / "mine" / "downloads"
    monkeypatch.delenv("EXO_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert exo_home() == tmp_path / ".cache" / "exo"
    assert downloads_dir() == tmp_path / ".cache" / "exo" / "downloads"


@pytest.fixture
def private_hf(tmp_path: Path) -> dict[str, str]:
    """An empty Hugging Face cache and no token."""
    return {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_TOKEN": ""}


def test_hf_endpoint_and_exo_home_on_the_command_line(
    tmp_path: Path, model_dir: Path, private_hf: dict[str, str]
) -> None:
    """`run org/name` fetches the model from HF_ENDPOINT into $EXO_HOME/downloads."""
    home = tmp_path / "exo"
    with FakeHubServer() as hub:
        hub.add_repo("synth/tiny-llama", model_dir)
        env = {**private_hf, "HF_ENDPOINT": hub.url, "EXO_HOME": str(home)}
        done = run_solo(tmp_path, "run", "synth/tiny-llama", *RUN, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Generated 4 tokens" in done.stdout, done.stdout
        assert hub.fetched_weights()
    assert (home / "downloads" / "synth--tiny-llama" / "config.json").is_file()


def test_hf_hub_offline_on_the_command_line(tmp_path: Path, model_dir: Path, private_hf: dict[str, str]) -> None:
    """With HF_HUB_OFFLINE=1 a model that is not on disk fails naming it, and the hub hears nothing."""
    with FakeHubServer() as hub:
        hub.add_repo("synth/tiny-llama", model_dir)
        env = {**private_hf, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "1"}
        done = run_solo(tmp_path, "run", "synth/tiny-llama", *RUN, env=env)
        assert done.returncode != 0
        assert "synth/tiny-llama" in done.stderr and "offline" in done.stderr.lower(), done.stderr
        assert hub.requests == []
