"""The shard downloader interface (exo classic's `exo.download.shard_download`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path

from exo._core import HfShardDownloader
from exo.callbacks import AsyncCallbackSystem
from exo.download.download_progress import RepoProgressEvent
from exo.inference.shard import Shard


class ShardDownloader(ABC):
    """Makes the files of a shard present locally."""

    @abstractmethod
    async def ensure_shard(self, shard: Shard, inference_engine_name: str) -> Path:
        """Fetches what `shard` needs for the engine class `inference_engine_name`; returns its directory."""

    @property
    @abstractmethod
    def on_progress(self) -> AsyncCallbackSystem[str, tuple[Shard, RepoProgressEvent]]:
        """Callbacks triggered with `(shard, RepoProgressEvent)` as downloads progress."""

    @abstractmethod
    def get_shard_download_status(self, inference_engine_name: str) -> AsyncIterator[tuple[Path, RepoProgressEvent]]:
        """`(directory, progress)` of every model the engine supports."""


class NoopShardDownloader(ShardDownloader):
    """Downloads nothing (for tests and the dummy engine)."""

    def __init__(self) -> None:
        self._on_progress: AsyncCallbackSystem[str, tuple[Shard, RepoProgressEvent]] = AsyncCallbackSystem()

    async def ensure_shard(self, shard: Shard, inference_engine_name: str) -> Path:
        return Path("/tmp/noop_shard")

    @property
    def on_progress(self) -> AsyncCallbackSystem[str, tuple[Shard, RepoProgressEvent]]:
        return self._on_progress

    async def get_shard_download_status(
        self, inference_engine_name: str
    ) -> AsyncIterator[tuple[Path, RepoProgressEvent]]:
        nothing: tuple[tuple[Path, RepoProgressEvent], ...] = ()
        for item in nothing:
            yield item


ShardDownloader.register(HfShardDownloader)

__all__ = ["NoopShardDownloader", "ShardDownloader"]
