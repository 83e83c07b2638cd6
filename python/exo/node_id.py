"""A node's id: a UUID persisted in the temporary directory, so a machine keeps its id across restarts."""

from __future__ import annotations

import logging
import tempfile
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

NODE_ID_FILENAME = ".exo_node_id"


def is_valid_uuid(val: object) -> bool:
    """Whether `val` reads as a UUID."""
    try:
        uuid.UUID(str(val))
    except ValueError:
        return False
    return True


def get_or_create_node_id() -> str:
    """This machine's node id, persisted in ``<tempdir>/.exo_node_id``.

    An unreadable-as-UUID file is replaced by a fresh id; if the file cannot be read or written a fresh,
    unpersisted id is returned.
    """
    node_id_file = Path(tempfile.gettempdir()) / NODE_ID_FILENAME
    try:
        if node_id_file.is_file():
            stored_id = node_id_file.read_text(encoding="utf-8", errors="replace").strip()
            if is_valid_uuid(stored_id):
                logger.debug("Retrieved existing node ID: %s", stored_id)
                return stored_id
            logger.debug("Stored node ID is not a valid UUID; generating a new one")
        new_id = str(uuid.uuid4())
        node_id_file.write_text(new_id, encoding="utf-8")
        logger.debug("Generated and stored new node ID: %s", new_id)
        return new_id
    except OSError as e:
        logger.debug("IO error creating node ID: %s", e)
        return str(uuid.uuid4())
