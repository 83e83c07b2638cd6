"""The cluster graph (exo classic's `exo.topology.topology`)."""

from exo._core import PeerConnection, Topology

__all__ = ["PeerConnection", "Topology"]
