"""Preloading: when a prompt starts on another node, this node fetches and loads its part of the model at once,
instead of when the first tensor for it arrives.

The part is read from the request's layer plan when the status carries one (xotorch-core nodes announce it),
else from this node's own partition of the ring (what exo classic nodes do).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from exo.app.status import prompt_start
from exo.inference.shard import Shard

logger = logging.getLogger(__name__)

Schedule = Callable[[Coroutine[Any, Any, None]], None]


def planned_shard(layers: Any, base: Shard, node_id: str) -> Shard | None:
    """This node's shard of `base`'s model in a request's layer plan (a list of `node_id`, `start_layer`,
    `end_layer` entries, as xotorch-core nodes announce it), or None."""
    for entry in layers or []:
        if entry.get("node_id") == node_id:
            return Shard(base.model_id, int(entry["start_layer"]), int(entry["end_layer"]), base.n_layers)
    return None


class ShardPreloader:
    """Starts `shard_downloader.ensure_shard` for this node's shard when another node starts a prompt.

    `schedule` runs a coroutine on the app's loop (statuses may arrive on any thread)."""

    def __init__(self, node: Any, shard_downloader: Any, engine_classname: str, schedule: Schedule) -> None:
        self.node = node
        self.shard_downloader = shard_downloader
        self.engine_classname = engine_classname
        self._schedule = schedule
        self._loading: set[Shard] = set()

    def register(self) -> None:
        """Listen to the node's statuses."""
        self.node.on_opaque_status.register("preemptively_load_shard").on_next(self.on_status)

    def on_status(self, request_id: str, status_json: str) -> None:
        """Start loading this node's shard if `status_json` says a prompt started on another node."""
        status = prompt_start(status_json)
        if status is None or status.get("node_id") == self.node.id:
            return
        try:
            base = Shard.from_dict(status.get("base_shard") or status.get("shard") or {})
            current = planned_shard(status.get("layers"), base, self.node.id)
            if current is None and status.get("layers") is None:
                current = self.node.get_current_shard(base)
        except Exception as e:
            logger.debug("Cannot preload a shard for status %s: %s", status_json, e)
            return
        if current is None or current in self._loading:
            return
        self._loading.add(current)
        self._schedule(self._ensure(current))

    async def _ensure(self, shard: Shard) -> None:
        try:
            await self.shard_downloader.ensure_shard(shard, self.engine_classname)
        except Exception as e:
            logger.warning("Preloading %s failed: %s", shard, e)
        finally:
            self._loading.discard(shard)
