"""Admission of chat completions: at most `max_active` run at once; up to `max_queued` more wait their turn in
arrival order, and past that the API answers 503 at once. A waiting request whose client goes away leaves the
queue (its handler is cancelled while it waits)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from exo.api.chat_request import ApiError


class Admission:
    """Counts running and waiting requests; `async with admission.turn():` holds a running slot."""

    def __init__(self, max_active: int, max_queued: int) -> None:
        if max_active < 1 or max_queued < 0:
            raise ValueError(f"need max_active >= 1 and max_queued >= 0, got {max_active} and {max_queued}")
        self.max_active = max_active
        self.max_queued = max_queued
        self._slots = asyncio.Semaphore(max_active)
        self.active = 0
        self.waiting = 0

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Waits for a running slot (first come, first served) and holds it; 503 when the queue is full."""
        if self._slots.locked() and self.waiting >= self.max_queued:
            raise ApiError(
                503,
                f"The node is busy: {self.active} requests running and {self.waiting} waiting; try again later.",
                "server_overloaded",
                "server_error",
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()
