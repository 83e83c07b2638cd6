"""Broadcasting this node's download progress to its peers (`download_progress` statuses, as exo classic sends
them), throttled so that a fast download does not flood the ring."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

PROGRESS_BROADCAST_INTERVAL_S = 0.2


class ProgressBroadcastThrottle:
    """Decides which download progress events are broadcast: at most one per model per 0.2 s (plus changes)."""

    def __init__(self, interval: float = PROGRESS_BROADCAST_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def should_send(self, model_id: str, status: str) -> bool:
        """Whether an event of `model_id` with `status` goes out now; records it when it does."""
        if status == "not_started":
            return False
        now = self.clock()
        with self._lock:
            last = self._last.get(model_id)
            if last is not None:
                sent_at, last_status = last
                if status == last_status == "complete":
                    return False
                if status == last_status and now - sent_at < self.interval:
                    return False
            self._last[model_id] = (now, status)
            return True


class ProgressBroadcaster:
    """Sends the shard downloader's progress events through `node.broadcast_opaque_status`.

    `schedule` runs a coroutine on the app's loop (progress events arrive on download threads)."""

    def __init__(self, node: Any, schedule: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.node = node
        self._schedule = schedule
        self._throttle = ProgressBroadcastThrottle()

    def register(self, shard_downloader: Any) -> None:
        """Listen to `shard_downloader`'s progress."""
        shard_downloader.on_progress.register("broadcast").on_next(self.on_progress)

    def on_progress(self, shard: Any, event: Any) -> None:
        """Broadcast `event` unless the throttle holds it back."""
        if not self._throttle.should_send(shard.model_id, event.status):
            return
        message = json.dumps({"type": "download_progress", "node_id": self.node.id, "progress": event.to_dict()})
        self._schedule(self.node.broadcast_opaque_status("", message))
