"""Runs `exo.main` with the real node and gRPC server, discovery replaced by a fixed list of peers.

`EXO_TEST_PEERS` lists the peers as `id@host:port,...`. This stands in for UDP/manual discovery so that two
processes form a cluster over loopback deterministically. Usage: python cli_with_fixed_peers.py [exo.main args...]
"""

import os
import sys
import types
from typing import Any

from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.topology.device_capabilities import UNKNOWN_DEVICE_CAPABILITIES


class FixedPeers:
    """A discovery stand-in with exo classic's constructor arguments, returning the peers in EXO_TEST_PEERS."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.peers = []
        for entry in filter(None, os.environ.get("EXO_TEST_PEERS", "").split(",")):
            peer_id, address = entry.split("@", 1)
            self.peers.append(GRPCPeerHandle(peer_id, address, "fixed", UNKNOWN_DEVICE_CAPABILITIES))

    async def start(self) -> None:
        print("discovery started", flush=True)

    async def stop(self) -> None:
        print("discovery stopped", flush=True)

    async def discover_peers(self, wait_for_peers: int = 0) -> list[Any]:
        return list(self.peers)


for name, cls in (
    ("exo.networking.udp.udp_discovery", "UDPDiscovery"),
    ("exo.networking.manual.manual_discovery", "ManualDiscovery"),
    ("exo.networking.tailscale.tailscale_discovery", "TailscaleDiscovery"),
):
    module = types.ModuleType(name)
    setattr(module, cls, FixedPeers)
    sys.modules[name] = module

from exo.main import run  # noqa: E402

sys.exit(run(sys.argv[1:]))
