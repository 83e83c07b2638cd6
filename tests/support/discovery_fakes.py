"""Fake peers and small helpers shared by the discovery tests."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.topology import Topology

WAIT = 30.0


class FakePeer:
    """A peer handle that only answers health checks; the test decides whether it is healthy."""

    def __init__(self, peer_id: str, address: str, description: str, device_capabilities: DeviceCapabilities) -> None:
        self._id = peer_id
        self._address = address
        self._description = description
        self._device_capabilities = device_capabilities
        self.healthy = True
        self.connects = 0

    def id(self) -> str:
        return self._id

    def addr(self) -> str:
        return self._address

    def description(self) -> str:
        return self._description

    def device_capabilities(self) -> DeviceCapabilities:
        return self._device_capabilities

    async def connect(self) -> None:
        self.connects += 1

    async def is_connected(self) -> bool:
        return False

    async def disconnect(self) -> None:
        return None

    async def health_check(self) -> bool:
        return self.healthy

    async def send_prompt(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("fake peer")

    async def send_tensor(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("fake peer")

    async def send_result(self, request_id: str, result: list[int], is_finished: bool) -> None:
        return None

    async def send_opaque_status(self, request_id: str, status: str) -> None:
        return None

    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
        return Topology()


class FakePeerFactory:
    """`create_peer_handle` that records every peer it makes; `healthy` applies to peers made later."""

    def __init__(self, healthy: bool = True) -> None:
        self.healthy = healthy
        self.made: list[FakePeer] = []

    def __call__(
        self, peer_id: str, address: str, description: str, device_capabilities: DeviceCapabilities
    ) -> FakePeer:
        peer = FakePeer(peer_id, address, description, device_capabilities)
        peer.healthy = self.healthy
        self.made.append(peer)
        return peer


def peer_ids(peers: list[Any]) -> list[str]:
    """Sorted ids of `peers`."""
    return sorted(peer.id() for peer in peers)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT) -> None:
    """Waits until `check()` is true; fails naming `what` if it never becomes true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.05)


def free_udp_port() -> int:
    """A UDP port nothing on 127.0.0.1 uses right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def node_config(port: int, address: str = "127.0.0.1") -> dict[str, Any]:
    """One node's entry of a manual network config."""
    flops = {"fp32": 0, "fp16": 0, "int8": 0}
    caps = {"model": "Unknown Model", "chip": "Unknown Chip", "memory": 0, "flops": flops}
    return {"address": address, "port": port, "device_capabilities": caps}


def write_config(path: Path, peers: dict[str, Any] | str) -> None:
    """Writes a manual network config (or raw text) aside and renames it into place, as editors do."""
    text = peers if isinstance(peers, str) else json.dumps({"peers": peers}, indent=2)
    aside = path.with_suffix(".tmp")
    aside.write_text(text)
    os.replace(aside, path)
