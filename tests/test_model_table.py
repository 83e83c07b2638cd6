"""The model table edited from Python, as exo classic's users edit `exo/models.py`: an entry set in
`exo.models.model_cards` (added, or replacing a built-in one) is what the registry, downloads, the API's model list
and a node use; deleting one removes the model; `reset_model_cards` brings back the built-in table; a malformed
entry is refused with an error naming the id and the field."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from exo import _core, models
from exo.download.new_shard_download import HfShardDownloader, seed_models
from exo.errors import InvalidConfigError
from exo.inference.shard import Shard
from exo.inference.tokenizers import Tokenizer
from exo.testing.synth import write_model
from support.app_harness import Served, reply_tokens, serve
from support.fake_hub import FakeHubServer
from support.fake_node import FakeNode
from support.solo_cli import solo_command

MLX = "MLXDynamicShardInferenceEngine"
TINYGRAD = "TinygradDynamicShardInferenceEngine"
CANDLE = "CandleInferenceEngine"
# An entry as classic's users write one.
MY_MODEL = {"layers": 32, "repo": {MLX: "my-org/My-Model-4bit", TINYGRAD: "my-org/My-Model"}}


@pytest.fixture(autouse=True)
def built_in_table() -> Iterator[None]:
    """Every test starts from, and leaves, the built-in table."""
    models.reset_model_cards()
    yield
    models.reset_model_cards()


def test_an_added_entry_is_seen_by_every_lookup() -> None:
    models.model_cards["my-model"] = MY_MODEL
    models.pretty_name["my-model"] = "My Model"
    assert models.get_repo("my-model", MLX) == "my-org/My-Model-4bit"
    assert models.get_repo("my-model", TINYGRAD) == "my-org/My-Model"
    # Candle loads the MLX repository, as it does for the built-in cards.
    assert models.get_repo("my-model", CANDLE) == "my-org/My-Model-4bit"
    assert models.unavailable_reason("my-model", "candle") is None
    assert models.build_base_shard("my-model", CANDLE) == Shard("my-model", 0, 0, 32)
    assert models.build_full_shard("my-model", CANDLE) == Shard("my-model", 0, 31, 32)
    assert models.get_supported_models()[-1] == "my-model"
    assert "my-model" in models.get_supported_models([["candle"], [TINYGRAD]])
    assert "my-model" not in models.get_supported_models([["dummy"]])
    assert models.get_pretty_name("my-model") == "My Model"
    assert _core.model_cards()["my-model"]["layers"] == 32
    assert models.model_cards["my-model"] == MY_MODEL


def test_an_entry_with_its_own_candle_repository_and_unknown_engines() -> None:
    # Unknown engine class names are kept, as classic keeps them (and lists the model for them).
    models.model_cards["mine"] = {"layers": 4, "repo": {CANDLE: "org/candle", "MyEngine": "org/mine"}}
    assert models.get_repo("mine", CANDLE) == "org/candle"
    assert models.get_repo("mine", "MyEngine") == "org/mine"
    assert models.get_supported_models([["MyEngine"]]) == ["mine"]
    assert models.get_repo("mine", MLX) is None


def test_replacing_a_built_in_entry_and_deleting_entries() -> None:
    models.model_cards["llama-3.2-1b"] = {"layers": 4, "repo": {MLX: "org/other"}}
    assert models.get_repo("llama-3.2-1b", CANDLE) == "org/other"
    assert models.get_repo("llama-3.2-1b", TINYGRAD) is None
    assert models.build_base_shard("llama-3.2-1b", CANDLE) == Shard("llama-3.2-1b", 0, 0, 4)
    assert models.get_supported_models().index("llama-3.2-1b") == 1  # in place, as in a dict
    del models.model_cards["llama-3.2-1b"]
    assert "llama-3.2-1b" not in models.model_cards
    assert models.get_repo("llama-3.2-1b", CANDLE) is None
    assert "llama-3.2-1b" not in models.get_supported_models()
    reason = models.unavailable_reason("llama-3.2-1b", "candle")
    assert reason is not None and reason.startswith("The model 'llama-3.2-1b' does not exist for the candle engine")
    models.model_cards["my-model"] = MY_MODEL
    assert models.model_cards.pop("my-model") == MY_MODEL
    assert models.get_repo("my-model", CANDLE) is None
    models.reset_model_cards()
    assert models.get_repo("llama-3.2-1b", CANDLE) == "mlx-community/Llama-3.2-1B-Instruct-4bit"
    assert models.model_cards["llama-3.2-1b"]["layers"] == 16
    assert models.get_supported_models()[1] == "llama-3.2-1b"


def test_a_built_in_entry_set_again_keeps_its_architecture() -> None:
    # deepseek-v3 is a deepseek_v3 model: setting its own entry again (or naming it) does not make candle take it.
    models.model_cards["deepseek-v3"] = dict(models.model_cards["deepseek-v3"])
    models.pretty_name["deepseek-v3"] = "DeepSeek V3"
    assert models.get_repo("deepseek-v3", CANDLE) is None
    assert models.get_pretty_name("deepseek-v3") == "DeepSeek V3"
    reason = models.unavailable_reason("deepseek-v3", "candle")
    assert reason is not None and "is a deepseek_v3 model" in reason


def test_dict_methods_keep_the_registry_in_step() -> None:
    cards = models.model_cards
    assert isinstance(cards, dict)
    cards.update({"a-model": MY_MODEL}, b_model={"layers": 2, "repo": {MLX: "org/b"}})
    assert models.get_repo("b_model", CANDLE) == "org/b"
    assert cards.setdefault("a-model", {"layers": 1, "repo": {MLX: "x/y"}})["layers"] == 32
    cards |= {"c-model": {"layers": 3, "repo": {MLX: "org/c"}}}
    assert models.build_base_shard("c-model", CANDLE) == Shard("c-model", 0, 0, 3)
    assert cards.popitem()[0] == "c-model" and models.get_repo("c-model", CANDLE) is None
    assert cards.pop("nope", None) is None
    with pytest.raises(KeyError):
        cards.pop("nope")
    cards.clear()
    assert models.get_supported_models() == [] and models.get_repo("llama-3.2-1b", CANDLE) is None
    models.reset_model_cards()
    assert len(models.get_supported_models()) == len(models.model_cards) > 50


def test_an_entry_is_changed_as_a_whole_and_copies_are_plain_dicts() -> None:
    with pytest.raises(TypeError, match=r"model_cards\[model_id\] = "):
        models.model_cards["llama-3.2-1b"]["layers"] = 4
    with pytest.raises(TypeError):
        models.model_cards["llama-3.2-1b"]["repo"][MLX] = "org/other"
    assert models.get_repo("llama-3.2-1b", MLX) == "mlx-community/Llama-3.2-1B-Instruct-4bit"
    for copied in (copy.deepcopy(models.model_cards), pickle.loads(pickle.dumps(models.model_cards))):
        assert type(copied) is dict and copied == models.model_cards
        copied["llama-3.2-1b"]["layers"] = 4  # a copy is the caller's, the registry is untouched
    assert json.loads(json.dumps(models.model_cards))["llama-3.2-1b"]["layers"] == 16


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"repo": {MLX: "org/m"}}, "model card 'bad': layers must be a positive int, not None"),
        ({"layers": 0, "repo": {MLX: "org/m"}}, "model card 'bad': layers must be a positive int, not 0"),
        ({"layers": "16", "repo": {MLX: "org/m"}}, "model card 'bad': layers must be a positive int, not '16'"),
        ({"layers": True, "repo": {MLX: "org/m"}}, "model card 'bad': layers must be a positive int, not True"),
        ({"layers": 16}, "model card 'bad': repo must be a non-empty dict"),
        ({"layers": 16, "repo": "org/m"}, "model card 'bad': repo must be a non-empty dict"),
        ({"layers": 16, "repo": {}}, "model card 'bad': repo must be a non-empty dict"),
        ({"layers": 16, "repo": {MLX: ""}}, f"model card 'bad': repo['{MLX}'] must map an engine class name"),
        ({"layers": 16, "repo": {MLX: 3}}, f"model card 'bad': repo['{MLX}'] must map"),
        (["layers", 16], "model card 'bad' must be a dict with 'layers' and 'repo', not list"),
    ],
)
def test_a_malformed_entry_is_refused_naming_the_id_and_the_field(entry: object, message: str) -> None:
    with pytest.raises(InvalidConfigError) as raised:
        models.model_cards["bad"] = entry  # type: ignore[assignment]
    assert str(raised.value).startswith(message), raised.value
    assert "bad" not in models.model_cards and models.get_repo("bad", MLX) is None
    assert isinstance(raised.value, ValueError)


def test_malformed_ids_and_names_are_refused() -> None:
    with pytest.raises(InvalidConfigError, match="id must be a non-empty str"):
        models.model_cards[""] = MY_MODEL
    with pytest.raises(InvalidConfigError, match=r"pretty_name\['llama-3.2-1b'\] must be a non-empty str"):
        models.pretty_name["llama-3.2-1b"] = None  # type: ignore[assignment]
    with pytest.raises(InvalidConfigError, match="model card 'x': layers must be a positive number, not -1"):
        _core.set_model_card("x", -1, [(MLX, "org/x")])


@pytest.fixture
async def served(model_dir: Path, tokenizer: Tokenizer) -> AsyncIterator[Served]:
    async for s in serve(FakeNode(reply_tokens(tokenizer)), model_dir, tokenizer, response_timeout=10):
        yield s


async def test_the_api_lists_an_added_model_and_not_a_deleted_one(served: Served) -> None:
    models.model_cards["my-model"] = MY_MODEL
    models.pretty_name["my-model"] = "My Model"
    del models.model_cards["llama-3.2-1b-8bit"]
    listed = {m.id for m in (await served.client().models.list()).data}
    assert "my-model" in listed and "llama-3.2-1b-8bit" not in listed and "llama-3.2-3b" in listed
    body = {"model": "llama-3.2-1b-8bit", "messages": [{"role": "user", "content": "x"}]}
    status, reply = await served.post("/v1/chat/completions", json.dumps(body))
    assert status == 404 and served.node.calls == [], reply
    assert reply["error"]["message"].startswith("The model 'llama-3.2-1b-8bit' does not exist for the candle engine")


async def test_downloads_fetch_the_repository_an_edited_entry_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = write_model("tiny-llama", tmp_path / "model")
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "exo"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with FakeHubServer() as hub:
        hub.add_repo("my-org/Tiny-Llama", model)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        models.model_cards["llama-3.2-1b"] = {"layers": layers, "repo": {MLX: "my-org/Tiny-Llama"}}
        path = await HfShardDownloader().ensure_shard(Shard("llama-3.2-1b", 0, layers - 1, layers), "candle")
        fetched = {r.path.split("?")[0] for r in hub.requests if r.method == "GET"}
    assert path == tmp_path / "exo" / "downloads" / "my-org--Tiny-Llama"
    assert (path / "config.json").is_file()
    assert "/api/models/my-org/Tiny-Llama/revision/main" in fetched, fetched


def test_a_node_runs_an_added_model_from_a_local_directory(tmp_path: Path) -> None:
    model = write_model("tiny-llama", tmp_path / "my-model")
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    # What a classic user does in exo/models.py, done in a launcher before exo.main runs.
    launcher = tmp_path / "launch.py"
    entry = {"layers": layers, "repo": {MLX: str(model), TINYGRAD: str(model)}}
    launcher.write_text(
        "import runpy\n"
        "from exo.models import model_cards\n"
        f"model_cards['my-model'] = {entry!r}\n"
        "runpy.run_module('exo.main', run_name='__main__', alter_sys=True)\n"
    )
    args = ("run", "my-model", "--prompt", "Hello!", "--max-generate-tokens", "4")
    command, env, _ = solo_command(tmp_path, args, {"EXO_ENGINE": "candle"}, None)
    assert command[1:3] == ["-m", "exo.main"]
    command[1:3] = [str(launcher)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Generated 4 tokens" in done.stdout, done.stdout


def test_without_the_edit_the_node_refuses_the_id(tmp_path: Path) -> None:
    command, env, _ = solo_command(tmp_path, ("run", "my-model", "--prompt", "Hi"), {"EXO_ENGINE": "candle"}, None)
    done = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "The model 'my-model' does not exist for the candle engine" in done.stderr


async def test_an_added_model_seeded_into_exo_home_runs_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As in classic, `--models-seed-dir` puts a model where the downloader looks (EXO_HOME's downloads) for a node
    # without network; an added entry naming that repository finds it there.
    write_model("tiny-llama", tmp_path / "seed" / "my-org--Seeded")
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "exo"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert await seed_models(tmp_path / "seed") == ["my-org--Seeded"]
    models.model_cards["seeded"] = {"layers": 4, "repo": {TINYGRAD: "my-org/Seeded"}}
    path = await HfShardDownloader().ensure_shard(Shard("seeded", 0, 3, 4), "candle")
    assert path == tmp_path / "exo" / "downloads" / "my-org--Seeded"
