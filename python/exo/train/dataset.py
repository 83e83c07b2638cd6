"""Fine-tuning data as exo classic reads it: a directory holding `train.jsonl`, `valid.jsonl` and
`test.jsonl`, one `{"text": ...}` object per line, cut into batches of token ids.

A batch pads every sequence with id 0 to the longest sequence of its whole split (classic's
uniform length), takes tokens `0..n-1` as the inputs and `1..n` as the targets, and keeps each
sequence's token count: a sequence of `length` tokens has `length - 1` positions to score.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Batch:
    """One batch as it goes on the wire: `inputs` and `targets` are int32 `[batch, seq]`, `lengths` int32 `[batch]`."""

    inputs: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray

    @property
    def positions(self) -> int:
        """Positions whose targets are real tokens (what the loss averages over)."""
        seq = self.inputs.shape[1]
        return int(np.minimum(self.lengths - 1, seq).clip(min=0).sum())


def load_texts(data_dir: str | Path, split: str) -> list[str]:
    """The texts of `split` (`train`, `valid` or `test`) in `data_dir`; empty when its file is missing."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        return []
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{number}: expected an object with a "text" string')
        texts.append(record["text"])
    return texts


def tokenize(texts: Sequence[str], encode: Callable[[str], Sequence[int]]) -> list[list[int]]:
    """Each text's token ids; texts of fewer than 2 tokens have nothing to predict and are left out."""
    sequences = [list(encode(text)) for text in texts]
    return [ids for ids in sequences if len(ids) >= 2]


def batches(
    sequences: Sequence[Sequence[int]], batch_size: int, rng: np.random.Generator | None = None
) -> Iterator[Batch]:
    """Batches of `batch_size` sequences in order (shuffled by `rng` if given); the last may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if not sequences:
        return
    width = max(len(ids) for ids in sequences)
    order = np.arange(len(sequences)) if rng is None else rng.permutation(len(sequences))
    for start in range(0, len(order), batch_size):
        chosen = [sequences[i] for i in order[start : start + batch_size]]
        padded = np.zeros((len(chosen), width), dtype=np.int32)
        for row, ids in enumerate(chosen):
            padded[row, : len(ids)] = ids
        lengths = np.array([len(ids) for ids in chosen], dtype=np.int32)
        yield Batch(padded[:, :-1], padded[:, 1:], lengths)


def batch_count(sequences: Sequence[Sequence[int]], batch_size: int) -> int:
    """How many batches `batches` yields."""
    return -(-len(sequences) // batch_size)
