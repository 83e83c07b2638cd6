"""How a node finds its peers (exo classic's `exo.networking.discovery`)."""

from abc import ABC, abstractmethod
from typing import Any

from exo._core import NativeDiscovery


class Discovery(ABC):
    """Finds peers; every method is a coroutine."""

    @abstractmethod
    async def start(self) -> None:
        """Starts announcing and listening."""

    @abstractmethod
    async def stop(self) -> None:
        """Stops every background task."""

    @abstractmethod
    async def discover_peers(self, wait_for_peers: int = 0) -> list[Any]:
        """The peers known now, after waiting until at least `wait_for_peers` are known."""


Discovery.register(NativeDiscovery)

__all__ = ["Discovery", "NativeDiscovery"]
