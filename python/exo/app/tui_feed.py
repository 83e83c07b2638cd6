"""What the topology TUI shows: each request's prompt and streamed answer, its model, and the cluster's state.

`TuiFeed` listens to the node's token and status callbacks and to the API's chat requests, and keeps a
`TopologyViz` current between the node's own updates.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from exo import errors
from exo.api.chat_request import ApiError
from exo.api.model_choice import resolve_model
from exo.api.text_stream import TokenText
from exo.app.status import prompt_start

logger = logging.getLogger(__name__)

TOPOLOGY_VIEW_REFRESH_S = 1.0


class TuiFeed:
    """Feeds `viz` from `node` (its tokens, prompt statuses and topology) and from the API's chat requests."""

    def __init__(self, viz: Any, node: Any, engine_classname: str) -> None:
        self.viz = viz
        self.node = node
        self.engine_classname = engine_classname
        # Per request still streaming: its detokenizer and the answer so far.
        self.outputs: dict[str, tuple[TokenText, str]] = {}
        # Requests that came through the API: their prompt is shown as the user wrote it.
        self._api_requests: set[str] = set()
        # The model shown, whose layers per node (and the memory they need) the view shows.
        self._shard: Any = None

    def register(self) -> None:
        """Listen to the node's tokens and statuses."""
        self.node.on_token.register("update_topology_viz").on_next(self.on_token)
        self.node.on_opaque_status.register("update_prompt_viz").on_next(self.on_status)

    def on_chat_request(self, request_id: str, chat: Any, prompt: str) -> None:
        """An API chat request: show the last user message and the model's layers."""
        users = [m["content"] for m in chat.messages if m.get("role") == "user"]
        self._api_requests.add(request_id)
        self.viz.update_prompt(request_id, users[-1] if users else prompt)
        self._show_model(chat.model)

    def _show_model(self, model_id: str | None) -> None:
        if not model_id:
            return
        try:
            resolved = resolve_model(model_id, self.engine_classname)
        except ApiError:
            return
        self._shard = resolved.base_shard
        self.viz.update_model(resolved.model_id, resolved.n_layers)

    def on_token(self, request_id: str, tokens: Sequence[int], is_finished: bool) -> None:
        """Append a request's new tokens to its answer on screen; mark it finished with its last ones."""
        entry = self.outputs.get(request_id)
        if entry is None:
            tokenizer = getattr(self.node.inference_engine, "tokenizer", None)
            if tokenizer is None:
                return
            entry = (TokenText(tokenizer), "")
        text, output = entry
        output += "".join(text.push(int(t)) for t in tokens)
        if is_finished:
            output += text.finish()
            self.outputs.pop(request_id, None)
            self._api_requests.discard(request_id)
            self.viz.update_prompt_output(request_id, output)
            self.viz.finish_request(request_id)
            return
        self.outputs[request_id] = (text, output)
        self.viz.update_prompt_output(request_id, output)

    def on_status(self, request_id: str, status_json: str) -> None:
        """Show the prompt of a request that started on any node (unless the API showed it already)."""
        status = prompt_start(status_json)
        if status is None or request_id in self._api_requests:
            return
        self.viz.update_prompt(request_id, status.get("prompt", ""))

    async def _layer_plan(self) -> list[dict[str, Any]] | None:
        """The shown model's layers per node, as the node would split it now; `None` when it does not fit."""
        try:
            return await asyncio.wait_for(self.node.layer_plan(self._shard), TOPOLOGY_VIEW_REFRESH_S)
        except (errors.InsufficientMemoryError, asyncio.TimeoutError):
            return None

    async def refresh(self) -> None:
        """Keeps the cluster view current between the node's own updates (which come with statuses); runs until
        cancelled."""
        while True:
            try:
                partitions = self.node.partitions() if hasattr(self.node, "partitions") else []
                self.viz.update_visualization(
                    self.node.topology, partitions, self.node.id, self.node.node_download_progress
                )
                if hasattr(self.node, "limits_by_node"):
                    self.viz.update_limits(self.node.limits_by_node())
                if self._shard is not None and hasattr(self.node, "layer_plan"):
                    self.viz.update_layer_plan(await self._layer_plan())
            except Exception as e:
                logger.debug("Refreshing the topology view failed: %s", e)
            await asyncio.sleep(TOPOLOGY_VIEW_REFRESH_S)
