"""The node's gRPC server (exo classic's `exo.networking.grpc.grpc_server`)."""

from exo._core import GRPCServer

__all__ = ["GRPCServer"]
