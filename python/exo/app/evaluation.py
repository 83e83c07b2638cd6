"""`eval MODEL --data DIR`: scores the data's test split on the ring and prints the loss per
predicted token and its perplexity."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from exo.api.chat_request import ApiError
from exo.api.model_choice import resolve_model_async
from exo.train.dataset import batch_count, batches, load_texts, tokenize


def example_progress(description: str) -> Progress:
    """A progress bar over batches showing the running loss and tokens/s (fields `loss`, `rate`)."""
    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[rate]:.0f} tokens/s"),
        TimeElapsedColumn(),
    )


class LossTotal:
    """Losses of batches added up by the positions each scored, so the mean is per predicted token."""

    def __init__(self) -> None:
        self.weighted = 0.0
        self.positions = 0

    def add(self, loss: float, positions: int) -> None:
        self.weighted += loss * positions
        self.positions += positions

    @property
    def mean(self) -> float:
        return self.weighted / self.positions if self.positions else math.nan


async def load_model_and_sequences(app: Any, model_name: str | None, data_dir: str, split: str) -> Any:
    """The resolved model and the token ids of `split`'s texts, or an error message for the user."""
    if not model_name:
        return None, None, f"a model name is required with '{app.args.command}'"
    try:
        model = await resolve_model_async(model_name, app.engine_classname, app.shard_downloader)
    except ApiError as e:
        return None, None, e.message
    try:
        texts = load_texts(data_dir, split)
    except ValueError as e:
        return None, None, str(e)
    if not texts:
        return None, None, f"no {split} examples: {data_dir}/{split}.jsonl is missing or empty"
    tokenizer = await app.api.tokenizer_for(model)
    return model, tokenize(texts, tokenizer.encode), None


async def evaluate(app: Any, model_name: str | None, data_dir: str, batch_size: int) -> int:
    """Scores the test split of `data_dir` with `model_name` on the ring; the process's exit status."""
    model, sequences, error = await load_model_and_sequences(app, model_name, data_dir, "test")
    if error is not None:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    print(f"Evaluating {len(sequences)} examples with batch_size {batch_size}")
    total = LossTotal()
    started = time.perf_counter()
    with example_progress("eval") as progress:
        task = progress.add_task("eval", total=batch_count(sequences, batch_size), loss=math.nan, rate=0.0)
        for batch in batches(sequences, batch_size):
            loss = await app.node.enqueue_example(model.base_shard, batch.inputs, batch.targets, batch.lengths)
            total.add(float(loss), batch.positions)
            rate = total.positions / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=1, loss=total.mean, rate=rate)
    print(f"loss {total.mean:.6f} | perplexity {math.exp(total.mean):.4f} | {total.positions} tokens")
    return 0
