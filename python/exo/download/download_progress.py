"""Download progress events (exo classic's `exo.download.download_progress`).

Events cross the network as their `to_dict()` form (ETAs in seconds) inside `download_progress`
opaque statuses; `from_dict` reads them back.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from exo.inference.shard import Shard

DownloadStatus = Literal["not_started", "in_progress", "complete"]


@dataclass
class RepoFileProgressEvent:
    """One file's progress."""

    repo_id: str
    repo_revision: str
    file_path: str
    downloaded: int
    downloaded_this_session: int
    total: int
    speed: int
    eta: timedelta
    status: DownloadStatus
    start_time: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "repo_id": self.repo_id,
            "repo_revision": self.repo_revision,
            "file_path": self.file_path,
            "downloaded": self.downloaded,
            "downloaded_this_session": self.downloaded_this_session,
            "total": self.total,
            "speed": self.speed,
            "eta": self.eta.total_seconds(),
            "status": self.status,
            "start_time": self.start_time,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RepoFileProgressEvent:
        fields = dict(data)
        if "eta" in fields:
            fields["eta"] = timedelta(seconds=fields["eta"])
        return cls(**fields)


@dataclass
class RepoProgressEvent:
    """A shard's progress over all the files it needs."""

    shard: Shard
    repo_id: str
    repo_revision: str
    completed_files: int
    total_files: int
    downloaded_bytes: int
    downloaded_bytes_this_session: int
    total_bytes: int
    overall_speed: int
    overall_eta: timedelta
    file_progress: dict[str, RepoFileProgressEvent]
    status: DownloadStatus

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard.to_dict(),
            "repo_id": self.repo_id,
            "repo_revision": self.repo_revision,
            "completed_files": self.completed_files,
            "total_files": self.total_files,
            "downloaded_bytes": self.downloaded_bytes,
            "downloaded_bytes_this_session": self.downloaded_bytes_this_session,
            "total_bytes": self.total_bytes,
            "overall_speed": self.overall_speed,
            "overall_eta": self.overall_eta.total_seconds(),
            "file_progress": {path: f.to_dict() for path, f in self.file_progress.items()},
            "status": self.status,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RepoProgressEvent:
        fields = dict(data)
        if "overall_eta" in fields:
            fields["overall_eta"] = timedelta(seconds=fields["overall_eta"])
        if "file_progress" in fields:
            fields["file_progress"] = {
                path: RepoFileProgressEvent.from_dict(f) for path, f in fields["file_progress"].items()
            }
        if "shard" in fields:
            fields["shard"] = Shard.from_dict(fields["shard"])
        return cls(**fields)


RepoFileProgressCallback = Callable[[RepoFileProgressEvent], Coroutine[Any, Any, None]]
RepoProgressCallback = Callable[[RepoProgressEvent], Coroutine[Any, Any, None]]

__all__ = [
    "RepoFileProgressCallback",
    "RepoFileProgressEvent",
    "RepoProgressCallback",
    "RepoProgressEvent",
]
