"""The Hugging Face shard downloader (exo classic's `exo.download.new_shard_download`).

`HfShardDownloader` is implemented in Rust: it fetches only the files a shard's layers need
from `HF_ENDPOINT` (default https://huggingface.co, with `HF_TOKEN` as bearer token) into
`$EXO_HOME/downloads` (`EXO_HOME` defaults to `~/.cache/exo`, as in classic; one `org--name`
directory per repository), in
parallel, resuming partial files and checking sizes and hashes. Files already in the Hugging
Face cache (`HF_HUB_CACHE` / `HF_HOME`) are linked instead of downloaded, and with
`HF_HUB_OFFLINE=1` nothing is fetched.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from exo import _core
from exo._core import DownloadStatusIterator, HfShardDownloader


def exo_home() -> Path:
    """exo's home: `$EXO_HOME`, default `~/.cache/exo`."""
    return _core.exo_home()


def downloads_dir() -> Path:
    """Where models are downloaded to: `downloads` in exo's home."""
    return _core.downloads_dir()


async def ensure_exo_home() -> Path:
    """exo's home, created if missing."""
    home = exo_home()
    await asyncio.to_thread(home.mkdir, parents=True, exist_ok=True)
    return home


async def ensure_downloads_dir() -> Path:
    """The downloads directory, created if missing."""
    path = downloads_dir()
    await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
    return path


async def has_exo_home_read_access() -> bool:
    """Whether exo's home can be read."""
    return os.access(exo_home(), os.R_OK)


async def has_exo_home_write_access() -> bool:
    """Whether exo's home can be written."""
    return os.access(exo_home(), os.W_OK)


async def delete_model(model_id: str, inference_engine_name: str) -> bool:
    """Deletes the downloaded files of `model_id` for an engine class; False when there were none."""
    return await asyncio.to_thread(_core.delete_model, model_id, inference_engine_name)


async def seed_models(seed_dir: str | Path) -> list[str]:
    """Links (or copies) the models in `seed_dir` into the downloads directory, so they are used without
    network. Subdirectories in exo's layout (`org--name`) and in the Hugging Face cache's
    (`models--org--name/snapshots/...`) are taken; files already present are kept. Returns the
    repository directories seeded."""
    return await asyncio.to_thread(_core.seed_models, Path(seed_dir))


def new_shard_downloader(max_parallel_downloads: int = 8) -> HfShardDownloader:
    """The downloader a node uses: at most `max_parallel_downloads` files at a time."""
    return HfShardDownloader(max_parallel_downloads)


NewShardDownloader = HfShardDownloader

__all__ = [
    "DownloadStatusIterator",
    "HfShardDownloader",
    "NewShardDownloader",
    "delete_model",
    "downloads_dir",
    "ensure_downloads_dir",
    "ensure_exo_home",
    "exo_home",
    "has_exo_home_read_access",
    "has_exo_home_write_access",
    "new_shard_downloader",
    "seed_models",
]
