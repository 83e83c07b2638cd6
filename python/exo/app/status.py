"""Reading the opaque statuses nodes broadcast (JSON objects with a `type`, as exo classic sends them)."""

from __future__ import annotations

import json
from typing import Any


def parse_status(status_json: str) -> dict[str, Any] | None:
    """The status as a dict, or None when it is not a JSON object."""
    try:
        status = json.loads(status_json)
    except (TypeError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def prompt_start(status_json: str) -> dict[str, Any] | None:
    """The status when it announces that a node starts processing a prompt (`start_process_prompt`), else None."""
    status = parse_status(status_json)
    if status is None or status.get("type") != "node_status" or status.get("status") != "start_process_prompt":
        return None
    return status
