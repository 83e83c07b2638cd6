"""`train MODEL --data DIR --iters N`: fine-tunes LoRA adapters on the data's train split across the
ring, one batch per step, and saves each shard's adapters in PEFT's layout.

Every node trains its own layers' adapters with the settings it was started with (`--lora-*`,
`--optimizer`, `--learning-rate`), so start every node of the ring with the same ones. Saving is
coordinated with an opaque status, `{"type": "save_adapters", "dir": ...}`: every node writes its
shard's adapters to `dir/layers-{start}-{end}/`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from exo.app.evaluation import LossTotal, example_progress, load_model_and_sequences
from exo.train.dataset import Batch, batches, load_texts, tokenize

SAVE_STATUS = "save_adapters"


def configure_engine(engine: Any, args: Any) -> None:
    """Hands the training flags to an engine that fine-tunes (candle); others ignore them."""
    configure = getattr(engine, "configure_training", None)
    if configure is None:
        return
    configure(
        rank=args.lora_rank,
        alpha=args.lora_alpha,
        targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        adapter=args.resume_checkpoint,
    )


def save_status(directory: str | Path, origin: str) -> str:
    """The opaque status asking every node to save its adapters under `directory`."""
    return json.dumps({"type": SAVE_STATUS, "dir": str(Path(directory).resolve()), "origin": origin})


def on_save_status(engine: Any, node_id: str, status: str) -> Path | None:
    """Saves `engine`'s adapters when `status` asks for it (and this node did not send it); where they went."""
    try:
        message = json.loads(status)
    except json.JSONDecodeError:
        return None
    if not isinstance(message, dict) or message.get("type") != SAVE_STATUS or message.get("origin") == node_id:
        return None
    save = getattr(engine, "save_adapters", None)
    return save(message["dir"]) if save is not None else None


def endless_batches(sequences: list[list[int]], batch_size: int, seed: int = 0) -> Iterator[Batch]:
    """Shuffled batches, epoch after epoch."""
    rng = np.random.default_rng(seed)
    while True:
        yield from batches(sequences, batch_size, rng)


async def _valid_loss(app: Any, base: Any, sequences: list[list[int]], batch_size: int) -> float:
    total = LossTotal()
    for batch in batches(sequences, batch_size):
        total.add(await app.node.enqueue_example(base, batch.inputs, batch.targets, batch.lengths), batch.positions)
    return total.mean


async def _save(app: Any, directory: Path) -> None:
    """This node's adapters now, and every peer's through the save status."""
    saved = app.node.inference_engine.save_adapters(str(directory))
    await app.node.broadcast_opaque_status("", save_status(directory, app.node.id))
    print(f"Saved adapters to {directory}" + (f" (this node: {saved})" if saved else ""))


async def train(app: Any, model_name: str | None) -> int:
    """Fine-tunes `model_name` on `--data`'s train split; the process's exit status."""
    args = app.args
    model, sequences, error = await load_model_and_sequences(app, model_name, args.data, "train")
    if error is not None:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    tokenizer = await app.api.tokenizer_for(model)
    valid = tokenize(load_texts(args.data, "valid"), tokenizer.encode)
    base = model.base_shard
    print(f"Training on {len(sequences)} examples with batch_size {args.batch_size} for {args.iters} iterations")
    if valid:
        print(f"valid loss before: {await _valid_loss(app, base, valid, args.batch_size):.6f}")
    checkpoints = Path(args.save_checkpoint_dir)
    total, started, rate = LossTotal(), time.perf_counter(), 0.0
    with example_progress("train") as progress:
        task = progress.add_task("train", total=args.iters, loss=math.nan, rate=0.0)
        for step, batch in zip(range(1, args.iters + 1), endless_batches(sequences, args.batch_size), strict=False):
            loss = await app.node.enqueue_example(base, batch.inputs, batch.targets, batch.lengths, train=True)
            total.add(float(loss), batch.positions)
            rate = total.positions / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=1, loss=float(loss), rate=rate)
            if args.save_every > 0 and step % args.save_every == 0 and step < args.iters:
                await _save(app, checkpoints / f"{step:06d}")
    print(f"train loss {total.mean:.6f} | {total.positions} tokens | {rate:.0f} tokens/s")
    await _save(app, checkpoints / f"{args.iters:06d}")
    if valid:
        mean = await _valid_loss(app, base, valid, args.batch_size)
        print(f"valid loss after: {mean:.6f} | perplexity {math.exp(mean):.4f}")
    return 0
