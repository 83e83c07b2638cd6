"""Tokenizers (exo classic's `exo.inference.tokenizers`), implemented in Rust.

`resolve_tokenizer` loads a model's tokenizer, chat template and EOS ids from a local model
directory, or for a Hugging Face repo id (or a registry model id) from the downloads directory
(`$EXO_HOME/downloads`, default `~/.cache/exo/downloads`), fetching the tokenizer and config files through
the shard downloader when they are not there yet (the Hugging Face cache is reused, and
`HF_HUB_OFFLINE=1` keeps it to local files). A GGUF model (a `.gguf` path, or a directory
holding one) without a `tokenizer.json` beside it brings its own tokenizer in its metadata; so
does a GGUF on the hub (`org/name/file.gguf`), of which only the header is fetched.
"""

import asyncio
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from exo import _core
from exo._core import HfShardDownloader, IncrementalDetokenizer, Tokenizer


class DummyTokenizer:
    """exo classic's stand-in tokenizer for the dummy engine."""

    def __init__(self) -> None:
        self.eos_token_id = 69
        self.vocab_size = 1000

    def apply_chat_template(
        self,
        conversation: Any,
        tokenize: bool = True,
        add_generation_prompt: bool = True,
        tools: Any = None,
        **kwargs: Any,
    ) -> str:
        return "dummy_tokenized_prompt"

    def encode(self, text: str) -> np.ndarray:
        return np.array([1])

    def decode(self, tokens: Any) -> str:
        return "dummy" * len(tokens)


def downloads_dir() -> Path:
    """Where downloaded models live: `$EXO_HOME/downloads`, default `~/.cache/exo/downloads`."""
    return _core.downloads_dir()


async def _model_dir(repo_id_or_path: str | PathLike[str]) -> Path:
    local = Path(repo_id_or_path)
    if (local / "tokenizer.json").is_file():
        return local
    downloaded = downloads_dir() / str(repo_id_or_path).replace("/", "--")
    if (downloaded / "tokenizer.json").is_file():
        return downloaded
    return await HfShardDownloader().ensure_metadata(str(repo_id_or_path))


def _gguf_file(local: Path) -> Path | None:
    """The GGUF file a local path names (itself, or the first of a directory's), if any."""
    if local.is_file() and local.suffix.lower() == ".gguf":
        return local
    if local.is_dir() and not (local / "tokenizer.json").is_file():
        return next(iter(sorted(local.glob("*.gguf"))), None)
    return None


async def resolve_tokenizer(repo_id_or_path: str | PathLike[str]) -> Tokenizer | DummyTokenizer:
    """The tokenizer of a model (`"dummy"` gives `DummyTokenizer`)."""
    if str(repo_id_or_path) == "dummy":
        return DummyTokenizer()
    loop = asyncio.get_running_loop()
    gguf_file = _gguf_file(Path(repo_id_or_path))
    if gguf_file is not None:
        if (gguf_file.parent / "tokenizer.json").is_file():
            return await loop.run_in_executor(None, Tokenizer.from_dir, gguf_file.parent)
        return await loop.run_in_executor(None, Tokenizer.from_gguf, gguf_file)
    model_dir = await _model_dir(repo_id_or_path)
    if model_dir.suffix.lower() == ".gguf":  # a GGUF on the hub: its header is downloaded
        return await loop.run_in_executor(None, Tokenizer.from_gguf, model_dir)
    return await loop.run_in_executor(None, Tokenizer.from_dir, model_dir)


__all__ = ["DummyTokenizer", "IncrementalDetokenizer", "Tokenizer", "downloads_dir", "resolve_tokenizer"]
