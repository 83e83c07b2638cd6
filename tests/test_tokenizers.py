"""Tokenizers match the Python `tokenizers` library and transformers' chat formatting."""

import json
from pathlib import Path

import jinja2
import numpy as np
import pytest
from tokenizers import Tokenizer as ReferenceTokenizer

from exo.errors import ExoError, InvalidArgumentError, InvalidModelError, OfflineError
from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard
from exo.inference.tokenizers import DummyTokenizer, IncrementalDetokenizer, Tokenizer, resolve_tokenizer
from exo.testing.corpus import CORPUS
from exo.testing.synth import write_model

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Größe? 日本語 🙂"},
    {"role": "assistant", "content": "Sure."},
    {"role": "user", "content": "And again"},
]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2", "tiny-qwen3"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(request.param, tmp_path_factory.mktemp(request.param))


async def test_encode_decode_match_the_reference(model_dir: Path) -> None:
    tokenizer = await resolve_tokenizer(model_dir)
    reference = ReferenceTokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in (CORPUS, "Größe 日本語 🙂🚀 café", ""):
        for special in (True, False):
            assert (
                tokenizer.encode(text, add_special_tokens=special)
                == reference.encode(text, add_special_tokens=special).ids
            )
        ids = reference.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids) == reference.decode(ids) == text
        assert tokenizer.decode(np.array(ids)) == text


async def test_chat_template_matches_jinja2(model_dir: Path) -> None:
    tokenizer = await resolve_tokenizer(model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    for add_generation_prompt in (True, False):
        expected = env.from_string(config["chat_template"]).render(
            messages=MESSAGES,
            add_generation_prompt=add_generation_prompt,
            bos_token=config["bos_token"] or "",
            eos_token=config["eos_token"],
        )
        got = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt)
        assert got == expected
    ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True)
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)


async def test_eos_ids_come_from_generation_config(model_dir: Path) -> None:
    tokenizer = await resolve_tokenizer(model_dir)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert tokenizer.eos_token_ids[: len(generation["eos_token_id"])] == generation["eos_token_id"]
    assert tokenizer.eos_token_id == generation["eos_token_id"][0]
    assert tokenizer.vocab_size == ReferenceTokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size()


async def test_streaming_never_emits_broken_characters(model_dir: Path) -> None:
    tokenizer = await resolve_tokenizer(model_dir)
    text = "Emoji 🙂🚀🌍, accents é ü ß, CJK 日本語 中文, and plain words."
    stream = IncrementalDetokenizer(tokenizer)
    pieces = [stream.push(token) for token in tokenizer.encode(text, add_special_tokens=False)]
    pieces.append(stream.finish())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text


def test_template_features(tmp_path: Path) -> None:
    model = write_model("tiny-qwen3", tmp_path)
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m.role == 'tool' %}[tool:{{ m.content }}]{% continue %}{% endif %}"
        "{% if m.content is not string %}{{ raise_exception('content must be text') }}{% endif %}"
        "{{ m.content.upper() }}{% endfor %}{{ strftime_now('%Y')[:2] }}{{ tools | length if tools else 0 }}"
        "{{ enable_thinking }}"
    )
    config_path.write_text(json.dumps(config))
    tokenizer = Tokenizer.from_dir(model)
    messages = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]
    text = tokenizer.apply_chat_template(messages, tools=[{"name": "f"}], enable_thinking=False)
    assert text == "HI[tool:42]201False"  # Python spelling, as jinja2 renders it
    with pytest.raises(InvalidArgumentError, match="content must be text"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "x"}]}])


def test_missing_and_malformed_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    model = write_model("tiny-llama", tmp_path / "m")
    (model / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ExoError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(model)


async def test_dummy_and_unknown_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dummy = await resolve_tokenizer("dummy")
    assert isinstance(dummy, DummyTokenizer) and dummy.eos_token_id == 69
    assert dummy.apply_chat_template([]) == "dummy_tokenized_prompt" and dummy.decode([1, 2]) == "dummydummy"
    with pytest.raises(InvalidModelError, match="no such model"):
        await resolve_tokenizer("no such model")
    # A repo id that is not downloaded is fetched from the hub; offline, that fails naming it.
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "exo"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="no-such/model"):
        await resolve_tokenizer("no-such/model")


async def test_engine_exposes_the_loaded_tokenizer(tmp_path: Path) -> None:
    model = write_model("tiny-llama", tmp_path)
    engine = CandleInferenceEngine()
    assert engine.tokenizer is None
    shard = Shard(str(model), 0, 3, 4)
    prompt = (await resolve_tokenizer(model)).apply_chat_template([{"role": "user", "content": "hi"}])
    output, _ = await engine.infer_prompt("r", shard, prompt)
    assert output.shape == (1, 1, 512)
    assert engine.tokenizer is not None and engine.tokenizer.eos_token_ids == await engine.eos_token_ids(shard)
    ids = (await engine.encode(shard, prompt)).tolist()
    assert ids.count(engine.tokenizer.encode("<|begin_of_text|>", add_special_tokens=False)[0]) == 1
