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

As in classic, the table is edited in Python, before the node starts: `model_cards[id] = {"layers": n, "repo":
{engine_class: repo}}` adds a model or replaces one, `del model_cards[id]` removes one, `pretty_name[id] = name` names
one, and every lookup here (downloads, partitioning, the API's model list) sees the edit. An entry whose `repo` has
no `CandleInferenceEngine` repository runs on the candle engine from its MLX repository, else its tinygrad one; the
`config.json` there decides the architecture. Engine class names the registry does not know are kept, as classic
keeps them. A malformed entry raises `InvalidConfigError` naming the id and the field. An entry is changed as a
whole (`model_cards[id] = {...}`): its dicts refuse item assignment. Each node has its own table, so every node of
a cluster needs the same edit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from exo import _core
from exo.errors import InvalidConfigError
from exo.inference.shard import Shard

if TYPE_CHECKING:
    from exo._core import HfShardDownloader


class _FrozenDict(dict[str, Any]):
    """A model card's entry, or its `repo` dict, as `model_cards` holds it: read-only, since the registry sees
    only entries set as a whole. Copies and pickles are plain dicts."""

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            "a model card is changed as a whole, so that the registry sees it: "
            "model_cards[model_id] = {'layers': n, 'repo': {engine_class: repo}}"
        )

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))


def _checked_entry(model_id: object, entry: object) -> _FrozenDict:
    """`entry` as `model_cards` holds it, or `InvalidConfigError` naming the id and the bad field."""
    if not isinstance(model_id, str) or not model_id:
        raise InvalidConfigError(f"a model card's id must be a non-empty str, not {model_id!r}")
    if not isinstance(entry, Mapping):
        raise InvalidConfigError(
            f"model card '{model_id}' must be a dict with 'layers' and 'repo', not {type(entry).__name__}"
        )
    layers = entry.get("layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 < layers < 2**31:
        raise InvalidConfigError(f"model card '{model_id}': layers must be a positive int, not {layers!r}")
    repo = entry.get("repo")
    if not isinstance(repo, Mapping) or not repo:
        raise InvalidConfigError(
            f"model card '{model_id}': repo must be a non-empty dict of engine class name -> repository, not {repo!r}"
        )
    for engine, repo_id in repo.items():
        if not isinstance(engine, str) or not engine or not isinstance(repo_id, str) or not repo_id:
            raise InvalidConfigError(
                f"model card '{model_id}': repo[{engine!r}] must map an engine class name to a non-empty repository "
                f"str, not {repo_id!r}"
            )
    return _FrozenDict({**entry, "layers": layers, "repo": _FrozenDict(repo)})


def _push(model_id: str) -> None:
    """Hands the card of `model_id` (with its pretty name) to the registry."""
    entry = model_cards[model_id]
    _core.set_model_card(model_id, entry["layers"], list(entry["repo"].items()), pretty_name.get(model_id))


class _RegistryDict(dict[str, Any]):
    """A dict whose every change goes through `__setitem__` and `__delitem__`, which keep the registry in step."""

    def pop(self, key: str, /, *default: Any) -> Any:
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        value = self[key]
        del self[key]
        return value

    def popitem(self) -> tuple[str, Any]:
        if not self:
            raise KeyError("popitem(): dictionary is empty")
        key = next(reversed(self.keys()))
        return key, self.pop(key)

    def clear(self) -> None:
        for key in list(self):
            del self[key]

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        for key, value in dict(other, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Any) -> _RegistryDict:  # type: ignore[override,misc]
        self.update(other)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (dict(self),))


class ModelCards(_RegistryDict):
    """Classic's `model_cards`, `{model_id: {"layers": n, "repo": {engine_class: repo}}}`, kept in step with the
    registry: setting an entry adds or replaces the model, deleting one removes it."""

    def __setitem__(self, model_id: str, entry: Mapping[str, Any]) -> None:
        checked = _checked_entry(model_id, entry)
        _core.set_model_card(model_id, checked["layers"], list(checked["repo"].items()), pretty_name.get(model_id))
        super().__setitem__(model_id, checked)

    def __delitem__(self, model_id: str) -> None:
        super().__delitem__(model_id)
        _core.remove_model_card(model_id)


class PrettyNames(_RegistryDict):
    """Classic's `pretty_name`, `{model_id: display name}`, kept in step with the registry's cards."""

    def __setitem__(self, model_id: str, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidConfigError(f"pretty_name['{model_id}'] must be a non-empty str, not {name!r}")
        super().__setitem__(model_id, name)
        if model_id in model_cards:
            _push(model_id)

    def __delitem__(self, model_id: str) -> None:
        super().__delitem__(model_id)
        if model_id in model_cards:
            _push(model_id)


def _built_in_cards() -> dict[str, _FrozenDict]:
    return {model_id: _checked_entry(model_id, entry) for model_id, entry in _core.model_cards().items()}


model_cards: ModelCards = ModelCards(_built_in_cards())
pretty_name: PrettyNames = PrettyNames(_core.pretty_names())


def reset_model_cards() -> None:
    """Drops every edit of `model_cards` and `pretty_name`: the built-in table again."""
    _core.reset_model_cards()
    dict.clear(model_cards)
    dict.update(model_cards, _built_in_cards())
    dict.clear(pretty_name)
    dict.update(pretty_name, _core.pretty_names())


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


def get_architecture(model_id: str) -> str | None:
    """The `model_type` of a registry model's weights (`llama`, `llava`, ...); None for an id the registry does not
    know or one added at run time, whose weights' `config.json` decides."""
    return _core.get_architecture(model_id)


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
    "ModelCards",
    "PrettyNames",
    "build_base_shard",
    "build_base_shard_async",
    "build_full_shard",
    "get_architecture",
    "get_pretty_name",
    "get_repo",
    "get_supported_models",
    "model_cards",
    "pretty_name",
    "reset_model_cards",
    "unavailable_reason",
]
