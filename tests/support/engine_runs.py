"""Runs of the candle engine over a model's layers, for the fidelity tests of its formats."""

from __future__ import annotations

import numpy as np

from exo.inference.candle import CandleInferenceEngine
from exo.inference.shard import Shard

PROMPT = [3, 17, 42, 8, 99, 5, 61, 23]


async def prompt_logits(model: str, layers: int, **options: str) -> np.ndarray:
    """The logits after PROMPT, every layer on one shard."""
    engine = CandleInferenceEngine(**options)
    logits, _ = await engine.infer_tensor("r", Shard(model, 0, layers - 1, layers), np.array([PROMPT]))
    return np.asarray(logits, dtype=np.float32).reshape(-1)


async def greedy(model: str | list[str], layers: int, steps: int, cuts: tuple[int, ...] = ()) -> list[int]:
    """Greedy tokens after PROMPT, the layers run as shards ending at each of `cuts` (and the last);
    `model` names one checkpoint, or one per shard."""
    bounds = [-1, *cuts, layers - 1]
    models = model if isinstance(model, list) else [model] * len(bounds[1:])
    shards = [Shard(models[i], bounds[i] + 1, bounds[i + 1], layers) for i in range(len(bounds) - 1)]
    engines = [CandleInferenceEngine() for _ in shards]
    tokens: list[int] = []
    x = np.array([PROMPT])
    for _ in range(steps):
        for engine, shard in zip(engines, shards, strict=True):
            x, _ = await engine.infer_tensor("r", shard, x)
        token = int(np.asarray(x).reshape(-1).argmax())
        tokens.append(token)
        x = np.array([[token]])
    return tokens


async def forced_logits(model: str, layers: int, tokens: list[int]) -> list[np.ndarray]:
    """Logits after PROMPT and after each of `tokens`, fed one at a time."""
    engine = CandleInferenceEngine()
    shard = Shard(model, 0, layers - 1, layers)
    steps = [np.array([PROMPT]), *(np.array([[t]]) for t in tokens)]
    return [np.asarray((await engine.infer_tensor("r", shard, x))[0], dtype=np.float32).reshape(-1) for x in steps]


async def assert_follows_reference(model: str, reference: str, layers: int, tolerance: float, steps: int) -> None:
    """`model`'s logits along `reference`'s greedy path agree with the reference's (see
    `assert_logits_agree`)."""
    path = await greedy(reference, layers, steps)
    assert_logits_agree(
        await forced_logits(model, layers, path), await forced_logits(reference, layers, path), tolerance
    )


def assert_logits_agree(mine: list[np.ndarray], theirs: list[np.ndarray], tolerance: float) -> None:
    """At every step, `mine` stay within `tolerance` of the largest of `theirs`, and choose the
    same token wherever the best two of `theirs` are further apart than twice that."""
    assert len(mine) == len(theirs)
    for step, (ours, reference) in enumerate(zip(mine, theirs, strict=True)):
        top, second = np.sort(reference)[-2:][::-1]
        scale = np.abs(reference).max()
        assert np.abs(ours - reference).max() <= tolerance * scale, step
        if top - second > 2 * tolerance * scale:
            assert int(ours.argmax()) == int(reference.argmax()), step
