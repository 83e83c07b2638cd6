"""Test doubles for the HTTP API and the TUIs: `FakeNode` (with `FakeGeneration`) and `FakeShardDownloader`.

They implement only the parts of the Node / ShardDownloader contract that the app calls, with scripted replies.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from exo import errors
from exo.helpers import AsyncCallbackSystem
from exo.inference.shard import Shard
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
from exo.topology.topology import Topology


@dataclass
class FakeFileProgress:
    """The fields of `RepoFileProgressEvent` the TUI reads."""

    file_path: str
    downloaded: int
    total: int
    status: str = "in_progress"


@dataclass
class FakeRepoProgress:
    """The fields of `RepoProgressEvent` the API and TUI read."""

    shard: Shard
    repo_id: str
    downloaded_bytes: int
    total_bytes: int
    status: str = "in_progress"
    repo_revision: str = "main"
    completed_files: int = 0
    total_files: int = 1
    overall_speed: int = 1024 * 1024
    overall_eta: timedelta = timedelta(seconds=30)
    file_progress: dict[str, FakeFileProgress] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard.to_dict(),
            "repo_id": self.repo_id,
            "downloaded_bytes": self.downloaded_bytes,
            "total_bytes": self.total_bytes,
            "status": self.status,
        }


class FakeShardDownloader:
    """Records `ensure_shard` calls and reports scripted download states."""

    def __init__(self) -> None:
        self.ensured: list[tuple[Shard, str]] = []
        self.statuses: list[FakeRepoProgress] = []
        self.on_progress: AsyncCallbackSystem[str, Any] = AsyncCallbackSystem()

    async def ensure_shard(self, shard: Shard, engine_classname: str) -> Path:
        self.ensured.append((shard, engine_classname))
        return Path("/nonexistent")

    async def get_shard_download_status(self, engine_classname: str):
        for status in self.statuses:
            yield Path("/nonexistent"), status


class FakeGeneration:
    """An async iterator of scripted token ids, like `node.generate`'s."""

    def __init__(self, node: FakeNode, request_id: str, tokens: list[int]) -> None:
        self.node = node
        self.request_id = request_id
        self._tokens = tokens
        self._index = 0
        self.closed = False

    def __aiter__(self) -> FakeGeneration:
        return self

    async def __anext__(self) -> int:
        if self.closed:
            raise StopAsyncIteration
        if self.node.hang_after is not None and self._index >= self.node.hang_after:
            await asyncio.Event().wait()
        if self.node.fail_after is not None and self._index >= self.node.fail_after:
            raise self.node.failure("peer fake-peer went away")
        await asyncio.sleep(self.node.delay)
        if self._index >= len(self._tokens):
            self.node.finished.append(self.request_id)
            raise StopAsyncIteration
        token = self._tokens[self._index]
        self._index += 1
        self.node.produced[self.request_id] = self._index
        return token

    async def aclose(self) -> None:
        if not self.closed and self._index < len(self._tokens):
            self.node.closed.append(self.request_id)
        self.closed = True


class FakeNode:
    """Answers every prompt with `reply` (token ids, ending with EOS), one token per `delay` seconds."""

    def __init__(self, reply: list[int], *, node_id: str = "fake-node", delay: float = 0.0) -> None:
        self.id = node_id
        self.reply = reply
        self.delay = delay
        self.hang_after: int | None = None
        self.fail_after: int | None = None
        self.failure: type[Exception] = errors.RequestFailedError
        self.fail_on_start: Exception | None = None
        self.max_generate_tokens = 1024
        self.shard_downloader = FakeShardDownloader()
        self.node_download_progress: dict[str, Any] = {}
        self.calls: list[dict[str, Any]] = []
        self.cancelled: list[str] = []
        self.closed: list[str] = []
        self.finished: list[str] = []
        self.produced: dict[str, int] = {}
        self.server = None
        self.on_token: AsyncCallbackSystem[str, Any] = AsyncCallbackSystem()
        self.on_opaque_status: AsyncCallbackSystem[str, Any] = AsyncCallbackSystem()
        self.broadcasts: list[tuple[str, str]] = []
        self.inference_engine: Any = None
        self.current_topology = Topology()
        self.current_topology.update_node(
            node_id, DeviceCapabilities("Fake Device", "Fake Chip", 16384, DeviceFlops(1.0, 2.0, 4.0))
        )

    @property
    def topology(self) -> Topology:
        return self.current_topology

    def get_current_shard(self, base_shard: Shard, index: int | None = None) -> Shard:
        return Shard(base_shard.model_id, 0, base_shard.n_layers - 1, base_shard.n_layers)

    def generate(
        self,
        base_shard: Shard,
        prompt: str,
        request_id: str | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> FakeGeneration:
        if self.fail_on_start is not None:
            raise self.fail_on_start
        request_id = request_id or f"fake-{len(self.calls)}"
        self.calls.append(
            {
                "shard": base_shard,
                "prompt": prompt,
                "request_id": request_id,
                "max_tokens": max_tokens,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "seed": seed,
            }
        )
        limit = max_tokens if max_tokens is not None else self.max_generate_tokens
        return FakeGeneration(self, request_id, self.reply[:limit])

    async def cancel_request(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    @property
    def running_requests(self) -> list[dict[str, Any]]:
        """The requests started and neither finished, closed nor cancelled, as the real node lists them."""
        ended = set(self.finished) | set(self.closed) | set(self.cancelled)
        running = [call["request_id"] for call in self.calls if call["request_id"] not in ended]
        return [
            {
                "request_id": r,
                "phase": "processing",
                "origin": self.id,
                "tokens": self.produced.get(r, 0),
                "nodes": [self.id],
            }
            for r in running
        ]

    async def broadcast_opaque_status(self, request_id: str, status: str) -> None:
        self.broadcasts.append((request_id, status))


class EngineNode(FakeNode):
    """A one-node stand-in that really generates: it runs `engine` (e.g. the candle engine) on the whole model.

    `generate` yields the engine's sampled tokens until EOS or `max_tokens`, so the API is exercised with real
    token streams and a real tokenizer.
    """

    def __init__(self, engine: Any, tokenizer: Any, *, node_id: str = "engine-node") -> None:
        super().__init__([], node_id=node_id)
        self.engine = engine
        self.tokenizer = tokenizer

    def generate(
        self,
        base_shard: Shard,
        prompt: str,
        request_id: str | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        images: np.ndarray | None = None,
    ):
        request_id = request_id or f"engine-{len(self.calls)}"
        self.calls.append({"prompt": prompt, "request_id": request_id, "max_tokens": max_tokens, "seed": seed})
        shard = self.get_current_shard(base_shard)
        limit = max_tokens if max_tokens is not None else self.max_generate_tokens
        sampling = (temperature or 0.0, top_p or 1.0, top_k or 0, seed)
        return self._tokens(request_id, shard, prompt, limit, *sampling, images)

    async def _tokens(self, request_id, shard, prompt, limit, temperature, top_p, top_k, seed, images):
        eos = set(self.tokenizer.eos_token_ids)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        state = None if images is None else {"pixel_values": images}
        try:
            logits, _ = await self.engine.infer_tensor(request_id, shard, np.array([ids]), state)
            for step in range(limit):
                step_seed = None if seed is None else seed + step
                token = await self.engine.sample(logits, temp=temperature, top_p=top_p, top_k=top_k, seed=step_seed)
                value = int(token[0])
                self.produced[request_id] = step + 1
                yield value
                if value in eos:
                    return
                logits, _ = await self.engine.infer_tensor(request_id, shard, token.reshape(1, 1))
        finally:
            await self.engine.finish_request(request_id)
