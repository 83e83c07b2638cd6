"""Tokenizers (exo classic's `exo.inference.tokenizers`), implemented in Rust.

`resolve_tokenizer` loads a model's tokenizer, chat template and EOS ids from a local model
directory, or for a Hugging Face repo id (or a registry model id) from the downloads directory
(`$EXO_HOME/downloads`, default `~/.cache/exo/downloads`), fetching the tokenizer and config files through
the shard downloader when they are not there yet (the Hugging Face cache is reused, and
`HF_HUB_OFFLINE=1` keeps it to local files). A GGUF model (a `.gguf` path, or a directory
holding one) without a `tokenizer.json` beside it brings its own tokenizer in its metadata; so
does a GGUF on the hub (`org/name/file.gguf`), of which only the header is fetched.

With `VERBOSE=1` each tokenizer says what it loaded (on the `exo.tokenizer` logger); `DEBUG=4` names the files.
"""

import asyncio
import logging
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from exo import _core
from exo._core import HfShardDownloader, IncrementalDetokenizer, Tokenizer
from exo.errors import InvalidArgumentError, InvalidModelError
from exo.settings import TOKENIZER_LOGGER, debug_level

logger = logging.getLogger(__name__)
detail = logging.getLogger(TOKENIZER_LOGGER)


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


async def model_dir_of(repo_id_or_path: str | PathLike[str]) -> Path | None:
    """The directory holding a model's `config.json` and tokenizer files (fetched without weights if need be), or
    None for a GGUF model and the dummy one."""
    if str(repo_id_or_path) == "dummy" or _gguf_file(Path(repo_id_or_path)) is not None:
        return None
    found = await _model_dir(repo_id_or_path)
    return None if found.suffix.lower() == ".gguf" else found


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
    source, loader = await _tokenizer_source(repo_id_or_path)
    logger.log(debug_level(4), "Resolving the tokenizer of %s from %s", repo_id_or_path, source)
    tokenizer = await asyncio.get_running_loop().run_in_executor(None, loader, source)
    if detail.isEnabledFor(logging.DEBUG):
        detail.debug("%s", describe_tokenizer(repo_id_or_path, source, tokenizer))
    return tokenizer


async def _tokenizer_source(repo_id_or_path: str | PathLike[str]) -> tuple[Path, Any]:
    """Where a model's tokenizer is read from, and the loader that reads it."""
    gguf_file = _gguf_file(Path(repo_id_or_path))
    if gguf_file is not None:
        if (gguf_file.parent / "tokenizer.json").is_file():
            return gguf_file.parent, Tokenizer.from_dir
        return gguf_file, Tokenizer.from_gguf
    model_dir = await _model_dir(repo_id_or_path)
    if model_dir.suffix.lower() == ".gguf":  # a GGUF on the hub: its header is downloaded
        return model_dir, Tokenizer.from_gguf
    return model_dir, Tokenizer.from_dir


def describe_tokenizer(model: str | PathLike[str], source: Path, tokenizer: Tokenizer) -> str:
    """One line on a loaded tokenizer: where from, its vocabulary, BOS and EOS tokens, and its chat template."""
    eos = ", ".join(f"{i} {tokenizer.decode([i], skip_special_tokens=False)!r}" for i in tokenizer.eos_token_ids)
    template = "a chat template" if _has_chat_template(tokenizer) else "no usable chat template"
    return (
        f"tokenizer of {model} from {source}: {tokenizer.vocab_size} tokens, BOS {tokenizer.bos_token!r}, "
        f"EOS [{eos}], {template}"
    )


def _has_chat_template(tokenizer: Tokenizer) -> bool:
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])
    except (InvalidModelError, InvalidArgumentError):  # no template, or one that does not render
        return False
    return True


__all__ = [
    "DummyTokenizer",
    "IncrementalDetokenizer",
    "Tokenizer",
    "describe_tokenizer",
    "downloads_dir",
    "model_dir_of",
    "resolve_tokenizer",
]
