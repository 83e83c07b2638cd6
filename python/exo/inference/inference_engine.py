"""Inference engines (exo classic's `exo.inference.inference_engine`).

`InferenceEngine` is the abstract interface a Python engine implements; the Rust engines
(`CandleInferenceEngine`, `DummyInferenceEngine`) are registered as its subclasses.
"""

from abc import ABC, abstractmethod
from typing import Any, cast

import numpy as np

from exo._core import CandleInferenceEngine, DummyInferenceEngine, NativeInferenceEngine
from exo.errors import InvalidArgumentError
from exo.inference.shard import Shard


class InferenceEngine(ABC):
    """What the node asks of an engine; every method is a coroutine."""

    @abstractmethod
    async def encode(self, shard: Shard, prompt: str) -> np.ndarray:
        """Token ids of `prompt`."""

    @abstractmethod
    async def sample(self, x: np.ndarray, temp: float = 0.0, top_p: float = 1.0) -> np.ndarray:
        """The next token chosen from logits `x`."""

    @abstractmethod
    async def decode(self, shard: Shard, tokens: np.ndarray) -> str:
        """Text of `tokens`."""

    @abstractmethod
    async def infer_tensor(
        self, request_id: str, shard: Shard, input_data: np.ndarray, inference_state: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any] | None]:
        """Runs `shard` on `input_data` for `request_id`."""

    @abstractmethod
    async def ensure_shard(self, shard: Shard) -> None:
        """Loads `shard` if it is not loaded."""

    async def infer_prompt(
        self, request_id: str, shard: Shard, prompt: str, inference_state: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any] | None]:
        """Encodes `prompt` and runs `shard` on it."""
        tokens = await self.encode(shard, prompt)
        return await self.infer_tensor(request_id, shard, np.asarray(tokens).reshape(1, -1), inference_state)

    async def load_checkpoint(self, shard: Shard, path: str) -> None:
        """Loads `shard` from `path`; by default, the engine's usual loading."""
        await self.ensure_shard(shard)


InferenceEngine.register(NativeInferenceEngine)

inference_engine_classes = {"candle": "CandleInferenceEngine", "dummy": "DummyInferenceEngine"}


def get_inference_engine(inference_engine_name: str, shard_downloader: Any) -> InferenceEngine:
    """The engine called `inference_engine_name` (`candle` or `dummy`)."""
    # The native engines are `InferenceEngine`s by `InferenceEngine.register`, which type checkers do not follow.
    if inference_engine_name == "candle":
        return cast(InferenceEngine, CandleInferenceEngine(shard_downloader))
    if inference_engine_name == "dummy":
        return cast(InferenceEngine, DummyInferenceEngine())
    known = ", ".join(sorted(inference_engine_classes))
    raise InvalidArgumentError(f"Unsupported inference engine: {inference_engine_name!r} (available: {known})")


__all__ = [
    "CandleInferenceEngine",
    "DummyInferenceEngine",
    "InferenceEngine",
    "NativeInferenceEngine",
    "get_inference_engine",
    "inference_engine_classes",
]
