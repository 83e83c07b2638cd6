"""A xotorch-core node in a ring with a stand-in for an exo classic node (`support.classic_stand_in`) that fails
exactly as classic does: it drops a request whose state holds anything, drops every request when its forwarding
fails, and answers nothing while it loads its weights. The node sends it only the empty state classic sends, fails
a dropped request after the progress deadline with `RequestStalledError` and keeps serving, and lets a loading peer
be silent for the loading grace before it calls it dead."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

import pytest

from exo import main as cli
from exo.app.app import seconds_setting
from exo.errors import InvalidArgumentError, PeerError, RequestStalledError
from exo.helpers import find_available_port
from exo.inference.dummy_inference_engine import DummyInferenceEngine
from exo.inference.shard import Shard
from exo.networking.grpc.grpc_peer_handle import GRPCPeerHandle
from exo.networking.grpc.grpc_server import GRPCServer
from exo.orchestration.node import Node
from exo.settings import env_seconds
from exo.topology.device_capabilities import DeviceCapabilities, DeviceFlops
from support.classic_stand_in import ClassicStandIn, serving, state_entries

DUMMY_TOKENS = [2, 3, 4, 5, 6, 7, 8, 9, 10, 69]
BASE = Shard("dummy", 0, 7, 8)
FLOPS = DeviceFlops(1.0, 1.0, 1.0)


class FixedDiscovery:
    """Discovery that always finds the same peers."""

    def __init__(self, peers: list[Any]) -> None:
        self.peers = peers

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def discover_peers(self, wait_for_peers: int = 0) -> list[Any]:
        return self.peers


@asynccontextmanager
async def mixed_ring(
    stubs: tuple[ModuleType, ModuleType], progress_deadline: float, loading_grace: float
) -> AsyncIterator[tuple[Node, ClassicStandIn]]:
    """Our node (the last layers) and the classic stand-in (the first layers, having more memory)."""
    pb, pb_grpc = stubs
    port = find_available_port("127.0.0.1")
    stand_in = ClassicStandIn(pb, pb_grpc, "classic", 4096, f"127.0.0.1:{port}")
    async with serving(stand_in):
        capabilities = DeviceCapabilities("Classic Box", "CPU", 4096, FLOPS)
        peer = GRPCPeerHandle("classic", f"127.0.0.1:{stand_in.port}", "MAN", capabilities)
        node = Node("ours", None, DummyInferenceEngine(), FixedDiscovery([peer]), None)
        node.device_capabilities = DeviceCapabilities("Our Box", "CPU", 1024, FLOPS)
        node.progress_deadline = progress_deadline
        node.loading_grace = loading_grace
        node.server = GRPCServer(node, "127.0.0.1", port)
        await node.start()
        try:
            assert [p.node_id for p in node.partitions()] == ["classic", "ours"]
            yield node, stand_in
        finally:
            await node.stop()


async def generate(node: Node) -> list[int]:
    return [token async for token in node.generate(BASE, "hi")]


async def test_a_classic_peer_gets_only_the_empty_state_classic_sends(stubs: tuple[ModuleType, ModuleType]) -> None:
    async with mixed_ring(stubs, progress_deadline=60, loading_grace=120) as (node, stand_in):
        assert await asyncio.wait_for(generate(node), 30) == DUMMY_TOKENS
        # The prompt and a tensor for every token but the last went to the classic node, each with an empty state.
        assert len(stand_in.states) == len(DUMMY_TOKENS)
        assert [state_entries(state) for state in stand_in.states] == [[]] * len(DUMMY_TOKENS)
        assert stand_in.dropped == []


async def test_a_request_classic_drops_fails_after_the_progress_deadline_and_the_next_succeeds(
    stubs: tuple[ModuleType, ModuleType],
) -> None:
    async with mixed_ring(stubs, progress_deadline=1.5, loading_grace=0.5) as (node, stand_in):
        stand_in.forwards = False
        started = time.monotonic()
        with pytest.raises(RequestStalledError, match=r"no progress for 1\.5 s .* waited on classic"):
            await asyncio.wait_for(generate(node), 30)
        assert 1.5 <= time.monotonic() - started < 10
        assert len(stand_in.dropped) == 1
        stand_in.forwards = True
        assert await asyncio.wait_for(generate(node), 30) == DUMMY_TOKENS
        assert node.outstanding_requests == {}


async def test_a_loading_classic_peer_is_not_called_dead_within_the_grace(
    stubs: tuple[ModuleType, ModuleType],
) -> None:
    async with mixed_ring(stubs, progress_deadline=2, loading_grace=20) as (node, stand_in):
        # Five seconds without an answer: the node's health checks (every second, 2 s each) fail meanwhile.
        stand_in.loading_seconds = 5
        assert await asyncio.wait_for(generate(node), 30) == DUMMY_TOKENS
        assert [peer.id() for peer in node.peers] == ["classic"]


async def test_a_peer_silent_past_the_grace_is_called_dead_and_rejoins(stubs: tuple[ModuleType, ModuleType]) -> None:
    async with mixed_ring(stubs, progress_deadline=2, loading_grace=0.5) as (node, stand_in):
        stand_in.loading_seconds = 5
        with pytest.raises(PeerError, match=r"classic .* stopped answering"):
            await asyncio.wait_for(generate(node), 30)
        for _ in range(100):
            if [peer.id() for peer in node.peers] == ["classic"] and len(node.partitions()) == 2:
                break
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(generate(node), 30) == DUMMY_TOKENS


def test_the_deadline_and_the_grace_come_from_flags_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert env_seconds("EXO_PROGRESS_DEADLINE", {}) is None
    assert env_seconds("EXO_PROGRESS_DEADLINE", {"EXO_PROGRESS_DEADLINE": "7.5"}) == 7.5
    for bad in ("soon", "0", "-3", "nan", "inf"):
        with pytest.raises(ValueError, match=f"EXO_LOADING_GRACE must be a number of seconds above 0, not '{bad}'"):
            env_seconds("EXO_LOADING_GRACE", {"EXO_LOADING_GRACE": bad})
    args = cli.build_parser().parse_args(["--progress-deadline", "5"])
    monkeypatch.setenv("EXO_PROGRESS_DEADLINE", "9")
    monkeypatch.setenv("EXO_LOADING_GRACE", "30")
    assert seconds_setting(args.progress_deadline, "EXO_PROGRESS_DEADLINE") == 5.0  # the flag wins
    assert seconds_setting(args.loading_grace, "EXO_LOADING_GRACE") == 30.0
    with pytest.raises(cli.CliError, match=r"--loading-grace must be a number of seconds above 0, not 0\.0"):
        seconds_setting(0.0, "EXO_LOADING_GRACE")
    node = Node("n", None, DummyInferenceEngine(), FixedDiscovery([]), None)
    assert (node.progress_deadline, node.loading_grace) == (60.0, 120.0)
    node.progress_deadline = 2.5
    assert node.progress_deadline == 2.5
    with pytest.raises(InvalidArgumentError, match="progress_deadline must be a number of seconds above 0, not 0"):
        node.progress_deadline = 0
