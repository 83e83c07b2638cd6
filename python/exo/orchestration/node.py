"""The cluster node (exo classic's `exo.orchestration.node`).

`Node` keeps exo classic's constructor, attributes and callback systems; the ring, the peers,
the topology and every request's token loop run in its Rust core (`NativeNode`). Python sees a
request only when its tokens or statuses reach the listeners registered here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from exo._core import NativeNode, TokenStream
from exo.callbacks import AsyncCallbackSystem
from exo.download.download_progress import RepoProgressEvent
from exo.inference.shard import Shard
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.partitioning_strategy import Partition
from exo.topology.topology import Topology

logger = logging.getLogger(__name__)


class Node:
    """A cluster node with exo classic's API; start it with `await node.start()`."""

    def __init__(
        self,
        _id: str,
        server: Any,
        inference_engine: Any,
        discovery: Any,
        shard_downloader: Any,
        partitioning_strategy: Any = None,
        max_generate_tokens: int = 1024,
        default_sample_temperature: float = 0.0,
        topology_viz: Any = None,
    ) -> None:
        self._core = NativeNode(
            _id, inference_engine, discovery, partitioning_strategy, max_generate_tokens, default_sample_temperature
        )
        self.id = _id
        self.inference_engine = inference_engine
        self.discovery = discovery
        self.shard_downloader = shard_downloader
        self.partitioning_strategy = partitioning_strategy
        self.topology_viz = topology_viz
        self._server: Any = None
        if server is not None:
            self.server = server
        self.node_download_progress: dict[str, Any] = {}
        self.topology_inference_engines_pool: list[list[str]] = []
        # Other nodes' limits as they last announced them (`node_limits` statuses).
        self.node_limits: dict[str, dict[str, Any]] = {}
        self._on_token: AsyncCallbackSystem[str, tuple[str, list[int], bool]] = AsyncCallbackSystem()
        self._on_opaque_status: AsyncCallbackSystem[str, tuple[str, str]] = AsyncCallbackSystem()
        self._on_request_failed: AsyncCallbackSystem[str, tuple[str, str]] = AsyncCallbackSystem()
        self._on_opaque_status.register("node_status").on_next(self.on_node_status)
        self._pump: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    # --- what classic exposes as attributes ---

    @property
    def server(self) -> Any:
        """The server started and stopped with the node (`GRPCServer` or a stand-in)."""
        return self._server

    @server.setter
    def server(self, server: Any) -> None:
        self._server = server
        self._core.set_server(server)

    @property
    def max_generate_tokens(self) -> int:
        return self._core.max_generate_tokens

    @max_generate_tokens.setter
    def max_generate_tokens(self, value: int) -> None:
        self._core.max_generate_tokens = value

    @property
    def default_sample_temperature(self) -> float:
        return self._core.default_sample_temperature

    @default_sample_temperature.setter
    def default_sample_temperature(self, value: float) -> None:
        self._core.default_sample_temperature = value

    @property
    def progress_deadline(self) -> float:
        """Seconds a request started here may wait on other nodes with no sign of progress before it fails with
        `RequestStalledError`."""
        return self._core.progress_deadline

    @progress_deadline.setter
    def progress_deadline(self, seconds: float) -> None:
        self._core.progress_deadline = seconds

    @property
    def loading_grace(self) -> float:
        """Seconds after a sign that a peer may be loading a model during which it may not answer before it counts
        as dead."""
        return self._core.loading_grace

    @loading_grace.setter
    def loading_grace(self, seconds: float) -> None:
        self._core.loading_grace = seconds

    @property
    def device_capabilities(self) -> DeviceCapabilities:
        return self._core.device_capabilities

    @device_capabilities.setter
    def device_capabilities(self, capabilities: DeviceCapabilities) -> None:
        self._core.device_capabilities = capabilities

    @property
    def peers(self) -> list[Any]:
        """The peers in use now."""
        return self._core.peers

    @property
    def topology(self) -> Topology:
        """A copy of the cluster topology as last collected."""
        return self._core.topology

    @property
    def current_topology(self) -> Topology:
        return self._core.topology

    @property
    def outstanding_requests(self) -> dict[str, str]:
        """`{request_id: "processing" | "waiting"}` for the requests active on this node."""
        return self._core.outstanding_requests

    @property
    def running_requests(self) -> list[dict[str, Any]]:
        """The requests running on this node: `request_id`, `phase`, `origin`, `tokens` (sampled here) and
        `nodes` (those it runs on, when this node planned it)."""
        return self._core.running_requests

    @property
    def on_token(self) -> AsyncCallbackSystem[str, tuple[str, list[int], bool]]:
        """Callbacks called with `(request_id, new_tokens, is_finished)`."""
        return self._on_token

    @property
    def on_opaque_status(self) -> AsyncCallbackSystem[str, tuple[str, str]]:
        """Callbacks called with `(request_id, status_json)`."""
        return self._on_opaque_status

    @property
    def on_request_failed(self) -> AsyncCallbackSystem[str, tuple[str, str]]:
        """Callbacks called with `(request_id, error)` when a request fails anywhere in the ring."""
        return self._on_request_failed

    # --- lifecycle ---

    async def start(self, wait_for_peers: int = 0) -> None:
        """Starts the server and discovery, waits for `wait_for_peers` peers, collects the topology."""
        if self._pump is None:
            self._pump = asyncio.create_task(self._deliver_events())
        await self._core.start(wait_for_peers)

    async def stop(self) -> None:
        """Stops discovery and the server; running requests fail."""
        await self._core.stop()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None

    async def _deliver_events(self) -> None:
        """Hands the core's events to the callback systems, on this event loop."""
        while True:
            for event in await self._core.next_events():
                try:
                    if event[0] == "token":
                        _, request_id, tokens, is_finished = event
                        self._on_token.trigger_all(request_id, tokens, is_finished)
                    elif event[0] == "status":
                        self._on_opaque_status.trigger_all(event[1], event[2])
                    else:
                        self._on_request_failed.trigger_all(event[1], event[2])
                except Exception:
                    logger.exception("a node listener failed on %s", event[0])

    # --- requests ---

    async def process_prompt(
        self, base_shard: Shard, prompt: str, request_id: str | None = None, inference_state: dict | None = None
    ) -> str:
        """Starts a request; returns its id once this node's part of the first step is done."""
        return await self._core.process_prompt(base_shard, prompt, request_id, inference_state)

    async def process_tensor(
        self,
        base_shard: Shard,
        tensor: np.ndarray,
        request_id: str | None = None,
        inference_state: dict | None = None,
    ) -> None:
        """Runs this node's shard on `tensor` for a running request."""
        await self._core.process_tensor(base_shard, tensor, request_id, inference_state)

    async def enqueue_example(
        self,
        base_shard: Shard,
        example: np.ndarray,
        target: np.ndarray,
        length: np.ndarray,
        train: bool = False,
        request_id: str | None = None,
    ) -> float:
        """Runs one batch through the ring from the node holding the first layer; its mean loss."""
        return await self._core.enqueue_example(base_shard, example, target, length, train, request_id)

    async def process_example(
        self,
        shard: Shard,
        example: np.ndarray,
        target: np.ndarray,
        length: np.ndarray,
        train: bool = False,
        request_id: str | None = None,
    ) -> float | tuple[float, np.ndarray]:
        """Runs this node's `shard` over an example, then the ring after it: the loss (and input gradient)."""
        return await self._core.process_example(shard, example, target, length, train, request_id)

    def generate(
        self,
        base_shard: Shard,
        prompt: str,
        request_id: str | None = None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        images: npt.NDArray[Any] | None = None,
    ) -> TokenStream:
        """Starts a request and returns the async iterator of its token ids.

        The iterator ends when generation ends (EOS or the token limit), raises the
        `exo.errors` exception of the failure's kind when the request fails anywhere in the ring
        (`ContextOverflowError` from any node's engine, `PeerError` for a lost peer, ...), and
        `await stream.aclose()` cancels the request on every node. `images` are a vision model's
        preprocessed images (`[n, channels, height, width]` float32, see `exo.inference.vision`);
        they go with the prompt to the node holding the first layer, and no further.
        """
        return self._core.generate(
            base_shard,
            prompt,
            request_id,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            images=images,
        )

    async def cancel_request(self, request_id: str) -> None:
        """Stops a request on every node and frees what they keep for it."""
        await self._core.cancel_request(request_id)

    # --- the ring ---

    def get_partition_index(self, offset: int = 0) -> int:
        return self._core.get_partition_index(offset)

    def get_current_shard(self, base_shard: Shard, index: int | None = None) -> Shard:
        return self._core.get_current_shard(base_shard, index)

    def engines(self) -> list[str]:
        """The engines the cluster's nodes run (`candle`, `rkllm`, ...), as far as they are known: this node's first."""
        return self._core.engines()

    def partitions(self) -> list[Partition]:
        """The partitions of the current topology, in ring order."""
        return self._core.partitions()

    async def layer_plan(self, base_shard: Shard) -> list[dict[str, Any]]:
        """The layers each node would hold of `base_shard`'s model for a request started here now, in ring order:
        `node_id`, `start_layer`, `end_layer` and `memory_bytes` (what they need there, `None` when the engine cannot
        tell). Raises `InsufficientMemoryError` when the model does not fit the nodes' memory."""
        plan = await self._core.layer_plan(base_shard)
        return [
            {"node_id": node_id, "start_layer": start, "end_layer": end, "memory_bytes": memory}
            for node_id, start, end, memory in plan
        ]

    async def update_peers(self, wait_for_peers: int = 0) -> bool:
        return await self._core.update_peers(wait_for_peers)

    async def collect_topology(self, visited: set[str], max_depth: int = 4) -> Topology:
        topology = await self._core.collect_topology(visited, max_depth)
        self._update_viz()
        return topology

    async def broadcast_opaque_status(self, request_id: str, status: str) -> None:
        await self._core.broadcast_opaque_status(request_id, status)

    async def broadcast_result(self, request_id: str, result: list[int], is_finished: bool) -> None:
        await self._core.broadcast_result(request_id, result, is_finished)

    async def broadcast_supported_engines(self, supported_engines_names: list[str]) -> None:
        status = {"type": "supported_inference_engines", "node_id": self.id, "engines": supported_engines_names}
        await self.broadcast_opaque_status("", json.dumps(status))

    def get_topology_inference_engines(self) -> list[list[str]]:
        return self.topology_inference_engines_pool

    @property
    def limits(self) -> dict[str, Any] | None:
        """This node's effective limits, `{"max_context": ..., "max_kv_cache_gb": ...}` (`max_context` is `None` until
        a model loads when it is derived from the model); `None` for an engine without such limits."""
        limits = getattr(self.inference_engine, "limits", None)
        return dict(limits) if limits is not None else None

    def limits_by_node(self) -> dict[str, dict[str, Any]]:
        """Each node's limits as far as they are known: this node's as they are now, the others' as announced."""
        known = dict(self.node_limits)
        own = self.limits
        if own is not None:
            known[self.id] = own
        return known

    async def broadcast_limits(self) -> None:
        """Tells every peer this node's limits (a `node_limits` status); nothing for an engine without them."""
        own = self.limits
        if own is not None:
            await self.broadcast_opaque_status("", json.dumps({"type": "node_limits", "node_id": self.id, **own}))

    # --- status handling, as classic ---

    def on_node_status(self, request_id: str, opaque_status: str) -> None:
        """Keeps engine pools and download progress from peers' statuses, and refreshes the TUI."""
        try:
            status = json.loads(opaque_status)
        except ValueError:
            logger.debug("ignoring a status that is not JSON: %r", opaque_status)
            return
        if not isinstance(status, dict):
            return
        kind = status.get("type")
        if kind == "supported_inference_engines":
            self.topology_inference_engines_pool.append(list(status.get("engines", [])))
        elif kind == "download_progress":
            self._record_download_progress(status)
        elif kind == "node_limits":
            self._record_limits(status)
        self._update_viz()

    def _record_download_progress(self, status: dict[str, Any]) -> None:
        try:
            self.node_download_progress[status.get("node_id", "")] = RepoProgressEvent.from_dict(status["progress"])
        except (KeyError, TypeError, ValueError) as e:
            logger.debug("ignoring malformed download progress: %s", e)

    def _record_limits(self, status: dict[str, Any]) -> None:
        node_id, context, budget = status.get("node_id"), status.get("max_context"), status.get("max_kv_cache_gb")
        if not isinstance(node_id, str) or node_id == self.id:
            return
        if not (context is None or isinstance(context, int)) or not isinstance(budget, (int, float)):
            logger.debug("ignoring malformed node limits: %r", status)
            return
        self.node_limits[node_id] = {"max_context": context, "max_kv_cache_gb": budget}

    def _update_viz(self) -> None:
        if self.topology_viz is None:
            return
        try:
            self.topology_viz.update_visualization(
                self.topology, self.partitions(), self.id, self.node_download_progress
            )
        except Exception:
            logger.exception("updating the topology view failed")


__all__ = ["Node", "TokenStream"]
