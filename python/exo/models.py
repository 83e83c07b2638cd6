"""The model registry (exo classic's `exo.models`), kept in Rust.

`model_cards` maps a model id to its number of layers and a repository per engine class. As in classic, the id
picks the weights: `CandleInferenceEngine` loads the same mlx-community repository as
`MLXDynamicShardInferenceEngine` (`llama-3.2-1b` is the 4-bit quantization, `llama-3.2-1b-8bit` the 8-bit one,
`-bf16` ids the unquantized model), for every model of an architecture it runs (llama, mistral, qwen2, qwen3,
phi3, qwen3_moe, mixtral, gemma2, gemma3_text); other ids have no candle repository, and `unavailable_reason`
says so. `RKLLMInferenceEngine` runs the `-rkllm` ids on an RKLLAMA server; `DummyInferenceEngine` runs the
`dummy` model. Beyond the registry, a model id may be a Hugging Face repo id (`org/name`), a GGUF file in one
(`org/name/file.gguf`) or a local model directory or GGUF file: `get_repo` returns it as is, and
`build_base_shard` reads its layer count from its `config.json` (or GGUF header) when that is on disk (the
directory itself, `EXO_HOME` or the Hugging Face cache). `build_base_shard_async` also fetches the
`config.json` (or the GGUF's header) of a repo id that is not on disk yet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from exo import _core
from exo.inference.shard import Shard

if TYPE_CHECKING:
    from exo._core import HfShardDownloader

model_cards: dict[str, dict[str, Any]] = _core.model_cards()
pretty_name: dict[str, str] = _core.pretty_names()


def get_repo(model_id: str, inference_engine_classname: str) -> str | None:
    """The repository of `model_id` for an engine class, or None."""
    return _core.get_repo(model_id, inference_engine_classname)


def unavailable_reason(model_id: str, inference_engine_classname: str) -> str | None:
    """Why the engine (a name or class name) can load nothing `model_id` names, in a sentence naming the model and
    the engine; None when `get_repo` finds a repository."""
    return _core.unavailable_reason(model_id, inference_engine_classname)


def get_pretty_name(model_id: str) -> str | None:
    """The display name of a registry model, or None."""
    return _core.get_pretty_name(model_id)


def build_base_shard(model_id: str, inference_engine_classname: str) -> Shard | None:
    """`Shard(model_id, 0, 0, n_layers)`, or None when the engine has no repository for the model or its
    layer count is not known without network (see `build_base_shard_async`)."""
    return _core.build_base_shard(model_id, inference_engine_classname)


def build_full_shard(model_id: str, inference_engine_classname: str) -> Shard | None:
    """The shard of every layer of the model, or None (as `build_base_shard`)."""
    return _core.build_full_shard(model_id, inference_engine_classname)


async def build_base_shard_async(
    model_id: str, inference_engine_classname: str, shard_downloader: HfShardDownloader | None = None
) -> Shard | None:
    """As `build_base_shard`, fetching the `config.json` of a Hugging Face repo id through
    `shard_downloader` (a new one by default) when it is not on disk; None when the engine has no
    repository for the model. Errors of the fetch (not found, unauthorized, offline) are raised."""
    shard = build_base_shard(model_id, inference_engine_classname)
    if shard is not None or get_repo(model_id, inference_engine_classname) is None:
        return shard
    downloader = shard_downloader if shard_downloader is not None else _core.HfShardDownloader()
    n_layers = await downloader.model_layers(model_id, inference_engine_classname)
    return Shard(model_id, 0, 0, n_layers)


def get_supported_models(supported_inference_engine_lists: list[list[str]] | None = None) -> list[str]:
    """Registry models that, for every list, have a repository for at least one engine of it (engine
    names such as `candle` or class names); every model when no list is given."""
    return _core.get_supported_models(supported_inference_engine_lists)


__all__ = [
    "build_base_shard",
    "build_base_shard_async",
    "build_full_shard",
    "get_pretty_name",
    "get_repo",
    "get_supported_models",
    "model_cards",
    "pretty_name",
    "unavailable_reason",
]
