"""The chat routes of the API: `/chat/completions` (whole or streamed as server-sent events) and
`/chat/token/encode`, with the model and tokenizer a request resolves to.

Completions run through `node.generate`, an async iterator of token ids: a request that times out, hits a stop
sequence or whose client goes away is cancelled on every node.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from exo import errors
from exo.api.admission import Admission
from exo.api.chat_request import ApiError, ChatRequest, bad_request, parse_chat_request, parse_json_object
from exo.api.generation import GenerationTimeout, Outcome, generate_text
from exo.api.limits import MAX_CONTEXT_ENV, RESPONSE_WRITE_TIMEOUT_ENV
from exo.api.model_choice import ResolvedModel, cluster_engine_classnames, resolve_in_cluster
from exo.api.responses import SSE_HEADERS, error_from_exception, sse
from exo.api.server import ApiServer
from exo.api.text_stream import count_tokens
from exo.inference.tokenizers import resolve_tokenizer
from exo.inference.vision import ImageError, ImageProcessor, image_from_data_url, image_processor_of, vision_messages
from exo.settings import VERSION, debug_level

logger = logging.getLogger(__name__)

ChatRequestListener = Callable[[str, ChatRequest, str], Any]


class ClientStoppedReadingError(ConnectionError):
    """A streaming client took no data for the write timeout: it is treated as gone."""


class ChatRoutes(ApiServer):
    """Handlers of the chat routes; `ChatGPTAPI` sets the attributes below and adds the routes."""

    node: Any
    inference_engine_classname: str
    response_timeout: float
    on_chat_completion_request: ChatRequestListener | None
    default_model: str
    system_prompt: str | None
    admission: Admission
    _tokenizers: dict[str, Any]
    _tokenizer_locks: dict[str, asyncio.Lock]
    _image_processors: dict[str, ImageProcessor | None]

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
                await self.node.shard_downloader.ensure_shard(shard, model.engine_classname)
                tokenizer = await resolve_tokenizer(source)
            self._tokenizers[source] = tokenizer
            return tokenizer

    async def _model_for(self, chat: ChatRequest) -> ResolvedModel:
        name = chat.model or self.default_model
        if name.startswith("gpt-"):
            name = self.default_model
        downloader = getattr(self.node, "shard_downloader", None)
        engines = cluster_engine_classnames(self.node, self.inference_engine_classname)
        return await resolve_in_cluster(name, engines, downloader)

    def _messages(self, chat: ChatRequest) -> list[dict[str, Any]]:
        if self.system_prompt and not any(m["role"] == "system" for m in chat.messages):
            return [{"role": "system", "content": self.system_prompt}, *chat.messages]
        return chat.messages

    async def image_processor_for(self, model: ResolvedModel) -> ImageProcessor | None:
        """The image processor of `model` (after `tokenizer_for`), or None when it takes no images."""
        source = model.tokenizer_source
        if source not in self._image_processors:
            try:
                self._image_processors[source] = await image_processor_of(source)
            except ImageError as e:
                raise ApiError(500, f"The image settings of {model.model_id} are unusable: {e}", "invalid_model") from e
        return self._image_processors[source]

    async def _images(self, chat: ChatRequest, model: ResolvedModel, processor: ImageProcessor | None) -> Any:
        """The request's images as pixel values for the first shard, or None when it sends none."""
        if not chat.has_images:
            return None
        if processor is None:
            raise bad_request(
                f"{model.model_id} does not take images; send text only, or choose a vision model (LLaVA).",
                "unsupported_content",
            )
        urls = [url for urls in chat.images for url in urls]
        if not all(url.startswith("data:") for url in urls):
            raise bad_request(
                "Images must be sent as data URLs (data:image/png;base64,...): the API neither reads files nor "
                "fetches URLs.",
                "invalid_image",
            )

        def preprocess() -> Any:
            return processor.pixel_values([image_from_data_url(url) for url in urls])

        try:
            return await asyncio.get_running_loop().run_in_executor(None, preprocess)
        except ImageError as e:
            raise bad_request(str(e), "invalid_image") from e

    @staticmethod
    def _render_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if tools:
            kwargs["tools"] = tools
        try:
            return tokenizer.apply_chat_template(messages, **kwargs)
        except errors.ExoError as e:
            raise bad_request(f"The messages do not fit the model's chat template: {e}", "invalid_messages") from e

    async def _prepare(self, request: web.Request) -> tuple[ChatRequest, ResolvedModel, Any, str, Any]:
        """The request, its model, the model's tokenizer, the prompt, and the images' pixel values (or None)."""
        chat = parse_chat_request(parse_json_object(await self.read_body(request)), self.limits)
        model = await asyncio.wait_for(self._model_for(chat), self.response_timeout)
        chat.model = model.model_id
        try:
            tokenizer = await asyncio.wait_for(self.tokenizer_for(model), self.response_timeout)
            processor = await asyncio.wait_for(self.image_processor_for(model), self.response_timeout)
        except errors.ExoError as e:
            raise error_from_exception(e) from e
        images = await self._images(chat, model, processor)
        messages = self._messages(chat)
        added = len(messages) - len(chat.messages)
        prompt = self.prompt_for(tokenizer, processor, messages, [[]] * added + chat.images, chat.tools)
        return chat, model, tokenizer, prompt, images

    def prompt_for(
        self,
        tokenizer: Any,
        processor: ImageProcessor | None,
        messages: list[dict[str, Any]],
        images: list[list[str]],
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt of `messages` (each with its images' URLs) in the model's chat template. A vision model's
        template takes parts, and its processor repeats each image token once per feature and puts BOS in front."""
        if processor is None:
            return self._render_prompt(tokenizer, messages, tools)
        prompt = self._render_prompt(tokenizer, vision_messages(messages, images), tools)
        return processor.expand_prompt(prompt, tokenizer.bos_token)

    async def handle_post_chat_token_encode(self, request: web.Request) -> web.Response:
        try:
            _chat, _model, tokenizer, prompt, _images = await self._prepare(request)
        except asyncio.TimeoutError as e:
            raise ApiError(408, "Loading the model timed out.", "timeout") from e
        tokens = [int(t) for t in tokenizer.encode(prompt)]
        return web.json_response(
            {"length": len(prompt), "num_tokens": len(tokens), "encoded_tokens": tokens, "encoded_prompt": prompt}
        )

    async def handle_post_chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            chat, model, tokenizer, prompt, images = await self._prepare(request)
        except asyncio.TimeoutError as e:
            raise ApiError(408, "Loading the model timed out.", "timeout") from e
        self._check_context(chat, tokenizer, prompt)
        async with self.admission.turn():
            request_id = str(uuid.uuid4())
            self._notify_listener(request_id, chat, prompt)
            logger.debug("Chat completion %s on %s", request_id, model.model_id)
            logger.log(debug_level(3), "Prompt of %s: %r", request_id, prompt)
            generation = await self._start_generation(model, prompt, request_id, chat, images)
            if chat.stream:
                return await self._stream_completion(request, chat, tokenizer, prompt, request_id, generation)
            return await self._complete(chat, tokenizer, prompt, request_id, generation)

    def _check_context(self, chat: ChatRequest, tokenizer: Any, prompt: str) -> None:
        """OpenAI's 400 `context_length_exceeded` when the prompt and `max_tokens` together pass the context set by
        `EXO_MAX_CONTEXT`; without it the engine holds the request to the model's context."""
        context = self.limits.max_context
        if context is None:
            return
        prompt_tokens = len(tokenizer.encode(prompt))
        wanted = prompt_tokens + (chat.max_tokens or 0)
        if wanted > context:
            raise ApiError(
                400,
                f"This request spans {wanted} tokens ({prompt_tokens} of prompt, {chat.max_tokens or 0} of "
                f"max_tokens), over the context of {context} tokens ({MAX_CONTEXT_ENV}).",
                "context_length_exceeded",
            )

    def _notify_listener(self, request_id: str, chat: ChatRequest, prompt: str) -> None:
        if self.on_chat_completion_request is None:
            return
        try:
            self.on_chat_completion_request(request_id, chat, prompt)
        except Exception:
            logger.debug("on_chat_completion_request failed", exc_info=True)

    async def _start_generation(
        self, model: ResolvedModel, prompt: str, request_id: str, chat: ChatRequest, images: Any
    ) -> AsyncIterator[int]:
        # Only a request with images passes them, so nodes that take none keep working.
        extra = {} if images is None else {"images": images}
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
                **extra,
            )
            if inspect.isawaitable(generation):
                generation = await generation
        except Exception as e:
            raise error_from_exception(e) from e
        return generation

    def _token_limit(self, chat: ChatRequest) -> int | None:
        """The request's `max_tokens`, else the node's `max_generate_tokens`, else none."""
        return chat.max_tokens or int(getattr(self.node, "max_generate_tokens", 0) or 0) or None

    async def _close(self, generation: AsyncIterator[int], request_id: str, outcome: Outcome | None) -> None:
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

        outcome: Outcome | None = None
        try:
            outcome = await generate_text(
                generation, tokenizer, chat, self._token_limit(chat), lambda: max(0.0, deadline - loop.time()), collect
            )
        except GenerationTimeout as e:
            raise ApiError(408, f"No complete response within {self.response_timeout} s.", "timeout") from e
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as e:
            logger.debug("Chat completion %s failed", request_id, exc_info=True)
            raise error_from_exception(e) from e
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

        write_timeout = self.limits.response_write_timeout

        async def write(data: bytes, *, eof: bool = False) -> None:
            # A client that stops reading fills the socket's buffers and would hold the request forever.
            try:
                await asyncio.wait_for(response.write_eof(data) if eof else response.write(data), write_timeout)
            except asyncio.TimeoutError as e:
                response.force_close()
                message = f"The client took nothing for {write_timeout:g} s ({RESPONSE_WRITE_TIMEOUT_ENV})."
                raise ClientStoppedReadingError(message) from e

        async def send(text: str) -> None:
            # Headers go out with the first text, so failures before it still get a proper HTTP status.
            if not response.prepared:
                await response.prepare(request)
                await write(sse(chunk({"role": "assistant", "content": ""})))
            await write(sse(chunk({"content": text})))

        outcome: Outcome | None = None
        try:
            outcome = await generate_text(
                generation, tokenizer, chat, self._token_limit(chat), lambda: self.response_timeout, send
            )
        except GenerationTimeout as e:
            error = ApiError(408, f"No token within {self.response_timeout} s.", "timeout")
            if not response.prepared:
                raise error from e
            await write(sse(error.to_dict()), eof=True)
            return response
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as e:
            if isinstance(e, ConnectionError) and not isinstance(e, errors.ExoError):
                raise  # the client went away while we wrote to it (a PeerError is the cluster's, not the client's)
            logger.debug("Streamed chat completion %s failed", request_id, exc_info=True)
            error = error_from_exception(e)
            if not response.prepared:
                raise error from e
            await write(sse(error.to_dict()), eof=True)
            return response
        finally:
            await asyncio.shield(self._close(generation, request_id, outcome))
        if not response.prepared:
            await response.prepare(request)
            await write(sse(chunk({"role": "assistant", "content": ""})))
        await write(sse(chunk({}, outcome.finish_reason)))
        if chat.include_usage:
            usage_chunk = dict(base)
            usage_chunk["choices"] = []
            usage_chunk["usage"] = self._usage(tokenizer, prompt, outcome.completion_tokens)
            await write(sse(usage_chunk))
        await write(sse("[DONE]"), eof=True)
        return response
