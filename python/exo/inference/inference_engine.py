"""Inference engines (exo classic's `exo.inference.inference_engine`).

`InferenceEngine` is the abstract interface a Python engine implements; the Rust engines
(`CandleInferenceEngine`, `RKLLMInferenceEngine`, `DummyInferenceEngine`) are registered as its subclasses.
"""

from abc import ABC, abstractmethod
from typing import Any, cast

import numpy as np

from exo._core import CandleInferenceEngine, DummyInferenceEngine, NativeInferenceEngine, RKLLMInferenceEngine
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

inference_engine_classes = {
    "candle": "CandleInferenceEngine",
    "rkllm": "RKLLMInferenceEngine",
    "dummy": "DummyInferenceEngine",
}

#: The engines of exo classic and xotorch, by short name and class name (lower case), and what they were; candle runs
#: in their place (mlx only where this build has no MLX engine).
CLASSIC_ENGINES = {
    "tinygrad": "exo classic's tinygrad engine",
    "tinygraddynamicshardinferenceengine": "exo classic's tinygrad engine",
    "torch": "xotorch's PyTorch engine",
    "pytorch": "xotorch's PyTorch engine",
    "torchdynamicshardinferenceengine": "xotorch's PyTorch engine",
    "cpu": "a CPU engine",
    "mlx": "exo classic's MLX engine",
    "mlxdynamicshardinferenceengine": "exo classic's MLX engine",
}

_OWN_ENGINES = {name: name for name in inference_engine_classes} | {
    cls.lower(): name for name, cls in inference_engine_classes.items()
}


def engine_name_for(requested: str, *, mlx_built: bool = False) -> str | None:
    """The engine this build runs for an engine name or class name of this project, exo classic or xotorch (any
    case): `candle`, `rkllm`, `dummy`, or `mlx` where the build has it; None for a name no project gave an engine."""
    key = requested.strip().lower()
    if key in _OWN_ENGINES:
        return _OWN_ENGINES[key]
    if key in ("mlx", "mlxdynamicshardinferenceengine") and mlx_built:
        return "mlx"
    return "candle" if key in CLASSIC_ENGINES else None


def get_inference_engine(inference_engine_name: str, shard_downloader: Any) -> InferenceEngine:
    """The engine called `inference_engine_name`: `candle`, `rkllm` or `dummy`, or a name of exo classic or xotorch that
    candle stands in for (`tinygrad`, `torch`, `TinygradDynamicShardInferenceEngine`, ...)."""
    name = engine_name_for(inference_engine_name)
    # The native engines are `InferenceEngine`s by `InferenceEngine.register`, which type checkers do not follow.
    if name == "candle":
        return cast(InferenceEngine, CandleInferenceEngine(shard_downloader))
    if name == "rkllm":
        return cast(InferenceEngine, RKLLMInferenceEngine(shard_downloader))
    if name == "dummy":
        return cast(InferenceEngine, DummyInferenceEngine())
    known = ", ".join(sorted(inference_engine_classes))
    raise InvalidArgumentError(f"Unsupported inference engine: {inference_engine_name!r} (available: {known})")


__all__ = [
    "CLASSIC_ENGINES",
    "CandleInferenceEngine",
    "DummyInferenceEngine",
    "InferenceEngine",
    "NativeInferenceEngine",
    "RKLLMInferenceEngine",
    "engine_name_for",
    "get_inference_engine",
    "inference_engine_classes",
]
