"""Which models a cluster can run, from its nodes' engine lists (`exo.models.get_supported_models`), as exo classic's
test/test_model_helpers.py asks it, for this project's engines and classic's: an engine list is satisfied by a model
that has a repository for one of its engines, a short name and its class name mean the same engine, and every node's
list must be satisfied. Runs under pytest and as a script (`python tests/test_model_helpers.py`)."""

import sys
from dataclasses import dataclass

import pytest

from exo.inference.inference_engine import inference_engine_classes
from exo.models import get_supported_models, model_cards

CLASSIC_CLASSES = {"tinygrad": "TinygradDynamicShardInferenceEngine", "mlx": "MLXDynamicShardInferenceEngine"}


@dataclass(frozen=True)
class Case:
    """Engine lists (one per node, short names) and what the supported models must then be."""

    name: str
    engine_lists: list[list[str]]
    contains: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    min_count: int | None = None
    max_count: int | None = None
    exact_count: int | None = None


CASES = [
    Case("single_candle_engine", [["candle"]], ("llama-3.2-1b", "llama-3.1-8b", "mistral-nemo"), ("dummy",), 50),
    Case("single_rkllm_engine", [["rkllm"]], ("qwen2.5-1.5b-rkllm",), ("llama-3.2-1b",), 1, 10),
    Case("single_tinygrad_engine", [["tinygrad"]], ("llama-3.2-1b", "llama-3.2-3b"), ("mistral-nemo",), 5, 15),
    Case("either_engine_of_a_node", [["candle", "rkllm"]], ("llama-3.2-1b", "qwen2.5-1.5b-rkllm"), (), 55),
    Case(
        "every_node_needs_a_repository", [["candle", "tinygrad"], ["candle"]], ("llama-3.2-1b", "mistral-nemo"), (), 50
    ),
    Case("nodes_with_distinct_engines", [["candle"], ["tinygrad"]], ("llama-3.2-1b",), ("mistral-nemo",), 5, 15),
    Case("nodes_sharing_no_model", [["candle"], ["rkllm"]], exact_count=0),
    Case("no_engines", [], exact_count=len(model_cards)),
    Case("nonexistent_engine", [["NonexistentEngine"]], exact_count=0),
    Case("dummy_engine", [["dummy"]], ("dummy",), exact_count=1),
]


def class_names(engine_lists: list[list[str]]) -> list[list[str]]:
    """The lists with each short engine name replaced by its class name (unknown names kept)."""
    classes = inference_engine_classes | CLASSIC_CLASSES
    return [[classes.get(engine, engine) for engine in engines] for engines in engine_lists]


def check(case: Case, supported: list[str]) -> None:
    for model in case.contains:
        assert model in supported, f"{case.name}: {model} missing"
    for model in case.excludes:
        assert model not in supported, f"{case.name}: {model} listed"
    if case.min_count is not None:
        assert len(supported) > case.min_count, f"{case.name}: only {len(supported)} models"
    if case.max_count is not None:
        assert len(supported) < case.max_count, f"{case.name}: {len(supported)} models"
    if case.exact_count is not None:
        assert len(supported) == case.exact_count, f"{case.name}: {len(supported)} models"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_supported_models_by_short_names(case: Case) -> None:
    check(case, get_supported_models(case.engine_lists))


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_class_names_mean_the_same_engines(case: Case) -> None:
    supported = get_supported_models(class_names(case.engine_lists))
    check(case, supported)
    assert supported == get_supported_models(case.engine_lists)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
