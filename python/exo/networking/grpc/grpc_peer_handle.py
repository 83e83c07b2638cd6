"""A peer reached over gRPC (exo classic's `exo.networking.grpc.grpc_peer_handle`)."""

from exo._core import GRPCPeerHandle

__all__ = ["GRPCPeerHandle"]
