"""The candle engine: Hugging Face decoder models (Llama, Mistral, Qwen2, Qwen3) on the CPU or a CUDA GPU."""

from exo._core import CandleInferenceEngine

__all__ = ["CandleInferenceEngine"]
