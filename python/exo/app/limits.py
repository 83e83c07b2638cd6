"""Announcing this node's limits (its KV cache budget and context) to its peers as `node_limits` statuses, again
whenever they change or the peers do, so that every node's `/topology` and TUI show every node's limits."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)

LIMITS_CHECK_INTERVAL_S = 2.0


async def announce_limits(node: Any, interval: float = LIMITS_CHECK_INTERVAL_S) -> None:
    """Broadcasts `node`'s limits when they or its peers changed since the last announcement; runs until cancelled."""
    announced: tuple[list[str], dict[str, Any]] | None = None
    while True:
        limits = node.limits
        current = (sorted(peer.id() for peer in node.peers), limits)
        if limits is not None and current != announced:
            try:
                await node.broadcast_limits()
                announced = current
            except Exception as e:  # a peer going away mid-broadcast; the next round tries again
                logger.debug("announcing this node's limits failed: %s", e)
        await asyncio.sleep(interval)
