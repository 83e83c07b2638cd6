"""Process-wide settings read from the environment at import, as exo classic reads them, and the version the API
reports.

- `DEBUG` (0-9): how much the node logs. 0 shows warnings and errors; 1 also what the node does (the port it
  picked, its home directory, peers joining and leaving); 2 the details of every module, the Rust core's included;
  each level above 2 adds what classic prints at that level (3: prompts as templated, 4: resolved tokenizers, ...);
  9 also turns on the debug logs of the libraries underneath (aiohttp, asyncio, ...).
- `DEBUG_DISCOVERY` (0-9): the same scale for peer discovery alone (UDP, manual, Tailscale).
- `VERBOSE=1`: tokenizer detail: what each tokenizer loaded is, and every generated token with its text.
- `TEMPERATURE`: the default sampling temperature (`--default-temp` overrides it).
- `EXO_PROGRESS_DEADLINE`, `EXO_LOADING_GRACE`: seconds, as `--progress-deadline` and `--loading-grace` set them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping

#: The loggers of this package and of its Rust core (whose `log` records reach Python under the crate's name).
PACKAGE_LOGGERS = ("exo", "xotorch_core")
#: The loggers of peer discovery, which `DEBUG_DISCOVERY` turns up.
DISCOVERY_LOGGERS = ("exo.networking", "xotorch_core.net.discovery")
#: The logger `VERBOSE=1` turns on: tokenizers as they load, and each generated token.
TOKENIZER_LOGGER = "exo.tokenizer"


def _env_int(name: str, default: int = 0) -> int:
    """Integer value of environment variable ``name``; ``default`` when unset, empty or not an integer."""
    raw = os.getenv(name)
    if raw is None or not raw.strip():
        return default
    try:
        return int(raw.strip())
    except ValueError:
        return default


def env_temperature(environ: Mapping[str, str] = os.environ) -> float | None:
    """The sampling temperature `TEMPERATURE` gives; None when unset or empty. Raises `ValueError` for a value that
    is not a number at or above 0."""
    raw = environ.get("TEMPERATURE", "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0.0:  # false for nan: words and "nan" alike
        raise ValueError(f"TEMPERATURE must be a number at or above 0, not {raw!r}")
    return value


def env_seconds(name: str, environ: Mapping[str, str] = os.environ) -> float | None:
    """The seconds environment variable `name` gives; None when unset or empty. Raises `ValueError` for a value that
    is not a number above 0."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.0 < value < math.inf:  # false for nan too
        raise ValueError(f"{name} must be a number of seconds above 0, not {raw!r}")
    return value


def env_count(name: str, environ: Mapping[str, str] = os.environ) -> int | None:
    """The whole number above 0 environment variable `name` gives; None when unset or empty. Raises `ValueError`
    for anything else."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{name} must be a whole number above 0, not {raw!r}")
    return value


def debug_level(level: int) -> int:
    """The `logging` level of a message classic prints from `DEBUG >= level` on: 1 is INFO, 2 DEBUG, and each level
    above 2 one step below DEBUG, so that `DEBUG=n` shows exactly the messages of levels 1 to n."""
    if level <= 1:
        return logging.INFO
    return logging.DEBUG - (level - 2)


def _threshold(debug: int) -> int:
    return logging.WARNING if debug <= 0 else debug_level(min(debug, 9))


def logging_levels(debug: int, debug_discovery: int = 0, verbose: bool = False) -> dict[str, int]:
    """The level of each logger that `DEBUG`, `DEBUG_DISCOVERY` and `VERBOSE` set ("" is the root logger)."""
    package = _threshold(debug)
    levels = {"": logging.DEBUG if debug >= 9 else logging.WARNING}
    levels.update(dict.fromkeys(PACKAGE_LOGGERS, package))
    levels.update(dict.fromkeys(DISCOVERY_LOGGERS, min(package, _threshold(debug_discovery))))
    levels[TOKENIZER_LOGGER] = min(package, logging.DEBUG) if verbose else package
    return levels


def configure_logging(debug: int, debug_discovery: int = 0, verbose: bool = False) -> None:
    """Sets up logging to stderr at the levels `logging_levels` gives. Call it before the Rust core logs anything:
    the core caches each logger's level on its first record."""
    for level in range(3, 10):
        logging.addLevelName(debug_level(level), f"DEBUG{level}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, level in logging_levels(debug, debug_discovery, verbose).items():
        logging.getLogger(name).setLevel(level)


DEBUG: int = _env_int("DEBUG")
DEBUG_DISCOVERY: int = _env_int("DEBUG_DISCOVERY")
VERBOSE: bool = _env_int("VERBOSE") >= 1
VERSION: str = "0.0.1"
