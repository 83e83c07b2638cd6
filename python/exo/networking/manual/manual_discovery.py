"""Discovery from a JSON network config that is re-read when it changes, implemented in Rust.

`ManualDiscovery(network_config_path, node_id, create_peer_handle)`; `start()` raises `ConfigNotFoundError`
or `InvalidConfigError` (naming the file) when the config cannot be used; a later edit that does not
validate keeps the last good peers.
"""

from exo._core import ManualDiscovery

__all__ = ["ManualDiscovery"]
