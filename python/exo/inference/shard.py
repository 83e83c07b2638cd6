"""A contiguous range of a model's layers (exo classic's `exo.inference.shard`)."""

from exo._core import Shard, shards_overlap

__all__ = ["Shard", "shards_overlap"]
