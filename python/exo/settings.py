"""Process-wide settings: the debug levels read from the environment at import (`DEBUG`, `DEBUG_DISCOVERY`, as in
exo classic) and the version the API reports."""

from __future__ import annotations

import os


def _env_int(name: str, default: int = 0) -> int:
    """Integer value of environment variable ``name``; ``default`` when unset, empty or not an integer."""
    raw = os.getenv(name)
    if raw is None or not raw.strip():
        return default
    try:
        return int(raw.strip())
    except ValueError:
        return default


DEBUG: int = _env_int("DEBUG")
DEBUG_DISCOVERY: int = _env_int("DEBUG_DISCOVERY")
VERSION: str = "0.0.1"
