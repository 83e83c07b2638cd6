"""The RKLLM engine: whole models on a Rockchip NPU (RK3588) through an RKLLAMA server, answered token by token."""

from exo._core import RKLLMInferenceEngine

__all__ = ["RKLLMInferenceEngine"]
