"""A fake RKLLAMA server on loopback, in its own thread: RKLLAMA's HTTP API (`/`, `/models`, `/current_model`,
`/load_model`, `/unload_model`, `/generate`) with its streaming quirks, and switches for each way it can fail."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from exo.helpers import find_available_port


def chunk(content: str, finished: bool = False) -> str:
    """One object of RKLLAMA's answer stream, as its server writes it (a blank line after each)."""
    choice = {"role": "assistant", "content": content, "logprobs": None, "finish_reason": "stop" if finished else None}
    return json.dumps({"id": "rkllm_chat", "object": "rkllm_chat", "choices": [choice]}) + "\n\n"


@dataclass
class FakeRkllama:
    """What the server answers (`answer`, in `pieces` of that many characters) and how it fails (`mode`)."""

    answer: str = "Hello from the NPU! Größe 日本語 🙂 ok."
    models: list[str] = field(default_factory=list)
    #: `ok`, `whole` (one object, not streamed), `malformed`, `truncated`, `slow` (a piece every `delay` seconds,
    #: forever), `silent` (headers, then nothing), `load_fails`.
    mode: str = "ok"
    delay: float = 0.2
    loaded: str | None = None
    generations: list[list[dict[str, str]]] = field(default_factory=list)
    running: int = 0
    most_running: int = 0
    disconnected: int = 0
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ routes

    async def home(self, _request: web.Request) -> web.Response:
        return web.json_response({"message": "Welcome to RKLLama", "github": "https://github.com/notpunhnox/rkllama"})

    async def list_models(self, _request: web.Request) -> web.Response:
        return web.json_response({"models": self.models})

    async def current_model(self, _request: web.Request) -> web.Response:
        if self.loaded is None:
            return web.json_response({"error": "No models are currently loaded."}, status=404)
        return web.json_response({"model_name": self.loaded})

    async def load_model(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.loaded is not None:
            return web.json_response({"error": "A model is already loaded. Please unload it first."}, status=400)
        if self.mode == "load_fails":
            return web.json_response({"error": "RKLLM init failed: the NPU driver is too old"}, status=400)
        if body.get("model_name") not in self.models:
            return web.json_response({"error": f"Model {body.get('model_name')} not found"}, status=400)
        self.loaded = body["model_name"]
        return web.json_response({"message": f"Model {self.loaded} loaded successfully."})

    async def unload_model(self, _request: web.Request) -> web.Response:
        if self.loaded is None:
            return web.json_response({"error": "No models are currently loaded."}, status=400)
        self.loaded = None
        return web.json_response({"message": "Model successfully unloaded!"})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        if self.loaded is None:
            return web.json_response({"error": "No models are currently loaded."}, status=400)
        body = await request.json()
        self.generations.append(body["messages"])
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.mode == "whole" or not body.get("stream"):
                return web.json_response(json.loads(chunk(self.answer, finished=True)))
            return await self._stream(request)
        finally:
            self.running -= 1

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        try:
            if self.mode == "silent":
                await asyncio.sleep(3600)
            if self.mode == "slow":
                while True:
                    await response.write(chunk("tick ").encode())
                    await asyncio.sleep(self.delay)
            if self.mode == "malformed":
                await response.write(chunk("Hello")[:-2].encode() + b'\n\n{"choices": [}\n\n')
                return response
            pieces = [self.answer[i : i + 3] for i in range(0, len(self.answer), 3)]
            # Two objects in one write, then one object split across two writes, as reads may see them.
            text = "".join(chunk(p) for p in pieces)
            if self.mode == "truncated":
                await response.write(text.encode()[: len(text.encode()) - 7])
                return response
            text += chunk("", finished=True)
            data = text.encode()
            for start in range(0, len(data), 37):
                await response.write(data[start : start + 37])
                await asyncio.sleep(0.001)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected += 1
            raise
        return response

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeRkllama:
        """Serves on a free loopback port from a thread of its own; returns once it listens."""
        self.port = find_available_port("127.0.0.1")
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_get("/", self.home)
            app.router.add_get("/models", self.list_models)
            app.router.add_get("/current_model", self.current_model)
            app.router.add_post("/load_model", self.load_model)
            app.router.add_post("/unload_model", self.unload_model)
            app.router.add_post("/generate", self.generate)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "the fake RKLLAMA server did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def env(self, **extra: Any) -> dict[str, str]:
        """The environment that points a node at this server."""
        return {"RKLLM_SERVER_HOST": "127.0.0.1", "RKLLM_SERVER_PORT": str(self.port), **extra}
