"""Choosing a free TCP port, skipping the ones handed out recently (exo classic's `find_available_port`)."""

from __future__ import annotations

import logging
import random
import socket
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

USED_PORTS_FILENAME = "exo_used_ports"
_USED_PORTS_KEPT = 20


def _read_used_ports(path: Path) -> list[int]:
    try:
        with path.open(encoding="utf-8") as f:
            return [int(line.strip()) for line in f if line.strip().isdigit()]
    except (OSError, UnicodeDecodeError):
        return []


def _write_used_port(path: Path, port: int, used_ports: list[int]) -> None:
    recent = [*used_ports[-(_USED_PORTS_KEPT - 1) :], port]
    try:
        path.write_text("".join(f"{p}\n" for p in recent), encoding="utf-8")
    except OSError as e:
        logger.debug("Could not record used port %d in %s: %s", port, path, e)


def find_available_port(host: str = "", min_port: int = 49152, max_port: int = 65535) -> int:
    """A random port in ``[min_port, max_port]`` that can be bound on ``host``.

    Ports handed out recently (the last 20, kept in ``<tempdir>/exo_used_ports``) are skipped, so that processes
    started close together do not pick the same one. Raises RuntimeError when no port in the range can be bound.
    """
    used_ports_file = Path(tempfile.gettempdir()) / USED_PORTS_FILENAME
    used_ports = _read_used_ports(used_ports_file)
    candidates = list(set(range(min_port, max_port + 1)) - set(used_ports))
    random.shuffle(candidates)
    for port in candidates:
        logger.debug("Trying port %d", port)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError:
            continue
        _write_used_port(used_ports_file, port, used_ports)
        return port
    raise RuntimeError("No available ports in the specified range")
