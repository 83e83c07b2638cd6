"""Shutting a process down on a signal (exo classic's `shutdown`): cancel every task, then stop the server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, Protocol

from exo.terminal import print_yellow_exo

logger = logging.getLogger(__name__)


class _Stoppable(Protocol):
    def stop(self) -> Awaitable[None]: ...


async def shutdown(signal: Any, loop: asyncio.AbstractEventLoop, server: _Stoppable) -> None:
    """Cancel every other task on the running loop, wait for them to finish, then stop ``server``."""
    logger.info("Received exit signal %s...", getattr(signal, "name", signal))
    logger.info("Thank you for using exo.")
    print_yellow_exo()
    current = asyncio.current_task()
    server_tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in server_tasks:
        task.cancel()
    logger.info("Cancelling %d outstanding tasks", len(server_tasks))
    await asyncio.gather(*server_tasks, return_exceptions=True)
    await server.stop()
