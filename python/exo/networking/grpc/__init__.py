"""exo classic's gRPC transport: `GRPCServer` and `GRPCPeerHandle`."""
