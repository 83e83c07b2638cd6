"""The cluster node (exo classic's `exo.orchestration`)."""

from exo.orchestration.node import Node

__all__ = ["Node"]
