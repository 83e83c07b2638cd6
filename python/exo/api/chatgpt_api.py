"""The ChatGPT-compatible HTTP API of a node (exo classic's routes), and the web chat it serves at `/`.

Completions run through `node.generate`, an async iterator of token ids: a request that times out, hits a stop
sequence or whose client goes away is cancelled on every node.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from exo import errors
from exo.api.chat_request import ApiError, ChatRequest, bad_request, parse_chat_request, parse_json_object
from exo.api.model_choice import ResolvedModel, pretty_name, resolve_model, resolve_model_async, supported_model_ids
from exo.api.text_stream import StopScanner, TokenText, count_tokens, eos_token_ids
from exo.helpers import VERSION
from exo.inference.shard import Shard
from exo.inference.tokenizers import resolve_tokenizer

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent / "tinychat"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "*",
    "Access-Control-Expose-Headers": "*",
}
FALLBACK_DEFAULT_MODEL = "llama-3.2-1b"

ChatRequestListener = Callable[[str, ChatRequest, str], Any]


@dataclass
class _Outcome:
    """How a generation ended."""

    completion_tokens: int
    finish_reason: str
    # Whether the node has finished the request too (its end, EOS or the token limit), so nothing is to cancel.
    node_done: bool


class _Timeout(Exception):
    """No token arrived within the response timeout."""


async def _next_token(generation: AsyncIterator[int], timeout: float) -> int:
    """The next token, or `_Timeout` after `timeout` seconds.

    Unlike `asyncio.wait_for` before Python 3.12, this never swallows a cancellation of the caller.
    """
    step = asyncio.ensure_future(generation.__anext__())
    try:
        done, _ = await asyncio.wait({step}, timeout=timeout)
    except asyncio.CancelledError:
        step.cancel()
        await asyncio.wait({step}, timeout=1.0)  # let the step unwind before the generation is closed
        raise
    if not done:
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)
        raise _Timeout
    return step.result()


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _error_response(error: ApiError) -> web.Response:
    return web.json_response(error.to_dict(), status=error.status)


def _error_from_exception(e: BaseException) -> ApiError:
    """The HTTP error for an exception raised while a request ran."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, errors.ContextOverflowError):
        return ApiError(400, str(e), "context_length_exceeded")
    if isinstance(e, errors.InvalidModelError):
        return ApiError(400, str(e), "invalid_model")
    if isinstance(e, (errors.InvalidArgumentError, errors.InvalidShardError)):
        return ApiError(400, str(e), "invalid_request")
    if isinstance(e, errors.CacheEvictedError):
        return ApiError(503, f"The cluster dropped the request's cache; try again: {e}", "cache_evicted")
    if isinstance(e, errors.PeerError):
        return ApiError(503, f"A node of the cluster is unavailable; try again: {e}", "peer_unavailable")
    if isinstance(e, errors.ExoError):
        return ApiError(500, f"The request failed in the cluster: {e}", "request_failed")
    return ApiError(500, f"Internal error: {type(e).__name__}: {e}", "internal_error")


