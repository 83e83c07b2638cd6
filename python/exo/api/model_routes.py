"""The model routes of the API: the models a node can run (`/models`, whose `vision` says which take images, and
`/initial_models`), their download states (`/modelpool`, `/v1/download/progress`), starting a download (`/download`)
and deleting one (`DELETE /models/{name}`)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from exo.api.chat_request import ApiError, bad_request, parse_json_object
from exo.api.model_choice import (
    cluster_engine_classnames,
    pretty_name,
    resolve_model,
    supported_model_ids,
    takes_images,
)
from exo.api.responses import SSE_HEADERS, sse
from exo.api.server import ApiServer
from exo.download.new_shard_download import delete_model
from exo.inference.shard import Shard

logger = logging.getLogger(__name__)


class ModelRoutes(ApiServer):
    """Handlers of the model routes; `ChatGPTAPI` sets the attributes below and adds the routes."""

    node: Any
    inference_engine_classname: str
    default_model: str
    created: int

    def _listed_models(self) -> list[str]:
        engines = cluster_engine_classnames(self.node, self.inference_engine_classname)
        ids = list(dict.fromkeys(model_id for engine in engines for model_id in supported_model_ids(engine)))
        if self.default_model not in ids:
            try:
                resolve_model(self.default_model, self.inference_engine_classname)
            except ApiError:
                return ids
            ids.insert(0, self.default_model)
        return ids

    async def handle_get_models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": model_id,
                "object": "model",
                "created": self.created,
                "owned_by": "exo",
                "ready": True,
                "name": pretty_name(model_id),
                "vision": takes_images(model_id),
            }
            for model_id in self._listed_models()
        ]
        return web.json_response({"object": "list", "data": data})

    async def handle_get_initial_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                model_id: {
                    "name": pretty_name(model_id),
                    "downloaded": None,
                    "download_percentage": None,
                    "total_size": None,
                    "total_downloaded": None,
                    "loading": True,
                }
                for model_id in self._listed_models()
            }
        )

    async def handle_get_download_progress(self, request: web.Request) -> web.Response:
        progress = {}
        for node_id, event in dict(self.node.node_download_progress).items():
            if getattr(event, "status", None) == "in_progress":
                progress[node_id] = event.to_dict()
        return web.json_response(progress)

    async def handle_model_pool(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await response.prepare(request)
        try:
            statuses = self.node.shard_downloader.get_shard_download_status(self.inference_engine_classname)
            async for _path, status in statuses:
                total, done = int(status.total_bytes), int(status.downloaded_bytes)
                complete = total > 0 and done >= total
                entry = {
                    "downloaded": complete,
                    "download_percentage": 100.0 if complete else (100.0 * done / total if total else 0.0),
                    "total_size": total,
                    "total_downloaded": done,
                }
                await response.write(sse({status.shard.model_id: entry}))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:
            logger.exception("Listing model download states failed")
            await response.write(sse(ApiError(500, f"Listing models failed: {e}", "internal_error").to_dict()))
        await response.write(sse("[DONE]"))
        await response.write_eof()
        return response

    async def handle_post_download(self, request: web.Request) -> web.Response:
        data = parse_json_object(await self.read_body(request))
        model_id = data.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise bad_request("'model' (a model id) is required.", "missing_field")
        resolved = resolve_model(model_id, self.inference_engine_classname)
        full = Shard(resolved.base_shard.model_id, 0, resolved.n_layers - 1, resolved.n_layers)
        downloader = self.node.shard_downloader
        self._spawn(self._download(downloader, full))
        return web.json_response({"status": "success", "message": f"Download started for model: {model_id}"})

    async def _download(self, downloader: Any, shard: Any) -> None:
        try:
            await downloader.ensure_shard(shard, self.inference_engine_classname)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("Downloading %s failed", shard.model_id)

    async def handle_delete_model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_name"]
        if await delete_model(model_id, self.inference_engine_classname):
            return web.json_response({"status": "success", "message": f"Model {model_id} deleted successfully"})
        raise ApiError(404, f"Model {model_id} has no downloaded files.", "model_not_found")
