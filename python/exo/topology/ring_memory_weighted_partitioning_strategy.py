"""exo classic's default strategy: memory-weighted shares around a ring."""

from exo._core import RingMemoryWeightedPartitioningStrategy
from exo.topology.partitioning_strategy import PartitioningStrategy

__all__ = ["PartitioningStrategy", "RingMemoryWeightedPartitioningStrategy"]
