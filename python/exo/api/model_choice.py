"""Which model a request names: a registry id (`exo.models`), or a local Hugging Face model directory."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exo import models
from exo.api.chat_request import ApiError
from exo.inference.inference_engine import inference_engine_classes
from exo.inference.shard import Shard
from exo.inference.vision import VISION_MODEL_TYPES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """A model a request can run: its id, the base shard the node partitions, and where its tokenizer lives."""

    model_id: str
    base_shard: Shard
    tokenizer_source: str
    n_layers: int
    #: The engine class whose build of the model this is (another node's, in a cluster of mixed engines).
    engine_classname: str


def _local_config(path: str) -> dict[str, Any]:
    """The `config.json` of a local model directory, or {} if not one."""
    config_path = Path(path).expanduser() / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        logger.debug("Unreadable model config %s: %s", config_path, e)
        return {}
    return config if isinstance(config, dict) else {}


def local_model_layers(path: str) -> int | None:
    """The layer count of a local model directory (`config.json`'s `num_hidden_layers`), or None if not one."""
    layers = _local_config(path).get("num_hidden_layers")
    return layers if isinstance(layers, int) and layers > 0 else None


def takes_images(model_id: str) -> bool:
    """Whether `model_id` is a vision model (LLaVA), as the registry or a local model directory's `config.json` says;
    False for a model neither knows (a hub repo id, a card added at run time)."""
    model_type = models.get_architecture(model_id) or _local_config(model_id).get("model_type")
    return model_type in VISION_MODEL_TYPES


def supported_model_ids(engine_classname: str) -> list[str]:
    """Registry models that `engine_classname` can run."""
    return list(models.get_supported_models([[engine_classname]]))


def cluster_engine_classnames(node: Any, own_classname: str) -> list[str]:
    """`own_classname` first, then the engine classes the cluster's other nodes run, as far as `node` knows them."""
    engines = getattr(node, "engines", None)
    names = engines() if callable(engines) else []
    return list(dict.fromkeys([own_classname, *(inference_engine_classes.get(name, name) for name in names)]))


def pretty_name(model_id: str) -> str:
    """The registry's display name of `model_id`, else the id itself."""
    return models.get_pretty_name(model_id) or model_id


def resolve_model(model_id: str, engine_classname: str) -> ResolvedModel:
    """The model `model_id` on engine `engine_classname`; `ApiError` 404, naming the model and the engine, when the
    engine has no repository for it or its layer count is not known without network."""
    shard = models.build_base_shard(model_id, engine_classname)
    if shard is not None:
        repo = models.get_repo(model_id, engine_classname) or model_id
        return ResolvedModel(model_id, shard, repo, shard.n_layers, engine_classname)
    layers = local_model_layers(model_id)
    if layers is not None:
        return ResolvedModel(model_id, Shard(model_id, 0, 0, layers), model_id, layers, engine_classname)
    reason = models.unavailable_reason(model_id, engine_classname) or (
        f"The model '{model_id}' has no config.json on this node yet, so its layers are not known."
    )
    supported = ", ".join(supported_model_ids(engine_classname)) or "none"
    raise ApiError(404, f"{reason} Supported models: {supported}.", "model_not_found")


async def resolve_model_async(model_id: str, engine_classname: str, shard_downloader: Any = None) -> ResolvedModel:
    """As `resolve_model`, also fetching the `config.json` of a Hugging Face repo id (`org/name`) not on disk."""
    try:
        return resolve_model(model_id, engine_classname)
    except ApiError as not_found:
        if "/" not in model_id or models.get_repo(model_id, engine_classname) is None:
            raise
        downloader = shard_downloader if hasattr(shard_downloader, "model_layers") else None
        try:
            shard = await models.build_base_shard_async(model_id, engine_classname, downloader)
        except Exception as e:
            raise ApiError(404, f"The model '{model_id}' could not be found: {e}", "model_not_found") from not_found
        if shard is None:
            raise
        repo = models.get_repo(model_id, engine_classname) or model_id
        return ResolvedModel(model_id, shard, repo, shard.n_layers, engine_classname)


async def resolve_in_cluster(
    model_id: str, engine_classnames: list[str], shard_downloader: Any = None
) -> ResolvedModel:
    """`resolve_model_async` on the first engine class of `engine_classnames` (this node's first, as
    `cluster_engine_classnames` lists them) that has a build of `model_id`; this node's engine's 404 when none has."""
    own, *others = engine_classnames
    try:
        return await resolve_model_async(model_id, own, shard_downloader)
    except ApiError as not_here:
        for classname in others:
            if models.get_repo(model_id, classname) is None:
                continue
            try:
                return await resolve_model_async(model_id, classname, shard_downloader)
            except ApiError:
                continue
        raise not_here
