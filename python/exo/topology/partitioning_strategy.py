"""Partitions of a model's layers across nodes (exo classic's `exo.topology.partitioning_strategy`)."""

from abc import ABC, abstractmethod

from exo._core import Partition, RingMemoryWeightedPartitioningStrategy, Topology, map_partitions_to_shards


class PartitioningStrategy(ABC):
    """Splits the interval [0, 1) of a model's layers among the nodes of a topology."""

    @abstractmethod
    def partition(self, topology: Topology) -> list[Partition]:
        """Contiguous partitions covering [0, 1), in ring order."""


PartitioningStrategy.register(RingMemoryWeightedPartitioningStrategy)

__all__ = ["Partition", "PartitioningStrategy", "map_partitions_to_shards"]