class ChatGPTAPI:
    """exo classic's HTTP API over a node. `await run(host, port)` starts serving; `await stop()` ends it."""

    def __init__(
        self,
        node: Any,
        inference_engine_classname: str,
        response_timeout: float = 90,
        on_chat_completion_request: ChatRequestListener | None = None,
        default_model: str | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.node = node
        self.inference_engine_classname = inference_engine_classname
        self.response_timeout = response_timeout
        self.on_chat_completion_request = on_chat_completion_request
        self.default_model = default_model or (
            "dummy" if inference_engine_classname == "DummyInferenceEngine" else FALLBACK_DEFAULT_MODEL
        )
        self.system_prompt = system_prompt
        # Called by POST /quit; main() sets it to its shutdown. Without it, /quit stops the API and the node.
        self.on_quit: Callable[[], Awaitable[None]] | None = None
        self.created = int(time.time())
        self._tokenizers: dict[str, Any] = {}
        self._tokenizer_locks: dict[str, asyncio.Lock] = {}
        self._handlers: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self.app = web.Application(client_max_size=16 * 1024 * 1024, middlewares=[self._cors_middleware])
        self.app.on_response_prepare.append(self._add_cors_headers)
        self._add_routes()

    # ------------------------------------------------------------------ setup

    def _add_routes(self) -> None:
        router = self.app.router
        for prefix in ("", "/v1"):
            router.add_get(f"{prefix}/models", self.handle_get_models)
            router.add_post(f"{prefix}/chat/completions", self.handle_post_chat_completions)
            router.add_post(f"{prefix}/chat/token/encode", self.handle_post_chat_token_encode)
            router.add_get(f"{prefix}/topology", self.handle_get_topology)
        router.add_get("/v1/download/progress", self.handle_get_download_progress)
        router.add_post("/download", self.handle_post_download)
        router.add_delete("/models/{model_name:.+}", self.handle_delete_model)
        router.add_get("/initial_models", self.handle_get_initial_models)
        router.add_get("/modelpool", self.handle_model_pool)
        router.add_get("/healthcheck", self.handle_healthcheck)
        router.add_post("/quit", self.handle_quit)
        router.add_get("/", self.handle_root)
        router.add_get("/{path:.+}", self.handle_static)

    @web.middleware
    async def _cors_middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return web.Response(status=204)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = "not_found" if e.status == 404 else "http_error"
            message = f"{request.method} {request.path}: {e.reason}"
            return _error_response(ApiError(e.status, message, code))
        except ApiError as e:
            return _error_response(e)
        finally:
            if task is not None:
                self._handlers.discard(task)

    @staticmethod
    async def _add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(CORS_HEADERS)

    async def run(self, host: str = "0.0.0.0", port: int = 52415) -> None:
        """Start serving on `host:port`; returns once the socket listens."""
        runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=5.0, access_log=None)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, host, port).start()
        logger.info("ChatGPT API listening on http://%s:%d", host, port)

    async def stop(self) -> None:
        """Cancel running requests (on every node), close connections and stop listening."""
        handlers = [t for t in self._handlers if t is not asyncio.current_task()]
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ simple routes

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

    def _listed_models(self) -> list[str]:
        ids = supported_model_ids(self.inference_engine_classname)
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

    async def handle_get_topology(self, request: web.Request) -> web.Response:
        topology = self.node.current_topology
        return web.json_response(topology.to_json() if topology is not None else {})

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
                await response.write(_sse({status.shard.model_id: entry}))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:
            logger.exception("Listing model download states failed")
            await response.write(_sse(ApiError(500, f"Listing models failed: {e}", "internal_error").to_dict()))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        return parse_json_object(await request.read())

    async def handle_post_download(self, request: web.Request) -> web.Response:
        data = await self._json_body(request)
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
        try:
            from exo.download.new_shard_download import delete_model
        except ImportError as e:
            raise ApiError(501, f"This build cannot delete models ({e}).", "not_supported") from e

        if await delete_model(model_id, self.inference_engine_classname):
            return web.json_response({"status": "success", "message": f"Model {model_id} deleted successfully"})
        raise ApiError(404, f"Model {model_id} has no downloaded files.", "model_not_found")

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
        from exo.helpers import shutdown

        await shutdown(signal.SIGINT, asyncio.get_running_loop(), self.node.server)

    # ------------------------------------------------------------------ chat

    async def tokenizer_for(self, model: ResolvedModel) -> Any:
        """The tokenizer of `model`; downloads this node's shard of it first when it is not on disk yet."""
        source = model.tokenizer_source
        cached = self._tokenizers.get(source)
        if cached is not None:
            return cached
        lock = self._tokenizer_locks.setdefault(source, asyncio.Lock())
        async with lock:
            if source in self._tokenizers:
                return self._tokenizers[source]
            try:
                tokenizer = await resolve_tokenizer(source)
            except errors.InvalidModelError:
                shard = self.node.get_current_shard(model.base_shard)
                await self.node.shard_downloader.ensure_shard(shard, self.inference_engine_classname)
                tokenizer = await resolve_tokenizer(source)
            self._tokenizers[source] = tokenizer
            return tokenizer

    async def _model_for(self, chat: ChatRequest) -> ResolvedModel:
        name = chat.model or self.default_model
        if name.startswith("gpt-"):
            name = self.default_model
        downloader = getattr(self.node, "shard_downloader", None)
        return await resolve_model_async(name, self.inference_engine_classname, downloader)

    def _messages(self, chat: ChatRequest) -> list[dict[str, str]]:
        if self.system_prompt and not any(m["role"] == "system" for m in chat.messages):
            return [{"role": "system", "content": self.system_prompt}, *chat.messages]
        return chat.messages

    @staticmethod
    def _render_prompt(tokenizer: Any, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None) -> str:
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if tools:
            kwargs["tools"] = tools
        try:
            return tokenizer.apply_chat_template(messages, **kwargs)
        except errors.ExoError as e:
            raise bad_request(f"The messages do not fit the model's chat template: {e}", "invalid_messages") from e

    async def _prepare(self, request: web.Request) -> tuple[ChatRequest, ResolvedModel, Any, str]:
        chat = parse_chat_request(await self._json_body(request))
        model = await asyncio.wait_for(self._model_for(chat), self.response_timeout)
        chat.model = model.model_id
        tokenizer = await asyncio.wait_for(self.tokenizer_for(model), self.response_timeout)
        prompt = self._render_prompt(tokenizer, self._messages(chat), chat.tools)
        return chat, model, tokenizer, prompt

    async def handle_post_chat_token_encode(self, request: web.Request) -> web.Response:
        try:
            _chat, _model, tokenizer, prompt = await self._prepare(request)
        except asyncio.TimeoutError as e:
            raise ApiError(408, "Loading the model timed out.", "timeout") from e
        tokens = [int(t) for t in tokenizer.encode(prompt)]
        return web.json_response(
            {"length": len(prompt), "num_tokens": len(tokens), "encoded_tokens": tokens, "encoded_prompt": prompt}
        )

    async def handle_post_chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            chat, model, tokenizer, prompt = await self._prepare(request)
        except asyncio.TimeoutError as e:
            raise ApiError(408, "Loading the model timed out.", "timeout") from e
        request_id = str(uuid.uuid4())
        self._notify_listener(request_id, chat, prompt)
        logger.debug("Chat completion %s on %s: %r", request_id, model.model_id, prompt)
        generation = await self._start_generation(model, prompt, request_id, chat)
        if chat.stream:
            return await self._stream_completion(request, chat, tokenizer, prompt, request_id, generation)
        return await self._complete(chat, tokenizer, prompt, request_id, generation)

    def _notify_listener(self, request_id: str, chat: ChatRequest, prompt: str) -> None:
        if self.on_chat_completion_request is None:
            return
        try:
            self.on_chat_completion_request(request_id, chat, prompt)
        except Exception:
            logger.debug("on_chat_completion_request failed", exc_info=True)

    async def _start_generation(
        self, model: ResolvedModel, prompt: str, request_id: str, chat: ChatRequest
    ) -> AsyncIterator[int]:
        try:
            generation = self.node.generate(
                model.base_shard,
                prompt,
                request_id,
                max_tokens=chat.max_tokens,
                temperature=chat.temperature,
                top_p=chat.top_p,
                top_k=chat.top_k,
                seed=chat.seed,
            )
            if inspect.isawaitable(generation):
                generation = await generation
        except Exception as e:
            raise _error_from_exception(e) from e
        return generation

    async def _close(self, generation: AsyncIterator[int], request_id: str, outcome: _Outcome | None) -> None:
        """Release `generation`; cancel the request on every node unless the node has finished it."""
        try:
            await generation.aclose()  # type: ignore[attr-defined]
        except Exception:
            logger.debug("Closing the generation of %s failed", request_id, exc_info=True)
        if outcome is not None and outcome.node_done:
            return
        try:
            await self.node.cancel_request(request_id)
        except Exception:
            logger.debug("Cancelling request %s failed", request_id, exc_info=True)

    async def _generate_text(
        self,
        generation: AsyncIterator[int],
        tokenizer: Any,
        chat: ChatRequest,
        timeout_for_next: Callable[[], float],
        on_text: Callable[[str], Awaitable[None]],
    ) -> _Outcome:
        """Runs `generation` to its end, a stop sequence or the token limit, passing text pieces to `on_text`."""
        detokenizer = TokenText(tokenizer)
        stops = StopScanner(chat.stop)
        eos = eos_token_ids(tokenizer)
        limit = chat.max_tokens or int(getattr(self.node, "max_generate_tokens", 0) or 0) or None
        count = 0
        finish: str | None = None
        node_done = True
        while finish is None:
            try:
                token = int(await _next_token(generation, timeout_for_next()))
            except StopAsyncIteration:
                break
            if token in eos:
                finish = "stop"
                break
            count += 1
            text, stopped = stops.feed(detokenizer.push(token))
            if text:
                await on_text(text)
            if stopped:
                finish = "stop"
                node_done = False
            elif limit is not None and count >= limit:
                finish = "length"
        if not stops.stopped:
            text, stopped = stops.feed(detokenizer.finish())
            text += stops.flush()
            if text:
                await on_text(text)
            if stopped:
                finish = "stop"
        if finish is None:
            finish = "length" if limit is not None and count >= limit else "stop"
        return _Outcome(count, finish, node_done)

    def _completion_base(self, chat: ChatRequest, request_id: str, object_type: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{request_id}",
            "object": object_type,
            "created": int(time.time()),
            "model": chat.model,
            "system_fingerprint": f"exo_{VERSION}",
        }

    @staticmethod
    def _usage(tokenizer: Any, prompt: str, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = count_tokens(tokenizer, prompt)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def _complete(
        self, chat: ChatRequest, tokenizer: Any, prompt: str, request_id: str, generation: AsyncIterator[int]
    ) -> web.Response:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.response_timeout
        pieces: list[str] = []

        async def collect(text: str) -> None:
            pieces.append(text)

        outcome: _Outcome | None = None
        try:
            outcome = await self._generate_text(
                generation, tokenizer, chat, lambda: max(0.0, deadline - loop.time()), collect
            )
        except _Timeout as e:
            raise ApiError(408, f"No complete response within {self.response_timeout} s.", "timeout") from e
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as e:
            logger.debug("Chat completion %s failed", request_id, exc_info=True)
            raise _error_from_exception(e) from e
        finally:
            await asyncio.shield(self._close(generation, request_id, outcome))
        body = self._completion_base(chat, request_id, "chat.completion")
        body["choices"] = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(pieces)},
                "logprobs": None,
                "finish_reason": outcome.finish_reason,
            }
        ]
        body["usage"] = self._usage(tokenizer, prompt, outcome.completion_tokens)
        return web.json_response(body)

    async def _stream_completion(
        self,
        request: web.Request,
        chat: ChatRequest,
        tokenizer: Any,
        prompt: str,
        request_id: str,
        generation: AsyncIterator[int],
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers=SSE_HEADERS)
        base = self._completion_base(chat, request_id, "chat.completion.chunk")

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            body = dict(base)
            body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
            if chat.include_usage:
                body["usage"] = None
            return body

        async def send(text: str) -> None:
            # Headers go out with the first text, so failures before it still get a proper HTTP status.
            if not response.prepared:
                await response.prepare(request)
                await response.write(_sse(chunk({"role": "assistant", "content": ""})))
            await response.write(_sse(chunk({"content": text})))

        outcome: _Outcome | None = None
        try:
            outcome = await self._generate_text(generation, tokenizer, chat, lambda: self.response_timeout, send)
        except _Timeout as e:
            error = ApiError(408, f"No token within {self.response_timeout} s.", "timeout")
            if not response.prepared:
                raise error from e
            await response.write(_sse(error.to_dict()))
            await response.write_eof()
            return response
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as e:
            if isinstance(e, ConnectionError) and not isinstance(e, errors.ExoError):
                raise  # the client went away while we wrote to it (a PeerError is the cluster's, not the client's)
            logger.debug("Streamed chat completion %s failed", request_id, exc_info=True)
            error = _error_from_exception(e)
            if not response.prepared:
                raise error from e
            await response.write(_sse(error.to_dict()))
            await response.write_eof()
            return response
        finally:
            await asyncio.shield(self._close(generation, request_id, outcome))
        if not response.prepared:
            await response.prepare(request)
            await response.write(_sse(chunk({"role": "assistant", "content": ""})))
        await response.write(_sse(chunk({}, outcome.finish_reason)))
        if chat.include_usage:
            usage_chunk = dict(base)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = self._usage(tokenizer, prompt, outcome.completion_tokens)
            await response.write(_sse(usage_chunk))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response
