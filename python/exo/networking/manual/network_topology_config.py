"""The manual discovery config: `{"peers": {node_id: {"address", "port", "device_capabilities"}}}`.

`NetworkTopology.from_path(path)` raises `ConfigNotFoundError` (a `FileNotFoundError`) for a missing file
and `InvalidConfigError` (a `ValueError`) for one that does not validate.
"""

from exo._core import NetworkTopology, PeerConfig

__all__ = ["NetworkTopology", "PeerConfig"]
