"""What serves a node to its peers (exo classic's `exo.networking.server`)."""

from abc import ABC, abstractmethod

from exo._core import GRPCServer


class Server(ABC):
    """Started and stopped with the node."""

    @abstractmethod
    async def start(self) -> None:
        """Starts listening."""

    @abstractmethod
    async def stop(self) -> None:
        """Stops listening."""


Server.register(GRPCServer)

__all__ = ["Server"]
