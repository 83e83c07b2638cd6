"""What a node asks of a peer (exo classic's `exo.networking.peer_handle`)."""

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from exo._core import NativePeerHandle
from exo.inference.shard import Shard
from exo.topology.device_capabilities import DeviceCapabilities
from exo.topology.topology import Topology


class PeerHandle(ABC):
    """A connection to one peer; every network method is a coroutine."""

    @abstractmethod
    def id(self) -> str:
        """The peer's node id."""

    @abstractmethod
    def addr(self) -> str:
        """Where the peer listens."""

    @abstractmethod
    def description(self) -> str:
        """How the peer was found."""

    @abstractmethod
    def device_capabilities(self) -> DeviceCapabilities:
        """The peer's device."""

    @abstractmethod
    async def connect(self) -> None:
        """Opens the connection."""

    @abstractmethod
    async def is_connected(self) -> bool:
        """Whether a connection is open."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Closes the connection."""

    @abstractmethod
    async def health_check(self) -> bool:
        """Whether the peer answers in time."""

    @abstractmethod
    async def send_prompt(
        self, shard: Shard, prompt: str, request_id: str | None = None, inference_state: dict[str, Any] | None = None
    ) -> None:
        """Starts a request on the peer."""

    @abstractmethod
    async def send_tensor(
        self,
        shard: Shard,
        tensor: np.ndarray,
        request_id: str | None = None,
        inference_state: dict[str, Any] | None = None,
    ) -> None:
        """Continues a request on the peer."""

    @abstractmethod
    async def send_result(self, request_id: str, result: list[int], is_finished: bool) -> None:
        """Delivers tokens to the peer's listeners."""

    @abstractmethod
    async def send_opaque_status(self, request_id: str, status: str) -> None:
        """Delivers a JSON status to the peer's listeners."""

    @abstractmethod
    async def collect_topology(self, visited: set[str], max_depth: int) -> Topology:
        """The peer's view of the cluster."""


PeerHandle.register(NativePeerHandle)

__all__ = ["NativePeerHandle", "PeerHandle"]
