"""exo classic's engine check, run as classic's CI runs it: `python -m exo.inference.test_inference_engine`.

An engine must give the same outputs for a model run whole as for the model split into two continuous shards, the
second run by another engine: the prompt's logits and the next step's. Checked on synthetic models written to a
temporary directory (no network); the exit status is 0 when every check passes, 1 when one fails.
"""

import asyncio
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from exo.inference.candle import CandleInferenceEngine
from exo.inference.inference_engine import InferenceEngine, NativeInferenceEngine
from exo.inference.shard import Shard
from exo.testing.synth import PRESETS, write_model

log = logging.getLogger(__name__)

#: An engine of this package (native) or one written in Python.
Engine = InferenceEngine | NativeInferenceEngine

#: classic's prompt.
PROMPT = "In a single word only, what is the last name of the current president of the USA?"
#: The synthetic models checked: two architectures.
CHECKED_PRESETS = ("tiny-llama", "tiny-qwen3")


def _assert_same(what: str, whole: np.ndarray, split: np.ndarray) -> None:
    if whole.shape != split.shape:
        raise AssertionError(f"{what}: shape {split.shape} from the two shards, {whole.shape} from the whole model")
    if not np.array_equal(whole, split):
        gap = float(np.max(np.abs(whole.astype(np.float64) - split.astype(np.float64))))
        raise AssertionError(f"{what} differ between the whole model and its two shards (by up to {gap:g})")


async def check_split_matches_whole(engine_1: Engine, engine_2: Engine, model_id: str, n_layers: int) -> None:
    """Raises AssertionError unless `engine_1` running all `n_layers` of `model_id` gives the same logits, for the
    prompt and for the next token, as `engine_1` running the first half and `engine_2` the rest."""
    whole = Shard(model_id, 0, n_layers - 1, n_layers)
    logits_whole, _ = await engine_1.infer_prompt("whole", whole, PROMPT)
    token = (await engine_1.sample(logits_whole)).reshape(1, -1)
    next_whole, _ = await engine_1.infer_tensor("whole", whole, token)

    middle = n_layers // 2
    first, second = Shard(model_id, 0, middle, n_layers), Shard(model_id, middle + 1, n_layers - 1, n_layers)
    hidden, _ = await engine_1.infer_prompt("split", first, PROMPT)
    logits_split, _ = await engine_2.infer_tensor("split", second, hidden)
    token_split = (await engine_1.sample(logits_split)).reshape(1, -1)
    hidden, _ = await engine_1.infer_tensor("split", first, token_split)
    next_split, _ = await engine_2.infer_tensor("split", second, hidden)

    _assert_same("the prompt's logits", logits_whole, logits_split)
    _assert_same("the next token's logits", next_whole, next_split)


async def check_presets(root: Path, presets: tuple[str, ...] = CHECKED_PRESETS) -> None:
    """Writes each preset's synthetic model under `root` and checks it on two candle engines."""
    for preset in presets:
        model = write_model(preset, root / preset)
        n_layers = int(PRESETS[preset].config["num_hidden_layers"])
        await check_split_matches_whole(CandleInferenceEngine(), CandleInferenceEngine(), str(model), n_layers)
        log.info("%s: a split into two shards on two engines matches the whole model", preset)


def main() -> int:
    """Runs the checks; 0 when they pass, 1 when one fails."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="exo-engine-check-") as root:
        try:
            asyncio.run(check_presets(Path(root)))
        except AssertionError as e:
            log.error("engine check failed: %s", e)
            return 1
        except ModuleNotFoundError as e:  # the synthetic tokenizers are trained with `tokenizers`
            log.error("engine check needs the test extra (pip install 'xotorch-core[test]'): %s", e)
            return 1
    log.info("all engine checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
