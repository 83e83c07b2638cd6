"""`ChatGPTAPI`: the ChatGPT-compatible HTTP API of a node (exo classic's routes), and the web chat it serves
at `/`.

The route table is here, with the small routes (web chat files, health, topology, running requests, quit). The
handlers of the model routes are in `exo.api.model_routes`, those of the chat routes in `exo.api.chat_routes`, the
server under both (CORS, JSON errors, start and stop) in `exo.api.server`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from exo import errors
from exo.api.admission import Admission
from exo.api.chat_request import ApiError
from exo.api.chat_routes import ChatRequestListener, ChatRoutes
from exo.api.limits import ApiLimits
from exo.api.model_choice import resolve_model
from exo.api.model_routes import ModelRoutes
from exo.shutdown import shutdown

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "tinychat"
FALLBACK_DEFAULT_MODEL = "llama-3.2-1b"
# How long `/topology` waits for the layers per node of a model (its config may have to be fetched).
LAYER_PLAN_TIMEOUT_S = 2.0


class ChatGPTAPI(ModelRoutes, ChatRoutes):
    """exo classic's HTTP API over a node. `await run(host, port)` starts serving; `await stop()` ends it. With
    `api_key`, only the web chat's files and the health check answer without `Authorization: Bearer KEY`; `limits`
    (else the environment's) bound what one request may ask."""

    def __init__(
        self,
        node: Any,
        inference_engine_classname: str,
        response_timeout: float = 90,
        on_chat_completion_request: ChatRequestListener | None = None,
        default_model: str | None = None,
        system_prompt: str | None = None,
        max_concurrent_requests: int = 32,
        max_queued_requests: int = 128,
        api_key: str | None = None,
        limits: ApiLimits | None = None,
    ) -> None:
        super().__init__(api_key, limits)
        self.node = node
        self.inference_engine_classname = inference_engine_classname
        self.response_timeout = response_timeout
        self.on_chat_completion_request = on_chat_completion_request
        self.default_model = default_model or (
            "dummy" if inference_engine_classname == "DummyInferenceEngine" else FALLBACK_DEFAULT_MODEL
        )
        self.system_prompt = system_prompt
        # Completions beyond `max_concurrent_requests` wait in order; past `max_queued_requests` waiting, 503.
        self.admission = Admission(max_concurrent_requests, max_queued_requests)
        # Called by POST /quit; main() sets it to its shutdown. Without it, /quit stops the API and the node.
        self.on_quit: Callable[[], Awaitable[None]] | None = None
        self.created = int(time.time())
        self._tokenizers = {}
        self._tokenizer_locks = {}
        self._image_processors = {}
        self._add_routes()

    def _add_routes(self) -> None:
        router = self.app.router
        for prefix in ("", "/v1"):
            router.add_get(f"{prefix}/models", self.handle_get_models)
            router.add_post(f"{prefix}/chat/completions", self.handle_post_chat_completions)
            router.add_post(f"{prefix}/chat/token/encode", self.handle_post_chat_token_encode)
            router.add_get(f"{prefix}/topology", self.handle_get_topology)
            router.add_get(f"{prefix}/requests", self.handle_get_requests)
        router.add_get("/v1/download/progress", self.handle_get_download_progress)
        router.add_post("/download", self.handle_post_download)
        router.add_delete("/models/{model_name:.+}", self.handle_delete_model)
        router.add_get("/initial_models", self.handle_get_initial_models)
        router.add_get("/modelpool", self.handle_model_pool)
        router.add_get("/healthcheck", self.handle_healthcheck, name="healthcheck")
        router.add_post("/quit", self.handle_quit)
        router.add_get("/", self.handle_root, name="web_chat")
        router.add_get("/{path:.+}", self.handle_static, name="web_chat_file")

    async def handle_root(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    async def handle_static(self, request: web.Request) -> web.StreamResponse:
        """A file of the web chat; only plain files inside its directory are served."""
        relative = request.match_info["path"]
        target = (STATIC_DIR / relative).resolve()
        if not target.is_relative_to(STATIC_DIR) or not target.is_file():
            raise ApiError(404, f"GET {request.path}: no such route or file", "not_found")
        return web.FileResponse(target)

    async def handle_healthcheck(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def handle_get_topology(self, request: web.Request) -> web.Response:
        """Classic's topology JSON, plus each node's `limits` (`max_context`, `max_kv_cache_gb`) where known, and
        `layers`: the layers each node would hold of the model `?model=` (the default model otherwise) and the memory
        they need there, or why the model does not fit."""
        topology = self.node.current_topology
        body = topology.to_json() if topology is not None else {}
        limits_by_node = getattr(self.node, "limits_by_node", None)
        if limits_by_node is not None:
            nodes = body.get("nodes", {})
            for node_id, limits in limits_by_node().items():
                if node_id in nodes:
                    nodes[node_id]["limits"] = limits
        layers = await self._layer_plan(request.query.get("model") or self.default_model)
        if layers is not None:
            body["layers"] = layers
        return web.json_response(body)

    async def handle_get_requests(self, request: web.Request) -> web.Response:
        """The requests running on this node now (`{"node_id": ..., "requests": [...]}`); each names its id, its
        phase here, the node that started it, the tokens sampled here and the nodes it runs on."""
        running = getattr(self.node, "running_requests", None)
        if running is None:
            raise ApiError(501, "This node does not list its running requests.", "not_implemented")
        return web.json_response({"node_id": self.node.id, "requests": list(running)})

    async def _layer_plan(self, model_id: str) -> dict[str, Any] | None:
        """`model_id`'s layers per node for `/topology`; `None` when the node cannot tell or the model is unknown."""
        plan_of = getattr(self.node, "layer_plan", None)
        if plan_of is None:
            return None
        try:
            resolved = resolve_model(model_id, self.inference_engine_classname)
            # The engine may fetch the model's config.json first; the topology does not wait long on it.
            plan = await asyncio.wait_for(plan_of(resolved.base_shard), LAYER_PLAN_TIMEOUT_S)
            return {"model": model_id, "nodes": plan}
        except errors.InsufficientMemoryError as e:
            return {"model": model_id, "error": str(e)}
        except (ApiError, errors.ExoError, asyncio.TimeoutError) as e:
            logger.debug("no layer plan of %s for /topology: %s", model_id, e)
            return None

    async def handle_quit(self, request: web.Request) -> web.StreamResponse:
        response = web.json_response({"detail": "Quit signal received"})
        await response.prepare(request)
        await response.write_eof()
        self._spawn(self._quit())
        return response

    async def _quit(self) -> None:
        if self.on_quit is not None:
            await self.on_quit()
            return
        await shutdown(signal.SIGINT, asyncio.get_running_loop(), self.node.server)


__all__ = ["ChatGPTAPI"]
