"""exo classic's deterministic test engine, implemented in Rust."""

from exo._core import DummyInferenceEngine

__all__ = ["DummyInferenceEngine"]
