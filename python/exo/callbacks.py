"""Async callbacks (exo classic's `AsyncCallback` and `AsyncCallbackSystem`): observers called on each result, and
waiters woken on their own event loop, from any thread."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")


class AsyncCallback(Generic[T]):
    """Holds the latest result set on it, calls observers on each ``set`` and wakes ``wait``-ers.

    ``set`` may be called from any thread, with or without a running event loop: observers run synchronously in
    the caller's thread, and each waiter receives the result on its own event loop.
    """

    def __init__(self) -> None:
        self.result: tuple[T, ...] | None = None
        self.observers: list[Callable[..., None]] = []
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple[T, ...]]]] = []
        self._lock = threading.Lock()

    async def wait(self, check_condition: Callable[..., bool], timeout: float | None = None) -> tuple[T, ...]:
        """Return the args of the current or next result for which ``check_condition(*args)`` is true.

        Raises ``asyncio.TimeoutError`` when none arrives within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[T, ...]] = asyncio.Queue()
        waiter = (loop, queue)
        with self._lock:
            current = self.result
            self._waiters.append(waiter)
        try:
            if current is not None and check_condition(*current):
                return current
            return await asyncio.wait_for(self._next_match(queue, check_condition), timeout)
        finally:
            with self._lock:
                self._waiters.remove(waiter)

    @staticmethod
    async def _next_match(queue: asyncio.Queue[tuple[T, ...]], check_condition: Callable[..., bool]) -> tuple[T, ...]:
        while True:
            args = await queue.get()
            if check_condition(*args):
                return args

    def on_next(self, callback: Callable[..., None]) -> None:
        """Call ``callback(*args)`` on every subsequent ``set``."""
        self.observers.append(callback)

    def set(self, *args: T) -> None:
        """Record ``args`` as the result, call the observers, then hand the result to every waiter."""
        with self._lock:
            self.result = args
            waiters = list(self._waiters)
        try:
            for observer in list(self.observers):
                observer(*args)
        finally:
            self._deliver(waiters, args)

    @staticmethod
    def _deliver(
        waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[tuple[T, ...]]]], args: tuple[T, ...]
    ) -> None:
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, queue in waiters:
            if loop is running:
                queue.put_nowait(args)
                continue
            try:
                loop.call_soon_threadsafe(queue.put_nowait, args)
            except RuntimeError:
                # The waiter's loop has been closed; nobody is left to wake.
                logger.debug("AsyncCallback: dropping result for a waiter whose event loop is closed")


class AsyncCallbackSystem(Generic[K, T]):
    """Named ``AsyncCallback``s."""

    def __init__(self) -> None:
        self.callbacks: dict[K, AsyncCallback[T]] = {}

    def register(self, name: K) -> AsyncCallback[T]:
        """The callback registered under ``name``, created on first use."""
        callback = self.callbacks.get(name)
        if callback is None:
            callback = AsyncCallback[T]()
            self.callbacks[name] = callback
        return callback

    def deregister(self, name: K) -> None:
        self.callbacks.pop(name, None)

    def trigger(self, name: K, *args: T) -> None:
        """Set ``args`` on the callback named ``name``, if registered."""
        callback = self.callbacks.get(name)
        if callback is not None:
            callback.set(*args)

    def trigger_all(self, *args: T) -> None:
        """Set ``args`` on every registered callback."""
        for callback in list(self.callbacks.values()):
            callback.set(*args)
