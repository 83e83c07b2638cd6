"""Tokenizers fetched by repository id round-trip text, as exo classic's test/test_tokenizers.py checks its models':
the text decodes back from its ids, and back from its ids decoded one at a time. Offline: each synthetic tokenizer
family is served by the fake hub. Runs under pytest and as a script (`python tests/test_model_tokenizers.py`)."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exo.inference.tokenizers import Tokenizer, resolve_tokenizer
from exo.testing.synth import PRESETS, write_metadata
from support.fake_hub import FakeHub, FakeHubServer

#: classic's text.
TEXT = "Hello! How can I assist you today? Let me know if you need help with something or just want to chat."
#: One tiny preset per tokenizer family (presets of a family share its tokenizer).
FAMILY_PRESETS = list(
    {id(p.family): name for name, p in reversed(PRESETS.items()) if name.startswith("tiny-")}.values()
)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    root = tmp_path_factory.mktemp("tokenizers")
    with FakeHubServer() as hub:
        for preset in FAMILY_PRESETS:
            model = root / preset
            model.mkdir()
            write_metadata(PRESETS[preset], model, "f32")
            hub.add_repo(f"synthetic/{preset}", model)
        yield hub


@pytest.fixture
def hub_env(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("EXO_HOME", str(tmp_path / "exo"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return hub


def test_every_tokenizer_family_is_checked() -> None:
    assert {"tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-gemma2"} <= set(FAMILY_PRESETS)


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
async def test_text_survives_encoding_whole_and_token_by_token(hub_env: FakeHub, preset: str) -> None:
    tokenizer = await resolve_tokenizer(f"synthetic/{preset}")
    assert isinstance(tokenizer, Tokenizer)
    assert any(f"synthetic/{preset}/" in r.path for r in hub_env.file_gets("tokenizer.json")), "fetched from the hub"
    encoded = tokenizer.encode(TEXT)
    assert len(encoded) > 1
    decoded = tokenizer.decode(encoded)
    reconstructed = "".join(tokenizer.decode([token]) for token in encoded)
    assert decoded == reconstructed == TEXT
    # With the special tokens kept, classic's check strips the BOS token the encoding added.
    bos = tokenizer.bos_token or ""
    assert tokenizer.decode(encoded, skip_special_tokens=False).removeprefix(bos) == TEXT


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
